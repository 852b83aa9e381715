//! The [`Denoiser`] interface samplers run over (Karras et al. 2022, §2: D(x; σ)), and the one
//! preconditioning layer that turns a network's ε, v or x₀ prediction into a denoised estimate —
//! used by sampling and by training alike.

use candle_core::{Result, Tensor};

/// `D(x; σ)`: the denoised estimate of `x`, a sample at noise level `σ` in the
/// variance-exploding parametrisation `x = x₀ + σ ε` (k-diffusion's convention).
pub trait Denoiser: Sync {
    fn denoise(&self, x: &Tensor, sigma: f64) -> Result<Tensor>;
}

/// What a diffusion network predicts (diffusers' `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    /// The noise ε (DDPM; SD1, SDXL).
    Epsilon,
    /// `v = α ε − σ x₀` in the variance-preserving parametrisation (Salimans & Ho 2022; SD2-v).
    V,
    /// The clean sample x₀.
    Sample,
}

impl std::str::FromStr for Prediction {
    type Err = crate::Error;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "epsilon" => Ok(Prediction::Epsilon),
            "v_prediction" => Ok(Prediction::V),
            "sample" => Ok(Prediction::Sample),
            other => Err(crate::Error::Config(format!(
                "unknown prediction_type `{other}` (expected epsilon, v_prediction or sample)"
            ))),
        }
    }
}

/// The input scaling `c_in = 1/√(σ² + 1)`: the network sees the variance-preserving sample.
pub fn c_in(sigma: f64) -> f64 {
    1.0 / (sigma * sigma + 1.0).sqrt()
}

/// `x / √(σ² + 1)` as diffusers' `scale_model_input` computes it (float32, true division).
pub fn scale_input(x: &Tensor, sigma: f64) -> Result<Tensor> {
    let s = sigma as f32;
    let norm = Tensor::new((s * s + 1.0).sqrt(), x.device())?.to_dtype(x.dtype())?;
    x.broadcast_div(&norm)
}

impl Prediction {
    /// The denoised estimate from the network's `output` for VE sample `x` at `sigma`.
    pub fn to_denoised(self, x: &Tensor, output: &Tensor, sigma: f64) -> Result<Tensor> {
        match self {
            Prediction::Epsilon => x - (output * sigma)?,
            // x₀ = α x_vp − σ_vp v with x_vp = x/√(σ²+1), α = 1/√(σ²+1), σ_vp = σ/√(σ²+1);
            // float32 scalars and a true division, in diffusers' order.
            Prediction::V => {
                let s = sigma as f32;
                let var = Tensor::new(s * s + 1.0, x.device())?.to_dtype(x.dtype())?;
                (output * (-s / (s * s + 1.0).sqrt()) as f64)? + x.broadcast_div(&var)?
            }
            Prediction::Sample => Ok(output.clone()),
        }
    }
}

/// What a scheduler does to its x̂₀ estimate before stepping (diffusers' `clip_sample` and
/// `thresholding`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum X0Clip {
    /// Clamp to `[−r, r]` (`clip_sample_range`).
    Clamp(f64),
    /// Dynamic thresholding (Saharia et al. 2022, §2.3; diffusers' `_threshold_sample`): per
    /// batch item, s = the `ratio`-quantile of |x̂₀| clamped to [1, `max`], then x̂₀ clamped to
    /// [−s, s] and divided by s.
    Threshold { ratio: f64, max: f64 },
}

impl X0Clip {
    /// Applies the clip to a `[B, …]` estimate.
    pub fn apply(&self, x0: &Tensor) -> Result<Tensor> {
        match *self {
            X0Clip::Clamp(r) => x0.clamp(-r, r),
            X0Clip::Threshold { ratio, max } => {
                let dims = x0.dims().to_vec();
                let dtype = x0.dtype();
                let flat = x0.flatten_from(1)?.to_dtype(candle_core::DType::F32)?;
                let rows: Vec<Vec<f32>> = flat.to_vec2()?;
                let mut out = Vec::with_capacity(rows.len() * rows.first().map_or(0, Vec::len));
                for row in rows {
                    let s = (quantile_abs(&row, ratio) as f64).clamp(1.0, max.max(1.0)) as f32;
                    out.extend(row.iter().map(|v| v.clamp(-s, s) / s));
                }
                Tensor::from_vec(out, dims, x0.device())?.to_dtype(dtype)
            }
        }
    }
}

/// `torch.quantile(|v|, q)` (linear interpolation between the order statistics, in float32).
fn quantile_abs(v: &[f32], q: f64) -> f32 {
    let mut a: Vec<f32> = v.iter().map(|x| x.abs()).collect();
    a.sort_by(f32::total_cmp);
    if a.is_empty() {
        return 0.0;
    }
    let pos = q.clamp(0.0, 1.0) * (a.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let w = (pos - lo as f64) as f32;
    a[lo] + w * (a[hi] - a[lo])
}
