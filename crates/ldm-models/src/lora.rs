//! LoRA (Hu et al. 2021) on the U-Net: a layer's weight W becomes `W + m·(α/r)·B·A`, with A
//! (`lora_A`, kohya's `lora_down`) of shape `[r, in]` — `[r, in, kh, kw]` for a convolution,
//! whose low-rank form is a k×k convolution to r channels followed by a 1×1 one — and B
//! (`lora_B`, `lora_up`) of shape `[out, r]` (`[out, r, 1, 1]`), α/r the file's scale (1 when
//! it stores no alpha, as diffusers/PEFT files) and m the user's multiplier.
//!
//! Files in diffusers/PEFT naming (`unet.<module>.lora_A.weight`, `text_encoder.…`,
//! `text_encoder_2.…`, as diffusers' `save_lora_weights` writes and `ldm distill lcm --lora`
//! writes) and in kohya/A1111 naming for diffusers-layout modules
//! (`lora_unet_<module with _>.lora_down.weight`, `lora_te_…` / `lora_te1_…` / `lora_te2_…`,
//! `.alpha`) are read, for the U-Net and every text encoder; a file is applied whole or
//! refused with the keys that map to nothing.

use crate::adapter_math::{Adapter, Dora};
use crate::error::{Error, Result};
use crate::weights::Checkpoint;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// The U-Net layers LCM-LoRA (and most SD LoRA trainers) adapt, as module-path endings.
pub const UNET_TARGETS: &[&str] = &[
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
];

/// Whether the U-Net module `module` (a path such as `down_blocks.0.resnets.1.conv1`) is one
/// of [`UNET_TARGETS`].
pub fn is_unet_target(module: &str) -> bool {
    UNET_TARGETS
        .iter()
        .any(|t| module == *t || module.ends_with(&format!(".{t}")))
}

/// The weight update `scale·B·A` of one layer, shaped as its weight (`[out, in]` or
/// `[out, in, kh, kw]`): [`Adapter::LowRank`]'s update, scaled.
pub fn lora_delta(down: &Tensor, up: &Tensor, scale: f64, weight: &[usize]) -> Result<Tensor> {
    let adapter = Adapter::LowRank {
        down: down.clone(),
        up: up.clone(),
        mid: None,
    };
    Ok((adapter.delta(weight)? * scale)?)
}

/// One adapted layer: its adapter, the file's α (none: α = rank) and DoRA's magnitude.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    pub adapter: Adapter,
    pub alpha: Option<f64>,
    pub dora: Option<Dora>,
}

impl LoraLayer {
    /// α/rank (1 without an α or a rank).
    pub fn scale(&self) -> f64 {
        match (self.alpha, self.adapter.rank()) {
            (Some(a), Some(r)) => a / r as f64,
            _ => 1.0,
        }
    }
}

/// A LoRA file to merge and its multipliers (A1111's `<lora:NAME:TE:UNET>`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub path: std::path::PathBuf,
    pub text_encoder: f64,
    pub unet: f64,
}

impl LoraSpec {
    /// One multiplier for every network.
    pub fn new(path: impl Into<std::path::PathBuf>, multiplier: f64) -> Self {
        Self {
            path: path.into(),
            text_encoder: multiplier,
            unet: multiplier,
        }
    }

    /// The multiplier for `target`.
    pub fn multiplier(&self, target: LoraTarget) -> f64 {
        match target {
            LoraTarget::Unet => self.unet,
            _ => self.text_encoder,
        }
    }
}

/// A network a LoRA file adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LoraTarget {
    Unet,
    /// SD1/SD2's text encoder, SDXL's first (CLIP ViT-L).
    TextEncoder,
    /// SDXL's second text encoder (OpenCLIP ViT-bigG).
    TextEncoder2,
}

impl LoraTarget {
    /// The model folder's component.
    pub fn component(self) -> &'static str {
        match self {
            LoraTarget::Unet => "unet",
            LoraTarget::TextEncoder => "text_encoder",
            LoraTarget::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// Another naming of a network's modules: a flattened module name → the flattened name the
/// network's checkpoint uses.
pub type ModuleNames<'a> = &'a dyn Fn(&str) -> Option<String>;

/// A LoRA file's layers, per network and module path, resolved against the networks'
/// checkpoints.
#[derive(Debug)]
pub struct LoraFile {
    pub layers: BTreeMap<LoraTarget, BTreeMap<String, LoraLayer>>,
}

/// A layer's tensors as they are read, by part, and its α.
type Parts = (BTreeMap<&'static str, Tensor>, Option<f64>);

/// How a key names its network: the diffusers/PEFT prefix (`unet.`, `text_encoder.`,
/// `text_encoder_2.`) and kohya's (`lora_unet_`, `lora_te_` — SD1's — or `lora_te1_`,
/// `lora_te2_`), the one table of naming schemes.
const PREFIXES: [(&str, LoraTarget, bool); 7] = [
    ("unet.", LoraTarget::Unet, false),
    ("text_encoder_2.", LoraTarget::TextEncoder2, false),
    ("text_encoder.", LoraTarget::TextEncoder, false),
    ("lora_unet_", LoraTarget::Unet, true),
    ("lora_te2_", LoraTarget::TextEncoder2, true),
    ("lora_te1_", LoraTarget::TextEncoder, true),
    ("lora_te_", LoraTarget::TextEncoder, true),
];

/// kohya/LyCORIS tensor names after the module, as [`Adapter::from_parts`] reads them.
const KOHYA_PARTS: [&str; 20] = [
    "lora_down.weight",
    "lora_up.weight",
    "lora_mid.weight",
    "alpha",
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
    "diff",
    "diff_b",
    "dora_scale",
];

/// diffusers/PEFT names and the kohya part each is: the current `lora_A`/`lora_B`, the older
/// `….lora.down`, text encoders' `….lora_linear_layer.down` (what
/// `convert_state_dict_to_diffusers` still writes for their attention) and the attention
/// processors' `….processor.to_q_lora.down`.
const PEFT_PARTS: [(&str, &str); 10] = [
    (".lora_A.weight", "lora_down.weight"),
    (".lora_magnitude_vector", "lora_magnitude_vector"),
    (".lora_magnitude_vector.weight", "lora_magnitude_vector"),
    (".lora_B.weight", "lora_up.weight"),
    (".lora.down.weight", "lora_down.weight"),
    (".lora.up.weight", "lora_up.weight"),
    (".lora_linear_layer.down.weight", "lora_down.weight"),
    (".lora_linear_layer.up.weight", "lora_up.weight"),
    ("_lora.down.weight", "lora_down.weight"),
    ("_lora.up.weight", "lora_up.weight"),
];

/// (network, module as written, part)
fn split_key(key: &str) -> Option<(LoraTarget, &str, &'static str)> {
    let (target, rest, kohya) = PREFIXES
        .iter()
        .find_map(|(p, t, k)| key.strip_prefix(p).map(|r| (*t, r, *k)))?;
    if kohya {
        KOHYA_PARTS.iter().find_map(|part| {
            rest.strip_suffix(part)
                .and_then(|m| m.strip_suffix('.'))
                .map(|m| (target, m, *part))
        })
    } else {
        PEFT_PARTS
            .iter()
            .find_map(|(suffix, part)| rest.strip_suffix(suffix).map(|m| (target, m, *part)))
    }
}

/// A module path as the lookup spells it: a text encoder's without the `text_model.` that
/// checkpoints written before transformers 5 carry (and LoRA files name), so that either
/// spelling finds the layer; diffusers' old attention-processor names (`attn1.processor.to_q_lora`,
/// `….to_out_lora`) as the layers they adapt.
fn normalised(module: &str) -> String {
    let m = module
        .strip_prefix("text_model.")
        .or_else(|| module.strip_prefix("text_model_"))
        .unwrap_or(module);
    match m.rsplit_once(".processor.") {
        Some((attn, proj)) => {
            let proj = proj.strip_suffix("_lora").unwrap_or(proj);
            let proj = if proj == "to_out" { "to_out.0" } else { proj };
            format!("{attn}.{proj}")
        }
        None => m.to_string(),
    }
}

/// A text encoder's module in OpenCLIP's own names (`transformer.resblocks.N.attn.in_proj`,
/// `….mlp.c_fc`, flattened or dotted, after an optional `model`) in transformers' names.
fn open_clip_names(module: &str) -> String {
    if !module.contains("resblocks") {
        return module.to_string();
    }
    let m = module
        .strip_prefix("model.")
        .or_else(|| module.strip_prefix("model_"))
        .unwrap_or(module);
    let mut out = m.to_string();
    for (from, to) in [
        ("transformer.resblocks.", "encoder.layers."),
        ("transformer_resblocks_", "encoder_layers_"),
        (".attn.", ".self_attn."),
        ("_attn_", "_self_attn_"),
        ("mlp.c_fc", "mlp.fc1"),
        ("mlp_c_fc", "mlp_fc1"),
        ("mlp.c_proj", "mlp.fc2"),
        ("mlp_c_proj", "mlp_fc2"),
    ] {
        out = out.replace(from, to);
    }
    out
}

/// Marks a fused attention input projection (`…self_attn.in_proj`, q, k and v stacked by
/// rows) in a layer's module path: its update is split over the three.
const FUSED_QKV: &str = "#in_proj";

/// The fused `in_proj` of `module` (dotted or flattened), when the network has that layer's
/// `q_proj`, `k_proj` and `v_proj`: the q projection's path with [`FUSED_QKV`] appended.
fn fused_qkv(module: &str, map: &BTreeMap<String, String>) -> Option<String> {
    let sep = module.strip_suffix("in_proj")?.chars().last()?;
    let prefix = &module[..module.len() - "in_proj".len()];
    let q = map.get(&format!("{prefix}q_proj"))?;
    let base = q.strip_suffix("q_proj")?;
    let has = |p: &str| map.values().any(|m| m == &format!("{base}{p}"));
    (matches!(sep, '.' | '_') && has("k_proj") && has("v_proj")).then(|| format!("{q}{FUSED_QKV}"))
}

/// The shape of the weight a layer's update must have: its own, or for a fused `in_proj`
/// three q projections stacked.
fn weight_shape(net: &Checkpoint, module: &str) -> Vec<usize> {
    match module.strip_suffix(FUSED_QKV) {
        Some(q) => {
            let mut s = net.tensors()[&format!("{q}.weight")].shape.clone();
            s[0] *= 3;
            s
        }
        None => net.tensors()[&format!("{module}.weight")].shape.clone(),
    }
}

/// The three weight keys a fused `in_proj` layer's update splits over, in order.
fn fused_keys(q_module: &str) -> Option<[String; 3]> {
    let base = q_module.strip_suffix("q_proj")?;
    Some(["q_proj", "k_proj", "v_proj"].map(|p| format!("{base}{p}.weight")))
}

/// Where LoRA files keep textual-inversion embeddings they bundle (kohya, A1111:
/// `bundle_emb.NAME.string_to_param.*`, or `…NAME.clip_l` / `clip_g` for SDXL).
const BUNDLED: &str = "bundle_emb.";

/// The textual-inversion embeddings a LoRA file bundles, by name (A1111 adds them as if they
/// were in the embeddings folder).
pub fn bundled_embeddings(
    file: &Path,
    device: &Device,
) -> Result<Vec<(String, crate::clip::textual_inversion::TextualInversion)>> {
    let ckpt = Checkpoint::open_file(file)?;
    let mut groups: BTreeMap<String, BTreeMap<String, Tensor>> = BTreeMap::new();
    for key in ckpt.tensors().keys() {
        let Some((name, vec)) = key.strip_prefix(BUNDLED).and_then(|r| r.split_once('.')) else {
            continue;
        };
        groups
            .entry(name.to_string())
            .or_default()
            .insert(vec.to_string(), ckpt.load(key, DType::F32, device)?);
    }
    groups
        .into_iter()
        .map(|(name, tensors)| {
            let ti =
                crate::clip::textual_inversion::TextualInversion::from_tensors(&tensors, file)?;
            Ok((name, ti))
        })
        .collect()
}

/// At most this many offending keys are listed in an error.
const LISTED: usize = 8;

fn listing(keys: &[String]) -> String {
    let mut s = keys
        .iter()
        .take(LISTED)
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > LISTED {
        s.push_str(&format!(" and {} more", keys.len() - LISTED));
    }
    s
}

impl LoraFile {
    /// Reads `file` and resolves every tensor against the networks `nets` has (their
    /// checkpoints, diffusers keys). A file is applied whole or not at all: keys in no known
    /// naming, for a network the model lacks, or naming a layer the network does not have are
    /// an error that lists them.
    pub fn open(
        file: &Path,
        nets: &BTreeMap<LoraTarget, Checkpoint>,
        device: &Device,
    ) -> Result<Self> {
        Self::open_with(file, nets, None, device)
    }

    /// [`LoraFile::open`], also reading kohya U-Net names in the original LDM layout
    /// (`lora_unet_input_blocks_4_1_…`) through `unet_ldm` (flattened original module →
    /// flattened diffusers module, [`crate::weights::original::flat_ldm_unet_module`]).
    pub fn open_with(
        file: &Path,
        nets: &BTreeMap<LoraTarget, Checkpoint>,
        unet_ldm: Option<ModuleNames>,
        device: &Device,
    ) -> Result<Self> {
        let ckpt = Checkpoint::open_file(file)?;
        // Per network: normalised module path (and kohya's flattening of it) → the module path.
        let mut paths: BTreeMap<LoraTarget, BTreeMap<String, String>> = BTreeMap::new();
        for (target, net) in nets {
            let map = paths.entry(*target).or_default();
            for key in net.tensors().keys() {
                if let Some(m) = key.strip_suffix(".weight") {
                    let n = normalised(m);
                    map.insert(n.replace('.', "_"), m.to_string());
                    map.insert(n, m.to_string());
                }
            }
        }
        let bad = |msg: String| Error::Checkpoint {
            path: file.to_path_buf(),
            msg,
        };
        let mut parts: BTreeMap<(LoraTarget, String), Parts> = BTreeMap::new();
        let (mut unknown, mut absent, mut unmatched) = (Vec::new(), Vec::new(), Vec::new());
        for key in ckpt.tensors().keys() {
            // Embeddings a file bundles are read by `bundled_embeddings`.
            if key.starts_with(BUNDLED) {
                continue;
            }
            let Some((target, written, part)) = split_key(key) else {
                unknown.push(key.clone());
                continue;
            };
            let Some(map) = paths.get(&target) else {
                absent.push(key.clone());
                continue;
            };
            let found =
                map.get(&normalised(written))
                    .cloned()
                    .or_else(|| match (target, unet_ldm) {
                        (LoraTarget::Unet, Some(f)) => {
                            f(written).and_then(|d| map.get(&d)).cloned()
                        }
                        _ => fused_qkv(&normalised(&open_clip_names(written)), map),
                    });
            let Some(module) = found else {
                unmatched.push(key.clone());
                continue;
            };
            let entry = parts.entry((target, module.clone())).or_default();
            let t = ckpt.load(key, DType::F32, device)?;
            if part == "alpha" {
                entry.1 = Some(t.flatten_all()?.to_vec1::<f32>()?[0] as f64);
            } else {
                entry.0.insert(part, t);
            }
        }
        if !unknown.is_empty() {
            return Err(bad(format!(
                "{} tensors in no LoRA naming this loader knows (unet./text_encoder./text_encoder_2. \
                 with lora_A/lora_B, or lora_unet_/lora_te_/lora_te1_/lora_te2_ with \
                 lora_down/lora_up, LoHa's hada_*, LoKr's lokr_*, diff/diff_b, alpha, and DoRA's \
                 dora_scale or lora_magnitude_vector): {}",
                unknown.len(),
                listing(&unknown)
            )));
        }
        if !absent.is_empty() {
            return Err(bad(format!(
                "{} tensors are for a network this model does not have (an SDXL LoRA on an \
                 SD1/SD2 model?): {}",
                absent.len(),
                listing(&absent)
            )));
        }
        if !unmatched.is_empty() {
            return Err(bad(format!(
                "{} tensors name layers this model does not have (a LoRA for another \
                 architecture?): {}",
                unmatched.len(),
                listing(&unmatched)
            )));
        }
        let mut layers: BTreeMap<LoraTarget, BTreeMap<String, LoraLayer>> = BTreeMap::new();
        for ((target, module), (mut tensors, alpha)) in parts {
            let magnitude = match (
                tensors.remove("lora_magnitude_vector"),
                tensors.remove("dora_scale"),
            ) {
                (Some(m), None) => Some((m, true)),
                (None, Some(m)) => Some((m, false)),
                (None, None) => None,
                (Some(_), Some(_)) => {
                    return Err(bad(format!(
                    "layer `{module}`: two DoRA magnitudes (lora_magnitude_vector and dora_scale)"
                )))
                }
            };
            let Some(adapter) = Adapter::from_parts(&mut tensors) else {
                return Err(bad(format!(
                    "layer `{module}`: its tensors ({}) make no complete adapter",
                    tensors.keys().copied().collect::<Vec<_>>().join(", ")
                )));
            };
            if !tensors.is_empty() {
                return Err(bad(format!(
                    "layer `{module}`: tensors of two adapter kinds ({} left over)",
                    tensors.keys().copied().collect::<Vec<_>>().join(", ")
                )));
            }
            let net = &nets[&target];
            let weight = &weight_shape(net, &module);
            adapter
                .delta(weight)
                .map_err(|e| bad(format!("layer `{module}`: {e}")))?;
            if module.ends_with(FUSED_QKV)
                && (magnitude.is_some() || adapter.bias_delta().is_some())
            {
                return Err(bad(format!(
                    "layer `{module}`: DoRA or a bias update on a fused q/k/v projection"
                )));
            }
            let dora = magnitude
                .map(|(m, peft)| Dora::new(&m, weight, peft))
                .transpose()
                .map_err(|e| bad(format!("layer `{module}`: {e}")))?;
            if let Some(b) = adapter.bias_delta() {
                let bias = net
                    .tensors()
                    .get(&format!("{module}.bias"))
                    .map(|e| e.shape.clone());
                if bias.as_deref() != Some(b.dims()) {
                    return Err(bad(format!(
                        "layer `{module}`: a bias update of shape {:?} for a bias of {bias:?}",
                        b.dims()
                    )));
                }
            }
            layers.entry(target).or_default().insert(
                module,
                LoraLayer {
                    adapter,
                    alpha,
                    dora,
                },
            );
        }
        if layers.is_empty() {
            return Err(bad("no LoRA layers".into()));
        }
        Ok(Self { layers })
    }

    /// Adds `multiplier ×` this file's updates of network `target` to `patches` (weight key →
    /// f32 update).
    pub fn add_to(
        &self,
        target: LoraTarget,
        patches: &mut BTreeMap<String, Tensor>,
        multiplier: f64,
        net: &Checkpoint,
    ) -> Result<()> {
        let Some(layers) = self.layers.get(&target) else {
            return Ok(());
        };
        fn add(patches: &mut BTreeMap<String, Tensor>, key: String, d: Tensor) -> Result<()> {
            let sum = match patches.remove(&key) {
                Some(p) => (p + d)?,
                None => d,
            };
            patches.insert(key, sum);
            Ok(())
        }
        for (module, layer) in layers {
            if let Some(keys) = module.strip_suffix(FUSED_QKV).and_then(fused_keys) {
                // q, k and v stacked by rows: each takes its third of the update.
                let shape = weight_shape(net, module);
                let delta = (layer.adapter.delta(&shape)? * (multiplier * layer.scale()))?;
                let rows = shape[0] / 3;
                for (i, key) in keys.into_iter().enumerate() {
                    add(patches, key, delta.narrow(0, i * rows, rows)?)?;
                }
                continue;
            }
            let key = format!("{module}.weight");
            let shape = &net.tensors()[&key].shape;
            let delta = layer.adapter.delta(shape)?;
            match &layer.dora {
                None => add(patches, key, (delta * (multiplier * layer.scale()))?)?,
                // DoRA rescales the weight as it stands (the model's, plus the files merged
                // before this one), as ComfyUI applies files one after another.
                Some(dora) => {
                    let mut w = net.load(&key, DType::F32, delta.device())?;
                    if let Some(p) = patches.get(&key) {
                        w = (w + p)?;
                    }
                    let d = dora.update(&w, &(delta * layer.scale())?, multiplier)?;
                    add(patches, key, d)?;
                }
            }
            if let Some(b) = layer.adapter.bias_delta() {
                add(patches, format!("{module}.bias"), (b * multiplier)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// For a convolution, the merged update equals a k×k convolution to r channels followed by
    /// a 1×1 one (LoCon's low-rank form).
    #[test]
    fn a_conv_update_is_two_convolutions() -> Result<()> {
        let dev = Device::Cpu;
        let (r, cin, cout) = (2, 3, 4);
        let down = Tensor::randn(0f32, 1.0, (r, cin, 3, 3), &dev)?;
        let up = Tensor::randn(0f32, 1.0, (cout, r, 1, 1), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (1, cin, 5, 5), &dev)?;
        let merged = lora_delta(&down, &up, 0.5, &[cout, cin, 3, 3])?;
        let a = x.conv2d(&merged, 1, 1, 1, 1)?;
        let b = (x.conv2d(&down, 1, 1, 1, 1)?.conv2d(&up, 0, 1, 1, 1)? * 0.5)?;
        let err = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-4, "{err}");
        Ok(())
    }

    /// Factors found beside a layer's weight (`lora_A`/`lora_B` under its path) are applied
    /// beside it: the same output as the merged weight, and the same gradients for the factors
    /// as through the merge, for a linear layer and a strided 3×3 convolution.
    #[test]
    fn factors_beside_a_layer_act_as_the_merged_weight() -> Result<()> {
        use crate::layers::{conv2d, linear::linear};
        use candle_core::{DType, Module, Var};
        use candle_nn::VarBuilder;
        let dev = Device::Cpu;
        let (r, cin, cout) = (2, 3, 4);
        let cases: [(Vec<usize>, Vec<usize>); 2] = [
            (vec![cout, cin], vec![2, 5, cin]),
            (vec![cout, cin, 3, 3], vec![2, cin, 7, 7]),
        ];
        for (shape, x_shape) in cases {
            let conv = shape.len() == 4;
            let weight = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev)?;
            let bias = Tensor::randn(0f32, 1.0, cout, &dev)?;
            let mut down_shape = shape.clone();
            down_shape[0] = r;
            let up_shape: Vec<usize> = if conv {
                vec![cout, r, 1, 1]
            } else {
                vec![cout, r]
            };
            let down = Var::randn(0f32, 1.0, down_shape.as_slice(), &dev)?;
            let up = Var::randn(0f32, 1.0, up_shape.as_slice(), &dev)?;
            let x = Tensor::randn(0f32, 1.0, x_shape.as_slice(), &dev)?;
            let build = |tensors: Vec<(&str, Tensor)>| -> Result<Box<dyn Module>> {
                let map = tensors
                    .into_iter()
                    .map(|(k, v)| (format!("l.{k}"), v))
                    .collect();
                let vb = VarBuilder::from_tensors(map, DType::F32, &dev).pp("l");
                Ok(if conv {
                    Box::new(conv2d(vb, cin, cout, 3, 2, 1)?)
                } else {
                    Box::new(linear(cin, cout, vb)?)
                })
            };
            let beside = build(vec![
                ("weight", weight.clone()),
                ("bias", bias.clone()),
                ("lora_A.weight", down.as_tensor().clone()),
                ("lora_B.weight", up.as_tensor().clone()),
            ])?;
            let merged_w = (&weight + lora_delta(down.as_tensor(), up.as_tensor(), 1.0, &shape)?)?;
            let merged = build(vec![("weight", merged_w), ("bias", bias)])?;
            let (a, b) = (beside.forward(&x)?, merged.forward(&x)?);
            let err = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-4, "outputs differ by {err}");
            let ga = a.sqr()?.sum_all()?.backward()?;
            let gb = b.sqr()?.sum_all()?.backward()?;
            for v in [&down, &up] {
                let (ga, gb) = (
                    ga.get(v).expect("a gradient"),
                    gb.get(v).expect("a gradient"),
                );
                let scale = gb.abs()?.max_all()?.to_scalar::<f32>()?;
                let err = (ga - gb)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    err <= 1e-4 * scale.max(1.0),
                    "gradients differ by {err} of {scale}"
                );
            }
        }
        Ok(())
    }

    /// The same layer named the diffusers/PEFT way and the kohya way (with its alpha) resolves
    /// to the same module and update.
    #[test]
    fn peft_and_kohya_names_resolve_alike() -> Result<()> {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().map_err(|e| Error::Msg(e.to_string()))?;
        let save = |name: &str, tensors: Vec<(&str, Tensor)>| -> Result<std::path::PathBuf> {
            let path = dir.path().join(name);
            let map: std::collections::HashMap<String, Tensor> = tensors
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            candle_core::safetensors::save(&map, &path)?;
            Ok(path)
        };
        let w = Tensor::zeros((4, 3), DType::F32, &dev)?;
        let unet = Checkpoint::open_file(&save(
            "unet.safetensors",
            vec![("mid_block.attentions.0.proj_in.weight", w)],
        )?)?;
        let down = Tensor::randn(0f32, 1.0, (2, 3), &dev)?;
        let up = Tensor::randn(0f32, 1.0, (4, 2), &dev)?;
        let peft = save(
            "peft.safetensors",
            vec![
                (
                    "unet.mid_block.attentions.0.proj_in.lora_A.weight",
                    down.clone(),
                ),
                (
                    "unet.mid_block.attentions.0.proj_in.lora_B.weight",
                    up.clone(),
                ),
                ("text_encoder.x.lora_A.weight", down.clone()),
            ],
        )?;
        let kohya = save(
            "kohya.safetensors",
            vec![
                (
                    "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight",
                    down.clone(),
                ),
                (
                    "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight",
                    up.clone(),
                ),
                (
                    "lora_unet_mid_block_attentions_0_proj_in.alpha",
                    Tensor::new(1f32, &dev)?,
                ),
            ],
        )?;
        let expected = up.matmul(&down)?;
        let key = "mid_block.attentions.0.proj_in.weight";
        let nets = BTreeMap::from([(LoraTarget::Unet, unet)]);
        let unet = &nets[&LoraTarget::Unet];
        for (file, scale) in [(&peft, 1.0), (&kohya, 0.5)] {
            let lora = match LoraFile::open(file, &nets, &dev) {
                // The PEFT file carries a text-encoder tensor this U-Net-only model lacks.
                Err(e) if file == &peft => {
                    assert!(
                        e.to_string().contains("`text_encoder.x.lora_A.weight`"),
                        "{e}"
                    );
                    continue;
                }
                other => other?,
            };
            let mut patches = BTreeMap::new();
            lora.add_to(LoraTarget::Unet, &mut patches, 2.0, unet)?;
            let err = (&patches[key] - (&expected * (2.0 * scale))?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(err < 1e-5, "{}: {err}", file.display());
        }
        let stray = save(
            "stray.safetensors",
            vec![("unet.nope.lora_A.weight", down.clone())],
        )?;
        let e = LoraFile::open(&stray, &nets, &dev).unwrap_err().to_string();
        assert!(
            e.contains("name layers this model does not have") && e.contains("unet.nope"),
            "{e}"
        );
        let odd = save(
            "odd.safetensors",
            vec![("model.diffusion_model.x.hada_w1_a", down)],
        )?;
        let e = LoraFile::open(&odd, &nets, &dev).unwrap_err().to_string();
        assert!(e.contains("no LoRA naming"), "{e}");
        Ok(())
    }

    #[test]
    fn targets_are_module_endings() {
        assert!(is_unet_target(
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        ));
        assert!(is_unet_target("down_blocks.0.resnets.0.conv1"));
        assert!(is_unet_target(
            "mid_block.attentions.0.transformer_blocks.0.ff.net.2"
        ));
        assert!(!is_unet_target("conv_in"));
        assert!(!is_unet_target("time_embedding.linear_1"));
        assert!(!is_unet_target("down_blocks.0.attentions.0.norm"));
    }

    #[test]
    fn factors_that_do_not_fit_are_refused() -> Result<()> {
        let dev = Device::Cpu;
        let down = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let up = Tensor::zeros((4, 2), DType::F32, &dev)?;
        assert!(lora_delta(&down, &up, 1.0, &[4, 3]).is_ok());
        assert!(lora_delta(&down, &up, 1.0, &[4, 5]).is_err());
        assert!(lora_delta(&down, &up, 1.0, &[5, 3]).is_err());
        Ok(())
    }
}
