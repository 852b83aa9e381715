//! Single-file checkpoints in the original CompVis / Stability layout (`model.diffusion_model.*`,
//! `first_stage_model.*`, `cond_stage_model.*`, `conditioner.embedders.*`): the family from the
//! keys, and each component's tensors renamed — and where needed resliced, reshaped or
//! transposed, without copying — to the diffusers keys our constructors ask for. This is the
//! inverse of diffusers' `convert_diffusers_to_original_stable_diffusion.py` / `…_sdxl.py`.

use super::{Checkpoint, TensorEntry};
use crate::unet::{BlockKind, UNetConfig};
use crate::vae::VaeConfig;
use std::collections::BTreeMap;

/// Which model a single file holds, from its text-encoder keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginalFamily {
    /// `cond_stage_model.transformer.*` (OpenAI CLIP).
    Sd1,
    /// `cond_stage_model.model.*` (OpenCLIP ViT-H).
    Sd2,
    /// `conditioner.embedders.0.transformer.*` + `conditioner.embedders.1.model.*`.
    Sdxl,
    /// `conditioner.embedders.0.model.*` only.
    SdxlRefiner,
}

const UNET: &str = "model.diffusion_model.";

/// Detects the family; `None` when the keys are not an original-layout SD checkpoint.
pub fn detect(ckpt: &Checkpoint) -> Option<OriginalFamily> {
    let has = |prefix: &str| ckpt.tensors().keys().any(|k| k.starts_with(prefix));
    if !has(UNET) {
        return None;
    }
    if has("conditioner.embedders.1.model.") {
        Some(OriginalFamily::Sdxl)
    } else if has("conditioner.embedders.0.model.") {
        Some(OriginalFamily::SdxlRefiner)
    } else if has("cond_stage_model.model.") {
        Some(OriginalFamily::Sd2)
    } else if has("cond_stage_model.transformer.") {
        Some(OriginalFamily::Sd1)
    } else {
        None
    }
}

/// The U-Net's input channels from `input_blocks.0.0.weight` (9 for inpainting models).
pub fn unet_in_channels(ckpt: &Checkpoint) -> Option<usize> {
    ckpt.tensors()
        .get("model.diffusion_model.input_blocks.0.0.weight")
        .and_then(|e| e.shape.get(1).copied())
}

fn resnet_part(rest: &str) -> String {
    const MAP: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    for (from, to) in MAP {
        if let Some(r) = rest.strip_prefix(from) {
            return format!("{to}{r}");
        }
    }
    rest.to_string()
}

fn split_index(s: &str) -> Option<(usize, &str)> {
    let (i, rest) = s.split_once('.')?;
    Some((i.parse().ok()?, rest))
}

/// Maps one original U-Net key (without `model.diffusion_model.`) to diffusers.
fn unet_key(key: &str, cfg: &UNetConfig) -> Option<String> {
    let simple = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ];
    for (from, to) in simple {
        if let Some(r) = key.strip_prefix(from) {
            return Some(format!("{to}{r}"));
        }
    }
    let levels = cfg.block_out_channels.len();
    if let Some(rest) = key.strip_prefix("input_blocks.") {
        let (k, rest) = split_index(rest)?;
        let (m, rest) = split_index(rest)?;
        // input_blocks[1..] walk the levels: `layers` ResNets (+ attention), then a downsampler.
        let mut idx = 1;
        for level in 0..levels {
            for j in 0..cfg.layers_per_block[level] {
                if idx == k {
                    return Some(match m {
                        0 => format!("down_blocks.{level}.resnets.{j}.{}", resnet_part(rest)),
                        _ => format!("down_blocks.{level}.attentions.{j}.{rest}"),
                    });
                }
                idx += 1;
            }
            if level + 1 < levels {
                if idx == k {
                    let r = rest.strip_prefix("op.")?;
                    return Some(format!("down_blocks.{level}.downsamplers.0.conv.{r}"));
                }
                idx += 1;
            }
        }
        return None;
    }
    if let Some(rest) = key.strip_prefix("middle_block.") {
        let (m, rest) = split_index(rest)?;
        return Some(match m {
            0 => format!("mid_block.resnets.0.{}", resnet_part(rest)),
            1 => format!("mid_block.attentions.0.{rest}"),
            2 => format!("mid_block.resnets.1.{}", resnet_part(rest)),
            _ => return None,
        });
    }
    if let Some(rest) = key.strip_prefix("output_blocks.") {
        let (k, rest) = split_index(rest)?;
        let (m, rest) = split_index(rest)?;
        let rev_layers: Vec<usize> = cfg.layers_per_block.iter().rev().copied().collect();
        let mut idx = 0;
        for (level, kind) in cfg.up_blocks.iter().enumerate() {
            let layers = rev_layers[level] + 1;
            for j in 0..layers {
                if idx == k {
                    let attention = *kind == BlockKind::CrossAttn;
                    return match (m, attention) {
                        (0, _) => Some(format!(
                            "up_blocks.{level}.resnets.{j}.{}",
                            resnet_part(rest)
                        )),
                        (1, true) => Some(format!("up_blocks.{level}.attentions.{j}.{rest}")),
                        // The upsampler follows the last ResNet (and its attention).
                        (_, _) => {
                            let r = rest.strip_prefix("conv.")?;
                            (j + 1 == layers && level + 1 < levels)
                                .then(|| format!("up_blocks.{level}.upsamplers.0.conv.{r}"))
                        }
                    };
                }
                idx += 1;
            }
        }
    }
    None
}

fn vae_part(rest: &str) -> String {
    const MAP: [(&str, &str); 6] = [
        ("nin_shortcut.", "conv_shortcut."),
        ("norm.", "group_norm."),
        ("q.", "to_q."),
        ("k.", "to_k."),
        ("v.", "to_v."),
        ("proj_out.", "to_out.0."),
    ];
    for (from, to) in MAP {
        if let Some(r) = rest.strip_prefix(from) {
            return format!("{to}{r}");
        }
    }
    rest.to_string()
}

/// Maps one original VAE key (without `first_stage_model.`) to diffusers.
fn vae_key(key: &str, cfg: &VaeConfig) -> Option<String> {
    let n = cfg.block_out_channels.len();
    let (side, rest) = key.split_once('.')?;
    if !matches!(side, "encoder" | "decoder") {
        return match side {
            "quant_conv" | "post_quant_conv" => Some(key.to_string()),
            _ => None,
        };
    }
    let mapped = if let Some(r) = rest.strip_prefix("mid.block_1.") {
        format!("mid_block.resnets.0.{r}")
    } else if let Some(r) = rest.strip_prefix("mid.block_2.") {
        format!("mid_block.resnets.1.{r}")
    } else if let Some(r) = rest.strip_prefix("mid.attn_1.") {
        format!("mid_block.attentions.0.{}", vae_part(r))
    } else if let Some(r) = rest.strip_prefix("norm_out.") {
        format!("conv_norm_out.{r}")
    } else if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        rest.to_string()
    } else if let Some(r) = rest.strip_prefix("down.") {
        let (i, r) = split_index(r)?;
        if let Some(r) = r.strip_prefix("block.") {
            let (j, r) = split_index(r)?;
            format!("down_blocks.{i}.resnets.{j}.{}", vae_part(r))
        } else {
            format!(
                "down_blocks.{i}.downsamplers.0.conv.{}",
                r.strip_prefix("downsample.conv.")?
            )
        }
    } else if let Some(r) = rest.strip_prefix("up.") {
        // The original decoder numbers its levels from the bottom.
        let (i, r) = split_index(r)?;
        let level = n.checked_sub(1 + i)?;
        if let Some(r) = r.strip_prefix("block.") {
            let (j, r) = split_index(r)?;
            format!("up_blocks.{level}.resnets.{j}.{}", vae_part(r))
        } else {
            format!(
                "up_blocks.{level}.upsamplers.0.conv.{}",
                r.strip_prefix("upsample.conv.")?
            )
        }
    } else {
        return None;
    };
    Some(format!("{side}.{mapped}"))
}

/// Renames every tensor under `prefix` with `map`, keeping the files mapped.
fn select(
    ckpt: &Checkpoint,
    prefix: &str,
    map: impl Fn(&str, &TensorEntry) -> Vec<(String, TensorEntry)>,
) -> Checkpoint {
    let mut out = BTreeMap::new();
    for (key, entry) in ckpt.tensors() {
        if let Some(rest) = key.strip_prefix(prefix) {
            for (k, e) in map(rest, entry) {
                out.insert(k, e);
            }
        }
    }
    ckpt.with_tensors(out)
}

/// The U-Net's tensors under diffusers names.
pub fn unet(ckpt: &Checkpoint, cfg: &UNetConfig) -> Checkpoint {
    select(ckpt, UNET, |k, e| {
        unet_key(k, cfg)
            .map(|n| (n, e.clone()))
            .into_iter()
            .collect()
    })
}

/// The autoencoder's tensors under `prefix` (`first_stage_model.` in a whole checkpoint, empty
/// in a separate VAE file) under diffusers names (attention 1×1 convolutions as matrices).
pub fn vae(ckpt: &Checkpoint, cfg: &VaeConfig, prefix: &str) -> Checkpoint {
    select(ckpt, prefix, |k, e| {
        let Some(name) = vae_key(k, cfg) else {
            return vec![];
        };
        let e = match e.shape.as_slice() {
            [a, b, 1, 1] if name.contains(".attentions.") => {
                e.reshaped(vec![*a, *b]).unwrap_or_else(|| e.clone())
            }
            _ => e.clone(),
        };
        vec![(name, e)]
    })
}

/// An OpenAI-CLIP tower stored in transformers' layout under `prefix` (`…transformer.`).
pub fn hf_clip(ckpt: &Checkpoint, prefix: &str) -> Checkpoint {
    select(ckpt, prefix, |k, e| vec![(k.to_string(), e.clone())])
}

/// An OpenCLIP text tower under `prefix` (`cond_stage_model.model.`), as transformers'
/// `CLIPTextModel(WithProjection)`: the fused `in_proj` split into q, k, v by rows, the
/// projection matrix transposed into a Linear weight.
pub fn open_clip(ckpt: &Checkpoint, prefix: &str, with_projection: bool) -> Checkpoint {
    select(ckpt, prefix, |k, e| {
        let tm = "text_model.";
        let simple = match k {
            "token_embedding.weight" => Some(format!("{tm}embeddings.token_embedding.weight")),
            "positional_embedding" => Some(format!("{tm}embeddings.position_embedding.weight")),
            "ln_final.weight" => Some(format!("{tm}final_layer_norm.weight")),
            "ln_final.bias" => Some(format!("{tm}final_layer_norm.bias")),
            _ => None,
        };
        if let Some(name) = simple {
            return vec![(name, e.clone())];
        }
        if k == "text_projection" && with_projection {
            return e
                .transposed()
                .map(|t| ("text_projection.weight".to_string(), t))
                .into_iter()
                .collect();
        }
        let Some(rest) = k.strip_prefix("transformer.resblocks.") else {
            return vec![];
        };
        let Some((i, rest)) = split_index(rest) else {
            return vec![];
        };
        let layer = format!("{tm}encoder.layers.{i}.");
        let map = [
            ("ln_1.", "layer_norm1."),
            ("ln_2.", "layer_norm2."),
            ("attn.out_proj.", "self_attn.out_proj."),
            ("mlp.c_fc.", "mlp.fc1."),
            ("mlp.c_proj.", "mlp.fc2."),
        ];
        for (from, to) in map {
            if let Some(r) = rest.strip_prefix(from) {
                return vec![(format!("{layer}{to}{r}"), e.clone())];
            }
        }
        let kind = match rest {
            "attn.in_proj_weight" => "weight",
            "attn.in_proj_bias" => "bias",
            _ => return vec![],
        };
        let d = e.shape[0] / 3;
        ["q_proj", "k_proj", "v_proj"]
            .iter()
            .enumerate()
            .filter_map(|(n, p)| {
                e.rows(n * d, d)
                    .map(|r| (format!("{layer}self_attn.{p}.{kind}"), r))
            })
            .collect()
    })
}

/// The text encoders of a family: `(component name, tensors)`.
pub fn text_encoders(ckpt: &Checkpoint, family: OriginalFamily) -> Vec<(&'static str, Checkpoint)> {
    match family {
        OriginalFamily::Sd1 => vec![(
            "text_encoder",
            hf_clip(ckpt, "cond_stage_model.transformer."),
        )],
        // SD2's OpenCLIP carries a projection its text encoder (CLIPTextModel) does not use.
        OriginalFamily::Sd2 => vec![(
            "text_encoder",
            open_clip(ckpt, "cond_stage_model.model.", false),
        )],
        OriginalFamily::Sdxl => vec![
            (
                "text_encoder",
                hf_clip(ckpt, "conditioner.embedders.0.transformer."),
            ),
            (
                "text_encoder_2",
                open_clip(ckpt, "conditioner.embedders.1.model.", true),
            ),
        ],
        OriginalFamily::SdxlRefiner => vec![(
            "text_encoder_2",
            open_clip(ckpt, "conditioner.embedders.0.model.", true),
        )],
    }
}
