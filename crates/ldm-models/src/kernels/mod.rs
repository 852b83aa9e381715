//! Compute kernels beneath the model layers: how a matrix product, a convolution, an
//! attention or a norm runs on the CPU — GEMM tiles and bf16 packing, im2col, block-wise
//! attention, fused norms and element-wise passes — each behind candle's CustomOp API with its
//! backward where training needs one, and each tested against a plain composition. The layers
//! in [`crate::layers`] build the models and pick a kernel by device, dtype and whether a
//! gradient is needed; nothing here knows a model.

pub mod bf16_gemm;
pub mod conv_bf16;
pub mod conv_gemm;
pub mod conv_train;
pub mod cpu;
pub mod elementwise;
pub mod fused_attention;
pub mod group_norm;
pub mod products;

use candle_core::{Result, Tensor};

static BF16_PRODUCTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Mixed precision for training on the CPU, process-wide: when on, the matrix products of f32
/// layers that take gradients — the convolutions' forward and both backward products — round
/// their operands to bf16 and accumulate in f32 ([`bf16_gemm::gemm_f32`]), while weights,
/// gradients, optimiser state and every other op stay f32: what PyTorch's bf16 autocast does
/// to a training step. Fast with AVX512-BF16 ([`bf16_gemm::available`]); elsewhere the same
/// rounded sums come from a portable loop, slower than f32. Inference is unaffected.
pub fn set_bf16_products(on: bool) {
    BF16_PRODUCTS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`set_bf16_products`] is on.
pub fn bf16_products() -> bool {
    BF16_PRODUCTS.load(std::sync::atomic::Ordering::Relaxed)
}

/// What a three-input CustomOp's backward returns.
type Gradients3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// A backward kernel's flat output cut into its inputs' gradients, in order, each in its
/// input's shape.
pub(crate) fn split_flat(flat: &Tensor, shapes: &[&candle_core::Shape]) -> Result<Vec<Tensor>> {
    let mut at = 0;
    shapes
        .iter()
        .map(|&shape| {
            let n = shape.elem_count();
            let g = flat.narrow(0, at, n)?.reshape(shape)?;
            at += n;
            Ok(g)
        })
        .collect()
}

/// The gradients of a three-input op (input, weight, bias) out of its backward kernel's flat
/// `[dx | dW | db]` output.
pub(crate) fn split_gradients(
    flat: &Tensor,
    x: &candle_core::Shape,
    w: &candle_core::Shape,
    bias_len: usize,
) -> Result<Gradients3> {
    let bias = candle_core::Shape::from(bias_len);
    let mut grads = split_flat(flat, &[x, w, &bias])?.into_iter();
    Ok((grads.next(), grads.next(), grads.next()))
}
