//! Pseudo linear multistep (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models",
//! PLMS, eq. 12–13; diffusers `PNDMScheduler` with `skip_prk_steps`): Adams–Bashforth on the
//! predicted noise, each combined ε taken through the DDIM transfer — in the VE
//! parametrisation `x' = x + (σ' − σ) ε`. The first step is a second-order (Heun-like) start.
//!
//! For v-prediction models diffusers combines the raw v outputs and converts the combination to
//! ε at the current step; `combine_v` reproduces that (v = c_in (ε − σ x₀) in VE terms).

use super::{derivative, reread, Run};
use crate::denoiser::c_in;
use crate::Result;
use candle_core::Tensor;

/// What the history holds: ε itself, or v (for diffusers' v-model behaviour).
fn history_entry(d: &Tensor, denoised: &Tensor, sigma: f64, combine_v: bool) -> Result<Tensor> {
    if combine_v {
        Ok(((d - (denoised * sigma)?)? * c_in(sigma))?)
    } else {
        Ok(d.clone())
    }
}

/// Turns a combined history value at (`x`, `sigma`) back into ε.
fn to_eps(combined: Tensor, x: &Tensor, sigma: f64, combine_v: bool) -> Result<Tensor> {
    if combine_v {
        let c = c_in(sigma);
        Ok(((combined * c)? + (x * (sigma * c * c))?)?)
    } else {
        Ok(combined)
    }
}

/// `first_from`: the σ diffusers' averaged first step starts from (`t₁ + N // steps`), where
/// that is not `sigmas[0]`; `second`: the σ of that step's second evaluation and landing, where
/// that is not `sigmas[1]` (the sample is then read at `sigmas[1]`). With a single step and no
/// `second` there is no second evaluation.
pub(super) fn sample_plms(
    mut x: Tensor,
    run: &mut Run,
    combine_v: bool,
    first_from: Option<f64>,
    second: Option<f64>,
) -> Result<Tensor> {
    let steps = run.sigmas.len() - 1;
    let warm_up = steps > 1 || second.is_some();
    let s1 = second.unwrap_or(run.sigmas[1]);
    let mut history: Vec<Tensor> = Vec::with_capacity(4);
    for i in 0..steps {
        let (mut sigma, mut sigma_next) = (run.sigmas[i], run.landing(i));
        let denoised = run.denoiser.denoise(&x, sigma)?;
        let e = derivative(&x, &denoised, sigma)?;
        let entry = history_entry(&e, &denoised, sigma, combine_v)?;
        let combined = if i == 0 && warm_up {
            // The predictor lands where a plain step would, then is read at s1.
            let x_pred = reread((&x + (&e * (sigma_next - sigma))?)?, sigma_next, s1)?;
            let x_pred = run.intermediate(x_pred, s1)?;
            let denoised_2 = run.denoiser.denoise(&x_pred, s1)?;
            let e_2 = derivative(&x_pred, &denoised_2, s1)?;
            let entry_2 = history_entry(&e_2, &denoised_2, s1, combine_v)?;
            let avg = ((&entry + entry_2)? / 2.0)?;
            history.push(entry);
            // The averaged step goes from `first_from` (the same VP sample) to sigmas[1].
            if let Some(from) = first_from {
                x = reread(x, sigma, from)?;
                sigma = from;
            }
            sigma_next = s1;
            avg
        } else if i == 0 {
            entry
        } else {
            history.push(entry);
            if history.len() > 4 {
                history.remove(0);
            }
            let h = &history;
            let n = h.len();
            match n {
                2 => (((&h[1] * 3.0)? - &h[0])? / 2.0)?,
                3 => ((((&h[2] * 23.0)? - (&h[1] * 16.0)?)? + (&h[0] * 5.0)?)? / 12.0)?,
                _ => {
                    let s = (((&h[n - 1] * 55.0)? - (&h[n - 2] * 59.0)?)? + (&h[n - 3] * 37.0)?)?;
                    ((s - (&h[n - 4] * 9.0)?)? / 24.0)?
                }
            }
        };
        let eps = to_eps(combined, &x, sigma, combine_v)?;
        x = (&x + (eps * (sigma_next - sigma))?)?;
        if i > 0 || !warm_up {
            x = run.hand_off(i, x)?;
        } else {
            x = reread(x, s1, run.sigmas[1])?;
        }
        x = run.report(i, x, &denoised)?;
    }
    Ok(x)
}
