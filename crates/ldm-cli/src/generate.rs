//! `ldm generate`: parse, build a request, show progress, write PNGs with their parameters.

use crate::GenerateArgs;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};
use ldm_models::lora::LoraSpec;
use ldm_pipeline::control::{AdapterInput, ControlInput};
use ldm_pipeline::extra_networks::{prompt_loras, short_hash, PromptLoras};
use ldm_pipeline::generate::RngKind;
use ldm_pipeline::image_io::{load_image, save_png};
use ldm_pipeline::outpaint::{pad_for_outpainting, Padding};
use ldm_pipeline::{Components, Request};
use ldm_sampling::names::{SamplerName, SigmaSchedule};
use std::path::{Path, PathBuf};

fn output_path(out: &Path, index: usize, total: usize) -> PathBuf {
    if total == 1 {
        return out.to_path_buf();
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let ext = out
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    out.with_file_name(format!("{stem}-{}.{ext}", index + 1))
}

/// Merges the `--lora` files (`FILE[:MULTIPLIER]`) into the U-Net and text encoders.
pub fn apply_loras(components: &mut Components, specs: &[String]) -> Result<()> {
    let loras = specs
        .iter()
        .map(|spec| parse_lora(spec))
        .collect::<Result<Vec<_>>>()?;
    components
        .apply_loras(&loras)
        .context("applying the LoRA files")
}

/// `FILE` or `FILE:MULTIPLIER` (a path that exists as given wins over a split at its last `:`).
fn parse_lora(spec: &str) -> Result<LoraSpec> {
    if Path::new(spec).is_file() {
        return Ok(LoraSpec::new(spec, 1.0));
    }
    let (file, mult) = match spec.rsplit_once(':') {
        Some((f, m)) => match m.parse::<f64>() {
            Ok(m) if m.is_finite() => (f, m),
            _ => bail!("--lora {spec}: the multiplier after `:` must be a number"),
        },
        None => (spec, 1.0),
    };
    if !Path::new(file).is_file() {
        bail!("--lora {file}: no such file");
    }
    Ok(LoraSpec::new(file, mult))
}

/// The prompt's `<lora:…>` tags resolved in `dirs` ([`prompt_loras`]), warning of names no
/// file matched (A1111 warns and goes on; so does `ldm`, and says so in the image's
/// parameters).
fn resolve_prompt_loras(prompt: &str, dirs: &[PathBuf]) -> Result<PromptLoras> {
    let out = prompt_loras(prompt, dirs)?;
    for name in &out.missing {
        let searched = if dirs.is_empty() {
            "no folder (give --lora-dir)".to_string()
        } else {
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        eprintln!("warning: <lora:{name}>: no such LoRA in {searched}; going on without it");
    }
    Ok(out)
}

/// The model to use: the one given, or the embedded default. An embedded model's name (`shapes`, `shapes-fast`) names it unless a file or folder of
/// that name exists.
pub fn model_path(given: Option<&Path>) -> Result<PathBuf> {
    match given {
        Some(m) if m.exists() => Ok(m.to_path_buf()),
        Some(m) => match m.to_str().and_then(crate::embedded::named) {
            Some(embedded) => embedded,
            None => Ok(m.to_path_buf()),
        },
        None => crate::embedded::path(),
    }
}

/// The ControlNets of `--controlnet` loaded into `components`, with their images and weights.
fn controls(
    a: &GenerateArgs,
    components: &mut Components,
    width: usize,
    height: usize,
) -> Result<Vec<ControlInput>> {
    let n = a.controlnet.len();
    if a.control_image.len() != n {
        bail!(
            "{n} --controlnet and {} --control-image: give one image for each ControlNet",
            a.control_image.len()
        );
    }
    let scales = weights(&a.control_scale, n, "--control-scale", "--controlnet")?;
    if n == 0 && a.guess_mode {
        bail!("--guess-mode needs a --controlnet");
    }
    let mut out = Vec::with_capacity(n);
    for ((path, image), scale) in a.controlnet.iter().zip(&a.control_image).zip(scales) {
        let net = components
            .add_controlnet(path)
            .with_context(|| format!("loading the ControlNet {}", path.display()))?;
        let image = ldm_pipeline::image_io::load_control(image, width, height, &components.device)?;
        out.push(ControlInput {
            start: a.control_start,
            end: a.control_end,
            ..ControlInput::new(net, image, scale)
        });
    }
    Ok(out)
}

/// One weight for each of `n` conditioning models, from zero, one or `n` flags.
fn weights(given: &[f64], n: usize, flag: &str, model: &str) -> Result<Vec<f64>> {
    Ok(match given.len() {
        0 => vec![1.0; n],
        1 => vec![given[0]; n],
        k if k == n => given.to_vec(),
        k => bail!("{k} {flag} for {n} {model}: give one, or one for each"),
    })
}

/// The T2I-Adapters of `--t2i-adapter` loaded into `components`, with their images and weights.
fn adapters(
    a: &GenerateArgs,
    components: &mut Components,
    width: usize,
    height: usize,
) -> Result<Vec<AdapterInput>> {
    let n = a.t2i_adapter.len();
    if a.adapter_image.len() != n {
        bail!(
            "{n} --t2i-adapter and {} --adapter-image: give one image for each adapter",
            a.adapter_image.len()
        );
    }
    if !(0.0..=1.0).contains(&a.adapter_factor) {
        bail!("--adapter-factor must lie in [0, 1]");
    }
    let scales = weights(&a.adapter_scale, n, "--adapter-scale", "--t2i-adapter")?;
    let mut out = Vec::with_capacity(n);
    for ((path, image), scale) in a.t2i_adapter.iter().zip(&a.adapter_image).zip(scales) {
        let net = components
            .add_t2i_adapter(path)
            .with_context(|| format!("loading the T2I-Adapter {}", path.display()))?;
        let dev = &components.device;
        let image = match components.adapters[net].config.in_channels {
            1 => ldm_pipeline::image_io::load_control_gray(image, width, height, dev)?,
            3 => ldm_pipeline::image_io::load_control(image, width, height, dev)?,
            c => bail!("{}: an adapter for {c}-channel images", path.display()),
        };
        out.push(AdapterInput { net, image, scale });
    }
    Ok(out)
}

/// `--sampler` and `--schedule` as the user gave them: the schedule given, else the one the
/// sampler's name implies ("DPM++ 2M Karras"), else the model's own.
pub fn sampler_and_schedule(
    sampler: &Option<String>,
    schedule: &Option<String>,
) -> Result<(Option<SamplerName>, SigmaSchedule)> {
    let (sampler, implied) = match sampler {
        Some(name) => {
            let (s, sched) = SamplerName::parse(name)?;
            (Some(s), sched)
        }
        None => (None, None),
    };
    let schedule = match (schedule, implied) {
        (Some(s), _) => SigmaSchedule::parse(s)?,
        (None, Some(s)) => s,
        (None, None) => SigmaSchedule::Default,
    };
    Ok((sampler, schedule))
}

pub fn run(a: GenerateArgs, device: &Device) -> Result<()> {
    let model = model_path(a.model.as_deref())?;
    let dtype = match a.dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("unknown dtype `{other}` (f32, f16, bf16)"),
    };
    let rng = match a.rng.as_str() {
        "torch" => RngKind::Torch,
        "philox" => RngKind::Philox,
        other => bail!("unknown rng `{other}` (torch, philox)"),
    };
    let (sampler, schedule) = sampler_and_schedule(&a.sampler, &a.schedule)?;
    if a.count == 0 {
        bail!("--count must be at least 1 (the number of batches to make)");
    }
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail!("output folder {} does not exist", dir.display());
        }
    }
    let device = device.clone();
    let components = if model.is_file() {
        let Some(config) = &a.config else {
            bail!(
                "{} is a single file: give --config DIR, a diffusers folder of the same family",
                model.display()
            );
        };
        Components::load_single_file(&model, config, dtype, &device)
    } else {
        Components::load(&model, dtype, &device)
    }
    .with_context(|| format!("loading {}", model.display()))?;
    let mut components = components;
    if let Some(vae) = &a.vae {
        components
            .replace_vae(vae)
            .with_context(|| format!("loading {}", vae.display()))?;
    }
    if let Some(dir) = &a.taesd {
        components
            .use_taesd(dir)
            .with_context(|| format!("loading {}", dir.display()))?;
    }
    let mut embeddings = Vec::new();
    for dir in &a.embeddings {
        embeddings.extend(
            components
                .load_embeddings(dir)
                .with_context(|| format!("loading the embeddings in {}", dir.display()))?,
        );
    }
    let tagged = resolve_prompt_loras(&a.prompt, &a.lora_dir)?;
    let mut loras = a
        .lora
        .iter()
        .map(|spec| parse_lora(spec))
        .collect::<Result<Vec<_>>>()?;
    loras.extend(tagged.specs.iter().cloned());
    components
        .apply_loras(&loras)
        .context("applying the LoRA files")?;
    for (component, unused) in &components.unused {
        eprintln!(
            "warning: {component}: {} unused tensors ({} …)",
            unused.len(),
            unused[0]
        );
    }
    let width = a.width.unwrap_or_else(|| components.default_size());
    let height = a.height.unwrap_or_else(|| components.default_size());
    let ip_image = match (&a.ip_adapter, &a.image_encoder, &a.ip_image) {
        (None, None, None) => None,
        (Some(file), Some(encoder), Some(image)) => {
            components
                .use_ip_adapter(file, encoder)
                .with_context(|| format!("loading the IP-Adapter {}", file.display()))?;
            Some(
                image::open(image)
                    .with_context(|| format!("reading {}", image.display()))?
                    .to_rgb8(),
            )
        }
        _ => bail!("an IP-Adapter needs all three of --ip-adapter, --image-encoder and --ip-image"),
    };
    if !a.ip_scale.is_finite() {
        bail!("--ip-scale must be a finite number");
    }
    let control = controls(&a, &mut components, width, height)?;
    let adapter = adapters(&a, &mut components, width, height)?;
    let (init_image, mask) = match (&a.init_image, &a.mask, &a.outpaint) {
        (None, Some(_), _) => bail!("--mask needs --init-image"),
        (None, None, Some(_)) => bail!("--outpaint needs --init-image"),
        (Some(_), Some(_), Some(_)) => bail!("--outpaint makes its own mask; drop --mask"),
        (Some(p), None, Some(pad)) => {
            let pad: Padding = pad.parse()?;
            let w = width.checked_sub(pad.left + pad.right).filter(|&w| w > 0);
            let h = height.checked_sub(pad.top + pad.bottom).filter(|&h| h > 0);
            let (Some(w), Some(h)) = (w, h) else {
                bail!(
                    "--outpaint padding leaves no room for the image in {}×{}",
                    width,
                    height
                );
            };
            let (img, mask) = pad_for_outpainting(&load_image(p, w, h, &device)?, pad)?;
            (Some(img), Some(mask))
        }
        (Some(p), m, None) => {
            let img = load_image(p, width, height, &device)?;
            let mask = match m {
                Some(m) => Some(ldm_pipeline::image_io::load_mask(
                    m, width, height, &device,
                )?),
                None => None,
            };
            (Some(img), mask)
        }
        (None, None, None) => (None, None),
    };
    let refiner = match &a.refiner {
        Some(r) => Some(
            Components::load(r, dtype, &device)
                .with_context(|| format!("loading {}", r.display()))?,
        ),
        None => None,
    };
    let model_name = model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let hash = components.model_hash()?;
    let total = a.batch * a.count;
    for batch in 0..a.count {
        let seed = a.seed.wrapping_add(batch as u64);
        let req = Request {
            prompt: tagged.text.clone(),
            negative_prompt: a.negative.clone(),
            width,
            height,
            steps: a.steps.unwrap_or_else(|| components.default_steps()),
            guidance_scale: a.guidance.unwrap_or_else(|| components.default_guidance()),
            guidance_rescale: a
                .guidance_rescale
                .unwrap_or_else(|| components.default_guidance_rescale()),
            sampler,
            schedule: schedule.clone(),
            eta: a.eta,
            seed,
            rng,
            batch_size: a.batch,
            clip_skip: a.clip_skip,
            init_image: init_image.clone(),
            strength: a.strength,
            mask: mask.clone(),
            tiled_vae: a.tiled_vae,
            sdxl: Default::default(),
            denoising_end: None,
            denoising_start: None,
            init_latents: None,
            control: control.clone(),
            guess_mode: a.guess_mode,
            adapter: adapter.clone(),
            adapter_factor: a.adapter_factor,
            ip_image: ip_image.clone(),
            ip_scale: a.ip_scale,
        };
        let plan = ldm_pipeline::generate::plan_for(&components, &req)?;
        let bar = ProgressBar::new((plan.sigmas.len() - 1) as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} steps  {per_sec}  ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let mut hook =
            |_: &ldm_sampling::StepInfo| -> ldm_sampling::Result<Option<candle_core::Tensor>> {
                bar.inc(1);
                Ok(None)
            };
        let out = match &refiner {
            Some(r) => ldm_pipeline::generate::generate_with_refiner(
                &components,
                r,
                &req,
                a.refiner_start,
                &mut hook,
            )?,
            None => ldm_pipeline::generate(&components, &req, &mut hook)?,
        };
        bar.finish_and_clear();
        let sampler_name = match sampler {
            Some(s) => s.as_str(),
            None => SamplerName::for_config(&components.scheduler)?.as_str(),
        };
        // A1111 quotes values that hold commas (custom sigmas).
        let schedule_name = match schedule.name() {
            n if n.contains(',') => format!("\"{n}\""),
            n => n,
        };
        // The parameters keep the prompt as written, tags included, as A1111's do.
        let as_written = Request {
            prompt: a.prompt.clone(),
            ..req.clone()
        };
        let mut text = ldm_pipeline::infotext(
            &as_written,
            sampler_name,
            &schedule_name,
            &model_name,
            &hash,
        );
        if !tagged.hashes.is_empty() {
            text.push_str(&format!(", Lora hashes: \"{}\"", tagged.hashes.join(", ")));
        }
        let mut used = Vec::new();
        for (name, file) in &embeddings {
            let words = |t: &str| {
                t.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-'))
                    .any(|w| w == name)
            };
            if words(&a.prompt) || a.negative.as_deref().is_some_and(words) {
                used.push(format!("{name}: {}", short_hash(file)?));
            }
        }
        if !used.is_empty() {
            text.push_str(&format!(", TI hashes: \"{}\"", used.join(", ")));
        }
        if !tagged.missing.is_empty() {
            text.push_str(&format!(
                ", Lora not found: \"{}\"",
                tagged.missing.join(", ")
            ));
        }
        if let Some(name) = a.vae.as_ref().and_then(|v| v.file_name()) {
            text.push_str(&format!(", VAE: {}", name.to_string_lossy()));
        }
        for (i, (unit, path)) in adapter.iter().zip(&a.t2i_adapter).enumerate() {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            text.push_str(&format!(
                ", T2I-Adapter {i}: \"Model: {name}, Weight: {}, Factor: {}\"",
                unit.scale, a.adapter_factor
            ));
        }
        if let Some(file) = a.ip_adapter.as_ref().filter(|_| ip_image.is_some()) {
            let name = file
                .file_stem()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            text.push_str(&format!(
                ", IP-Adapter: \"Model: {name}, Weight: {}\"",
                a.ip_scale
            ));
        }
        // As sd-webui-controlnet records its units.
        for (i, (unit, path)) in control.iter().zip(&a.controlnet).enumerate() {
            let name = path
                .file_stem()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            text.push_str(&format!(
                ", ControlNet {i}: \"Module: none, Model: {name}, Weight: {}, Guidance Start: {}, \
                 Guidance End: {}, Control Mode: {}\"",
                unit.scale,
                unit.start,
                unit.end,
                if a.guess_mode {
                    "ControlNet is more important"
                } else {
                    "Balanced"
                }
            ));
        }
        if let Some(name) = a.taesd.as_ref().and_then(|v| v.file_name()) {
            text.push_str(&format!(", VAE: {} (TAESD)", name.to_string_lossy()));
        }
        for (i, img) in out.images.iter().enumerate() {
            let path = output_path(&a.out, batch * a.batch + i, total);
            save_png(img, &text, &path)?;
            out!("{}", path.display());
        }
    }
    Ok(())
}
