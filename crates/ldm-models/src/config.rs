//! Configs in two layers: serde structs mirroring diffusers' / transformers' `config.json` field for
//! field, and validated configs with every per-block list spelled out and each quirk decoded once.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// A config field that is either one value for every block or one value per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// One value per block; `field` names the config field in the error.
    pub fn per_block(&self, blocks: usize, field: &str) -> std::result::Result<Vec<T>, String> {
        match self {
            OneOrMany::One(v) => Ok(vec![v.clone(); blocks]),
            OneOrMany::Many(v) if v.len() == blocks => Ok(v.clone()),
            OneOrMany::Many(v) => Err(format!(
                "`{field}` has {} entries but there are {blocks} blocks",
                v.len()
            )),
        }
    }
}

/// Reads and parses a JSON config file.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    read_json_with_nulls(path, &[])
}

/// Reads a config whose top-level `null`s mean "the default" (released configs write
/// `"upcast_attention": null`), except for the fields in `meaningful_nulls`, kept as `null`.
pub fn read_json_with_nulls<T: for<'de> Deserialize<'de>>(
    path: &Path,
    meaningful_nulls: &[&str],
) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::config(path, e.to_string()))?;
    from_value_with_nulls(value, meaningful_nulls, path)
}

/// [`read_json_with_nulls`] of a JSON value already read (`path` names it in errors).
pub fn from_value_with_nulls<T: for<'de> Deserialize<'de>>(
    mut value: serde_json::Value,
    meaningful_nulls: &[&str],
    path: &Path,
) -> Result<T> {
    if let Some(map) = value.as_object_mut() {
        map.retain(|k, v| !v.is_null() || meaningful_nulls.contains(&k.as_str()));
    }
    serde_json::from_value(value).map_err(|e| Error::config(path, e.to_string()))
}

/// Sanity limit for channel counts and widths: far above any released model, far below overflow.
pub(crate) const MAX_CHANNELS: usize = 1 << 16;

pub(crate) fn check_range(
    path: &Path,
    field: &str,
    value: usize,
    min: usize,
    max: usize,
) -> Result<()> {
    if value < min || value > max {
        return Err(Error::config(
            path,
            format!("`{field}` = {value} is outside [{min}, {max}]"),
        ));
    }
    Ok(())
}

pub(crate) fn check_groups(path: &Path, field: &str, channels: usize, groups: usize) -> Result<()> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        return Err(Error::config(
            path,
            format!("{field}: {channels} channels cannot be split into {groups} groups"),
        ));
    }
    Ok(())
}

/// `model_index.json` of a diffusers pipeline folder.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    #[serde(rename = "_diffusers_version", default)]
    pub diffusers_version: Option<String>,
    #[serde(flatten)]
    pub components: std::collections::BTreeMap<String, serde_json::Value>,
}

/// What a model folder says its images want when the user gives nothing: `_ldm_defaults` in
/// `model_index.json` (diffusers ignores keys that start with `_`), written by `ldm distill`
/// for students that sample in few steps or have their guidance built in. The names are
/// diffusers' `__call__` arguments.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct PipelineDefaults {
    #[serde(default)]
    pub num_inference_steps: Option<usize>,
    #[serde(default)]
    pub guidance_scale: Option<f64>,
}

impl ModelIndex {
    /// The folder's `_ldm_defaults` (none when absent; an error naming `path`, the index
    /// file, when malformed).
    pub fn defaults(&self, path: &Path) -> Result<PipelineDefaults> {
        let Some(v) = self.components.get("_ldm_defaults") else {
            return Ok(PipelineDefaults::default());
        };
        let d: PipelineDefaults = serde_json::from_value(v.clone())
            .map_err(|e| Error::config(path, format!("`_ldm_defaults`: {e}")))?;
        let steps_ok = d
            .num_inference_steps
            .is_none_or(|n| (1..=1000).contains(&n));
        let scale_ok = d.guidance_scale.is_none_or(|g| g.is_finite() && g >= 0.0);
        if !(steps_ok && scale_ok) {
            return Err(Error::config(
                path,
                format!("`_ldm_defaults`: {d:?} (steps 1–1000, a finite guidance ≥ 0)"),
            ));
        }
        Ok(d)
    }

    /// A boolean pipeline setting (`force_zeros_for_empty_prompt`, …), if present.
    pub fn flag(&self, name: &str) -> Option<bool> {
        self.components.get(name).and_then(|v| v.as_bool())
    }

    /// Whether component `name` is present (listed and not `[null, null]`).
    pub fn has(&self, name: &str) -> bool {
        match self.components.get(name) {
            Some(serde_json::Value::Array(a)) => a.iter().any(|v| !v.is_null()),
            _ => false,
        }
    }
}

/// The fields of a diffusers `scheduler_config.json` that the networks' side needs to know.
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfigHead {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default = "default_prediction_type")]
    pub prediction_type: String,
}

fn default_prediction_type() -> String {
    "epsilon".into()
}
