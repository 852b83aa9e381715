//! `UNet2DConditionModel`'s config: a serde mirror of diffusers' `unet/config.json`, validated
//! into per-block lists with diffusers' quirks decoded once.

use crate::config::{check_groups, check_range, OneOrMany, MAX_CHANNELS};
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// diffusers' `UNet2DConditionModel` config, field for field (the fields SD1/2/XL use).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UNet2DConditionConfigJson {
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: OneOrMany<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: OneOrMany<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub cross_attention_dim: OneOrMany<usize>,
    pub transformer_layers_per_block: OneOrMany<usize>,
    pub reverse_transformer_layers_per_block: Option<Vec<usize>>,
    pub encoder_hid_dim: Option<usize>,
    pub attention_head_dim: OneOrMany<usize>,
    pub num_attention_heads: Option<OneOrMany<usize>>,
    pub dual_cross_attention: bool,
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<usize>,
    pub addition_embed_type_num_heads: usize,
    pub num_class_embeds: Option<usize>,
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub time_cond_proj_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub projection_class_embeddings_input_dim: Option<usize>,
    pub attention_type: String,
    pub sample_size: Option<OneOrMany<usize>>,
}

impl Default for UNet2DConditionConfigJson {
    fn default() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: [
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            only_cross_attention: OneOrMany::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: OneOrMany::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: OneOrMany::One(1280),
            transformer_layers_per_block: OneOrMany::One(1),
            reverse_transformer_layers_per_block: None,
            encoder_hid_dim: None,
            attention_head_dim: OneOrMany::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            addition_embed_type_num_heads: 64,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: "default".into(),
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            attention_type: "default".into(),
            sample_size: None,
        }
    }
}

/// Whether a down or up block carries transformer (cross-attention) layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// `DownBlock2D` / `UpBlock2D`: ResNets only.
    Plain,
    /// `CrossAttnDownBlock2D` / `CrossAttnUpBlock2D`: ResNets each followed by a Transformer2D.
    CrossAttn,
}

/// SDXL's `addition_embed_type: "text_time"`: pooled text embedding plus size/crop conditioning.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TextTimeConfig {
    pub addition_time_embed_dim: usize,
    pub projection_class_embeddings_input_dim: usize,
}

/// A validated U-Net config; every per-block list has one entry per down block.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub block_out_channels: Vec<usize>,
    pub down_blocks: Vec<BlockKind>,
    pub up_blocks: Vec<BlockKind>,
    pub layers_per_block: Vec<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: Vec<usize>,
    pub transformer_layers_per_block: Vec<usize>,
    pub reverse_transformer_layers_per_block: Vec<usize>,
    /// Heads per block. SD1's `attention_head_dim` is in fact this head count (diffusers#2011).
    pub num_attention_heads: Vec<usize>,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    pub text_time: Option<TextTimeConfig>,
    /// `addition_embed_type: "text"` (DeepFloyd IF's pooled text conditioning): the heads of
    /// the attention pooling over the text encoder's hidden states, whose projection is added
    /// to the timestep embedding.
    pub text_pool_heads: Option<usize>,
    /// Width of a guidance embedding added to the timestep embedding through `cond_proj`
    /// (guidance-distilled and latent-consistency models: one pass at a guidance scale w).
    pub time_cond_proj_dim: Option<usize>,
    pub time_embed_dim: usize,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    /// The latent side the model was trained at (diffusers' default image size is this times
    /// the autoencoder's factor).
    pub sample_size: Option<usize>,
}

fn unsupported(path: &Path, what: String) -> Error {
    Error::config(path, format!("unsupported by ldm: {what}"))
}

impl UNetConfig {
    /// Reads and validates `unet/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        // A null `mid_block_type` means "no mid block"; a null `norm_num_groups`, "no norms".
        let json: UNet2DConditionConfigJson =
            crate::config::read_json_with_nulls(path, &["mid_block_type", "norm_num_groups"])?;
        Self::from_json(&json, path)
    }

    /// Validates a parsed config; `path` names it in errors.
    pub fn from_json(j: &UNet2DConditionConfigJson, path: &Path) -> Result<Self> {
        let n = j.block_out_channels.len();
        check_range(path, "block_out_channels (count)", n, 1, 8)?;
        if j.down_block_types.len() != n || j.up_block_types.len() != n {
            return Err(Error::config(
                path,
                "down_block_types, up_block_types and block_out_channels differ in length",
            ));
        }
        let kind = |t: &str, plain: &str, cross: &str| -> Result<BlockKind> {
            if t == plain {
                Ok(BlockKind::Plain)
            } else if t == cross {
                Ok(BlockKind::CrossAttn)
            } else {
                Err(unsupported(path, format!("block type `{t}`")))
            }
        };
        let down_blocks = j
            .down_block_types
            .iter()
            .map(|t| kind(t, "DownBlock2D", "CrossAttnDownBlock2D"))
            .collect::<Result<Vec<_>>>()?;
        let up_blocks = j
            .up_block_types
            .iter()
            .map(|t| kind(t, "UpBlock2D", "CrossAttnUpBlock2D"))
            .collect::<Result<Vec<_>>>()?;
        match j.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => return Err(unsupported(path, format!("mid_block_type {other:?}"))),
        }
        let checks: [(bool, &str); 9] = [
            (j.center_input_sample, "center_input_sample"),
            (j.dual_cross_attention, "dual_cross_attention"),
            (j.class_embed_type.is_some(), "class_embed_type"),
            (j.num_class_embeds.is_some(), "num_class_embeds"),
            (j.encoder_hid_dim.is_some(), "encoder_hid_dim"),
            (
                j.resnet_time_scale_shift != "default",
                "resnet_time_scale_shift",
            ),
            (j.time_embedding_type != "positional", "time_embedding_type"),
            (j.attention_type != "default", "attention_type"),
            (j.act_fn != "silu", "act_fn"),
        ];
        for (bad, field) in checks {
            if bad {
                return Err(unsupported(
                    path,
                    format!("`{field}` other than its default"),
                ));
            }
        }
        let per_block = |e: String| Error::config(path, e);
        if j.time_cond_proj_dim == Some(0) {
            return Err(per_block("time_cond_proj_dim must be at least 1".into()));
        }
        if j.only_cross_attention
            .per_block(n, "only_cross_attention")
            .map_err(per_block)?
            .iter()
            .any(|&b| b)
        {
            return Err(unsupported(path, "`only_cross_attention`".into()));
        }
        let layers_per_block = j
            .layers_per_block
            .per_block(n, "layers_per_block")
            .map_err(per_block)?;
        let cross_attention_dim = j
            .cross_attention_dim
            .per_block(n, "cross_attention_dim")
            .map_err(per_block)?;
        let transformer_layers_per_block = j
            .transformer_layers_per_block
            .per_block(n, "transformer_layers_per_block")
            .map_err(per_block)?;
        let reverse_transformer_layers_per_block = match &j.reverse_transformer_layers_per_block {
            Some(v) if v.len() == n => v.clone(),
            Some(v) => {
                return Err(Error::config(
                    path,
                    format!(
                        "`reverse_transformer_layers_per_block` has {} entries, expected {n}",
                        v.len()
                    ),
                ))
            }
            None => transformer_layers_per_block.iter().rev().copied().collect(),
        };
        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`.
        let heads = j
            .num_attention_heads
            .as_ref()
            .unwrap_or(&j.attention_head_dim);
        let num_attention_heads = heads
            .per_block(n, "num_attention_heads")
            .map_err(per_block)?;
        let norm_num_groups = j
            .norm_num_groups
            .ok_or_else(|| unsupported(path, "`norm_num_groups: null`".into()))?;
        for (i, &c) in j.block_out_channels.iter().enumerate() {
            check_range(path, "block_out_channels", c, 1, MAX_CHANNELS)?;
            check_groups(path, "norm_num_groups", c, norm_num_groups)?;
            check_range(path, "layers_per_block", layers_per_block[i], 1, 64)?;
            check_range(
                path,
                "transformer_layers_per_block",
                transformer_layers_per_block[i],
                1,
                64,
            )?;
            check_range(
                path,
                "reverse_transformer_layers_per_block",
                reverse_transformer_layers_per_block[i],
                1,
                64,
            )?;
            check_range(
                path,
                "cross_attention_dim",
                cross_attention_dim[i],
                1,
                MAX_CHANNELS,
            )?;
            check_range(path, "num_attention_heads", num_attention_heads[i], 1, c)?;
            if !c.is_multiple_of(num_attention_heads[i]) {
                return Err(Error::config(
                    path,
                    format!(
                        "block {i}: {c} channels are not divisible into {} heads",
                        num_attention_heads[i]
                    ),
                ));
            }
        }
        check_range(path, "in_channels", j.in_channels, 1, 1024)?;
        check_range(path, "out_channels", j.out_channels, 1, 1024)?;
        for (k, field) in [
            (j.conv_in_kernel, "conv_in_kernel"),
            (j.conv_out_kernel, "conv_out_kernel"),
        ] {
            if k % 2 == 0 || k > 15 {
                return Err(Error::config(
                    path,
                    format!("`{field}` = {k} must be odd and at most 15"),
                ));
            }
        }
        if !(j.norm_eps > 0.0 && j.norm_eps < 1.0) {
            return Err(Error::config(path, "`norm_eps` must lie in (0, 1)"));
        }
        let time_embed_dim = j.time_embedding_dim.unwrap_or(4 * j.block_out_channels[0]);
        check_range(
            path,
            "time_embedding_dim",
            time_embed_dim,
            1,
            4 * MAX_CHANNELS,
        )?;
        let mut text_pool_heads = None;
        let text_time = match j.addition_embed_type.as_deref() {
            None => None,
            Some("text") => {
                let dim = match &j.cross_attention_dim {
                    OneOrMany::One(d) => *d,
                    OneOrMany::Many(_) => {
                        return Err(Error::config(
                            path,
                            "addition_embed_type `text` needs one `cross_attention_dim`",
                        ))
                    }
                };
                let heads = j.addition_embed_type_num_heads;
                check_range(path, "addition_embed_type_num_heads", heads, 1, dim)?;
                if dim % heads != 0 {
                    return Err(Error::config(
                        path,
                        format!(
                            "cross_attention_dim {dim} is not divisible by addition_embed_type_num_heads {heads}"
                        ),
                    ));
                }
                text_pool_heads = Some(heads);
                None
            }
            Some("text_time") => {
                let addition_time_embed_dim = j.addition_time_embed_dim.ok_or_else(|| {
                    Error::config(path, "text_time needs `addition_time_embed_dim`")
                })?;
                let projection_class_embeddings_input_dim =
                    j.projection_class_embeddings_input_dim.ok_or_else(|| {
                        Error::config(
                            path,
                            "text_time needs `projection_class_embeddings_input_dim`",
                        )
                    })?;
                check_range(
                    path,
                    "addition_time_embed_dim",
                    addition_time_embed_dim,
                    1,
                    MAX_CHANNELS,
                )?;
                check_range(
                    path,
                    "projection_class_embeddings_input_dim",
                    projection_class_embeddings_input_dim,
                    6 * addition_time_embed_dim + 1,
                    4 * MAX_CHANNELS,
                )?;
                Some(TextTimeConfig {
                    addition_time_embed_dim,
                    projection_class_embeddings_input_dim,
                })
            }
            Some(other) => return Err(unsupported(path, format!("addition_embed_type `{other}`"))),
        };
        let sample_size = match &j.sample_size {
            Some(OneOrMany::One(n)) => Some(*n),
            Some(OneOrMany::Many(v)) => v.first().copied(),
            None => None,
        }
        .filter(|n| (1..=1024).contains(n));
        Ok(Self {
            sample_size,
            in_channels: j.in_channels,
            out_channels: j.out_channels,
            flip_sin_to_cos: j.flip_sin_to_cos,
            freq_shift: j.freq_shift,
            block_out_channels: j.block_out_channels.clone(),
            down_blocks,
            up_blocks,
            layers_per_block,
            downsample_padding: j.downsample_padding,
            mid_block_scale_factor: j.mid_block_scale_factor,
            norm_num_groups,
            norm_eps: j.norm_eps,
            cross_attention_dim,
            transformer_layers_per_block,
            reverse_transformer_layers_per_block,
            num_attention_heads,
            use_linear_projection: j.use_linear_projection,
            upcast_attention: j.upcast_attention,
            text_time,
            text_pool_heads,
            time_cond_proj_dim: j.time_cond_proj_dim,
            time_embed_dim,
            conv_in_kernel: j.conv_in_kernel,
            conv_out_kernel: j.conv_out_kernel,
        })
    }

    /// Width of the pooled text embedding SDXL's added conditioning expects.
    pub fn text_embeds_dim(&self) -> Option<usize> {
        self.text_time
            .map(|t| t.projection_class_embeddings_input_dim - 6 * t.addition_time_embed_dim)
    }
}
