//! `ldm data` and `ldm eval`: Shapes World images, prompt lists, and the evaluator.

use crate::progress::Bar;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ldm_train::shapes::{render::render, Scene, SIZES};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Render Shapes World scenes: OUT/NNNNNNNN.png and OUT/captions.jsonl.
    Shapes(ShapesData),
    /// Write a prompt list (one caption a line) drawn from a seed kept out of training.
    Prompts(PromptList),
}

#[derive(Args)]
pub struct ShapesData {
    #[arg(long)]
    count: usize,
    /// Canvas side: 64, 128 or 256.
    #[arg(long, default_value_t = 64)]
    size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// First scene index.
    #[arg(long, default_value_t = 0)]
    start: u64,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct PromptList {
    #[arg(long)]
    count: usize,
    /// Only scenes with this many objects (1 or 2).
    #[arg(long)]
    objects: Option<usize>,
    #[arg(long, default_value_t = 1_000_003)]
    seed: u64,
    #[arg(long)]
    out: PathBuf,
}

fn check_size(size: usize) -> Result<()> {
    if !SIZES.contains(&size) {
        bail!("--size must be one of {SIZES:?} (the spec's canvases)");
    }
    Ok(())
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Shapes(a) => {
            check_size(a.size)?;
            std::fs::create_dir_all(&a.out)
                .with_context(|| format!("creating {}", a.out.display()))?;
            let mut lines = String::new();
            for i in a.start..a.start + a.count as u64 {
                let scene = Scene::generate(a.seed, i, a.size);
                let file = format!("{i:08}.png");
                ldm_train::io::write_png(&a.out.join(&file), &render(&scene), a.size)?;
                let row = serde_json::json!({
                    "file": file, "caption": scene.caption(), "seed": a.seed, "index": i,
                });
                lines += &row.to_string();
                lines.push('\n');
            }
            ldm_train::io::write_atomic(&a.out.join("captions.jsonl"), lines.as_bytes())?;
            crate::emit(format_args!(
                "wrote {} scenes to {}",
                a.count,
                a.out.display()
            ));
        }
        DataCommand::Prompts(a) => {
            if let Some(n) = a.objects {
                if !(1..=2).contains(&n) {
                    bail!("--objects must be 1 or 2");
                }
            }
            let mut out = String::new();
            let (mut i, mut n) = (0u64, 0usize);
            while n < a.count {
                let scene = Scene::generate(a.seed, i, 64);
                i += 1;
                if a.objects.is_some_and(|k| k != scene.objects.len()) {
                    continue;
                }
                out += &scene.caption();
                out.push('\n');
                n += 1;
            }
            ldm_train::io::write_atomic(&a.out, out.as_bytes())?;
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Generate each prompt with several seeds and read the images back (Shapes World spec);
    /// or, with --images, read back images made elsewhere.
    Shapes(EvalShapes),
}

#[derive(Args)]
pub struct EvalShapes {
    /// A diffusers folder; the embedded model when omitted.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A file of Shapes World captions, one a line.
    #[arg(long, required_unless_present_any = ["images", "autoencoder"])]
    prompts: Option<PathBuf>,
    /// Instead of generating: a folder of images made elsewhere, listed with their captions in
    /// its captions.jsonl (`{"caption": …, "file": …}` a line, as `ldm data shapes` writes).
    #[arg(long, conflicts_with_all = ["model", "prompts"])]
    images: Option<PathBuf>,
    /// Images per prompt.
    #[arg(long, default_value_t = 4)]
    seeds: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sampling steps (`ldm generate`'s default: the model's own).
    #[arg(long)]
    steps: Option<usize>,
    /// Guidance scale (`ldm generate`'s default: the model's own).
    #[arg(long)]
    guidance: Option<f64>,
    /// Guidance rescale φ (Lin et al. 2024); `ldm generate`'s default: 0.7 for
    /// zero-terminal-SNR models (the embedded one), else 0.
    #[arg(long)]
    guidance_rescale: Option<f64>,
    /// Sampler name, as `ldm generate` takes it (ldm's, ComfyUI's or A1111's); the model's own
    /// by default.
    #[arg(long)]
    sampler: Option<String>,
    /// Sigma schedule, as `ldm generate` takes it; the one the sampler's name implies ("DPM++
    /// 2M Karras"), else the model's own.
    #[arg(long)]
    schedule: Option<String>,
    /// Noise strength of DDIM / ancestral samplers; TCD's gamma (0 unless given).
    #[arg(long)]
    eta: Option<f64>,
    /// Image side in pixels.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Instead of generating: round-trip held-out scenes through an autoencoder (a `vae`
    /// folder, or a model folder holding one; the embedded model's when no folder is given)
    /// and read the reconstructions back.
    #[arg(long, num_args = 0..=1, value_name = "DIR", conflicts_with_all = ["prompts", "images", "model"])]
    autoencoder: Option<Option<PathBuf>>,
    /// Held-out scenes for --autoencoder.
    #[arg(long, default_value_t = 1000)]
    scenes: usize,
    /// Also generate each prompt and seed with this teacher (its own sampler, at
    /// --teacher-steps and the same guidance) and report the mean latent PSNR of the model's
    /// results against the teacher's: how closely a distilled student follows its teacher.
    #[arg(long)]
    teacher: Option<PathBuf>,
    #[arg(long, default_value_t = 50)]
    teacher_steps: usize,
    /// A U-Net LoRA file merged into the model, FILE or FILE:MULTIPLIER (as `ldm generate`).
    #[arg(long)]
    lora: Vec<String>,
    /// Keep the generated images (or with --autoencoder the reconstructions) in DIR: PNGs and
    /// a captions.jsonl (read back by --images), each line with the image's seed (the scene's
    /// index) and what the reader made of it.
    #[arg(long, value_name = "DIR", conflicts_with = "images")]
    save: Option<PathBuf>,
}

pub fn eval(cmd: EvalCommand, device: &candle_core::Device) -> Result<()> {
    let EvalCommand::Shapes(a) = cmd;
    if let Some(dir) = &a.autoencoder {
        return eval_autoencoder(dir.as_deref(), a.scenes, a.size, a.save.as_deref(), device);
    }
    if let Some(dir) = &a.images {
        let mut pb = Bar::new(0, false);
        let report = ldm_train::eval::evaluate_folder(dir, &mut |d, n| {
            pb.set_length(n);
            pb.set_position(d)
        })?;
        pb.finish_and_clear();
        crate::emit(format_args!("images in {}", dir.display()));
        return print_report(&report);
    }
    let Some(prompts_file) = &a.prompts else {
        bail!("--prompts or --images is needed");
    };
    let text = std::fs::read_to_string(prompts_file)
        .with_context(|| format!("reading {}", prompts_file.display()))?;
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if prompts.is_empty() {
        bail!("{} holds no prompts", prompts_file.display());
    }
    if a.seeds == 0 || a.steps == Some(0) {
        bail!("--seeds and --steps must be at least 1");
    }
    let model = crate::generate::model_path(a.model.as_deref())?;
    let device = device.clone();
    let mut components = ldm_pipeline::Components::load(&model, candle_core::DType::F32, &device)
        .with_context(|| format!("loading {}", model.display()))?;
    crate::generate::apply_loras(&mut components, &a.lora)?;
    let (sampler, schedule) = crate::generate::sampler_and_schedule(&a.sampler, &a.schedule)?;
    let steps = a.steps.unwrap_or_else(|| components.default_steps());
    let guidance = a.guidance.unwrap_or_else(|| components.default_guidance());
    let guidance_rescale = a
        .guidance_rescale
        .unwrap_or_else(|| components.default_guidance_rescale());
    let opts = ldm_train::eval::EvalOptions {
        seeds: a.seeds,
        seed: a.seed,
        size: a.size,
        request: ldm_pipeline::Request {
            steps,
            guidance_scale: guidance,
            guidance_rescale,
            sampler,
            schedule,
            eta: a.eta,
            ..Default::default()
        },
        save: a.save.clone(),
    };
    let teacher = match &a.teacher {
        Some(dir) => {
            let dir = crate::generate::model_path(Some(dir))?;
            let c = ldm_pipeline::Components::load(&dir, candle_core::DType::F32, &device)
                .with_context(|| format!("loading {}", dir.display()))?;
            let request = ldm_pipeline::Request {
                steps: a.teacher_steps,
                guidance_scale: guidance,
                guidance_rescale: a
                    .guidance_rescale
                    .unwrap_or_else(|| c.default_guidance_rescale()),
                ..Default::default()
            };
            Some((c, request))
        }
        None => None,
    };
    let mut pb = Bar::new(prompts.len(), false);
    let started = std::time::Instant::now();
    let (report, psnr) = ldm_train::eval::evaluate_against(
        &components,
        &prompts,
        &opts,
        teacher.as_ref().map(|(c, r)| (c, r)),
        &mut |d, _| pb.set_position(d),
    )?;
    let seconds = started.elapsed().as_secs_f64();
    pb.finish_and_clear();
    if let Some(psnr) = psnr {
        crate::emit(format_args!(
            "latent PSNR against the teacher ({} steps): {psnr:.2} dB",
            a.teacher_steps
        ));
    } else {
        crate::emit(format_args!(
            "{} images in {seconds:.1} s ({:.3} s an image)",
            prompts.len() * a.seeds,
            seconds / (prompts.len() * a.seeds) as f64
        ));
    }
    crate::emit(format_args!(
        "{} prompts × {} seeds, {} steps, guidance {} (rescale {})",
        prompts.len(),
        a.seeds,
        steps,
        guidance,
        guidance_rescale
    ));
    print_report(&report)
}

/// The eval table: exact match, count and each attribute's rate, one- and two-object prompts.
fn print_report(report: &ldm_train::eval::EvalReport) -> Result<()> {
    crate::emit(format_args!(
        "{:<14} {:>12} {:>12}",
        "", "one object", "two objects"
    ));
    let fmt = |r: Option<f64>| r.map_or("—".to_string(), |v| format!("{:.1}%", 100.0 * v));
    let (one, two) = (report.one.rows(), report.two.rows());
    for ((name, a), (_, b)) in one.iter().zip(&two) {
        crate::emit(format_args!("{name:<14} {:>12} {:>12}", fmt(*a), fmt(*b)));
    }
    crate::emit(format_args!(
        "{:<14} {:>12} {:>12}",
        "images", report.one.images, report.two.images
    ));
    Ok(())
}

/// `ldm eval shapes --autoencoder [DIR]`.
fn eval_autoencoder(
    dir: Option<&Path>,
    scenes: usize,
    size: usize,
    save: Option<&Path>,
    device: &candle_core::Device,
) -> Result<()> {
    if scenes == 0 {
        bail!("--scenes must be at least 1");
    }
    if !SIZES.contains(&size) {
        bail!("--size must be one of {SIZES:?}");
    }
    let dir = match dir {
        Some(d) if d.join("vae").join("config.json").is_file() => d.join("vae"),
        Some(d) => d.to_path_buf(),
        None => crate::embedded::path()?.join("vae"),
    };
    let device = device.clone();
    let vae = ldm_train::unet_trainer::load_vae(&dir, &device)
        .with_context(|| format!("loading the autoencoder in {}", dir.display()))?;
    let factor = vae.config.downsample_factor();
    if !size.is_multiple_of(factor) {
        bail!("--size {size} is not a multiple of the autoencoder's factor {factor}");
    }
    let mut pb = Bar::new(scenes, false);
    let r = ldm_train::eval::round_trip_saved(&vae, scenes, size, &device, save, &mut |d, _| {
        pb.set_position(d)
    })?;
    pb.finish_and_clear();
    crate::emit(format_args!(
        "autoencoder {}: {scenes} held-out scenes at {size} px",
        dir.display()
    ));
    print_round_trip(&r, scenes)
}

/// The round-trip table: read back against everything drawn, then against the captions.
pub fn print_round_trip(r: &ldm_train::eval::RoundTrip, scenes: usize) -> Result<()> {
    crate::emit(format_args!(
        "read back as everything drawn (every object's shape, colour, size; the background):"
    ));
    print_report(&r.drawn)?;
    crate::emit(format_args!("read back as the captions state:"));
    print_report(&r.caption)?;
    crate::emit(format_args!(
        "PSNR {:.2} dB over {scenes} scenes; exact (everything drawn, worse of one/two objects) {:.2} %",
        r.psnr,
        100.0 * r.worst_exact()
    ));
    Ok(())
}
