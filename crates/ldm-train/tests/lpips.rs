//! LPIPS against the `lpips` package (fixtures from `tools/oracle/make_lpips_fixture.py`: the
//! package's VGG variant at reduced width on seeded random weights), its gradient against
//! finite differences in f64, and bad weight files.

use candle_core::{DType, Device, Tensor, Var};
use ldm_models::weights::{Checkpoint, Weights};
use ldm_train::lpips::{max_pool2, Lpips};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lpips")
}

fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
    let n = b.sqr().unwrap().sum_all().unwrap();
    let f = |t: Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    (f(d) / f(n)).sqrt()
}

#[test]
fn matches_the_lpips_package() -> ldm_train::Result<()> {
    let dev = Device::Cpu;
    let net = Lpips::load(&fixtures().join("weights.safetensors"), &dev)?;
    let cases = candle_core::safetensors::load(fixtures().join("cases.safetensors"), &dev)?;
    for name in ["square32", "odd48x40"] {
        let in0 = Var::from_tensor(&cases[&format!("{name}.in0")])?;
        let in1 = &cases[&format!("{name}.in1")];
        let d = net.forward(in0.as_tensor(), in1)?;
        let want = &cases[&format!("{name}.distance")];
        let err = rel_l2(&d, want);
        println!(
            "{name}: distances {:?}, rel err {err:.2e}",
            d.to_vec1::<f32>()?
        );
        assert!(err < 1e-5, "{name}: distance rel err {err}");
        let grads = d.sum_all()?.backward()?;
        let g = grads.get(in0.as_tensor()).expect("gradient of the image");
        let err = rel_l2(g, &cases[&format!("{name}.grad_in0")]);
        println!("{name}: gradient rel err {err:.2e}");
        assert!(err < 1e-4, "{name}: gradient rel err {err}");
    }
    Ok(())
}

/// A deterministic f64 tensor in [-1, 1].
fn tensor(shape: &[usize], seed: u64) -> Tensor {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Autograd against central differences at `probes` coordinates of `x`, for `Σ f(x) ⊙ r`.
fn check(name: &str, x: &Tensor, probes: usize, f: impl Fn(&Tensor) -> Tensor) {
    let v = Var::from_tensor(x).unwrap();
    let out = f(v.as_tensor());
    let r = tensor(out.dims(), 7);
    let objective = |t: &Tensor| {
        (f(t) * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let grads = (out * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g = grads
        .get(v.as_tensor())
        .unwrap_or_else(|| panic!("{name}: no gradient"))
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let flat = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let h = 1e-5;
    for k in 0..probes {
        let i = (k * 7919) % flat.len();
        let at = |delta: f64| {
            let mut w = flat.clone();
            w[i] += delta;
            objective(&Tensor::from_vec(w, x.shape(), x.device()).unwrap())
        };
        let fd = (at(h) - at(-h)) / (2.0 * h);
        let tol = 1e-7 + 1e-4 * fd.abs().max(g[i].abs());
        assert!(
            (fd - g[i]).abs() <= tol,
            "{name}[{i}]: autograd {} vs {fd}",
            g[i]
        );
    }
}

#[test]
fn gradients_by_finite_differences() {
    // Max pooling of an input that is also used elsewhere, odd sizes floored.
    let x = tensor(&[2, 3, 7, 6], 1);
    check("max_pool2", &x, 40, |t| {
        (max_pool2(t)
            .unwrap()
            .sum_all()
            .unwrap()
            .broadcast_mul(t)
            .unwrap()
            + t.sqr().unwrap())
        .unwrap()
    });
    // The whole distance, in f64, with the fixture's weights.
    let weights =
        Weights::new(Checkpoint::open(&[fixtures().join("weights.safetensors")]).unwrap());
    let net = Lpips::new(
        weights.var_builder(DType::F64, &Device::Cpu),
        [8, 16, 24, 32, 32],
    )
    .unwrap();
    let a = tensor(&[1, 3, 16, 16], 2);
    let b = tensor(&[1, 3, 16, 16], 3);
    check("lpips", &a, 24, |t| net.forward(t, &b).unwrap());
}

#[test]
fn bad_weight_files_are_refused() {
    let dev = Device::Cpu;
    // A safetensors file without LPIPS's tensors.
    let err = Lpips::load(&fixtures().join("cases.safetensors"), &dev)
        .err()
        .expect("not LPIPS weights")
        .to_string();
    assert!(err.contains("net.slice1.0.weight"), "{err}");
    // A missing file.
    let err = Lpips::load(Path::new("/nonexistent/lpips.safetensors"), &dev)
        .err()
        .expect("no file")
        .to_string();
    assert!(err.contains("lpips.safetensors"), "{err}");
}
