//! `CLIPTextConfig`: a serde mirror of transformers' text-encoder `config.json`, validated.

use crate::config::{check_range, MAX_CHANNELS};
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// transformers' `CLIPTextConfig`, field for field (the fields the text tower uses).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipTextConfigJson {
    pub architectures: Option<Vec<String>>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub pad_token_id: Option<i64>,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<i64>,
}

impl Default for ClipTextConfigJson {
    fn default() -> Self {
        Self {
            architectures: None,
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            pad_token_id: Some(1),
            bos_token_id: Some(49406),
            eos_token_id: Some(49407),
        }
    }
}

/// The feed-forward activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// OpenAI CLIP (SD1, SDXL's first encoder).
    QuickGelu,
    /// OpenCLIP (SD2, SDXL's second encoder): exact GELU.
    Gelu,
}

/// Where the pooled output is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolAt {
    /// The first occurrence of this end-of-text id.
    FirstEos(u32),
    /// Legacy configs (`eos_token_id: 2`): the position of the largest id.
    ArgMax,
}

/// A validated text-encoder config.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub activation: Activation,
    pub layer_norm_eps: f64,
    pub pool_at: PoolAt,
    /// `Some(projection_dim)` for `CLIPTextModelWithProjection`.
    pub projection_dim: Option<usize>,
}

impl ClipTextConfig {
    /// Reads and validates `text_encoder/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let json: ClipTextConfigJson = crate::config::read_json(path)?;
        Self::from_json(&json, path)
    }

    /// Validates a parsed config; `path` names it in errors.
    pub fn from_json(j: &ClipTextConfigJson, path: &Path) -> Result<Self> {
        check_range(path, "vocab_size", j.vocab_size, 2, 1 << 24)?;
        check_range(path, "hidden_size", j.hidden_size, 1, MAX_CHANNELS)?;
        check_range(
            path,
            "intermediate_size",
            j.intermediate_size,
            1,
            4 * MAX_CHANNELS,
        )?;
        check_range(path, "num_hidden_layers", j.num_hidden_layers, 1, 256)?;
        check_range(
            path,
            "num_attention_heads",
            j.num_attention_heads,
            1,
            j.hidden_size,
        )?;
        check_range(
            path,
            "max_position_embeddings",
            j.max_position_embeddings,
            2,
            1 << 16,
        )?;
        if !j.hidden_size.is_multiple_of(j.num_attention_heads) {
            return Err(Error::config(
                path,
                "`hidden_size` is not divisible by `num_attention_heads`",
            ));
        }
        let activation = match j.hidden_act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => {
                return Err(Error::config(
                    path,
                    format!("unsupported hidden_act `{other}`"),
                ))
            }
        };
        // transformers: eos_token_id == 2 marks configs written before the fix; pool at argmax.
        let pool_at = match j.eos_token_id {
            Some(2) | None => PoolAt::ArgMax,
            Some(id) if id >= 0 && (id as usize) < j.vocab_size => PoolAt::FirstEos(id as u32),
            Some(id) => {
                return Err(Error::config(
                    path,
                    format!("eos_token_id {id} outside the vocabulary"),
                ))
            }
        };
        let with_projection = j
            .architectures
            .as_ref()
            .is_some_and(|a| a.iter().any(|s| s == "CLIPTextModelWithProjection"));
        if with_projection {
            check_range(path, "projection_dim", j.projection_dim, 1, MAX_CHANNELS)?;
        }
        Ok(Self {
            vocab_size: j.vocab_size,
            hidden_size: j.hidden_size,
            intermediate_size: j.intermediate_size,
            num_hidden_layers: j.num_hidden_layers,
            num_attention_heads: j.num_attention_heads,
            max_position_embeddings: j.max_position_embeddings,
            activation,
            layer_norm_eps: j.layer_norm_eps,
            pool_at,
            projection_dim: with_projection.then_some(j.projection_dim),
        })
    }
}
