//! Convergence against an analytic denoiser. For Gaussian data x₀ ~ N(μ, s²) the exact
//! denoiser is `D(x; σ) = μ + s²/(s² + σ²) (x − μ)` and the probability-flow ODE is solved by
//! `x(σ) = μ + √(s² + σ²)/√(s² + σ₀²) (x(σ₀) − μ)`. Deterministic samplers must approach it at
//! their order as steps double; stochastic ones must reach the data distribution.

use candle_core::{Device, Result, Tensor};
use ldm_sampling::noise::TorchCpuRng;
use ldm_sampling::samplers::MultistepOptions;
use ldm_sampling::schedule::karras;
use ldm_sampling::{Denoiser, NoHook, Run, Sampler};

const MU: f64 = 0.5;
const S: f64 = 0.8;

struct Gaussian;

impl Denoiser for Gaussian {
    fn denoise(&self, x: &Tensor, sigma: f64) -> Result<Tensor> {
        ((x - MU)? * (S * S / (S * S + sigma * sigma)))? + MU
    }
}

fn run(sampler: &Sampler, x: Tensor, sigmas: &[f64], seed: u64) -> Tensor {
    let mut rng = TorchCpuRng::new(seed);
    let mut hook = NoHook;
    let mut r = Run {
        denoiser: &Gaussian,
        sigmas,
        landings: None,
        noise: &mut rng,
        hook: &mut hook,
    };
    sampler.sample(x, &mut r).unwrap()
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Error at σ_end = 0.05 after `steps` Karras steps from σ = 10, against the exact ODE solution.
fn ode_error(sampler: &Sampler, steps: usize) -> f64 {
    let (s0, s1) = (10.0, 0.05);
    let sigmas = karras(s1, s0, steps + 1, 7.0);
    let start: Vec<f64> = (0..64).map(|i| (i as f64 - 32.0) * 0.6).collect();
    let x = Tensor::from_vec(start, 64, &Device::Cpu).unwrap();
    let out = run(sampler, x.clone(), &sigmas, 0);
    let exact = (((&x - MU).unwrap() * ((S * S + s1 * s1).sqrt() / (S * S + s0 * s0).sqrt()))
        .unwrap()
        + MU)
        .unwrap();
    max_abs(&(out - exact).unwrap())
}

#[test]
fn deterministic_samplers_converge_at_their_order() {
    let ode = |order| MultistepOptions {
        order,
        sde: false,
        lower_order_final: false,
        euler_at_final: false,
    };
    let cases: Vec<(&str, Sampler, f64)> = vec![
        ("euler", Sampler::Euler, 1.0),
        ("ddim (eta 0)", Sampler::EulerAncestral { eta: 0.0 }, 1.0),
        ("heun", Sampler::Heun, 2.0),
        ("dpm2", Sampler::Dpm2, 2.0),
        ("lms", Sampler::Lms { order: 4 }, 3.0),
        // Fixed Adams–Bashforth weights on Karras' non-uniform steps: second order.
        (
            "plms",
            Sampler::Plms {
                combine_v: false,
                first_from: None,
                second: None,
                ratio: None,
            },
            2.0,
        ),
        ("dpmpp_2m", Sampler::DpmPpMultistep(ode(2)), 2.0),
        // Its first step is first order (one step: local error O(h²)), so globally second order.
        ("dpmpp_3m", Sampler::DpmPpMultistep(ode(3)), 2.0),
        (
            "dpmpp_2s (eta 0)",
            Sampler::DpmPp2SAncestral { eta: 0.0 },
            2.0,
        ),
        (
            "unipc",
            Sampler::UniPc {
                order: 2,
                lower_order_final: false,
            },
            3.0,
        ),
        (
            "deis",
            Sampler::Deis {
                order: 2,
                lower_order_final: false,
            },
            2.0,
        ),
    ];
    let mut report = Vec::new();
    for (name, sampler, expected) in cases {
        let errs: Vec<f64> = [16, 32, 64]
            .iter()
            .map(|&n| ode_error(&sampler, n))
            .collect();
        let order = (errs[1] / errs[2]).log2();
        report.push(format!(
            "{name}: errors {errs:?}, measured order {order:.2} (expected {expected})"
        ));
        assert!(
            order > expected - 0.35,
            "{name}: measured order {order:.2} below {expected}; errors {errs:?}"
        );
    }
    println!("{}", report.join("\n"));
}

/// From the pure noise of a zero-terminal-SNR schedule (σ₀ = 4096, diffusers' finite stand-in),
/// Heun and DPM2 take a plain Euler step: with one more step to σ = 0 (Euler too) they give
/// Euler's result (to rounding), where from an ordinary σ₀ they do not; and Heun from 4096
/// still converges to the exact ODE solution at second order.
#[test]
fn two_evaluation_samplers_step_from_pure_noise_as_euler() {
    let x = Tensor::from_vec(
        (0..64)
            .map(|i| (i as f64 - 32.0) * 64.0)
            .collect::<Vec<_>>(),
        64,
        &Device::Cpu,
    )
    .unwrap();
    let euler = |sigmas: &[f64]| run(&Sampler::Euler, x.clone(), sigmas, 0);
    for (name, sampler) in [("heun", Sampler::Heun), ("dpm2", Sampler::Dpm2)] {
        let pure = [4096.0, 40.0, 0.0];
        let diff = max_abs(&(run(&sampler, x.clone(), &pure, 0) - euler(&pure)).unwrap());
        assert!(diff < 1e-9, "{name} from pure noise: {diff} from Euler");
        let ordinary = [14.6, 4.0, 0.0];
        let diff = max_abs(&(run(&sampler, x.clone(), &ordinary, 0) - euler(&ordinary)).unwrap());
        assert!(diff > 1e-3, "{name} from σ = 14.6 is Euler ({diff})");
    }
    // Still second order over Karras steps from 4096 (max error 0.048, 0.011, 0.0026).
    let (s0, s1) = (4096.0, 0.05);
    let exact = (((&x - MU).unwrap() * ((S * S + s1 * s1).sqrt() / (S * S + s0 * s0).sqrt()))
        .unwrap()
        + MU)
        .unwrap();
    let errs: Vec<f64> = [20, 40, 80]
        .iter()
        .map(|&n| {
            let out = run(&Sampler::Heun, x.clone(), &karras(s1, s0, n + 1, 7.0), 0);
            max_abs(&(out - &exact).unwrap())
        })
        .collect();
    let order = (errs[1] / errs[2]).log2();
    assert!(
        errs[0] < 0.05 && order > 1.65,
        "heun from 4096: errors {errs:?}"
    );
}

/// Mean and variance of the final samples against N(μ, s²).
fn distribution_error(sampler: &Sampler, steps: usize) -> f64 {
    let sigmas: Vec<f64> = karras(0.03, 14.6, steps, 7.0)
        .into_iter()
        .chain([0.0])
        .collect();
    let n = 1 << 16;
    let mut rng = TorchCpuRng::new(7);
    let z: Vec<f64> = rng.randn_f64(n);
    let x = (Tensor::from_vec(z, n, &Device::Cpu).unwrap()
        * (sigmas[0] * sigmas[0] + S * S).sqrt())
    .unwrap();
    let x = (x + MU).unwrap();
    let out: Vec<f64> = run(sampler, x, &sigmas, 11).to_vec1().unwrap();
    let mean = out.iter().sum::<f64>() / n as f64;
    let var = out.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
    (mean - MU).abs() + (var.sqrt() - S).abs()
}

#[test]
fn stochastic_samplers_reach_the_data_distribution() {
    let sde = |order| MultistepOptions {
        order,
        sde: true,
        lower_order_final: false,
        euler_at_final: false,
    };
    let cases: Vec<(&str, Sampler)> = vec![
        ("euler_a", Sampler::EulerAncestral { eta: 1.0 }),
        ("dpm2_a", Sampler::Dpm2Ancestral),
        ("dpmpp_2s_a", Sampler::DpmPp2SAncestral { eta: 1.0 }),
        ("dpmpp_sde", Sampler::DpmPpSde { eta: 1.0 }),
        ("dpmpp_2m_sde", Sampler::DpmPpMultistep(sde(2))),
        ("dpmpp_3m_sde", Sampler::DpmPpMultistep(sde(3))),
    ];
    let mut report = Vec::new();
    for (name, sampler) in cases {
        let errs: Vec<f64> = [10, 40, 160]
            .iter()
            .map(|&n| distribution_error(&sampler, n))
            .collect();
        // Weak order from 10 → 40 steps (2^16 samples estimate the std to ~0.3%).
        let order = (errs[0] / errs[1]).log(4.0);
        report.push(format!(
            "{name}: |Δmean| + |Δstd| {errs:?} at 10/40/160 steps, weak order {order:.2}"
        ));
        assert!(
            order > 0.7,
            "{name}: weak order {order:.2}, errors {errs:?}"
        );
        assert!(errs[2] < 0.03, "{name}: {errs:?}");
    }
    println!("{}", report.join("\n"));
}
