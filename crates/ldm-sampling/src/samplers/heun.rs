//! Two-evaluation steps: Heun's method (Karras et al. 2022, Alg. 1 without churn) and
//! DPM-Solver-2 (Lu et al. 2022a, Alg. 1 with the midpoint taken in log-sigma, as k-diffusion's
//! `sample_dpm_2`), and its ancestral variant. A step that ends at σ = 0 is a plain Euler step,
//! and so is one that starts from the pure noise of a zero-terminal-SNR schedule
//! ([`is_pure_noise`], σ ≈ 4096): its second evaluation, one step later, would be weighted by
//! the whole jump (Heun: (σ − σ_next)/2 ≈ 2000 against σ_next ≈ 40 at 20 steps), multiplying
//! the model's error there some fifty-fold. On the embedded Shapes model (50 one-object prompts,
//! guidance 7.5, 20 steps) Heun drew the background the caption names 11 % of the time and
//! DPM2 a 74 %, against 100 % and 94 % with the Euler first step.

use super::ancestral::ancestral_step;
use super::{derivative, Run};
use crate::schedule::is_pure_noise;
use crate::Result;
use candle_core::Tensor;

pub(super) fn sample_heun(mut x: Tensor, run: &mut Run) -> Result<Tensor> {
    for i in 0..run.sigmas.len() - 1 {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let denoised = run.denoiser.denoise(&x, sigma)?;
        let d = derivative(&x, &denoised, sigma)?;
        let dt = sigma_next - sigma;
        let x_euler = (&x + (&d * dt)?)?;
        x = if sigma_next == 0.0 || is_pure_noise(sigma) {
            x_euler
        } else {
            let x_euler = run.intermediate(x_euler, sigma_next)?;
            let denoised_2 = run.denoiser.denoise(&x_euler, sigma_next)?;
            let d_2 = derivative(&x_euler, &denoised_2, sigma_next)?;
            let d_prime = ((d + d_2)? / 2.0)?;
            (&x + (d_prime * dt)?)?
        };
        x = run.report(i, x, &denoised)?;
    }
    Ok(x)
}

/// DPM-Solver-2; with `eta > 0` the ancestral variant, which aims at `σ_down` and adds
/// `σ_up` of fresh noise.
pub(super) fn sample_dpm2(mut x: Tensor, run: &mut Run, eta: f64) -> Result<Tensor> {
    for i in 0..run.sigmas.len() - 1 {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let (sigma_down, sigma_up) = ancestral_step(sigma, sigma_next, eta);
        let denoised = run.denoiser.denoise(&x, sigma)?;
        let d = derivative(&x, &denoised, sigma)?;
        x = if sigma_down == 0.0 || is_pure_noise(sigma) {
            (&x + (&d * (sigma_down - sigma))?)?
        } else {
            let mut sigma_mid = ((sigma.ln() + sigma_down.ln()) / 2.0).exp();
            // The midpoint takes its own interpolated timestep (diffusers' `timesteps_interpol`).
            // At η = 1, √(σ σ_down) = σ_next exactly, and the plan would hand it σ_next's
            // timestep (rounded under KDPM2's Karras spacing): one ulp keeps them apart.
            if run.sigmas.contains(&sigma_mid) {
                sigma_mid = f64::from_bits(sigma_mid.to_bits() - 1);
            }
            // diffusers' inpainting blends this midpoint sample with the known region noised
            // to σ_next, where its scheduler's step index points after the first call.
            let x_2 = run.intermediate((&x + (&d * (sigma_mid - sigma))?)?, sigma_next)?;
            let denoised_2 = run.denoiser.denoise(&x_2, sigma_mid)?;
            let d_2 = derivative(&x_2, &denoised_2, sigma_mid)?;
            (&x + (d_2 * (sigma_down - sigma))?)?
        };
        if sigma_up > 0.0 {
            let z = run.randn_like(&x)?;
            x = (x + (z * sigma_up)?)?;
        }
        x = run.report(i, x, &denoised)?;
    }
    Ok(x)
}
