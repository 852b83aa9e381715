//! ControlNet (Zhang et al. 2023), as diffusers' `ControlNetModel` computes it: a trainable
//! copy of the U-Net's encoder half (the same [`Encoder`], at the same checkpoint keys) that
//! also sees a conditioning image through a small convolutional embedding, and whose every skip
//! connection and mid-block output pass through a zero-initialised 1×1 convolution to become
//! residuals the U-Net adds to its own ([`ControlResiduals`]).

use crate::error::{Error, Result as ModelResult};
use crate::layers::{conv2d, Conv2d};
use crate::unet::config::UNet2DConditionConfigJson;
use crate::unet::{AddedCond, ControlResiduals, Encoder, UNetConfig};
use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};
use std::path::Path;

/// A ControlNet's `config.json`: its encoder, a U-Net config (the fields the two share), and
/// the conditioning embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlNetConfig {
    pub unet: UNetConfig,
    /// Channels of the conditioning embedding's stages; each after the first halves the size.
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// Channels of the conditioning image (3).
    pub conditioning_channels: usize,
    /// `controlnet_conditioning_channel_order: "bgr"`: the image's channels are reversed.
    pub bgr: bool,
    /// Residuals averaged over the image (the "shuffle" ControlNet).
    pub global_pool_conditions: bool,
}

impl ControlNetConfig {
    /// Reads and validates a diffusers `ControlNetModel` `config.json`.
    pub fn from_file(path: &Path) -> ModelResult<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::config(path, e.to_string()))?;
        let map = value
            .as_object_mut()
            .ok_or_else(|| Error::config(path, "not a JSON object"))?;
        let class = map.get("_class_name").and_then(|v| v.as_str());
        if class.is_some_and(|c| c != "ControlNetModel") {
            return Err(Error::config(
                path,
                format!("a `{}`, not a ControlNetModel", class.unwrap_or_default()),
            ));
        }
        let channels: Vec<usize> = match map.remove("conditioning_embedding_out_channels") {
            Some(v) => serde_json::from_value(v).map_err(|e| Error::config(path, e.to_string()))?,
            None => vec![16, 32, 96, 256],
        };
        let conditioning_channels = match map.remove("conditioning_channels") {
            Some(v) => serde_json::from_value(v).map_err(|e| Error::config(path, e.to_string()))?,
            None => 3,
        };
        let bgr = match map.remove("controlnet_conditioning_channel_order") {
            Some(serde_json::Value::String(s)) if s == "bgr" => true,
            Some(serde_json::Value::String(s)) if s == "rgb" => false,
            None | Some(serde_json::Value::Null) => false,
            Some(other) => {
                return Err(Error::config(
                    path,
                    format!("controlnet_conditioning_channel_order {other}"),
                ))
            }
        };
        let global_pool_conditions = map
            .remove("global_pool_conditions")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        // The encoder's fields are a U-Net's; a ControlNet has no up path, so its config names
        // none: the mirror of the down path stands in for the U-Net config's validation.
        let ups: Vec<serde_json::Value> = map
            .get("down_block_types")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .rev()
                    .map(|t| match t.as_str() {
                        Some("CrossAttnDownBlock2D") => "CrossAttnUpBlock2D".into(),
                        _ => "UpBlock2D".into(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        map.insert("up_block_types".into(), ups.into());
        if let Some(i) = map.get("in_channels").cloned() {
            map.entry("out_channels").or_insert(i);
        }
        let json: UNet2DConditionConfigJson = crate::config::from_value_with_nulls(
            value,
            &["mid_block_type", "norm_num_groups"],
            path,
        )?;
        let unet = UNetConfig::from_json(&json, path)?;
        if channels.is_empty() || channels.len() > 8 {
            return Err(Error::config(
                path,
                "conditioning_embedding_out_channels must have 1 to 8 entries",
            ));
        }
        for &c in &channels {
            crate::config::check_range(
                path,
                "conditioning_embedding_out_channels",
                c,
                1,
                crate::config::MAX_CHANNELS,
            )?;
        }
        crate::config::check_range(path, "conditioning_channels", conditioning_channels, 1, 16)?;
        Ok(Self {
            unet,
            conditioning_embedding_out_channels: channels,
            conditioning_channels,
            bgr,
            global_pool_conditions,
        })
    }

    /// How many times the conditioning embedding halves the image: the ControlNet takes
    /// images this power of two larger than its latents.
    pub fn downsample_factor(&self) -> usize {
        1 << (self.conditioning_embedding_out_channels.len() - 1)
    }
}

/// `ControlNetConditioningEmbedding`: the conditioning image to the encoder's first width.
#[derive(Debug, Clone)]
struct ConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl ConditioningEmbedding {
    fn new(vb: VarBuilder, cfg: &ControlNetConfig) -> Result<Self> {
        let ch = &cfg.conditioning_embedding_out_channels;
        let conv_in = conv2d(vb.pp("conv_in"), cfg.conditioning_channels, ch[0], 3, 1, 1)?;
        let mut blocks = Vec::new();
        for i in 0..ch.len() - 1 {
            let b = vb.pp("blocks");
            blocks.push(conv2d(b.pp(2 * i), ch[i], ch[i], 3, 1, 1)?);
            blocks.push(conv2d(b.pp(2 * i + 1), ch[i], ch[i + 1], 3, 2, 1)?);
        }
        let conv_out = conv2d(
            vb.pp("conv_out"),
            ch[ch.len() - 1],
            cfg.unet.block_out_channels[0],
            3,
            1,
            1,
        )?;
        Ok(Self {
            conv_in,
            blocks,
            conv_out,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = candle_nn::ops::silu(&self.conv_in.forward(x)?)?;
        for b in &self.blocks {
            h = candle_nn::ops::silu(&b.forward(&h)?)?;
        }
        self.conv_out.forward(&h)
    }
}

/// How one ControlNet is applied at a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControlScale {
    /// diffusers' `controlnet_conditioning_scale`.
    pub scale: f64,
    /// Guess mode: the residuals of the shallow skips weighted down, from 0.1 at the first to
    /// 1 at the mid block on a log scale (the ControlNet is meant to work without a prompt).
    pub guess_mode: bool,
}

/// diffusers' `ControlNetModel`.
#[derive(Debug, Clone)]
pub struct ControlNetModel {
    encoder: Encoder,
    cond_embedding: ConditioningEmbedding,
    down_blocks: Vec<Conv2d>,
    mid_block: Conv2d,
    pub config: ControlNetConfig,
}

impl ControlNetModel {
    /// Builds the ControlNet; `vb` paths are the keys of its `diffusion_pytorch_model`.
    pub fn new(vb: VarBuilder, cfg: &ControlNetConfig) -> Result<Self> {
        let u = &cfg.unet;
        let encoder = Encoder::new(&vb, u)?;
        let cond_embedding = ConditioningEmbedding::new(vb.pp("controlnet_cond_embedding"), cfg)?;
        // One 1×1 convolution per skip connection, in the order the skips are made.
        let ch = &u.block_out_channels;
        let mut widths = vec![ch[0]];
        for (i, &c) in ch.iter().enumerate() {
            widths.extend(std::iter::repeat_n(c, u.layers_per_block[i]));
            if i + 1 < ch.len() {
                widths.push(c);
            }
        }
        let down_blocks = widths
            .iter()
            .enumerate()
            .map(|(i, &c)| conv2d(vb.pp("controlnet_down_blocks").pp(i), c, c, 1, 1, 0))
            .collect::<Result<Vec<_>>>()?;
        let last = ch[ch.len() - 1];
        let mid_block = conv2d(vb.pp("controlnet_mid_block"), last, last, 1, 1, 0)?;
        Ok(Self {
            encoder,
            cond_embedding,
            down_blocks,
            mid_block,
            config: cfg.clone(),
        })
    }

    /// Loads a diffusers `ControlNetModel` folder (`config.json` and its safetensors),
    /// strictly: a missing or misshapen tensor fails, and so do tensors no layer used.
    pub fn load(
        dir: &Path,
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> ModelResult<Self> {
        let cfg = ControlNetConfig::from_file(&dir.join("config.json"))?;
        crate::weights::load_folder_strict(
            dir,
            dtype,
            device,
            "a ControlNet",
            |_| false,
            |vb| Self::new(vb, &cfg),
        )
    }

    /// Loads an original (lllyasviel) single-file ControlNet for a U-Net of config `unet`:
    /// such files carry no config, so the encoder's is the U-Net's and the conditioning
    /// embedding's widths are read off its convolutions (as A1111 and ComfyUI take them).
    pub fn load_single_file(
        file: &Path,
        unet: &UNetConfig,
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> ModelResult<Self> {
        use crate::weights::original;
        let ckpt = crate::weights::Checkpoint::open_file(file)?;
        let not = |msg: String| Error::NotAModel {
            path: file.to_path_buf(),
            msg,
        };
        let hints = original::controlnet_hint_convs(&ckpt);
        let prefix = original::controlnet_prefix(&ckpt);
        let shape = |i: usize| -> Option<Vec<usize>> {
            ckpt.tensors()
                .get(&format!("{prefix}input_hint_block.{i}.weight"))
                .map(|e| e.shape.clone())
        };
        // conv_in, then pairs (width-keeping, width-changing with stride 2), then conv_out.
        if hints.len() < 2 || !hints.len().is_multiple_of(2) {
            return Err(not(format!(
                "not an original ControlNet: {} `input_hint_block` convolutions",
                hints.len()
            )));
        }
        let first = shape(hints[0]).unwrap_or_default();
        let mut channels = vec![first.first().copied().unwrap_or(0)];
        for pair in hints[1..hints.len() - 1].chunks(2) {
            channels.push(shape(pair[1]).and_then(|s| s.first().copied()).unwrap_or(0));
        }
        let cfg = ControlNetConfig {
            unet: unet.clone(),
            conditioning_embedding_out_channels: channels,
            conditioning_channels: first.get(1).copied().unwrap_or(3),
            bgr: false,
            global_pool_conditions: false,
        };
        let renamed = original::controlnet(&ckpt, unet);
        let under = ckpt
            .tensors()
            .keys()
            .filter(|k| k.starts_with(prefix))
            .count();
        if renamed.tensors().len() != under {
            return Err(not(format!(
                "{} of its {under} tensors have no place in a ControlNet for this U-Net",
                under - renamed.tensors().len()
            )));
        }
        let weights = crate::weights::Weights::new(renamed);
        let model = Self::new(weights.var_builder(dtype, device), &cfg)
            .map_err(|e| not(format!("not a ControlNet for this U-Net: {e}")))?;
        let unused = weights.unused();
        if !unused.is_empty() {
            return Err(not(format!(
                "{} tensors of the ControlNet unused ({} …)",
                unused.len(),
                unused[0]
            )));
        }
        Ok(model)
    }

    /// The residuals for a U-Net evaluation at `sample` `[B, C, h, w]`, `timesteps`, `context`
    /// (and SDXL's `added`), given the conditioning image `cond` `[B, 3, H, W]` in [0, 1] with
    /// `H = h · downsample_factor`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&AddedCond>,
        cond: &Tensor,
        how: ControlScale,
    ) -> Result<ControlResiduals> {
        let u = &self.config.unet;
        let dtype = sample.dtype();
        let emb = self
            .encoder
            .embed(u, dtype, timesteps, context, added, None)?;
        let cond = if self.config.bgr {
            cond.flip(&[1])?
        } else {
            cond.clone()
        };
        let x = (self.encoder.conv_in.forward(sample)?
            + self.cond_embedding.forward(&cond.to_dtype(dtype)?)?)?;
        let (mid, skips) = self.encoder.down_mid(x, &emb, context, None, None)?;
        let n = skips.len();
        let scale_of = |i: usize| -> f64 {
            if how.guess_mode && !self.config.global_pool_conditions {
                // torch.logspace(-1, 0, n + 1)[i]
                10f64.powf(-1.0 + i as f64 / n as f64) * how.scale
            } else {
                how.scale
            }
        };
        let pool = |t: Tensor| -> Result<Tensor> {
            if self.config.global_pool_conditions {
                t.mean_keepdim(3)?.mean_keepdim(2)
            } else {
                Ok(t)
            }
        };
        let down = skips
            .iter()
            .zip(&self.down_blocks)
            .enumerate()
            .map(|(i, (s, block))| pool((block.forward(s)? * scale_of(i))?))
            .collect::<Result<Vec<_>>>()?;
        let mid = pool((self.mid_block.forward(&mid)? * scale_of(n))?)?;
        Ok(ControlResiduals { down, mid })
    }
}
