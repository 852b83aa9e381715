//! Building blocks shared by the autoencoder, the U-Net and the text encoder. One home for each
//! piece of math: attention, the ResNet block, resampling, timestep embeddings, activations.
//! Each layer picks how it runs from [`crate::kernels`] (by device, dtype and whether a
//! gradient is needed); how a kernel computes is there, not here.

pub mod attention;
pub mod conv;
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
    let op = crate::kernels::elementwise::Elementwise {
        name: "quick-gelu",
        f: crate::kernels::cpu::quick_gelu_slice,
    };
    match op.apply(x) {
        Some(y) => y,
        None => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
    }
}

/// Exact (erf) GELU, as `torch.nn.functional.gelu` without approximation (one vectorised pass
/// for f32 inference on the CPU).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    let op = crate::kernels::elementwise::Elementwise {
        name: "gelu-erf",
        f: crate::kernels::cpu::gelu_erf_slice,
    };
    op.apply(x).unwrap_or_else(|| x.gelu_erf())
}
