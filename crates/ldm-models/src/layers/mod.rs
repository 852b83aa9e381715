//! Building blocks shared by the autoencoder, the U-Net and the text encoder. One home for each
//! piece of math: attention, the ResNet block, resampling, timestep embeddings, activations.

pub mod attention;
pub mod bf16_gemm;
pub mod conv;
pub mod conv_bf16;
pub mod conv_gemm;
pub mod cpu;
pub mod fused_attention;
pub mod linear;
pub mod norm;
pub mod ops;
pub mod resnet;
pub mod sampling;
pub mod timestep;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
pub use conv::Conv2d;

/// The dtype activations flow in for weights loaded in `weights` on `device`. Weights in bf16
/// on the CPU compute in f32: the convolutions and linear layers multiply bf16 operands with f32
/// accumulation ([`bf16_gemm`], or f32 copies of the weights where the CPU lacks AVX512-BF16)
/// and everything else — norms, softmax, activations, the sampler — runs in f32, as PyTorch's
/// bf16 autocast does on the CPU. Elsewhere activations take the weights' dtype.
pub fn compute_dtype(weights: DType, device: &Device) -> DType {
    if weights == DType::BF16 && device.is_cpu() {
        DType::F32
    } else {
        weights
    }
}

/// A parameter outside the matrix products (a norm's scale and shift, a bias, an embedding
/// row) in the dtype of the activations it meets ([`compute_dtype`]).
pub fn compute_param(t: Tensor) -> Result<Tensor> {
    let dtype = compute_dtype(t.dtype(), t.device());
    if dtype == t.dtype() {
        Ok(t)
    } else {
        t.to_dtype(dtype)
    }
}

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

/// A 2-D convolution with bias, square kernel, given stride and padding.
pub fn conv2d(
    vb: VarBuilder,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Conv2d> {
    Conv2d::new(vb, in_channels, out_channels, kernel, stride, padding)
}

/// `x * sigmoid(1.702 x)`: OpenAI CLIP's activation (one vectorised pass for f32 inference on
/// the CPU).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    let op = ops::Elementwise {
        name: "quick-gelu",
        f: cpu::quick_gelu_slice,
    };
    match op.apply(x) {
        Some(y) => y,
        None => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
    }
}

/// Exact (erf) GELU, as `torch.nn.functional.gelu` without approximation (one vectorised pass
/// for f32 inference on the CPU).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    let op = ops::Elementwise {
        name: "gelu-erf",
        f: cpu::gelu_erf_slice,
    };
    op.apply(x).unwrap_or_else(|| x.gelu_erf())
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
