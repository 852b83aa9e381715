//! `ldm distill`: students trained from a teacher model folder.

use crate::train::{median_line, Reporter};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, Subcommand};
use ldm_train::distill::guidance::{distill_guidance, GuidanceLoss, GuidanceOptions};
use ldm_train::distill::lcm::{distill_lcm, LcmOptions};
use ldm_train::distill::own_states::OwnStates;
use ldm_train::distill::progressive::ProgressiveOptions;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Subcommand)]
pub enum DistillCommand {
    /// Guidance distillation (Meng et al. 2023): a student with a guidance embedding that
    /// matches the teacher's classifier-free-guided prediction in one U-Net pass a step.
    Guidance(GuidanceArgs),
    /// Progressive distillation (Salimans & Ho 2022): students of half their teacher's
    /// sampling steps, halving down to --steps (OUT/steps-<n> each).
    Progressive(ProgressiveArgs),
    /// Latent consistency distillation (Luo et al. 2023): a student that samples in 1–4
    /// steps, one U-Net pass each, with the guidance scale as an input.
    Lcm(LcmArgs),
}

/// What every distiller takes: the teacher, the output and how the student trains.
#[derive(Args)]
pub struct StudentArgs {
    /// The teacher: a diffusers model folder (not itself distilled, except for
    /// `progressive`); the embedded model when omitted.
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// Output folder: the student and `distill-train/` with checkpoints (a second run
    /// resumes them).
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    batch: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    /// Guidance scales drawn per example, LOW,HIGH (diffusers' guidance_scale).
    #[arg(long, value_delimiter = ',')]
    scales: Option<Vec<f64>>,
    /// Shapes World scenes encoded by the teacher once, then sampled from.
    #[arg(long)]
    pool: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Steps between checkpoints (a killed run resumes from the last one).
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Parts of each batch computed in parallel, one thread each (default: one per core).
    #[arg(long)]
    shards: Option<usize>,
    #[command(flatten)]
    precision: crate::train::Precision,
}

#[derive(Args)]
pub struct LcmArgs {
    #[command(flatten)]
    common: StudentArgs,
    /// Training steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Width of the guidance embedding (time_cond_proj_dim; LCM-LoRA has none).
    #[arg(long, conflicts_with = "lora")]
    embedding_dim: Option<usize>,
    /// Points of the DDIM skeleton (original_inference_steps).
    #[arg(long)]
    skeleton: Option<usize>,
    /// Decay of the target network, an EMA of the student (with --lora, of the factors) and
    /// what is written out [default: 0.95; with --lora 0: the student itself, as diffusers'
    /// LCM-LoRA script].
    #[arg(long)]
    target_decay: Option<f64>,
    /// The pseudo-Huber loss's c, `√(d² + c²) − c` for each latent value [default: 0.001, as
    /// diffusers' LCM scripts]; much larger than the errors, it is the squared error / 2c.
    #[arg(long)]
    huber_c: Option<f64>,
    /// Sampling steps the student's folder defaults to (LCM-LoRA writes a LoRA file, no
    /// folder).
    #[arg(long, conflicts_with = "lora")]
    default_steps: Option<usize>,
    /// LCM-LoRA: train rank-RANK LoRA factors on the teacher (no guidance embedding) and
    /// write OUT/pytorch_lora_weights.safetensors instead of a model folder.
    #[arg(long, value_name = "RANK")]
    lora: Option<usize>,
    /// Start the student from DIR's U-Net instead of the teacher's: a guidance-distilled
    /// student of the same teacher (`ldm distill guidance`), already guided in one pass.
    #[arg(long, value_name = "DIR", conflicts_with = "lora")]
    init: Option<PathBuf>,
    /// The share of each batch drawn from the student's own few-step sampling (32 captions at
    /// --default-steps by the target network, sampled again every 100 steps); 0: only the
    /// forward process's states, as in the paper (the default).
    #[arg(long, value_name = "SHARE", conflicts_with = "lora")]
    own_states: Option<f64>,
}

/// `--own-states SHARE`: 0 turns them off, another share keeps the default's refresh.
fn own_states(arg: Option<f64>, default: Option<OwnStates>) -> Option<OwnStates> {
    match arg {
        Some(0.0) => None,
        Some(share) => Some(OwnStates {
            share,
            ..default.unwrap_or(OwnStates::with_share(share))
        }),
        None => default,
    }
}

fn lcm_options(a: &LcmArgs) -> Result<LcmOptions> {
    let (d, c) = (LcmOptions::default(), &a.common);
    Ok(LcmOptions {
        steps: a.steps.unwrap_or(d.steps),
        batch: c.batch.unwrap_or(d.batch),
        lr: c.lr.unwrap_or(d.lr),
        scales: scale_range(c.scales.as_deref(), d.scales)?,
        embedding_dim: a.embedding_dim.unwrap_or(d.embedding_dim),
        skeleton: a.skeleton.unwrap_or(d.skeleton),
        target_decay: a.target_decay,
        huber_c: a.huber_c.unwrap_or(d.huber_c),
        default_steps: a.default_steps.unwrap_or(d.default_steps),
        lora: a.lora,
        init: a.init.clone(),
        own_states: own_states(a.own_states, d.own_states),
        pool: c.pool.unwrap_or(d.pool),
        seed: c.seed,
        checkpoint_every: c.checkpoint_every.unwrap_or(d.checkpoint_every).max(1),
        shards: c.shards.unwrap_or(d.shards).max(1),
        ..d
    })
}

#[derive(Args)]
pub struct ProgressiveArgs {
    #[command(flatten)]
    common: StudentArgs,
    /// The final student's sampling steps.
    #[arg(long)]
    steps: usize,
    /// The teacher's sampling steps: the student's times a power of two.
    #[arg(long)]
    teacher_steps: Option<usize>,
    /// Training steps of each halving.
    #[arg(long)]
    train_steps: Option<usize>,
    /// Classifier-free guidance of a teacher without a guidance embedding.
    #[arg(long)]
    guidance: Option<f64>,
    /// The share of each batch drawn from each student's own sampling on its grid (32
    /// captions, sampled again every 100 steps), with its teacher's two steps from each state
    /// as the target; 0: only the forward process's states, as in the paper (the default).
    #[arg(long, value_name = "SHARE")]
    own_states: Option<f64>,
}

fn scale_range(given: Option<&[f64]>, default: (f64, f64)) -> Result<(f64, f64)> {
    Ok(match given {
        None => default,
        Some(&[lo, hi]) => (lo, hi),
        Some(other) => bail!("--scales takes LOW,HIGH, not {other:?}"),
    })
}

fn progressive_options(a: &ProgressiveArgs) -> Result<ProgressiveOptions> {
    let (d, c) = (ProgressiveOptions::default(), &a.common);
    Ok(ProgressiveOptions {
        steps: a.steps,
        teacher_steps: a.teacher_steps.unwrap_or(4 * a.steps),
        own_states: own_states(a.own_states, d.own_states),
        train_steps: a.train_steps.unwrap_or(d.train_steps),
        batch: c.batch.unwrap_or(d.batch),
        lr: c.lr.unwrap_or(d.lr),
        guidance: a.guidance.unwrap_or(d.guidance),
        scales: scale_range(c.scales.as_deref(), d.scales)?,
        pool: c.pool.unwrap_or(d.pool),
        seed: c.seed,
        checkpoint_every: c.checkpoint_every.unwrap_or(d.checkpoint_every).max(1),
        shards: c.shards.unwrap_or(d.shards).max(1),
        ..d
    })
}

#[derive(Args)]
pub struct GuidanceArgs {
    #[command(flatten)]
    common: StudentArgs,
    /// Training steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Width of the guidance embedding (time_cond_proj_dim).
    #[arg(long)]
    embedding_dim: Option<usize>,
    #[arg(long)]
    ema_decay: Option<f64>,
    /// How each example's error counts: `relative` divides it by how far guidance moves the
    /// teacher's prediction (the default), `plain` is the paper's mean squared error.
    #[arg(long, value_enum)]
    loss: Option<LossArg>,
    /// The share of each batch drawn from the student's own sampling trajectories (32 captions
    /// at the teacher's default steps, sampled again every 100 steps), with the teacher's
    /// guided prediction at each state as the target; 0: only the forward process's states,
    /// as in the paper. Default 0.75.
    #[arg(long, value_name = "SHARE")]
    own_states: Option<f64>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LossArg {
    Relative,
    Plain,
}

fn guidance_options(a: &GuidanceArgs) -> Result<GuidanceOptions> {
    let (d, c) = (GuidanceOptions::default(), &a.common);
    Ok(GuidanceOptions {
        steps: a.steps.unwrap_or(d.steps),
        batch: c.batch.unwrap_or(d.batch),
        lr: c.lr.unwrap_or(d.lr),
        scales: scale_range(c.scales.as_deref(), d.scales)?,
        embedding_dim: a.embedding_dim.unwrap_or(d.embedding_dim),
        pool: c.pool.unwrap_or(d.pool),
        ema_decay: a.ema_decay.unwrap_or(d.ema_decay),
        loss: match a.loss {
            None => d.loss,
            Some(LossArg::Relative) => GuidanceLoss::Relative,
            Some(LossArg::Plain) => GuidanceLoss::Plain,
        },
        own_states: own_states(a.own_states, d.own_states),
        seed: c.seed,
        checkpoint_every: c.checkpoint_every.unwrap_or(d.checkpoint_every).max(1),
        shards: c.shards.unwrap_or(d.shards).max(1),
        ..d
    })
}

/// Refuses an output folder that holds something other than this command's own run (a
/// resume): distilling into another model's folder would overwrite it.
fn check_out(out: &Path, state: &str) -> Result<()> {
    let foreign = out.is_dir()
        && std::fs::read_dir(out)?.next().is_some()
        && !out.join(state).join("state.json").is_file();
    if foreign {
        bail!(
            "{} is not empty and holds no {state}/ checkpoint of this command: give a new folder",
            out.display()
        );
    }
    Ok(())
}

pub fn run(cmd: DistillCommand, device: &Device) -> Result<()> {
    let started = Instant::now();
    let device = device.clone();
    match cmd {
        DistillCommand::Guidance(a) => {
            let opts = guidance_options(&a)?;
            a.common.precision.apply();
            opts.check()?;
            let teacher = crate::generate::model_path(a.common.teacher.as_deref())?;
            check_out(&a.common.out, "distill-train")?;
            let mut rep = Reporter::new(opts.steps);
            let r = distill_guidance(&teacher, &a.common.out, &opts, &device, &mut rep.progress())
                .with_context(|| format!("distilling {}", teacher.display()))?;
            let median = rep.finish();
            crate::emit(format_args!(
                "guidance-distilled student: {} steps, loss {:.5}, in {}",
                r.steps,
                r.final_loss,
                a.common.out.display()
            ));
            crate::emit(format_args!(
                "{}",
                median_line("distill", median, opts.batch)
            ));
        }
        DistillCommand::Lcm(a) => {
            let opts = lcm_options(&a)?;
            a.common.precision.apply();
            let teacher = crate::generate::model_path(a.common.teacher.as_deref())?;
            check_out(&a.common.out, "distill-train")?;
            let mut rep = Reporter::new(opts.steps);
            let r = distill_lcm(&teacher, &a.common.out, &opts, &device, &mut rep.progress())
                .with_context(|| format!("distilling {}", teacher.display()))?;
            let median = rep.finish();
            if opts.lora.is_some() {
                let file = a.common.out.join(ldm_train::distill::lcm::LORA_FILE);
                // The embedded teacher by its name, not by where it was unpacked.
                let model = match &a.common.teacher {
                    Some(dir) => dir.display().to_string(),
                    None => "shapes".into(),
                };
                crate::emit(format_args!(
                    "LCM-LoRA: {} steps, loss {:.5}, in {} (ldm generate --model {} --lora {} \
                     --sampler lcm --steps 4 --guidance 1)",
                    r.steps,
                    r.final_loss,
                    file.display(),
                    model,
                    file.display()
                ));
            } else {
                crate::emit(format_args!(
                    "latent consistency student: {} steps, loss {:.5}, in {} (ldm generate \
                     --model {} samples in {} steps)",
                    r.steps,
                    r.final_loss,
                    a.common.out.display(),
                    a.common.out.display(),
                    opts.default_steps
                ));
            }
            crate::emit(format_args!("{}", median_line("lcm", median, opts.batch)));
        }
        DistillCommand::Progressive(a) => {
            let opts = progressive_options(&a)?;
            a.common.precision.apply();
            opts.check()?;
            let teacher = crate::generate::model_path(a.common.teacher.as_deref())?;
            let foreign = a.common.out.is_dir()
                && std::fs::read_dir(&a.common.out)?.any(|e| {
                    e.map(|e| !e.file_name().to_string_lossy().starts_with("steps-"))
                        .unwrap_or(true)
                });
            if foreign {
                bail!(
                    "{} holds something other than this command's steps-<n> folders: give a new folder",
                    a.common.out.display()
                );
            }
            let mut rep = Reporter::new(opts.train_steps);
            let r = ldm_train::distill::progressive::distill_progressive(
                &teacher,
                &a.common.out,
                &opts,
                &device,
                &mut rep.progress(),
            )
            .with_context(|| format!("distilling {}", teacher.display()))?;
            let median = rep.finish();
            for (steps, loss) in &r.halvings {
                crate::emit(format_args!("{steps}-step student: final loss {loss:.5}"));
            }
            crate::emit(format_args!(
                "the {}-step student: {} (ldm generate --model {} --steps {})",
                opts.steps,
                r.folder.display(),
                r.folder.display(),
                opts.steps
            ));
            crate::emit(format_args!(
                "{}",
                median_line("halving", median, opts.batch)
            ));
        }
    }
    crate::emit(format_args!(
        "distilled in {:.1} min",
        started.elapsed().as_secs_f64() / 60.0
    ));
    Ok(())
}
