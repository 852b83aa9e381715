//! A diffusers pipeline folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
//! `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`, `scheduler/`): its validated configs, the
//! model family they describe, header-only summaries, and strict loading of each network.

use crate::clip::{ClipTextConfig, ClipTextModel, ClipTokenizer};
use crate::config::{read_json, ModelIndex, PipelineDefaults, SchedulerConfigHead};
use crate::error::{Error, Result};
use crate::lora::LoraTarget;
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig};
use crate::weights::original::{self, OriginalFamily};
use crate::weights::{component_files, rename, Checkpoint, Weights};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Which Stable Diffusion a folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Sd1,
    Sd2,
    Sdxl,
    SdxlRefiner,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Sd1 => "SD1",
            Family::Sd2 => "SD2",
            Family::Sdxl => "SDXL",
            Family::SdxlRefiner => "SDXL refiner",
        })
    }
}

/// One of the two text encoders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoderSlot {
    First,
    Second,
}

impl TextEncoderSlot {
    fn encoder_dir(self) -> &'static str {
        match self {
            TextEncoderSlot::First => "text_encoder",
            TextEncoderSlot::Second => "text_encoder_2",
        }
    }
    fn tokenizer_dir(self) -> &'static str {
        match self {
            TextEncoderSlot::First => "tokenizer",
            TextEncoderSlot::Second => "tokenizer_2",
        }
    }
}

/// A loaded network and the checkpoint tensors it did not use.
#[derive(Debug)]
pub struct Loaded<T> {
    pub model: T,
    pub unused: Vec<String>,
}

/// The networks a set of LoRA files changed, rebuilt with the updates merged.
pub struct LoraModels {
    pub unet: Option<UNet2DConditionModel>,
    pub text_encoders: Vec<(TextEncoderSlot, ClipTextModel)>,
}

/// Parameter count and stored dtypes of one component, read from safetensors headers only.
#[derive(Debug, Clone)]
pub struct ComponentSummary {
    pub name: String,
    pub parameters: usize,
    pub dtypes: BTreeMap<String, usize>,
    pub files: Vec<PathBuf>,
}

/// A diffusers pipeline folder with its configs read and validated.
#[derive(Debug, Clone)]
pub struct ModelFolder {
    pub root: PathBuf,
    pub index: ModelIndex,
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub text_encoder: Option<ClipTextConfig>,
    pub text_encoder_2: Option<ClipTextConfig>,
    pub scheduler: SchedulerConfigHead,
    /// Steps and guidance the folder asks for when the user gives none (`_ldm_defaults`).
    pub defaults: PipelineDefaults,
    /// For a single-file checkpoint: its tensors (configs, tokenizers and the scheduler come
    /// from `root`, a diffusers folder of the same family).
    pub single_file: Option<Arc<Checkpoint>>,
}

impl ModelFolder {
    /// Reads `model_index.json` and every component's config under `root`.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.exists() {
            return Err(Error::NotAModel {
                path: root.to_path_buf(),
                msg: "no such file or directory".into(),
            });
        }
        if !root.is_dir() {
            return Err(Error::NotAModel {
                path: root.to_path_buf(),
                msg: "is a file: single-file checkpoints need a config folder of the same family (--config DIR)"
                    .into(),
            });
        }
        let index_path = root.join("model_index.json");
        if !index_path.exists() {
            return Err(Error::NotAModel {
                path: root.to_path_buf(),
                msg: "not a diffusers model folder (no model_index.json)".into(),
            });
        }
        let index: ModelIndex = read_json(&index_path)?;
        let defaults = index.defaults(&index_path)?;
        let require = |name: &str| -> Result<PathBuf> {
            let dir = root.join(name);
            if !index.has(name) {
                return Err(Error::NotAModel {
                    path: index_path.clone(),
                    msg: format!("model_index.json lists no `{name}` component"),
                });
            }
            if !dir.is_dir() {
                return Err(Error::NotAModel {
                    path: root.to_path_buf(),
                    msg: format!("component folder `{name}/` is missing"),
                });
            }
            Ok(dir)
        };
        let unet = UNetConfig::from_file(&require("unet")?.join("config.json"))?;
        let vae = VaeConfig::from_file(&require("vae")?.join("config.json"))?;
        let scheduler: SchedulerConfigHead =
            read_json(&require("scheduler")?.join("scheduler_config.json"))?;
        let text = |name: &str| -> Result<Option<ClipTextConfig>> {
            if !index.has(name) {
                return Ok(None);
            }
            ClipTextConfig::from_file(&require(name)?.join("config.json")).map(Some)
        };
        let text_encoder = text("text_encoder")?;
        let text_encoder_2 = text("text_encoder_2")?;
        if text_encoder.is_none() && text_encoder_2.is_none() {
            return Err(Error::NotAModel {
                path: index_path,
                msg: "no text encoder component".into(),
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
            index,
            unet,
            vae,
            text_encoder,
            text_encoder_2,
            scheduler,
            defaults,
            single_file: None,
        })
    }

    /// A single-file checkpoint in the original layout, with the configs, tokenizers and
    /// scheduler of `config_dir` (a diffusers folder of the same family, as diffusers'
    /// `from_single_file(config=…)`). The U-Net's input channels follow the checkpoint
    /// (inpainting models have 9).
    pub fn open_single_file(file: &Path, config_dir: &Path) -> Result<Self> {
        let ckpt = Checkpoint::open_file(file)?;
        let family = original::detect(&ckpt).ok_or_else(|| Error::NotAModel {
            path: file.to_path_buf(),
            msg: "not a Stable Diffusion checkpoint in the original layout (no model.diffusion_model.* \
                  with a known text encoder)"
                .into(),
        })?;
        let mut folder = Self::open(config_dir)?;
        let expected = match folder.family() {
            Family::Sd1 => OriginalFamily::Sd1,
            Family::Sd2 => OriginalFamily::Sd2,
            Family::Sdxl => OriginalFamily::Sdxl,
            Family::SdxlRefiner => OriginalFamily::SdxlRefiner,
        };
        if expected != family {
            return Err(Error::NotAModel {
                path: file.to_path_buf(),
                msg: format!(
                    "the checkpoint is {family:?} but the config folder {} is {}",
                    config_dir.display(),
                    folder.family()
                ),
            });
        }
        if let Some(c) = original::unet_in_channels(&ckpt) {
            folder.unet.in_channels = c;
        }
        folder.single_file = Some(Arc::new(ckpt));
        Ok(folder)
    }

    /// SD1, SD2, SDXL or the SDXL refiner, from the configs' structure.
    pub fn family(&self) -> Family {
        if self.unet.text_time.is_some() {
            if self.text_encoder.is_none() {
                Family::SdxlRefiner
            } else {
                Family::Sdxl
            }
        } else if self.unet.use_linear_projection
            || self
                .text_encoder
                .as_ref()
                .is_some_and(|t| t.activation == crate::clip::config::Activation::Gelu)
        {
            Family::Sd2
        } else {
            Family::Sd1
        }
    }

    /// Whether the U-Net takes the masked image and mask (9 input channels).
    pub fn is_inpainting(&self) -> bool {
        self.unet.in_channels == 9
    }

    /// One component's tensors under diffusers names.
    fn component_checkpoint(&self, component: &str) -> Result<Checkpoint> {
        let Some(single) = &self.single_file else {
            return Checkpoint::open(&component_files(&self.root.join(component))?);
        };
        let family =
            original::detect(single).ok_or_else(|| Error::Msg("unreadable single file".into()))?;
        Ok(match component {
            "unet" => original::unet(single, &self.unet),
            "vae" => original::vae(single, &self.vae, "first_stage_model."),
            te => original::text_encoders(single, family)
                .into_iter()
                .find(|(name, _)| *name == te)
                .map(|(_, c)| c)
                .ok_or_else(|| Error::NotAModel {
                    path: self.root.clone(),
                    msg: format!("the checkpoint has no `{te}`"),
                })?,
        })
    }

    /// A component's checkpoint with its keys as the networks ask for them.
    fn renamed_checkpoint(&self, component: &str) -> Result<Checkpoint> {
        let mut ckpt = self.component_checkpoint(component)?;
        if component.starts_with("text_encoder") {
            let prefixed = rename::has_clip_prefix(ckpt.tensors().keys());
            ckpt.map_keys(|k| rename::clip_text_key(k, prefixed));
        } else if component == "vae" {
            ckpt.map_keys(rename::vae_legacy_attention);
        }
        Ok(ckpt)
    }

    fn open_weights(&self, component: &str) -> Result<Arc<Weights>> {
        Ok(Weights::new(self.renamed_checkpoint(component)?))
    }

    fn build<T>(
        &self,
        component: &str,
        dtype: DType,
        device: &Device,
        ctor: impl FnOnce(candle_nn::VarBuilder) -> candle_core::Result<T>,
    ) -> Result<Loaded<T>> {
        let weights = self.open_weights(component)?;
        let model = ctor(weights.var_builder(dtype, device))
            .map_err(|e| Error::Msg(format!("loading {component}: {e}")))?;
        Ok(Loaded {
            model,
            unused: weights.unused(),
        })
    }

    /// Loads the U-Net, computing in `dtype`.
    pub fn load_unet(&self, dtype: DType, device: &Device) -> Result<Loaded<UNet2DConditionModel>> {
        self.build("unet", dtype, device, |vb| {
            UNet2DConditionModel::new(vb, &self.unet)
        })
    }

    /// The weights a LoRA file may adapt: the U-Net and each text encoder the model has.
    pub fn lora_targets(&self) -> Result<BTreeMap<LoraTarget, Checkpoint>> {
        let mut nets = BTreeMap::from([(LoraTarget::Unet, self.renamed_checkpoint("unet")?)]);
        if self.text_encoder.is_some() {
            nets.insert(
                LoraTarget::TextEncoder,
                self.renamed_checkpoint("text_encoder")?,
            );
        }
        if self.text_encoder_2.is_some() {
            nets.insert(
                LoraTarget::TextEncoder2,
                self.renamed_checkpoint("text_encoder_2")?,
            );
        }
        Ok(nets)
    }

    /// Loads the U-Net and the text encoders with LoRA files merged into their weights, each
    /// file at its multiplier (in the order given; their updates add, computed in f32). Every
    /// file is checked whole before anything is built.
    pub fn load_with_loras(
        &self,
        dtype: DType,
        device: &Device,
        loras: &[crate::lora::LoraSpec],
    ) -> Result<LoraModels> {
        let nets = self.lora_targets()?;
        let mut patches: BTreeMap<LoraTarget, BTreeMap<String, Tensor>> = BTreeMap::new();
        for spec in loras {
            let ldm = |flat: &str| original::flat_ldm_unet_module(flat, &self.unet);
            let lora = crate::lora::LoraFile::open_with(&spec.path, &nets, Some(&ldm), device)?;
            for (target, net) in &nets {
                lora.add_to(
                    *target,
                    patches.entry(*target).or_default(),
                    spec.multiplier(*target),
                    net,
                )?;
            }
        }
        let mut built = LoraModels {
            unet: None,
            text_encoders: Vec::new(),
        };
        for (target, net) in nets {
            let Some(p) = patches.remove(&target).filter(|p| !p.is_empty()) else {
                continue;
            };
            let vb_weights = Weights::with_patches(net, p);
            let vb = vb_weights.var_builder(dtype, device);
            let fail =
                |e: candle_core::Error| Error::Msg(format!("loading {}: {e}", target.component()));
            match target {
                LoraTarget::Unet => {
                    built.unet = Some(UNet2DConditionModel::new(vb, &self.unet).map_err(fail)?);
                }
                LoraTarget::TextEncoder | LoraTarget::TextEncoder2 => {
                    let (slot, config) = if target == LoraTarget::TextEncoder {
                        (TextEncoderSlot::First, &self.text_encoder)
                    } else {
                        (TextEncoderSlot::Second, &self.text_encoder_2)
                    };
                    let config = config
                        .as_ref()
                        .ok_or_else(|| Error::Msg("no text encoder".into()))?;
                    let model = ClipTextModel::new(vb, config).map_err(fail)?;
                    built.text_encoders.push((slot, model));
                }
            }
        }
        Ok(built)
    }

    /// Loads the autoencoder, computing in `dtype`.
    pub fn load_vae(&self, dtype: DType, device: &Device) -> Result<Loaded<AutoencoderKL>> {
        self.build("vae", dtype, device, |vb| AutoencoderKL::new(vb, &self.vae))
    }

    /// Loads the autoencoder from a separate file (`--vae`): diffusers keys, or the original
    /// layout with or without the `first_stage_model.` prefix (as VAE releases ship), in
    /// `.safetensors` or `.ckpt`; the architecture is this model's VAE config.
    pub fn load_vae_file(
        &self,
        file: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Loaded<AutoencoderKL>> {
        let ckpt = Checkpoint::open_file(file)?;
        let has = |p: &str| ckpt.tensors().keys().any(|k| k.starts_with(p));
        let mut ckpt = if has("encoder.down_blocks.") || has("decoder.up_blocks.") {
            ckpt
        } else if has("first_stage_model.") {
            original::vae(&ckpt, &self.vae, "first_stage_model.")
        } else if has("encoder.down.") {
            original::vae(&ckpt, &self.vae, "")
        } else {
            return Err(Error::NotAModel {
                path: file.to_path_buf(),
                msg: "not a VAE checkpoint (no encoder/decoder tensors in diffusers or original layout)".into(),
            });
        };
        ckpt.map_keys(rename::vae_legacy_attention);
        let weights = Weights::new(ckpt);
        let model = AutoencoderKL::new(weights.var_builder(dtype, device), &self.vae)
            .map_err(|e| Error::Msg(format!("loading VAE {}: {e}", file.display())))?;
        Ok(Loaded {
            model,
            unused: weights.unused(),
        })
    }

    /// Loads a text encoder, computing in `dtype`.
    pub fn load_text_encoder(
        &self,
        slot: TextEncoderSlot,
        dtype: DType,
        device: &Device,
    ) -> Result<Loaded<ClipTextModel>> {
        let config = match slot {
            TextEncoderSlot::First => &self.text_encoder,
            TextEncoderSlot::Second => &self.text_encoder_2,
        };
        let config = config.as_ref().ok_or_else(|| Error::NotAModel {
            path: self.root.clone(),
            msg: format!("this model has no `{}`", slot.encoder_dir()),
        })?;
        self.build(slot.encoder_dir(), dtype, device, |vb| {
            ClipTextModel::new(vb, config)
        })
    }

    /// Loads the tokenizer that goes with a text encoder.
    pub fn load_tokenizer(&self, slot: TextEncoderSlot) -> Result<ClipTokenizer> {
        ClipTokenizer::from_folder(&self.root.join(slot.tokenizer_dir()))
    }

    /// Names of the weight-bearing components present, in a fixed order.
    pub fn components(&self) -> Vec<&'static str> {
        let mut out = vec!["unet", "vae"];
        if self.text_encoder.is_some() {
            out.push("text_encoder");
        }
        if self.text_encoder_2.is_some() {
            out.push("text_encoder_2");
        }
        out
    }

    /// Parameter count and dtypes of `component`, from its safetensors headers alone.
    pub fn summary(&self, component: &str) -> Result<ComponentSummary> {
        let ckpt = self.component_checkpoint(component)?;
        let files: Vec<PathBuf> = ckpt.paths().iter().map(|p| p.to_path_buf()).collect();
        let mut parameters = 0;
        let mut dtypes = BTreeMap::new();
        for (name, entry) in ckpt.tensors() {
            if rename::is_ignorable_buffer(name) {
                continue;
            }
            parameters += entry.numel();
            *dtypes.entry(format!("{:?}", entry.dtype)).or_insert(0) += entry.numel();
        }
        Ok(ComponentSummary {
            name: component.to_string(),
            parameters,
            dtypes,
            files,
        })
    }
}
