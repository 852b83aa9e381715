//! Choosing a sampler and a schedule for a model: a sampler name selects the diffusers scheduler
//! whose numbers it reproduces (configured from the model's own `scheduler_config.json`, as
//! `Scheduler.from_config` does), and a schedule name either sets that scheduler's own option
//! (`use_karras_sigmas`, …) or — where it has none — replaces the sigmas k-diffusion's way.

use crate::names::{SamplerName, SigmaSchedule};
use crate::samplers::Sampler;
use crate::schedule;
use crate::scheduler_config::{
    Plan, SampleSpace, SchedulerClass, SchedulerConfig, Settings, SigmaOption,
};
use crate::{Error, Result};

impl SamplerName {
    /// The diffusers scheduler class whose numbers this sampler reproduces.
    pub fn class(self) -> SchedulerClass {
        use SamplerName::*;
        match self {
            Ddpm => SchedulerClass::Ddpm,
            Ddim => SchedulerClass::Ddim,
            Pndm => SchedulerClass::Pndm,
            Lms => SchedulerClass::Lms,
            Euler => SchedulerClass::Euler,
            EulerA | DpmPp2SA => SchedulerClass::EulerAncestral,
            Heun => SchedulerClass::Heun,
            Dpm2 => SchedulerClass::Kdpm2,
            Dpm2A => SchedulerClass::Kdpm2Ancestral,
            DpmPp2M | DpmPp2MSde | DpmPp3MSde => SchedulerClass::DpmSolverMultistep,
            DpmPpSde => SchedulerClass::DpmSolverSde,
            UniPc => SchedulerClass::UniPc,
            Deis => SchedulerClass::Deis,
            Lcm => SchedulerClass::Lcm,
            Tcd => SchedulerClass::Tcd,
        }
    }

    /// What the name fixes in its class's settings (`from_config(config, **overrides)`).
    fn configure(self, s: &mut Settings) {
        use SamplerName::*;
        match self {
            DpmPp2M => (s.sde, s.solver_order) = (Ok(false), 2),
            DpmPp2MSde => (s.sde, s.solver_order) = (Ok(true), 2),
            DpmPp3MSde => (s.sde, s.solver_order) = (Ok(true), 3),
            Pndm => s.skip_prk_steps = true,
            _ => {}
        }
    }

    /// Whether diffusers' scheduler for this name has its own option for a sigma spacing.
    fn has_own_option(self) -> bool {
        use SamplerName::*;
        matches!(
            self,
            Euler
                | Heun
                | Lms
                | Dpm2
                | Dpm2A
                | DpmPp2M
                | DpmPp2MSde
                | DpmPp3MSde
                | DpmPpSde
                | UniPc
        )
    }
}

impl SchedulerConfig {
    /// The plan for `sampler` with `schedule` over `steps` steps (`eta`: DDIM's η, TCD's γ,
    /// the ancestral samplers' noise strength). Custom sigmas set their own number of steps.
    pub fn plan_with(
        &self,
        sampler: SamplerName,
        sigma_schedule: &SigmaSchedule,
        steps: usize,
        eta: Option<f64>,
    ) -> Result<Plan> {
        if let Some(e) = eta {
            if !(e.is_finite() && e >= 0.0) {
                return Err(Error::InvalidArgument(format!(
                    "eta must be a finite number ≥ 0, got {e}"
                )));
            }
        }
        let mut settings = self.settings(sampler.class())?;
        sampler.configure(&mut settings);
        let own = sampler.has_own_option();
        // `default` keeps the config's own spacing options; a named schedule replaces them.
        let option = match sigma_schedule {
            SigmaSchedule::Karras if own => Some(SigmaOption::Karras),
            SigmaSchedule::Exponential if own => Some(SigmaOption::Exponential),
            SigmaSchedule::Beta if own => Some(SigmaOption::Beta),
            SigmaSchedule::Default => None,
            _ => Some(SigmaOption::None),
        };
        if let Some(o) = option {
            settings.sigma_option = o;
        }
        let generic =
            !matches!(sigma_schedule, SigmaSchedule::Default) && option == Some(SigmaOption::None);
        if generic && matches!(sampler, SamplerName::Lcm | SamplerName::Tcd) {
            return Err(Error::InvalidArgument(format!(
                "{} runs on its distillation timesteps; the schedule must be `default`",
                sampler.as_str()
            )));
        }
        let plan_steps = match sigma_schedule {
            SigmaSchedule::Custom(s) => s.len().saturating_sub(1).max(1),
            _ => steps,
        };
        let mut plan = settings.plan(plan_steps, eta)?;
        match sampler {
            SamplerName::DpmPp2SA => {
                plan.sampler = Sampler::DpmPp2SAncestral {
                    eta: eta.unwrap_or(1.0),
                }
            }
            SamplerName::EulerA => {
                plan.sampler = Sampler::EulerAncestral {
                    eta: eta.unwrap_or(1.0),
                }
            }
            SamplerName::Dpm2A | SamplerName::DpmPpSde if eta.is_some_and(|e| e != 1.0) => {
                return Err(Error::InvalidArgument(format!(
                    "{} takes no eta",
                    sampler.as_str()
                )))
            }
            _ => {}
        }
        if generic {
            let sigmas = generic_sigmas(sigma_schedule, &plan, plan_steps)?;
            plan.timesteps = sigmas[..sigmas.len() - 1]
                .iter()
                .map(|&s| plan.schedule.sigma_to_t(s))
                .collect();
            if plan.space == SampleSpace::VarianceExploding {
                plan.init_noise_sigma = sigmas[0];
            }
            plan.sigmas = sigmas;
            plan.landings = None;
            if let Sampler::Plms {
                first_from,
                second,
                ratio,
                ..
            } = &mut plan.sampler
            {
                *first_from = None;
                *second = None;
                *ratio = None;
            }
        }
        Ok(plan)
    }
}

/// k-diffusion / ComfyUI sigma lists over the model's training sigmas, ending at 0.
fn generic_sigmas(which: &SigmaSchedule, plan: &Plan, steps: usize) -> Result<Vec<f64>> {
    let train: Vec<f64> = plan.schedule.sigmas().iter().map(|&s| s as f64).collect();
    let n = train.len();
    let (sigma_min, sigma_max) = (train[0], train[n - 1].min(1e10));
    let mut sigmas = match which {
        SigmaSchedule::Karras => schedule::karras(sigma_min, sigma_max, steps, 7.0),
        SigmaSchedule::Exponential => schedule::exponential(sigma_min, sigma_max, steps),
        SigmaSchedule::Beta => schedule::beta(sigma_min, sigma_max, steps, 0.6, 0.6),
        SigmaSchedule::SgmUniform => {
            let (t_max, t_min) = (
                plan.schedule.sigma_to_t(sigma_max),
                plan.schedule.sigma_to_t(sigma_min),
            );
            schedule::linspace_f64(t_max, t_min, steps + 1)[..steps]
                .iter()
                .map(|&t| plan.schedule.t_to_sigma(t))
                .collect()
        }
        SigmaSchedule::Simple => {
            let stride = n as f64 / steps as f64;
            (0..steps)
                .map(|x| train[n - 1 - (x as f64 * stride) as usize])
                .collect()
        }
        SigmaSchedule::Custom(list) => {
            if list.len() < 2 {
                return Err(Error::InvalidArgument(
                    "custom sigmas need at least two values".into(),
                ));
            }
            if list.windows(2).any(|w| w[1] >= w[0])
                || list.iter().any(|s| !(s.is_finite() && *s >= 0.0))
            {
                return Err(Error::InvalidArgument(
                    "custom sigmas must be finite, non-negative and strictly decreasing".into(),
                ));
            }
            return Ok(list.clone());
        }
        SigmaSchedule::Default => return Ok(plan.sigmas.clone()),
    };
    sigmas.push(0.0);
    Ok(sigmas)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15() -> SchedulerConfig {
        SchedulerConfig::from_json(
            r#"{"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": false,
                "skip_prk_steps": true, "steps_offset": 1}"#,
        )
        .unwrap()
    }

    #[test]
    fn every_sampler_and_schedule_combination_plans() {
        let schedules = [
            SigmaSchedule::Default,
            SigmaSchedule::Karras,
            SigmaSchedule::Exponential,
            SigmaSchedule::Beta,
            SigmaSchedule::SgmUniform,
            SigmaSchedule::Simple,
        ];
        for (name, sampler) in SamplerName::all() {
            for s in &schedules {
                let res = sd15().plan_with(sampler, s, 8, None);
                let distilled = matches!(sampler, SamplerName::Lcm | SamplerName::Tcd);
                if distilled && *s != SigmaSchedule::Default {
                    assert!(res.is_err(), "{name} {s:?}");
                    continue;
                }
                let plan = res.unwrap_or_else(|e| panic!("{name} {s:?}: {e}"));
                assert_eq!(plan.sigmas.len(), 9, "{name} {s:?}");
                assert_eq!(plan.timesteps.len(), 8, "{name} {s:?}");
                assert!(
                    plan.sigmas.windows(2).all(|w| w[1] < w[0]),
                    "{name} {s:?}: {:?}",
                    plan.sigmas
                );
            }
        }
    }

    #[test]
    fn simple_and_sgm_uniform_match_comfyui() {
        // ComfyUI simple_scheduler: sigmas[-(1 + int(x * 1000/4))] for x in 0..4, then 0.
        let plan = sd15()
            .plan_with(SamplerName::Euler, &SigmaSchedule::Simple, 4, None)
            .unwrap();
        let train = plan.schedule.sigmas();
        let expect: Vec<f64> = [999, 749, 499, 249]
            .iter()
            .map(|&i| train[i] as f64)
            .chain([0.0])
            .collect();
        assert_eq!(plan.sigmas, expect);
        let plan = sd15()
            .plan_with(SamplerName::Euler, &SigmaSchedule::SgmUniform, 4, None)
            .unwrap();
        assert!(
            (plan.timesteps[0] - 999.0).abs() < 1e-6 && (plan.timesteps[2] - 499.5).abs() < 1e-3,
            "{:?}",
            plan.timesteps
        );
    }

    #[test]
    fn bad_requests_are_clear_errors() {
        let c = sd15();
        let err = |r: Result<Plan>| r.unwrap_err().to_string();
        assert!(
            err(c.plan_with(SamplerName::Euler, &SigmaSchedule::Default, 0, None))
                .contains("steps")
        );
        assert!(
            err(c.plan_with(SamplerName::Euler, &SigmaSchedule::Default, 1001, None))
                .contains("1000")
        );
        assert!(
            err(c.plan_with(SamplerName::Ddim, &SigmaSchedule::Default, 10, Some(-0.5)))
                .contains("eta")
        );
        assert!(
            err(c.plan_with(SamplerName::Lcm, &SigmaSchedule::Karras, 4, None)).contains("default")
        );
        assert!(
            err(c.plan_with(SamplerName::Lcm, &SigmaSchedule::Default, 60, None))
                .contains("original_inference_steps")
        );
        let bad = SigmaSchedule::Custom(vec![1.0, 2.0, 0.0]);
        assert!(err(c.plan_with(SamplerName::Euler, &bad, 2, None)).contains("decreasing"));
        let mut plan = c
            .plan_with(SamplerName::Euler, &SigmaSchedule::Default, 10, None)
            .unwrap();
        assert!(plan
            .truncate(1.5)
            .unwrap_err()
            .to_string()
            .contains("strength"));
        assert!(plan
            .truncate(0.05)
            .unwrap_err()
            .to_string()
            .contains("no step"));
        let mut cfg = c.clone();
        cfg.beta_schedule = Some("wiggly".into());
        assert!(err(cfg.plan(10, None)).contains("beta_schedule"));
    }
}
