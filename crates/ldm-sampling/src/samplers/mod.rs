//! Samplers as functions over a [`Denoiser`] (k-diffusion's way): each takes the sample at
//! `sigmas[0]`, walks the given sigmas down to the last, and returns the sample there, with its
//! history in local variables. Any schedule works with any sampler; starting part-way (img2img)
//! is passing a suffix of the sigmas. Every sampler works in the variance-exploding
//! parametrisation `x = x₀ + σ ε`; each doc comment names the diffusers scheduler (or the
//! k-diffusion function) whose numbers it reproduces.

mod ancestral;
mod consistency;
mod deis;
mod heun;
mod lms;
mod multistep;
mod plms;
mod singlestep;
mod unipc;

pub use multistep::MultistepOptions;

use crate::denoiser::{Denoiser, X0Clip};
use crate::noise::NoiseSource;
use crate::schedule::NoiseSchedule;
use crate::{Error, Result};
use candle_core::Tensor;

/// What a per-step hook sees after each step.
#[derive(Debug)]
pub struct StepInfo<'a> {
    /// 0-based step index and the number of steps.
    pub step: usize,
    pub steps: usize,
    pub sigma: f64,
    pub sigma_next: f64,
    /// The sample after the step (at `sigma_next`).
    pub x: &'a Tensor,
    /// The denoised estimate made during the step (for previews).
    pub denoised: &'a Tensor,
}

/// Called after every step; may replace the sample (inpainting blends) or stop with an error.
pub trait StepHook {
    fn after_step(&mut self, info: &StepInfo) -> Result<Option<Tensor>>;

    /// Called on a sample a sampler evaluates in the middle of a step (the predictor of PLMS
    /// and Heun, DPM2's midpoint) before the evaluation; may replace it, as diffusers'
    /// inpainting blends the sample after every scheduler call, with the known region noised
    /// to `sigma`.
    fn intermediate(&mut self, _x: &Tensor, _sigma: f64) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

impl<F: FnMut(&StepInfo) -> Result<Option<Tensor>>> StepHook for F {
    fn after_step(&mut self, info: &StepInfo) -> Result<Option<Tensor>> {
        self(info)
    }
}

/// A hook that does nothing.
pub struct NoHook;

impl StepHook for NoHook {
    fn after_step(&mut self, _: &StepInfo) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// Everything a sampler run needs besides the sampler itself.
pub struct Run<'a> {
    pub denoiser: &'a dyn Denoiser,
    /// Decreasing noise levels, the last usually 0.
    pub sigmas: &'a [f64],
    /// Where each step lands when not on the next sigma (see `Plan::landings`); the
    /// variance-preserving sample is then read at the next sigma. Only DDIM, DDPM and PLMS
    /// take them.
    pub landings: Option<&'a [f64]>,
    pub noise: &'a mut dyn NoiseSource,
    pub hook: &'a mut dyn StepHook,
}

impl Run<'_> {
    /// Reports step `i` to the hook and returns the sample to continue from.
    fn report(&mut self, i: usize, x: Tensor, denoised: &Tensor) -> Result<Tensor> {
        let info = StepInfo {
            step: i,
            steps: self.sigmas.len() - 1,
            sigma: self.sigmas[i],
            sigma_next: self.sigmas[i + 1],
            x: &x,
            denoised,
        };
        Ok(self.hook.after_step(&info)?.unwrap_or(x))
    }

    /// Lets the hook see (and replace) a mid-step sample at `sigma`.
    fn intermediate(&mut self, x: Tensor, sigma: f64) -> Result<Tensor> {
        Ok(self.hook.intermediate(&x, sigma)?.unwrap_or(x))
    }

    /// Where step `i` lands.
    fn landing(&self, i: usize) -> f64 {
        self.landings.map_or(self.sigmas[i + 1], |l| l[i])
    }

    /// The sample `x` at step `i`'s landing, read at `sigmas[i + 1]`.
    fn hand_off(&self, i: usize, x: Tensor) -> Result<Tensor> {
        reread(x, self.landing(i), self.sigmas[i + 1])
    }

    fn randn_like(&mut self, x: &Tensor) -> Result<Tensor> {
        let z = crate::noise::randn_tensor(self.noise, x.shape(), x.device())?;
        Ok(z.to_dtype(x.dtype())?)
    }
}

/// The VE sample `x` at `from` read at `to` with the same variance-preserving sample
/// `x / √(1 + σ²)`: how DDIM and PLMS carry a sample from where a step lands to where the next
/// one starts.
fn reread(x: Tensor, from: f64, to: f64) -> Result<Tensor> {
    if from == to {
        return Ok(x);
    }
    Ok((x * ((1.0 + to * to).sqrt() / (1.0 + from * from).sqrt()))?)
}

/// `d = (x − D(x; σ)) / σ`, the probability-flow ODE's derivative (Karras et al. 2022, eq. 3).
/// A true float32 division, as diffusers computes it: at large σ the next step cancels most of
/// `x`, and multiplying by a rounded `1/σ` would show.
fn derivative(x: &Tensor, denoised: &Tensor, sigma: f64) -> Result<Tensor> {
    let sigma = Tensor::new(sigma, x.device())?.to_dtype(x.dtype())?;
    Ok((x - denoised)?.broadcast_div(&sigma)?)
}

/// Every sampler, by name.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampler {
    /// Euler's method on the probability-flow ODE (k-diffusion `sample_euler`;
    /// diffusers `EulerDiscreteScheduler`).
    Euler,
    /// Euler with ancestral noise of strength `eta` (k-diffusion `sample_euler_ancestral`;
    /// diffusers `EulerAncestralDiscreteScheduler` at η = 1). In this parametrisation DDIM with
    /// η (Song et al. 2021, eq. 12; diffusers `DDIMScheduler`) and DDPM's posterior sampling
    /// (Ho et al. 2020; diffusers `DDPMScheduler`, `fixed_small`) are the same update on their
    /// own sigma lists, so `ddim` and `ddpm` run this code.
    EulerAncestral { eta: f64 },
    /// DDIM with η (Song et al. 2021, eq. 12; diffusers `DDIMScheduler`): the ancestral update
    /// on its own sigmas and landings, with `clip` (`clip_sample` / `thresholding`) applied to
    /// the x̂₀ term alone — diffusers keeps the unclipped ε in the direction term.
    Ddim { eta: f64, clip: Option<X0Clip> },
    /// Heun's second-order method (Karras et al. 2022, Alg. 1; diffusers `HeunDiscreteScheduler`).
    Heun,
    /// DPM-Solver-2 with the midpoint in log-sigma (k-diffusion `sample_dpm_2`;
    /// diffusers `KDPM2DiscreteScheduler`).
    Dpm2,
    /// Ancestral DPM-Solver-2 (k-diffusion `sample_dpm_2_ancestral`;
    /// diffusers `KDPM2AncestralDiscreteScheduler`).
    Dpm2Ancestral,
    /// Linear multistep of `order` (k-diffusion `sample_lms`; diffusers `LMSDiscreteScheduler`).
    Lms { order: usize },
    /// Multistep DPM-Solver++ of order 1–3, ODE or SDE (diffusers `DPMSolverMultistepScheduler`
    /// with `algorithm_type` `dpmsolver++` / `sde-dpmsolver++`): `dpmpp_2m`, `dpmpp_2m_sde`,
    /// `dpmpp_3m_sde`.
    DpmPpMultistep(MultistepOptions),
    /// Latent Consistency Model multistep sampling (diffusers `LCMScheduler`); the model's
    /// boundary condition belongs to its denoiser (see `Plan::finish_denoised`).
    Lcm,
    /// DPM-Solver++(2S) ancestral (k-diffusion `sample_dpmpp_2s_ancestral`).
    DpmPp2SAncestral { eta: f64 },
    /// DPM-Solver++ SDE (k-diffusion `sample_dpmpp_sde`; diffusers `DPMSolverSDEScheduler`).
    DpmPpSde { eta: f64 },
    /// DEIS log-ρ multistep of order 1 or 2 (diffusers `DEISMultistepScheduler`).
    Deis {
        order: usize,
        lower_order_final: bool,
    },
    /// PLMS (diffusers `PNDMScheduler` with `skip_prk_steps`); `combine_v` reproduces its
    /// handling of v-prediction models, `first_from` the σ its averaged first step starts from
    /// where that is not `sigmas[0]` (see the module).
    Plms {
        combine_v: bool,
        first_from: Option<f64>,
        /// `(σ, timestep)` of the averaged first step's second evaluation and landing where
        /// that is not `sigmas[1]` (diffusers' img2img slice of PNDM's timesteps; see
        /// [`crate::scheduler_config::Plan::truncate`]).
        second: Option<(f64, f64)>,
        /// `N // steps` of the config's own integer timesteps; `None` once the sigmas are
        /// replaced by a named schedule.
        ratio: Option<f64>,
    },
    /// UniPC-bh2 predictor-corrector of `order` (diffusers `UniPCMultistepScheduler`).
    UniPc {
        order: usize,
        lower_order_final: bool,
    },
    /// Trajectory Consistency Distillation's strategic stochastic sampling with γ = `gamma`
    /// (diffusers `TCDScheduler`, whose `eta` is this γ); needs the training schedule to place
    /// its intermediate level.
    Tcd {
        gamma: f64,
        schedule: Box<NoiseSchedule>,
    },
}

impl Sampler {
    /// Runs the sampler from `x` at `run.sigmas[0]`; returns the sample at the last sigma.
    pub fn sample(&self, x: Tensor, run: &mut Run) -> Result<Tensor> {
        if run.sigmas.len() < 2 {
            return Err(Error::InvalidArgument(
                "a sampler needs at least two sigmas (one step)".into(),
            ));
        }
        // With landings (DDIM, PLMS) a step may be of zero length: from ᾱ₀ to ᾱ₀ at the end;
        // so may DEIS's last, from timestep 0 to its σ_min end (trailing spacing at 999 steps).
        let strict = run.landings.is_none();
        let last = run.sigmas.len() - 2;
        let zero_final = matches!(self, Sampler::Deis { .. });
        if run.sigmas.windows(2).enumerate().any(|(i, w)| {
            let equal_ok = !strict || (zero_final && i == last && w[1] > 0.0);
            w[1] > w[0] || (w[1] == w[0] && !equal_ok) || w[1] < 0.0 || w[1].is_nan()
        }) || !run.sigmas[0].is_finite()
        {
            return Err(Error::InvalidArgument(
                "sigmas must be finite, non-negative and strictly decreasing".into(),
            ));
        }
        if let Some(l) = run.landings {
            let takes = matches!(
                self,
                Sampler::Ddim { .. } | Sampler::EulerAncestral { .. } | Sampler::Plms { .. }
            );
            let below = l.iter().zip(run.sigmas).all(|(l, s)| *l <= *s && *l >= 0.0);
            if !takes || l.len() + 1 != run.sigmas.len() || !below {
                return Err(Error::InvalidArgument(
                    "landings need DDIM, DDPM or PLMS, one per step, each at or below its step's sigma".into(),
                ));
            }
        }
        match self {
            Sampler::Euler => ancestral::sample(x, run, 0.0, None),
            Sampler::EulerAncestral { eta } => ancestral::sample(x, run, *eta, None),
            Sampler::Ddim { eta, clip } => ancestral::sample(x, run, *eta, clip.as_ref()),
            Sampler::Heun => heun::sample_heun(x, run),
            Sampler::Dpm2 => heun::sample_dpm2(x, run, 0.0),
            Sampler::Dpm2Ancestral => heun::sample_dpm2(x, run, 1.0),
            Sampler::Lms { order } => lms::sample(x, run, *order),
            Sampler::DpmPpMultistep(opt) => multistep::dpmpp_multistep(x, run, *opt),
            Sampler::Lcm => consistency::sample_lcm(x, run),
            Sampler::DpmPp2SAncestral { eta } => {
                singlestep::sample_dpmpp_2s_ancestral(x, run, *eta)
            }
            Sampler::DpmPpSde { eta } => singlestep::sample_dpmpp_sde(x, run, *eta),
            Sampler::Deis {
                order,
                lower_order_final,
            } => deis::sample_deis(x, run, *order, *lower_order_final),
            Sampler::Plms {
                combine_v,
                first_from,
                second,
                ..
            } => plms::sample_plms(x, run, *combine_v, *first_from, second.map(|(s, _)| s)),
            Sampler::UniPc {
                order,
                lower_order_final,
            } => unipc::sample_unipc(x, run, *order, *lower_order_final),
            Sampler::Tcd { gamma, schedule } => consistency::sample_tcd(x, run, *gamma, schedule),
        }
    }
}
