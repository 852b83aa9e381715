//! Few-step samplers for distilled models. LCM (Luo et al. 2023, Alg. 1 multistep sampling;
//! diffusers `LCMScheduler`): jump to the consistency estimate, then re-noise to the next level.
//! TCD (Zheng et al. 2024, "Trajectory Consistency Distillation", eq. 14; diffusers
//! `TCDScheduler`): step to the intermediate level `s = ⌊(1 − γ) t'⌋` along the predicted
//! noise, then re-noise from `s` to `t'` with strength γ.

use super::{derivative, Run};
use crate::schedule::NoiseSchedule;
use crate::Result;
use candle_core::Tensor;

pub(super) fn sample_lcm(mut x: Tensor, run: &mut Run) -> Result<Tensor> {
    for i in 0..run.sigmas.len() - 1 {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let denoised = run.denoiser.denoise(&x, sigma)?;
        x = if sigma_next > 0.0 {
            let z = run.randn_like(&x)?;
            (&denoised + (z * sigma_next)?)?
        } else {
            denoised.clone()
        };
        x = run.report(i, x, &denoised)?;
    }
    Ok(x)
}

pub(super) fn sample_tcd(
    mut x: Tensor,
    run: &mut Run,
    gamma: f64,
    schedule: &NoiseSchedule,
) -> Result<Tensor> {
    for i in 0..run.sigmas.len() - 1 {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let denoised = run.denoiser.denoise(&x, sigma)?;
        let d = derivative(&x, &denoised, sigma)?;
        let t_next = if sigma_next > 0.0 {
            schedule.sigma_to_t(sigma_next).round()
        } else {
            0.0
        };
        let t_s = ((1.0 - gamma) * t_next).floor();
        let sigma_s = if sigma_next > 0.0 {
            schedule.t_to_sigma(t_s) as f32 as f64
        } else {
            0.0
        };
        x = (&denoised + (d * sigma_s)?)?;
        if sigma_next > sigma_s {
            let z = run.randn_like(&x)?;
            x = (x + (z * (sigma_next * sigma_next - sigma_s * sigma_s).sqrt())?)?;
        }
        x = run.report(i, x, &denoised)?;
    }
    Ok(x)
}
