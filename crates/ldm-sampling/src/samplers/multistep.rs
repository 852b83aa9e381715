//! Multistep DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++", Alg. 2 and its SDE variant, §5),
//! as diffusers' `DPMSolverMultistepScheduler` computes it (`algorithm_type` `dpmsolver++` or
//! `sde-dpmsolver++`, `solver_type="midpoint"`), rewritten in the VE parametrisation: with
//! λ = −log σ, h = λ' − λ and the denoised estimates D of the last steps,
//! ODE: `x' = (σ'/σ) x − (e^{−h} − 1) D₀ + …`; SDE: `x' = (σ'/σ) e^{−h} x + (1 − e^{−2h}) D₀ + …
//! + σ' √(1 − e^{−2h}) z`.

use super::Run;
use crate::Result;
use candle_core::Tensor;

/// Options of the multistep solver.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MultistepOptions {
    /// 1, 2 or 3.
    pub order: usize,
    /// `sde-dpmsolver++`: fresh noise every step.
    pub sde: bool,
    /// Lower the order of the last steps below 15 steps (diffusers' `lower_order_final`).
    pub lower_order_final: bool,
    /// The last step is first order whatever the step count (diffusers' `euler_at_final`).
    pub euler_at_final: bool,
}

pub(super) fn dpmpp_multistep(
    mut x: Tensor,
    run: &mut Run,
    opt: MultistepOptions,
) -> Result<Tensor> {
    let steps = run.sigmas.len() - 1;
    // (denoised, λ at which it was made), most recent last.
    let mut history: Vec<(Tensor, f64)> = Vec::with_capacity(3);
    for i in 0..steps {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let denoised = run.denoiser.denoise(&x, sigma)?;
        let lambda = -sigma.ln();
        history.push((denoised.clone(), lambda));
        if history.len() > 3 {
            history.remove(0);
        }
        let z = if opt.sde {
            Some(run.randn_like(&x)?)
        } else {
            None
        };
        let last = i + 1 == steps;
        let few = opt.lower_order_final && steps < 15;
        // diffusers: the final step is first order when it ends at σ = 0 (or below 15 steps);
        // the one before is at most second order below 15 steps.
        let mut order = opt.order.min(i + 1);
        if last && (sigma_next == 0.0 || few || opt.euler_at_final) {
            order = 1;
        } else if i + 2 == steps && few {
            order = order.min(2);
        }
        x = if sigma_next == 0.0 {
            denoised.clone()
        } else {
            let h = -sigma_next.ln() - lambda;
            let n = history.len();
            let m0 = &history[n - 1].0;
            // D1, D2 of diffusers' multistep updates.
            let (d1, d2) = match order {
                1 => (None, None),
                2 => {
                    let (m1, l1) = &history[n - 2];
                    let r0 = (lambda - l1) / h;
                    (Some(((m0 - m1)? * (1.0 / r0))?), None)
                }
                _ => {
                    let (m1, l1) = &history[n - 2];
                    let (m2, l2) = &history[n - 3];
                    let (r0, r1) = ((lambda - l1) / h, (l1 - l2) / h);
                    let d1_0 = ((m0 - m1)? * (1.0 / r0))?;
                    let d1_1 = ((m1 - m2)? * (1.0 / r1))?;
                    let diff = (&d1_0 - &d1_1)?;
                    let d1 = (&d1_0 + (&diff * (r0 / (r0 + r1)))?)?;
                    let d2 = (diff * (1.0 / (r0 + r1)))?;
                    (Some(d1), Some(d2))
                }
            };
            let ratio = sigma_next / sigma;
            let mut out;
            if opt.sde {
                let e2 = -(-2.0 * h).exp_m1(); // 1 − e^{−2h}
                out = ((&x * (ratio * (-h).exp()))? + (m0 * e2)?)?;
                if let Some(d1) = &d1 {
                    let c1 = if order == 2 {
                        0.5 * e2
                    } else {
                        e2 / (-2.0 * h) + 1.0
                    };
                    out = (out + (d1 * c1)?)?;
                }
                if let Some(d2) = &d2 {
                    out = (out + (d2 * ((e2 - 2.0 * h) / (2.0 * h).powi(2) - 0.5))?)?;
                }
                if let Some(z) = &z {
                    out = (out + (z * (sigma_next * e2.sqrt()))?)?;
                }
            } else {
                let em1 = (-h).exp_m1(); // e^{−h} − 1
                out = ((&x * ratio)? - (m0 * em1)?)?;
                if let Some(d1) = &d1 {
                    let c1 = if order == 2 {
                        -0.5 * em1
                    } else {
                        em1 / h + 1.0
                    };
                    out = (out + (d1 * c1)?)?;
                }
                if let Some(d2) = &d2 {
                    out = (out - (d2 * ((em1 + h) / (h * h) - 0.5))?)?;
                }
            }
            out
        };
        x = run.report(i, x, &denoised)?;
    }
    Ok(x)
}
