//! Training checkpoints, written atomically and resumed exactly: parameters, AdamW moments and
//! step, the EMA, the random stream's position and the loss history. `state.json` is the commit
//! point: it names the tensor file it belongs to, and is replaced only after that file is whole.

use crate::io::{write_atomic, write_json, write_safetensors};
use crate::noise::TrainRng;
use crate::optim::{AdamW, Ema};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// One logged step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LogRow {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
}

#[derive(Serialize, Deserialize)]
struct StateJson {
    step: usize,
    tensors: String,
    /// Updates taken by each optimiser, in the order they were saved.
    adam_steps: Vec<usize>,
    ema_updates: usize,
    rng_seed: Vec<u8>,
    rng_word_pos: String,
    history: Vec<LogRow>,
}

/// What a resumed run continues from.
pub struct Resumed {
    pub step: usize,
    pub rng: TrainRng,
    pub history: Vec<LogRow>,
}

/// Saves the state after `step` completed steps into `dir`. `opts` are the run's optimisers
/// (parameter names unique across them); `ema`, if any, shadows the first one's parameters.
pub fn save(
    dir: &Path,
    step: usize,
    opts: &[&AdamW],
    ema: Option<&Ema>,
    rng: &TrainRng,
    history: &[LogRow],
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (k, opt) in opts.iter().enumerate() {
        for (i, (name, p)) in opt.params.iter().enumerate() {
            tensors.push((format!("param.{name}"), p.as_tensor().clone()));
            tensors.push((format!("adam_m.{name}"), opt.m[i].clone()));
            tensors.push((format!("adam_v.{name}"), opt.v[i].clone()));
            if let (0, Some(ema)) = (k, ema) {
                tensors.push((format!("ema.{name}"), ema.shadow[i].clone()));
            }
        }
    }
    let file = format!("state-{step:08}.safetensors");
    write_safetensors(&dir.join(&file), &tensors)?;
    let (seed, pos) = rng.state();
    let state = StateJson {
        step,
        tensors: file.clone(),
        adam_steps: opts.iter().map(|o| o.step).collect(),
        ema_updates: ema.map_or(0, |e| e.updates),
        rng_seed: seed.to_vec(),
        rng_word_pos: pos.to_string(),
        history: history.to_vec(),
    };
    write_json(&dir.join("state.json"), &serde_json::to_value(&state)?)?;
    write_csv(&dir.join("losses.csv"), history)?;
    crate::plot::plot_losses(history, &dir.join("losses.png"))?;
    // Older tensor files are garbage once state.json names the new one.
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with("state-") && name.ends_with(".safetensors") && name != file {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Restores a state saved by [`save`] into `opts` (and `ema`), if `dir` holds one.
pub fn resume(
    dir: &Path,
    opts: &mut [&mut AdamW],
    mut ema: Option<&mut Ema>,
    device: &Device,
) -> Result<Option<Resumed>> {
    let json = dir.join("state.json");
    if !json.exists() {
        return Ok(None);
    }
    let state: StateJson = serde_json::from_slice(&std::fs::read(&json)?)?;
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join(&state.tensors), device)?;
    let get = |key: String| {
        tensors
            .get(&key)
            .cloned()
            .ok_or_else(|| Error::Msg(format!("checkpoint {}: missing {key}", dir.display())))
    };
    if state.adam_steps.len() != opts.len() {
        return Err(Error::Msg(format!(
            "checkpoint {}: {} optimisers saved, this run has {}",
            dir.display(),
            state.adam_steps.len(),
            opts.len()
        )));
    }
    for (k, opt) in opts.iter_mut().enumerate() {
        for i in 0..opt.params.len() {
            let (name, p) = &opt.params[i];
            let t = get(format!("param.{name}"))?;
            if t.shape() != p.as_tensor().shape() {
                return Err(Error::Msg(format!(
                    "checkpoint {}: {name} has shape {:?}, the model {:?}",
                    dir.display(),
                    t.shape(),
                    p.as_tensor().shape()
                )));
            }
            p.set(&t)?;
            let (m, v) = (
                get(format!("adam_m.{name}"))?,
                get(format!("adam_v.{name}"))?,
            );
            if k == 0 {
                if let Some(ema) = ema.as_deref_mut() {
                    ema.shadow[i] = get(format!("ema.{name}"))?;
                }
            }
            opt.m[i] = m;
            opt.v[i] = v;
        }
        opt.step = state.adam_steps[k];
    }
    if let Some(ema) = ema {
        ema.updates = state.ema_updates;
    }
    let seed: [u8; 32] = state
        .rng_seed
        .try_into()
        .map_err(|_| Error::Msg("checkpoint: bad random seed".into()))?;
    let pos: u128 = state
        .rng_word_pos
        .parse()
        .map_err(|_| Error::Msg("checkpoint: bad random position".into()))?;
    Ok(Some(Resumed {
        step: state.step,
        rng: TrainRng::restore(seed, pos),
        history: state.history,
    }))
}

/// Records a finished step: appends it to the history and reports it to the front-end.
pub fn record(
    history: &mut Vec<LogRow>,
    progress: &mut dyn FnMut(&crate::Progress),
    phase: &'static str,
    total: usize,
    row: LogRow,
) {
    history.push(row);
    progress(&crate::Progress {
        phase,
        step: row.step,
        total,
        loss: row.loss,
        note: None,
    });
}

/// `step,loss,lr,grad_norm` rows.
pub fn write_csv(path: &Path, rows: &[LogRow]) -> Result<()> {
    let mut text = String::from("step,loss,lr,grad_norm\n");
    for r in rows {
        text += &format!("{},{},{},{}\n", r.step, r.loss, r.lr, r.grad_norm);
    }
    write_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::AdamWConfig;
    use candle_core::Var;

    #[test]
    fn a_saved_state_restores_exactly() -> Result<()> {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir()?;
        let make = || -> Result<AdamW> {
            let p = Var::new(&[1f32, 2.0, 3.0], &dev)?;
            AdamW::new(vec![("w".into(), p)], AdamWConfig::default())
        };
        let mut opt = make()?;
        let grads = opt.params[0].1.as_tensor().sqr()?.sum_all()?.backward()?;
        opt.step(&grads, 0.1)?;
        let mut ema = Ema::new(&opt.params, 0.9)?;
        ema.update(&opt.params)?;
        let mut rng = TrainRng::new(5);
        rng.normal();
        let history = vec![LogRow {
            step: 1,
            loss: 0.1 + 0.2,
            lr: 0.00014000000000000001,
            grad_norm: 1.1650901303128383,
        }];
        save(dir.path(), 1, &[&opt], Some(&ema), &rng, &history)?;
        let mut fresh = make()?;
        let mut fresh_ema = Ema::new(&fresh.params, 0.9)?;
        let r = resume(dir.path(), &mut [&mut fresh], Some(&mut fresh_ema), &dev)?
            .expect("a checkpoint");
        assert_eq!(r.step, 1);
        assert_eq!(
            r.history, history,
            "floats survive the JSON round trip bit for bit"
        );
        let v = |t: &Tensor| t.to_vec1::<f32>().unwrap();
        assert_eq!(
            v(fresh.params[0].1.as_tensor()),
            v(opt.params[0].1.as_tensor())
        );
        assert_eq!(v(&fresh.m[0]), v(&opt.m[0]));
        assert_eq!(v(&fresh.v[0]), v(&opt.v[0]));
        assert_eq!(fresh.step, 1);
        assert_eq!(v(&fresh_ema.shadow[0]), v(&ema.shadow[0]));
        assert_eq!(fresh_ema.updates, 1);
        let mut restored = r.rng;
        assert_eq!(restored.normal(), rng.normal());
        assert!(dir.path().join("losses.csv").is_file());
        Ok(())
    }
}
