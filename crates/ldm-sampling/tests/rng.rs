//! torch's CPU generator reproduced bit for bit: every tensor in the oracle's
//! `fixtures/rng/torch_rng.safetensors` (both Box–Muller paths, float32 and float64, `rand`).

use candle_core::{DType, Device, Tensor};
use ldm_sampling::noise::{NormalFill, TorchCpuRng};
use std::collections::HashMap;
use std::path::PathBuf;

fn fixture(name: &str) -> HashMap<String, Tensor> {
    let path = std::env::var("LDM_RNG_FIXTURE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../fixtures/rng")
                .join(name)
        });
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn parse_key(key: &str) -> Option<(&str, u64, usize)> {
    let mut parts = key.splitn(3, '.');
    let kind = parts.next()?;
    let seed = parts.next()?.parse().ok()?;
    let numel = parts
        .next()?
        .split('x')
        .map(|d| d.parse::<usize>().ok())
        .product::<Option<usize>>()?;
    Some((kind, seed, numel))
}

fn check(file: &str, fill: NormalFill) {
    let refs = fixture(file);
    let mut checked = 0;
    for (key, oracle) in &refs {
        let Some((kind, seed, n)) = parse_key(key) else {
            continue;
        };
        let mut rng = TorchCpuRng::with_fill(seed, fill);
        let bits_equal = match kind {
            "randn" => rng.randn_f32(n) == oracle.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "rand" => rng.rand_f32(n) == oracle.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "randn64" => {
                rng.randn_f64(n)
                    == oracle
                        .to_dtype(DType::F64)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f64>()
                        .unwrap()
            }
            _ => continue,
        };
        assert!(bits_equal, "{file} {key}: not bit-identical");
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} tensors checked");
    println!("{file}: {checked} tensors bit-identical");
}

#[test]
fn torch_randn_vectorised_path_is_bit_exact() {
    check("torch_rng.safetensors", NormalFill::Avx2);
}

#[test]
fn torch_randn_scalar_path_is_bit_exact() {
    check(
        "torch_rng_default_capability.safetensors",
        NormalFill::Scalar,
    );
}
