//! Sinusoidal timestep embeddings (Vaswani et al. 2017, §3.5, as used by DDPM), diffusers'
//! `TimestepEmbedding` MLP, and the pooled-text embedding (`TextTimeEmbedding`) some U-Nets add
//! to it.

use crate::layers::attention::{merge_heads, scaled_dot_product, split_heads};
use crate::layers::linear::{linear, linear_no_bias, Linear};
use crate::layers::ops::{layer_norm, LayerNorm};
use candle_core::{DType, Device, Result, Tensor};
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
    /// A condition's projection added to the input (`cond_proj`, no bias): the guidance
    /// embedding of guidance-distilled and latent-consistency U-Nets.
    cond_proj: Option<Linear>,
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: VarBuilder, in_dim: usize, time_embed_dim: usize) -> Result<Self> {
        Self::with_condition(vb, in_dim, time_embed_dim, None)
    }

    /// With a `cond_dim`-wide condition projected onto the input, as diffusers'
    /// `TimestepEmbedding(cond_proj_dim=…)`.
    pub fn with_condition(
        vb: VarBuilder,
        in_dim: usize,
        time_embed_dim: usize,
        cond_dim: Option<usize>,
    ) -> Result<Self> {
        Ok(Self {
            cond_proj: match cond_dim {
                Some(d) => Some(linear_no_bias(d, in_dim, vb.pp("cond_proj"))?),
                None => None,
            },
            linear_1: linear(in_dim, time_embed_dim, vb.pp("linear_1"))?,
            linear_2: linear(time_embed_dim, time_embed_dim, vb.pp("linear_2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None)
    }

    /// `condition` `[B, cond_dim]` is added through `cond_proj` when both exist (diffusers
    /// ignores a condition the layer has no projection for, and runs without one).
    pub fn forward_with(&self, x: &Tensor, condition: Option<&Tensor>) -> Result<Tensor> {
        let x = match (&self.cond_proj, condition) {
            (Some(proj), Some(c)) => (x + proj.forward(&c.to_dtype(x.dtype())?)?)?,
            _ => x.clone(),
        };
        self.linear_2.forward(&self.linear_1.forward(&x)?.silu()?)
    }
}

/// diffusers' `get_guidance_scale_embedding` (Meng et al. 2023, the guidance-distillation
/// conditioning): each scale `w` → `[sin(1000 w·f_i), cos(1000 w·f_i)]` with
/// `f_i = exp(−i · ln 10000 / (half − 1))`, `[N]` → `[N, dim]`, in f32 with torch's order of
/// rounding. Pipelines pass `w = guidance_scale − 1`.
pub fn guidance_scale_embedding(w: &[f64], dim: usize, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let step = 10000f32.ln() / (half as f32 - 1.0);
    let freqs: Vec<f32> = (0..half).map(|i| (i as f32 * -step).exp()).collect();
    let mut rows = Vec::with_capacity(w.len() * dim);
    for &w in w {
        let w = w as f32 * 1000.0;
        let args: Vec<f32> = freqs.iter().map(|f| w * f).collect();
        rows.extend(args.iter().map(|a| a.sin()));
        rows.extend(args.iter().map(|a| a.cos()));
        if dim % 2 == 1 {
            rows.push(0.0);
        }
    }
    Tensor::from_vec(rows, (w.len(), dim), device)
}

/// diffusers' `AttentionPooling` (from DeepFloyd IF): one query — the mean of the sequence plus
/// a learned position — attends over itself and the sequence; `[B, L, D]` → `[B, D]`.
#[derive(Debug, Clone)]
pub struct AttentionPooling {
    positional_embedding: Tensor,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    heads: usize,
}

impl AttentionPooling {
    pub fn new(vb: VarBuilder, dim: usize, heads: usize) -> Result<Self> {
        let positional_embedding = crate::layers::compute_param(vb.get_with_hints(
            (1, dim),
            "positional_embedding",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: (dim as f64).powf(-0.5),
            },
        )?)?;
        Ok(Self {
            positional_embedding,
            q_proj: linear(dim, dim, vb.pp("q_proj"))?,
            k_proj: linear(dim, dim, vb.pp("k_proj"))?,
            v_proj: linear(dim, dim, vb.pp("v_proj"))?,
            heads,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, dim) = x.dims3()?;
        let class = x
            .mean_keepdim(1)?
            .broadcast_add(&self.positional_embedding.to_dtype(x.dtype())?)?; // [B, 1, D]
        let all = Tensor::cat(&[&class, x], 1)?;
        let q = split_heads(&self.q_proj.forward(&class)?, self.heads)?;
        let k = split_heads(&self.k_proj.forward(&all)?, self.heads)?;
        let v = split_heads(&self.v_proj.forward(&all)?, self.heads)?;
        let scale = ((dim / self.heads) as f64).powf(-0.5);
        merge_heads(&scaled_dot_product(&q, &k, &v, scale, None)?)?.reshape((b, dim))
    }
}

/// diffusers' `TextTimeEmbedding` (`addition_embed_type: "text"`): the text encoder's hidden
/// states, layer-normed, attention-pooled, projected to the time-embedding width and
/// layer-normed again; the U-Net adds it to the timestep embedding.
#[derive(Debug, Clone)]
pub struct TextTimeEmbedding {
    norm1: LayerNorm,
    pool: AttentionPooling,
    proj: Linear,
    norm2: LayerNorm,
}

impl TextTimeEmbedding {
    pub fn new(
        vb: VarBuilder,
        text_dim: usize,
        time_embed_dim: usize,
        heads: usize,
    ) -> Result<Self> {
        Ok(Self {
            norm1: layer_norm(text_dim, 1e-5, vb.pp("norm1"))?,
            pool: AttentionPooling::new(vb.pp("pool"), text_dim, heads)?,
            proj: linear(text_dim, time_embed_dim, vb.pp("proj"))?,
            norm2: layer_norm(time_embed_dim, 1e-5, vb.pp("norm2"))?,
        })
    }

    /// `[B, L, text_dim]` → `[B, time_embed_dim]`.
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let pooled = self.pool.forward(&self.norm1.forward(hidden)?)?;
        self.norm2.forward(&self.proj.forward(&pooled)?)
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
