//! diffusers' `scheduler_config.json` → a sampling [`Plan`]: the sigmas (and the model timestep
//! at each), the initial noise scale, and the [`Sampler`] — reproducing each diffusers
//! scheduler's `set_timesteps` numbers exactly (its spacing, rounding and float32 casts).
//!
//! Three layers: [`SchedulerConfig`] mirrors the JSON; [`class::Settings`] is that config read
//! by one class as `Class.from_config` reads it (the class's own defaults for every key the
//! config leaves out); [`plan`] turns settings into a plan, one function per family.

pub mod class;
mod plan;

pub use class::{SchedulerClass, Settings, SigmaOption, Spacing};

use crate::denoiser::{Prediction, X0Clip};
use crate::samplers::Sampler;
use crate::schedule::NoiseSchedule;
use crate::{Error, Result};
use candle_core::Tensor;
use serde::Deserialize;

/// The fields of diffusers' scheduler configs we read (a union over the scheduler classes).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<String>,
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<usize>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub set_alpha_to_one: Option<bool>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub final_sigmas_type: Option<String>,
    pub algorithm_type: Option<String>,
    pub solver_order: Option<usize>,
    pub lower_order_final: Option<bool>,
    pub interpolation_type: Option<String>,
    pub timestep_type: Option<String>,
    pub variance_type: Option<String>,
    pub clip_sample: Option<bool>,
    pub thresholding: Option<bool>,
    pub original_inference_steps: Option<usize>,
    pub solver_type: Option<String>,
    pub predict_x0: Option<bool>,
    pub skip_prk_steps: Option<bool>,
    pub timestep_scaling: Option<f64>,
    pub clip_sample_range: Option<f64>,
    pub dynamic_thresholding_ratio: Option<f64>,
    pub sample_max_value: Option<f64>,
    pub euler_at_final: Option<bool>,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    pub use_dynamic_shifting: Option<bool>,
    pub lambda_min_clipped: Option<f64>,
    pub disable_corrector: Option<Vec<serde_json::Value>>,
    pub solver_p: Option<serde_json::Value>,
}

/// Where a diffusers scheduler keeps its sample: variance-exploding `x₀ + σε` (the Euler family)
/// or variance-preserving `√ᾱ x₀ + √(1−ᾱ) ε` (DDIM, DPM-Solver, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleSpace {
    VarianceExploding,
    VariancePreserving,
}

/// Everything needed to run a scheduler config's sampling loop.
#[derive(Debug, Clone)]
pub struct Plan {
    pub sampler: Sampler,
    /// Decreasing noise levels (float32 values, as diffusers holds them); one step per pair.
    pub sigmas: Vec<f64>,
    /// The timestep the model is called with at each `sigmas[i]` (all but the last).
    pub timesteps: Vec<f64>,
    /// Where each step lands when that is not the next sigma (DDIM and PNDM step from t to
    /// `t − N // steps` whatever the spacing): the variance-preserving sample is then read
    /// at `sigmas[i + 1]`. `None`: every step lands on the next sigma.
    pub landings: Option<Vec<f64>>,
    pub prediction: Prediction,
    pub schedule: NoiseSchedule,
    /// diffusers' `init_noise_sigma`.
    pub init_noise_sigma: f64,
    pub space: SampleSpace,
    /// LCM's consistency boundary condition, `timestep_scaling` (Song et al. 2023, §3.1):
    /// the denoised estimate becomes `c_out(t) x₀ + c_skip(t) x_vp`.
    pub boundary_timestep_scaling: Option<f64>,
    /// The scheduler's clipping or dynamic thresholding of x̂₀ (`clip_sample`,
    /// `thresholding`), applied to the guided denoised estimate.
    pub x0_clip: Option<X0Clip>,
}

/// The consistency boundary condition's `(c_skip, c_out)` at `timestep` (LCM, after Song et
/// al. 2023, §3.1): with `τ = timestep · timestep_scaling` and σ_data = 0.5,
/// `c_skip = σ_d² / (τ² + σ_d²)`, `c_out = τ / √(τ² + σ_d²)`, so the consistency function
/// `c_skip·x_t + c_out·x̂₀` is the identity at t = 0.
pub fn consistency_boundary(timestep: f64, timestep_scaling: f64) -> (f64, f64) {
    const SIGMA_DATA2: f64 = 0.25;
    let t = timestep * timestep_scaling;
    (
        SIGMA_DATA2 / (t * t + SIGMA_DATA2),
        t / (t * t + SIGMA_DATA2).sqrt(),
    )
}

/// The timesteps of `steps`-step consistency sampling (LCM, TCD) on the `original`-point
/// distillation skeleton `(n + 1)·k − 1` of `n_train` training timesteps (k = n_train /
/// original), as diffusers' `LCMScheduler.set_timesteps` picks them: the skeleton from its top,
/// point ⌊i·original / steps⌋ for the i-th step. The caller checks `steps ≤ original ≤ n_train`.
pub fn consistency_timesteps(n_train: usize, original: usize, steps: usize) -> Vec<usize> {
    let k = n_train / original;
    (0..steps)
        .map(|i| (original - i * original / steps) * k - 1)
        .collect()
}

impl Plan {
    /// Factor from unit noise to the VE sample the samplers start from.
    pub fn initial_scale(&self) -> f64 {
        match self.space {
            SampleSpace::VarianceExploding => self.init_noise_sigma,
            SampleSpace::VariancePreserving => {
                (1.0 + self.sigmas[0] * self.sigmas[0]).sqrt() * self.init_noise_sigma
            }
        }
    }

    /// Factor from a VE sample at `sigma` to the scheduler's own sample space.
    pub fn to_scheduler_space(&self, sigma: f64) -> f64 {
        match self.space {
            SampleSpace::VarianceExploding => 1.0,
            SampleSpace::VariancePreserving => 1.0 / (1.0 + sigma * sigma).sqrt(),
        }
    }

    /// The model timestep for `sigma`: the plan's own where `sigma` is one of its sigmas,
    /// otherwise interpolated in log-sigma (midpoints of two-stage samplers).
    pub fn timestep(&self, sigma: f64) -> f64 {
        if let Sampler::Plms {
            second: Some((s, t)),
            ..
        } = self.sampler
        {
            if s == sigma {
                return t;
            }
        }
        match self.sigmas[..self.timesteps.len()]
            .iter()
            .position(|&s| s == sigma)
        {
            Some(i) => self.timesteps[i],
            None => self.schedule.sigma_to_t(sigma),
        }
    }

    /// What the scheduler does to a (guided) denoised estimate `x0` of the VE sample `x` at
    /// `sigma` before its update: clip or threshold x̂₀ (`clip_sample`, `thresholding`), then
    /// the consistency boundary condition (LCM); the identity for most plans.
    pub fn finish_denoised(
        &self,
        x: &Tensor,
        x0: Tensor,
        sigma: f64,
    ) -> candle_core::Result<Tensor> {
        let x0 = match &self.x0_clip {
            Some(clip) => clip.apply(&x0)?,
            None => x0,
        };
        let Some(scaling) = self.boundary_timestep_scaling else {
            return Ok(x0);
        };
        let (c_skip, c_out) = consistency_boundary(self.timestep(sigma), scaling);
        (x0 * c_out)? + (x * (c_skip * crate::denoiser::c_in(sigma)))?
    }

    /// diffusers' cutoff timestep for a denoising fraction: `round(N − fraction · N)`.
    fn cutoff(&self, fraction: f64) -> Result<f64> {
        if !(fraction > 0.0 && fraction < 1.0) {
            return Err(Error::InvalidArgument(format!(
                "a denoising fraction must lie strictly between 0 and 1, got {fraction}"
            )));
        }
        let n = self.schedule.len() as f64;
        Ok((n - fraction * n).round_ties_even())
    }

    /// Keeps the steps whose timestep is at or above the cutoff (diffusers' `denoising_end`):
    /// the run stops part-way, at a noisy sample, for a refiner to finish.
    pub fn end_at(&mut self, fraction: f64) -> Result<()> {
        let cutoff = self.cutoff(fraction)?;
        let keep = self.timesteps.iter().filter(|&&t| t >= cutoff).count();
        if keep == 0 {
            return Err(Error::InvalidArgument(format!(
                "denoising_end {fraction} leaves no step"
            )));
        }
        self.timesteps.truncate(keep);
        self.sigmas.truncate(keep + 1);
        if let Some(l) = &mut self.landings {
            l.truncate(keep);
        }
        Ok(())
    }

    /// Keeps the steps whose timestep is below the cutoff (diffusers' `denoising_start`): the
    /// run continues a sample another model left at that point.
    pub fn start_at(&mut self, fraction: f64) -> Result<()> {
        let cutoff = self.cutoff(fraction)?;
        let keep = self.timesteps.iter().filter(|&&t| t < cutoff).count();
        if keep == 0 {
            return Err(Error::InvalidArgument(format!(
                "denoising_start {fraction} leaves no step"
            )));
        }
        let start = self.timesteps.len() - keep;
        self.drop_first(start);
        Ok(())
    }

    /// img2img: keep the last `ceil(steps · strength)` steps (diffusers' `get_timesteps`).
    pub fn truncate(&mut self, strength: f64) -> Result<()> {
        if !(0.0..=1.0).contains(&strength) || strength.is_nan() {
            return Err(Error::InvalidArgument(format!(
                "strength {strength} is outside [0, 1]"
            )));
        }
        let steps = self.sigmas.len() - 1;
        let init = ((steps as f64 * strength) as usize).min(steps);
        if init == 0 {
            return Err(Error::InvalidArgument(format!(
                "strength {strength} leaves no step of {steps} to run"
            )));
        }
        let start = steps - init;
        match self.sampler {
            Sampler::Plms {
                ratio: Some(ratio), ..
            } if start > 0 && steps >= 2 => self.slice_pndm(start, ratio),
            _ => self.drop_first(start),
        }
        Ok(())
    }

    /// diffusers' img2img on PNDM: its timestep list holds the second timestep twice (for the
    /// averaged first step), `[t₀, t₁, t₁, t₂, …]`, and `get_timesteps` slices that list at
    /// `start` as if it had one entry a step. The slice `P` starts one timestep early (or on the
    /// doubled one), and PNDM's counter restarts: its averaged first step evaluates at `P[1]`
    /// and lands there, after which step k evaluates at `P[k]` and steps to `P[k] − N // steps`
    /// — the variance-preserving sample read at each new label without moving. diffusers makes
    /// `len(P)` model calls; so does this plan.
    fn slice_pndm(&mut self, start: usize, ratio: f64) {
        let steps = self.timesteps.len();
        // Index into the plan's steps of the entry j of diffusers' list.
        let step_of = |j: usize| if j <= 1 { j } else { j - 1 };
        let landing = |i: usize| self.landings.as_ref().map_or(self.sigmas[i + 1], |l| l[i]);
        let calls = steps + 1 - start;
        let at: Vec<usize> = (start..start + calls).map(step_of).collect();
        let second_sigma = self.sigmas[at[1]];
        let second_t = self.timesteps[at[1]];
        let mut sigmas = vec![self.sigmas[at[0]]];
        let mut timesteps = vec![self.timesteps[at[0]]];
        let mut landings = vec![landing(at[0])];
        for &i in &at[2..] {
            sigmas.push(self.sigmas[i]);
            timesteps.push(self.timesteps[i]);
            landings.push(landing(i));
        }
        // The run ends where its last step lands: the full plan's end, or the averaged
        // first step's landing when that is the only step.
        sigmas.push(if calls > 2 {
            landing(steps - 1)
        } else {
            second_sigma
        });
        let from_t = second_t + ratio;
        let first_from = (from_t != timesteps[0]).then(|| plan::sigma_at(&self.schedule, from_t));
        if let Sampler::Plms {
            first_from: f,
            second,
            ..
        } = &mut self.sampler
        {
            *f = first_from;
            *second = Some((second_sigma, second_t));
        }
        let n = sigmas.len() - 1;
        let zero_length = sigmas[n] == sigmas[n - 1];
        let off = zero_length || landings.iter().zip(&sigmas[1..]).any(|(l, s)| l != s);
        self.landings = off.then_some(landings);
        self.sigmas = sigmas;
        self.timesteps = timesteps;
    }

    /// Drops the first `n` steps.
    fn drop_first(&mut self, n: usize) {
        self.sigmas.drain(..n);
        self.timesteps.drain(..n);
        if let Some(l) = &mut self.landings {
            l.drain(..n);
        }
    }
}

impl SchedulerConfig {
    /// Parses `scheduler_config.json` text (Python's `-Infinity`/`NaN` literals included).
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(&python_json(text)).map_err(|e| Error::Config(e.to_string()))
    }

    /// The training noise schedule this config describes for its own class.
    pub fn noise_schedule(&self) -> Result<NoiseSchedule> {
        self.settings(self.class()?)?.noise_schedule()
    }

    /// The sampling plan of the config's own class for `steps` steps, with `eta` for the
    /// samplers that take one.
    pub fn plan(&self, steps: usize, eta: Option<f64>) -> Result<Plan> {
        self.settings(self.class()?)?.plan(steps, eta)
    }
}

/// Python's `json.dumps` writes `Infinity`, `-Infinity` and `NaN` (diffusers saves
/// `"lambda_min_clipped": -Infinity`); JSON has no such numbers. They become `null` here,
/// outside string literals.
pub fn python_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        let token = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t));
        match token {
            Some(t) => {
                out.push_str("null");
                rest = &rest[t.len()..];
            }
            None => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    /// diffusers' LCMScheduler on 1000 timesteps and a 50-point skeleton:
    /// `set_timesteps(4)` → 999, 759, 499, 259; 2 → 999, 499; 1 → 999; 50 → every point.
    #[test]
    fn consistency_timesteps_are_diffusers() {
        use super::consistency_timesteps as ts;
        assert_eq!(ts(1000, 50, 4), vec![999, 759, 499, 259]);
        assert_eq!(ts(1000, 50, 2), vec![999, 499]);
        assert_eq!(ts(1000, 50, 1), vec![999]);
        assert_eq!(ts(1000, 50, 3), vec![999, 679, 339]);
        let all = ts(1000, 50, 50);
        assert_eq!((all.len(), all[0], all[49]), (50, 999, 19));
    }

    /// Every scheduler class that samples in σ, and PNDM (all but DDPM, DDIM, LCM and TCD,
    /// which step on ᾱ itself and handle ᾱ = 0), plans finite, strictly decreasing sigmas from
    /// σ ≈ 4096 on a zero-terminal-SNR v-prediction config.
    #[test]
    fn zero_snr_plans_start_at_a_finite_sigma() {
        for class in [
            "EulerDiscreteScheduler",
            "EulerAncestralDiscreteScheduler",
            "HeunDiscreteScheduler",
            "LMSDiscreteScheduler",
            "KDPM2DiscreteScheduler",
            "DPMSolverMultistepScheduler",
            "UniPCMultistepScheduler",
            "DEISMultistepScheduler",
            "PNDMScheduler",
        ] {
            let cfg = super::SchedulerConfig::from_json(&format!(
                r#"{{"_class_name": "{class}", "beta_schedule": "scaled_linear",
                    "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction",
                    "rescale_betas_zero_snr": true, "timestep_spacing": "trailing",
                    "skip_prk_steps": true}}"#
            ))
            .unwrap();
            let plan = cfg.plan(20, None).unwrap();
            let s = &plan.sigmas;
            assert!((s[0] - 4096.0).abs() < 1.0, "{class}: σ₀ = {}", s[0]);
            assert!(
                s.windows(2).all(|w| w[1] < w[0] && w[1] >= 0.0),
                "{class}: {s:?}"
            );
        }
    }

    #[test]
    fn python_literals_become_null_outside_strings() {
        let s = super::python_json(r#"{"a": -Infinity, "b": [NaN, 1], "c": "NaN \"Infinity\""}"#);
        assert_eq!(s, r#"{"a": null, "b": [null, 1], "c": "NaN \"Infinity\""}"#);
        let c = super::SchedulerConfig::from_json(
            r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity}"#,
        );
        assert!(c.is_ok());
    }
}
