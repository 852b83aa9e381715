//! The CLIP image encoder (Radford et al. 2021, ViT; transformers' `CLIPVisionModel` and
//! `CLIPVisionModelWithProjection`), which IP-Adapter conditions on: the image cut into
//! patches by one strided convolution, a class token and learnt positions, a LayerNorm
//! (`pre_layrnorm`, as the checkpoints spell it), the same pre-norm layers as the text tower
//! without a mask, the class token's final state normalised (`post_layernorm`) and projected.
//! Every layer's hidden state is returned (IP-Adapter Plus reads the penultimate one).

use super::config::Activation;
use super::text_model::{EncoderLayer, LayerShape};
use crate::config::check_range;
use crate::error::{Error, Result as ModelResult};
use crate::layers::linear::{linear_no_bias, Linear};
use crate::layers::ops::LayerNorm;
use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};
use serde::Deserialize;
use std::path::Path;

/// transformers' `CLIPVisionConfig`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// The projection's width (`CLIPVisionModelWithProjection`); `None` for `CLIPVisionModel`.
    pub projection_dim: Option<usize>,
    pub layer_norm_eps: f64,
    pub activation: Activation,
}

#[derive(Deserialize)]
#[serde(default)]
struct ConfigJson {
    image_size: usize,
    patch_size: usize,
    num_channels: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    projection_dim: usize,
    layer_norm_eps: f64,
    hidden_act: String,
}

impl Default for ConfigJson {
    fn default() -> Self {
        Self {
            image_size: 224,
            patch_size: 32,
            num_channels: 3,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            projection_dim: 512,
            layer_norm_eps: 1e-5,
            hidden_act: "quick_gelu".into(),
        }
    }
}

impl ClipVisionConfig {
    /// Reads an image encoder's `config.json`: a `CLIPVisionConfig`, or a whole `CLIPConfig`
    /// (its `vision_config`).
    pub fn from_file(path: &Path) -> ModelResult<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::config(path, e.to_string()))?;
        // Only a plain `CLIPVisionModel` has no projection.
        let with_projection = value
            .get("architectures")
            .and_then(|a| a.as_array())
            .is_none_or(|a| a.iter().any(|n| n.as_str() != Some("CLIPVisionModel")));
        if let Some(v) = value.get_mut("vision_config").map(serde_json::Value::take) {
            let projection = value.get("projection_dim").cloned();
            value = v;
            if let (Some(map), Some(p)) = (value.as_object_mut(), projection) {
                map.entry("projection_dim").or_insert(p);
            }
        }
        let j: ConfigJson = crate::config::from_value_with_nulls(value, &[], path)?;
        let activation = match j.hidden_act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => return Err(Error::config(path, format!("hidden_act `{other}`"))),
        };
        check_range(path, "patch_size", j.patch_size, 1, 1024)?;
        check_range(path, "image_size", j.image_size, j.patch_size, 1 << 14)?;
        check_range(
            path,
            "hidden_size",
            j.hidden_size,
            1,
            crate::config::MAX_CHANNELS,
        )?;
        check_range(
            path,
            "num_attention_heads",
            j.num_attention_heads,
            1,
            j.hidden_size,
        )?;
        check_range(path, "num_hidden_layers", j.num_hidden_layers, 1, 256)?;
        check_range(path, "num_channels", j.num_channels, 1, 16)?;
        if !j.hidden_size.is_multiple_of(j.num_attention_heads)
            || !j.image_size.is_multiple_of(j.patch_size)
        {
            return Err(Error::config(
                path,
                "hidden_size must divide into the heads and image_size into patches",
            ));
        }
        Ok(Self {
            image_size: j.image_size,
            patch_size: j.patch_size,
            num_channels: j.num_channels,
            hidden_size: j.hidden_size,
            intermediate_size: j.intermediate_size,
            num_hidden_layers: j.num_hidden_layers,
            num_attention_heads: j.num_attention_heads,
            projection_dim: with_projection.then_some(j.projection_dim),
            layer_norm_eps: j.layer_norm_eps,
            activation,
        })
    }

    fn shape(&self) -> LayerShape {
        LayerShape {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_attention_heads: self.num_attention_heads,
            num_hidden_layers: self.num_hidden_layers,
            layer_norm_eps: self.layer_norm_eps,
            activation: self.activation,
        }
    }
}

/// What the image encoder returns.
#[derive(Debug, Clone)]
pub struct ClipVisionOutput {
    /// The projected, normalised class token `[B, projection_dim]` (with a projection).
    pub image_embeds: Option<Tensor>,
    /// The encoder's input (after `pre_layrnorm`) and every layer's output, `[B, 1 + P, D]`.
    pub hidden_states: Vec<Tensor>,
}

/// transformers' `CLIPVisionModelWithProjection` (or `CLIPVisionModel`).
#[derive(Debug, Clone)]
pub struct ClipVisionModel {
    class_embedding: Tensor,
    patch_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    visual_projection: Option<Linear>,
    pub config: ClipVisionConfig,
}

impl ClipVisionModel {
    /// Builds the model; `vb` paths are the released keys (`vision_model.*`,
    /// `visual_projection`).
    pub fn new(vb: VarBuilder, c: &ClipVisionConfig) -> Result<Self> {
        let vm = vb.pp("vision_model");
        let emb = vm.pp("embeddings");
        let d = c.hidden_size;
        let patches = (c.image_size / c.patch_size).pow(2);
        let shape = c.shape();
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::new(vm.pp("encoder").pp("layers").pp(i), &shape))
            .collect::<Result<Vec<_>>>()?;
        let ln = |name: &str| crate::layers::ops::layer_norm(d, c.layer_norm_eps, vm.pp(name));
        Ok(Self {
            class_embedding: emb.get(d, "class_embedding")?,
            patch_embedding: emb
                .pp("patch_embedding")
                .get((d, c.num_channels, c.patch_size, c.patch_size), "weight")?,
            position_embedding: emb
                .pp("position_embedding")
                .get((patches + 1, d), "weight")?,
            pre_layrnorm: ln("pre_layrnorm")?,
            layers,
            post_layernorm: ln("post_layernorm")?,
            visual_projection: match c.projection_dim {
                Some(p) => Some(linear_no_bias(d, p, vb.pp("visual_projection"))?),
                None => None,
            },
            config: c.clone(),
        })
    }

    /// Loads an image-encoder folder (`config.json` and its safetensors), strictly.
    pub fn load(
        dir: &Path,
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> ModelResult<Self> {
        let cfg = ClipVisionConfig::from_file(&dir.join("config.json"))?;
        // transformers saved `position_ids` buffers in older files.
        let buffer = |k: &str| k.ends_with("position_ids");
        crate::weights::load_folder_strict(
            dir,
            dtype,
            device,
            "a CLIP image encoder",
            buffer,
            |vb| Self::new(vb, &cfg),
        )
    }

    /// `pixel_values`: `[B, C, image_size, image_size]`, normalised as CLIP's image processor
    /// normalises them.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<ClipVisionOutput> {
        let c = &self.config;
        let (b, _, h, w) = pixel_values.dims4()?;
        if h != c.image_size || w != c.image_size {
            return Err(candle_core::Error::Msg(format!(
                "a {h}×{w} image for an image encoder of {0}×{0}",
                c.image_size
            )));
        }
        let dtype = self.patch_embedding.dtype();
        let patches =
            pixel_values
                .to_dtype(dtype)?
                .conv2d(&self.patch_embedding, 0, c.patch_size, 1, 1)?; // [B, D, g, g]
        let patches = patches.flatten_from(2)?.transpose(1, 2)?; // [B, P, D]
        let class = self
            .class_embedding
            .reshape((1, 1, c.hidden_size))?
            .repeat((b, 1, 1))?;
        let x = Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let mut x = self.pre_layrnorm.forward(&x)?;
        let mut hidden_states = vec![x.clone()];
        for layer in &self.layers {
            x = layer.forward(&x, None)?;
            hidden_states.push(x.clone());
        }
        let pooled = self
            .post_layernorm
            .forward(&x.narrow(1, 0, 1)?.squeeze(1)?)?;
        let image_embeds = match &self.visual_projection {
            Some(p) => Some(p.forward(&pooled)?),
            None => None,
        };
        Ok(ClipVisionOutput {
            image_embeds,
            hidden_states,
        })
    }
}
