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

/// A U-Net module named in the original LDM layout with every dot flattened to `_`, as kohya
/// LoRA files trained on original checkpoints name them (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`,
/// `middle_block_0_in_layers_2`), as the diffusers module with its dots flattened too
/// (`down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`); `None` when it names no
/// U-Net module.
pub fn flat_ldm_unet_module(flat: &str, cfg: &UNetConfig) -> Option<String> {
    // The original names' own dotted parts, flattened, and how they read with dots.
    const PARTS: [(&str, &str); 8] = [
        ("in_layers_0", "in_layers.0"),
        ("in_layers_2", "in_layers.2"),
        ("emb_layers_1", "emb_layers.1"),
        ("out_layers_0", "out_layers.0"),
        ("out_layers_3", "out_layers.3"),
        ("skip_connection", "skip_connection"),
        ("op", "op"),
        ("conv", "conv"),
    ];
    const SIMPLE: [(&str, &str); 7] = [
        ("time_embed_0", "time_embed.0"),
        ("time_embed_2", "time_embed.2"),
        ("label_emb_0_0", "label_emb.0.0"),
        ("label_emb_0_2", "label_emb.0.2"),
        ("input_blocks_0_0", "input_blocks.0.0"),
        ("out_0", "out.0"),
        ("out_2", "out.2"),
    ];
    let dotted = if let Some((_, d)) = SIMPLE.iter().find(|(f, _)| *f == flat) {
        d.to_string()
    } else {
        let (block, rest) = ["input_blocks_", "middle_block_", "output_blocks_"]
            .iter()
            .find_map(|b| flat.strip_prefix(b).map(|r| (b.trim_end_matches('_'), r)))?;
        let mut numbers = Vec::new();
        let mut rest = rest;
        let wanted = if block == "middle_block" { 1 } else { 2 };
        while numbers.len() < wanted {
            let (n, r) = rest.split_once('_')?;
            numbers.push(n.parse::<usize>().ok()?);
            rest = r;
        }
        let inner = PARTS
            .iter()
            .find(|(f, _)| *f == rest)
            .map_or(rest.to_string(), |(_, d)| d.to_string());
        let idx = numbers
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(".");
        format!("{block}.{idx}.{inner}")
    };
    let key = unet_key(&format!("{dotted}.weight"), cfg)?;
    Some(key.strip_suffix(".weight")?.replace('.', "_"))
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

/// Where an original (lllyasviel) ControlNet's tensors start: `control_model.` in the 1.0
/// releases, nothing in 1.1's.
pub fn controlnet_prefix(ckpt: &Checkpoint) -> &'static str {
    if ckpt.tensors().contains_key("time_embed.0.weight") {
        ""
    } else {
        "control_model."
    }
}

/// The indices of an original ControlNet's `input_hint_block` convolutions, in order (SiLUs
/// sit between them: 0, 2, 4, …, 14).
pub fn controlnet_hint_convs(ckpt: &Checkpoint) -> Vec<usize> {
    let prefix = format!("{}input_hint_block.", controlnet_prefix(ckpt));
    let mut idx: Vec<usize> = ckpt
        .tensors()
        .keys()
        .filter_map(|k| {
            k.strip_prefix(&prefix)?
                .strip_suffix(".weight")?
                .parse()
                .ok()
        })
        .collect();
    idx.sort_unstable();
    idx.dedup();
    idx
}

/// An original ControlNet's tensors under diffusers' `ControlNetModel` names: its encoder in
/// the LDM U-Net layout, `zero_convs.N.0` (the residuals' 1×1 convolutions), `middle_block_out.0`
/// and `input_hint_block` (the first convolution the embedding's `conv_in`, the last its
/// `conv_out`, those between its `blocks` in order).
pub fn controlnet(ckpt: &Checkpoint, cfg: &UNetConfig) -> Checkpoint {
    let hints = controlnet_hint_convs(ckpt);
    select(ckpt, controlnet_prefix(ckpt), |k, e| {
        let name = if let Some(rest) = k.strip_prefix("zero_convs.") {
            split_index(rest).and_then(|(n, r)| {
                r.strip_prefix("0.")
                    .map(|r| format!("controlnet_down_blocks.{n}.{r}"))
            })
        } else if let Some(r) = k.strip_prefix("middle_block_out.0.") {
            Some(format!("controlnet_mid_block.{r}"))
        } else if let Some(rest) = k.strip_prefix("input_hint_block.") {
            split_index(rest).and_then(|(i, r)| {
                let pos = hints.iter().position(|&h| h == i)?;
                Some(if pos == 0 {
                    format!("controlnet_cond_embedding.conv_in.{r}")
                } else if pos + 1 == hints.len() {
                    format!("controlnet_cond_embedding.conv_out.{r}")
                } else {
                    format!("controlnet_cond_embedding.blocks.{}.{r}", pos - 1)
                })
            })
        } else {
            unet_key(k, cfg)
        };
        name.map(|n| (n, e.clone())).into_iter().collect()
    })
}

#[cfg(test)]
mod lora_name_tests {
    use super::flat_ldm_unet_module;
    use crate::unet::UNetConfig;
    use std::path::PathBuf;

    /// kohya names in the original layout for SD1.5's U-Net, against the diffusers modules the
    /// original-to-diffusers conversion gives them.
    #[test]
    fn original_lora_names_find_sd15_modules() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/configs/sd15/unet/config.json");
        let cfg = UNetConfig::from_file(&path).unwrap();
        for (ldm, diffusers) in [
            (
                "input_blocks_1_1_transformer_blocks_0_attn1_to_q",
                "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            ),
            (
                "input_blocks_4_1_proj_in",
                "down_blocks_1_attentions_0_proj_in",
            ),
            ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
            (
                "input_blocks_5_0_in_layers_2",
                "down_blocks_1_resnets_1_conv1",
            ),
            (
                "input_blocks_4_0_skip_connection",
                "down_blocks_1_resnets_0_conv_shortcut",
            ),
            ("middle_block_1_proj_out", "mid_block_attentions_0_proj_out"),
            (
                "middle_block_2_emb_layers_1",
                "mid_block_resnets_1_time_emb_proj",
            ),
            (
                "output_blocks_3_0_out_layers_3",
                "up_blocks_1_resnets_0_conv2",
            ),
            ("output_blocks_2_1_conv", "up_blocks_0_upsamplers_0_conv"),
            ("output_blocks_5_2_conv", "up_blocks_1_upsamplers_0_conv"),
            (
                "output_blocks_11_1_transformer_blocks_0_ff_net_2",
                "up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2",
            ),
            ("time_embed_0", "time_embedding_linear_1"),
            ("out_2", "conv_out"),
        ] {
            assert_eq!(
                flat_ldm_unet_module(ldm, &cfg).as_deref(),
                Some(diffusers),
                "{ldm}"
            );
        }
        assert_eq!(
            flat_ldm_unet_module("input_blocks_99_1_proj_in", &cfg),
            None
        );
        assert_eq!(flat_ldm_unet_module("nothing", &cfg), None);
    }
}
