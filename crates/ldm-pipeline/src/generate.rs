//! txt2img and img2img (Rombach et al. 2022; diffusers' `StableDiffusionPipeline`,
//! `StableDiffusionImg2ImgPipeline` and their SDXL twins): encode the prompts, draw the initial
//! latents from the request's seed in diffusers' order, run the sampler over the U-Net with
//! classifier-free guidance, decode with the autoencoder.

use crate::components::Components;
use crate::model_denoiser::{Conditioning, UNetDenoiser};
use crate::prompt::{encode, PromptEmbeds};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use image::RgbImage;
use ldm_models::unet::AddedCond;
use ldm_sampling::names::{SamplerName, SigmaSchedule};
use ldm_sampling::noise::{randn_tensor, NoiseSource, PhiloxRng, TorchCpuRng};
use ldm_sampling::scheduler_config::Plan;
use ldm_sampling::{Run, StepHook};

/// Where the noise comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RngKind {
    /// `torch.Generator("cpu").manual_seed(seed)`: diffusers' and ComfyUI's images.
    Torch,
    /// A1111's "NV" Philox seeds.
    Philox,
}

/// SDXL's micro-conditioning (diffusers' defaults: original and target size = the image size,
/// crop at the origin).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SdxlConditioning {
    pub original_size: Option<(usize, usize)>,
    pub crops_coords_top_left: (usize, usize),
    pub target_size: Option<(usize, usize)>,
    /// The refiner's aesthetic scores (diffusers' defaults 6.0 and 2.5).
    pub aesthetic_score: Option<f64>,
    pub negative_aesthetic_score: Option<f64>,
}

/// One generation request, shared by every front-end.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: String,
    /// `None`: no negative prompt (SDXL then uses zeros where its config says so).
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    pub guidance_rescale: f64,
    /// `None`: the sampler of the model's own scheduler config.
    pub sampler: Option<SamplerName>,
    pub schedule: SigmaSchedule,
    pub eta: Option<f64>,
    pub seed: u64,
    pub rng: RngKind,
    /// Images per prompt, drawn together (diffusers' `num_images_per_prompt`).
    pub batch_size: usize,
    pub clip_skip: Option<usize>,
    /// img2img: the init image `[1, 3, H, W]` in [-1, 1], and how much of it to redo.
    pub init_image: Option<Tensor>,
    pub strength: f64,
    /// Inpainting: `[1, 1, H, W]` with 1 where the image is to be repainted.
    pub mask: Option<Tensor>,
    /// Tiled VAE encoding/decoding: `None` tiles images larger than the VAE's training size.
    pub tiled_vae: Option<bool>,
    pub sdxl: SdxlConditioning,
    /// Stop once this fraction of the noise schedule is done and return the noisy latents
    /// (diffusers' `denoising_end`, the base half of a base + refiner run).
    pub denoising_end: Option<f64>,
    /// Continue from `init_latents` at this fraction (diffusers' `denoising_start`).
    pub denoising_start: Option<f64>,
    /// Latents in the scheduler's space to continue from (with `denoising_start`).
    pub init_latents: Option<Tensor>,
    /// ControlNets to apply (of [`Components::controlnets`]), each with its image; several
    /// add up.
    pub control: Vec<crate::control::ControlInput>,
    /// diffusers' `guess_mode`: the ControlNets see the conditional half only, their shallow
    /// residuals weighted down.
    pub guess_mode: bool,
    /// T2I-Adapters to apply (of [`Components::adapters`]), each with its image.
    pub adapter: Vec<crate::control::AdapterInput>,
    /// diffusers' `adapter_conditioning_factor`: the fraction of the steps the adapters act in
    /// (from the first).
    pub adapter_factor: f64,
    /// IP-Adapter's image prompt (needs [`Components::use_ip_adapter`]), and its weight
    /// (`set_ip_adapter_scale`).
    pub ip_image: Option<image::RgbImage>,
    pub ip_scale: f64,
}

impl Default for Request {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: None,
            width: 512,
            height: 512,
            steps: 20,
            guidance_scale: 7.5,
            guidance_rescale: 0.0,
            sampler: None,
            schedule: SigmaSchedule::Default,
            eta: None,
            seed: 0,
            rng: RngKind::Torch,
            batch_size: 1,
            clip_skip: None,
            init_image: None,
            strength: 0.8,
            mask: None,
            tiled_vae: None,
            sdxl: SdxlConditioning::default(),
            denoising_end: None,
            denoising_start: None,
            init_latents: None,
            control: Vec::new(),
            guess_mode: false,
            adapter: Vec::new(),
            adapter_factor: 1.0,
            ip_image: None,
            ip_scale: 1.0,
        }
    }
}

/// The result of a request.
pub struct Output {
    pub images: Vec<RgbImage>,
    /// Final latents in the scheduler's space, as diffusers' `output_type="latent"` returns.
    pub latents: Tensor,
    pub plan: Plan,
}

/// Working memory of one generation beyond the weights, in bytes: the U-Net's full-resolution
/// activations (a dozen live tensors of the first block's width, f32, guided batch), the
/// autoencoder's largest activation (or one tile's), and one chunk of attention scores
/// (attention is sliced, see `ldm_models::layers::attention`).
pub fn estimate_working_bytes(c: &Components, req: &Request) -> u64 {
    let f = c.vae_scale_factor() as u64;
    let (h, w) = (req.height as u64, req.width as u64);
    let tokens = (h / f) * (w / f);
    let batch = req.batch_size as u64
        * if c.classifier_free(req.guidance_scale) {
            2
        } else {
            1
        };
    let width = c
        .unet
        .config
        .block_out_channels
        .first()
        .copied()
        .unwrap_or(320) as u64;
    let unet = 12 * batch * width * tokens * 4;
    let vae_pixels = if use_tiles(c, req) {
        let t = c.vae.config.sample_size as u64;
        t * t
    } else {
        h * w
    };
    let vae_width = c
        .vae
        .config
        .block_out_channels
        .first()
        .copied()
        .unwrap_or(128) as u64;
    let vae = 6 * req.batch_size as u64 * vae_width * vae_pixels * 4;
    unet.max(vae) + ldm_models::layers::attention::ATTENTION_CHUNK_BYTES as u64
}

fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn check_request(c: &Components, req: &Request) -> Result<()> {
    let f = c.vae_scale_factor();
    let bad = |m: String| Err(Error::InvalidRequest(m));
    if req.width == 0
        || req.height == 0
        || !req.width.is_multiple_of(8)
        || !req.height.is_multiple_of(8)
        || !req.width.is_multiple_of(f)
        || !req.height.is_multiple_of(f)
    {
        return bad(format!(
            "width and height must be positive multiples of 8, got {}×{}",
            req.width, req.height
        ));
    }
    if req.width > 16384 || req.height > 16384 {
        return bad(format!(
            "{}×{} is larger than 16384 pixels on a side",
            req.width, req.height
        ));
    }
    if req.batch_size == 0 || req.batch_size > 64 {
        return bad(format!(
            "batch size must be in [1, 64], got {}",
            req.batch_size
        ));
    }
    for (k, u) in req.control.iter().enumerate() {
        if u.net >= c.controlnets.len() {
            return bad(format!(
                "ControlNet {} of {} loaded",
                u.net,
                c.controlnets.len()
            ));
        }
        if u.image.dims() != [1, 3, req.height, req.width] {
            return bad(format!(
                "control image {k}: shape {:?}, expected [1, 3, {}, {}]",
                u.image.dims(),
                req.height,
                req.width
            ));
        }
        let window = (0.0..=1.0).contains(&u.start) && (0.0..=1.0).contains(&u.end);
        if !u.scale.is_finite() || !window || u.start >= u.end {
            return bad(format!(
                "control {k}: scale {} must be finite and 0 ≤ start {} < end {} ≤ 1",
                u.scale, u.start, u.end
            ));
        }
    }
    if !(req.guidance_scale.is_finite() && req.guidance_scale >= 0.0) {
        return bad(format!(
            "guidance scale must be a finite number ≥ 0, got {}",
            req.guidance_scale
        ));
    }
    if !(0.0..=1.0).contains(&req.guidance_rescale) {
        return bad(format!(
            "guidance rescale must be in [0, 1], got {}",
            req.guidance_rescale
        ));
    }
    if c.folder.is_inpainting() && req.mask.is_none() {
        return bad("this is an inpainting model: give an init image and a mask".into());
    }
    if let Some(mask) = &req.mask {
        if req.init_image.is_none() {
            return bad("a mask needs an init image to inpaint".into());
        }
        let (_, _, mh, mw) = mask.dims4()?;
        if (mh, mw) != (req.height, req.width) {
            return bad(format!(
                "the mask is {mw}×{mh}, the request {}×{}",
                req.width, req.height
            ));
        }
    }
    let need = estimate_working_bytes(c, req);
    if let Some(avail) = available_memory() {
        if c.device.is_cpu() && need > avail {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            return bad(format!(
                "{}×{} with batch {} needs about {:.1} GiB of working memory, but only {:.1} GiB is available; \
                 use a smaller size or batch",
                req.width,
                req.height,
                req.batch_size,
                gib(need),
                gib(avail)
            ));
        }
    }
    Ok(())
}

fn repeat_rows(t: &Tensor, n: usize) -> Result<Tensor> {
    Ok(Tensor::cat(&vec![t; n], 0)?)
}

/// Builds the (guided) conditioning batch: unconditional rows first. A U-Net with a guidance
/// embedding gets the conditional rows only, and the embedding.
fn conditioning(c: &Components, req: &Request) -> Result<Conditioning> {
    let b = req.batch_size;
    let mut positive = encode(c, &req.prompt, req.clip_skip)?;
    let guided = c.classifier_free(req.guidance_scale);
    let sdxl = c.unet.config.text_time.is_some();
    let mut negative: Option<PromptEmbeds> = if !guided {
        None
    } else if sdxl && req.negative_prompt.is_none() && force_zeros_for_empty_prompt(c) {
        Some(positive.zeros_like()?)
    } else {
        Some(encode(
            c,
            req.negative_prompt.as_deref().unwrap_or(""),
            req.clip_skip,
        )?)
    };
    if let Some(neg) = negative.as_mut() {
        crate::prompt::equalize(c, neg, &mut positive, req.clip_skip)?;
    }
    let rows: Vec<&PromptEmbeds> = negative.iter().chain(std::iter::once(&positive)).collect();
    let context = Tensor::cat(
        &rows
            .iter()
            .map(|e| repeat_rows(&e.context, b))
            .collect::<Result<Vec<_>>>()?,
        0,
    )?
    .to_dtype(c.compute_dtype())?;
    let added = if sdxl {
        let (h, w) = (req.height, req.width);
        let (oh, ow) = req.sdxl.original_size.unwrap_or((h, w));
        let (th, tw) = req.sdxl.target_size.unwrap_or((h, w));
        let (ct, cl) = req.sdxl.crops_coords_top_left;
        // The refiner conditions on an aesthetic score where the base has the target size.
        let row_ids = |negative: bool| -> Vec<f32> {
            let mut ids = vec![oh as f32, ow as f32, ct as f32, cl as f32];
            if requires_aesthetics_score(c) {
                let score = if negative {
                    req.sdxl.negative_aesthetic_score.unwrap_or(2.5)
                } else {
                    req.sdxl.aesthetic_score.unwrap_or(6.0)
                };
                ids.push(score as f32);
            } else {
                ids.extend([th as f32, tw as f32]);
            }
            ids
        };
        let mut id_rows = Vec::new();
        for i in 0..rows.len() {
            let negative = rows.len() == 2 && i == 0;
            let ids = row_ids(negative);
            let n = ids.len();
            id_rows.push(repeat_rows(&Tensor::from_vec(ids, (1, n), &c.device)?, b)?);
        }
        let pooled = rows
            .iter()
            .map(|e| {
                let p = e.pooled.as_ref().ok_or_else(|| {
                    Error::InvalidRequest(
                        "SDXL needs the second text encoder's pooled output".into(),
                    )
                })?;
                repeat_rows(p, b)
            })
            .collect::<Result<Vec<_>>>()?;
        Some(AddedCond {
            text_embeds: Tensor::cat(&pooled, 0)?.to_dtype(c.compute_dtype())?,
            time_ids: Tensor::cat(&id_rows, 0)?,
        })
    } else {
        None
    };
    Ok(Conditioning {
        context,
        added,
        timestep_cond: c.guidance_embedding(req.guidance_scale, b)?,
    })
}

/// `requires_aesthetics_score` from `model_index.json` (the SDXL refiner's is true).
fn requires_aesthetics_score(c: &Components) -> bool {
    c.folder
        .index
        .flag("requires_aesthetics_score")
        .unwrap_or(false)
}

/// `force_zeros_for_empty_prompt` from `model_index.json` (diffusers' SDXL default: true).
fn force_zeros_for_empty_prompt(c: &Components) -> bool {
    c.folder
        .index
        .flag("force_zeros_for_empty_prompt")
        .unwrap_or(true)
}

/// The sampling plan a request asks for.
pub fn plan_for(c: &Components, req: &Request) -> Result<Plan> {
    let sampler = match req.sampler {
        Some(s) => s,
        None => SamplerName::for_config(&c.scheduler)?,
    };
    // diffusers' pipelines pass their own `eta = 0.0` to every scheduler whose step takes
    // one: DDIM's η and TCD's γ are 0 unless asked (the TCD scheduler alone would default to
    // γ = 0.3).
    let eta = match (sampler, req.eta) {
        (SamplerName::Tcd, None) => Some(0.0),
        (_, eta) => eta,
    };
    Ok(c.scheduler
        .plan_with(sampler, &req.schedule, req.steps, eta)?)
}

/// Nearest-neighbour resize of a `[B, C, H, W]` tensor (torch's `interpolate(mode="nearest")`:
/// source index `⌊i · in/out⌋`).
fn resize_nearest(t: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, ih, iw) = t.dims4()?;
    let rows: Vec<u32> = (0..h).map(|i| ((i * ih) / h).min(ih - 1) as u32).collect();
    let cols: Vec<u32> = (0..w).map(|j| ((j * iw) / w).min(iw - 1) as u32).collect();
    let rows = Tensor::new(rows.as_slice(), t.device())?;
    let cols = Tensor::new(cols.as_slice(), t.device())?;
    Ok(t.index_select(&rows, 2)?.index_select(&cols, 3)?)
}

/// Encodes pixels to scaled latents, sampling the posterior with `noise` (diffusers'
/// `retrieve_latents(..., generator)` followed by the scaling factor).
fn encode_image(
    c: &Components,
    req: &Request,
    image: &Tensor,
    noise: &mut dyn NoiseSource,
) -> Result<Tensor> {
    let image = image.to_dtype(c.compute_dtype())?;
    if let Some(tiny) = &c.taesd {
        // No posterior, so nothing is drawn (diffusers' `retrieve_latents` takes `.latents`).
        return Ok(tiny.encode_scaled(&image)?.to_dtype(DType::F32)?);
    }
    let posterior = if use_tiles(c, req) {
        c.vae.encode_tiled(&image, c.vae.config.sample_size, 0.25)?
    } else {
        c.vae.encode(&image)?
    };
    let eps = randn_tensor(noise, posterior.mean.shape(), &c.device)?;
    let latents = posterior
        .sample(&eps.to_dtype(c.compute_dtype())?)?
        .to_dtype(DType::F32)?;
    Ok(c.vae.scale_latents(&latents)?)
}

/// Whether the request's images go through the VAE in tiles.
fn use_tiles(c: &Components, req: &Request) -> bool {
    req.tiled_vae
        .unwrap_or_else(|| req.width.max(req.height) > c.vae.config.sample_size.max(512) * 3 / 2)
}

/// Decodes scaled latents to pixels; a half-precision VAE that overflows to NaN (SD1/SDXL VAEs
/// do in f16) is retried in f32, as diffusers' `force_upcast` would have run it.
pub fn decode_latents(c: &Components, req: &Request, latents: &Tensor) -> Result<Tensor> {
    if let Some(tiny) = &c.taesd {
        return Ok(tiny.decode_scaled(&latents.to_dtype(c.compute_dtype())?)?);
    }
    let run = |vae: &ldm_models::vae::AutoencoderKL, dtype: DType| -> Result<Tensor> {
        let z = vae.unscale_latents(latents)?.to_dtype(dtype)?;
        let f = vae.config.downsample_factor();
        Ok(if use_tiles(c, req) {
            vae.decode_tiled(&z, vae.config.sample_size / f, 0.25)?
        } else {
            vae.decode(&z)?
        })
    };
    let pixels = run(&c.vae, c.compute_dtype())?;
    if c.compute_dtype() == DType::F32 {
        return Ok(pixels);
    }
    let finite = pixels
        .to_dtype(DType::F32)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?
        .is_finite();
    if finite {
        return Ok(pixels);
    }
    eprintln!(
        "warning: the VAE overflowed in {:?}; decoding again in f32",
        c.compute_dtype()
    );
    let vae32 = c.folder.load_vae(DType::F32, &c.device)?.model;
    run(&vae32, DType::F32)
}

/// Inpainting with an ordinary (4-channel) model: after every step the known region is reset
/// to the init image's latents noised to the step's level (clean after the last step), as
/// diffusers' `StableDiffusionInpaintPipeline` does; then the caller's hook runs.
struct BlendHook<'a> {
    inner: &'a mut dyn StepHook,
    /// `[B, 1, h, w]`, 1 = repaint.
    mask: Tensor,
    image_latents: Tensor,
    noise: Tensor,
    /// Factor from a VE sample at the last sigma to the scheduler's space.
    final_scale: f64,
}

impl StepHook for BlendHook<'_> {
    fn after_step(
        &mut self,
        info: &ldm_sampling::StepInfo,
    ) -> ldm_sampling::Result<Option<Tensor>> {
        let known = if info.step + 1 == info.steps {
            (&self.image_latents / self.final_scale)?
        } else {
            (&self.image_latents + (&self.noise * info.sigma_next)?)?
        };
        let keep = self.mask.affine(-1.0, 1.0)?;
        let x = (known.broadcast_mul(&keep)? + info.x.broadcast_mul(&self.mask)?)?;
        let blended = ldm_sampling::StepInfo { x: &x, ..*info };
        Ok(Some(self.inner.after_step(&blended)?.unwrap_or(x)))
    }

    /// PLMS's predictor is blended too (diffusers blends after each scheduler call), with the
    /// known region noised to the predictor's level.
    fn intermediate(&mut self, x: &Tensor, sigma: f64) -> ldm_sampling::Result<Option<Tensor>> {
        let known = (&self.image_latents + (&self.noise * sigma)?)?;
        let keep = self.mask.affine(-1.0, 1.0)?;
        Ok(Some(
            (known.broadcast_mul(&keep)? + x.broadcast_mul(&self.mask)?)?,
        ))
    }
}

/// The request's noise source, seeded.
pub fn noise_for(req: &Request) -> Box<dyn NoiseSource> {
    match req.rng {
        RngKind::Torch => Box::new(TorchCpuRng::new(req.seed)),
        RngKind::Philox => Box::new(PhiloxRng::new(req.seed)),
    }
}

/// Runs a txt2img, img2img or inpainting request; `hook` sees every step (progress, previews,
/// cancel).
pub fn generate(c: &Components, req: &Request, hook: &mut dyn StepHook) -> Result<Output> {
    generate_with(c, req, noise_for(req).as_mut(), hook)
}

/// SDXL's ensemble of expert denoisers: the base model runs the first `switch` of the noise
/// schedule, the refiner the rest, one generator throughout (diffusers' `denoising_end` /
/// `denoising_start`).
pub fn generate_with_refiner(
    base: &Components,
    refiner: &Components,
    req: &Request,
    switch: f64,
    hook: &mut dyn StepHook,
) -> Result<Output> {
    let mut noise = noise_for(req);
    let base_req = Request {
        denoising_end: Some(switch),
        ..req.clone()
    };
    let first = generate_with(base, &base_req, noise.as_mut(), hook)?;
    let refiner_req = Request {
        denoising_start: Some(switch),
        init_latents: Some(first.latents),
        init_image: None,
        mask: None,
        ..req.clone()
    };
    generate_with(refiner, &refiner_req, noise.as_mut(), hook)
}

/// [`generate`] drawing from a given noise source.
pub fn generate_with(
    c: &Components,
    req: &Request,
    noise_source: &mut dyn NoiseSource,
    hook: &mut dyn StepHook,
) -> Result<Output> {
    check_request(c, req)?;
    let mut plan = plan_for(c, req)?;
    if let Some(end) = req.denoising_end {
        plan.end_at(end)?;
    }
    let cond = conditioning(c, req)?;
    let f = c.vae_scale_factor();
    let shape = (
        req.batch_size,
        c.vae.config.latent_channels,
        req.height / f,
        req.width / f,
    );
    let nine_channel = c.folder.is_inpainting();
    let strength_max = req.mask.is_some() && req.strength >= 1.0;
    let mut image_latents = None;
    let mut initial_noise = None;
    let x = match (&req.init_image, &req.init_latents) {
        (_, Some(latents)) => {
            // Continue another model's run (diffusers adds no noise with `denoising_start`).
            let start = req.denoising_start.ok_or_else(|| {
                Error::InvalidRequest("init latents need a denoising start".into())
            })?;
            plan.start_at(start)?;
            (latents / plan.to_scheduler_space(plan.sigmas[0]))?
        }
        (None, None) => {
            let noise = randn_tensor(noise_source, shape, &c.device)?;
            (noise * plan.initial_scale())?
        }
        (Some(image), None) => {
            let (_, _, ih, iw) = image.dims4()?;
            if (ih, iw) != (req.height, req.width) {
                return Err(Error::InvalidRequest(format!(
                    "init image is {iw}×{ih}, the request {}×{}",
                    req.width, req.height
                )));
            }
            // diffusers' order: encode the image (a posterior draw) unless a 9-channel model
            // starts from pure noise, then draw the noise.
            let init = if nine_channel && strength_max {
                None
            } else {
                let latents = encode_image(c, req, image, noise_source)?;
                Some(repeat_rows(&latents, req.batch_size)?)
            };
            if !strength_max {
                plan.truncate(req.strength)?;
            }
            let noise = randn_tensor(noise_source, shape, &c.device)?;
            let x = match (&init, strength_max) {
                (Some(init), false) => (init + (&noise * plan.sigmas[0])?)?,
                _ => (&noise * plan.initial_scale())?,
            };
            image_latents = init;
            initial_noise = Some(noise);
            x
        }
    };
    // Inpainting: the mask at latent resolution and the masked image's latents (always encoded,
    // so the generator advances as in diffusers, even where a 4-channel model ignores them).
    let mut extra_channels = None;
    let mut latent_mask = None;
    if let (Some(mask), Some(image)) = (&req.mask, &req.init_image) {
        let keep = mask.lt(0.5)?.to_dtype(DType::F32)?;
        let masked_image = image.broadcast_mul(&keep)?;
        let masked = encode_image(c, req, &masked_image, noise_source)?;
        let masked_latents = repeat_rows(&masked, req.batch_size)?;
        let m = repeat_rows(&resize_nearest(mask, shape.2, shape.3)?, req.batch_size)?;
        if nine_channel {
            extra_channels = Some(Tensor::cat(&[&m, &masked_latents], 1)?);
        }
        latent_mask = Some(m);
    }
    let denoiser = UNetDenoiser {
        unet: &c.unet,
        plan: &plan,
        cond,
        // The scale classifier-free guidance applies (none for a guidance-embedding U-Net,
        // which took it in `cond`).
        guidance_scale: if c.classifier_free(req.guidance_scale) {
            req.guidance_scale
        } else {
            1.0
        },
        guidance_rescale: req.guidance_rescale,
        dtype: c.compute_dtype(),
        extra_channels,
        control: match req.control.is_empty() {
            true => None,
            false => Some(crate::control::ControlRun {
                units: req
                    .control
                    .iter()
                    .map(|u| (&c.controlnets[u.net], u))
                    .collect(),
                guess_mode: req.guess_mode,
                evaluations: crate::control::count_evaluations(&plan, &x)?,
                calls: std::sync::atomic::AtomicUsize::new(0),
            }),
        },
        ip: match (&req.ip_image, &c.ip_adapter) {
            (Some(image), Some(ip)) => Some(ip.tokens(
                image,
                req.ip_scale,
                x.dim(0)?,
                c.classifier_free(req.guidance_scale),
                &c.device,
            )?),
            (Some(_), None) => {
                return Err(Error::InvalidRequest(
                    "an image prompt needs an IP-Adapter loaded".into(),
                ))
            }
            _ => None,
        },
        adapter: match req.adapter.is_empty() {
            true => None,
            false => Some(crate::control::AdapterRun::new(
                &c.adapters,
                &req.adapter,
                x.dim(0)?,
                c.classifier_free(req.guidance_scale),
                c.compute_dtype(),
                (req.steps as f64 * req.adapter_factor).floor() as usize,
            )?),
        },
    };
    let last = plan.sigmas[plan.sigmas.len() - 1];
    let mut blend;
    let hook: &mut dyn StepHook = match (&latent_mask, &image_latents, &initial_noise, nine_channel)
    {
        (Some(mask), Some(image_latents), Some(noise), false) => {
            blend = BlendHook {
                inner: hook,
                mask: mask.clone(),
                image_latents: image_latents.clone(),
                noise: noise.clone(),
                final_scale: plan.to_scheduler_space(last),
            };
            &mut blend
        }
        _ => hook,
    };
    let mut run = Run {
        denoiser: &denoiser,
        sigmas: &plan.sigmas,
        landings: plan.landings.as_deref(),
        noise: noise_source,
        hook,
    };
    let x = plan.sampler.sample(x, &mut run)?;
    let latents = (x * plan.to_scheduler_space(last))?;
    // A run that stops part-way hands its noisy latents on; there is no image to decode.
    let images = if req.denoising_end.is_some() {
        Vec::new()
    } else {
        crate::image_io::to_images(&decode_latents(c, req, &latents)?)?
    };
    Ok(Output {
        images,
        latents,
        plan,
    })
}
