//! `ldm serve`: parse the flags and run the server of `ldm-server`.

use anyhow::{bail, Context, Result};
use candle_core::DType;
use ldm_server::params::Limits;
use ldm_server::ServerConfig;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// A diffusers model folder, or an embedded model's name (`shapes`, the default, or
    /// `shapes-fast`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// A TAESD folder (diffusers `AutoencoderTiny`) whose decoder draws the live previews
    /// (default: a linear map fitted to the model's autoencoder).
    #[arg(long)]
    taesd: Option<PathBuf>,
    /// The address to listen on (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The port (0: any free port; the address is printed once listening).
    #[arg(long, default_value_t = 7860)]
    port: u16,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Require HTTP Basic credentials, `user:password` (as A1111's --api-auth).
    #[arg(long)]
    api_auth: Option<String>,
    /// Require `Authorization: Bearer KEY` (as OpenAI's API keys); either credential is accepted.
    #[arg(long)]
    api_key: Option<String>,
    /// Origins whose pages may call the server from a browser, comma-separated.
    #[arg(long, value_delimiter = ',')]
    cors_allow_origins: Vec<String>,
    /// Most jobs waiting behind the running one (more get 429 with Retry-After).
    #[arg(long, default_value_t = 32)]
    max_queue: usize,
    /// Largest width or height a request may ask for.
    #[arg(long, default_value_t = 2048)]
    max_size: usize,
    /// Most sampling steps a request may ask for.
    #[arg(long, default_value_t = 150)]
    max_steps: usize,
    /// Most images one request may make.
    #[arg(long, default_value_t = 16)]
    max_images: usize,
    /// A folder of LoRA files that `<lora:NAME:W>` tags in prompts name (merged for the
    /// requests that name them; the loaded weights stay as they are); may be repeated.
    #[arg(long)]
    lora_dir: Vec<PathBuf>,
    /// A folder of ControlNets (diffusers folders or original `.safetensors` files) that A1111
    /// clients' ControlNet units name (`alwayson_scripts.controlnet`); may be repeated.
    #[arg(long)]
    controlnet_dir: Vec<PathBuf>,
    /// Minutes a finished job's results are kept.
    #[arg(long, default_value_t = 10)]
    keep_minutes: u64,
}

pub fn run(a: ServeArgs, device: candle_core::Device) -> Result<()> {
    let model = crate::generate::model_path(a.model.as_deref())?;
    // An embedded model goes by its name, not by its cache folder's.
    let model_name = match a.model.as_deref() {
        None => Some("shapes".to_string()),
        Some(m) if !m.exists() => m.to_str().map(String::from),
        Some(_) => None,
    };
    let dtype = match a.dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("unknown dtype `{other}` (f32, f16, bf16)"),
    };
    if a.max_size < 8 || a.max_steps == 0 || a.max_images == 0 {
        bail!("--max-size must be at least 8, --max-steps and --max-images at least 1");
    }
    let cfg = ServerConfig {
        model_name,
        taesd: a.taesd,
        dtype,
        device,
        lora_dirs: a.lora_dir,
        controlnet_dirs: a.controlnet_dir,
        host: a.host,
        port: a.port,
        api_auth: a.api_auth,
        api_key: a.api_key,
        cors_allow_origins: a.cors_allow_origins,
        limits: Limits {
            max_side: a.max_size,
            max_steps: a.max_steps,
            max_images: a.max_images,
            ..Limits::default()
        },
        max_queue: a.max_queue,
        keep: Duration::from_secs(a.keep_minutes * 60),
        ..ServerConfig::new(model)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(ldm_server::serve(cfg, |addr| {
        out!("listening on http://{addr}");
    }))?;
    Ok(())
}
