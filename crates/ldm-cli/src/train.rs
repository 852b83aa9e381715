//! `ldm train` and `ldm data`: parse, call the trainers, show progress.

use crate::progress::Bar;
use anyhow::{bail, Result};
use candle_core::Device;
use clap::{Args, Subcommand};
use ldm_train::component::InitScheme;
use ldm_train::recipe::Recipe;
use ldm_train::unet_trainer::{train_unet, TimestepSampling, UnetOptions};
use ldm_train::vae_trainer::{train_vae, VaeOptions};
use ldm_train::Progress;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Subcommand)]
pub enum TrainCommand {
    /// Train the autoencoder on Shapes World (writes OUT/vae).
    Vae(VaeArgs),
    /// Train the text encoder and U-Net on the autoencoder in OUT/vae (writes the model to OUT).
    Unet(UnetArgs),
    /// The whole recipe of the embedded model: the autoencoder, then the text encoder and U-Net.
    Shapes(ShapesArgs),
}

#[derive(Args)]
pub struct Common {
    /// Output folder: the diffusers model, and `*-train` folders with checkpoints and losses.
    #[arg(long)]
    out: PathBuf,
    /// A tiny version of the architecture, for smoke tests.
    #[arg(long)]
    miniature: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Steps between checkpoints (a killed run resumes from the last one).
    #[arg(long)]
    checkpoint_every: Option<usize>,
    #[command(flatten)]
    pub precision: Precision,
}

/// `--mixed-precision`, shared by `ldm train` and `ldm distill`.
#[derive(Args)]
pub struct Precision {
    /// `bf16`: the convolutions' and linear layers' products take bf16 operands and sum in
    /// f32, weights, gradients and AdamW stay f32 (PyTorch's bf16 autocast; diffusers' scripts
    /// call it `--mixed_precision bf16`). Faster than f32 on CPUs where AVX512-BF16 outruns
    /// the f32 FMAs (measured on an AMD EPYC); slower on an Intel Xeon without AMX.
    #[arg(long, value_enum, default_value_t = MixedPrecision::No)]
    mixed_precision: MixedPrecision,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MixedPrecision {
    No,
    Bf16,
}

impl Precision {
    /// Switches the products' precision for this process (see [`MixedPrecision`]).
    pub fn apply(&self) {
        let bf16 = self.mixed_precision == MixedPrecision::Bf16;
        ldm_models::kernels::set_bf16_products(bf16);
        if bf16 && !ldm_models::kernels::bf16_gemm::available() {
            crate::emit(format_args!(
                "note: this CPU lacks AVX512-BF16; bf16 products run in a portable loop, slower than f32"
            ));
        }
    }
}

#[derive(Args)]
pub struct VaeArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    batch: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    /// Weight of the KL term.
    #[arg(long)]
    kl_weight: Option<f64>,
    /// Train on random crops of this side (0: whole images).
    #[arg(long)]
    crop: Option<usize>,
    /// Switch the patch-based adversarial loss on at this step.
    #[arg(long)]
    disc_start: Option<usize>,
    /// Scale of the adaptive adversarial weight.
    #[arg(long)]
    disc_weight: Option<f64>,
    /// LPIPS weights (safetensors, the lpips package's VGG state dict; see
    /// tools/export_lpips.py): adds the perceptual term to the reconstruction loss.
    #[arg(long)]
    lpips: Option<PathBuf>,
    /// Weight of the LPIPS term.
    #[arg(long)]
    lpips_weight: Option<f64>,
    /// Fresh weights: torch (PyTorch's nn.Linear/nn.Conv2d defaults) or he-normal (Kaiming's
    /// normal for ReLU, candle-nn's; the Shapes recipe's autoencoder).
    #[arg(long, default_value = "torch")]
    init: InitScheme,
    /// Held-out scenes round-tripped and read back at each checkpoint.
    #[arg(long)]
    held_out: Option<usize>,
    /// Parts of each batch computed in parallel, one thread each (default: one per core).
    #[arg(long)]
    shards: Option<usize>,
    /// Start from the autoencoder in DIR (a `vae` folder or a model folder) and train only its
    /// decoder: the encoder, its latents and the scaling factor stay, so a U-Net trained on
    /// them stays valid (how sd-vae-ft-mse was made).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["vae_channels", "vae_layers", "vae_groups", "latent_channels"])]
    finetune_decoder: Option<PathBuf>,
    #[command(flatten)]
    arch: VaeArch,
}

/// The autoencoder's architecture, where it differs from the recipe's.
#[derive(Args)]
pub struct VaeArch {
    /// Widths, one per resolution (comma-separated); the downsampling factor is 2^(levels − 1).
    #[arg(long, value_delimiter = ',')]
    vae_channels: Option<Vec<usize>>,
    /// ResNet blocks per level.
    #[arg(long)]
    vae_layers: Option<usize>,
    /// GroupNorm groups.
    #[arg(long)]
    vae_groups: Option<usize>,
    #[arg(long)]
    latent_channels: Option<usize>,
}

impl VaeArch {
    fn apply(&self, r: &mut Recipe) -> Result<()> {
        if let Some(c) = &self.vae_channels {
            r.vae_channels = c.clone();
        }
        if let Some(n) = self.vae_layers {
            r.vae_layers = n;
        }
        if let Some(g) = self.vae_groups {
            r.vae_groups = g;
        }
        if let Some(c) = self.latent_channels {
            r.latent_channels = c;
        }
        if r.vae_channels.is_empty() || r.vae_channels.contains(&0) || r.vae_layers == 0 {
            bail!("--vae-channels and --vae-layers must be positive");
        }
        if r.vae_groups == 0
            || r.vae_channels
                .iter()
                .any(|c| !c.is_multiple_of(r.vae_groups))
        {
            bail!("every --vae-channels width must be a multiple of --vae-groups");
        }
        if r.latent_channels == 0 || !r.image_size.is_multiple_of(r.downsample_factor()) {
            bail!("--latent-channels must be positive and the factor must divide the image");
        }
        Ok(())
    }
}

#[derive(Args)]
pub struct UnetArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    batch: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    /// epsilon, v_prediction or sample.
    #[arg(long, default_value = "epsilon")]
    prediction: String,
    /// uniform, lognormal (EDM's ln σ ~ N(−1.2, 1.2)) or lognormal:MEAN,STD timestep sampling.
    #[arg(long, default_value = "uniform")]
    timesteps: String,
    /// Rescale the noise schedule to zero terminal SNR (needs v_prediction or sample); the
    /// model's scheduler then samples with trailing timesteps.
    #[arg(long)]
    zero_terminal_snr: bool,
    /// Probability of training on the empty caption (for classifier-free guidance).
    #[arg(long)]
    caption_dropout: Option<f64>,
    #[arg(long)]
    ema_decay: Option<f64>,
    /// min-SNR-γ loss weighting (e.g. 5).
    #[arg(long)]
    min_snr_gamma: Option<f64>,
    /// A floor under the loss weight (min-SNR-γ's, or the ε loss's): keeps the pure-noise step
    /// of a zero-terminal-SNR schedule in the loss (e.g. 0.1).
    #[arg(long)]
    snr_weight_floor: Option<f64>,
    /// Weigh the latent cells the scene's objects cover 1 + this in the loss (each image's
    /// weights averaging 1); 0 leaves the loss plain. Experimental: it biases the model towards
    /// larger and more objects (docs/shapes-research.md).
    #[arg(long, default_value_t = 0.0)]
    object_weight: f64,
    /// Weight of a token-level grounding loss (TokenCompose's): each object word's
    /// cross-attention should fall on its object, the position word's included; 0 leaves it
    /// out. Experimental (docs/shapes-research.md).
    #[arg(long, default_value_t = 0.0)]
    attention_grounding: f64,
    /// Weight of an auxiliary mask loss: a linear head on the U-Net's last features predicts
    /// where each named object lies (the renderer's masks), dropped when the model is written;
    /// 0 leaves it out. Experimental (docs/shapes-research.md).
    #[arg(long, default_value_t = 0.0)]
    layout_head: f64,
    /// A share of each batch (each example with this probability) drawn from the noisiest
    /// steps, ln σ ~ N(3, 0.5) (t ≈ 800–960), where a layout is decided and the recipe's
    /// timesteps hardly go; 0 leaves them out. Experimental (docs/shapes-research.md).
    #[arg(long, default_value_t = 0.0)]
    noisy_share: f64,
    /// Start the U-Net's residual branches and its output convolution at zero (the resnets'
    /// conv2, the transformers' proj_out, conv_out), as the latent-diffusion code does.
    #[arg(long)]
    zero_init: bool,
    /// Scenes rendered and encoded up front.
    #[arg(long)]
    pool: Option<usize>,
    /// Parts of each batch computed in parallel, one thread each (default: one per core).
    #[arg(long)]
    shards: Option<usize>,
    /// U-Net steps between snapshots: the EMA model as a loadable folder in
    /// `unet-train/snapshots/step-N`, all kept (to measure adherence against training time).
    #[arg(long)]
    snapshot_every: Option<usize>,
}

#[derive(Args)]
pub struct ShapesArgs {
    #[command(flatten)]
    common: Common,
    /// Autoencoder steps.
    #[arg(long)]
    vae_steps: Option<usize>,
    /// U-Net steps.
    #[arg(long)]
    unet_steps: Option<usize>,
    /// U-Net steps between snapshots: the EMA model as a loadable folder in
    /// `unet-train/snapshots/step-N`, all kept (to measure adherence against training time).
    #[arg(long)]
    snapshot_every: Option<usize>,
}

/// A training phase's front-end: the progress bar, the checkpoints' notes above it, and the
/// wall time between consecutive steps (for the median step time printed at the end).
pub struct Reporter {
    pb: Bar,
    last: Option<Instant>,
    step_seconds: Vec<f64>,
}

impl Reporter {
    pub fn new(total: usize) -> Self {
        Self {
            pb: Bar::new(total, true),
            last: None,
            step_seconds: Vec::new(),
        }
    }

    pub fn progress(&mut self) -> impl FnMut(&Progress) + '_ {
        move |p: &Progress| {
            let pb = &mut self.pb;
            pb.set_prefix(p.phase);
            pb.set_length(p.total);
            pb.set_message(format!("loss {:.4}", p.loss));
            pb.set_position(p.step);
            match &p.note {
                Some(note) => pb.println(format!("{} step {}: {note}", p.phase, p.step)),
                None => {
                    let now = Instant::now();
                    if let Some(last) = self.last.replace(now) {
                        self.step_seconds.push((now - last).as_secs_f64());
                    }
                }
            }
        }
    }

    /// Finishes the bar; the median wall time of a step (checkpoints included), if any was
    /// timed.
    pub fn finish(mut self) -> Option<f64> {
        self.pb.finish();
        let v = &mut self.step_seconds;
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| v[v.len() / 2])
    }
}

pub fn median_line(phase: &str, seconds: Option<f64>, batch: usize) -> String {
    match seconds {
        Some(s) => format!(
            "{phase}: median step {s:.4} s, {:.1} samples/s",
            batch as f64 / s
        ),
        None => format!("{phase}: no step timed"),
    }
}

fn recipe(c: &Common) -> Recipe {
    if c.miniature {
        Recipe::miniature()
    } else {
        Recipe::default()
    }
}

fn vae_options(a: &VaeArgs) -> VaeOptions {
    let d = VaeOptions::default();
    VaeOptions {
        steps: a.steps.unwrap_or(d.steps),
        batch: a.batch.unwrap_or(d.batch),
        lr: a.lr.unwrap_or(d.lr),
        kl_weight: a.kl_weight.unwrap_or(d.kl_weight),
        crop: match a.crop {
            Some(0) => None,
            Some(c) => Some(c),
            None => d.crop,
        },
        seed: a.common.seed,
        checkpoint_every: a
            .common
            .checkpoint_every
            .unwrap_or(d.checkpoint_every)
            .max(1),
        disc_start: a.disc_start,
        disc_weight: a.disc_weight.unwrap_or(d.disc_weight),
        lpips: a.lpips.clone(),
        lpips_weight: a.lpips_weight.unwrap_or(d.lpips_weight),
        init: a.init,
        held_out: a.held_out.unwrap_or(d.held_out),
        shards: a.shards.unwrap_or(d.shards).max(1),
        // A model folder names its autoencoder.
        finetune_decoder: a.finetune_decoder.as_ref().map(|p| {
            if p.join("vae/config.json").is_file() {
                p.join("vae")
            } else {
                p.clone()
            }
        }),
        ..d
    }
}

fn unet_options(a: &UnetArgs) -> Result<UnetOptions> {
    let d = UnetOptions::default();
    let prediction = match a.prediction.as_str() {
        "epsilon" | "eps" => ldm_sampling::Prediction::Epsilon,
        "v_prediction" | "v" => ldm_sampling::Prediction::V,
        "sample" | "x0" => ldm_sampling::Prediction::Sample,
        other => bail!("unknown prediction `{other}` (epsilon, v_prediction, sample)"),
    };
    let timesteps = match a.timesteps.as_str() {
        "uniform" => TimestepSampling::Uniform,
        "lognormal" => TimestepSampling::LogNormal {
            mean: -1.2,
            std: 1.2,
        },
        other => match other
            .strip_prefix("lognormal:")
            .and_then(|r| r.split_once(','))
            .and_then(|(m, s)| Some((m.trim().parse::<f64>().ok()?, s.trim().parse::<f64>().ok()?)))
        {
            Some((mean, std)) if mean.is_finite() && std.is_finite() && std > 0.0 => {
                TimestepSampling::LogNormal { mean, std }
            }
            _ => bail!(
                "unknown timestep sampling `{other}` (uniform, lognormal or lognormal:MEAN,STD of ln σ)"
            ),
        },
    };
    let opts = UnetOptions {
        steps: a.steps.unwrap_or(d.steps),
        batch: a.batch.unwrap_or(d.batch),
        lr: a.lr.unwrap_or(d.lr),
        prediction,
        timesteps,
        caption_dropout: a.caption_dropout.unwrap_or(d.caption_dropout),
        ema_decay: a.ema_decay.unwrap_or(d.ema_decay),
        min_snr_gamma: a.min_snr_gamma,
        snr_weight_floor: a.snr_weight_floor,
        object_weight: a.object_weight,
        attention_grounding: a.attention_grounding,
        layout_head: a.layout_head,
        extra_timesteps: (a.noisy_share > 0.0).then_some((
            a.noisy_share,
            TimestepSampling::LogNormal {
                mean: 3.0,
                std: 0.5,
            },
        )),
        zero_init: a.zero_init,
        zero_terminal_snr: a.zero_terminal_snr,
        pool: a.pool.unwrap_or(d.pool),
        shards: a.shards.unwrap_or(d.shards).max(1),
        seed: a.common.seed,
        checkpoint_every: a
            .common
            .checkpoint_every
            .unwrap_or(d.checkpoint_every)
            .max(1),
        snapshot_every: a.snapshot_every.filter(|&n| n > 0),
        ..d
    };
    if !(0.0..=1.0).contains(&opts.caption_dropout) || !(0.0..1.0).contains(&opts.ema_decay) {
        bail!("caption dropout must lie in [0, 1] and the EMA decay in [0, 1)");
    }
    if opts.steps == 0 || opts.batch == 0 || opts.pool == 0 {
        bail!("steps, batch and pool must be at least 1");
    }
    if opts
        .min_snr_gamma
        .is_some_and(|g| !(g.is_finite() && g > 0.0))
        || opts
            .snr_weight_floor
            .is_some_and(|f| !(f.is_finite() && f > 0.0))
    {
        bail!("--min-snr-gamma and --snr-weight-floor must be positive numbers");
    }
    if !(opts.attention_grounding.is_finite() && opts.attention_grounding >= 0.0) {
        bail!("--attention-grounding must be a finite number ≥ 0");
    }
    if !(0.0..=1.0).contains(&a.noisy_share) {
        bail!("--noisy-share must lie in [0, 1]");
    }
    if !(opts.layout_head.is_finite() && opts.layout_head >= 0.0) {
        bail!("--layout-head must be a finite number ≥ 0");
    }
    if !(opts.object_weight.is_finite() && opts.object_weight >= 0.0) {
        bail!("--object-weight must be a finite number ≥ 0");
    }
    if opts.zero_terminal_snr && opts.prediction == ldm_sampling::Prediction::Epsilon {
        bail!("--zero-terminal-snr needs --prediction v_prediction or sample");
    }
    Ok(opts)
}

fn check_vae(o: &VaeOptions) -> Result<()> {
    if o.steps == 0 || o.batch == 0 || o.held_out == 0 {
        bail!("steps, batch and held-out must be at least 1");
    }
    if o.crop.is_some_and(|c| c < 8 || c % 8 != 0) {
        bail!("--crop must be a multiple of 8 (at least 8)");
    }
    if !(o.lpips_weight.is_finite() && o.lpips_weight >= 0.0) {
        bail!("--lpips-weight must be a finite number ≥ 0");
    }
    if o.lpips.is_some() && o.crop.is_some_and(|c| c < 16) {
        bail!("LPIPS needs crops of at least 16 pixels");
    }
    Ok(())
}

/// Trains the autoencoder with a progress bar and prints its report.
fn vae(r: &Recipe, o: &VaeOptions, out: &Path, device: &Device) -> Result<()> {
    check_vae(o)?;
    std::fs::create_dir_all(out)?;
    let mut rep = Reporter::new(o.steps);
    let v = train_vae(r, o, out, device, &mut rep.progress())?;
    let median = rep.finish();
    let lpips = v
        .lpips
        .map(|d| format!(", LPIPS {d:.4}"))
        .unwrap_or_default();
    crate::emit(format_args!(
        "autoencoder: {} steps, loss {:.4}, held-out PSNR {:.2} dB{lpips}, scaling factor {:.5}",
        v.steps, v.final_loss, v.readback.psnr, v.scaling_factor
    ));
    crate::emit(format_args!(
        "{}",
        median_line("autoencoder", median, o.batch)
    ));
    crate::data::print_round_trip(&v.readback, o.held_out)
}

/// Trains the text encoder and U-Net with a progress bar and prints the report.
fn unet(r: &Recipe, o: &UnetOptions, out: &Path, device: &Device) -> Result<()> {
    let mut rep = Reporter::new(o.steps);
    let u = train_unet(r, o, out, device, &mut rep.progress())?;
    let median = rep.finish();
    crate::emit(format_args!(
        "text encoder + U-Net: {} steps, loss {:.4}",
        u.steps, u.final_loss
    ));
    crate::emit(format_args!(
        "{}",
        median_line("text encoder + U-Net", median, o.batch)
    ));
    Ok(())
}

pub fn run(cmd: TrainCommand, device: &Device) -> Result<()> {
    let device = device.clone();
    let started = Instant::now();
    match cmd {
        TrainCommand::Vae(a) => {
            a.common.precision.apply();
            let mut r = recipe(&a.common);
            a.arch.apply(&mut r)?;
            vae(&r, &vae_options(&a), &a.common.out, &device)?
        }
        TrainCommand::Unet(a) => {
            a.common.precision.apply();
            unet(
                &recipe(&a.common),
                &unet_options(&a)?,
                &a.common.out,
                &device,
            )?
        }
        TrainCommand::Shapes(a) => {
            a.common.precision.apply();
            let r = recipe(&a.common);
            std::fs::create_dir_all(&a.common.out)?;
            // The embedded model's recipe (its wall time is in the README): v-prediction on a
            // zero-terminal-SNR schedule, so that the caption — not colour left in the initial
            // noise — decides the picture.
            let mut vo = VaeOptions {
                seed: a.common.seed,
                // 12 000 steps: the read-back of held-out scenes still climbs at 8000
                // (docs/shapes-research.md); 2500 left corners rounded.
                steps: 12_000,
                batch: 16,
                lr: 3e-3,
                crop: Some(32),
                held_out: 300,
                checkpoint_every: 1000,
                // Kaiming's normal start: 30.6 dB held-out PSNR against 29.7 dB from
                // PyTorch's default (one run each, otherwise this recipe).
                init: InitScheme::HeNormal,
                ..VaeOptions::default()
            };
            let mut uo = UnetOptions {
                seed: a.common.seed,
                batch: 16,
                // One cosine over 24 000 steps: on the 8-channel latents the shapes come once
                // the model has seen about 250 000 samples (docs/shapes-research.md).
                steps: 24_000,
                lr: 5e-4,
                prediction: ldm_sampling::Prediction::V,
                // Centred on the middle of the schedule (ln σ = 0.5, t ≈ 500), where objects
                // take their place and shape; uniform t spends a fifth of the steps on t > 800,
                // nearly pure noise under zero terminal SNR.
                timesteps: TimestepSampling::LogNormal {
                    mean: 0.5,
                    std: 1.2,
                },
                zero_terminal_snr: true,
                min_snr_gamma: Some(5.0),
                snr_weight_floor: Some(0.1),
                ema_decay: 0.998,
                pool: 12_000,
                snapshot_every: a.snapshot_every.filter(|&n| n > 0),
                ..UnetOptions::default()
            };
            if let Some(s) = a.vae_steps {
                vo.steps = s;
            }
            if let Some(s) = a.unet_steps {
                uo.steps = s;
            }
            if let Some(n) = a.common.checkpoint_every {
                vo.checkpoint_every = n.max(1);
                uo.checkpoint_every = n.max(1);
            }
            if a.common.miniature {
                vo.held_out = 8;
                uo.pool = 64;
                uo.batch = 4;
            }
            vae(&r, &vo, &a.common.out, &device)?;
            unet(&r, &uo, &a.common.out, &device)?;
        }
    }
    crate::emit(format_args!(
        "trained in {:.1} min",
        started.elapsed().as_secs_f64() / 60.0
    ));
    Ok(())
}
