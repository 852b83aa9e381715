//! Trainable components: a `VarMap` whose names are the checkpoint keys, and writing one out as
//! a diffusers component folder (`config.json` + safetensors weights).

use crate::io::{write_json, write_safetensors};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use ldm_models::weights::{component_files, Checkpoint, Weights};
use std::path::Path;

pub use ldm_models::weights::init::{InitScheme, SeededInit};

/// Strict loading's last check: every tensor of the checkpoint at `path` was asked for by the
/// network built from it.
pub fn check_all_used(weights: &Weights, path: &Path) -> Result<()> {
    let unused = weights.unused();
    if unused.is_empty() {
        Ok(())
    } else {
        Err(Error::Msg(format!(
            "{}: tensors the network does not use: {unused:?}",
            path.display()
        )))
    }
}

/// The variables of `map`, sorted by name, with `prefix` added to each name.
pub fn named_vars(map: &VarMap, prefix: &str) -> Vec<(String, Var)> {
    let data = map.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut vars: Vec<(String, Var)> = data
        .iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Sets each of `params` that the component folder `dir` holds to its weights (as f32) and
/// returns the names it does not hold; every tensor of the folder must find a variable of its
/// shape (a model grown from a trained one: a student from its teacher, a fine-tune from its
/// start).
pub fn set_from_folder(
    params: &[(String, Var)],
    dir: &Path,
    device: &Device,
) -> Result<Vec<String>> {
    let weights = Checkpoint::open(&component_files(dir)?)?;
    let mut missing = Vec::new();
    let mut used = 0;
    for (name, var) in params {
        if !weights.tensors().contains_key(name) {
            missing.push(name.clone());
            continue;
        }
        let t = weights.load(name, DType::F32, device)?;
        if t.dims() != var.dims() {
            return Err(Error::Msg(format!(
                "{} {name}: shape {:?}, the network's {:?}",
                dir.display(),
                t.dims(),
                var.dims()
            )));
        }
        var.set(&t)?;
        used += 1;
    }
    if used != weights.tensors().len() {
        return Err(Error::Msg(format!(
            "{}: {} tensors have no place in the network",
            dir.display(),
            weights.tensors().len() - used
        )));
    }
    Ok(missing)
}

/// Writes a component folder: `config.json` and `weights_file` holding `tensors` (names without
/// the component prefix) in `dtype`.
pub fn write_component(
    dir: &Path,
    config: &serde_json::Value,
    weights_file: &str,
    tensors: &[(String, Tensor)],
    dtype: DType,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let converted = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_dtype(dtype)?)))
        .collect::<Result<Vec<_>>>()?;
    write_safetensors(&dir.join(weights_file), &converted)?;
    write_json(&dir.join("config.json"), config)
}

/// `(name without prefix, tensor)` for the parameters under `prefix`, taking values from
/// `values` (the parameters themselves or their EMA) in the same order as `params`.
pub fn strip(params: &[(String, Var)], values: &[Tensor], prefix: &str) -> Vec<(String, Tensor)> {
    params
        .iter()
        .zip(values)
        .filter_map(|((n, _), t)| n.strip_prefix(prefix).map(|k| (k.to_string(), t.clone())))
        .collect()
}
