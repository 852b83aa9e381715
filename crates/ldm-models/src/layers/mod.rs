//! Building blocks shared by the autoencoder, the U-Net and the text encoder. One home for each
//! piece of math: attention, the ResNet block, resampling, timestep embeddings, activations.

pub mod attention;
pub mod conv;
pub mod conv_gemm;
pub mod cpu;
pub mod fused_attention;
pub mod linear;
pub mod norm;
pub mod ops;
pub mod resnet;
pub mod sampling;
pub mod timestep;

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
pub use conv::Conv2d;

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

/// `x * sigmoid(1.702 x)`: OpenAI CLIP's activation.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
}

/// Exact (erf) GELU, as `torch.nn.functional.gelu` without approximation.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}
