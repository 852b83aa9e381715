//! Training checkpoints, written atomically and resumed exactly: parameters, AdamW moments and
//! step, the EMA, the random stream's position and the loss history. `state.json` is the commit
//! point: it names the tensor file it belongs to, and is replaced only after that file is whole.

use crate::io::{write_json, write_safetensors};
use crate::log::{LogRow, TrainingLog};
use crate::noise::TrainRng;
use crate::optim::{clip_grad_norm, AdamW, Ema};
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Serialize, Deserialize)]
struct StateJson {
    /// The phase that wrote it (`"vae"`, `"unet"`, `"guidance"`…); a run of another phase
    /// refuses it. Checkpoints written before this was recorded have none.
    #[serde(default)]
    phase: Option<String>,
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
    log: &TrainingLog,
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
        phase: Some(log.phase.to_string()),
        step,
        tensors: file.clone(),
        adam_steps: opts.iter().map(|o| o.step).collect(),
        ema_updates: ema.map_or(0, |e| e.updates),
        rng_seed: seed.to_vec(),
        rng_word_pos: pos.to_string(),
        history: log.rows.clone(),
    };
    write_json(&dir.join("state.json"), &serde_json::to_value(&state)?)?;
    log.write(dir)?;
    // Older tensor files are garbage once state.json names the new one.
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with("state-") && name.ends_with(".safetensors") && name != file {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Restores a state saved by [`save`] by `phase` into `opts` (and `ema`), if `dir` holds one.
pub fn resume(
    dir: &Path,
    phase: &str,
    opts: &mut [&mut AdamW],
    mut ema: Option<&mut Ema>,
    device: &Device,
) -> Result<Option<Resumed>> {
    let json = dir.join("state.json");
    if !json.exists() {
        return Ok(None);
    }
    let state: StateJson = serde_json::from_slice(&std::fs::read(&json)?)?;
    if let Some(saved) = state.phase.as_deref().filter(|&p| p != phase) {
        return Err(Error::Msg(format!(
            "{}: a checkpoint of `{saved}`, not of `{phase}`: resume it with the command that \
             wrote it, or give a new folder",
            dir.display()
        )));
    }
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

/// Where a training phase stands — completed steps, the random stream, the loss log — and where
/// and how often it is checkpointed: the scaffolding every trainer shares. A trainer restores
/// its optimisers (and EMA) through [`TrainingState::resume_or_start`], records each step, and
/// saves when [`TrainingState::checkpoint_due`] says so.
pub struct TrainingState {
    /// Steps completed.
    pub step: usize,
    pub rng: TrainRng,
    pub log: TrainingLog,
    dir: PathBuf,
    every: usize,
}

impl TrainingState {
    /// Continues from the checkpoint in `dir` (restoring `opts` and `ema`), or starts afresh
    /// with the random stream of `seed`. `phase` names the log; the phase runs `total` steps
    /// with a checkpoint every `every`.
    #[allow(clippy::too_many_arguments)]
    pub fn resume_or_start(
        dir: &Path,
        every: usize,
        phase: &'static str,
        total: usize,
        seed: u64,
        opts: &mut [&mut AdamW],
        ema: Option<&mut Ema>,
        device: &Device,
    ) -> Result<Self> {
        let (step, rng, rows) = match resume(dir, phase, opts, ema, device)? {
            Some(r) => (r.step, r.rng, r.history),
            None => (0, TrainRng::new(seed), Vec::new()),
        };
        Ok(Self {
            step,
            rng,
            log: TrainingLog::new(phase, total, rows),
            dir: dir.to_path_buf(),
            every: every.max(1),
        })
    }

    /// Counts a finished step and logs it.
    pub fn record(
        &mut self,
        loss: f64,
        lr: f64,
        grad_norm: f64,
        progress: &mut dyn FnMut(&crate::Progress),
    ) {
        self.step += 1;
        let row = LogRow {
            step: self.step,
            loss,
            lr,
            grad_norm,
        };
        self.log.record(row, progress);
    }

    /// Finishes a step of a single-optimiser trainer: clips `grads` to `grad_clip`, steps
    /// `opt` at `lr` and the EMA after it, refuses a non-finite loss, records the step and
    /// checkpoints when one is due.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        loss: &Tensor,
        mut grads: GradStore,
        opt: &mut AdamW,
        mut ema: Option<&mut Ema>,
        lr: f64,
        grad_clip: f64,
        progress: &mut dyn FnMut(&crate::Progress),
    ) -> Result<()> {
        let grad_norm = clip_grad_norm(&mut grads, &opt.params, grad_clip)?;
        opt.step(&grads, lr)?;
        if let Some(ema) = ema.as_deref_mut() {
            ema.update(&opt.params)?;
        }
        let loss = loss.to_scalar::<f32>()? as f64;
        if !loss.is_finite() {
            return Err(Error::Msg(format!(
                "loss became {loss} at step {}",
                self.step + 1
            )));
        }
        self.record(loss, lr, grad_norm, progress);
        if self.checkpoint_due() {
            self.save(&[opt], ema.as_deref())?;
        }
        Ok(())
    }

    /// Whether the step just recorded is a checkpoint's: every `every` steps, and the last.
    pub fn checkpoint_due(&self) -> bool {
        self.step.is_multiple_of(self.every) || self.step == self.log.total
    }

    /// Saves the state with the optimisers' (the first one's shadowed by `ema`).
    pub fn save(&self, opts: &[&AdamW], ema: Option<&Ema>) -> Result<()> {
        save(&self.dir, self.step, opts, ema, &self.rng, &self.log)
    }

    /// The checkpoint folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
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
        let log = TrainingLog::new("test", 1, history.clone());
        save(dir.path(), 1, &[&opt], Some(&ema), &rng, &log)?;
        let mut fresh = make()?;
        let mut fresh_ema = Ema::new(&fresh.params, 0.9)?;
        let other = resume(dir.path(), "other", &mut [&mut make()?], None, &dev);
        assert!(
            other.is_err_and(|e| e.to_string().contains("a checkpoint of `test`")),
            "another phase's checkpoint is refused"
        );
        let r = resume(
            dir.path(),
            "test",
            &mut [&mut fresh],
            Some(&mut fresh_ema),
            &dev,
        )?
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
