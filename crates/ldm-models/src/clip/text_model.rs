//! The CLIP text transformer (Radford et al. 2021, §2.4; transformers' `CLIPTextModel` and
//! `CLIPTextModelWithProjection`): token + position embeddings, pre-norm causal self-attention
//! layers, a final LayerNorm, the pooled output at the end-of-text token, and an optional
//! projection. Every layer's hidden state is returned for clip skip and SDXL's penultimate layer.

use super::config::{Activation, ClipTextConfig, PoolAt};
use crate::layers::attention::{causal_mask, merge_heads, scaled_dot_product, split_heads};
use crate::layers::linear::{linear_normal, Linear};
use crate::layers::ops::LayerNorm;
use crate::layers::{gelu, quick_gelu};
use candle_core::{DType, Result, Tensor};
use candle_nn::{Embedding, Module, VarBuilder};

/// The widths of a CLIP transformer's layers, shared by the text and the vision towers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerShape {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub layer_norm_eps: f64,
    pub activation: Activation,
}

impl From<&ClipTextConfig> for LayerShape {
    fn from(c: &ClipTextConfig) -> Self {
        Self {
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_attention_heads: c.num_attention_heads,
            num_hidden_layers: c.num_hidden_layers,
            layer_norm_eps: c.layer_norm_eps,
            activation: c.activation,
        }
    }
}

#[derive(Debug, Clone)]
struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    scale: f64,
}

/// transformers' CLIP initialisation (`CLIPPreTrainedModel._init_weights` with
/// `initializer_range` 0.02 and `initializer_factor` 1), used when a model is trained from
/// scratch: small embeddings (N(0, 0.02²)) that the optimiser reshapes within a few hundred
/// steps, projections scaled by width and depth. candle's defaults (N(0, 1) embeddings) leave a
/// freshly trained encoder close to its random start: its words stay barely distinguishable
/// after thousands of steps.
struct ClipInit {
    embedding: f64,
    /// q, k, v and the second MLP layer: `d^-½ (2 layers)^-½`.
    in_proj: f64,
    /// The attention output and the text projection: `d^-½`.
    out_proj: f64,
    /// The first MLP layer: `(2d)^-½`.
    fc: f64,
}

impl ClipInit {
    fn new(c: &LayerShape) -> Self {
        let d = c.hidden_size as f64;
        let layers = c.num_hidden_layers.max(1) as f64;
        Self {
            embedding: 0.02,
            in_proj: d.powf(-0.5) * (2.0 * layers).powf(-0.5),
            out_proj: d.powf(-0.5),
            fc: (2.0 * d).powf(-0.5),
        }
    }
}

impl SelfAttention {
    fn new(vb: VarBuilder, c: &LayerShape) -> Result<Self> {
        let d = c.hidden_size;
        let init = ClipInit::new(c);
        Ok(Self {
            q_proj: linear_normal(d, d, init.in_proj, vb.pp("q_proj"))?,
            k_proj: linear_normal(d, d, init.in_proj, vb.pp("k_proj"))?,
            v_proj: linear_normal(d, d, init.in_proj, vb.pp("v_proj"))?,
            out_proj: linear_normal(d, d, init.out_proj, vb.pp("out_proj"))?,
            heads: c.num_attention_heads,
            scale: 1.0 / ((d / c.num_attention_heads) as f64).sqrt(),
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let q = split_heads(&self.q_proj.forward(x)?, self.heads)?;
        let k = split_heads(&self.k_proj.forward(x)?, self.heads)?;
        let v = split_heads(&self.v_proj.forward(x)?, self.heads)?;
        let out = scaled_dot_product(&q, &k, &v, self.scale, mask)?;
        self.out_proj.forward(&merge_heads(&out)?)
    }
}

/// A pre-norm transformer layer: self-attention (causal for text, open for images), then the
/// MLP, each added to its input.
#[derive(Debug, Clone)]
pub(crate) struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: SelfAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl EncoderLayer {
    pub(crate) fn new(vb: VarBuilder, c: &LayerShape) -> Result<Self> {
        let d = c.hidden_size;
        let init = ClipInit::new(c);
        Ok(Self {
            layer_norm1: crate::layers::ops::layer_norm(d, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: SelfAttention::new(vb.pp("self_attn"), c)?,
            layer_norm2: crate::layers::ops::layer_norm(d, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear_normal(d, c.intermediate_size, init.fc, vb.pp("mlp").pp("fc1"))?,
            fc2: linear_normal(c.intermediate_size, d, init.in_proj, vb.pp("mlp").pp("fc2"))?,
            activation: c.activation,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let x = (self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?
            + x)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let h = match self.activation {
            Activation::QuickGelu => quick_gelu(&h)?,
            Activation::Gelu => gelu(&h)?,
        };
        self.fc2.forward(&h)? + x
    }
}

/// What the text encoder returns.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// Final LayerNorm applied to the last layer: `[B, L, D]`.
    pub last_hidden_state: Tensor,
    /// The embeddings, then each layer's output (before the final norm): `layers + 1` tensors.
    pub hidden_states: Vec<Tensor>,
    /// `last_hidden_state` at the end-of-text token: `[B, D]`.
    pub pooled: Tensor,
    /// The projected pooled output `[B, P]` (`CLIPTextModelWithProjection` only).
    pub text_embeds: Option<Tensor>,
}

impl ClipTextOutput {
    /// The hidden state `skip` layers before the last (0 = last layer, before the final norm).
    pub fn from_end(&self, skip: usize) -> Option<&Tensor> {
        self.hidden_states
            .len()
            .checked_sub(1 + skip)
            .map(|i| &self.hidden_states[i])
    }
}

/// `CLIPTextModel` (tower under `text_model.`) with `text_projection` when configured.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    pub config: ClipTextConfig,
}

impl ClipTextModel {
    /// Builds the model; `vb` paths are the released keys (`text_model.*`, `text_projection`).
    pub fn new(vb: VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        let c = config;
        let shape = LayerShape::from(c);
        let tm = vb.pp("text_model");
        let emb = tm.pp("embeddings");
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::new(tm.pp("encoder").pp("layers").pp(i), &shape))
            .collect::<Result<Vec<_>>>()?;
        let init = ClipInit::new(&shape);
        let normal = |stdev: f64| candle_nn::Init::Randn { mean: 0.0, stdev };
        let text_projection = match c.projection_dim {
            Some(p) => Some(Linear::new(
                vb.pp("text_projection").get_with_hints(
                    (p, c.hidden_size),
                    "weight",
                    normal(init.out_proj),
                )?,
                None,
            )?),
            None => None,
        };
        let embedding = |rows: usize, vb: VarBuilder| -> Result<Embedding> {
            let w = vb.get_with_hints((rows, c.hidden_size), "weight", normal(init.embedding))?;
            Ok(Embedding::new(w, c.hidden_size))
        };
        Ok(Self {
            token_embedding: embedding(c.vocab_size, emb.pp("token_embedding"))?,
            position_embedding: embedding(c.max_position_embeddings, emb.pp("position_embedding"))?,
            layers,
            final_layer_norm: crate::layers::ops::layer_norm(
                c.hidden_size,
                c.layer_norm_eps,
                tm.pp("final_layer_norm"),
            )?,
            text_projection,
            config: config.clone(),
        })
    }

    /// Appends rows to the token-embedding table (textual inversion, as transformers'
    /// `resize_token_embeddings` then setting the rows); returns the first new id. `vectors`:
    /// `[n, hidden]`.
    pub fn add_token_embeddings(&mut self, vectors: &Tensor) -> Result<u32> {
        let (_, width) = vectors.dims2()?;
        if width != self.config.hidden_size {
            return Err(candle_core::Error::Msg(format!(
                "an embedding of width {width} does not fit a text encoder of width {}",
                self.config.hidden_size
            )));
        }
        let table = self.token_embedding.embeddings();
        let rows = vectors.to_dtype(table.dtype())?.to_device(table.device())?;
        let first = table.dim(0)? as u32;
        let grown = Tensor::cat(&[table, &rows], 0)?;
        self.config.vocab_size = grown.dim(0)?;
        self.token_embedding = Embedding::new(grown, self.config.hidden_size);
        Ok(first)
    }

    /// The token-embedding rows from id `first` on (those textual inversion added past a
    /// checkpoint's vocabulary), if any.
    pub fn token_embeddings_from(&self, first: usize) -> Result<Option<Tensor>> {
        let table = self.token_embedding.embeddings();
        let rows = table.dim(0)?;
        (rows > first)
            .then(|| table.narrow(0, first, rows - first))
            .transpose()
    }

    /// Applies the final layer norm (for clip skip on an earlier layer's hidden state).
    pub fn final_layer_norm(&self, hidden: &Tensor) -> Result<Tensor> {
        self.final_layer_norm.forward(hidden)
    }

    /// `input_ids`: `[B, L]` token ids (any integer dtype), `L ≤ max_position_embeddings`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        let (b, len) = input_ids.dims2()?;
        if len > self.config.max_position_embeddings {
            return Err(candle_core::Error::Msg(format!(
                "{len} tokens exceed the text encoder's {} positions",
                self.config.max_position_embeddings
            )));
        }
        let ids = input_ids.to_dtype(DType::U32)?;
        let id_rows = ids.to_vec2::<u32>()?;
        if let Some(bad) = id_rows
            .iter()
            .flatten()
            .find(|&&id| id as usize >= self.config.vocab_size)
        {
            return Err(candle_core::Error::Msg(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let device = input_ids.device();
        let positions = Tensor::arange(0u32, len as u32, device)?;
        let mut x = crate::layers::compute_param(self.token_embedding.forward(&ids)?)?
            .broadcast_add(&crate::layers::compute_param(
                self.position_embedding.forward(&positions)?,
            )?)?;
        let mask = causal_mask(len, device)?;
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        hidden_states.push(x.clone());
        for layer in &self.layers {
            x = layer.forward(&x, Some(&mask))?;
            hidden_states.push(x.clone());
        }
        let last_hidden_state = self.final_layer_norm.forward(&x)?;
        let pool_index: Vec<u32> = id_rows
            .iter()
            .enumerate()
            .map(|(row, ids)| {
                row as u32 * len as u32 + pool_position(ids, self.config.pool_at) as u32
            })
            .collect();
        let pool_index = Tensor::from_vec(pool_index, b, device)?;
        let pooled = last_hidden_state
            .reshape((b * len, ()))?
            .index_select(&pool_index, 0)?; // [B, D]
        let text_embeds = match &self.text_projection {
            Some(p) => Some(p.forward(&pooled)?),
            None => None,
        };
        Ok(ClipTextOutput {
            last_hidden_state,
            hidden_states,
            pooled,
            text_embeds,
        })
    }
}

/// The position whose hidden state is pooled: the first end-of-text id, or (legacy configs) the
/// first position of the largest id — what `torch.argmax` returns. Falls back to the last token.
fn pool_position(ids: &[u32], pool_at: PoolAt) -> usize {
    match pool_at {
        PoolAt::FirstEos(eos) => ids.iter().position(|&i| i == eos).unwrap_or(ids.len() - 1),
        PoolAt::ArgMax => {
            let mut best = 0;
            for (i, &id) in ids.iter().enumerate() {
                if id > ids[best] {
                    best = i;
                }
            }
            best
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_positions() {
        assert_eq!(pool_position(&[5, 1, 9, 7, 9], PoolAt::FirstEos(9)), 2);
        assert_eq!(pool_position(&[5, 1, 3], PoolAt::FirstEos(9)), 2);
        assert_eq!(pool_position(&[5, 11, 3, 11], PoolAt::ArgMax), 1);
    }
}
