//! Prompt encoding, as diffusers' pipelines do it: SD1/SD2 condition on the text encoder's last
//! hidden state; SDXL concatenates the penultimate hidden states of both encoders and takes the
//! pooled, projected output of the second.

use crate::components::Components;
use crate::Result;
use candle_core::{DType, Tensor};

/// Encoded text for one prompt: `[1, 77, D]`, and SDXL's pooled embedding `[1, P]`.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    pub context: Tensor,
    pub pooled: Option<Tensor>,
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
        })
    }
}

/// Encodes `text`; `clip_skip` counts layers from the end (diffusers' `clip_skip`, None = off).
pub fn encode(
    components: &Components,
    text: &str,
    clip_skip: Option<usize>,
) -> Result<PromptEmbeds> {
    let device = &components.device;
    let sdxl = components.text_encoders.len() == 2 || components.unet.config.text_time.is_some();
    let mut contexts = Vec::new();
    let mut pooled = None;
    for (tokenizer, encoder) in &components.text_encoders {
        let ids = tokenizer.encode(text)?;
        let ids = Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?; // [1, 77]
        let out = encoder.forward(&ids)?;
        let hidden = if sdxl {
            // diffusers SDXL: hidden_states[-(clip_skip + 2)], i.e. the penultimate by default.
            out.from_end(1 + clip_skip.unwrap_or(0)).cloned()
        } else {
            match clip_skip {
                // diffusers SD: hidden_states[-(clip_skip + 1)] through the final layer norm.
                Some(skip) if skip > 0 => match out.from_end(skip) {
                    Some(h) => Some(encoder_final_norm(encoder, h)?),
                    None => None,
                },
                _ => Some(out.last_hidden_state.clone()),
            }
        };
        let hidden = hidden.ok_or_else(|| {
            crate::Error::InvalidRequest(format!(
                "clip skip {clip_skip:?} exceeds the text encoder's layers"
            ))
        })?;
        contexts.push(hidden.to_dtype(DType::F32)?);
        if let Some(te) = out.text_embeds {
            pooled = Some(te.to_dtype(DType::F32)?);
        }
    }
    let context = Tensor::cat(&contexts, 2)?;
    Ok(PromptEmbeds { context, pooled })
}

fn encoder_final_norm(encoder: &ldm_models::clip::ClipTextModel, h: &Tensor) -> Result<Tensor> {
    Ok(encoder.final_layer_norm(h)?)
}
