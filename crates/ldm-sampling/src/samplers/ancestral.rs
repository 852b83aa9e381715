//! Euler, Euler ancestral, DDIM (η) and DDPM: one update in the variance-exploding
//! parametrisation. With `σ_up = min(σ', η √(σ'²(σ² − σ'²)/σ²))` and `σ_down = √(σ'² − σ_up²)`,
//! the step is `x' = x₀ + σ_down d + σ_up z` (k-diffusion `get_ancestral_step`); η = 0 is Euler
//! (and deterministic DDIM), η = 1 is Euler ancestral and DDPM's posterior (Song et al. 2021 §4.1).

use super::{derivative, Run};
use crate::denoiser::X0Clip;
use crate::Result;
use candle_core::Tensor;

/// `(σ_down, σ_up)` for a step from `sigma` to `sigma_next` with noise strength `eta`.
pub fn ancestral_step(sigma: f64, sigma_next: f64, eta: f64) -> (f64, f64) {
    if eta == 0.0 || sigma_next == 0.0 {
        return (sigma_next, 0.0);
    }
    let up = (eta
        * (sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next) / (sigma * sigma))
            .sqrt())
    .min(sigma_next);
    ((sigma_next * sigma_next - up * up).sqrt(), up)
}

/// Steps to each landing (the next sigma unless the plan says otherwise); `clip` acts on the
/// x̂₀ term alone, as DDIM's does.
pub(super) fn sample(
    mut x: Tensor,
    run: &mut Run,
    eta: f64,
    clip: Option<&X0Clip>,
) -> Result<Tensor> {
    for i in 0..run.sigmas.len() - 1 {
        let (sigma, sigma_next) = (run.sigmas[i], run.landing(i));
        let denoised = run.denoiser.denoise(&x, sigma)?;
        let d = derivative(&x, &denoised, sigma)?;
        let (sigma_down, sigma_up) = ancestral_step(sigma, sigma_next, eta);
        let x0 = match clip {
            Some(c) => c.apply(&denoised)?,
            None => denoised.clone(),
        };
        // x₀ + σ_down d, not x + (σ_down − σ) d: the same step without cancelling a huge x
        // against a huge update at the first step of a zero-terminal-SNR schedule.
        x = (&x0 + (d * sigma_down)?)?;
        if sigma_up > 0.0 {
            let z = run.randn_like(&x)?;
            x = (x + (z * sigma_up)?)?;
        }
        x = run.hand_off(i, x)?;
        x = run.report(i, x, &denoised)?;
    }
    Ok(x)
}
