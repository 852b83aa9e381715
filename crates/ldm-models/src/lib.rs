//! `ldm-models`: Stable Diffusion's networks on candle — the KL autoencoder, the conditional
//! U-Net and the CLIP text encoder — with configs mirroring diffusers' `config.json` and
//! constructors whose parameter paths are the checkpoint keys, so one constructor both loads
//! released weights and initialises training.

pub mod adapter_math;
pub mod clip;
pub mod config;
pub mod controlnet;
pub mod error;
pub mod flops;
pub mod ip_adapter;
pub mod kernels;
pub mod layers;
pub mod lora;
pub mod model;
pub mod t2i_adapter;
pub mod unet;
pub mod vae;
pub mod weights;

pub use error::{Error, Result};
