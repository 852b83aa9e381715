//! Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models"): a student
//! that maps any point of the teacher's guided probability-flow ODE straight to its end, so
//! that it samples in 1–4 steps with one U-Net pass each.
//!
//! The ODE is walked on a DDIM skeleton of `skeleton` points (`original_inference_steps`,
//! 50): t_n = (n + 1)·k − 1 with k = T / skeleton. Each example draws a point t = t_n, a
//! guidance scale s (the student is conditioned on w = s − 1 through its guidance embedding,
//! as in [`super::guidance`]) and noise; `z_t` is the noised latent. The teacher takes one
//! guided DDIM step from t to t − k (clamped at 0): its two passes, guided as `ldm generate`
//! would guide them, are read as (x̂, ε̂) — a v-prediction teacher's output converted first,
//! since feeding raw v to the DDIM step as ε trains to a normal-looking loss and samples
//! noise — and `z_prev = √ᾱ′·x̂ + √(1−ᾱ′)·ε̂`. The consistency function
//! `f(z, t) = c_skip(t)·z + c_out(t)·x̂_θ(z, t)` (the boundary condition of
//! [`consistency_boundary`], timestep scaling 10, identity at t = 0) of the student at
//! `(z_t, t)` is trained to match the target network's at `(z_prev, t − k)` under the
//! pseudo-Huber loss `√(d² + c²) − c` (c = 0.001). The target network is an exponential moving
//! average of the student (decay 0.95) and is what is written out.

use super::own_states::{OwnStates, Sampling, StatePool};
use super::{
    alpha_sigma, draw_scales, unet_from, write_student, x_and_eps, LatentPool, Student, StudentRun,
    Teacher,
};
use crate::checkpoint::TrainingState;
use crate::noise::TrainRng;
use crate::optim::{warmup_cosine, AdamW, AdamWConfig, Ema};
use crate::parallel::sharded_loss_and_grads;
use crate::{Error, Progress, Result};
use candle_core::{DType, Device, Tensor, Var};
use ldm_models::layers::timestep::guidance_scale_embedding;
use ldm_models::lora::is_unet_target;
use ldm_models::unet::UNet2DConditionModel;
use ldm_models::weights::{component_files, Checkpoint};
use ldm_sampling::guidance::guide_each;
use ldm_sampling::scheduler_config::{consistency_boundary, consistency_timesteps};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

/// Options of `ldm distill lcm`.
#[derive(Debug, Clone, PartialEq)]
pub struct LcmOptions {
    /// Training steps. 1500 at 5e-5 from the guidance-distilled student (`init`) made the
    /// embedded `shapes-fast`; 600 from the teacher read 2 points lower at 4 steps, 1500 at
    /// 1e-4 drifted away from the teacher (docs/distillation-research.md).
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub warmup: usize,
    /// Guidance scales s drawn per example (w = s − 1 is what the student is conditioned on).
    pub scales: (f64, f64),
    /// Width of the guidance embedding (`time_cond_proj_dim`).
    pub embedding_dim: usize,
    /// Points of the DDIM skeleton (`original_inference_steps`).
    pub skeleton: usize,
    /// The boundary condition's timestep scaling.
    pub timestep_scaling: f64,
    /// The pseudo-Huber loss's c.
    pub huber_c: f64,
    /// Decay of the target network, an EMA of the student (of the factors with `lora`), which
    /// is also what is written out; `None`: 0.95 for a full student, 0 with `lora` — the
    /// student itself, as in diffusers' LCM-LoRA script ([`LcmOptions::target_decay`]).
    pub target_decay: Option<f64>,
    pub grad_clip: f64,
    pub seed: u64,
    pub pool: usize,
    pub checkpoint_every: usize,
    pub shards: usize,
    /// Sampling steps the written folder defaults to.
    pub default_steps: usize,
    /// LCM-LoRA of this rank instead of a full student.
    pub lora: Option<usize>,
    /// Start the student from this folder's U-Net instead of the teacher's: a guidance-distilled
    /// student of the same teacher, whose one pass at w is already the guided prediction.
    pub init: Option<std::path::PathBuf>,
    /// A share of each batch taken from the student's own few-step sampling (the target
    /// network sampling at `default_steps`); `None`: the forward process's states only, as in
    /// the paper. Full students only (LCM-LoRA has no guidance embedding to sample with).
    pub own_states: Option<OwnStates>,
}

impl Default for LcmOptions {
    fn default() -> Self {
        Self {
            steps: 1500,
            batch: 16,
            lr: 5e-5,
            warmup: 50,
            scales: (2.0, 10.0),
            embedding_dim: 256,
            skeleton: 50,
            timestep_scaling: 10.0,
            huber_c: 0.001,
            target_decay: None,
            grad_clip: 1.0,
            seed: 0,
            pool: 4096,
            checkpoint_every: 200,
            shards: crate::parallel::cores(),
            default_steps: 4,
            lora: None,
            init: None,
            own_states: None,
        }
    }
}

impl LcmOptions {
    /// The target network's decay: as given, or the default of the kind of student.
    pub fn target_decay(&self) -> f64 {
        self.target_decay
            .unwrap_or(if self.lora.is_some() { 0.0 } else { 0.95 })
    }

    pub fn check(&self, train_steps: usize) -> Result<()> {
        if self.steps == 0 || self.batch == 0 || self.pool == 0 {
            return Err(Error::Msg(
                "steps, batch and pool must be at least 1".into(),
            ));
        }
        let (lo, hi) = self.scales;
        if !(lo.is_finite() && hi.is_finite() && 1.0 <= lo && lo <= hi && hi <= 100.0) {
            return Err(Error::Msg(format!(
                "guidance scales {lo}..{hi}: need 1 ≤ low ≤ high ≤ 100"
            )));
        }
        if self.skeleton < 2 || !train_steps.is_multiple_of(self.skeleton) {
            return Err(Error::Msg(format!(
                "a skeleton of {} points: it must divide the {train_steps} training timesteps",
                self.skeleton
            )));
        }
        if !(1..=self.skeleton).contains(&self.default_steps) {
            return Err(Error::Msg(format!(
                "default steps {}: 1 to the skeleton's {}",
                self.default_steps, self.skeleton
            )));
        }
        if self.embedding_dim < 4 || self.embedding_dim > 4096 {
            return Err(Error::Msg(format!(
                "embedding width {}: need 4 to 4096",
                self.embedding_dim
            )));
        }
        if let Some(own) = &self.own_states {
            own.check()?;
        }
        if self.lora == Some(0) {
            return Err(Error::Msg(
                "a LoRA rank of 0 adapts nothing: give 1 or more".into(),
            ));
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !(positive(self.lr)
            && positive(self.huber_c)
            && positive(self.timestep_scaling)
            && (0.0..1.0).contains(&self.target_decay()))
        {
            return Err(Error::Msg(format!(
                "learning rate {}, Huber c {}, timestep scaling {}, target decay {}: the first \
                 three must be positive, the decay in [0, 1)",
                self.lr,
                self.huber_c,
                self.timestep_scaling,
                self.target_decay()
            )));
        }
        Ok(())
    }
}

/// What a finished run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct LcmReport {
    pub steps: usize,
    pub final_loss: f64,
}

/// The DDIM skeleton: `(n + 1)·k − 1` for n < `points`, k = `train_steps / points`.
pub fn skeleton(points: usize, train_steps: usize) -> Vec<usize> {
    let k = train_steps / points;
    (1..=points).map(|n| n * k - 1).collect()
}

/// The pseudo-Huber loss `mean(√(d² + c²) − c)`.
pub fn pseudo_huber(pred: &Tensor, target: &Tensor, c: f64) -> Result<Tensor> {
    Ok((((pred - target)?.sqr()? + c * c)?.sqrt()? - c)?.mean_all()?)
}

/// One step's examples: noised latents at skeleton points, their targets' points, guidance
/// scales and the boundary condition's coefficients, as `[B,1,1,1]` columns.
struct LcmBatch {
    z: Tensor,
    context: Tensor,
    t_now: Tensor,
    t_prev: Tensor,
    a: Tensor,
    s: Tensor,
    a_prev: Tensor,
    s_prev: Tensor,
    skip: Tensor,
    out: Tensor,
    skip_prev: Tensor,
    out_prev: Tensor,
    scales: Vec<f64>,
    /// The guidance embedding of w = s − 1 (full LCM; none for LCM-LoRA).
    w_emb: Option<Tensor>,
}

/// What a step needs besides its examples: the teacher, the data and the skeleton.
struct Lcm<'a> {
    teacher: &'a Teacher,
    data: &'a LatentPool,
    opts: &'a LcmOptions,
    abar: &'a [f32],
    points: Vec<usize>,
    k: usize,
    scaling: f64,
    phi: f64,
    embedding: Option<usize>,
}

impl Lcm<'_> {
    /// A batch of forward-process states, its first examples replaced by `own` states of the
    /// student's sampling when given.
    fn draw(
        &self,
        rng: &mut TrainRng,
        own: Option<(&StatePool, usize)>,
        device: &Device,
    ) -> Result<LcmBatch> {
        let (opts, abar, b) = (self.opts, self.abar, self.opts.batch);
        let (x0, context) = self.data.draw(rng, b, self.scaling, device)?;
        let dims = x0.dims().to_vec();
        let mut ts: Vec<usize> = (0..b)
            .map(|_| self.points[rng.below(self.points.len())])
            .collect();
        let mut scales = draw_scales(rng, b, opts.scales);
        let noise = rng.randn(&dims, device)?;
        let col = |v: Vec<f64>| {
            Tensor::from_vec(
                v.into_iter().map(|x| x as f32).collect::<Vec<_>>(),
                (b, 1, 1, 1),
                device,
            )
        };
        let alpha = |t: &[usize]| col(t.iter().map(|&t| alpha_sigma(abar, Some(t)).0).collect());
        let sigma = |t: &[usize]| col(t.iter().map(|&t| alpha_sigma(abar, Some(t)).1).collect());
        let boundary = |t: &[usize], which: fn((f64, f64)) -> f64| {
            col(t
                .iter()
                .map(|&t| which(consistency_boundary(t as f64, opts.timestep_scaling)))
                .collect())
        };
        let timesteps = |t: &[usize]| {
            Tensor::from_vec(t.iter().map(|&t| t as f32).collect::<Vec<_>>(), b, device)
        };
        let z = (x0.broadcast_mul(&alpha(&ts)?)? + noise.broadcast_mul(&sigma(&ts)?)?)?;
        let (z, context) = match own {
            Some((pool, k)) => pool.mix_into(k, rng, &z, &context, &mut ts, &mut scales)?,
            None => (z, context),
        };
        let prev: Vec<usize> = ts.iter().map(|&t| t.saturating_sub(self.k)).collect();
        let (a, s) = (alpha(&ts)?, sigma(&ts)?);
        let w: Vec<f64> = scales.iter().map(|s| s - 1.0).collect();
        let w_emb = match self.embedding {
            Some(dim) => Some(guidance_scale_embedding(&w, dim, device)?),
            None => None,
        };
        Ok(LcmBatch {
            z,
            context,
            t_now: timesteps(&ts)?,
            t_prev: timesteps(&prev)?,
            a,
            s,
            a_prev: alpha(&prev)?,
            s_prev: sigma(&prev)?,
            skip: boundary(&ts, |c| c.0)?,
            out: boundary(&ts, |c| c.1)?,
            skip_prev: boundary(&prev, |c| c.0)?,
            out_prev: boundary(&prev, |c| c.1)?,
            scales,
            w_emb,
        })
    }

    /// States of the student's own sampling: `default_steps`-step consistency sampling by
    /// `net` (the target network, which is what is written out and sampled).
    fn own_states(
        &self,
        own: &OwnStates,
        net: &UNet2DConditionModel,
        rng: &mut TrainRng,
        device: &Device,
    ) -> Result<StatePool> {
        let opts = self.opts;
        let mut grid: Vec<Option<usize>> =
            consistency_timesteps(self.abar.len(), opts.skeleton, opts.default_steps)
                .into_iter()
                .map(Some)
                .collect();
        grid.push(None);
        let how = Sampling {
            data: self.data,
            abar: self.abar,
            grid: &grid,
            scales: opts.scales,
            embedding_dim: Some(opts.embedding_dim),
            fresh_noise: true,
            shards: opts.shards,
        };
        StatePool::sample(own, &how, rng, self.data.means.dims(), device, |s| {
            let (x, _) = s.predict(net, self.teacher.prediction)?;
            let (skip, c_out) = consistency_boundary(s.t as f64, opts.timestep_scaling);
            let x0 = ((s.z * skip)? + (x * c_out)?)?;
            Ok(match s.noise {
                Some(noise) => ((x0 * s.at_next.0)? + (noise * s.at_next.1)?)?,
                None => x0,
            })
        })
    }

    /// The loss of examples `r` of `batch` (weighted by their share of the batch): the
    /// student's consistency function at (z_t, t) against the target network's at the
    /// teacher's guided DDIM step (z_prev, t − k).
    fn shard_loss(
        &self,
        batch: &LcmBatch,
        r: std::ops::Range<usize>,
        student: &UNet2DConditionModel,
        target: &UNet2DConditionModel,
    ) -> Result<Tensor> {
        let n = r.len();
        let part = |t: &Tensor| t.narrow(0, r.start, n);
        let (z, ctx) = (part(&batch.z)?, part(&batch.context)?);
        let emb = batch.w_emb.as_ref().map(part).transpose()?;
        let (a, s) = (part(&batch.a)?, part(&batch.s)?);
        let (a_prev, s_prev) = (part(&batch.a_prev)?, part(&batch.s_prev)?);
        let (t_now, t_prev) = (part(&batch.t_now)?, part(&batch.t_prev)?);
        let prediction = self.teacher.prediction;
        // One guided DDIM step of the teacher, t → t − k, in (x̂, ε̂).
        let empty = self.data.empty.repeat((n, 1, 1))?;
        let uncond = self.teacher.predict(&z, &t_now, &empty)?;
        let cond = self.teacher.predict(&z, &t_now, &ctx)?;
        let guided = guide_each(&uncond, &cond, &batch.scales[r.clone()], self.phi)?;
        let (x, e) = x_and_eps(prediction, &z, &guided, &a, &s)?;
        let z_prev = (x.broadcast_mul(&a_prev)? + e.broadcast_mul(&s_prev)?)?;
        // The target network's consistency function at (z_prev, t − k).
        let out = target.forward_with(&z_prev, &t_prev, &ctx, None, emb.as_ref())?;
        let (x, _) = x_and_eps(prediction, &z_prev, &out, &a_prev, &s_prev)?;
        let target = (z_prev.broadcast_mul(&part(&batch.skip_prev)?)?
            + x.broadcast_mul(&part(&batch.out_prev)?)?)?
        .detach();
        // The student's at (z_t, t).
        let out = student.forward_with(&z, &t_now, &ctx, None, emb.as_ref())?;
        let (x, _) = x_and_eps(prediction, &z, &out, &a, &s)?;
        let pred =
            (z.broadcast_mul(&part(&batch.skip)?)? + x.broadcast_mul(&part(&batch.out)?)?)?;
        let b = batch.scales.len();
        Ok((pseudo_huber(&pred, &target, self.opts.huber_c)? * (n as f64 / b as f64))?)
    }
}

/// Refuses an `--init` folder whose U-Net is not the teacher's with `change` applied.
fn same_unet(teacher_dir: &Path, init: &Path, change: &serde_json::Value) -> Result<()> {
    let read = |dir: &Path| -> Result<serde_json::Map<String, serde_json::Value>> {
        let path = dir.join("unet/config.json");
        let text =
            std::fs::read(&path).map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
        let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&text)?;
        v.retain(|k, _| !k.starts_with('_'));
        Ok(v)
    };
    let mut expected = read(teacher_dir)?;
    for (k, v) in change.as_object().into_iter().flatten() {
        expected.insert(k.clone(), v.clone());
    }
    let got = read(init)?;
    match expected.iter().find(|(k, v)| got.get(*k) != Some(*v)) {
        None => Ok(()),
        Some((k, v)) => Err(Error::Msg(format!(
            "{}: its U-Net is not the teacher's with a guidance embedding of this width (`{k}` is {}, expected {v})",
            init.display(),
            got.get(k).map_or("absent".to_string(), |g| g.to_string())
        ))),
    }
}

/// Distils the model folder `teacher_dir` into a latent consistency model in `out` (a
/// diffusers folder), or with `opts.lora` into an LCM-LoRA file
/// (`out/pytorch_lora_weights.safetensors`); checkpoints in `out/distill-train`, resumed when
/// present.
pub fn distill_lcm(
    teacher_dir: &Path,
    out: &Path,
    opts: &LcmOptions,
    device: &Device,
    progress: &mut dyn FnMut(&Progress),
) -> Result<LcmReport> {
    let teacher = Teacher::load(teacher_dir, device)?;
    let abar = teacher.alphas_cumprod.clone();
    opts.check(abar.len())?;
    if let Some(rank) = opts.lora {
        return distill_lcm_lora(teacher, teacher_dir, out, rank, opts, device, progress);
    }
    let change = json!({ "time_cond_proj_dim": opts.embedding_dim });
    let student = match &opts.init {
        Some(init) => {
            same_unet(teacher_dir, init, &change)?;
            Student::from_teacher(init, &json!({}), device)?
        }
        None => Student::from_teacher(teacher_dir, &change, device)?,
    };
    let params = student.params.clone();
    let StudentRun {
        mut opt,
        ema: mut target,
        mut state,
    } = StudentRun::start(
        &student,
        out,
        "lcm",
        opts.steps,
        opts.checkpoint_every,
        opts.seed,
        opts.target_decay(),
        device,
    )?;
    let data = LatentPool::encode(&teacher, opts.pool, opts.seed, device)?;
    let lcm = Lcm {
        teacher: &teacher,
        data: &data,
        opts,
        abar: &abar,
        points: skeleton(opts.skeleton, abar.len()),
        k: abar.len() / opts.skeleton,
        scaling: teacher.components.vae.config.scaling_factor,
        phi: teacher.components.default_guidance_rescale(),
        embedding: Some(opts.embedding_dim),
    };
    let cfg = student.unet.config.clone();
    let mut states: Option<StatePool> = None;
    while state.step < opts.steps {
        let step = state.step;
        // The target network: the EMA's current values in the student's modules.
        let target_unet = unet_from(
            params
                .iter()
                .zip(&target.shadow)
                .map(|((name, _), t)| (name.clone(), t.clone()))
                .collect(),
            &cfg,
            device,
        )?;
        let own = match &opts.own_states {
            Some(own) => Some((
                own.refreshed(&mut states, step, opts.checkpoint_every, || {
                    lcm.own_states(own, &target_unet, &mut state.rng, device)
                })?,
                own.count(opts.batch),
            )),
            None => None,
        };
        let batch = lcm.draw(&mut state.rng, own, device)?;
        let (loss, grads) = sharded_loss_and_grads(opts.shards, opts.batch, &params, |r| {
            lcm.shard_loss(&batch, r, &student.unet, &target_unet)
        })?;
        let lr = warmup_cosine(step, opts.lr, opts.warmup, opts.steps, 0.1);
        state.update(
            &loss,
            grads,
            &mut opt,
            Some(&mut target),
            lr,
            opts.grad_clip,
            progress,
        )?;
    }
    write_student(teacher_dir, out, &student, &target.shadow)?;
    write_lcm_scheduler(out, opts)?;
    super::write_defaults(out, opts.default_steps, None)?;
    Ok(LcmReport {
        steps: state.step,
        final_loss: state.log.final_loss(),
    })
}

/// The file an LCM-LoRA run writes in its output folder (diffusers' name).
pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";

/// LCM-LoRA (Luo et al. 2023b): rank-`rank` LoRA factors on the teacher's U-Net layers of
/// [`UNET_TARGETS`](ldm_models::lora::UNET_TARGETS), no guidance embedding (the teacher's
/// scale is still drawn per example), and the student itself, without gradients, as the
/// target network — or with a target decay, an EMA of the factors, which is then also what
/// is written. A starts as PEFT's default (variance 1/(3·fan_in)), B at zero, α = r.
/// The student is a second U-Net on the teacher's weights with the factors beside its layers
/// (only they take gradients), built once on the same tensors as the teacher.
fn distill_lcm_lora(
    mut teacher: Teacher,
    teacher_dir: &Path,
    out: &Path,
    rank: usize,
    opts: &LcmOptions,
    device: &Device,
    progress: &mut dyn FnMut(&Progress),
) -> Result<LcmReport> {
    let unet_dir = teacher_dir.join("unet");
    let weights = Checkpoint::open(&component_files(&unet_dir)?)?;
    let cfg = teacher.components.unet.config.clone();
    let mut base: HashMap<String, Tensor> = HashMap::new();
    let mut layers: Vec<(String, Vec<usize>)> = Vec::new();
    for (key, entry) in weights.tensors() {
        base.insert(key.clone(), weights.load(key, DType::F32, device)?);
        let Some(module) = key.strip_suffix(".weight") else {
            continue;
        };
        if is_unet_target(module) && matches!(entry.shape.len(), 2 | 4) {
            let fan_in: usize = entry.shape[1..].iter().product();
            let width = entry.shape[0].min(fan_in);
            if rank > width {
                return Err(Error::Msg(format!(
                    "LoRA rank {rank} is above the width {width} of layer `{module}`"
                )));
            }
            layers.push((module.to_string(), entry.shape.clone()));
        }
    }
    if layers.is_empty() {
        return Err(Error::Msg(
            "the teacher's U-Net has no layer to adapt".into(),
        ));
    }
    // The teacher rebuilt on the tensors the student is built on, so that the weights both
    // keep as loaded (the convolutions') are held once.
    teacher.components.unet = unet_from(base.clone(), &cfg, device)?;
    let teacher = &teacher;
    let mut init = TrainRng::new(opts.seed ^ 0x10fa);
    let mut params: Vec<(String, Var)> = Vec::new();
    for (module, shape) in &layers {
        let fan_in: usize = shape[1..].iter().product();
        let mut down_shape = shape.clone();
        down_shape[0] = rank;
        let mut up_shape = vec![shape[0], rank];
        up_shape.extend(std::iter::repeat_n(1, shape.len() - 2));
        let down = (init.randn(&down_shape, device)? / (3.0 * fan_in as f64).sqrt())?;
        params.push((
            format!("unet.{module}.lora_A.weight"),
            Var::from_tensor(&down)?,
        ));
        let up = Tensor::zeros(up_shape, DType::F32, device)?;
        params.push((
            format!("unet.{module}.lora_B.weight"),
            Var::from_tensor(&up)?,
        ));
    }
    let mut opt = AdamW::new(params.clone(), AdamWConfig::default())?;
    // With a decay, an EMA of the factors is the target network and what is written.
    let decay = opts.target_decay();
    let mut ema = if decay > 0.0 {
        Some(Ema::new(&params, decay)?)
    } else {
        None
    };
    std::fs::create_dir_all(out)?;
    let mut state = TrainingState::resume_or_start(
        &out.join("distill-train"),
        opts.checkpoint_every,
        "lcm-lora",
        opts.steps,
        opts.seed,
        &mut [&mut opt],
        ema.as_mut(),
        device,
    )?;
    let data = LatentPool::encode(teacher, opts.pool, opts.seed, device)?;
    let abar = &teacher.alphas_cumprod;
    let lcm = Lcm {
        teacher,
        data: &data,
        opts,
        abar,
        points: skeleton(opts.skeleton, abar.len()),
        k: abar.len() / opts.skeleton,
        scaling: teacher.components.vae.config.scaling_factor,
        phi: teacher.components.default_guidance_rescale(),
        embedding: None,
    };
    // The teacher's weights with factors (one value a parameter) beside each adapted layer
    // (α/r = 1).
    let with_factors = |values: Vec<Tensor>| -> Result<UNet2DConditionModel> {
        let mut tensors = base.clone();
        for ((name, _), v) in params.iter().zip(values) {
            tensors.insert(name.strip_prefix("unet.").unwrap_or(name).to_string(), v);
        }
        unet_from(tensors, &cfg, device)
    };
    // The student, built once on the factors' variables: the optimiser updates them in place.
    let student = with_factors(params.iter().map(|(_, v)| v.as_tensor().clone()).collect())?;
    while state.step < opts.steps {
        let step = state.step;
        let batch = lcm.draw(&mut state.rng, None, device)?;
        let target = match &ema {
            Some(ema) => Some(with_factors(ema.shadow.clone())?),
            None => None,
        };
        // The target: the EMA's factors, or the student itself (its output detached).
        let (loss, grads) = sharded_loss_and_grads(opts.shards, opts.batch, &params, |r| {
            lcm.shard_loss(&batch, r, &student, target.as_ref().unwrap_or(&student))
        })?;
        let lr = warmup_cosine(step, opts.lr, opts.warmup, opts.steps, 0.1);
        let ema = ema.as_mut();
        state.update(&loss, grads, &mut opt, ema, lr, opts.grad_clip, progress)?;
    }
    let values: Vec<Tensor> = match ema {
        Some(ema) => ema.shadow,
        None => params.iter().map(|(_, v)| v.as_tensor().detach()).collect(),
    };
    let tensors: Vec<(String, Tensor)> = params
        .iter()
        .map(|(name, _)| name.clone())
        .zip(values)
        .collect();
    crate::io::write_safetensors(&out.join(LORA_FILE), &tensors)?;
    Ok(LcmReport {
        steps: state.step,
        final_loss: state.log.final_loss(),
    })
}

/// Turns the copied scheduler config into diffusers' `LCMScheduler` on the same noise
/// schedule, keeping only the keys that class takes.
pub fn write_lcm_scheduler(out: &Path, opts: &LcmOptions) -> Result<()> {
    super::edit_scheduler(
        out,
        &json!({
            "_class_name": "LCMScheduler",
            "original_inference_steps": opts.skeleton,
            "timestep_scaling": opts.timestep_scaling,
            "clip_sample": false,
            "set_alpha_to_one": true,
            "timestep_spacing": "leading",
        }),
        Some(&[
            "_diffusers_version",
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "steps_offset",
            "prediction_type",
            "rescale_betas_zero_snr",
        ]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_skeleton_is_diffusers() {
        let s = skeleton(50, 1000);
        assert_eq!(s.len(), 50);
        assert_eq!((s[0], s[1], s[49]), (19, 39, 999));
        assert!(skeleton(4, 1000).ends_with(&[749, 999]));
    }

    /// The loss is ≈ |d| for |d| ≫ c and ≈ d²/2c near zero, and zero at zero.
    #[test]
    fn pseudo_huber_is_l1_far_and_l2_near() -> Result<()> {
        let dev = Device::Cpu;
        let z = Tensor::zeros(4, DType::F32, &dev)?;
        let at = |d: f32| -> Result<f32> {
            let p = Tensor::full(d, 4, &dev)?;
            Ok(pseudo_huber(&p, &z, 0.001)?.to_scalar::<f32>()?)
        };
        assert_eq!(at(0.0)?, 0.0);
        assert!((at(1.0)? - 0.999).abs() < 1e-5);
        assert!((at(1e-4)? - 1e-8 / 0.002).abs() < 1e-7);
        Ok(())
    }

    #[test]
    fn options_are_checked() {
        let ok = LcmOptions::default();
        assert!(ok.check(1000).is_ok());
        assert!(ok.check(999).is_err(), "50 does not divide 999");
        for bad in [
            LcmOptions {
                scales: (0.5, 2.0),
                ..ok.clone()
            },
            LcmOptions {
                huber_c: 0.0,
                ..ok.clone()
            },
            LcmOptions {
                target_decay: Some(1.0),
                ..ok.clone()
            },
            LcmOptions {
                default_steps: 0,
                ..ok.clone()
            },
            LcmOptions {
                steps: 0,
                ..ok.clone()
            },
        ] {
            assert!(bad.check(1000).is_err(), "{bad:?}");
        }
    }
}
