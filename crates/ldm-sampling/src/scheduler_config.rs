//! diffusers' `scheduler_config.json` → a sampling [`Plan`]: the sigmas (and the model timestep
//! at each), the initial noise scale, and the [`Sampler`] — reproducing each diffusers
//! scheduler's `set_timesteps` numbers exactly (its spacing, rounding and float32 casts).

use crate::denoiser::Prediction;
use crate::samplers::{MultistepOptions, Sampler};
use crate::schedule::{self, BetaSchedule, NoiseSchedule};
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
    pub prediction: Prediction,
    pub schedule: NoiseSchedule,
    /// diffusers' `init_noise_sigma`.
    pub init_noise_sigma: f64,
    pub space: SampleSpace,
    /// LCM's consistency boundary condition, `timestep_scaling` (Song et al. 2023, §3.1):
    /// the denoised estimate becomes `c_out(t) x₀ + c_skip(t) x_vp`.
    pub boundary_timestep_scaling: Option<f64>,
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
        match self.sigmas[..self.timesteps.len()]
            .iter()
            .position(|&s| s == sigma)
        {
            Some(i) => self.timesteps[i],
            None => self.schedule.sigma_to_t(sigma),
        }
    }

    /// Applies the model family's boundary condition (LCM) to a denoised estimate `x0` of the
    /// VE sample `x` at `sigma`; the identity for every other plan.
    pub fn boundary_condition(
        &self,
        x: &Tensor,
        x0: Tensor,
        sigma: f64,
    ) -> candle_core::Result<Tensor> {
        let Some(scaling) = self.boundary_timestep_scaling else {
            return Ok(x0);
        };
        const SIGMA_DATA2: f64 = 0.25; // σ_data = 0.5
        let t = self.timestep(sigma) * scaling;
        let c_skip = SIGMA_DATA2 / (t * t + SIGMA_DATA2);
        let c_out = t / (t * t + SIGMA_DATA2).sqrt();
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
        self.sigmas.drain(..start);
        self.timesteps.drain(..start);
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
        self.sigmas.drain(..start);
        self.timesteps.drain(..start);
        Ok(())
    }
}

fn f32r(x: f64) -> f64 {
    x as f32 as f64
}

fn flag(v: Option<bool>) -> bool {
    v.unwrap_or(false)
}

impl SchedulerConfig {
    /// Parses `scheduler_config.json` text (Python's `-Infinity`/`NaN` literals included).
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(&python_json(text)).map_err(|e| Error::Config(e.to_string()))
    }

    /// The training noise schedule this config describes.
    pub fn noise_schedule(&self) -> Result<NoiseSchedule> {
        let beta_schedule = match (self.trained_betas.as_ref(), self.beta_schedule.as_deref().unwrap_or("linear")) {
            (Some(b), _) => BetaSchedule::Trained(b.clone()),
            (None, "linear") => BetaSchedule::Linear,
            (None, "scaled_linear") => BetaSchedule::ScaledLinear,
            (None, "squaredcos_cap_v2") => BetaSchedule::SquaredCosCapV2,
            (None, other) => {
                return Err(Error::Config(format!(
                    "unknown beta_schedule `{other}` (expected linear, scaled_linear, squaredcos_cap_v2 or trained_betas)"
                )))
            }
        };
        let mut s = NoiseSchedule::new(
            self.num_train_timesteps.unwrap_or(1000),
            self.beta_start.unwrap_or(0.0001),
            self.beta_end.unwrap_or(0.02),
            &beta_schedule,
            flag(self.rescale_betas_zero_snr),
        )?;
        // diffusers keeps the zero-SNR end finite (ᾱ = 2⁻²⁴, σ ≈ 4096) in its Euler, Euler a,
        // DPM++ multistep and UniPC schedulers; we do so in every σ-space scheduler and in
        // DEIS and PNDM as well (diffusers' have no zero-SNR option: they would ignore the
        // rescale and sample a schedule the model was not trained on; with ᾱ = 0 PNDM's
        // step divides by zero and the embedded model drew empty backgrounds).
        let finite_end = self.space() == SampleSpace::VarianceExploding
            || matches!(
                self.class_name.as_str(),
                "DPMSolverMultistepScheduler"
                    | "UniPCMultistepScheduler"
                    | "DEISMultistepScheduler"
                    | "PNDMScheduler"
            );
        if flag(self.rescale_betas_zero_snr) && finite_end {
            if let Some(last) = s.alphas_cumprod.last_mut() {
                *last = crate::schedule::ZERO_SNR_END_ALPHA_BAR;
            }
        }
        Ok(s)
    }

    fn space(&self) -> SampleSpace {
        match self.class_name.as_str() {
            "EulerDiscreteScheduler"
            | "EulerAncestralDiscreteScheduler"
            | "HeunDiscreteScheduler"
            | "LMSDiscreteScheduler"
            | "KDPM2DiscreteScheduler"
            | "KDPM2AncestralDiscreteScheduler"
            | "DPMSolverSDEScheduler" => SampleSpace::VarianceExploding,
            _ => SampleSpace::VariancePreserving,
        }
    }

    fn spacing(&self, default: &str) -> String {
        self.timestep_spacing
            .clone()
            .unwrap_or_else(|| default.to_string())
    }

    /// The sampling plan for `steps` steps, with `eta` for the samplers that take one.
    pub fn plan(&self, steps: usize, eta: Option<f64>) -> Result<Plan> {
        let schedule = self.noise_schedule()?;
        let n_train = schedule.len();
        if steps == 0 || steps > n_train {
            return Err(Error::InvalidArgument(format!(
                "steps must be in [1, {n_train}] (the training timesteps), got {steps}"
            )));
        }
        let prediction: Prediction = self
            .prediction_type
            .as_deref()
            .unwrap_or("epsilon")
            .parse()?;
        let offset = self.steps_offset.unwrap_or(0) as f64;
        let train_sigmas = schedule.sigmas();
        // A zero-SNR end has σ = ∞, which the VE samplers cannot hold; at σ = 1e10 every
        // quantity a VP scheduler computes differs from its σ = ∞ value by O(1/σ) = 1e-10.
        let finite_max = 1e10;
        let sigma_at = |t: f64| {
            let s = f32r(schedule.t_to_sigma(t));
            if s.is_finite() {
                s
            } else {
                f32r(finite_max)
            }
        };
        let space = self.space();
        let class = self.class_name.as_str();
        let (sampler, sigmas, timesteps, init_noise_sigma) = match class {
            "DDIMScheduler" | "DDPMScheduler" | "PNDMScheduler" => {
                let spacing = self.spacing("leading");
                let ts = discrete_timesteps(&spacing, n_train, steps, offset);
                // diffusers' DDIM and PNDM always step to t − N/steps; where that is not the next
                // timestep they evaluate (linspace spacing), the trajectory leaves the schedule.
                let ratio = (n_train / steps) as f64;
                if class != "DDPMScheduler" && ts.windows(2).any(|w| w[0] - ratio != w[1]) {
                    return Err(Error::Config(format!(
                        "{class} with timestep_spacing `{spacing}` steps off its own timesteps; use leading or trailing"
                    )));
                }
                if class == "PNDMScheduler" && !self.skip_prk_steps.unwrap_or(false) {
                    return Err(Error::Config(
                        "PNDMScheduler: only skip_prk_steps=true (PLMS, as Stable Diffusion configs set) is supported".into(),
                    ));
                }
                let mut sigmas: Vec<f64> = ts.iter().map(|&t| sigma_at(t)).collect();
                let one = self.set_alpha_to_one.unwrap_or(true);
                let final_alpha = if one {
                    0.0
                } else {
                    f32r(train_sigmas[0] as f64)
                };
                let (sampler, final_sigma) = if class == "DDIMScheduler" {
                    let eta = eta.unwrap_or(0.0);
                    if eta < 0.0 || eta.is_nan() {
                        return Err(Error::InvalidArgument(format!(
                            "eta must be ≥ 0, got {eta}"
                        )));
                    }
                    (Sampler::EulerAncestral { eta }, final_alpha)
                } else if class == "PNDMScheduler" {
                    let combine_v = prediction == Prediction::V;
                    (Sampler::Plms { combine_v }, final_alpha)
                } else {
                    if self.variance_type.as_deref().unwrap_or("fixed_small") != "fixed_small" {
                        return Err(Error::Config(
                            "DDPM: only variance_type fixed_small is supported".into(),
                        ));
                    }
                    (Sampler::EulerAncestral { eta: 1.0 }, 0.0)
                };
                sigmas.push(final_sigma);
                (sampler, sigmas, ts, 1.0)
            }
            // The Euler family: the classes that keep a variance-exploding sample.
            _ if space == SampleSpace::VarianceExploding => {
                let spacing = self.spacing("linspace");
                let mut ts = float_timesteps(&spacing, n_train, steps, offset);
                let mut sigmas: Vec<f64> = ts.iter().map(|&t| schedule.t_to_sigma(t)).collect();
                let ancestral_plain = class == "EulerAncestralDiscreteScheduler";
                let (lo, hi) = (sigmas[sigmas.len() - 1], sigmas[0]);
                let converted = if ancestral_plain {
                    None
                } else if flag(self.use_karras_sigmas) {
                    Some(schedule::karras(lo, hi, steps, 7.0))
                } else if flag(self.use_exponential_sigmas) {
                    Some(schedule::exponential(lo, hi, steps))
                } else if flag(self.use_beta_sigmas) {
                    Some(schedule::beta(lo, hi, steps, 0.6, 0.6))
                } else {
                    None
                };
                if let Some(c) = converted {
                    let log_sigmas = schedule.log_sigmas();
                    ts = c
                        .iter()
                        .map(|&s| schedule::sigma_to_t(s, &log_sigmas))
                        .collect();
                    // KDPM2 rounds its Karras timesteps (and only those).
                    let kdpm2 = class.starts_with("KDPM2");
                    if kdpm2 && flag(self.use_karras_sigmas) {
                        ts.iter_mut().for_each(|t| *t = t.round());
                    }
                    sigmas = c;
                }
                let last = match self.final_sigmas_type.as_deref() {
                    Some("sigma_min") if class == "EulerDiscreteScheduler" => {
                        train_sigmas[0] as f64
                    }
                    _ => 0.0,
                };
                sigmas.push(last);
                let sigmas: Vec<f64> = sigmas.into_iter().map(f32r).collect();
                let ts: Vec<f64> = ts.into_iter().map(f32r).collect();
                let max = sigmas.iter().cloned().fold(0.0, f64::max);
                let init = if spacing == "linspace" || spacing == "trailing" {
                    max
                } else {
                    f32r((max * max + 1.0).sqrt())
                };
                let sampler = match class {
                    "EulerDiscreteScheduler" => Sampler::Euler,
                    "EulerAncestralDiscreteScheduler" => Sampler::EulerAncestral { eta: 1.0 },
                    "HeunDiscreteScheduler" => Sampler::Heun,
                    "LMSDiscreteScheduler" => Sampler::Lms { order: 4 },
                    "KDPM2DiscreteScheduler" => Sampler::Dpm2,
                    "KDPM2AncestralDiscreteScheduler" => Sampler::Dpm2Ancestral,
                    _ => Sampler::DpmPpSde { eta: 1.0 },
                };
                (sampler, sigmas, ts, init)
            }
            "DPMSolverMultistepScheduler"
            | "UniPCMultistepScheduler"
            | "DEISMultistepScheduler" => {
                let default_algorithm = if class == "DEISMultistepScheduler" {
                    "deis"
                } else {
                    "dpmsolver++"
                };
                let algorithm = self.algorithm_type.as_deref().unwrap_or(default_algorithm);
                let order = self.solver_order.unwrap_or(2);
                let sde = match algorithm {
                    "dpmsolver++" => false,
                    "sde-dpmsolver++" => true,
                    // UniPC and DEIS carry their own algorithm names; checked below.
                    _ if class != "DPMSolverMultistepScheduler" => false,
                    other => {
                        return Err(Error::Config(format!(
                            "DPMSolverMultistepScheduler algorithm_type `{other}` is not supported (dpmsolver++, sde-dpmsolver++)"
                        )))
                    }
                };
                if !(1..=3).contains(&order) {
                    return Err(Error::Config(format!(
                        "solver_order {order} is outside [1, 3]"
                    )));
                }
                let lower_order_final = self.lower_order_final.unwrap_or(true);
                let deis = class == "DEISMultistepScheduler";
                if deis && (order > 2 || converted_spacing(self) || algorithm != "deis") {
                    return Err(Error::Config(
                        "DEISMultistepScheduler: orders 1–2 on the default sigmas are supported"
                            .into(),
                    ));
                }
                let sampler = if deis {
                    Sampler::Deis {
                        order,
                        lower_order_final,
                    }
                } else if class == "UniPCMultistepScheduler" {
                    if self.solver_type.as_deref().unwrap_or("bh2") != "bh2"
                        || !self.predict_x0.unwrap_or(true)
                    {
                        return Err(Error::Config(
                            "UniPC: only solver_type bh2 with predict_x0 is supported".into(),
                        ));
                    }
                    Sampler::UniPc {
                        order,
                        lower_order_final,
                    }
                } else {
                    Sampler::DpmPpMultistep(MultistepOptions {
                        order,
                        sde,
                        lower_order_final,
                    })
                };
                let spacing = self.spacing("linspace");
                let last_t = n_train as f64;
                let mut ts: Vec<f64> = match spacing.as_str() {
                    "linspace" => {
                        let v = schedule::linspace_f64(0.0, last_t - 1.0, steps + 1);
                        v.iter()
                            .rev()
                            .take(steps)
                            .map(|t| t.round_ties_even())
                            .collect()
                    }
                    "leading" => {
                        let ratio = (n_train / (steps + 1)) as f64;
                        (0..=steps)
                            .rev()
                            .take(steps)
                            .map(|i| i as f64 * ratio + offset)
                            .collect()
                    }
                    "trailing" => trailing(n_train, steps),
                    other => return Err(bad_spacing(other)),
                };
                let full: Vec<f64> = train_sigmas.iter().map(|&s| s as f64).collect();
                let (sig_min, sig_max) = (full[0], full[n_train - 1]);
                let converted = if flag(self.use_karras_sigmas) {
                    Some((schedule::karras(sig_min, sig_max, steps, 7.0), true))
                } else if flag(self.use_exponential_sigmas) {
                    Some((schedule::exponential(sig_min, sig_max, steps), false))
                } else if flag(self.use_beta_sigmas) {
                    Some((schedule::beta(sig_min, sig_max, steps, 0.6, 0.6), false))
                } else {
                    None
                };
                let mut sigmas = match converted {
                    Some((c, round)) => {
                        let log_sigmas = schedule.log_sigmas();
                        let cosine = self.beta_schedule.as_deref() == Some("squaredcos_cap_v2");
                        ts = c
                            .iter()
                            .map(|&s| {
                                let t = schedule::sigma_to_t(s, &log_sigmas);
                                if round && !cosine {
                                    t.round_ties_even()
                                } else {
                                    t
                                }
                            })
                            .collect();
                        c
                    }
                    None => ts.iter().map(|&t| schedule.t_to_sigma(t)).collect(),
                };
                // diffusers holds these timesteps as int64: fractional ones are truncated.
                ts.iter_mut().for_each(|t| *t = t.trunc());
                // DEIS always ends at the smallest training sigma.
                let final_type = if deis {
                    "sigma_min"
                } else {
                    self.final_sigmas_type.as_deref().unwrap_or("zero")
                };
                let last = match final_type {
                    "zero" => 0.0,
                    _ => train_sigmas[0] as f64,
                };
                sigmas.push(last);
                let sigmas: Vec<f64> = sigmas.into_iter().map(f32r).collect();
                (sampler, sigmas, ts, 1.0)
            }
            "LCMScheduler" | "TCDScheduler" => {
                let original = self.original_inference_steps.unwrap_or(50);
                if original == 0 || original > n_train || steps > original {
                    return Err(Error::InvalidArgument(format!(
                        "{class}: steps ({steps}) must be at most original_inference_steps ({original}), itself at most {n_train}"
                    )));
                }
                let k = n_train / original;
                let origin: Vec<f64> = (1..=original).rev().map(|i| (i * k) as f64 - 1.0).collect();
                let ts: Vec<f64> = (0..steps)
                    .map(|i| {
                        origin[(i as f64 * origin.len() as f64 / steps as f64).floor() as usize]
                    })
                    .collect();
                let mut sigmas: Vec<f64> = ts.iter().map(|&t| sigma_at(t)).collect();
                let sampler = if class == "LCMScheduler" {
                    sigmas.push(0.0);
                    Sampler::Lcm
                } else {
                    // TCD's last step lands on timestep 0, not on σ = 0.
                    sigmas.push(f32r(train_sigmas[0] as f64));
                    let gamma = eta.unwrap_or(0.3);
                    if !(0.0..=1.0).contains(&gamma) {
                        return Err(Error::InvalidArgument(format!(
                            "TCD eta (gamma) {gamma} is outside [0, 1]"
                        )));
                    }
                    Sampler::Tcd {
                        gamma,
                        schedule: Box::new(schedule.clone()),
                    }
                };
                (sampler, sigmas, ts, 1.0)
            }
            other => {
                return Err(Error::Config(format!(
                    "scheduler `{other}` is not supported yet"
                )))
            }
        };
        let boundary_timestep_scaling =
            (class == "LCMScheduler").then(|| self.timestep_scaling.unwrap_or(10.0));
        Ok(Plan {
            sampler,
            sigmas,
            timesteps,
            prediction,
            schedule,
            init_noise_sigma,
            space,
            boundary_timestep_scaling,
        })
    }
}

fn converted_spacing(c: &SchedulerConfig) -> bool {
    flag(c.use_karras_sigmas) || flag(c.use_exponential_sigmas) || flag(c.use_beta_sigmas)
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

fn bad_spacing(s: &str) -> Error {
    Error::Config(format!(
        "unknown timestep_spacing `{s}` (expected linspace, leading or trailing)"
    ))
}

fn trailing(n_train: usize, steps: usize) -> Vec<f64> {
    let ratio = n_train as f64 / steps as f64;
    let mut out = Vec::new();
    let mut t = n_train as f64;
    while t > 0.0 {
        out.push(t.round_ties_even() - 1.0);
        t -= ratio;
    }
    out
}

/// Integer timesteps of DDIM/DDPM (`int64` in diffusers).
fn discrete_timesteps(spacing: &str, n_train: usize, steps: usize, offset: f64) -> Vec<f64> {
    match spacing {
        "linspace" => schedule::linspace_f64(0.0, (n_train - 1) as f64, steps)
            .iter()
            .rev()
            .map(|t| t.round_ties_even())
            .collect(),
        "trailing" => trailing(n_train, steps),
        _ => {
            let ratio = (n_train / steps) as f64;
            (0..steps)
                .rev()
                .map(|i| i as f64 * ratio + offset)
                .collect()
        }
    }
}

/// Float timesteps of the Euler family (`float32` in diffusers).
fn float_timesteps(spacing: &str, n_train: usize, steps: usize, offset: f64) -> Vec<f64> {
    match spacing {
        "linspace" => schedule::linspace_f64(0.0, (n_train - 1) as f64, steps)
            .iter()
            .rev()
            .map(|&t| f32r(t))
            .collect(),
        "trailing" => trailing(n_train, steps),
        _ => discrete_timesteps("leading", n_train, steps, offset),
    }
}

#[cfg(test)]
mod tests {
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
