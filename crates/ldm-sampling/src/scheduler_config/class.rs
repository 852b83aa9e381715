//! The diffusers scheduler classes ldm reproduces, each with the defaults of its `__init__`
//! (diffusers 0.42.1), and [`Settings`]: a config resolved for one class as
//! `Class.from_config(config)` resolves it — every key the config states that the class knows,
//! every other key the class knows at **that class's** default, keys the class does not know
//! ignored. A value ldm cannot reproduce is refused by name, with what is accepted.

use super::SchedulerConfig;
use crate::denoiser::{Prediction, X0Clip};
use crate::{Error, Result};

/// A diffusers scheduler class (`_class_name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerClass {
    Ddpm,
    Ddim,
    Pndm,
    Lms,
    Euler,
    EulerAncestral,
    Heun,
    Kdpm2,
    Kdpm2Ancestral,
    DpmSolverMultistep,
    DpmSolverSde,
    UniPc,
    Deis,
    Lcm,
    Tcd,
}

const CLASSES: [(&str, SchedulerClass); 15] = [
    ("DDPMScheduler", SchedulerClass::Ddpm),
    ("DDIMScheduler", SchedulerClass::Ddim),
    ("PNDMScheduler", SchedulerClass::Pndm),
    ("LMSDiscreteScheduler", SchedulerClass::Lms),
    ("EulerDiscreteScheduler", SchedulerClass::Euler),
    (
        "EulerAncestralDiscreteScheduler",
        SchedulerClass::EulerAncestral,
    ),
    ("HeunDiscreteScheduler", SchedulerClass::Heun),
    ("KDPM2DiscreteScheduler", SchedulerClass::Kdpm2),
    (
        "KDPM2AncestralDiscreteScheduler",
        SchedulerClass::Kdpm2Ancestral,
    ),
    (
        "DPMSolverMultistepScheduler",
        SchedulerClass::DpmSolverMultistep,
    ),
    ("DPMSolverSDEScheduler", SchedulerClass::DpmSolverSde),
    ("UniPCMultistepScheduler", SchedulerClass::UniPc),
    ("DEISMultistepScheduler", SchedulerClass::Deis),
    ("LCMScheduler", SchedulerClass::Lcm),
    ("TCDScheduler", SchedulerClass::Tcd),
];

/// How the inference timesteps are laid over the training ones (Lin et al. 2024, Table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

/// A sigma spacing that replaces the timestep spacing's sigmas (`use_karras_sigmas`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigmaOption {
    None,
    Karras,
    Exponential,
    Beta,
}

/// The training-schedule families a class belongs to, for planning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// DDPM, DDIM, PNDM: integer timesteps, steps in ᾱ.
    Discrete,
    /// The k-diffusion ports that keep a variance-exploding sample.
    Karras,
    /// DPM-Solver++, UniPC, DEIS: multistep solvers in λ.
    Multistep,
    /// LCM, TCD: the distillation skeleton.
    Consistency,
}

/// One class's `__init__` defaults; `None` where the class has no such key (it then ignores a
/// config's value, as diffusers does).
struct Defaults {
    beta_start: f64,
    beta_end: f64,
    beta_schedule: &'static str,
    spacing: Spacing,
    set_alpha_to_one: Option<bool>,
    clip_sample: Option<bool>,
    thresholding: bool,
    sigma_options: bool,
    final_sigmas_type: Option<&'static str>,
    solver_order: Option<usize>,
    lower_order_final: Option<bool>,
    algorithm_type: Option<&'static str>,
    solver_type: Option<&'static str>,
    skip_prk_steps: Option<bool>,
}

const BASE: Defaults = Defaults {
    beta_start: 0.0001,
    beta_end: 0.02,
    beta_schedule: "linear",
    spacing: Spacing::Linspace,
    set_alpha_to_one: None,
    clip_sample: None,
    thresholding: false,
    sigma_options: false,
    final_sigmas_type: None,
    solver_order: None,
    lower_order_final: None,
    algorithm_type: None,
    solver_type: None,
    skip_prk_steps: None,
};

impl SchedulerClass {
    /// Parses `_class_name`; unknown classes list the supported ones.
    pub fn parse(name: &str) -> Result<Self> {
        CLASSES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| *c)
            .ok_or_else(|| {
                let known: Vec<&str> = CLASSES.iter().map(|(n, _)| *n).collect();
                Error::Config(format!(
                    "_class_name `{name}` is not a scheduler ldm reproduces (supported: {})",
                    known.join(", ")
                ))
            })
    }

    /// diffusers' class name.
    pub fn name(self) -> &'static str {
        CLASSES
            .iter()
            .find(|(_, c)| *c == self)
            .map_or("?", |(n, _)| n)
    }

    /// The planning family.
    pub fn family(self) -> Family {
        use SchedulerClass::*;
        match self {
            Ddpm | Ddim | Pndm => Family::Discrete,
            Lms | Euler | EulerAncestral | Heun | Kdpm2 | Kdpm2Ancestral | DpmSolverSde => {
                Family::Karras
            }
            DpmSolverMultistep | UniPc | Deis => Family::Multistep,
            Lcm | Tcd => Family::Consistency,
        }
    }

    /// The class's `__init__` defaults (diffusers 0.42.1).
    fn defaults(self) -> Defaults {
        use SchedulerClass::*;
        let sd_betas = Defaults {
            beta_start: 0.00085,
            beta_end: 0.012,
            ..BASE
        };
        let solver = |order_final: bool| Defaults {
            thresholding: true,
            sigma_options: true,
            solver_order: Some(2),
            lower_order_final: Some(order_final),
            ..BASE
        };
        match self {
            Ddpm => Defaults {
                spacing: Spacing::Leading,
                clip_sample: Some(true),
                thresholding: true,
                ..BASE
            },
            Ddim => Defaults {
                spacing: Spacing::Leading,
                set_alpha_to_one: Some(true),
                clip_sample: Some(true),
                thresholding: true,
                ..BASE
            },
            Pndm => Defaults {
                spacing: Spacing::Leading,
                set_alpha_to_one: Some(false),
                skip_prk_steps: Some(false),
                ..BASE
            },
            Lms => Defaults {
                sigma_options: true,
                ..BASE
            },
            Euler => Defaults {
                sigma_options: true,
                final_sigmas_type: Some("zero"),
                ..BASE
            },
            EulerAncestral => Defaults { ..BASE },
            Heun => Defaults {
                sigma_options: true,
                clip_sample: Some(false),
                ..sd_betas
            },
            Kdpm2 | Kdpm2Ancestral | DpmSolverSde => Defaults {
                sigma_options: true,
                ..sd_betas
            },
            DpmSolverMultistep => Defaults {
                final_sigmas_type: Some("zero"),
                algorithm_type: Some("dpmsolver++"),
                solver_type: Some("midpoint"),
                ..solver(true)
            },
            UniPc => Defaults {
                final_sigmas_type: Some("zero"),
                solver_type: Some("bh2"),
                ..solver(true)
            },
            Deis => Defaults {
                algorithm_type: Some("deis"),
                solver_type: Some("logrho"),
                ..solver(true)
            },
            Lcm | Tcd => Defaults {
                beta_schedule: "scaled_linear",
                spacing: Spacing::Leading,
                set_alpha_to_one: Some(true),
                clip_sample: Some(false),
                thresholding: true,
                ..sd_betas
            },
        }
    }
}

/// A scheduler config resolved for one class: every value the planning reads, typed.
#[derive(Debug, Clone)]
pub struct Settings {
    pub class: SchedulerClass,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction: Prediction,
    pub spacing: Spacing,
    pub steps_offset: usize,
    /// `rescale_betas_zero_snr`, for every class: unlike diffusers, whose PNDM, LMS, Heun,
    /// KDPM2, DPM-Solver SDE and DEIS schedulers lack the key and so sample a schedule the
    /// model was not trained on, ldm gives every class the model's schedule.
    pub zero_snr: bool,
    pub set_alpha_to_one: bool,
    pub sigma_option: SigmaOption,
    /// `final_sigmas_type == "sigma_min"`.
    pub final_sigma_min: bool,
    pub solver_order: usize,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    /// `sde-dpmsolver++` (DPM-Solver++ multistep only); `Err` names an `algorithm_type` ldm
    /// does not reproduce, refused when planning unless a sampler name chose the algorithm.
    pub sde: std::result::Result<bool, String>,
    /// What the scheduler does to its x̂₀ estimate (`clip_sample` / `thresholding`).
    pub x0_clip: Option<X0Clip>,
    pub skip_prk_steps: bool,
    pub original_inference_steps: usize,
    pub timestep_scaling: f64,
}

fn refuse(
    class: SchedulerClass,
    key: &str,
    value: impl std::fmt::Display,
    accepted: &str,
) -> Error {
    Error::Config(format!(
        "{}: `{key}` = {value} is not supported (accepted: {accepted})",
        class.name()
    ))
}

impl SchedulerConfig {
    /// The config's own class.
    pub fn class(&self) -> Result<SchedulerClass> {
        SchedulerClass::parse(&self.class_name)
    }

    /// This config as `class.from_config(config)` reads it.
    pub fn settings(&self, class: SchedulerClass) -> Result<Settings> {
        let d = class.defaults();
        let c = self;
        let known = |default: Option<bool>, v: Option<bool>| default.map(|d| v.unwrap_or(d));
        let prediction: Prediction = c.prediction_type.as_deref().unwrap_or("epsilon").parse()?;
        let spacing = match c.timestep_spacing.as_deref() {
            None => d.spacing,
            Some("linspace") => Spacing::Linspace,
            Some("leading") => Spacing::Leading,
            Some("trailing") => Spacing::Trailing,
            Some(other) => {
                return Err(refuse(
                    class,
                    "timestep_spacing",
                    format!("`{other}`"),
                    "linspace, leading, trailing",
                ))
            }
        };
        let sigma_option = if !d.sigma_options {
            SigmaOption::None
        } else {
            let set = [
                (c.use_karras_sigmas, SigmaOption::Karras),
                (c.use_exponential_sigmas, SigmaOption::Exponential),
                (c.use_beta_sigmas, SigmaOption::Beta),
            ];
            let on: Vec<SigmaOption> = set
                .iter()
                .filter(|(v, _)| *v == Some(true))
                .map(|(_, o)| *o)
                .collect();
            if on.len() > 1 {
                // diffusers raises the same in every class with these options.
                return Err(Error::Config(format!(
                    "{}: only one of `use_karras_sigmas`, `use_exponential_sigmas` and `use_beta_sigmas` can be true",
                    class.name()
                )));
            }
            on.first().copied().unwrap_or(SigmaOption::None)
        };
        let final_sigma_min = match d
            .final_sigmas_type
            .map(|def| c.final_sigmas_type.as_deref().unwrap_or(def))
        {
            None | Some("zero") => false,
            Some("sigma_min") => true,
            Some(other) => {
                return Err(refuse(
                    class,
                    "final_sigmas_type",
                    format!("`{other}`"),
                    "zero, sigma_min",
                ))
            }
        };
        let thresholding = d.thresholding && c.thresholding.unwrap_or(false);
        let clip = known(d.clip_sample, c.clip_sample).unwrap_or(false);
        let x0_clip = if thresholding {
            Some(X0Clip::Threshold {
                ratio: c.dynamic_thresholding_ratio.unwrap_or(0.995),
                max: c.sample_max_value.unwrap_or(1.0),
            })
        } else if clip {
            Some(X0Clip::Clamp(c.clip_sample_range.unwrap_or(1.0)))
        } else {
            None
        };
        let algorithm = d
            .algorithm_type
            .map(|def| c.algorithm_type.as_deref().unwrap_or(def));
        let sde = match (class, algorithm) {
            (_, None) | (SchedulerClass::Deis, Some("deis")) => Ok(false),
            (SchedulerClass::DpmSolverMultistep, Some("dpmsolver++")) => Ok(false),
            (SchedulerClass::DpmSolverMultistep, Some("sde-dpmsolver++")) => Ok(true),
            (SchedulerClass::Deis, Some(other)) => {
                return Err(refuse(
                    class,
                    "algorithm_type",
                    format!("`{other}`"),
                    "deis",
                ))
            }
            (_, Some(other)) => Err(refuse(
                class,
                "algorithm_type",
                format!("`{other}`"),
                "dpmsolver++, sde-dpmsolver++",
            )
            .to_string()),
        };
        if let Some(def) = d.solver_type {
            let v = c.solver_type.as_deref().unwrap_or(def);
            if v != def {
                return Err(refuse(class, "solver_type", format!("`{v}`"), def));
            }
        }
        let solver_order = d
            .solver_order
            .map_or(1, |def| c.solver_order.unwrap_or(def));
        if d.solver_order.is_some() {
            let max = if class == SchedulerClass::Deis { 2 } else { 3 };
            if !(1..=max).contains(&solver_order) {
                return Err(refuse(
                    class,
                    "solver_order",
                    solver_order,
                    &format!("1 to {max}"),
                ));
            }
        }
        self.refuse_unsupported(class)?;
        Ok(Settings {
            class,
            num_train_timesteps: c.num_train_timesteps.unwrap_or(1000),
            beta_start: c.beta_start.unwrap_or(d.beta_start),
            beta_end: c.beta_end.unwrap_or(d.beta_end),
            beta_schedule: c
                .beta_schedule
                .clone()
                .unwrap_or_else(|| d.beta_schedule.to_string()),
            trained_betas: c.trained_betas.clone(),
            prediction,
            spacing,
            steps_offset: c.steps_offset.unwrap_or(0),
            zero_snr: c.rescale_betas_zero_snr.unwrap_or(false),
            set_alpha_to_one: known(d.set_alpha_to_one, c.set_alpha_to_one).unwrap_or(false),
            sigma_option,
            final_sigma_min,
            solver_order,
            lower_order_final: known(d.lower_order_final, c.lower_order_final).unwrap_or(false),
            euler_at_final: class == SchedulerClass::DpmSolverMultistep
                && c.euler_at_final.unwrap_or(false),
            sde,
            x0_clip,
            skip_prk_steps: known(d.skip_prk_steps, c.skip_prk_steps).unwrap_or(false),
            original_inference_steps: c.original_inference_steps.unwrap_or(50),
            timestep_scaling: c.timestep_scaling.unwrap_or(10.0),
        })
    }

    /// Keys a class knows with values whose numbers ldm does not reproduce.
    fn refuse_unsupported(&self, class: SchedulerClass) -> Result<()> {
        use SchedulerClass::*;
        let c = self;
        let on = |v: Option<bool>| v == Some(true);
        let multistep = class.family() == Family::Multistep;
        if class == Euler {
            if let Some(v) = c.interpolation_type.as_deref().filter(|v| *v != "linear") {
                return Err(refuse(
                    class,
                    "interpolation_type",
                    format!("`{v}`"),
                    "linear",
                ));
            }
            if let Some(v) = c.timestep_type.as_deref().filter(|v| *v != "discrete") {
                return Err(refuse(class, "timestep_type", format!("`{v}`"), "discrete"));
            }
            if let Some(v) = c.sigma_min.or(c.sigma_max) {
                return Err(refuse(
                    class,
                    "sigma_min/sigma_max",
                    v,
                    "null (the training sigmas' range)",
                ));
            }
        }
        if multistep && on(c.use_flow_sigmas) {
            return Err(refuse(class, "use_flow_sigmas", true, "false"));
        }
        if multistep && on(c.use_dynamic_shifting) {
            return Err(refuse(class, "use_dynamic_shifting", true, "false"));
        }
        if class == DpmSolverMultistep {
            if on(c.use_lu_lambdas) {
                return Err(refuse(class, "use_lu_lambdas", true, "false"));
            }
            if let Some(v) = c.lambda_min_clipped.filter(|v| v.is_finite()) {
                return Err(refuse(class, "lambda_min_clipped", v, "-inf"));
            }
            if let Some(v) = &c.variance_type {
                return Err(refuse(class, "variance_type", format!("`{v}`"), "null"));
            }
        }
        if class == Ddpm {
            if let Some(v) = c.variance_type.as_deref().filter(|v| *v != "fixed_small") {
                return Err(refuse(
                    class,
                    "variance_type",
                    format!("`{v}`"),
                    "fixed_small",
                ));
            }
        }
        if class == UniPc {
            if c.predict_x0 == Some(false) {
                return Err(refuse(class, "predict_x0", false, "true"));
            }
            if c.disable_corrector.as_ref().is_some_and(|v| !v.is_empty()) {
                return Err(refuse(class, "disable_corrector", "a non-empty list", "[]"));
            }
            if let Some(v) = c.solver_p.as_ref().filter(|v| !v.is_null()) {
                return Err(refuse(class, "solver_p", v, "null"));
            }
        }
        Ok(())
    }
}

impl Settings {
    /// Whether the class keeps a variance-exploding sample (the k-diffusion ports).
    pub fn variance_exploding(&self) -> bool {
        self.class.family() == Family::Karras
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::samplers::Sampler;

    /// SD1.5's scheduler config as released, less its `clip_sample` line.
    fn sd15_without_clip() -> SchedulerConfig {
        SchedulerConfig::from_json(
            r#"{"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1}"#,
        )
        .unwrap()
    }

    /// `DDIMScheduler.from_config(pndm_config)` clips x̂₀ to [−1, 1]: `clip_sample` is absent
    /// from the config and DDIM's own default is true (PNDM has no such key).
    #[test]
    fn missing_keys_take_the_target_class_defaults() {
        let cfg = sd15_without_clip();
        let ddim = cfg.settings(SchedulerClass::Ddim).unwrap();
        assert_eq!(ddim.x0_clip, Some(X0Clip::Clamp(1.0)));
        assert_eq!(ddim.spacing, Spacing::Leading);
        let plan = ddim.plan(10, None).unwrap();
        assert_eq!(
            plan.sampler,
            Sampler::Ddim {
                eta: 0.0,
                clip: Some(X0Clip::Clamp(1.0))
            }
        );
        // DDPM clips the estimate its posterior mean is made from.
        let ddpm = cfg
            .settings(SchedulerClass::Ddpm)
            .unwrap()
            .plan(10, None)
            .unwrap();
        assert_eq!(ddpm.x0_clip, Some(X0Clip::Clamp(1.0)));
        // Euler has no `clip_sample`; its spacing default is linspace, Heun's betas its own.
        let euler = cfg.settings(SchedulerClass::Euler).unwrap();
        assert_eq!((euler.x0_clip, euler.spacing), (None, Spacing::Linspace));
        let bare =
            SchedulerConfig::from_json(r#"{"_class_name": "HeunDiscreteScheduler"}"#).unwrap();
        let heun = bare.settings(SchedulerClass::Heun).unwrap();
        assert_eq!((heun.beta_start, heun.beta_end), (0.00085, 0.012));
        let ddim = bare.settings(SchedulerClass::Ddim).unwrap();
        assert_eq!(
            (ddim.beta_start, ddim.beta_end, ddim.set_alpha_to_one),
            (0.0001, 0.02, true)
        );
        // A config that states the key keeps it.
        let mut stated = cfg.clone();
        stated.clip_sample = Some(false);
        assert_eq!(stated.settings(SchedulerClass::Ddim).unwrap().x0_clip, None);
    }

    /// DDIM with trailing spacing runs at any step count: at 6 steps it steps from t to
    /// t − 166 and reads the sample at the next timestep (diffusers' numbers).
    #[test]
    fn ddim_trailing_plans_at_step_counts_that_do_not_divide_1000() {
        let mut cfg = sd15_without_clip();
        cfg.timestep_spacing = Some("trailing".into());
        cfg.clip_sample = Some(false);
        let plan = cfg
            .settings(SchedulerClass::Ddim)
            .unwrap()
            .plan(6, None)
            .unwrap();
        assert_eq!(plan.timesteps, [999.0, 832.0, 666.0, 499.0, 332.0, 166.0]);
        let landings = plan.landings.as_ref().expect("landings");
        let t_sigma = |t: f64| plan.schedule.t_to_sigma(t) as f32 as f64;
        assert_eq!(landings[0], t_sigma(833.0));
        assert_eq!(landings[5], t_sigma(0.0));
        // At 61 steps numpy's arange adds a 62nd trailing timestep, −1: DDIM would index ᾱ from
        // the end, so ldm refuses; Euler clamps it to timestep 0 and runs 62 steps, as diffusers.
        let err = cfg
            .settings(SchedulerClass::Ddim)
            .unwrap()
            .plan(61, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("62 timesteps, the last -1"), "{err}");
        let euler = cfg
            .settings(SchedulerClass::Euler)
            .unwrap()
            .plan(61, None)
            .unwrap();
        assert_eq!(euler.timesteps.len(), 62);
        assert_eq!(euler.timesteps[61], -1.0);
        let err = SchedulerConfig::from_json(
            r#"{"_class_name": "DDIMScheduler", "timestep_spacing": "sideways"}"#,
        )
        .unwrap()
        .plan(6, None)
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`timestep_spacing` = `sideways`")
                && err.contains("linspace, leading, trailing"),
            "{err}"
        );
    }
}
