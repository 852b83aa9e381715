//! Prompt encoding. The text is parsed with A1111's syntax (weights, `BREAK`), tokenized into
//! chunks of 75 tokens (A1111's and ComfyUI's way past CLIP's 77-token window; a model with a
//! shorter window, such as the embedded Shapes model's 32, gets chunks of window − 2), and each chunk
//! is encoded as diffusers' pipelines do: SD1/SD2 take the text encoder's last hidden state
//! (or an earlier layer with clip skip); SDXL concatenates the penultimate hidden states of both
//! encoders and takes the second encoder's pooled, projected output (from the first chunk).
//! Weighted tokens scale their hidden states, then the chunk is renormalised to its original
//! mean (A1111's emphasis). A plain prompt of at most 75 tokens encodes exactly as diffusers.

use crate::components::Components;
use crate::prompt_syntax::{parse, Piece};
use crate::Result;
use candle_core::{DType, Tensor};
use ldm_models::clip::{ClipTextModel, ClipTokenizer};

/// A1111's `comma_padding_backtrack`: a full chunk moves its words after the last comma (if
/// within this many tokens) to the next chunk.
const COMMA_BACKTRACK: usize = 20;

/// Encoded text: `[1, window·chunks, D]` (the window is 77 for every SD model), and SDXL's
/// pooled embedding `[1, P]`.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    pub context: Tensor,
    pub pooled: Option<Tensor>,
    /// Tokens per chunk, start and end tokens included.
    pub window: usize,
}

impl PromptEmbeds {
    /// All-zero embeddings of the same shapes (SDXL's `force_zeros_for_empty_prompt`).
    pub fn zeros_like(&self) -> Result<Self> {
        Ok(Self {
            context: self.context.zeros_like()?,
            pooled: match &self.pooled {
                Some(p) => Some(p.zeros_like()?),
                None => None,
            },
            window: self.window,
        })
    }

    /// Number of chunks.
    pub fn chunks(&self) -> Result<usize> {
        Ok(self.context.dim(1)? / self.window)
    }
}

/// One chunk: `window` ids with their weights.
struct Chunk {
    ids: Vec<u32>,
    weights: Vec<f64>,
}

/// A1111's `tokenize_line`: weighted pieces → chunks of `[start] window − 2 tokens [end]`.
fn chunk_tokens(tokenizer: &ClipTokenizer, pieces: &[Piece], window: usize) -> Result<Vec<Chunk>> {
    let chunk = window - 2;
    let comma = tokenizer.encode_raw(",")?.first().copied();
    let mut chunks = Vec::new();
    let (mut ids, mut weights): (Vec<u32>, Vec<f64>) = (Vec::new(), Vec::new());
    let mut last_comma: Option<usize> = None;
    let close = |ids: &mut Vec<u32>, weights: &mut Vec<f64>, chunks: &mut Vec<Chunk>| {
        let mut full = vec![tokenizer.bos_id];
        full.append(ids);
        full.push(tokenizer.eos_id);
        full.resize(window, tokenizer.pad_id);
        let mut w = vec![1.0];
        w.append(weights);
        w.resize(window, 1.0);
        chunks.push(Chunk {
            ids: full,
            weights: w,
        });
    };
    for piece in pieces {
        let (text, weight) = match piece {
            Piece::Break => {
                close(&mut ids, &mut weights, &mut chunks);
                last_comma = None;
                continue;
            }
            Piece::Text(t, w) => (t, *w),
        };
        for id in tokenizer.encode_raw(text)? {
            if Some(id) == comma {
                last_comma = Some(ids.len());
            } else if ids.len() == chunk {
                if let Some(at) = last_comma.filter(|&at| ids.len() - at <= COMMA_BACKTRACK) {
                    let (moved_ids, moved_w) = (ids.split_off(at + 1), weights.split_off(at + 1));
                    close(&mut ids, &mut weights, &mut chunks);
                    ids = moved_ids;
                    weights = moved_w;
                    last_comma = None;
                }
            }
            if ids.len() == chunk {
                close(&mut ids, &mut weights, &mut chunks);
                last_comma = None;
            }
            ids.push(id);
            weights.push(weight);
        }
    }
    if !ids.is_empty() || chunks.is_empty() {
        close(&mut ids, &mut weights, &mut chunks);
    }
    Ok(chunks)
}

/// One encoder's hidden states for one chunk, weighted: `[1, window, D]` (and the projection).
fn encode_chunk(
    encoder: &ClipTextModel,
    chunk: &Chunk,
    sdxl: bool,
    clip_skip: Option<usize>,
    device: &candle_core::Device,
) -> Result<(Tensor, Option<Tensor>)> {
    let ids = Tensor::new(chunk.ids.as_slice(), device)?.unsqueeze(0)?;
    let out = encoder.forward(&ids)?;
    let hidden = if sdxl {
        // diffusers SDXL: hidden_states[-(clip_skip + 2)], the penultimate by default.
        out.from_end(1 + clip_skip.unwrap_or(0)).cloned()
    } else {
        match clip_skip {
            // diffusers SD: hidden_states[-(clip_skip + 1)] through the final layer norm.
            Some(skip) if skip > 0 => match out.from_end(skip) {
                Some(h) => Some(encoder.final_layer_norm(h)?),
                None => None,
            },
            _ => Some(out.last_hidden_state.clone()),
        }
    };
    let hidden = hidden
        .ok_or_else(|| {
            crate::Error::InvalidRequest(format!(
                "clip skip {clip_skip:?} exceeds the text encoder's layers"
            ))
        })?
        .to_dtype(DType::F32)?;
    let hidden = if chunk.weights.iter().any(|&w| w != 1.0) {
        let w: Vec<f32> = chunk.weights.iter().map(|&w| w as f32).collect();
        let w = Tensor::from_vec(w, (1, chunk.weights.len(), 1), device)?;
        let original_mean = hidden.mean_all()?;
        let weighted = hidden.broadcast_mul(&w)?;
        let new_mean = weighted.mean_all()?;
        weighted.broadcast_mul(&(original_mean / new_mean)?)?
    } else {
        hidden
    };
    let pooled = match out.text_embeds {
        Some(te) => Some(te.to_dtype(DType::F32)?),
        None => None,
    };
    Ok((hidden, pooled))
}

/// Encodes `text`; `clip_skip` counts layers from the end (diffusers' `clip_skip`).
pub fn encode(
    components: &Components,
    text: &str,
    clip_skip: Option<usize>,
) -> Result<PromptEmbeds> {
    let device = &components.device;
    let sdxl = components.text_encoders.len() == 2 || components.unet.config.text_time.is_some();
    let pieces = parse(text);
    let mut per_encoder: Vec<Vec<Tensor>> = Vec::new();
    let mut pooled = None;
    let windows: Vec<usize> = components
        .text_encoders
        .iter()
        .map(|(t, e)| t.max_length.min(e.config.max_position_embeddings))
        .collect();
    let window = windows.first().copied().unwrap_or(77);
    if windows.iter().any(|&w| w != window) || window < 3 {
        return Err(crate::Error::InvalidRequest(format!(
            "the text encoders' context windows {windows:?} differ or are too short"
        )));
    }
    for (tokenizer, encoder) in &components.text_encoders {
        let chunks = chunk_tokens(tokenizer, &pieces, window)?;
        let mut hidden = Vec::with_capacity(chunks.len());
        for (i, chunk) in chunks.iter().enumerate() {
            let (h, p) = encode_chunk(encoder, chunk, sdxl, clip_skip, device)?;
            hidden.push(h);
            if i == 0 && p.is_some() {
                pooled = p;
            }
        }
        per_encoder.push(hidden);
    }
    let n = per_encoder.iter().map(Vec::len).min().unwrap_or(0);
    let chunks: Vec<Tensor> = (0..n)
        .map(|i| Tensor::cat(&per_encoder.iter().map(|h| &h[i]).collect::<Vec<_>>(), 2))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(PromptEmbeds {
        context: Tensor::cat(&chunks, 1)?,
        pooled,
        window,
    })
}

/// Makes two encodings the same length by appending empty-prompt chunks to the shorter
/// (A1111 pads the unconditional side the same way).
pub fn equalize(
    components: &Components,
    a: &mut PromptEmbeds,
    b: &mut PromptEmbeds,
    clip_skip: Option<usize>,
) -> Result<()> {
    let (na, nb) = (a.chunks()?, b.chunks()?);
    if na == nb {
        return Ok(());
    }
    let empty = encode(components, "", clip_skip)?.context;
    let (short, missing) = if na < nb { (a, nb - na) } else { (b, na - nb) };
    let mut parts = vec![short.context.clone()];
    parts.extend(std::iter::repeat_n(empty, missing));
    short.context = Tensor::cat(&parts, 1)?;
    Ok(())
}
