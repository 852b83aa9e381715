//! The one resident model and how a job runs on it: each image of a job is its own
//! generation with seed `seed + k` (A1111's `all_seeds`), reporting progress and previews
//! after every step and stopping at the step after a cancel, interrupt or skip.

use crate::jobs::{Flags, Image, Outcome, Progress, Update};
use crate::params::{ControlUnit, Defaults, GenParams};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use ldm_models::lora::LoraSpec;
use ldm_models::vae::AutoencoderTiny;
use ldm_pipeline::control::{AdapterInput, ControlInput};
use ldm_pipeline::extra_networks::PromptLoras;
use ldm_pipeline::image_io::{
    control_to_tensor, encode_png, image_to_tensor, mask_to_tensor, to_images,
};
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
    /// Folders of ControlNets (diffusers folders or original `.safetensors` files) that
    /// requests name by folder or file stem.
    pub controlnet_dirs: Vec<PathBuf>,
    /// The model with the LoRA files and ControlNets the last request that named any loaded.
    /// The loaded `components` are never changed: a request naming none runs on them as they
    /// were, and another set is loaded afresh onto the base weights.
    variant: Mutex<Option<(Extras, Arc<Components>)>>,
}

/// What a request adds to the loaded model.
#[derive(Debug, Clone, PartialEq)]
struct Extras {
    loras: Vec<LoraSpec>,
    controlnets: Vec<ControlNetFile>,
}

/// An entry of the ControlNet folders: a ControlNet or a T2I-Adapter (sd-webui-controlnet
/// lists both among its models).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ControlNetFile {
    /// The folder's name or the file's stem: what requests name it by.
    pub name: String,
    pub path: PathBuf,
    /// A diffusers `T2IAdapter` folder.
    pub t2i_adapter: bool,
}

/// The ControlNets (and T2I-Adapters) in `dirs` by name: folders with a `config.json`, and
/// `.safetensors` files.
pub fn list_controlnets(dirs: &[PathBuf]) -> Vec<ControlNetFile> {
    let mut out: Vec<ControlNetFile> = dirs
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|entries| entries.flatten().map(|e| e.path()))
        .filter_map(|path| {
            let config = path.join("config.json");
            let folder = config.is_file();
            let file = path.is_file()
                && path
                    .extension()
                    .is_some_and(|x| x.eq_ignore_ascii_case("safetensors"));
            if !folder && !file {
                return None;
            }
            let t2i_adapter = folder
                && std::fs::read_to_string(&config)
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .is_some_and(|v| v["_class_name"] == "T2IAdapter");
            let name = path.file_stem()?.to_string_lossy().into_owned();
            Some(ControlNetFile {
                name,
                path,
                t2i_adapter,
            })
        })
        .collect();
    out.sort();
    out
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
            controlnet_dirs: Vec::new(),
            variant: Mutex::new(None),
        })
    }

    /// The ControlNet-folder entries that request units name, in order; an unknown name is
    /// an error that says so.
    pub fn controlnets_for(&self, units: &[ControlUnit]) -> Result<Vec<ControlNetFile>, String> {
        let known = list_controlnets(&self.controlnet_dirs);
        units
            .iter()
            .map(|u| {
                known
                    .iter()
                    .find(|net| net.name == u.model)
                    .cloned()
                    .ok_or_else(|| {
                        format!("no ControlNet `{}` (see /controlnet/model_list)", u.model)
                    })
            })
            .collect()
    }

    /// The model with `extras` loaded: the cached variant when the last request that named any
    /// named the same, else the base weights with these merged and loaded (the old variant
    /// dropped first). ControlNets are loaded in order: request unit k uses `controlnets[k]`.
    fn with_extras(&self, extras: &Extras) -> ldm_pipeline::Result<Arc<Components>> {
        let mut slot = self.variant.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((cached, c)) = &*slot {
            if cached == extras {
                return Ok(c.clone());
            }
        }
        *slot = None;
        let mut c = self.components.clone();
        c.apply_loras(&extras.loras)?;
        for net in &extras.controlnets {
            if net.t2i_adapter {
                c.add_t2i_adapter(&net.path)?;
            } else {
                c.add_controlnet(&net.path)?;
            }
        }
        let c = Arc::new(c);
        *slot = Some((extras.clone(), c.clone()));
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
        let controlnets = self
            .controlnets_for(&p.control)
            .map_err(ldm_pipeline::Error::InvalidRequest)?;
        let extras = Extras {
            loras: tagged.specs.clone(),
            controlnets,
        };
        let variant;
        let components: &Components = if extras.loras.is_empty() && extras.controlnets.is_empty() {
            &self.components
        } else {
            report(Update::Phase("loading LoRA and ControlNet"));
            variant = self.with_extras(&extras)?;
            &variant
        };
        // Units in order: ControlNets and T2I-Adapters were loaded in this order, each kind
        // counted on its own.
        let (mut control, mut adapter, mut adapter_factor) = (Vec::new(), Vec::new(), 1.0);
        for (u, net) in p.control.iter().zip(&extras.controlnets) {
            let image = control_to_tensor(u.image.clone(), p.width, p.height, &components.device)?;
            if net.t2i_adapter {
                if u.start > 0.0 {
                    return Err(ldm_pipeline::Error::InvalidRequest(format!(
                        "the T2I-Adapter `{}` acts from the first step: guidance_start must be 0",
                        u.model
                    )));
                }
                adapter_factor = u.end;
                adapter.push(AdapterInput {
                    net: adapter.len(),
                    image,
                    scale: u.weight,
                });
            } else {
                control.push(ControlInput {
                    start: u.start,
                    end: u.end,
                    ..ControlInput::new(control.len(), image, u.weight)
                });
            }
        }
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
                control: control.clone(),
                guess_mode: p.control.iter().any(|u| u.guess),
                adapter: adapter.clone(),
                adapter_factor,
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
