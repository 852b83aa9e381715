//! Sinusoidal timestep embeddings (Vaswani et al. 2017, §3.5, as used by DDPM) and diffusers'
//! `TimestepEmbedding` MLP.

use crate::layers::linear::{linear, Linear};
use candle_core::{DType, Result, Tensor};
use candle_nn::{Module, VarBuilder};

/// diffusers' `get_timestep_embedding`: `timesteps` `[N]` → `[N, dim]`, computed in f32 the way
/// torch does (exponent, exp and product each rounded to f32).
pub fn sinusoidal_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let log_max = -(10000f32.ln());
    let denom = half as f32 - downscale_freq_shift as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (log_max * i as f32 / denom).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let t = timesteps.to_dtype(DType::F32)?.unsqueeze(1)?; // [N, 1]
    let args = t.broadcast_mul(&freqs)?; // [N, half]
    let (first, second) = if flip_sin_to_cos {
        (args.cos()?, args.sin()?)
    } else {
        (args.sin()?, args.cos()?)
    };
    let emb = Tensor::cat(&[first, second], 1)?;
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// `linear_1 → SiLU → linear_2`, projecting a sinusoidal embedding to the time-embedding width.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: VarBuilder, in_dim: usize, time_embed_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_dim, time_embed_dim, vb.pp("linear_1"))?,
            linear_2: linear(time_embed_dim, time_embed_dim, vb.pp("linear_2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn embedding_matches_closed_form() -> Result<()> {
        // python: diffusers.models.embeddings.get_timestep_embedding(torch.tensor([0., 10.]), 4,
        //         flip_sin_to_cos=True, downscale_freq_shift=0) → cos first, freqs [1, 0.01]
        let t = Tensor::new(&[0f32, 10.0], &Device::Cpu)?;
        let e = sinusoidal_embedding(&t, 4, true, 0.0)?.to_vec2::<f32>()?;
        let expect = [
            [1.0, 1.0, 0.0, 0.0],
            [10f32.cos(), 0.1f32.cos(), 10f32.sin(), 0.1f32.sin()],
        ];
        for (row, exp) in e.iter().zip(expect.iter()) {
            for (a, b) in row.iter().zip(exp.iter()) {
                assert!((a - b).abs() < 1e-6, "{a} vs {b}");
            }
        }
        Ok(())
    }
}
