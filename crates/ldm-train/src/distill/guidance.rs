//! Guidance distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models",
//! stage one). The student is the teacher's U-Net with a guidance embedding added
//! (diffusers' `time_cond_proj_dim`: `cond_proj` inside the timestep embedding, fed
//! [`guidance_scale_embedding`] of w = s − 1), starting at zero so that it begins as the
//! teacher's conditional prediction. Each example draws a guidance scale s from a range, and
//! the student's one pass at s is trained to match the teacher's guided prediction
//! `x̂_u + s·(x̂_c − x̂_u)` — with the teacher's guidance rescale φ, as `ldm generate` would
//! guide it — in the teacher's own parametrisation (ε, v or x₀; its squared error is the
//! x-space error times a per-timestep weight), each example's error divided by how far
//! guidance moved its target ([`GuidanceLoss::Relative`], the default; the paper's plain mean
//! is [`GuidanceLoss::Plain`]). Three quarters of each batch are states of the student's own
//! sampling rather than of the forward process ([`OwnStates`]). On the student `ldm generate
//! --guidance s` makes one U-Net pass a step.

use super::own_states::{OwnStates, Sampling, StatePool};
use super::{draw_scales, trailing_grid, write_student, LatentPool, Student, StudentRun, Teacher};
use crate::loss::{per_example_mse, weighted_mse_share};
use crate::optim::warmup_cosine;
use crate::parallel::{batch_shards, on_shards, shard_ranges, sharded_loss_and_grads};
use crate::{Error, Progress, Result};
use candle_core::{Device, Tensor};
use ldm_models::layers::timestep::guidance_scale_embedding;
use ldm_sampling::guidance::guide_each;
use serde_json::json;
use std::path::Path;

/// How each example's squared error counts in the guidance-distillation loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuidanceLoss {
    /// The plain mean (Meng et al.): an example counts by how far the student is from its
    /// target, so the noisiest steps, where guidance moves the prediction most and decides
    /// least, dominate the gradient.
    Plain,
    /// Each example's error divided by the size of its guidance shift — how far guidance
    /// moved the teacher's prediction, `mean((guided − conditional)²)`, plus a floor
    /// [`RELATIVE_FLOOR`] for scales near 1 — the weights scaled to average 1 over the batch:
    /// an example counts by the share of its guidance the student misses. On the embedded
    /// model this keeps count and size where the plain mean loses them (docs/distillation-research.md).
    Relative,
}

/// The floor under the guidance shift in [`GuidanceLoss::Relative`]'s weights (in squared units
/// of the teacher's prediction).
pub const RELATIVE_FLOOR: f64 = 0.05;

/// [`GuidanceLoss::Relative`]'s weights from the examples' guidance shifts `[B]`:
/// `1 / (shift + floor)`, scaled to average 1.
pub fn relative_weights(shifts: &Tensor) -> Result<Tensor> {
    let inverse = (shifts.detach() + RELATIVE_FLOOR)?.recip()?;
    let mean = inverse.mean_all()?;
    Ok(inverse.broadcast_div(&mean)?)
}

/// Options of `ldm distill guidance`.
#[derive(Debug, Clone, PartialEq)]
pub struct GuidanceOptions {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub warmup: usize,
    /// The guidance scales s drawn uniformly per example (diffusers' `guidance_scale`).
    pub scales: (f64, f64),
    /// Width of the guidance embedding (diffusers' `time_cond_proj_dim`; LCM uses 256).
    pub embedding_dim: usize,
    pub ema_decay: f64,
    pub grad_clip: f64,
    pub seed: u64,
    /// Shapes World scenes encoded once by the teacher, then sampled from.
    pub pool: usize,
    pub checkpoint_every: usize,
    /// Parts of each batch computed in parallel, one thread each.
    pub shards: usize,
    pub loss: GuidanceLoss,
    /// A share of each batch taken from the student's own sampling trajectories (three
    /// quarters by default; `None`: the forward process's states only, as in the paper).
    pub own_states: Option<OwnStates>,
}

impl Default for GuidanceOptions {
    fn default() -> Self {
        Self {
            steps: 2000,
            batch: 16,
            lr: 1e-4,
            warmup: 50,
            scales: (1.0, 10.0),
            embedding_dim: 256,
            ema_decay: 0.995,
            grad_clip: 1.0,
            seed: 0,
            pool: 4096,
            checkpoint_every: 200,
            shards: crate::parallel::cores(),
            loss: GuidanceLoss::Relative,
            own_states: Some(OwnStates::with_share(0.75)),
        }
    }
}

impl GuidanceOptions {
    pub fn check(&self) -> Result<()> {
        let (lo, hi) = self.scales;
        if self.steps == 0 || self.batch == 0 || self.pool == 0 {
            return Err(Error::Msg(
                "steps, batch and pool must be at least 1".into(),
            ));
        }
        if !(lo.is_finite() && hi.is_finite() && 1.0 <= lo && lo <= hi && hi <= 100.0) {
            return Err(Error::Msg(format!(
                "guidance scales {lo}..{hi}: need 1 ≤ low ≤ high ≤ 100"
            )));
        }
        if self.embedding_dim < 4 || self.embedding_dim > 4096 {
            return Err(Error::Msg(format!(
                "embedding width {}: need 4 to 4096",
                self.embedding_dim
            )));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::Msg(format!("learning rate {}", self.lr)));
        }
        if let Some(own) = &self.own_states {
            own.check()?;
        }
        Ok(())
    }
}

/// What a finished run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct DistillReport {
    pub steps: usize,
    pub final_loss: f64,
}

/// Distils the model folder `teacher` into `out` (a diffusers folder whose U-Net has a guidance
/// embedding); checkpoints in `out/distill-train`, resumed when present.
pub fn distill_guidance(
    teacher_dir: &Path,
    out: &Path,
    opts: &GuidanceOptions,
    device: &Device,
    progress: &mut dyn FnMut(&Progress),
) -> Result<DistillReport> {
    opts.check()?;
    let teacher = Teacher::load(teacher_dir, device)?;
    let phi = teacher.components.default_guidance_rescale();
    let scaling = teacher.components.vae.config.scaling_factor;
    let student = Student::from_teacher(
        teacher_dir,
        &json!({ "time_cond_proj_dim": opts.embedding_dim }),
        device,
    )?;
    let params = student.params.clone();
    let StudentRun {
        mut opt,
        mut ema,
        mut state,
    } = StudentRun::start(
        &student,
        out,
        "guidance",
        opts.steps,
        opts.checkpoint_every,
        opts.seed,
        opts.ema_decay,
        device,
    )?;
    let data = LatentPool::encode(&teacher, opts.pool, opts.seed, device)?;
    let abar = &teacher.alphas_cumprod;
    let train_steps = abar.len();
    let mut states: Option<StatePool> = None;
    // The student's own sampling: DDIM on the teacher's default trailing grid.
    let grid = trailing_grid(teacher.components.default_steps(), train_steps);
    let sampling = Sampling {
        data: &data,
        abar,
        grid: &grid,
        scales: opts.scales,
        embedding_dim: Some(opts.embedding_dim),
        fresh_noise: false,
        shards: opts.shards,
    };
    while state.step < opts.steps {
        let (step, rng) = (state.step, &mut state.rng);
        let b = opts.batch;
        let (x0, mut context) = data.draw(rng, b, scaling, device)?;
        let dims = x0.dims().to_vec();
        let mut ts: Vec<usize> = (0..b).map(|_| rng.below(train_steps)).collect();
        let mut scales = draw_scales(rng, b, opts.scales);
        let noise = rng.randn(&dims, device)?;
        let col = |v: Vec<f32>| Tensor::from_vec(v, (b, 1, 1, 1), device);
        let a = col(ts.iter().map(|&t| abar[t].sqrt()).collect())?;
        let s = col(ts.iter().map(|&t| (1.0 - abar[t]).sqrt()).collect())?;
        let mut noisy = (x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?)?;
        // The first examples replaced by states of the student's own trajectories.
        if let Some(own) = &opts.own_states {
            let pool = own.refreshed(&mut states, step, opts.checkpoint_every, || {
                StatePool::sample(own, &sampling, rng, &dims, device, |s| {
                    s.ddim(&student.unet, teacher.prediction)
                })
            })?;
            (noisy, context) =
                pool.mix_into(own.count(b), rng, &noisy, &context, &mut ts, &mut scales)?;
        }
        let t_tensor =
            Tensor::from_vec(ts.iter().map(|&t| t as f32).collect::<Vec<_>>(), b, device)?;
        let w: Vec<f64> = scales.iter().map(|s| s - 1.0).collect();
        let w_emb = guidance_scale_embedding(&w, opts.embedding_dim, device)?;
        // The teacher's guided prediction at each example's scale (the target) and how far
        // guidance moved it from the conditional one; then each example's weight.
        let ranges = shard_ranges(b, batch_shards(opts.shards, device));
        let parts = on_shards(&ranges, |r| {
            let n = r.len();
            let (x, t) = (
                noisy.narrow(0, r.start, n)?,
                t_tensor.narrow(0, r.start, n)?,
            );
            let uncond = teacher.predict(&x, &t, &data.empty.repeat((n, 1, 1))?)?;
            let cond = teacher.predict(&x, &t, &context.narrow(0, r.start, n)?)?;
            let target = guide_each(&uncond, &cond, &scales[r.clone()], phi)?;
            let shift = per_example_mse(&target, &cond)?;
            Ok((target, shift))
        })?;
        let (targets, shifts): (Vec<Tensor>, Vec<Tensor>) = parts.into_iter().unzip();
        let target = Tensor::cat(&targets, 0)?;
        let weights = match opts.loss {
            GuidanceLoss::Plain => Tensor::ones(b, candle_core::DType::F32, device)?,
            GuidanceLoss::Relative => relative_weights(&Tensor::cat(&shifts, 0)?)?,
        };
        let (loss, grads) = sharded_loss_and_grads(opts.shards, b, &params, |r| {
            let n = r.len();
            let pred = student.unet.forward_with(
                &noisy.narrow(0, r.start, n)?,
                &t_tensor.narrow(0, r.start, n)?,
                &context.narrow(0, r.start, n)?,
                None,
                Some(&w_emb.narrow(0, r.start, n)?),
            )?;
            weighted_mse_share(
                &pred,
                &target.narrow(0, r.start, n)?,
                &weights.narrow(0, r.start, n)?,
                b,
            )
        })?;
        let lr = warmup_cosine(step, opts.lr, opts.warmup, opts.steps, 0.1);
        state.update(
            &loss,
            grads,
            &mut opt,
            Some(&mut ema),
            lr,
            opts.grad_clip,
            progress,
        )?;
    }
    write_student(teacher_dir, out, &student, &ema.shadow)?;
    Ok(DistillReport {
        steps: state.step,
        final_loss: state.log.final_loss(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative weights are inversely proportional to shift + floor and average 1, whatever the
    /// shifts' scale; a batch of equal shifts weighs each example 1 (the plain mean).
    #[test]
    fn relative_weights_undo_the_guidance_shift() -> Result<()> {
        let dev = Device::Cpu;
        let shifts = [2.95f32, 0.45, 0.0, 0.95];
        let w: Vec<f32> = relative_weights(&Tensor::new(&shifts, &dev)?)?.to_vec1()?;
        let mean = w.iter().sum::<f32>() / w.len() as f32;
        assert!((mean - 1.0).abs() < 1e-6, "{w:?}");
        for (i, j) in [(0, 1), (1, 2), (0, 3)] {
            let expected =
                (shifts[j] as f64 + RELATIVE_FLOOR) / (shifts[i] as f64 + RELATIVE_FLOOR);
            assert!(((w[i] / w[j]) as f64 - expected).abs() < 1e-5, "{w:?}");
        }
        let equal: Vec<f32> = relative_weights(&Tensor::new(&[0.3f32; 5], &dev)?)?.to_vec1()?;
        assert!(equal.iter().all(|&x| (x - 1.0).abs() < 1e-6), "{equal:?}");
        Ok(())
    }
}
