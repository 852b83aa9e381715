//! `ldm-pipeline`: the Stable Diffusion pipelines as a library — load a model's components
//! once, then run txt2img, img2img and inpainting requests against them. Front-ends (the CLI,
//! the server) only build a [`generate::Request`] and call [`generate::generate`].

pub mod bench;
pub mod components;
pub mod control;
pub mod device;
pub mod error;
pub mod extra_networks;
pub mod generate;
pub mod image_io;
pub mod ip_adapter;
pub mod model_denoiser;
pub mod prompt;

pub use components::Components;
pub use error::{Error, Result};
pub use generate::{generate, Output, Request};
pub use image_io::infotext;
pub mod outpaint;
pub mod preview;
pub mod prompt_syntax;
