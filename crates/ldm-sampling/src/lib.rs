//! `ldm-sampling`: noise schedules as data, samplers as functions over a [`Denoiser`]
//! (k-diffusion's way: Karras et al. 2022), classifier-free guidance as a denoiser wrapper, and
//! torch-compatible noise. It knows nothing of U-Nets.

pub mod error;
pub mod noise;
pub mod schedule;

pub use error::{Error, Result};
pub mod denoiser;
pub mod samplers;

pub use denoiser::{Denoiser, Prediction};
pub use samplers::{NoHook, Run, Sampler, StepHook, StepInfo};
pub mod guidance;
pub mod names;
pub mod scheduler_config;
pub mod selection;
