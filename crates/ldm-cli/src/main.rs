//! `ldm`: the command-line front-end. It parses arguments, calls the libraries, and prints;
//! no tensor math lives here.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use ldm_models::model::ModelFolder;
use ldm_pipeline::device::DeviceChoice;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `println!` that ends the program quietly when stdout is a closed pipe (`ldm info … | head`)
/// instead of panicking.
macro_rules! out {
    ($($t:tt)*) => { $crate::emit(format_args!($($t)*)) };
}

pub(crate) fn emit(args: std::fmt::Arguments) {
    use std::io::Write;
    if let Err(e) = writeln!(std::io::stdout().lock(), "{args}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}

mod bench;
mod data;
mod distill;
mod embedded;
mod generate;
mod progress;
mod serve;
mod train;

#[derive(Parser)]
#[command(
    name = "ldm",
    version,
    about = "Stable Diffusion (latent diffusion) in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Where to compute: cpu, cuda, cuda:N, or auto (the first GPU when this build has CUDA
    /// and one is present, else the CPU).
    #[arg(long, global = true, default_value = "auto")]
    device: DeviceChoice,
}

#[derive(Subcommand)]
enum Command {
    /// Time the SD1.5 and SDXL architectures (random weights made in process): U-Net step,
    /// VAE decode, text encoding, whole generation.
    Bench(bench::BenchArgs),
    /// Train models in Rust (the autoencoder, the text encoder and the U-Net).
    #[command(subcommand)]
    Train(train::TrainCommand),
    /// Distil a model into a faster student (guidance distillation: one U-Net pass a step).
    #[command(subcommand)]
    Distill(distill::DistillCommand),
    /// Copy a diffusers folder with its weights cast to another dtype (e.g. f16 to halve it).
    Convert {
        /// The diffusers folder to read.
        model: PathBuf,
        /// f32, f16 or bf16.
        #[arg(long, default_value = "f16")]
        dtype: String,
        /// The folder to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Make data: Shapes World images and prompt lists.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Evaluate a model against its world (Shapes World's reader).
    #[command(subcommand)]
    Eval(data::EvalCommand),
    /// Describe a model folder: family, prediction type, parameters, dtypes, latent scaling.
    Info {
        /// A diffusers model folder (with model_index.json).
        model: PathBuf,
        /// Also build every network from its weights (strict: every tensor present with the
        /// right shape) and list tensors the networks do not use.
        #[arg(long)]
        check: bool,
    },
    /// Generate images from a prompt (txt2img; img2img with --init-image).
    Generate(Box<GenerateArgs>),
    /// Serve the model over HTTP: A1111's API, OpenAI's images API, a job API with
    /// server-sent events, and a web page.
    Serve(Box<serve::ServeArgs>),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// The prompt.
    prompt: String,
    /// A diffusers model folder or an original-layout single-file .safetensors checkpoint, or
    /// an embedded model's name: `shapes` (the default) or `shapes-fast` (its 4-step student;
    /// a path that exists wins).
    #[arg(long)]
    model: Option<PathBuf>,
    /// For a single-file --model: a diffusers folder of the same family whose configs,
    /// tokenizers and scheduler to use (single files carry none).
    #[arg(long)]
    config: Option<PathBuf>,
    /// A separate VAE file (.safetensors or .ckpt; diffusers or original keys).
    #[arg(long)]
    vae: Option<PathBuf>,
    /// A tiny autoencoder (TAESD: a diffusers `AutoencoderTiny` folder such as
    /// madebyollin/taesd) to encode and decode with instead of the model's own: far faster,
    /// softer pictures.
    #[arg(long)]
    taesd: Option<PathBuf>,
    /// A LoRA file merged into the U-Net and text encoders, FILE or FILE:MULTIPLIER (default
    /// 1); may be repeated. diffusers/PEFT and kohya names. The prompt may also name LoRAs as
    /// A1111 does, `<lora:NAME:W>` or `<lora:NAME:TE_W:UNET_W>`, found in --lora-dir.
    #[arg(long)]
    lora: Vec<String>,
    /// A folder of LoRA files that `<lora:NAME…>` tags in the prompt name by file stem (or by
    /// the `ss_output_name` a kohya file records); may be repeated.
    #[arg(long)]
    lora_dir: Vec<PathBuf>,
    /// A folder of textual-inversion embeddings (A1111 `.safetensors`, SDXL `clip_l`/`clip_g`,
    /// diffusers `learned_embeds`): each file's stem becomes a word prompts can use; may be
    /// repeated.
    #[arg(long)]
    embeddings: Vec<PathBuf>,
    /// A ControlNet: a diffusers `ControlNetModel` folder or an original (lllyasviel)
    /// `.safetensors` file; may be repeated (their residuals add), each with its own
    /// --control-image.
    #[arg(long)]
    controlnet: Vec<PathBuf>,
    /// The conditioning image of each --controlnet, in order (resized to the output size).
    #[arg(long)]
    control_image: Vec<PathBuf>,
    /// Each ControlNet's weight (diffusers' `controlnet_conditioning_scale`): one for all, or
    /// one per --controlnet [default: 1].
    #[arg(long)]
    control_scale: Vec<f64>,
    /// The fraction of the schedule where the ControlNets start acting.
    #[arg(long, default_value_t = 0.0)]
    control_start: f64,
    /// The fraction of the schedule where they stop.
    #[arg(long, default_value_t = 1.0)]
    control_end: f64,
    /// ControlNet guess mode: the ControlNets see only the prompted half, their shallow
    /// residuals weighted down (for ControlNets meant to work without a prompt).
    #[arg(long)]
    guess_mode: bool,
    /// A T2I-Adapter (a diffusers `T2IAdapter` folder); may be repeated (their features add),
    /// each with its own --adapter-image.
    #[arg(long)]
    t2i_adapter: Vec<PathBuf>,
    /// The conditioning image of each --t2i-adapter, in order (resized to the output size).
    #[arg(long)]
    adapter_image: Vec<PathBuf>,
    /// Each adapter's weight (diffusers' `adapter_conditioning_scale`): one for all, or one per
    /// --t2i-adapter [default: 1].
    #[arg(long)]
    adapter_scale: Vec<f64>,
    /// The fraction of the steps, from the first, the adapters act in.
    #[arg(long, default_value_t = 1.0)]
    adapter_factor: f64,
    /// An IP-Adapter file (original layout: `image_proj.…`, `ip_adapter.N.to_k_ip`; base or
    /// Plus), with --image-encoder and --ip-image.
    #[arg(long)]
    ip_adapter: Option<PathBuf>,
    /// The CLIP image encoder folder the IP-Adapter was trained with
    /// (`CLIPVisionModelWithProjection`, with its `preprocessor_config.json` if any).
    #[arg(long)]
    image_encoder: Option<PathBuf>,
    /// The image prompt.
    #[arg(long)]
    ip_image: Option<PathBuf>,
    /// The IP-Adapter's weight (diffusers' `set_ip_adapter_scale`).
    #[arg(long, default_value_t = 1.0)]
    ip_scale: f64,
    /// Negative prompt.
    #[arg(long)]
    negative: Option<String>,
    /// Sampling steps; the model's own default (20, or what a distilled folder says).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale (1 disables the unconditional pass); the model's own
    /// default (7.5, or what a distilled folder says).
    #[arg(long)]
    guidance: Option<f64>,
    /// Guidance rescale φ (0 = off); by default 0.7 for zero-terminal-SNR models (the embedded
    /// one), 0 for others.
    #[arg(long)]
    guidance_rescale: Option<f64>,
    /// Sampler name (ldm's, ComfyUI's or A1111's: "DPM++ 2M Karras"); the model's own by default.
    #[arg(long)]
    sampler: Option<String>,
    /// Sigma schedule: default, karras, exponential, beta, sgm_uniform, simple, custom:σ,σ,…
    #[arg(long)]
    schedule: Option<String>,
    /// Noise strength of DDIM / ancestral samplers; TCD's gamma (0 unless given, as in diffusers' pipelines; 0.3 is TCD's suggestion).
    #[arg(long)]
    eta: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Noise source: torch (diffusers/ComfyUI seeds) or philox (A1111 "NV" seeds).
    #[arg(long, default_value = "torch")]
    rng: String,
    /// Image width; the model's own size when omitted (512 for SD1, 64 for the embedded model).
    #[arg(long)]
    width: Option<usize>,
    /// Image height; the model's own size when omitted.
    #[arg(long)]
    height: Option<usize>,
    /// Images per prompt, generated together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Number of batches, with seeds seed, seed+1, …
    #[arg(long, default_value_t = 1)]
    count: usize,
    #[arg(long)]
    clip_skip: Option<usize>,
    /// img2img: the starting image.
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// Inpainting: a mask image, white where the init image is to be repainted.
    #[arg(long)]
    mask: Option<PathBuf>,
    /// img2img: how much of the init image to redo (0–1).
    #[arg(long, default_value_t = 0.8)]
    strength: f64,
    /// Outpainting: extend the init image by L,T,R,B pixels (or one number for all sides); the
    /// result is --width × --height.
    #[arg(long)]
    outpaint: Option<String>,
    /// An SDXL refiner folder to finish the image (diffusers' ensemble of expert denoisers).
    #[arg(long)]
    refiner: Option<PathBuf>,
    /// Fraction of the noise schedule the base model runs before the refiner takes over.
    #[arg(long, default_value_t = 0.8)]
    refiner_start: f64,
    /// Tiled VAE encoding and decoding (true/false); by default images larger than 1.5× the
    /// VAE's training size are tiled.
    #[arg(long)]
    tiled_vae: Option<bool>,
    /// Weights dtype: f32, f16 or bf16 (bf16 on the CPU multiplies in bf16 and computes the
    /// rest in f32, as PyTorch's bf16 autocast does).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Output PNG; several images get -1, -2, … before the extension.
    #[arg(long, short, default_value = "out.png")]
    out: PathBuf,
}

fn fmt_count(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn info(path: &Path, check: bool) -> Result<()> {
    let folder = ModelFolder::open(path)?;
    let family = folder.family();
    let variant = if folder.is_inpainting() {
        " inpainting"
    } else {
        ""
    };
    out!("model:            {}", path.display());
    out!("pipeline:         {}", folder.index.class_name);
    out!("family:           {family}{variant}");
    out!("prediction type:  {}", folder.scheduler.prediction_type);
    if let Some(class) = &folder.scheduler.class_name {
        out!("scheduler:        {class}");
    }
    out!("latent scaling:   {}", folder.vae.scaling_factor);
    if folder.vae.shift_factor != 0.0 {
        out!("latent shift:     {}", folder.vae.shift_factor);
    }
    out!("latent channels:  {}", folder.vae.latent_channels);
    if let Some(dim) = folder.unet.time_cond_proj_dim {
        out!("guidance:         embedded ({dim}-wide w embedding): one U-Net pass a step");
    }
    let mut total = 0;
    for component in folder.components() {
        let s = folder
            .summary(component)
            .with_context(|| format!("reading {component} weights"))?;
        total += s.parameters;
        let dtypes: Vec<&str> = s.dtypes.keys().map(String::as_str).collect();
        out!(
            "{:<17} {:>15} parameters  {}",
            format!("{component}:"),
            fmt_count(s.parameters),
            dtypes.join("+")
        );
    }
    out!("{:<17} {:>15} parameters", "total:", fmt_count(total));
    if check {
        check_weights(&folder)?;
    }
    Ok(())
}

/// Builds each network from its weights, so that any missing or mis-shaped tensor is reported.
fn check_weights(folder: &ModelFolder) -> Result<()> {
    use candle_core::{DType, Device};
    use ldm_models::model::TextEncoderSlot;
    let (dtype, dev) = (DType::F32, Device::Cpu);
    let report = |name: &str, unused: Vec<String>| {
        if unused.is_empty() {
            out!("check {name}: ok");
        } else {
            out!(
                "check {name}: ok, {} unused tensors: {}",
                unused.len(),
                unused.join(", ")
            );
        }
    };
    report("unet", folder.load_unet(dtype, &dev)?.unused);
    report("vae", folder.load_vae(dtype, &dev)?.unused);
    for (slot, name) in [
        (TextEncoderSlot::First, "text_encoder"),
        (TextEncoderSlot::Second, "text_encoder_2"),
    ] {
        if folder.components().contains(&name) {
            report(name, folder.load_text_encoder(slot, dtype, &dev)?.unused);
            folder.load_tokenizer(slot)?;
        }
    }
    Ok(())
}

/// The device `--device` names (only commands that compute ask for it).
pub(crate) fn device(choice: DeviceChoice) -> Result<candle_core::Device> {
    Ok(ldm_pipeline::device::select(choice)?)
}

fn run(cli: Cli) -> Result<()> {
    let dev = cli.device;
    match cli.command {
        Command::Info { model, check } => {
            if model
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("png"))
            {
                return png_info(&model);
            }
            info(&generate::model_path(Some(&model))?, check)
        }
        Command::Generate(args) => generate::run(*args, &device(dev)?),
        Command::Serve(args) => serve::run(*args, device(dev)?),
        Command::Train(cmd) => train::run(cmd, &device(dev)?),
        Command::Distill(cmd) => distill::run(cmd, &device(dev)?),
        Command::Bench(args) => bench::run(args, &device(dev)?),
        Command::Data(cmd) => data::run(cmd),
        Command::Convert { model, dtype, out } => {
            let dtype = match dtype.as_str() {
                "f32" => candle_core::DType::F32,
                "f16" => candle_core::DType::F16,
                "bf16" => candle_core::DType::BF16,
                other => bail!("unknown dtype `{other}` (f32, f16, bf16)"),
            };
            ldm_models::weights::convert::convert_folder(&model, &out, dtype)?;
            out!("wrote {}", out.display());
            Ok(())
        }
        Command::Eval(cmd) => data::eval(cmd, &device(dev)?),
    }
}

fn png_info(path: &Path) -> Result<()> {
    match ldm_pipeline::image_io::read_parameters(path)? {
        Some(text) => out!("{text}"),
        None => bail!("{}: no `parameters` text chunk", path.display()),
    }
    Ok(())
}

/// Sets `RAYON_NUM_THREADS` to candle's own choice (the physical cores) unless the user chose.
/// Unset, candle works the count out again for every matrix product by reading
/// `/proc/cpuinfo` — about 2 % of a training step's CPU time. Must run before any thread starts.
fn fix_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Has candle run its element-wise ops on the calling thread (`CANDLE_NUM_THREADS=1`) unless the
/// user chose otherwise. Training runs the shards of a batch on threads of their own, and
/// candle's barrier pool serialises concurrent callers behind one lock and spins its workers
/// between ops, which made a sharded U-Net step about twice as slow when it was measured
/// (`tools/bench/train_step.py` times the step). Must run before any thread starts: candle
/// reads the variable once, when its pool is first used.
fn one_thread_element_wise_ops() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

fn main() -> ExitCode {
    ldm_models::weights::keep_freed_memory();
    let cli = Cli::parse();
    fix_thread_count();
    if matches!(cli.command, Command::Train(_) | Command::Distill(_)) {
        one_thread_element_wise_ops();
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
