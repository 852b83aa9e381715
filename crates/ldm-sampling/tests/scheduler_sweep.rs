//! The scheduler sweep (fixtures from `tools/oracle/make_scheduler_sweep.py`): every sampler
//! name's diffusers class built with `from_config` from ten real-world configs, at every step
//! count from 1 to 50 and 75, 100, 150, 999, with the Karras / exponential / beta options where
//! the class has them. Each case must give diffusers' timesteps, sigmas and every recorded
//! sample (relative L2 ≤ 1e-5) — or, where diffusers raises, be refused by ldm too. The cases
//! ldm deliberately computes otherwise are listed, with the reason, in [`DEVIATIONS`].

mod common;

use candle_core::Device;
use common::{trajectory, Calls, Replay};
use ldm_sampling::names::{SamplerName, SigmaSchedule};
use ldm_sampling::noise::{NoiseSource, TorchCpuRng};
use ldm_sampling::scheduler_config::SchedulerConfig;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

const TOL: f64 = 1e-5;

/// The tolerance of a case: 1e-5 relative (norms floored at 0.05, since the clipped DDIM and
/// DDPM runs of the minimal config pass within 0.003 of zero), plus twice the case's `f32_gap`
/// where the oracle measured one — how far diffusers' own float32 samples lie from the same run
/// with the scheduler in float64 (measured for DDPM, Euler a, DPM2 a, DPM++ 2M/3M SDE and DEIS,
/// and every sampler on the zero-terminal-SNR config). That gap is what limits matching where
/// diffusers cancels in float32: DPM++ SDE's `1 − e^{−2h}` and `(1 − e^{−2h} − 2h)/(2h)²` at
/// small h (1.1e-3 at step 148 of 150 on the LCM config; 0.89 at 999 steps on SD-Turbo's, where
/// diffusers' float32 run no longer resembles its float64 one), and the first step from the
/// 4096·ε start of zero terminal SNR, `x + (σ' − σ)·d` (1.4e-4 at 1 step). Named rules remain
/// where the float64 rerun cannot see the cause:
/// - LMS: diffusers integrates its coefficients with `scipy.integrate.quad(epsrel=1e-4)`;
/// - the SDE solvers, 5e-5: their float32 noise terms carry the sample's rounding from step
///   to step (DPM++ 3M SDE: 2.3e-5 at 28 steps on the zero-SNR config; DPM++ SDE, whose
///   Brownian tree cannot be rerun in float64: 2.0e-5);
/// - DPM2 a at 2–3 steps: diffusers computes σ_down = √(σ'² − σ_up²) in float32 inside
///   `set_timesteps`, which cancels when σ' ≪ σ (0.7 % off at 2 steps on SD2's config, where
///   ldm's float64 step lands 3.7e-5 from diffusers');
/// - 150 and 999 steps: float32 rounding accumulates over the run.
fn tolerance(sampler: &str, steps: usize, f32_gap: f64) -> f64 {
    let mut tol: f64 = match sampler {
        "dpm2_a" if steps <= 3 => 1e-4,
        "lms" | "dpmpp_sde" | "dpmpp_2m_sde" | "dpmpp_3m_sde" => 5e-5,
        _ => TOL,
    };
    if steps >= 150 {
        tol = tol.max(1e-4);
    }
    tol + 2.0 * f32_gap
}

/// (config, samplers, reason): cases ldm plans and runs but, on purpose, not as diffusers does.
const DEVIATIONS: [(&str, &[&str], &str); 1] = [(
    "zsnr_trailing",
    &["pndm", "lms", "heun", "dpm2", "dpm2_a", "dpmpp_sde", "deis"],
    "these diffusers classes have no `rescale_betas_zero_snr` and ignore it, sampling a schedule \
     the model was not trained on; ldm gives them the model's zero-terminal-SNR schedule (with \
     the finite σ ≈ 4096 start diffusers' Euler uses)",
)];

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/scheduler_sweep")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect())
        .unwrap_or_default()
}

/// ‖a − b‖ over the larger norm (floored at 0.05): where diffusers' float32 run has drifted
/// far from its float64 one, either side may be the small one.
fn rel(a: &[f32], b: &[f64]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm_b: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    let norm_a: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    num / norm_a.max(norm_b).max(0.05)
}

fn schedule_of(name: &str) -> SigmaSchedule {
    SigmaSchedule::parse(name).unwrap()
}

/// Compares one case; returns the largest sample error, or `Err` saying how it differs.
fn check(cfg: &SchedulerConfig, case: &Value, shape: &[usize]) -> Result<f64, String> {
    let sampler_name = case["sampler"].as_str().unwrap();
    let (sampler, _) = SamplerName::parse(sampler_name).unwrap();
    let steps = case["steps"].as_u64().unwrap() as usize;
    let planned = cfg.plan_with(
        sampler,
        &schedule_of(case["schedule"].as_str().unwrap()),
        steps,
        None,
    );
    if let Some(err) = case["error"].as_str() {
        return match planned {
            Err(_) => Ok(0.0),
            Ok(_) => Err(format!("diffusers raises ({err}) but ldm plans it")),
        };
    }
    let plan = planned.map_err(|e| format!("refused: {e}"))?;
    let theirs = floats(&case["timesteps"]);
    let calls = Calls::new(&plan, case["calls"].as_u64().unwrap() as usize);
    let main = calls.step_timesteps(&theirs);
    if plan.timesteps.len() != main.len() {
        return Err(format!(
            "{} timesteps against diffusers' {}",
            plan.timesteps.len(),
            main.len()
        ));
    }
    for (a, b) in plan.timesteps.iter().zip(&main) {
        // Fractional (converted-sigma) timesteps move with an ulp of ᾱ near the ends.
        if (a - b).abs() > 1e-4 + 1e-5 * b.abs() {
            return Err(format!("timestep {a} against {b}"));
        }
    }
    let single_sigmas = !calls.two_stage() && plan.landings.is_none();
    if let (true, Some(s)) = (single_sigmas, case["sigmas"].as_array()) {
        let s: Vec<f64> = s
            .iter()
            .map(|v| v.as_f64().unwrap_or(f64::INFINITY))
            .collect();
        let ours = &plan.sigmas;
        let comparable = s.len() == ours.len();
        if comparable
            && ours
                .iter()
                .zip(&s)
                .any(|(a, b)| (a - b).abs() > 1e-5 * b.abs().max(1e-3) && b.is_finite())
        {
            let i = (0..s.len())
                .find(|&i| (ours[i] - s[i]).abs() > 1e-5 * s[i].abs().max(1e-3) && s[i].is_finite())
                .unwrap_or(0);
            return Err(format!(
                "sigma {i} of {}: {} against {}",
                s.len(),
                ours[i],
                s[i]
            ));
        }
    }
    let noise = ldm_sampling::noise::randn_tensor(&mut TorchCpuRng::new(1234), shape, &Device::Cpu)
        .map_err(|e| e.to_string())?;
    let x = (noise * plan.initial_scale()).unwrap();
    let mut rng = TorchCpuRng::new(42);
    let mut brownian = Replay(
        case["brownian"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|v| floats(v).iter().map(|&f| f as f32).collect())
                    .collect()
            })
            .unwrap_or_default(),
        0,
    );
    let noise: &mut dyn NoiseSource = if brownian.0.is_empty() {
        &mut rng
    } else {
        &mut brownian
    };
    let states: Vec<Vec<f32>> = trajectory(&plan, x, noise)
        .and_then(|t| {
            t.iter()
                .map(|s| Ok(s.flatten_all()?.to_vec1()?))
                .collect::<ldm_sampling::Result<_>>()
        })
        .map_err(|e| format!("sampling: {e}"))?;
    let kept: BTreeMap<usize, Vec<f64>> = case["trajectory"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let v = floats(e);
            (v[0] as usize, v[1..].to_vec())
        })
        .collect();
    let mut compared = 0;
    let mut worst = 0f64;
    let tol = tolerance(sampler_name, steps, case["f32_gap"].as_f64().unwrap_or(0.0));
    for (i, ours) in states.iter().enumerate() {
        if let Some(theirs) = kept.get(&calls.of_step(i)) {
            let err = rel(ours, theirs);
            worst = worst.max(err);
            if err.is_nan() || err >= tol {
                return Err(format!(
                    "step {i} (call {}) off by {err:.2e}: {ours:?} against {theirs:?}",
                    calls.of_step(i)
                ));
            }
            compared += 1;
        }
    }
    if compared == 0
        || !kept.contains_key(&calls.calls)
        || calls.of_step(states.len() - 1) != calls.calls
    {
        return Err(format!(
            "trajectory not compared to the end ({compared} of {} kept calls)",
            kept.len()
        ));
    }
    Ok(worst)
}

fn key(config: &str, case: &Value) -> (String, String, String, u64) {
    (
        config.to_string(),
        case["sampler"].as_str().unwrap().to_string(),
        case["schedule"].as_str().unwrap().to_string(),
        case["steps"].as_u64().unwrap(),
    )
}

fn load(config: &str) -> Vec<Value> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(dir().join(format!("{config}.json.gz"))).unwrap(),
    )
    .read_to_string(&mut text)
    .unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

#[test]
fn every_scheduler_config_and_step_count_gives_diffusers_numbers() {
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("index.json")).unwrap()).unwrap();
    let shape: Vec<usize> = index["latent_shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let (mut matched, mut refused, mut deviating) = (0usize, 0usize, 0usize);
    let mut failures: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut total = 0;
    let mut worst: BTreeMap<String, f64> = BTreeMap::new();
    let configs = index["configs"].as_object().unwrap();
    // A case equal to an earlier config's is stored once: `same_as` names that config.
    let mut stored: BTreeMap<(String, String, String, u64), Value> = BTreeMap::new();
    let loaded: Vec<(String, Vec<Value>)> = configs.keys().map(|c| (c.clone(), load(c))).collect();
    for (config, cases) in &loaded {
        for case in cases.iter().filter(|c| c["same_as"].is_null()) {
            stored.insert(key(config, case), case.clone());
        }
    }
    for (config, cases) in &loaded {
        let cfg = SchedulerConfig::from_json(&configs[config].to_string()).unwrap();
        let config = config.as_str();
        for case in cases {
            let case = match case["same_as"].as_str() {
                Some(other) => {
                    let mut full = stored[&key(other, case)].clone();
                    full["same_as"] = case["same_as"].clone();
                    full
                }
                None => case.clone(),
            };
            total += 1;
            let sampler = case["sampler"].as_str().unwrap().to_string();
            let deviation = DEVIATIONS
                .iter()
                .any(|(c, names, _)| *c == config && names.contains(&sampler.as_str()));
            let steps = case["steps"].as_u64().unwrap() as usize;
            let schedule = case["schedule"].as_str().unwrap().to_string();
            if deviation {
                // Planned and run all the same, to finite samples.
                let (s, _) = SamplerName::parse(&sampler).unwrap();
                let ok = cfg
                    .plan_with(s, &schedule_of(&schedule), steps, None)
                    .is_ok();
                if !ok {
                    failures
                        .entry(format!("{config} {sampler} {schedule}"))
                        .or_default()
                        .push(format!("{steps}: a listed deviation that ldm refuses"));
                }
                deviating += 1;
                continue;
            }
            match check(&cfg, &case, &shape) {
                Ok(_) if case["error"].is_string() => refused += 1,
                Ok(err) => {
                    matched += 1;
                    let w = worst.entry(sampler.clone()).or_insert(0.0);
                    *w = w.max(err);
                }
                Err(e) => failures
                    .entry(format!("{config} {sampler} {schedule}"))
                    .or_default()
                    .push(format!("{steps}: {e}")),
            }
        }
    }
    let expected = index["counts"]["cases"].as_u64().unwrap() as usize;
    println!("{total} cases: {matched} matched diffusers, {refused} refused as diffusers refuses, {deviating} deviations on purpose");
    for (sampler, w) in &worst {
        println!("{sampler}: largest sample error {w:.1e}");
    }
    let failed: usize = failures.values().map(Vec::len).sum();
    let mut report = String::new();
    for (k, v) in &failures {
        report.push_str(&format!(
            "{k}: {} cases, e.g. {}\n",
            v.len(),
            v[..v.len().min(2)].join(" | ")
        ));
    }
    assert!(
        failures.is_empty(),
        "{failed} of {total} cases differ:\n{report}"
    );
    assert_eq!(total, expected, "the index's case count");
    assert_eq!(matched + refused + deviating, total);
}
