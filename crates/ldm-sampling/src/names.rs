//! Samplers and schedules by name: ldm's own names, ComfyUI's, and A1111's display names
//! ("DPM++ 2M Karras" picks the sampler and the schedule). Unknown names list the valid ones.

use crate::{Error, Result};

/// Every sampler ldm offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerName {
    Ddpm,
    Ddim,
    Pndm,
    Lms,
    Euler,
    EulerA,
    Heun,
    Dpm2,
    Dpm2A,
    DpmPp2M,
    DpmPp2MSde,
    DpmPp2SA,
    DpmPpSde,
    DpmPp3MSde,
    UniPc,
    Deis,
    Lcm,
    Tcd,
}

/// A sigma spacing: the model's own, or one of the named alternatives, or explicit sigmas.
#[derive(Debug, Clone, PartialEq)]
pub enum SigmaSchedule {
    /// The scheduler config's own timestep spacing.
    Default,
    /// Karras et al. 2022, ρ = 7.
    Karras,
    Exponential,
    /// Beta(0.6, 0.6) spacing.
    Beta,
    /// ComfyUI's `sgm_uniform`: timesteps evenly spaced between σ_max's and σ_min's.
    SgmUniform,
    /// ComfyUI's `simple`: every (N/steps)-th training sigma from the top.
    Simple,
    /// Explicit decreasing sigmas (the last usually 0).
    Custom(Vec<f64>),
}

const SAMPLERS: [(&str, SamplerName); 18] = [
    ("ddpm", SamplerName::Ddpm),
    ("ddim", SamplerName::Ddim),
    ("pndm", SamplerName::Pndm),
    ("lms", SamplerName::Lms),
    ("euler", SamplerName::Euler),
    ("euler_a", SamplerName::EulerA),
    ("heun", SamplerName::Heun),
    ("dpm2", SamplerName::Dpm2),
    ("dpm2_a", SamplerName::Dpm2A),
    ("dpmpp_2m", SamplerName::DpmPp2M),
    ("dpmpp_2m_sde", SamplerName::DpmPp2MSde),
    ("dpmpp_2s_a", SamplerName::DpmPp2SA),
    ("dpmpp_sde", SamplerName::DpmPpSde),
    ("dpmpp_3m_sde", SamplerName::DpmPp3MSde),
    ("unipc", SamplerName::UniPc),
    ("deis", SamplerName::Deis),
    ("lcm", SamplerName::Lcm),
    ("tcd", SamplerName::Tcd),
];

/// Other spellings: ComfyUI's sampler names and A1111's display names without a schedule.
const ALIASES: [(&str, SamplerName); 16] = [
    ("plms", SamplerName::Pndm),
    ("euler_ancestral", SamplerName::EulerA),
    ("euler a", SamplerName::EulerA),
    ("dpm_2", SamplerName::Dpm2),
    ("dpm_2_ancestral", SamplerName::Dpm2A),
    ("dpm2 a", SamplerName::Dpm2A),
    ("dpm++ 2m", SamplerName::DpmPp2M),
    ("dpm++ 2m sde", SamplerName::DpmPp2MSde),
    ("dpm++ 2s a", SamplerName::DpmPp2SA),
    ("dpmpp_2s_ancestral", SamplerName::DpmPp2SA),
    ("dpm++ sde", SamplerName::DpmPpSde),
    ("dpm++ 3m sde", SamplerName::DpmPp3MSde),
    ("uni_pc", SamplerName::UniPc),
    ("uni_pc_bh2", SamplerName::UniPc),
    ("k_euler", SamplerName::Euler),
    ("k_euler_a", SamplerName::EulerA),
];

const SCHEDULES: [&str; 7] = [
    "default",
    "karras",
    "exponential",
    "beta",
    "sgm_uniform",
    "simple",
    "custom:<σ,σ,…>",
];

impl SamplerName {
    /// ldm's name for this sampler.
    pub fn as_str(self) -> &'static str {
        SAMPLERS
            .iter()
            .find(|(_, s)| *s == self)
            .map_or("?", |(n, _)| n)
    }

    /// Parses a sampler name; A1111 display names with a schedule suffix ("DPM++ 2M Karras")
    /// also return that schedule.
    pub fn parse(name: &str) -> Result<(Self, Option<SigmaSchedule>)> {
        let lower = name.trim().to_lowercase();
        let lookup = |n: &str| {
            SAMPLERS
                .iter()
                .chain(ALIASES.iter())
                .find(|(k, _)| *k == n)
                .map(|(_, s)| *s)
        };
        if let Some(s) = lookup(&lower) {
            return Ok((s, None));
        }
        for (suffix, schedule) in [
            (" karras", SigmaSchedule::Karras),
            (" exponential", SigmaSchedule::Exponential),
        ] {
            if let Some(base) = lower.strip_suffix(suffix) {
                if let Some(s) = lookup(base) {
                    return Ok((s, Some(schedule)));
                }
            }
        }
        let valid: Vec<&str> = SAMPLERS.iter().map(|(n, _)| *n).collect();
        Err(Error::InvalidArgument(format!(
            "unknown sampler `{name}`; valid samplers: {} (A1111 names such as \"DPM++ 2M Karras\" work too)",
            valid.join(", ")
        )))
    }

    /// The sampler that reproduces a diffusers scheduler config's own class.
    pub fn for_config(config: &crate::scheduler_config::SchedulerConfig) -> Result<Self> {
        use crate::scheduler_config::SchedulerClass as C;
        use SamplerName::*;
        let class = config.class().map_err(|e| {
            Error::Config(format!(
                "{e}; pick a sampler by name (--sampler) to use this model"
            ))
        })?;
        let s = config.settings(class)?;
        Ok(match class {
            C::Ddpm => Ddpm,
            C::Ddim => Ddim,
            C::Pndm => Pndm,
            C::Lms => Lms,
            C::Euler => Euler,
            C::EulerAncestral => EulerA,
            C::Heun => Heun,
            C::Kdpm2 => Dpm2,
            C::Kdpm2Ancestral => Dpm2A,
            C::DpmSolverMultistep if s.sde == Ok(true) && s.solver_order == 3 => DpmPp3MSde,
            C::DpmSolverMultistep if s.sde == Ok(true) => DpmPp2MSde,
            C::DpmSolverMultistep => DpmPp2M,
            C::DpmSolverSde => DpmPpSde,
            C::UniPc => UniPc,
            C::Deis => Deis,
            C::Lcm => Lcm,
            C::Tcd => Tcd,
        })
    }

    /// Every sampler name.
    pub fn all() -> impl Iterator<Item = (&'static str, SamplerName)> {
        SAMPLERS.iter().copied()
    }

    /// A1111's display name of this sampler (its `/sdapi/v1/samplers` `name`), which
    /// [`SamplerName::parse`] reads back.
    pub fn display_name(self) -> &'static str {
        use SamplerName::*;
        match self {
            Ddpm => "DDPM",
            Ddim => "DDIM",
            Pndm => "PLMS",
            Lms => "LMS",
            Euler => "Euler",
            EulerA => "Euler a",
            Heun => "Heun",
            Dpm2 => "DPM2",
            Dpm2A => "DPM2 a",
            DpmPp2M => "DPM++ 2M",
            DpmPp2MSde => "DPM++ 2M SDE",
            DpmPp2SA => "DPM++ 2S a",
            DpmPpSde => "DPM++ SDE",
            DpmPp3MSde => "DPM++ 3M SDE",
            UniPc => "UniPC",
            Deis => "DEIS",
            Lcm => "LCM",
            Tcd => "TCD",
        }
    }
}

impl SigmaSchedule {
    /// The name [`SigmaSchedule::parse`] reads back (custom sigmas in full precision).
    pub fn name(&self) -> String {
        match self {
            SigmaSchedule::Default => "default".into(),
            SigmaSchedule::Karras => "karras".into(),
            SigmaSchedule::Exponential => "exponential".into(),
            SigmaSchedule::Beta => "beta".into(),
            SigmaSchedule::SgmUniform => "sgm_uniform".into(),
            SigmaSchedule::Simple => "simple".into(),
            SigmaSchedule::Custom(s) => {
                let list: Vec<String> = s.iter().map(|v| v.to_string()).collect();
                format!("custom:{}", list.join(","))
            }
        }
    }

    /// Parses a schedule name, or `custom:` followed by comma-separated sigmas.
    pub fn parse(name: &str) -> Result<Self> {
        let lower = name.trim().to_lowercase();
        if let Some(list) = lower.strip_prefix("custom:") {
            let sigmas = list
                .split(',')
                .map(|s| s.trim().parse::<f64>())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| Error::InvalidArgument(format!("custom sigmas `{list}`: {e}")))?;
            return Ok(SigmaSchedule::Custom(sigmas));
        }
        Ok(match lower.as_str() {
            // "automatic" is A1111's name for the sampler's own choice.
            "default" | "normal" | "automatic" => SigmaSchedule::Default,
            "karras" => SigmaSchedule::Karras,
            "exponential" => SigmaSchedule::Exponential,
            "beta" => SigmaSchedule::Beta,
            "sgm_uniform" => SigmaSchedule::SgmUniform,
            "simple" => SigmaSchedule::Simple,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "unknown schedule `{name}`; valid schedules: {}",
                    SCHEDULES.join(", ")
                )))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a1111_names_pick_sampler_and_schedule() {
        assert_eq!(
            SamplerName::parse("DPM++ 2M Karras").unwrap(),
            (SamplerName::DpmPp2M, Some(SigmaSchedule::Karras))
        );
        assert_eq!(
            SamplerName::parse("Euler a").unwrap(),
            (SamplerName::EulerA, None)
        );
        assert_eq!(
            SamplerName::parse("DPM++ 3M SDE Exponential").unwrap(),
            (SamplerName::DpmPp3MSde, Some(SigmaSchedule::Exponential))
        );
        assert_eq!(
            SamplerName::parse("dpmpp_2m_sde").unwrap().0,
            SamplerName::DpmPp2MSde
        );
        for (name, s) in SamplerName::all() {
            assert_eq!(SamplerName::parse(name).unwrap().0, s);
            assert_eq!(s.as_str(), name);
        }
    }

    /// What the PNG parameters record is what `--sampler` and `--schedule` accept.
    #[test]
    fn names_round_trip() {
        for (name, s) in SamplerName::all() {
            assert_eq!(SamplerName::parse(s.as_str()).unwrap(), (s, None), "{name}");
        }
        for s in [
            SigmaSchedule::Default,
            SigmaSchedule::Karras,
            SigmaSchedule::Exponential,
            SigmaSchedule::Beta,
            SigmaSchedule::SgmUniform,
            SigmaSchedule::Simple,
            SigmaSchedule::Custom(vec![14.614641189575195, 0.1, 1e-3, 0.0]),
        ] {
            assert_eq!(SigmaSchedule::parse(&s.name()).unwrap(), s, "{}", s.name());
        }
    }

    #[test]
    fn unknown_names_list_the_valid_ones() {
        let e = SamplerName::parse("dpmpp_9m").unwrap_err().to_string();
        assert!(e.contains("euler_a") && e.contains("tcd"), "{e}");
        let e = SigmaSchedule::parse("wavy").unwrap_err().to_string();
        assert!(e.contains("karras") && e.contains("sgm_uniform"), "{e}");
        assert_eq!(
            SigmaSchedule::parse("custom:3, 1.5,0").unwrap(),
            SigmaSchedule::Custom(vec![3.0, 1.5, 0.0])
        );
        assert!(SigmaSchedule::parse("custom:3,x").is_err());
    }
}
