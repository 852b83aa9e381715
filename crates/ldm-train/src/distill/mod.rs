//! Distillation: students trained from a teacher model folder, in Rust, with the trainers'
//! machinery (resumable checkpoints, EMA, loss log). [`guidance`] is guidance distillation
//! (Meng et al. 2023, stage one): a student with a guidance embedding that matches the
//! teacher's classifier-free-guided prediction in one pass.
//!
//! This module holds what the distillers share: the teacher (a loaded model folder), the data
//! (Shapes World scenes encoded by the teacher's autoencoder, with their captions encoded by the
//! teacher's text encoder), a trainable student initialised from the teacher's U-Net, and
//! writing the student out as a diffusers folder beside copies of the teacher's other parts.

pub mod guidance;
pub mod lcm;
pub mod own_states;
pub mod progressive;

use crate::checkpoint::TrainingState;
use crate::component::{named_vars, set_from_folder, SeededInit};
use crate::data::batch;
use crate::noise::TrainRng;
use crate::optim::{AdamW, AdamWConfig, Ema};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use ldm_models::unet::{UNet2DConditionModel, UNetConfig};
use ldm_pipeline::Components;
use ldm_sampling::Prediction;
use std::collections::HashMap;
use std::path::Path;

/// The teacher: a diffusers model folder of the SD1/SD2 kind, loaded in f32.
pub struct Teacher {
    pub components: Components,
    pub prediction: Prediction,
    /// `ᾱ_t` of the training schedule (the scheduler config's), t = 0…T−1.
    pub alphas_cumprod: Vec<f32>,
}

impl Teacher {
    /// A teacher without a guidance embedding (guidance and consistency distillation add
    /// one; a model that has one is already distilled).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let teacher = Self::load_any(dir, device)?;
        if teacher.components.unet.config.time_cond_proj_dim.is_some() {
            return Err(Error::Msg(format!(
                "{}: the teacher already has a guidance embedding (time_cond_proj_dim): it is a \
                 distilled model",
                dir.display()
            )));
        }
        Ok(teacher)
    }

    /// Any SD1/SD2-style model folder, distilled or not.
    pub fn load_any(dir: &Path, device: &Device) -> Result<Self> {
        if !dir.join("model_index.json").is_file() {
            return Err(Error::Msg(format!(
                "{}: not a diffusion model folder (no model_index.json)",
                dir.display()
            )));
        }
        let components = Components::load(dir, DType::F32, device)
            .map_err(|e| Error::Msg(format!("loading the teacher {}: {e}", dir.display())))?;
        let unet = &components.unet.config;
        if unet.text_time.is_some() || components.text_encoders.len() != 1 {
            return Err(Error::Msg(
                "distillation takes SD1/SD2-style teachers (one text encoder, no added conditioning)"
                    .into(),
            ));
        }
        let prediction = match components.scheduler.prediction_type.as_deref() {
            None | Some("epsilon") => Prediction::Epsilon,
            Some("v_prediction") => Prediction::V,
            Some("sample") => Prediction::Sample,
            Some(other) => {
                return Err(Error::Msg(format!("unknown prediction_type `{other}`")));
            }
        };
        let alphas_cumprod = components
            .scheduler
            .noise_schedule()?
            .alphas_cumprod
            .clone();
        Ok(Self {
            components,
            prediction,
            alphas_cumprod,
        })
    }

    /// The image side the teacher was trained at.
    pub fn image_size(&self) -> usize {
        let c = &self.components;
        c.unet.config.sample_size.unwrap_or(64) * c.vae_scale_factor()
    }

    /// The teacher's output for `sample` at `timesteps` given `context` (no graph: the
    /// teacher's weights are plain tensors).
    pub fn predict(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor) -> Result<Tensor> {
        Ok(self
            .components
            .unet
            .forward(sample, timesteps, context, None)?)
    }
}

/// The training data: `pool` Shapes World scenes (stream `seed`) as the teacher's posterior
/// means and standard deviations, their captions' and the empty prompt's encodings.
pub struct LatentPool {
    pub means: Tensor,
    pub stds: Tensor,
    /// `[pool, L, D]`.
    pub contexts: Tensor,
    /// `[1, L, D]`.
    pub empty: Tensor,
}

impl LatentPool {
    pub fn encode(teacher: &Teacher, pool: usize, seed: u64, device: &Device) -> Result<Self> {
        let c = &teacher.components;
        let size = teacher.image_size();
        let encode_text = |text: &str| -> Result<Tensor> {
            Ok(ldm_pipeline::prompt::encode(c, text, None)
                .map_err(|e| Error::Msg(format!("encoding `{text}`: {e}")))?
                .context)
        };
        let (mut means, mut stds, mut contexts) = (Vec::new(), Vec::new(), Vec::new());
        for first in (0..pool).step_by(64) {
            let n = 64.min(pool - first) as u64;
            let (x, captions) = batch(seed, first as u64..first as u64 + n, size, device)?;
            let posterior = c.vae.encode(&x)?;
            means.push(posterior.mean.clone());
            stds.push(posterior.std()?);
            for caption in captions {
                contexts.push(encode_text(&caption)?);
            }
        }
        Ok(Self {
            means: Tensor::cat(&means, 0)?.contiguous()?,
            stds: Tensor::cat(&stds, 0)?.contiguous()?,
            contexts: Tensor::cat(&contexts, 0)?.contiguous()?,
            empty: encode_text("")?,
        })
    }

    /// `b` examples drawn with replacement: latents sampled from their posteriors (scaled by
    /// `scaling`) and their captions' encodings.
    pub fn draw(
        &self,
        rng: &mut TrainRng,
        b: usize,
        scaling: f64,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let picks: Vec<u32> = (0..b).map(|_| rng.below(self.len()) as u32).collect();
        let picks = Tensor::new(picks.as_slice(), device)?;
        let mean = self.means.index_select(&picks, 0)?;
        let std = self.stds.index_select(&picks, 0)?;
        let x0 = ((&mean + (std * rng.randn(mean.dims(), device)?)?)? * scaling)?;
        Ok((x0, self.contexts.index_select(&picks, 0)?))
    }

    pub fn len(&self) -> usize {
        self.means.dim(0).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A trainable U-Net: the teacher's config with `changes` applied, its weights copied from the
/// teacher; parameters the teacher lacks start at zero (a student that starts as its teacher).
pub struct Student {
    pub varmap: VarMap,
    pub unet: UNet2DConditionModel,
    pub config: serde_json::Value,
    pub params: Vec<(String, Var)>,
}

impl Student {
    pub fn from_teacher(
        teacher_dir: &Path,
        changes: &serde_json::Value,
        device: &Device,
    ) -> Result<Self> {
        let unet_dir = teacher_dir.join("unet");
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(unet_dir.join("config.json"))?)?;
        for (k, v) in changes.as_object().into_iter().flatten() {
            config[k] = v.clone();
        }
        let cfg = UNetConfig::from_json(
            &serde_json::from_value(config.clone())?,
            &unet_dir.join("config.json"),
        )?;
        let varmap = VarMap::new();
        let unet = UNet2DConditionModel::new(SeededInit::var_builder(&varmap, 0, device), &cfg)?;
        let params = named_vars(&varmap, "");
        // What the teacher lacks (the guidance embedding) starts at zero.
        for name in set_from_folder(&params, &unet_dir, device)? {
            if let Some((_, var)) = params.iter().find(|(n, _)| *n == name) {
                var.set(&var.as_tensor().zeros_like()?)?;
            }
        }
        Ok(Self {
            varmap,
            unet,
            config,
            params,
        })
    }
}

/// A student's optimiser, its EMA (what is written out) and the training state, resumed from
/// `out/distill-train` when it holds a checkpoint.
pub struct StudentRun {
    pub opt: AdamW,
    pub ema: Ema,
    pub state: TrainingState,
}

impl StudentRun {
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        student: &Student,
        out: &Path,
        phase: &'static str,
        total: usize,
        checkpoint_every: usize,
        seed: u64,
        ema_decay: f64,
        device: &Device,
    ) -> Result<Self> {
        let mut opt = AdamW::new(student.params.clone(), AdamWConfig::default())?;
        let mut ema = Ema::new(&student.params, ema_decay)?;
        std::fs::create_dir_all(out)?;
        let state = TrainingState::resume_or_start(
            &out.join("distill-train"),
            checkpoint_every,
            phase,
            total,
            seed,
            &mut [&mut opt],
            Some(&mut ema),
            device,
        )?;
        Ok(Self { opt, ema, state })
    }
}

/// Writes the distilled folder: the student's U-Net (`values`, the EMA) in f32 and copies of
/// the teacher's other parts (text encoder, tokenizer, autoencoder, scheduler, model index).
pub fn write_student(
    teacher_dir: &Path,
    out: &Path,
    student: &Student,
    values: &[Tensor],
) -> Result<()> {
    for entry in std::fs::read_dir(teacher_dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == "unet" || name.ends_with("-train") || name.starts_with('.') {
            continue;
        }
        copy_tree(&entry.path(), &out.join(&*name))?;
    }
    crate::component::write_component(
        &out.join("unet"),
        &student.config,
        "diffusion_pytorch_model.safetensors",
        &crate::component::strip(&student.params, values, ""),
        DType::F32,
    )
}

/// A U-Net built from named tensors (a target network's values, merged LoRA weights).
pub fn unet_from(
    tensors: HashMap<String, Tensor>,
    config: &ldm_models::unet::UNetConfig,
    device: &Device,
) -> Result<UNet2DConditionModel> {
    Ok(UNet2DConditionModel::new(
        VarBuilder::from_tensors(tensors, DType::F32, device),
        config,
    )?)
}

/// The trailing grid of `n` steps over `train_steps` training timesteps: `n` timesteps, then
/// `None` for the clean end.
pub fn trailing_grid(n: usize, train_steps: usize) -> Vec<Option<usize>> {
    let step = train_steps as f64 / n as f64;
    let mut grid: Vec<Option<usize>> = (0..n)
        .map(|k| Some((train_steps as f64 - k as f64 * step).round() as usize - 1))
        .collect();
    grid.push(None);
    grid
}

/// `(α, σ)` at a grid point (`None`: the clean end).
pub fn alpha_sigma(abar: &[f32], t: Option<usize>) -> (f64, f64) {
    match t {
        Some(t) => {
            let a = abar[t] as f64;
            (a.sqrt(), (1.0 - a).max(0.0).sqrt())
        }
        None => (1.0, 0.0),
    }
}

/// `n` guidance scales drawn uniformly from `lo..hi`, one per example.
pub fn draw_scales(rng: &mut TrainRng, n: usize, (lo, hi): (f64, f64)) -> Vec<f64> {
    (0..n).map(|_| lo + (hi - lo) * rng.uniform()).collect()
}

/// `(x̂, ε̂)` from a model output in `prediction`'s parametrisation at `(α, σ)` (columns
/// `[B,1,1,1]`).
pub fn x_and_eps(
    prediction: Prediction,
    z: &Tensor,
    out: &Tensor,
    a: &Tensor,
    s: &Tensor,
) -> Result<(Tensor, Tensor)> {
    Ok(match prediction {
        Prediction::V => (
            (z.broadcast_mul(a)? - out.broadcast_mul(s)?)?,
            (z.broadcast_mul(s)? + out.broadcast_mul(a)?)?,
        ),
        Prediction::Sample => {
            let eps = (z - out.broadcast_mul(a)?)?.broadcast_div(s)?;
            (out.clone(), eps)
        }
        Prediction::Epsilon => {
            let x = (z - out.broadcast_mul(s)?)?.broadcast_div(a)?;
            (x, out.clone())
        }
    })
}

/// Records in the written student's `model_index.json` the sampling steps (and, for a student
/// whose guidance is built in without an embedding, the guidance scale 1) that `ldm generate`
/// should use when the user gives none (`_ldm_defaults`; diffusers ignores it).
pub fn write_defaults(out: &Path, steps: usize, guidance: Option<f64>) -> Result<()> {
    let path = out.join("model_index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    let mut defaults = serde_json::json!({ "num_inference_steps": steps });
    if let Some(g) = guidance {
        defaults["guidance_scale"] = serde_json::json!(g);
    }
    index["_ldm_defaults"] = defaults;
    crate::io::write_json(&path, &index)
}

/// Edits the written student's `scheduler/scheduler_config.json` with `changes`, keeping only
/// the keys in `keep` when given (plus the changes).
pub fn edit_scheduler(
    out: &Path,
    changes: &serde_json::Value,
    keep: Option<&[&str]>,
) -> Result<()> {
    let path = out.join("scheduler").join("scheduler_config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    if let (Some(keep), Some(map)) = (keep, config.as_object_mut()) {
        map.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (k, v) in changes.as_object().into_iter().flatten() {
        config[k] = v.clone();
    }
    crate::io::write_json(&path, &config)?;
    // diffusers builds the scheduler class model_index.json names, whatever the config says.
    if let Some(class) = config.get("_class_name").and_then(|c| c.as_str()) {
        let path = out.join("model_index.json");
        let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        index["scheduler"] = serde_json::json!(["diffusers", class]);
        crate::io::write_json(&path, &index)?;
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    if from.is_dir() {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
    } else {
        crate::io::write_atomic(to, &std::fs::read(from)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::Recipe;
    use crate::unet_trainer::{train_unet, UnetOptions};
    use crate::vae_trainer::{train_vae, VaeOptions};
    use ldm_models::layers::timestep::guidance_scale_embedding;

    /// A student whose guidance embedding starts at zero is its teacher at every scale, and
    /// the teacher's tensors all find their place in it.
    #[test]
    fn a_fresh_student_is_its_teacher() -> Result<()> {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir()?;
        let r = Recipe::miniature();
        let quiet = &mut |_: &crate::Progress| {};
        let vo = VaeOptions {
            steps: 1,
            batch: 2,
            held_out: 2,
            ..VaeOptions::default()
        };
        train_vae(&r, &vo, dir.path(), &dev, quiet)?;
        let uo = UnetOptions {
            steps: 1,
            batch: 2,
            pool: 4,
            ..UnetOptions::default()
        };
        train_unet(&r, &uo, dir.path(), &dev, quiet)?;
        let teacher = Teacher::load(dir.path(), &dev)?;
        let student = Student::from_teacher(
            dir.path(),
            &serde_json::json!({"time_cond_proj_dim": 8}),
            &dev,
        )?;
        assert_eq!(student.unet.config.time_cond_proj_dim, Some(8));
        let x = Tensor::randn(0f32, 1.0, (2, 4, 16, 16), &dev)?;
        let t = Tensor::new(&[500f32, 20.0], &dev)?;
        let ctx = Tensor::randn(0f32, 1.0, (2, r.text_context, r.text_hidden), &dev)?;
        let w = guidance_scale_embedding(&[0.0, 6.5], 8, &dev)?;
        let a = teacher.predict(&x, &t, &ctx)?;
        let b = student.unet.forward_with(&x, &t, &ctx, None, Some(&w))?;
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "student and teacher differ by {diff}");
        Ok(())
    }
}
