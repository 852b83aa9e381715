//! The one resident model and how a job runs on it: each image of a job is its own
//! generation with seed `seed + k` (A1111's `all_seeds`), reporting progress and previews
//! after every step and stopping at the step after a cancel, interrupt or skip.

use crate::jobs::{Flags, Image, Outcome, Progress, Update};
use crate::params::{Defaults, GenParams};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use ldm_models::lora::LoraSpec;
use ldm_models::vae::AutoencoderTiny;
use ldm_pipeline::extra_networks::PromptLoras;
use ldm_pipeline::image_io::{encode_png, image_to_tensor, mask_to_tensor, to_images};
use ldm_pipeline::preview::LatentPreview;
use ldm_pipeline::{Components, Request};
use ldm_sampling::names::{SamplerName, SigmaSchedule};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A loaded model with what the APIs say about it.
pub struct Model {
    pub components: Components,
    /// The folder's name (A1111's `model_name`).
    pub name: String,
    pub path: PathBuf,
    /// A1111's short hash (10 hex digits of the U-Net weights' SHA-256).
    pub hash: String,
    pub preview: Option<LatentPreview>,
    /// TAESD, for previews closer to the final picture than the linear map.
    pub taesd: Option<AutoencoderTiny>,
    pub defaults: Defaults,
    /// Folders `<lora:NAME…>` tags in prompts are looked up in.
    pub lora_dirs: Vec<PathBuf>,
    /// The model with the LoRA files the last tagged request named merged in. The loaded
    /// `components` are never changed: a request without tags runs on them as they were, and
    /// another set of files is merged afresh from the base weights.
    lora_variant: Mutex<Option<(Vec<LoraSpec>, Arc<Components>)>>,
}

impl Model {
    /// Loads a diffusers folder on `device` and fits its latent preview (or loads the TAESD
    /// folder that draws them); `name` defaults to the folder's name.
    pub fn load(
        path: &Path,
        name: Option<String>,
        taesd: Option<&Path>,
        dtype: DType,
        device: &Device,
    ) -> ldm_pipeline::Result<Self> {
        let mut components = Components::load(path, dtype, device)?;
        // Checked against the model's latents by the pipeline, then kept for previews only:
        // final pictures come from the model's own autoencoder.
        let taesd = match taesd {
            Some(dir) => {
                components.use_taesd(dir)?;
                components.taesd.take()
            }
            None => None,
        };
        let hash = components.model_hash()?;
        let preview = LatentPreview::fit(&components).ok();
        let defaults = Defaults {
            size: components.default_size(),
            steps: components.default_steps(),
            cfg_scale: components.default_guidance(),
        };
        let name = name
            .or_else(|| {
                path.canonicalize()
                    .ok()
                    .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            })
            .unwrap_or_else(|| "model".into());
        Ok(Self {
            components,
            name,
            path: path.to_path_buf(),
            hash,
            preview,
            taesd,
            defaults,
            lora_dirs: Vec::new(),
            lora_variant: Mutex::new(None),
        })
    }

    /// The model with `specs` merged in: the cached variant when the last tagged request named
    /// the same files at the same weights, else the base weights with these merged (the old
    /// variant dropped first).
    fn with_loras(&self, specs: &[LoraSpec]) -> ldm_pipeline::Result<Arc<Components>> {
        let mut slot = self.lora_variant.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((cached, c)) = &*slot {
            if cached == specs {
                return Ok(c.clone());
            }
        }
        *slot = None;
        let mut c = self.components.clone();
        c.apply_loras(specs)?;
        let c = Arc::new(c);
        *slot = Some((specs.to_vec(), c.clone()));
        Ok(c)
    }

    /// A1111's checkpoint title, `name [hash]`.
    pub fn title(&self) -> String {
        format!("{} [{}]", self.name, self.hash)
    }

    /// The sampler a request without one runs.
    pub fn sampler_of(&self, p: &GenParams) -> SamplerName {
        p.sampler
            .or_else(|| SamplerName::for_config(&self.components.scheduler).ok())
            .unwrap_or(SamplerName::Euler)
    }

    fn request(
        &self,
        p: &GenParams,
        k: usize,
        init: &Option<Tensor>,
        mask: &Option<Tensor>,
    ) -> Request {
        Request {
            prompt: p.prompt.clone(),
            negative_prompt: p.negative_prompt.clone(),
            width: p.width,
            height: p.height,
            steps: p.steps,
            guidance_scale: p.cfg_scale,
            guidance_rescale: self.components.default_guidance_rescale(),
            sampler: p.sampler,
            schedule: p.schedule.clone(),
            seed: p.seed.wrapping_add(k as u64),
            batch_size: 1,
            init_image: init.clone(),
            strength: p.denoising_strength,
            mask: mask.clone(),
            ..Request::default()
        }
    }

    fn encode(
        &self,
        p: &GenParams,
        req: &Request,
        img: Option<RgbImage>,
        tagged: &PromptLoras,
    ) -> ldm_pipeline::Result<Image> {
        let img = img.ok_or_else(|| ldm_pipeline::Error::InvalidRequest("no image made".into()))?;
        let schedule = match &p.schedule {
            SigmaSchedule::Default => "Automatic".to_string(),
            s => {
                let n = s.name();
                let mut c = n.chars();
                c.next()
                    .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                    .unwrap_or(n)
            }
        };
        // The prompt as written, tags included, and the files they named, as A1111 records.
        let as_written = Request {
            prompt: p.prompt.clone(),
            ..req.clone()
        };
        let mut infotext = ldm_pipeline::infotext(
            &as_written,
            self.sampler_of(p).display_name(),
            &schedule,
            &self.name,
            &self.hash,
        );
        if !tagged.hashes.is_empty() {
            infotext.push_str(&format!(", Lora hashes: \"{}\"", tagged.hashes.join(", ")));
        }
        if !tagged.missing.is_empty() {
            infotext.push_str(&format!(
                ", Lora not found: \"{}\"",
                tagged.missing.join(", ")
            ));
        }
        let mut png = Vec::new();
        encode_png(&img, &infotext, &mut png)
            .map_err(|e| ldm_pipeline::Error::InvalidRequest(format!("PNG encoding: {e}")))?;
        Ok(Image {
            png,
            seed: req.seed,
            infotext,
        })
    }

    /// A preview of scaled latents as PNG bytes: TAESD's decoding if it was given, else the
    /// fitted linear map; `None` if neither can draw it.
    pub fn preview_png(&self, latents: &Tensor) -> Option<Vec<u8>> {
        let img = match (&self.taesd, &self.preview) {
            (Some(tiny), _) => {
                let z = latents
                    .narrow(0, 0, 1)
                    .ok()?
                    .to_dtype(self.components.compute_dtype())
                    .ok()?;
                to_images(&tiny.decode_scaled(&z).ok()?)
                    .ok()?
                    .into_iter()
                    .next()?
            }
            (None, Some(linear)) => linear.render(latents).ok()?,
            (None, None) => return None,
        };
        let mut png = Vec::new();
        encode_png(&img, "", &mut png).ok()?;
        Some(png)
    }

    /// Runs a job's images in order, reporting through `report`.
    pub fn run(&self, p: &GenParams, flags: &Flags, report: &mut dyn FnMut(Update)) -> Outcome {
        match self.run_inner(p, flags, report) {
            Ok(outcome) => outcome,
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }

    fn run_inner(
        &self,
        p: &GenParams,
        flags: &Flags,
        report: &mut dyn FnMut(Update),
    ) -> ldm_pipeline::Result<Outcome> {
        let tagged = ldm_pipeline::extra_networks::prompt_loras(&p.prompt, &self.lora_dirs)?;
        let variant;
        let components: &Components = if tagged.specs.is_empty() {
            &self.components
        } else {
            report(Update::Phase("loading LoRA"));
            variant = self.with_loras(&tagged.specs)?;
            &variant
        };
        let device = &components.device;
        let init = match &p.init_image {
            Some(img) => Some(image_to_tensor(img.clone(), p.width, p.height, device)?),
            None => None,
        };
        let mask = match &p.mask {
            Some(m) => Some(mask_to_tensor(m.clone(), p.width, p.height, device)?),
            None => None,
        };
        let total = p.images();
        let started = Instant::now();
        let mut steps_done = 0usize;
        for k in 0..total {
            if flags.cancel.load(Ordering::Relaxed) {
                return Ok(Outcome::Cancelled);
            }
            if flags.interrupt.load(Ordering::Relaxed) {
                return Ok(Outcome::Succeeded);
            }
            flags.skip.store(false, Ordering::Relaxed);
            let req = Request {
                prompt: tagged.text.clone(),
                ..self.request(p, k, &init, &mask)
            };
            let mut last: Option<Tensor> = None;
            let mut hook = |info: &ldm_sampling::StepInfo| -> ldm_sampling::Result<Option<Tensor>> {
                if flags.stop_requested() {
                    return Err(ldm_sampling::Error::Stopped);
                }
                last = Some(info.denoised.clone());
                steps_done += 1;
                let remaining = (info.steps - info.step - 1) + (total - k - 1) * info.steps;
                let per_step = started.elapsed().as_secs_f64() / steps_done as f64;
                report(Update::Progress(Progress {
                    phase: "sampling",
                    step: info.step + 1,
                    steps: info.steps,
                    image: k,
                    images: total,
                    eta_seconds: Some(per_step * remaining as f64),
                }));
                let due = p.preview_every > 0 && (info.step + 1).is_multiple_of(p.preview_every);
                if due && info.step + 1 < info.steps {
                    if let Some(png) = self.preview_png(info.denoised) {
                        report(Update::Preview {
                            png,
                            step: info.step + 1,
                            image: k,
                        });
                    }
                }
                Ok(None)
            };
            let result = ldm_pipeline::generate(components, &req, &mut hook);
            report(Update::Phase("decoding"));
            match result {
                Ok(out) => {
                    report(Update::Image(self.encode(
                        p,
                        &req,
                        out.images.into_iter().next(),
                        &tagged,
                    )?));
                }
                Err(ldm_pipeline::Error::Cancelled) => {
                    if flags.cancel.load(Ordering::Relaxed) {
                        return Ok(Outcome::Cancelled);
                    }
                    // Interrupt and skip keep the image as far as it got (its current
                    // denoised estimate), as A1111 returns what was made so far.
                    if let Some(z) = &last {
                        let pixels = ldm_pipeline::generate::decode_latents(components, &req, z)?;
                        let img = to_images(&pixels)?.into_iter().next();
                        report(Update::Image(self.encode(p, &req, img, &tagged)?));
                    }
                    if flags.interrupt.load(Ordering::Relaxed) {
                        return Ok(Outcome::Succeeded);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Outcome::Succeeded)
    }
}
