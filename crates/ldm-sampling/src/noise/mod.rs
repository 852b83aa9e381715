//! Noise sources. Every stochastic function takes the request's source, so a seed fixes an
//! image and requests never share state. [`TorchCpuRng`] gives `torch.randn` with a seeded CPU
//! generator (what diffusers and ComfyUI use); [`PhiloxRng`] gives A1111's "NV" GPU seeds.

pub mod philox;
pub mod torch;

pub use philox::PhiloxRng;
pub use torch::{NormalFill, TorchCpuRng};

use candle_core::{Device, Result, Shape, Tensor};

/// A source of standard normal noise, drawn in the order torch lays out a tensor.
pub trait NoiseSource: Send {
    /// `n` standard normal values, as one `randn` call of a tensor with `n` elements.
    fn randn(&mut self, n: usize) -> Vec<f32>;
}

impl NoiseSource for TorchCpuRng {
    fn randn(&mut self, n: usize) -> Vec<f32> {
        self.randn_f32(n)
    }
}

/// One `randn` call shaped as `shape` on `device` (f32).
pub fn randn_tensor<S: Into<Shape>>(
    source: &mut dyn NoiseSource,
    shape: S,
    device: &Device,
) -> Result<Tensor> {
    let shape = shape.into();
    let values = source.randn(shape.elem_count());
    Tensor::from_vec(values, shape, device)
}
