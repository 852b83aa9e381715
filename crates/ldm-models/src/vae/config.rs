//! `AutoencoderKL`'s config: a serde mirror of diffusers' `vae/config.json` and its validation.

use crate::config::{check_groups, check_range, MAX_CHANNELS};
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// diffusers' `AutoencoderKL` config, field for field (the fields we read).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AutoencoderKLConfigJson {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
    pub force_upcast: bool,
    pub sample_size: crate::config::OneOrMany<usize>,
}

impl Default for AutoencoderKLConfigJson {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            force_upcast: true,
            sample_size: crate::config::OneOrMany::One(512),
        }
    }
}

/// A validated autoencoder config.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    pub shift_factor: f64,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
    /// Training image size: diffusers' tile size for tiled encoding and decoding.
    pub sample_size: usize,
    /// The model was trained to be run in f32 (diffusers upcasts it when computing in f16).
    pub force_upcast: bool,
}

impl VaeConfig {
    /// Reads and validates `vae/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let json: AutoencoderKLConfigJson = crate::config::read_json(path)?;
        Self::from_json(&json, path)
    }

    /// Validates a parsed config; `path` names it in errors.
    pub fn from_json(j: &AutoencoderKLConfigJson, path: &Path) -> Result<Self> {
        let n = j.block_out_channels.len();
        check_range(path, "block_out_channels (count)", n, 1, 8)?;
        if j.down_block_types.len() != n || j.up_block_types.len() != n {
            return Err(Error::config(
                path,
                "down_block_types, up_block_types and block_out_channels differ in length",
            ));
        }
        for t in &j.down_block_types {
            if t != "DownEncoderBlock2D" {
                return Err(Error::config(path, format!("unsupported down block `{t}`")));
            }
        }
        for t in &j.up_block_types {
            if t != "UpDecoderBlock2D" {
                return Err(Error::config(path, format!("unsupported up block `{t}`")));
            }
        }
        if j.act_fn != "silu" {
            return Err(Error::config(
                path,
                format!("unsupported act_fn `{}`", j.act_fn),
            ));
        }
        for &c in &j.block_out_channels {
            check_range(path, "block_out_channels", c, 1, MAX_CHANNELS)?;
            check_groups(path, "norm_num_groups", c, j.norm_num_groups)?;
        }
        check_range(path, "in_channels", j.in_channels, 1, 64)?;
        check_range(path, "out_channels", j.out_channels, 1, 64)?;
        check_range(path, "latent_channels", j.latent_channels, 1, 1024)?;
        check_range(path, "layers_per_block", j.layers_per_block, 1, 64)?;
        if !(j.scaling_factor.is_finite() && j.scaling_factor > 0.0) {
            return Err(Error::config(
                path,
                "`scaling_factor` must be a positive number",
            ));
        }
        let shift_factor = j.shift_factor.unwrap_or(0.0);
        if !shift_factor.is_finite() {
            return Err(Error::config(path, "`shift_factor` must be finite"));
        }
        Ok(Self {
            in_channels: j.in_channels,
            out_channels: j.out_channels,
            block_out_channels: j.block_out_channels.clone(),
            layers_per_block: j.layers_per_block,
            latent_channels: j.latent_channels,
            norm_num_groups: j.norm_num_groups,
            scaling_factor: j.scaling_factor,
            shift_factor,
            use_quant_conv: j.use_quant_conv,
            use_post_quant_conv: j.use_post_quant_conv,
            mid_block_add_attention: j.mid_block_add_attention,
            sample_size: match &j.sample_size {
                crate::config::OneOrMany::One(s) => *s,
                crate::config::OneOrMany::Many(v) => v.iter().copied().max().unwrap_or(512),
            }
            .clamp(8, 1 << 14),
            force_upcast: j.force_upcast,
        })
    }

    /// Spatial downsampling factor between pixels and latents.
    pub fn downsample_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}
