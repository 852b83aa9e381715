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

fn check(file: &str, fill: NormalFill, path_kind: &str) {
    let refs = fixture(file);
    let mut checked = 0;
    for (key, oracle) in &refs {
        let Some((kind, seed, n)) = parse_key(key) else {
            continue;
        };
        // `randn.*` hold torch's vectorised-path draws, `randn_nosimd.*` its scalar-path ones.
        if (kind == "randn" || kind == "randn_nosimd") && kind != path_kind {
            continue;
        }
        let mut rng = TorchCpuRng::with_fill(seed, fill);
        let bits_equal = match kind {
            "randn" | "randn_nosimd" => {
                rng.randn_f32(n) == oracle.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            }
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
    println!("{file} ({path_kind}): {checked} tensors bit-identical");
}

#[test]
fn torch_randn_vectorised_path_is_bit_exact() {
    check("torch_rng.safetensors", NormalFill::Avx2, "randn");
}

#[test]
fn torch_randn_scalar_path_is_bit_exact() {
    check("torch_rng.safetensors", NormalFill::Scalar, "randn_nosimd");
}

#[test]
fn one_generator_across_calls_matches_torch() {
    // seed 7: randn([1,4,8,8]), randn([5]), rand([3]), randn([17]) from one generator.
    let refs = fixture("torch_rng.safetensors");
    let mut rng = TorchCpuRng::with_fill(7, NormalFill::Avx2);
    let v = |k: &str| refs[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(rng.randn_f32(256), v("seq.0"));
    assert_eq!(rng.randn_f32(5), v("seq.1"));
    assert_eq!(rng.rand_f32(3), v("seq.2"));
    assert_eq!(rng.randn_f32(17), v("seq.3"));
}

#[test]
fn a1111_philox_matches_its_reference() {
    use ldm_sampling::noise::{NoiseSource, PhiloxRng};
    let refs = fixture("philox.safetensors");
    let mut checked = 0;
    for (key, oracle) in &refs {
        let oracle: Vec<f32> = oracle.flatten_all().unwrap().to_vec1().unwrap();
        let parts: Vec<&str> = key.split('.').collect();
        match parts.as_slice() {
            ["philox", seed, _] => {
                let mut rng = PhiloxRng::new(seed.parse().unwrap());
                assert_eq!(rng.randn(oracle.len()), oracle, "{key}");
            }
            ["philox_seq", seed, call] => {
                // call k of one generator: the offset advances once per call.
                let mut rng = PhiloxRng::new(seed.parse().unwrap());
                let calls: usize = call.parse().unwrap();
                let lens: Vec<usize> = (0..=calls)
                    .map(|c| refs[&format!("philox_seq.{seed}.{c}")].elem_count())
                    .collect();
                let mut last = vec![];
                for &n in &lens {
                    last = rng.randn(n);
                }
                assert_eq!(last, oracle, "{key}");
            }
            _ => continue,
        }
        checked += 1;
    }
    assert!(checked >= 20, "only {checked}");
}

#[test]
fn the_cached_normal_survives_across_calls() {
    // seed 7: randn([3]), rand([2]), randn([2]), randn([16]), randn([1]) from one generator.
    let refs = fixture("torch_rng.safetensors");
    let mut rng = TorchCpuRng::with_fill(7, NormalFill::Avx2);
    let v = |k: &str| refs[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(rng.randn_f32(3), v("seq_cache.0"));
    assert_eq!(rng.rand_f32(2), v("seq_cache.1"));
    assert_eq!(rng.randn_f32(2), v("seq_cache.2"));
    assert_eq!(rng.randn_f32(16), v("seq_cache.3"));
    assert_eq!(rng.randn_f32(1), v("seq_cache.4"));
}
