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
    pub sdxl: SdxlConditioning,
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
            sdxl: SdxlConditioning::default(),
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

/// Upper bound on a single generation's working memory, in bytes: the largest attention score
/// matrix (full-resolution self-attention, f32) plus activations and weights already resident.
pub fn estimate_attention_bytes(c: &Components, req: &Request) -> u64 {
    let f = c.vae_scale_factor() as u64;
    let tokens = (req.width as u64 / f) * (req.height as u64 / f);
    let heads = c
        .unet
        .config
        .num_attention_heads
        .first()
        .copied()
        .unwrap_or(8) as u64;
    let batch = req.batch_size as u64 * if req.guidance_scale > 1.0 { 2 } else { 1 };
    let scores = batch * heads * tokens * tokens * 4;
    // The VAE's mid-block attention runs at latent resolution, one head.
    scores.max(tokens * tokens * 4)
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
    if c.folder.is_inpainting() {
        return bad("this is an inpainting model: give an init image and a mask".into());
    }
    let need = estimate_attention_bytes(c, req);
    if let Some(avail) = available_memory() {
        if c.device.is_cpu() && need > avail {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            return bad(format!(
                "{}×{} with batch {} needs about {:.1} GiB for attention alone, but only {:.1} GiB is available; \
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

/// Builds the (guided) conditioning batch: unconditional rows first.
fn conditioning(c: &Components, req: &Request) -> Result<Conditioning> {
    let b = req.batch_size;
    let positive = encode(c, &req.prompt, req.clip_skip)?;
    let guided = req.guidance_scale > 1.0;
    let sdxl = c.unet.config.text_time.is_some();
    let negative: Option<PromptEmbeds> = if !guided {
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
    let rows: Vec<&PromptEmbeds> = negative.iter().chain(std::iter::once(&positive)).collect();
    let context = Tensor::cat(
        &rows
            .iter()
            .map(|e| repeat_rows(&e.context, b))
            .collect::<Result<Vec<_>>>()?,
        0,
    )?
    .to_dtype(c.dtype)?;
    let added = if sdxl {
        let (h, w) = (req.height, req.width);
        let (oh, ow) = req.sdxl.original_size.unwrap_or((h, w));
        let (th, tw) = req.sdxl.target_size.unwrap_or((h, w));
        let (ct, cl) = req.sdxl.crops_coords_top_left;
        let ids = [oh, ow, ct, cl, th, tw].map(|v| v as f32);
        let time_ids = Tensor::new(&ids, &c.device)?.unsqueeze(0)?;
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
            text_embeds: Tensor::cat(&pooled, 0)?.to_dtype(c.dtype)?,
            time_ids: repeat_rows(&time_ids, b * rows.len())?,
        })
    } else {
        None
    };
    Ok(Conditioning { context, added })
}

/// `force_zeros_for_empty_prompt` from `model_index.json` (diffusers' SDXL default: true).
fn force_zeros_for_empty_prompt(c: &Components) -> bool {
    c.folder
        .index
        .components
        .get("force_zeros_for_empty_prompt")
        .and_then(|v| v.as_bool())
        .unwrap_or(true)
}

/// The sampling plan a request asks for.
pub fn plan_for(c: &Components, req: &Request) -> Result<Plan> {
    let sampler = match req.sampler {
        Some(s) => s,
        None => SamplerName::for_config(&c.scheduler)?,
    };
    Ok(c.scheduler
        .plan_with(sampler, &req.schedule, req.steps, req.eta)?)
}

/// Runs a txt2img or img2img request; `hook` sees every step (progress, previews, cancel).
pub fn generate(c: &Components, req: &Request, hook: &mut dyn StepHook) -> Result<Output> {
    check_request(c, req)?;
    let mut plan = plan_for(c, req)?;
    let cond = conditioning(c, req)?;
    let mut noise_source: Box<dyn NoiseSource> = match req.rng {
        RngKind::Torch => Box::new(TorchCpuRng::new(req.seed)),
        RngKind::Philox => Box::new(PhiloxRng::new(req.seed)),
    };
    let f = c.vae_scale_factor();
    let shape = (
        req.batch_size,
        c.vae.config.latent_channels,
        req.height / f,
        req.width / f,
    );
    let x = match &req.init_image {
        None => {
            let noise = randn_tensor(noise_source.as_mut(), shape, &c.device)?;
            (noise * plan.initial_scale())?
        }
        Some(image) => {
            let (_, _, ih, iw) = image.dims4()?;
            if (ih, iw) != (req.height, req.width) {
                return Err(Error::InvalidRequest(format!(
                    "init image is {iw}×{ih}, the request {}×{}",
                    req.width, req.height
                )));
            }
            // diffusers: sample the posterior with the generator, scale, then draw the noise.
            let posterior = c.vae.encode(&image.to_dtype(c.dtype)?)?;
            let eps = randn_tensor(noise_source.as_mut(), posterior.mean.shape(), &c.device)?;
            let latents = posterior
                .sample(&eps.to_dtype(c.dtype)?)?
                .to_dtype(DType::F32)?;
            let init = repeat_rows(&c.vae.scale_latents(&latents)?, req.batch_size)?;
            plan.truncate(req.strength)?;
            let noise = randn_tensor(noise_source.as_mut(), shape, &c.device)?;
            (init + (noise * plan.sigmas[0])?)?
        }
    };
    let denoiser = UNetDenoiser {
        unet: &c.unet,
        plan: &plan,
        cond,
        guidance_scale: req.guidance_scale,
        guidance_rescale: req.guidance_rescale,
        dtype: c.dtype,
        extra_channels: None,
    };
    let mut run = Run {
        denoiser: &denoiser,
        sigmas: &plan.sigmas,
        noise: noise_source.as_mut(),
        hook,
    };
    let x = plan.sampler.sample(x, &mut run)?;
    let last = plan.sigmas[plan.sigmas.len() - 1];
    let latents = (x * plan.to_scheduler_space(last))?;
    let pixels = c
        .vae
        .decode(&c.vae.unscale_latents(&latents)?.to_dtype(c.dtype)?)?;
    let images = crate::image_io::to_images(&pixels)?;
    Ok(Output {
        images,
        latents,
        plan,
    })
}
