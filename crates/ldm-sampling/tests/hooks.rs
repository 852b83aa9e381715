//! Every sampler starts part-way (a suffix of its sigmas, as img2img does) and calls its
//! per-step hook once per step, using the sample the hook hands back (inpainting blends).

use candle_core::{Device, Result, Tensor};
use ldm_sampling::names::{SamplerName, SigmaSchedule};
use ldm_sampling::noise::TorchCpuRng;
use ldm_sampling::scheduler_config::SchedulerConfig;
use ldm_sampling::{Denoiser, Run, StepInfo};

struct Shrink;

impl Denoiser for Shrink {
    fn denoise(&self, x: &Tensor, sigma: f64) -> Result<Tensor> {
        x * (1.0 / (1.0 + sigma * sigma))
    }
}

#[test]
fn every_sampler_starts_part_way_and_honours_its_hook() {
    let config = SchedulerConfig::from_json(
        r#"{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1}"#,
    )
    .unwrap();
    for (name, sampler) in SamplerName::all() {
        let mut plan = config
            .plan_with(sampler, &SigmaSchedule::Default, 8, None)
            .unwrap();
        plan.truncate(0.5).unwrap();
        let steps = plan.sigmas.len() - 1;
        assert_eq!(steps, 4, "{name}");
        let x = Tensor::ones(16, candle_core::DType::F32, &Device::Cpu).unwrap();
        let run_with = |pin: bool| -> (Vec<(usize, f64)>, Tensor) {
            let mut seen = Vec::new();
            let mut hook = |info: &StepInfo| -> ldm_sampling::Result<Option<Tensor>> {
                seen.push((info.step, info.sigma_next));
                // An inpainting-style hook: pin the first half of the sample to 7.
                if pin {
                    let keep = Tensor::full(7f32, 8, &Device::Cpu)?;
                    Ok(Some(Tensor::cat(&[keep, info.x.narrow(0, 8, 8)?], 0)?))
                } else {
                    Ok(None)
                }
            };
            let mut rng = TorchCpuRng::new(1);
            let mut run = Run {
                denoiser: &Shrink,
                sigmas: &plan.sigmas,
                landings: plan.landings.as_deref(),
                noise: &mut rng,
                hook: &mut hook,
            };
            let out = plan.sampler.sample(x.clone(), &mut run).unwrap();
            (seen, out)
        };
        let (seen, _) = run_with(false);
        let expect: Vec<(usize, f64)> = (0..steps).map(|i| (i, plan.sigmas[i + 1])).collect();
        assert_eq!(seen, expect, "{name}");
        let (_, pinned) = run_with(true);
        let first: Vec<f32> = pinned.narrow(0, 0, 8).unwrap().to_vec1().unwrap();
        assert!(
            first.iter().all(|&v| v == 7.0),
            "{name}: hook's sample not used: {first:?}"
        );
    }
}
