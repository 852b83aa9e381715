//! Benchmarks of the real Stable Diffusion architectures with seeded random weights made in
//! process (no files needed): one U-Net evaluation at batch 2 (a guided step), an autoencoder
//! decode, the prompt encoding of a guided generation, and a whole txt2img generation through
//! [`crate::generate`]. Each reports the median wall time over its runs, the floating-point
//! operations of its products (counted by [`ldm_models::flops`]), and the process's peak
//! resident memory while it ran.
//!
//! The configs are the released ones (`fixtures/configs`); the tokenizer is a small CLIP BPE
//! vocabulary, which changes the token ids but not a single shape.

use crate::{Components, Error, Result};
use candle_core::{DType, Device, Tensor};
use ldm_models::model::ModelFolder;
use ldm_models::unet::AddedCond;
use ldm_models::weights::init::SeededInit;
use ldm_sampling::samplers::NoHook;
use ldm_sampling::scheduler_config::SchedulerConfig;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// An architecture to benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Stable Diffusion 1.5 (U-Net 860 M, CLIP ViT-L/14 text encoder).
    Sd15,
    /// SDXL base 1.0 (U-Net 2.6 B, CLIP ViT-L + OpenCLIP bigG).
    Sdxl,
}

const TOKENIZER: [(&str, &str); 3] = [
    (
        "vocab.json",
        include_str!("../../../fixtures/tiny/sd15/tokenizer/vocab.json"),
    ),
    (
        "merges.txt",
        include_str!("../../../fixtures/tiny/sd15/tokenizer/merges.txt"),
    ),
    (
        "tokenizer_config.json",
        include_str!("../../../fixtures/tiny/sd15/tokenizer/tokenizer_config.json"),
    ),
];

impl Arch {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "sd15" | "sd1.5" | "sd1" => Ok(Arch::Sd15),
            "sdxl" => Ok(Arch::Sdxl),
            _ => Err(Error::InvalidRequest(format!(
                "unknown architecture `{s}` (sd15 or sdxl)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Sd15 => "sd15",
            Arch::Sdxl => "sdxl",
        }
    }

    /// The image side the model was trained at.
    pub fn native_size(self) -> usize {
        match self {
            Arch::Sd15 => 512,
            Arch::Sdxl => 1024,
        }
    }

    /// `(relative path, contents)` of the configs of the released model.
    fn configs(self) -> Vec<(&'static str, &'static str)> {
        macro_rules! files {
            ($dir:literal: $($name:literal),*) => {
                vec![$(($name, include_str!(concat!("../../../fixtures/configs/", $dir, "/", $name)))),*]
            };
        }
        match self {
            Arch::Sd15 => files!("sd15": "model_index.json", "scheduler/scheduler_config.json",
                "text_encoder/config.json", "unet/config.json", "vae/config.json"),
            Arch::Sdxl => {
                files!("sdxl_base": "model_index.json", "scheduler/scheduler_config.json",
                "text_encoder/config.json", "text_encoder_2/config.json", "unet/config.json",
                "vae/config.json")
            }
        }
    }
}

/// A folder holding only configs and tokenizers, removed when dropped.
struct ConfigDir(PathBuf);

impl ConfigDir {
    fn write(arch: Arch) -> Result<Self> {
        let root = std::env::temp_dir().join(format!(
            "ldm-bench-{}-{}-{}",
            arch.name(),
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        let dir = ConfigDir(root);
        let mut files: Vec<(String, &str)> = arch
            .configs()
            .into_iter()
            .map(|(p, c)| (p.to_string(), c))
            .collect();
        let tokenizers: &[&str] = match arch {
            Arch::Sd15 => &["tokenizer"],
            Arch::Sdxl => &["tokenizer", "tokenizer_2"],
        };
        for t in tokenizers {
            for (name, contents) in TOKENIZER {
                files.push((format!("{t}/{name}"), contents));
            }
        }
        for (path, contents) in files {
            let path = dir.0.join(path);
            let io = |source| Error::Io {
                path: path.clone(),
                source,
            };
            std::fs::create_dir_all(path.parent().unwrap_or(Path::new("."))).map_err(io)?;
            std::fs::write(&path, contents).map_err(io)?;
        }
        Ok(dir)
    }
}

impl Drop for ConfigDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The architecture's components with seeded random weights (scaled as for training, so
/// activations stay finite), computing in `dtype`.
pub fn random_components(arch: Arch, dtype: DType, device: &Device) -> Result<Components> {
    let dir = ConfigDir::write(arch)?;
    let folder = ModelFolder::open(&dir.0)?;
    let vb = |seed: u64| SeededInit::constants(seed, device).set_dtype(dtype);
    let unet = ldm_models::unet::UNet2DConditionModel::new(vb(1), &folder.unet)?;
    let vae = ldm_models::vae::AutoencoderKL::new(vb(2), &folder.vae)?;
    let mut text_encoders = Vec::new();
    for (i, (config, tok)) in [
        (&folder.text_encoder, "tokenizer"),
        (&folder.text_encoder_2, "tokenizer_2"),
    ]
    .into_iter()
    .enumerate()
    {
        if let Some(config) = config {
            let tokenizer = ldm_models::clip::ClipTokenizer::from_folder(&dir.0.join(tok))?;
            let model = ldm_models::clip::ClipTextModel::new(vb(3 + i as u64), config)?;
            text_encoders.push((tokenizer, model));
        }
    }
    let sched_path = dir.0.join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&sched_path).map_err(|source| Error::Io {
        path: sched_path.clone(),
        source,
    })?;
    let scheduler = SchedulerConfig::from_json(&text)?;
    ldm_models::weights::release_free_memory();
    Ok(Components {
        folder,
        unet,
        vae,
        text_encoders,
        scheduler,
        dtype,
        device: device.clone(),
        unused: Vec::new(),
        taesd: None,
        controlnets: Vec::new(),
        adapters: Vec::new(),
        ip_adapter: None,
    })
}

/// What to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// One U-Net evaluation at batch 2 (conditional and unconditional halves of a guided step).
    Unet,
    /// Decoding one latent to an image (tiled as the pipeline would tile it).
    VaeDecode,
    /// Encoding the prompt and the negative prompt.
    Text,
    /// A whole txt2img generation: prompts, every guided step, decoding.
    Generate,
}

impl Part {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "unet" => Ok(Part::Unet),
            "vae" | "vae_decode" => Ok(Part::VaeDecode),
            "text" => Ok(Part::Text),
            "generate" => Ok(Part::Generate),
            _ => Err(Error::InvalidRequest(format!(
                "unknown benchmark `{s}` (unet, vae, text, generate)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Part::Unet => "unet",
            Part::VaeDecode => "vae_decode",
            Part::Text => "text",
            Part::Generate => "generate",
        }
    }
}

/// One benchmark's result.
#[derive(Debug, Clone)]
pub struct Measurement {
    pub arch: Arch,
    pub part: Part,
    pub size: usize,
    pub dtype: DType,
    /// Every run's wall time in milliseconds, in the order run.
    pub runs_ms: Vec<f64>,
    /// Operations of the products in one run.
    pub flops: u64,
    /// The process's peak resident memory during the benchmark (weights included), if the
    /// system reports it.
    pub peak_rss_bytes: Option<u64>,
}

impl Measurement {
    pub fn median_ms(&self) -> f64 {
        let mut v = self.runs_ms.clone();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
        }
    }

    pub fn gflops_per_s(&self) -> f64 {
        self.flops as f64 / (self.median_ms() * 1e6)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "arch": self.arch.name(),
            "part": self.part.name(),
            "size": self.size,
            "dtype": format!("{:?}", self.dtype).to_lowercase(),
            "runs_ms": self.runs_ms,
            "median_ms": self.median_ms(),
            "gflop": self.flops as f64 / 1e9,
            "gflops_per_s": self.gflops_per_s(),
            "peak_rss_bytes": self.peak_rss_bytes,
        })
    }
}

/// Peak resident memory of this process (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Restarts the peak-memory mark at the current resident size (Linux `clear_refs`).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Times `part` of `c` at `size`×`size` pixels: `warmup` untimed runs, then `runs` timed.
/// `steps` is the generation's step count.
pub fn measure(
    c: &Components,
    arch: Arch,
    part: Part,
    size: usize,
    runs: usize,
    warmup: usize,
    steps: usize,
) -> Result<Measurement> {
    let f = c.vae_scale_factor();
    if size == 0 || !size.is_multiple_of(8) {
        return Err(Error::InvalidRequest(format!(
            "size {size} is not a positive multiple of 8"
        )));
    }
    let device = &c.device;
    let latent = |batch: usize| -> Result<Tensor> {
        Ok(Tensor::randn(
            0f32,
            1.0,
            (batch, c.vae.config.latent_channels, size / f, size / f),
            device,
        )?
        .to_dtype(c.compute_dtype())?)
    };
    let prompt = "a photograph of an astronaut riding a horse";
    let negative = "blurry, low quality";
    let request = crate::Request {
        prompt: prompt.into(),
        negative_prompt: Some(negative.into()),
        width: size,
        height: size,
        steps,
        ..Default::default()
    };
    // Inputs made once, outside the timed region.
    let unet_inputs = if part == Part::Unet {
        let cond = crate::prompt::encode(c, prompt, None)?;
        let uncond = crate::prompt::encode(c, negative, None)?;
        let context =
            Tensor::cat(&[&uncond.context, &cond.context], 0)?.to_dtype(c.compute_dtype())?;
        let added = match c.unet.config.text_time {
            Some(_) => {
                let pooled = match (&uncond.pooled, &cond.pooled) {
                    (Some(a), Some(b)) => Tensor::cat(&[a, b], 0)?,
                    _ => return Err(Error::InvalidRequest("no pooled text embedding".into())),
                };
                let ids = [size, size, 0, 0, size, size].map(|v| v as f32);
                let time_ids = Tensor::new(&ids, device)?.unsqueeze(0)?.repeat((2, 1))?;
                Some(AddedCond {
                    text_embeds: pooled.to_dtype(c.compute_dtype())?,
                    time_ids: time_ids.to_dtype(c.compute_dtype())?,
                })
            }
            None => None,
        };
        let t = Tensor::new(&[500f32, 500.0], device)?;
        Some((latent(2)?, t, context, added))
    } else {
        None
    };
    let z = if part == Part::VaeDecode {
        Some(latent(1)?)
    } else {
        None
    };
    let run_once = || -> Result<()> {
        match part {
            Part::Unet => {
                let (x, t, context, added) = unet_inputs.as_ref().expect("made above");
                c.unet.forward(x, t, context, added.as_ref())?.sum_all()?;
            }
            Part::VaeDecode => {
                let z = z.as_ref().expect("made above");
                crate::generate::decode_latents(c, &request, z)?;
            }
            Part::Text => {
                crate::prompt::encode(c, prompt, None)?;
                crate::prompt::encode(c, negative, None)?;
            }
            Part::Generate => {
                crate::generate(c, &request, &mut NoHook)?;
            }
        }
        Ok(())
    };
    // A GPU queues its work: the clock stops when the device has finished it.
    let run_synced = || -> Result<()> {
        run_once()?;
        Ok(device.synchronize()?)
    };
    for _ in 0..warmup {
        run_synced()?;
    }
    reset_peak_rss();
    let mut runs_ms = Vec::with_capacity(runs);
    let mut flops = 0;
    for _ in 0..runs.max(1) {
        ldm_models::flops::take();
        let start = Instant::now();
        run_synced()?;
        runs_ms.push(start.elapsed().as_secs_f64() * 1e3);
        flops = ldm_models::flops::take();
    }
    Ok(Measurement {
        arch,
        part,
        size,
        dtype: c.dtype,
        runs_ms,
        flops,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let m = |runs: &[f64]| Measurement {
            arch: Arch::Sd15,
            part: Part::Unet,
            size: 512,
            dtype: DType::F32,
            runs_ms: runs.to_vec(),
            flops: 2_000_000_000,
            peak_rss_bytes: None,
        };
        assert_eq!(m(&[3.0, 1.0, 2.0]).median_ms(), 2.0);
        assert_eq!(m(&[4.0, 1.0, 3.0, 2.0]).median_ms(), 2.5);
        assert!((m(&[1000.0]).gflops_per_s() - 2.0).abs() < 1e-12);
    }

    #[test]
    fn names_parse_back() {
        for a in [Arch::Sd15, Arch::Sdxl] {
            assert_eq!(Arch::parse(a.name()).unwrap(), a);
        }
        for p in [Part::Unet, Part::VaeDecode, Part::Text, Part::Generate] {
            assert_eq!(Part::parse(p.name()).unwrap(), p);
        }
        assert!(Arch::parse("sd3").is_err());
        assert!(Part::parse("everything").is_err());
    }
}
