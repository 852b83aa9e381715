//! `ldm bench`: times the real architectures with random weights made in process.

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use ldm_pipeline::bench::{measure, random_components, Arch, Measurement, Part};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Architectures, comma-separated: sd15, sdxl.
    #[arg(long, default_value = "sd15")]
    arch: String,
    /// Benchmarks, comma-separated: unet (one batch-2 evaluation), vae (decode), text (prompt
    /// and negative prompt), generate (a whole txt2img run).
    #[arg(long, default_value = "text,unet,vae")]
    parts: String,
    /// Image sides in pixels, comma-separated; the architecture's own (512, 1024) by default.
    #[arg(long)]
    sizes: Option<String>,
    /// Compute dtypes, comma-separated: f32, f16, bf16.
    #[arg(long, default_value = "f32")]
    dtypes: String,
    /// Timed runs per benchmark (the median is reported); generate runs once.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Untimed runs before the timed ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Steps of the generate benchmark.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Also write the results as JSON lines here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn list<T>(s: &str, parse: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(parse)
        .collect()
}

fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("unknown dtype `{other}` (f32, f16, bf16)"),
    })
}

pub fn run(a: BenchArgs, device: &Device) -> Result<()> {
    let archs = list(&a.arch, |s| Ok(Arch::parse(s)?))?;
    let parts = list(&a.parts, |s| Ok(Part::parse(s)?))?;
    let dtypes = list(&a.dtypes, parse_dtype)?;
    let sizes = match &a.sizes {
        Some(s) => Some(list(s, |v| {
            v.parse::<usize>()
                .map_err(|_| anyhow::anyhow!("size `{v}` is not a number"))
        })?),
        None => None,
    };
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let device = device.clone();
    let threads = rayon_threads();
    out!(
        "device: {}, threads: {threads}",
        ldm_pipeline::device::describe(&device)
    );
    out!(
        "{:<5} {:<10} {:>5} {:<5} {:>11} {:>9} {:>9} {:>10}",
        "arch",
        "bench",
        "size",
        "dtype",
        "median ms",
        "GFLOP",
        "GFLOP/s",
        "peak RSS"
    );
    let mut results: Vec<Measurement> = Vec::new();
    for &arch in &archs {
        for &dtype in &dtypes {
            let c = match random_components(arch, dtype, &device) {
                Ok(c) => c,
                Err(ldm_pipeline::Error::InvalidRequest(why)) => {
                    out!("{} {}: skipped: {why}", arch.name(), dtype_name(dtype));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            for size in sizes.clone().unwrap_or_else(|| vec![arch.native_size()]) {
                for &part in &parts {
                    let (runs, warmup) = match part {
                        Part::Generate => (1, 0),
                        _ => (a.runs, a.warmup),
                    };
                    let m = measure(&c, arch, part, size, runs, warmup, a.steps)?;
                    out!(
                        "{:<5} {:<10} {:>5} {:<5} {:>11.1} {:>9.1} {:>9.1} {:>10}",
                        arch.name(),
                        part.name(),
                        size,
                        dtype_name(dtype),
                        m.median_ms(),
                        m.flops as f64 / 1e9,
                        m.gflops_per_s(),
                        m.peak_rss_bytes.map_or("?".into(), |b| format!(
                            "{:.2} GiB",
                            b as f64 / 1073741824.0
                        ))
                    );
                    results.push(m);
                    if let Some(path) = &a.json {
                        write_json_lines(path, &results)?;
                    }
                }
            }
        }
    }
    Ok(())
}

fn dtype_name(dtype: DType) -> String {
    format!("{dtype:?}").to_lowercase()
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Rewrites `path` (temp file, then rename) with one JSON object per result.
fn write_json_lines(path: &std::path::Path, results: &[Measurement]) -> Result<()> {
    let text: String = results
        .iter()
        .map(|m| format!("{}\n", m.to_json()))
        .collect();
    ldm_train::io::write_atomic(path, text.as_bytes())?;
    Ok(())
}
