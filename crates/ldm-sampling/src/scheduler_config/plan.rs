//! [`Settings`] → [`Plan`]: each diffusers scheduler family's `set_timesteps` numbers (its
//! spacing, rounding and float32 casts), one function per family.

use super::class::{Family, SchedulerClass, Settings, SigmaOption, Spacing};
use super::{Plan, SampleSpace};
use crate::denoiser::Prediction;
use crate::samplers::{MultistepOptions, Sampler};
use crate::schedule::{self, BetaSchedule, NoiseSchedule};
use crate::{Error, Result};

fn f32r(x: f64) -> f64 {
    x as f32 as f64
}

/// What a family's planning returns; [`Settings::plan`] completes the [`Plan`].
struct Parts {
    sampler: Sampler,
    sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    landings: Option<Vec<f64>>,
    init_noise_sigma: f64,
}

impl Settings {
    /// The training noise schedule.
    pub fn noise_schedule(&self) -> Result<NoiseSchedule> {
        let beta_schedule = match (self.trained_betas.as_ref(), self.beta_schedule.as_str()) {
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
            self.num_train_timesteps,
            self.beta_start,
            self.beta_end,
            &beta_schedule,
            self.zero_snr,
        )?;
        // diffusers keeps the zero-SNR end finite (ᾱ = 2⁻²⁴, σ ≈ 4096) in its Euler, Euler a,
        // DPM++ multistep and UniPC schedulers; ldm does so in every σ-space class and in DEIS
        // and PNDM too (with ᾱ = 0 PNDM's step divides by zero). DDIM, DDPM, LCM and TCD step
        // on ᾱ itself and keep ᾱ = 0.
        let finite_end = matches!(self.class.family(), Family::Karras | Family::Multistep)
            || self.class == SchedulerClass::Pndm;
        if self.zero_snr && finite_end {
            if let Some(last) = s.alphas_cumprod.last_mut() {
                *last = schedule::ZERO_SNR_END_ALPHA_BAR;
            }
        }
        Ok(s)
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
        let parts = match self.class.family() {
            Family::Discrete => self.plan_discrete(&schedule, steps, eta)?,
            Family::Karras => self.plan_karras(&schedule, steps)?,
            Family::Multistep => self.plan_multistep(&schedule, steps)?,
            Family::Consistency => self.plan_consistency(&schedule, steps, eta)?,
        };
        Ok(Plan {
            sampler: parts.sampler,
            sigmas: parts.sigmas,
            timesteps: parts.timesteps,
            landings: parts.landings,
            prediction: self.prediction,
            schedule,
            init_noise_sigma: parts.init_noise_sigma,
            space: if self.variance_exploding() {
                SampleSpace::VarianceExploding
            } else {
                SampleSpace::VariancePreserving
            },
            boundary_timestep_scaling: (self.class == SchedulerClass::Lcm)
                .then_some(self.timestep_scaling),
            x0_clip: match self.class {
                // DDIM clips only the x̂₀ term of its update (see `Sampler::Ddim`).
                SchedulerClass::Ddim => None,
                _ => self.x0_clip,
            },
        })
    }

    /// DDPM, DDIM and PNDM: integer timesteps. DDIM and PNDM always step from t to
    /// `t − N // steps`; where that is not the next timestep they evaluate (linspace spacing,
    /// trailing spacing at step counts that do not divide N), the step lands there and the
    /// variance-preserving sample is then read at the next timestep: the plan's `landings`.
    fn plan_discrete(
        &self,
        schedule: &NoiseSchedule,
        steps: usize,
        eta: Option<f64>,
    ) -> Result<Parts> {
        let n_train = schedule.len();
        let ts = discrete_timesteps(self.spacing, n_train, steps, self.steps_offset as f64);
        // At 62 step counts up to 1000 (61, 103, 121, …) numpy's arange gives trailing spacing
        // one value more, timestep −1, which diffusers' DDPM, DDIM and PNDM use as an index:
        // ᾱ[−1] is the schedule's other end. (The σ-space classes interpolate, clamping −1 to
        // timestep 0, and ldm follows them.)
        if let Some(t) = ts.last().filter(|t| **t < 0.0) {
            return Err(Error::Config(format!(
                "{}: trailing spacing at {steps} steps makes {} timesteps, the last {t}, which diffusers reads as the schedule's last ᾱ; use another step count",
                self.class.name(),
                ts.len()
            )));
        }
        let sigma = |t: f64| sigma_at(schedule, t);
        if self.class == SchedulerClass::Ddpm {
            let mut sigmas: Vec<f64> = ts.iter().map(|&t| sigma(t)).collect();
            sigmas.push(0.0);
            return Ok(Parts {
                sampler: Sampler::EulerAncestral { eta: 1.0 },
                sigmas,
                timesteps: ts,
                landings: None,
                init_noise_sigma: 1.0,
            });
        }
        let final_sigma = if self.set_alpha_to_one {
            0.0
        } else {
            f32r(schedule.sigmas()[0] as f64)
        };
        let ratio = (n_train / steps) as f64;
        let land = |t: f64| {
            if t - ratio >= 0.0 {
                sigma(t - ratio)
            } else {
                final_sigma
            }
        };
        let landings: Vec<f64> = ts.iter().map(|&t| land(t)).collect();
        let mut sigmas: Vec<f64> = ts.iter().map(|&t| sigma(t)).collect();
        sigmas.push(landings[steps - 1]);
        let sampler = if self.class == SchedulerClass::Ddim {
            let eta = eta.unwrap_or(0.0);
            if !(eta.is_finite() && eta >= 0.0) {
                return Err(Error::InvalidArgument(format!(
                    "eta must be ≥ 0, got {eta}"
                )));
            }
            Sampler::Ddim {
                eta,
                clip: self.x0_clip,
            }
        } else {
            if !self.skip_prk_steps {
                return Err(Error::Config(
                    "PNDMScheduler: `skip_prk_steps` = false (the Runge–Kutta warm-up) is not supported (accepted: true, PLMS as Stable Diffusion configs set; --sampler pndm sets it)".into(),
                ));
            }
            if self.prediction == Prediction::Sample {
                return Err(Error::Config(
                    "PNDMScheduler: `prediction_type` = `sample` is not supported (accepted: epsilon, v_prediction; diffusers raises the same)".into(),
                ));
            }
            // diffusers' second call averages ε and steps from t₁ + N // steps to t₁.
            let first_from = (steps >= 2 && ts[1] + ratio != ts[0]).then(|| sigma(ts[1] + ratio));
            Sampler::Plms {
                combine_v: self.prediction == Prediction::V,
                first_from,
                second: None,
                ratio: Some(ratio),
            }
        };
        // A run that ends on timestep 0 with `set_alpha_to_one = false` steps from ᾱ₀ to ᾱ₀:
        // a zero-length last step, which only a plan with landings may hold.
        let zero_length = sigmas[steps] == sigmas[steps - 1];
        let off = zero_length || landings.iter().zip(&sigmas[1..]).any(|(l, s)| l != s);
        Ok(Parts {
            sampler,
            sigmas,
            timesteps: ts,
            landings: off.then_some(landings),
            init_noise_sigma: 1.0,
        })
    }

    /// The k-diffusion ports (Euler, Euler a, Heun, LMS, KDPM2 (a), DPM-Solver SDE): float
    /// timesteps, sigmas interpolated in the training sigmas, then optionally respaced.
    fn plan_karras(&self, schedule: &NoiseSchedule, steps: usize) -> Result<Parts> {
        let class = self.class;
        let n_train = schedule.len();
        let mut ts = match self.spacing {
            Spacing::Linspace => schedule::linspace_f64(0.0, (n_train - 1) as f64, steps)
                .iter()
                .rev()
                .map(|&t| f32r(t))
                .collect(),
            other => discrete_timesteps(other, n_train, steps, self.steps_offset as f64),
        };
        let mut sigmas: Vec<f64> = ts.iter().map(|&t| schedule.t_to_sigma(t)).collect();
        let (lo, hi) = (sigmas[sigmas.len() - 1], sigmas[0]);
        if let Some(c) = self.sigma_option.respace(lo, hi, steps) {
            let log_sigmas = schedule.log_sigmas();
            ts = c
                .iter()
                .map(|&s| schedule::sigma_to_t(s, &log_sigmas))
                .collect();
            // KDPM2 rounds its Karras timesteps (and only those).
            let kdpm2 = matches!(
                class,
                SchedulerClass::Kdpm2 | SchedulerClass::Kdpm2Ancestral
            );
            if kdpm2 && self.sigma_option == SigmaOption::Karras {
                ts.iter_mut().for_each(|t| *t = t.round());
            }
            sigmas = c;
        }
        let last = if self.final_sigma_min {
            schedule.sigmas()[0] as f64
        } else {
            0.0
        };
        sigmas.push(last);
        let sigmas: Vec<f64> = sigmas.into_iter().map(f32r).collect();
        let ts: Vec<f64> = ts.into_iter().map(f32r).collect();
        let max = sigmas.iter().cloned().fold(0.0, f64::max);
        let init_noise_sigma = match self.spacing {
            Spacing::Linspace | Spacing::Trailing => max,
            Spacing::Leading => f32r((max * max + 1.0).sqrt()),
        };
        let sampler = match class {
            SchedulerClass::Euler => Sampler::Euler,
            SchedulerClass::EulerAncestral => Sampler::EulerAncestral { eta: 1.0 },
            SchedulerClass::Heun => Sampler::Heun,
            SchedulerClass::Lms => Sampler::Lms { order: 4 },
            SchedulerClass::Kdpm2 => Sampler::Dpm2,
            SchedulerClass::Kdpm2Ancestral => Sampler::Dpm2Ancestral,
            _ => Sampler::DpmPpSde { eta: 1.0 },
        };
        Ok(Parts {
            sampler,
            sigmas,
            timesteps: ts,
            landings: None,
            init_noise_sigma,
        })
    }

    /// DPM-Solver++ multistep, UniPC and DEIS: integer timesteps over N + 1 points (linspace,
    /// leading) or trailing, optionally respaced (Karras timesteps rounded).
    fn plan_multistep(&self, schedule: &NoiseSchedule, steps: usize) -> Result<Parts> {
        let class = self.class;
        let n_train = schedule.len();
        let deis = class == SchedulerClass::Deis;
        if deis && self.sigma_option != SigmaOption::None {
            return Err(Error::Config(
                "DEISMultistepScheduler: `use_karras_sigmas`/`use_exponential_sigmas`/`use_beta_sigmas` are not supported (accepted: false; --schedule karras with --sampler deis respaces the sigmas k-diffusion's way)".into(),
            ));
        }
        let lower_order_final = self.lower_order_final;
        let order = self.solver_order;
        let sampler = match class {
            SchedulerClass::Deis => Sampler::Deis {
                order,
                lower_order_final,
            },
            SchedulerClass::UniPc => Sampler::UniPc {
                order,
                lower_order_final,
            },
            _ => Sampler::DpmPpMultistep(MultistepOptions {
                order,
                sde: self.sde.clone().map_err(Error::Config)?,
                lower_order_final,
                euler_at_final: self.euler_at_final,
            }),
        };
        let last_t = n_train as f64;
        let mut ts: Vec<f64> = match self.spacing {
            Spacing::Linspace => schedule::linspace_f64(0.0, last_t - 1.0, steps + 1)
                .iter()
                .rev()
                .take(steps)
                .map(|t| t.round_ties_even())
                .collect(),
            Spacing::Leading => {
                let ratio = (n_train / (steps + 1)) as f64;
                (0..=steps)
                    .rev()
                    .take(steps)
                    .map(|i| i as f64 * ratio + self.steps_offset as f64)
                    .collect()
            }
            Spacing::Trailing => trailing(n_train, steps),
        };
        let train = schedule.sigmas();
        let (sig_min, sig_max) = (train[0] as f64, train[n_train - 1] as f64);
        // Karras timesteps are rounded (except under the cosine schedule); the others not.
        let round = self.sigma_option == SigmaOption::Karras;
        let mut sigmas = match self.sigma_option.respace(sig_min, sig_max, steps) {
            Some(c) => {
                let log_sigmas = schedule.log_sigmas();
                let cosine = self.beta_schedule == "squaredcos_cap_v2";
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
        // Equal neighbours make a zero step h, which diffusers divides by (its sample turns
        // NaN): leading spacing with an offset past the last training timestep does this.
        if sigmas.windows(2).any(|w| w[1] >= w[0]) {
            return Err(Error::Config(format!(
                "{}: at {steps} steps with {:?} spacing and steps_offset {} two timesteps share a sigma (the first is {}, past the last training timestep {}); diffusers' solver divides by the zero step — use another step count or spacing",
                class.name(),
                self.spacing,
                self.steps_offset,
                ts[0],
                n_train - 1
            )));
        }
        // diffusers finds its first step by searching for the first timestep and, where it
        // occurs twice, starts at the second occurrence — then runs past its sigmas and raises
        // (beta spacing rounds the first two timesteps together at some step counts).
        if ts.len() > 1 && ts[0] == ts[1] {
            return Err(Error::Config(format!(
                "{}: at {steps} steps the first two timesteps are both {} ({:?} spacing); diffusers cannot run this plan either — use another step count or spacing",
                class.name(),
                ts[0],
                self.sigma_option
            )));
        }
        // DEIS always ends at the smallest training sigma.
        let last = if deis || self.final_sigma_min {
            train[0] as f64
        } else {
            0.0
        };
        sigmas.push(last);
        Ok(Parts {
            sampler,
            sigmas: sigmas.into_iter().map(f32r).collect(),
            timesteps: ts,
            landings: None,
            init_noise_sigma: 1.0,
        })
    }

    /// LCM and TCD: `steps` of the `original_inference_steps`-point distillation skeleton.
    fn plan_consistency(
        &self,
        schedule: &NoiseSchedule,
        steps: usize,
        eta: Option<f64>,
    ) -> Result<Parts> {
        let class = self.class;
        let n_train = schedule.len();
        let original = self.original_inference_steps;
        if original == 0 || original > n_train || steps > original {
            return Err(Error::InvalidArgument(format!(
                "{}: steps ({steps}) must be at most original_inference_steps ({original}), itself at most {n_train}",
                class.name()
            )));
        }
        let ts: Vec<f64> = super::consistency_timesteps(n_train, original, steps)
            .into_iter()
            .map(|t| t as f64)
            .collect();
        let mut sigmas: Vec<f64> = ts.iter().map(|&t| sigma_at(schedule, t)).collect();
        let sampler = if class == SchedulerClass::Lcm {
            sigmas.push(0.0);
            Sampler::Lcm
        } else {
            // TCD's last step lands on timestep 0, not on σ = 0.
            sigmas.push(f32r(schedule.sigmas()[0] as f64));
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
        Ok(Parts {
            sampler,
            sigmas,
            timesteps: ts,
            landings: None,
            init_noise_sigma: 1.0,
        })
    }
}

impl SigmaOption {
    /// `steps` sigmas from `hi` down to `lo` in this spacing (`None`: the timestep spacing's own).
    fn respace(self, lo: f64, hi: f64, steps: usize) -> Option<Vec<f64>> {
        match self {
            SigmaOption::None => None,
            SigmaOption::Karras => Some(schedule::karras(lo, hi, steps, 7.0)),
            SigmaOption::Exponential => Some(schedule::exponential(lo, hi, steps)),
            SigmaOption::Beta => Some(schedule::beta(lo, hi, steps, 0.6, 0.6)),
        }
    }
}

/// The float32 training sigma at integer timestep `t`. A zero-SNR end has σ = ∞, which the VE
/// samplers cannot hold; at σ = 1e10 every quantity a VP scheduler computes differs from its
/// σ = ∞ value by O(1/σ) = 1e-10.
pub(crate) fn sigma_at(schedule: &NoiseSchedule, t: f64) -> f64 {
    let s = f32r(schedule.t_to_sigma(t));
    if s.is_finite() {
        s
    } else {
        f32r(1e10)
    }
}

/// `np.arange(n, 0, -n / steps).round() - 1`: numpy's arange has `ceil(n / step)` values
/// `n + i·δ` with `δ = (n − step) − n` — not a running subtraction, whose rounding leaves an
/// extra value just above 0 at step counts that do not divide n (3, 6, 9, 11, 13, … of 1000).
pub(super) fn trailing(n_train: usize, steps: usize) -> Vec<f64> {
    let n = n_train as f64;
    let step = n / steps as f64;
    let len = (n / step).ceil() as usize;
    let delta = (n - step) - n;
    (0..len)
        .map(|i| (n + i as f64 * delta).round_ties_even() - 1.0)
        .collect()
}

/// Integer timesteps of DDPM, DDIM and PNDM (and of the Euler family's leading and trailing
/// spacings), from the largest.
fn discrete_timesteps(spacing: Spacing, n_train: usize, steps: usize, offset: f64) -> Vec<f64> {
    match spacing {
        Spacing::Linspace => schedule::linspace_f64(0.0, (n_train - 1) as f64, steps)
            .iter()
            .rev()
            .map(|t| t.round_ties_even())
            .collect(),
        Spacing::Trailing => trailing(n_train, steps),
        Spacing::Leading => {
            let ratio = (n_train / steps) as f64;
            (0..steps)
                .rev()
                .map(|i| i as f64 * ratio + offset)
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    /// numpy's `np.arange(1000, 0, -1000/6).round() - 1` is [999, 832, 666, 499, 332, 166]:
    /// six values (a running subtraction gave a seventh, −1).
    #[test]
    fn trailing_matches_numpy_arange() {
        assert_eq!(
            super::trailing(1000, 6),
            [999.0, 832.0, 666.0, 499.0, 332.0, 166.0]
        );
        // numpy's own length rounds up past `steps` at 62 counts up to 1000, the first 61:
        // diffusers then runs 62 timesteps, and so does ldm.
        let long: Vec<usize> = (1..=1000)
            .filter(|&n| super::trailing(1000, n).len() != n)
            .collect();
        assert_eq!(long.len(), 62);
        assert_eq!(&long[..4], [61, 103, 121, 122]);
        assert_eq!(super::trailing(1000, 61).len(), 62);
    }
}
