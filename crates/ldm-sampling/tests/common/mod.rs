//! What the oracle-fixture tests share: the oracle's analytic stand-in model as a denoiser,
//! replayed noise, and how diffusers' scheduler calls line up with a plan's steps.

// Each test binary uses a part of this module.
#![allow(dead_code)]

use candle_core::Tensor;
use ldm_sampling::denoiser::scale_input;
use ldm_sampling::noise::NoiseSource;
use ldm_sampling::scheduler_config::Plan;
use ldm_sampling::Denoiser;

/// The oracle's stand-in model, op for op in float32:
/// `0.6·x·(1 − 0.5 s) + 0.3·sin(3x + s) + 0.1 s` with `s = t / 1000`.
pub fn standin(x: &Tensor, t: f64) -> candle_core::Result<Tensor> {
    let s = t / 1000.0;
    let a = ((x * 0.6)? * (1.0 - 0.5 * s))?;
    let b = (((x * 3.0)? + s)?.sin()? * 0.3)?;
    (a + b)? + 0.1 * s
}

/// The stand-in model called as a diffusers pipeline calls it: scaled input, the plan's
/// timestep, the plan's prediction type and x̂₀ processing.
pub struct Standin<'a>(pub &'a Plan);

impl Denoiser for Standin<'_> {
    fn denoise(&self, x: &Tensor, sigma: f64) -> candle_core::Result<Tensor> {
        let out = standin(&scale_input(x, sigma)?, self.0.timestep(sigma))?;
        let x0 = self.0.prediction.to_denoised(x, &out, sigma)?;
        self.0.finish_denoised(x, x0, sigma)
    }
}

/// Replays recorded noise (torchsde's Brownian increments) in order.
pub struct Replay(pub Vec<Vec<f32>>, pub usize);

impl NoiseSource for Replay {
    fn randn(&mut self, n: usize) -> Vec<f32> {
        let v = self.0.get(self.1).cloned().unwrap_or_default();
        self.1 += 1;
        assert_eq!(v.len(), n, "replayed noise {} has the wrong size", self.1);
        v
    }
}

/// How diffusers' scheduler calls line up with a plan's steps: two-stage schedulers (Heun, DPM2
/// (a), DPM++ SDE) make two calls a step, interleaving their midpoint timesteps; PLMS evaluates
/// its second timestep twice (its Heun-like start) when it runs more than one step.
pub struct Calls {
    two_stage: bool,
    plms: bool,
    /// diffusers' number of `step` calls.
    pub calls: usize,
}

impl Calls {
    pub fn new(plan: &Plan, calls: usize) -> Self {
        use ldm_sampling::Sampler;
        let two_stage = matches!(
            plan.sampler,
            Sampler::Heun | Sampler::Dpm2 | Sampler::Dpm2Ancestral | Sampler::DpmPpSde { .. }
        );
        let plms = matches!(plan.sampler, Sampler::Plms { .. }) && plan.timesteps.len() > 1;
        Calls {
            two_stage,
            plms,
            calls,
        }
    }

    pub fn two_stage(&self) -> bool {
        self.two_stage
    }

    /// The timesteps of the plan's steps among diffusers' `scheduler.timesteps`.
    pub fn step_timesteps(&self, theirs: &[f64]) -> Vec<f64> {
        let keep = |i: usize| {
            if self.two_stage {
                i.is_multiple_of(2)
            } else {
                !(self.plms && i == 1)
            }
        };
        (0..theirs.len())
            .filter(|&i| keep(i))
            .map(|i| theirs[i])
            .collect()
    }

    /// The (1-based) diffusers call after which the sample equals ours after step `i`.
    pub fn of_step(&self, i: usize) -> usize {
        if self.plms {
            i + 2
        } else if self.two_stage {
            (2 * i + 2).min(self.calls)
        } else {
            i + 1
        }
    }
}

/// Runs `plan` on the stand-in model from `x` and returns the sample after every step in the
/// scheduler's own space (what diffusers' `step` returns).
pub fn trajectory(
    plan: &Plan,
    x: Tensor,
    noise: &mut dyn NoiseSource,
) -> ldm_sampling::Result<Vec<Tensor>> {
    let mut states = Vec::new();
    let mut hook = |info: &ldm_sampling::StepInfo| -> ldm_sampling::Result<Option<Tensor>> {
        states.push((info.x * plan.to_scheduler_space(info.sigma_next))?);
        Ok(None)
    };
    let denoiser = Standin(plan);
    let mut run = ldm_sampling::Run {
        denoiser: &denoiser,
        sigmas: &plan.sigmas,
        landings: plan.landings.as_deref(),
        noise,
        hook: &mut hook,
    };
    plan.sampler.sample(x, &mut run)?;
    Ok(states)
}
