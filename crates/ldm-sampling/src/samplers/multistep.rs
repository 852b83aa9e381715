//! Multistep DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++", Alg. 2) in k-diffusion's form:
//! with λ = −log σ and h = λ' − λ, `x' = (σ'/σ) x − (e^{−h} − 1) D`, where D is the denoised
//! estimate, corrected to second order with the previous one.

use super::Run;
use crate::Result;
use candle_core::Tensor;

/// DPM-Solver++(2M) (k-diffusion `sample_dpmpp_2m`; diffusers `DPMSolverMultistepScheduler`
/// with `algorithm_type="dpmsolver++"`, `solver_order=2`). The first step is first order; with
/// `lower_order_final` the last step is too when there are fewer than 15 steps, and a last step
/// to σ = 0 always is (diffusers' `final_sigmas_type="zero"`).
pub(super) fn dpmpp_2m(mut x: Tensor, run: &mut Run, lower_order_final: bool) -> Result<Tensor> {
    let steps = run.sigmas.len() - 1;
    let mut old: Option<(Tensor, f64)> = None; // (denoised, h of that step)
    for i in 0..steps {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let denoised = run.denoiser.denoise(&x, sigma)?;
        let last = i + 1 == steps;
        let first_order =
            old.is_none() || (last && (sigma_next == 0.0 || (lower_order_final && steps < 15)));
        x = if sigma_next == 0.0 {
            denoised.clone()
        } else {
            let h = sigma.ln() - sigma_next.ln();
            let d = match (&old, first_order) {
                (Some((old_denoised, h_last)), false) => {
                    let r = h_last / h;
                    ((&denoised * (1.0 + 1.0 / (2.0 * r)))? - (old_denoised * (1.0 / (2.0 * r)))?)?
                }
                _ => denoised.clone(),
            };
            ((&x * (sigma_next / sigma))? - (d * (-h).exp_m1())?)?
        };
        old = Some((
            denoised.clone(),
            sigma.ln() - sigma_next.max(f64::MIN_POSITIVE).ln(),
        ));
        x = run.report(i, x, &denoised)?;
    }
    Ok(x)
}
