//! `ldm-train`: training for ldm in Rust — the Shapes World data set, optimisers and
//! checkpoints, and the autoencoder and text-to-image trainers of latent diffusion
//! (Rombach et al. 2022).

pub mod checkpoint;
pub mod component;
pub mod data;
pub mod discriminator;
pub mod distill;
pub mod error;
pub mod eval;
pub mod io;
pub mod layout_head;
pub mod log;
pub mod loss;
pub mod lpips;
pub mod noise;
pub mod optim;
pub mod parallel;
pub mod plot;
pub mod recipe;
pub mod shapes;
pub mod tokenizer;
pub mod unet_trainer;
pub mod vae_trainer;

pub use error::{Error, Result};

/// One training step's report to a front-end (progress bar, log).
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub phase: &'static str,
    pub step: usize,
    pub total: usize,
    pub loss: f64,
    /// A line worth keeping in the log (a checkpoint's measurements), when there is one.
    pub note: Option<String>,
}
