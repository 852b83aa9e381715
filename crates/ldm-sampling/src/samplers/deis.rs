//! DEIS, the diffusion exponential integrator sampler with the log-ρ multistep rule
//! (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator", §4;
//! diffusers `DEISMultistepScheduler`, `algorithm_type="deis"`). In the VE parametrisation
//! ρ = σ, and the first-order step is Euler; the second order integrates the Lagrange
//! extrapolation of ε through the last two steps in closed form.

use super::{derivative, Run};
use crate::Result;
use candle_core::Tensor;

/// ∫ of the Lagrange basis in log ρ (diffusers' `ind_fn`).
fn ind(t: f64, b: f64, c: f64) -> f64 {
    t * (-c.ln() + t.ln() - 1.0) / (b.ln() - c.ln())
}

pub(super) fn sample_deis(
    mut x: Tensor,
    run: &mut Run,
    order: usize,
    lower_order_final: bool,
) -> Result<Tensor> {
    let steps = run.sigmas.len() - 1;
    let mut prev_eps: Option<Tensor> = None;
    for i in 0..steps {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let denoised = run.denoiser.denoise(&x, sigma)?;
        let eps = derivative(&x, &denoised, sigma)?;
        let last = i + 1 == steps && lower_order_final && steps < 15;
        x = match (&prev_eps, order >= 2 && !last) {
            (Some(m1), true) => {
                let sigma_prev = run.sigmas[i - 1];
                let coef1 = ind(sigma_next, sigma, sigma_prev) - ind(sigma, sigma, sigma_prev);
                let coef2 = ind(sigma_next, sigma_prev, sigma) - ind(sigma, sigma_prev, sigma);
                ((&x + (&eps * coef1)?)? + (m1 * coef2)?)?
            }
            _ => (&x + (&eps * (sigma_next - sigma))?)?,
        };
        prev_eps = Some(eps);
        x = run.report(i, x, &denoised)?;
    }
    Ok(x)
}
