//! Everything a pipeline needs from a model folder, loaded once and shared by every request:
//! the U-Net, the autoencoder, one or two (tokenizer, text encoder) pairs, and the scheduler
//! config that defines the training noise schedule.

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use ldm_models::clip::{ClipTextModel, ClipTokenizer};
use ldm_models::layers::timestep::guidance_scale_embedding;
use ldm_models::model::{Family, ModelFolder, TextEncoderSlot};
use ldm_models::unet::UNet2DConditionModel;
use ldm_models::vae::AutoencoderKL;
use ldm_sampling::scheduler_config::SchedulerConfig;
use std::path::Path;

/// A loaded model. Cloning shares the weights (candle tensors are reference-counted).
#[derive(Clone)]
pub struct Components {
    pub folder: ModelFolder,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    /// One pair for SD1/SD2, two for SDXL (the second with the projection).
    pub text_encoders: Vec<(ClipTokenizer, ClipTextModel)>,
    pub scheduler: SchedulerConfig,
    /// The dtype the weights are held in; see [`Self::compute_dtype`] for the activations'.
    pub dtype: DType,
    pub device: Device,
    /// Checkpoint tensors no network used, per component (reported, not fatal).
    pub unused: Vec<(String, Vec<String>)>,
    /// A tiny autoencoder that replaces `vae` for encoding and decoding ([`Self::use_taesd`]).
    pub taesd: Option<ldm_models::vae::AutoencoderTiny>,
    /// ControlNets a request may use, by position ([`Self::add_controlnet`];
    /// [`crate::Request::control`]).
    pub controlnets: Vec<ldm_models::controlnet::ControlNetModel>,
    /// T2I-Adapters a request may use, by position ([`Self::add_t2i_adapter`]).
    pub adapters: Vec<ldm_models::t2i_adapter::T2IAdapter>,
    /// An IP-Adapter with its image encoder ([`Self::use_ip_adapter`]).
    pub ip_adapter: Option<crate::ip_adapter::IpAdapterState>,
}

impl Components {
    /// The dtype the networks' activations flow in: the weights' dtype, except bf16 on the
    /// CPU, which multiplies bf16 operands and computes everything else in f32
    /// ([`ldm_models::layers::compute_dtype`]). Samplers always run in f32.
    pub fn compute_dtype(&self) -> DType {
        ldm_models::layers::compute_dtype(self.dtype, &self.device)
    }

    /// Loads a diffusers folder, computing in `dtype` on `device`.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_folder(ModelFolder::open(path)?, dtype, device)
    }

    /// Loads an original-layout single-file checkpoint with the configs, tokenizers and
    /// scheduler of a diffusers folder of the same family.
    pub fn load_single_file(
        file: &Path,
        config_dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::from_folder(
            ModelFolder::open_single_file(file, config_dir)?,
            dtype,
            device,
        )
    }

    /// Replaces the autoencoder with one from a separate file (A1111's and ComfyUI's "VAE").
    pub fn replace_vae(&mut self, file: &Path) -> Result<()> {
        let vae = self.folder.load_vae_file(file, self.dtype, &self.device)?;
        self.unused.retain(|(c, _)| c != "vae");
        if !vae.unused.is_empty() {
            self.unused.push(("vae".into(), vae.unused));
        }
        self.vae = vae.model;
        Ok(())
    }

    fn from_folder(folder: ModelFolder, dtype: DType, device: &Device) -> Result<Self> {
        let path = folder.root.clone();
        let path = path.as_path();
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::InvalidRequest(format!(
                "unsupported compute dtype {dtype:?}"
            )));
        }
        let mut unused = Vec::new();
        let unet = folder.load_unet(dtype, device)?;
        unused.push(("unet".to_string(), unet.unused));
        let vae = folder.load_vae(dtype, device)?;
        unused.push(("vae".to_string(), vae.unused));
        let mut text_encoders = Vec::new();
        for (slot, name) in [
            (TextEncoderSlot::First, "text_encoder"),
            (TextEncoderSlot::Second, "text_encoder_2"),
        ] {
            if folder.components().contains(&name) {
                let te = folder.load_text_encoder(slot, dtype, device)?;
                unused.push((name.to_string(), te.unused));
                text_encoders.push((folder.load_tokenizer(slot)?, te.model));
            }
        }
        let sched_path = path.join("scheduler").join("scheduler_config.json");
        let text = std::fs::read_to_string(&sched_path).map_err(|source| Error::Io {
            path: sched_path.clone(),
            source,
        })?;
        let scheduler = SchedulerConfig::from_json(&text)?;
        unused.retain(|(_, u)| !u.is_empty());
        ldm_models::weights::release_free_memory();
        Ok(Self {
            folder,
            unet: unet.model,
            vae: vae.model,
            text_encoders,
            scheduler,
            dtype,
            device: device.clone(),
            unused,
            taesd: None,
            controlnets: Vec::new(),
            adapters: Vec::new(),
            ip_adapter: None,
        })
    }

    /// Loads textual-inversion embeddings: each `.safetensors`, `.bin` or `.pt` file in `dir`
    /// becomes a word, its file stem, that prompts use as A1111's embeddings are used (a
    /// multi-vector embedding stands for all its vectors). Returns the names added, with their
    /// files.
    pub fn load_embeddings(&mut self, dir: &Path) -> Result<Vec<(String, std::path::PathBuf)>> {
        let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut files: Vec<std::path::PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && p.extension().is_some_and(|x| {
                        matches!(
                            x.to_string_lossy().to_lowercase().as_str(),
                            "safetensors" | "bin" | "pt"
                        )
                    })
            })
            .collect();
        files.sort();
        let mut names = Vec::new();
        for file in files {
            let Some(name) = file.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
                continue;
            };
            self.add_embedding(&name, &file)?;
            names.push((name, file));
        }
        Ok(names)
    }

    /// Adds one embedding file under `name` to every text encoder it has vectors for (SDXL's
    /// files carry one set per encoder; a single set goes to the encoder of its width).
    pub fn add_embedding(&mut self, name: &str, file: &Path) -> Result<()> {
        use ldm_models::clip::textual_inversion::TextualInversion;
        let ti = TextualInversion::read(file, &self.device)?;
        self.add_embedding_vectors(name, ti, file)
    }

    /// Adds an embedding's vectors under `name` (`file` names where they came from in errors).
    pub fn add_embedding_vectors(
        &mut self,
        name: &str,
        ti: ldm_models::clip::textual_inversion::TextualInversion,
        file: &Path,
    ) -> Result<()> {
        let bad = |msg: String| Error::Image {
            path: file.to_path_buf(),
            msg,
        };
        let widths: Vec<usize> = self
            .text_encoders
            .iter()
            .map(|(_, m)| m.config.hidden_size)
            .collect();
        let assignments: Vec<(usize, Tensor)> = if ti.per_encoder.len() == self.text_encoders.len()
        {
            ti.per_encoder.into_iter().enumerate().collect()
        } else if ti.per_encoder.len() == 1 {
            let v = ti
                .per_encoder
                .into_iter()
                .next()
                .ok_or_else(|| bad("no vectors".into()))?;
            let width = v.dim(1)?;
            match widths.iter().position(|&w| w == width) {
                Some(i) => vec![(i, v)],
                None => {
                    return Err(bad(format!(
                        "an embedding of width {width} fits none of this model's text encoders (widths {widths:?})"
                    )))
                }
            }
        } else {
            return Err(bad(format!(
                "{} sets of vectors for a model with {} text encoders",
                ti.per_encoder.len(),
                self.text_encoders.len()
            )));
        };
        for (i, vectors) in assignments {
            let (tokenizer, model) = &mut self.text_encoders[i];
            if vectors.dim(1)? != model.config.hidden_size {
                return Err(bad(format!(
                    "an embedding of width {} does not fit text encoder {} (width {})",
                    vectors.dim(1)?,
                    i + 1,
                    model.config.hidden_size
                )));
            }
            if tokenizer.vocab_size() != model.config.vocab_size {
                return Err(bad(format!(
                    "the tokenizer ({} tokens) and text encoder ({}) disagree on the vocabulary",
                    tokenizer.vocab_size(),
                    model.config.vocab_size
                )));
            }
            let ids = tokenizer
                .add_token(name, vectors.dim(0)?)
                .map_err(|e| bad(e.to_string()))?;
            let first = model.add_token_embeddings(&vectors)?;
            if ids[0] != first {
                return Err(bad(format!(
                    "token ids from {} but embedding rows from {first}",
                    ids[0]
                )));
            }
        }
        Ok(())
    }

    /// Encodes and decodes with a tiny autoencoder (TAESD, a diffusers `AutoencoderTiny` folder)
    /// instead of the model's own, as diffusers' `pipe.vae = AutoencoderTiny…` does: a few
    /// percent of the work, softer pictures.
    pub fn use_taesd(&mut self, dir: &Path) -> Result<()> {
        let tiny = ldm_models::vae::AutoencoderTiny::load(dir, self.dtype, &self.device)?;
        let (want, got) = (
            (self.vae.config.latent_channels, self.vae_scale_factor()),
            (tiny.config.latent_channels, tiny.config.downsample_factor()),
        );
        if want != got {
            return Err(Error::InvalidRequest(format!(
                "{}: a tiny autoencoder for {} latent channels at factor {}, the model has {} at {}",
                dir.display(),
                got.0,
                got.1,
                want.0,
                want.1
            )));
        }
        self.taesd = Some(tiny);
        Ok(())
    }

    /// Loads a ControlNet for requests to use — a diffusers `ControlNetModel` folder, or an
    /// original (lllyasviel) single `.safetensors` file, whose encoder is then this U-Net's —
    /// which must fit this model (the U-Net's skip connections, text width and added
    /// conditioning). Returns its index.
    pub fn add_controlnet(&mut self, dir: &Path) -> Result<usize> {
        use ldm_models::controlnet::ControlNetModel;
        let net = if dir.is_file() {
            ControlNetModel::load_single_file(dir, &self.unet.config, self.dtype, &self.device)?
        } else {
            ControlNetModel::load(dir, self.dtype, &self.device)?
        };
        let (u, c) = (&self.unet.config, &net.config.unet);
        let fits = u.block_out_channels == c.block_out_channels
            && u.layers_per_block == c.layers_per_block
            && u.cross_attention_dim == c.cross_attention_dim
            && u.text_time.is_some() == c.text_time.is_some()
            && c.in_channels == self.vae.config.latent_channels
            && net.config.downsample_factor() == self.vae_scale_factor();
        if !fits {
            return Err(Error::InvalidRequest(format!(
                "{}: a ControlNet for another architecture (its encoder is {:?} wide with {:?} \
                 layers and {}-wide text, taking {}-channel latents of images {}× larger; this \
                 model's U-Net is {:?}, {:?}, {}, {}, {}×)",
                dir.display(),
                c.block_out_channels,
                c.layers_per_block,
                c.cross_attention_dim[0],
                c.in_channels,
                net.config.downsample_factor(),
                u.block_out_channels,
                u.layers_per_block,
                u.cross_attention_dim[0],
                self.vae.config.latent_channels,
                self.vae_scale_factor()
            )));
        }
        self.controlnets.push(net);
        Ok(self.controlnets.len() - 1)
    }

    /// Loads a diffusers `T2IAdapter` folder for requests to use; its features must fit this
    /// U-Net's down blocks (widths, and a first feature map the latents' size). Returns its
    /// index.
    pub fn add_t2i_adapter(&mut self, dir: &Path) -> Result<usize> {
        use ldm_models::t2i_adapter::T2IAdapter;
        let a = T2IAdapter::load(dir, self.dtype, &self.device)?;
        let u = &self.unet.config;
        // Feature i joins down block i (a plain first block after its downsampler, which is why
        // SDXL's adapter starts at twice the latents' factor); one more joins the mid block.
        let n = u.block_out_channels.len();
        let plain_first = u.down_blocks[0] == ldm_models::unet::BlockKind::Plain && n > 1;
        let first = self.vae_scale_factor() * if plain_first { 2 } else { 1 };
        let widths_fit = a.config.channels.len() <= n + 1
            && a.config
                .channels
                .iter()
                .enumerate()
                .all(|(i, &c)| c == u.block_out_channels[i.min(n - 1)]);
        if a.config.downscale_factor != first || !widths_fit {
            return Err(Error::InvalidRequest(format!(
                "{}: a T2I-Adapter for another architecture ({} features of widths {:?}, the \
                 first {}× smaller than the image; this model's U-Net needs widths {:?}, the \
                 first {}× smaller)",
                dir.display(),
                a.config.channels.len(),
                a.config.channels,
                a.config.downscale_factor,
                u.block_out_channels,
                first
            )));
        }
        self.adapters.push(a);
        Ok(self.adapters.len() - 1)
    }

    /// A1111's "Model hash": the first 10 hex digits of the SHA-256 of the checkpoint file
    /// (for a diffusers folder, of its U-Net weights, shards in order).
    pub fn model_hash(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        use std::io::Read;
        let files: Vec<std::path::PathBuf> = match &self.folder.single_file {
            Some(c) => c.paths().iter().map(|p| p.to_path_buf()).collect(),
            None => ldm_models::weights::component_files(&self.folder.root.join("unet"))?,
        };
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        for path in files {
            let mut f = std::fs::File::open(&path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            loop {
                let n = f.read(&mut buf).map_err(|source| Error::Io {
                    path: path.clone(),
                    source,
                })?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
        }
        let digest = hasher.finalize();
        Ok(digest.iter().take(5).map(|b| format!("{b:02x}")).collect())
    }

    /// SD1, SD2, SDXL or the refiner.
    pub fn family(&self) -> Family {
        self.folder.family()
    }

    /// Pixels per latent along each side.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config.downsample_factor()
    }

    /// The image side the model was trained at, as diffusers defaults it: the U-Net's
    /// `sample_size` times the autoencoder's factor (512 when the config does not say).
    pub fn default_size(&self) -> usize {
        self.unet
            .config
            .sample_size
            .map_or(512, |s| s * self.vae_scale_factor())
    }

    /// Merges LoRA files (each at its multiplier) into the U-Net and text encoders; a file
    /// with tensors that map to nothing here is refused whole, naming them.
    pub fn apply_loras(&mut self, loras: &[ldm_models::lora::LoraSpec]) -> Result<()> {
        if loras.is_empty() {
            return Ok(());
        }
        let built = self
            .folder
            .load_with_loras(self.dtype, &self.device, loras)?;
        if let Some(unet) = built.unet {
            self.unet = unet;
        }
        for (slot, mut model) in built.text_encoders {
            let i = match slot {
                TextEncoderSlot::First => 0,
                TextEncoderSlot::Second => 1,
            };
            if let Some(pair) = self.text_encoders.get_mut(i) {
                // Embeddings added before (textual inversion) carry over to the rebuilt encoder.
                if let Some(rows) = pair.1.token_embeddings_from(model.config.vocab_size)? {
                    model.add_token_embeddings(&rows)?;
                }
                pair.1 = model;
            }
        }
        // Embeddings the files bundle, unless the word is taken (by `--embeddings`, or an
        // earlier file).
        for spec in loras {
            for (name, ti) in ldm_models::lora::bundled_embeddings(&spec.path, &self.device)? {
                let taken = self
                    .text_encoders
                    .iter()
                    .any(|(t, _)| t.token_id(&name).is_some());
                if !taken {
                    self.add_embedding_vectors(&name, ti, &spec.path)?;
                }
            }
        }
        Ok(())
    }

    /// Sampling steps when the user gives none: the folder's own (`_ldm_defaults`, written for
    /// distilled students), else 20.
    pub fn default_steps(&self) -> usize {
        self.folder.defaults.num_inference_steps.unwrap_or(20)
    }

    /// The guidance scale when the user gives none: the folder's own (1 for a student whose
    /// guidance is built in), else 7.5, as diffusers' pipelines default it.
    pub fn default_guidance(&self) -> f64 {
        self.folder.defaults.guidance_scale.unwrap_or(7.5)
    }

    /// The guidance rescale φ when the user gives none: 0.7 for a model trained on a
    /// zero-terminal-SNR schedule (its scheduler says `rescale_betas_zero_snr`), the value Lin et
    /// al. (2024) pair with such models, since plain guidance over-exposes them; 0 otherwise, as
    /// diffusers defaults it. On the embedded Shapes model φ = 0.7 read back better at guidance
    /// 7.5 (one-object exact match 21 % against 15.5 %, shape 40.5 % against 31 %).
    pub fn default_guidance_rescale(&self) -> f64 {
        if self.scheduler.rescale_betas_zero_snr == Some(true) {
            0.7
        } else {
            0.0
        }
    }

    /// Whether `guidance_scale` is applied by classifier-free guidance — an unconditional and
    /// a conditional pass a step — as diffusers does above 1. A U-Net with a guidance
    /// embedding (`time_cond_proj_dim`: guidance-distilled and latent-consistency models) takes
    /// the scale as an input instead and makes one pass.
    pub fn classifier_free(&self, guidance_scale: f64) -> bool {
        guidance_scale > 1.0 && self.unet.config.time_cond_proj_dim.is_none()
    }

    /// The guidance embedding a U-Net with `time_cond_proj_dim` is given for `guidance_scale`
    /// (`w = guidance_scale − 1`, as diffusers' pipelines pass it), one row per batch item.
    pub fn guidance_embedding(&self, guidance_scale: f64, batch: usize) -> Result<Option<Tensor>> {
        match self.unet.config.time_cond_proj_dim {
            Some(dim) => Ok(Some(
                guidance_scale_embedding(&vec![guidance_scale - 1.0; batch], dim, &self.device)?
                    .to_dtype(self.compute_dtype())?,
            )),
            None => Ok(None),
        }
    }
}
