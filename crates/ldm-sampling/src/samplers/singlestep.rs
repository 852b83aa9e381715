//! Single-step DPM-Solver++ samplers with noise (Lu et al. 2022b, Alg. 1 "DPM-Solver++(2S)",
//! made ancestral/stochastic by k-diffusion): each step evaluates the model at the start and at
//! an intermediate level `σ_s = e^{−(λ + r h)}`, r = ½.

use super::ancestral::ancestral_step;
use super::{derivative, Run};
use crate::Result;
use candle_core::Tensor;

/// `(σ_to/σ_from) x − (e^{−(λ_to − λ_from)} − 1) D`: the first-order DPM-Solver++ update.
fn dpmpp_update(x: &Tensor, sigma_from: f64, sigma_to: f64, denoised: &Tensor) -> Result<Tensor> {
    let h = sigma_from.ln() - sigma_to.ln();
    Ok(((x * (sigma_to / sigma_from))? - (denoised * (-h).exp_m1())?)?)
}

/// DPM-Solver++(2S) ancestral (k-diffusion `sample_dpmpp_2s_ancestral`; diffusers has no
/// equivalent scheduler): aims at `σ_down`, then adds `σ_up` of fresh noise.
pub(super) fn sample_dpmpp_2s_ancestral(mut x: Tensor, run: &mut Run, eta: f64) -> Result<Tensor> {
    for i in 0..run.sigmas.len() - 1 {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let denoised = run.denoiser.denoise(&x, sigma)?;
        let (sigma_down, sigma_up) = ancestral_step(sigma, sigma_next, eta);
        x = if sigma_down == 0.0 {
            let d = derivative(&x, &denoised, sigma)?;
            (&x + (d * (sigma_down - sigma))?)?
        } else {
            let sigma_s = (sigma * sigma_down).sqrt(); // r = ½ in log-sigma
            let x_2 = dpmpp_update(&x, sigma, sigma_s, &denoised)?;
            let denoised_2 = run.denoiser.denoise(&x_2, sigma_s)?;
            dpmpp_update(&x, sigma, sigma_down, &denoised_2)?
        };
        if sigma_next > 0.0 && sigma_up > 0.0 {
            let z = run.randn_like(&x)?;
            x = (x + (z * sigma_up)?)?;
        }
        x = run.report(i, x, &denoised)?;
    }
    Ok(x)
}

/// DPM-Solver++ SDE (k-diffusion `sample_dpmpp_sde`, r = ½, η = 1; diffusers
/// `DPMSolverSDEScheduler`): two noise draws per step, one per stage, in that order. With a
/// Brownian-tree noise source it is diffusers' sampler; with plain Gaussian noise, A1111's.
pub(super) fn sample_dpmpp_sde(mut x: Tensor, run: &mut Run, eta: f64) -> Result<Tensor> {
    for i in 0..run.sigmas.len() - 1 {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let denoised = run.denoiser.denoise(&x, sigma)?;
        x = if sigma_next == 0.0 {
            let d = derivative(&x, &denoised, sigma)?;
            (&x + (d * (sigma_next - sigma))?)?
        } else {
            let sigma_s = (sigma * sigma_next).sqrt();
            // Stage 1: to σ_s, ancestrally.
            let (down, up) = ancestral_step(sigma, sigma_s, eta);
            let mut x_2 = dpmpp_update(&x, sigma, down, &denoised)?;
            let z = run.randn_like(&x)?;
            if up > 0.0 {
                x_2 = (x_2 + (z * up)?)?;
            }
            let denoised_2 = run.denoiser.denoise(&x_2, sigma_s)?;
            // Stage 2: to σ', with the average of both estimates (fac = 1/(2r) = 1).
            let (down, up) = ancestral_step(sigma, sigma_next, eta);
            let mut out = dpmpp_update(&x, sigma, down, &denoised_2)?;
            let z = run.randn_like(&x)?;
            if up > 0.0 {
                out = (out + (z * up)?)?;
            }
            out
        };
        x = run.report(i, x, &denoised)?;
    }
    Ok(x)
}
