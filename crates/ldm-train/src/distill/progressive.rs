//! Progressive distillation (Salimans & Ho 2022): a student that takes one sampling step where
//! its teacher took two, halving again and again (each student the next teacher) down to the
//! steps asked for.
//!
//! Steps lie on the trailing grid the model's own sampler uses (Euler with trailing spacing,
//! which on this grid is DDIM's deterministic update): with n steps, t_k = round(T − k·T/n) − 1
//! for k < n, then the clean end (ᾱ = 1). The 2n-step grid holds the n-step grid at its even
//! points. For a student step t → t″ the teacher steps t → t′ → t″ (t′ the odd point between),
//! each `z ← √ᾱ′·x̂ + √(1−ᾱ′)·ε̂`, and the target is the x̃ whose one DDIM step from z_t lands on
//! the same z″: `x̃ = (z″ − (σ″/σ)·z_t) / (α″ − (σ″/σ)·α)` (at the clean end, x̃ = z″). The
//! student, in the teacher's parametrisation, is trained on `‖x̂ − x̃‖²·max(SNR, 1)` (the paper's
//! truncated-SNR weighting); at zero terminal SNR (α = 0 at the first step) the weight is 1 and
//! the target's denominator is α″, used directly rather than through log-SNR.
//!
//! A teacher without a guidance embedding is guided by classifier-free guidance at a fixed
//! scale (its two passes are what the student saves); one with an embedding (a
//! guidance-distilled student) and its students draw a scale per example, as in Meng et al.'s
//! stage two.

use super::own_states::{OwnStates, Sampling, StatePool};
use super::{
    alpha_sigma, draw_scales, edit_scheduler, trailing_grid, write_student, x_and_eps, LatentPool,
    Student, StudentRun, Teacher,
};
use crate::optim::warmup_cosine;
use crate::parallel::sharded_loss_and_grads;
use crate::{Error, Progress, Result};
use candle_core::{Device, Tensor};
use ldm_models::layers::timestep::guidance_scale_embedding;
use ldm_sampling::guidance::guide;
use ldm_sampling::Prediction;
use std::path::{Path, PathBuf};

/// Options of `ldm distill progressive`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressiveOptions {
    /// The teacher's sampling steps (a power of two times `steps`).
    pub teacher_steps: usize,
    /// The final student's steps.
    pub steps: usize,
    /// Training steps of each halving.
    pub train_steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub warmup: usize,
    /// Classifier-free guidance of a teacher without a guidance embedding.
    pub guidance: f64,
    /// Scales drawn per example when the teacher has a guidance embedding.
    pub scales: (f64, f64),
    pub ema_decay: f64,
    pub grad_clip: f64,
    pub seed: u64,
    pub pool: usize,
    pub checkpoint_every: usize,
    pub shards: usize,
    /// A share of each batch taken from the student's own sampling on its grid (DDIM, one
    /// pass a step); `None`: the forward process's states only, as in the paper.
    pub own_states: Option<OwnStates>,
}

impl Default for ProgressiveOptions {
    fn default() -> Self {
        Self {
            teacher_steps: 16,
            steps: 4,
            train_steps: 500,
            batch: 16,
            lr: 5e-5,
            warmup: 20,
            guidance: 7.5,
            scales: (1.0, 10.0),
            ema_decay: 0.995,
            grad_clip: 1.0,
            seed: 0,
            pool: 4096,
            checkpoint_every: 100,
            shards: crate::parallel::cores(),
            own_states: None,
        }
    }
}

impl ProgressiveOptions {
    pub fn check(&self) -> Result<()> {
        let ratio = self.teacher_steps / self.steps.max(1);
        if self.steps == 0
            || self.teacher_steps <= self.steps
            || !self.teacher_steps.is_multiple_of(self.steps)
            || !ratio.is_power_of_two()
        {
            return Err(Error::Msg(format!(
                "a student of {} steps from a teacher of {}: the teacher's steps must be the \
                 student's times a power of two (2, 4, 8, …)",
                self.steps, self.teacher_steps
            )));
        }
        if self.teacher_steps > 500 {
            return Err(Error::Msg(format!(
                "teacher steps {}: at most 500 (half the training timesteps)",
                self.teacher_steps
            )));
        }
        if self.train_steps == 0 || self.batch == 0 || self.pool == 0 {
            return Err(Error::Msg(
                "training steps, batch and pool must be at least 1".into(),
            ));
        }
        if let Some(own) = &self.own_states {
            own.check()?;
        }
        let (lo, hi) = self.scales;
        if !(self.guidance.is_finite() && self.guidance >= 1.0 && 1.0 <= lo && lo <= hi) {
            return Err(Error::Msg(format!(
                "guidance {} and scales {lo}..{hi}: need guidance ≥ 1 and 1 ≤ low ≤ high",
                self.guidance
            )));
        }
        Ok(())
    }

    /// The halvings: (teacher steps, student steps), from the teacher down.
    pub fn halvings(&self) -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        let mut n = self.teacher_steps;
        while n > self.steps {
            v.push((n, n / 2));
            n /= 2;
        }
        v
    }
}

/// The x̃ whose single DDIM step from `z` at `(α, σ)` lands on `z2` at `(α″, σ″)`:
/// `(z″ − (σ″/σ)·z) / (α″ − (σ″/σ)·α)`. At the clean end (σ″ = 0) that is z″; at pure noise
/// (α = 0, σ = 1) the denominator is α″.
pub fn one_step_target(
    z: &Tensor,
    z2: &Tensor,
    (a, s): (&Tensor, &Tensor),
    (a2, s2): (&Tensor, &Tensor),
) -> Result<Tensor> {
    let ratio = s2.broadcast_div(&s.clamp(1e-12, f64::MAX)?)?;
    Ok((z2 - z.broadcast_mul(&ratio)?)?.broadcast_div(&(a2 - a.broadcast_mul(&ratio)?)?)?)
}

/// What a finished run measured: each halving's steps and final loss.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressiveReport {
    pub halvings: Vec<(usize, f64)>,
    pub folder: PathBuf,
}

/// Distils `teacher_dir` by halvings into `out/steps-<n>` folders, the last being the
/// `opts.steps`-step student; each halving's checkpoints in `out/steps-<n>/distill-train`.
pub fn distill_progressive(
    teacher_dir: &Path,
    out: &Path,
    opts: &ProgressiveOptions,
    device: &Device,
    progress: &mut dyn FnMut(&Progress),
) -> Result<ProgressiveReport> {
    opts.check()?;
    let first = Teacher::load_any(teacher_dir, device)?;
    let pure_noise_end = first.alphas_cumprod.last().is_some_and(|&a| a < 1e-6);
    if first.prediction == Prediction::Epsilon && pure_noise_end {
        return Err(Error::Msg(
            "an ε-prediction teacher on a zero-terminal-SNR schedule says nothing at pure noise"
                .into(),
        ));
    }
    drop(first);
    let mut teacher_dir = teacher_dir.to_path_buf();
    let mut halvings = Vec::new();
    for (n_teacher, n_student) in opts.halvings() {
        let folder = out.join(format!("steps-{n_student}"));
        let loss = halve(&teacher_dir, &folder, n_teacher, opts, device, progress)?;
        halvings.push((n_student, loss));
        teacher_dir = folder;
    }
    Ok(ProgressiveReport {
        halvings,
        folder: teacher_dir,
    })
}

/// One halving: a student of `n_teacher / 2` steps from `teacher_dir`, written to `out`.
fn halve(
    teacher_dir: &Path,
    out: &Path,
    n_teacher: usize,
    opts: &ProgressiveOptions,
    device: &Device,
    progress: &mut dyn FnMut(&Progress),
) -> Result<f64> {
    let teacher = Teacher::load_any(teacher_dir, device)?;
    let embedding = teacher.components.unet.config.time_cond_proj_dim;
    let phi = teacher.components.default_guidance_rescale();
    let scaling = teacher.components.vae.config.scaling_factor;
    let student = Student::from_teacher(teacher_dir, &serde_json::json!({}), device)?;
    let params = student.params.clone();
    let StudentRun {
        mut opt,
        mut ema,
        mut state,
    } = StudentRun::start(
        &student,
        out,
        "halving",
        opts.train_steps,
        opts.checkpoint_every,
        opts.seed,
        opts.ema_decay,
        device,
    )?;
    let data = LatentPool::encode(&teacher, opts.pool, opts.seed, device)?;
    let abar = &teacher.alphas_cumprod;
    let fine = trailing_grid(n_teacher, abar.len());
    let n_student = n_teacher / 2;
    // The student's own sampling: DDIM on its grid, the even points of the teacher's.
    let coarse = trailing_grid(n_student, abar.len());
    let sampling = Sampling {
        data: &data,
        abar,
        grid: &coarse,
        scales: opts.scales,
        embedding_dim: embedding,
        fresh_noise: false,
        shards: opts.shards,
    };
    let mut states: Option<StatePool> = None;
    while state.step < opts.train_steps {
        let (step, rng) = (state.step, &mut state.rng);
        let b = opts.batch;
        let (x0, context) = data.draw(rng, b, scaling, device)?;
        let dims = x0.dims().to_vec();
        // Each example's student step i: t = fine[2i] → t′ = fine[2i+1] → t″ = fine[2i+2].
        let mut steps: Vec<usize> = (0..b).map(|_| rng.below(n_student)).collect();
        let mut scales = draw_scales(rng, b, opts.scales);
        let noise = rng.randn(&dims, device)?;
        // A `[B,1,1,1]` column of `f` at each example's step.
        let col = |steps: &[usize], f: &dyn Fn(usize) -> f64| {
            Tensor::from_vec(
                steps.iter().map(|&i| f(i) as f32).collect::<Vec<_>>(),
                (b, 1, 1, 1),
                device,
            )
        };
        let point = |i: usize, k: usize| fine[2 * i + k];
        let z = (x0.broadcast_mul(&col(&steps, &|i| alpha_sigma(abar, point(i, 0)).0)?)?
            + noise.broadcast_mul(&col(&steps, &|i| alpha_sigma(abar, point(i, 0)).1)?)?)?;
        let (z, context) = match &opts.own_states {
            None => (z, context),
            Some(own) => {
                let pool = own.refreshed(&mut states, step, opts.checkpoint_every, || {
                    StatePool::sample(own, &sampling, rng, &dims, device, |s| {
                        s.ddim(&student.unet, teacher.prediction)
                    })
                })?;
                let mut ts: Vec<usize> = steps.iter().map(|&i| coarse[i].unwrap_or(0)).collect();
                let mixed = pool.mix_into(own.count(b), rng, &z, &context, &mut ts, &mut scales)?;
                // Back from timesteps to the student's step indices.
                for (i, t) in steps.iter_mut().zip(&ts) {
                    *i = coarse.iter().position(|&c| c == Some(*t)).unwrap_or(*i);
                }
                mixed
            }
        };
        let col = |f: &dyn Fn(usize) -> f64| col(&steps, f);
        let (a0, s0) = (
            col(&|i| alpha_sigma(abar, point(i, 0)).0)?,
            col(&|i| alpha_sigma(abar, point(i, 0)).1)?,
        );
        let (a1, s1) = (
            col(&|i| alpha_sigma(abar, point(i, 1)).0)?,
            col(&|i| alpha_sigma(abar, point(i, 1)).1)?,
        );
        let (a2, s2) = (
            col(&|i| alpha_sigma(abar, point(i, 2)).0)?,
            col(&|i| alpha_sigma(abar, point(i, 2)).1)?,
        );
        let timestep = |k: usize| -> Result<Tensor> {
            let ts: Vec<f32> = steps
                .iter()
                .map(|&i| point(i, k).unwrap_or(0) as f32)
                .collect();
            Ok(Tensor::from_vec(ts, b, device)?)
        };
        let (t0, t1) = (timestep(0)?, timestep(1)?);
        // max(SNR, 1) at t, per example.
        let weights = col(&|i| {
            let (a, s) = alpha_sigma(abar, point(i, 0));
            if s == 0.0 {
                1.0
            } else {
                (a * a / (s * s)).max(1.0)
            }
        })?;
        let w_emb = match embedding {
            Some(dim) => Some(guidance_scale_embedding(
                &scales.iter().map(|s| s - 1.0).collect::<Vec<_>>(),
                dim,
                device,
            )?),
            None => None,
        };
        let (loss, grads) = sharded_loss_and_grads(opts.shards, b, &params, |r| {
            let n = r.len();
            let part = |t: &Tensor| t.narrow(0, r.start, n);
            let ctx = part(&context)?;
            let emb = w_emb.as_ref().map(part).transpose()?;
            // The teacher's guided output at (z, t).
            let teach = |z: &Tensor, t: &Tensor| -> Result<Tensor> {
                Ok(match &emb {
                    Some(e) => teacher
                        .components
                        .unet
                        .forward_with(z, t, &ctx, None, Some(e))?,
                    None if opts.guidance > 1.0 => {
                        let empty = data.empty.repeat((n, 1, 1))?;
                        let u = teacher.predict(z, t, &empty)?;
                        let c = teacher.predict(z, t, &ctx)?;
                        guide(&u, &c, opts.guidance, phi)?
                    }
                    None => teacher.predict(z, t, &ctx)?,
                })
            };
            let (z0, a0, s0) = (part(&z)?, part(&a0)?, part(&s0)?);
            let (a1, s1, a2, s2) = (part(&a1)?, part(&s1)?, part(&a2)?, part(&s2)?);
            // Two teacher steps.
            let (x, e) = x_and_eps(teacher.prediction, &z0, &teach(&z0, &part(&t0)?)?, &a0, &s0)?;
            let z1 = (x.broadcast_mul(&a1)? + e.broadcast_mul(&s1)?)?;
            let (x, e) = x_and_eps(teacher.prediction, &z1, &teach(&z1, &part(&t1)?)?, &a1, &s1)?;
            let z2 = (x.broadcast_mul(&a2)? + e.broadcast_mul(&s2)?)?;
            let target = one_step_target(&z0, &z2, (&a0, &s0), (&a2, &s2))?.detach();
            let out = student
                .unet
                .forward_with(&z0, &part(&t0)?, &ctx, None, emb.as_ref())?;
            let (x_student, _) = x_and_eps(teacher.prediction, &z0, &out, &a0, &s0)?;
            let per = (x_student - target)?
                .sqr()?
                .broadcast_mul(&part(&weights)?)?
                .mean_all()?;
            Ok((per * (n as f64 / b as f64))?)
        })?;
        let lr = warmup_cosine(step, opts.lr, opts.warmup, opts.train_steps, 0.1);
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
    // Sampled as trained: Euler (DDIM's update on this grid) on the trailing grid.
    edit_scheduler(
        out,
        &serde_json::json!({
            "_class_name": "EulerDiscreteScheduler",
            "timestep_spacing": "trailing",
            "use_karras_sigmas": false,
            "interpolation_type": "linear",
        }),
        None,
    )?;
    // A teacher guided by two passes at a fixed scale leaves that guidance in the student.
    let built_in = (embedding.is_none() && opts.guidance > 1.0).then_some(1.0);
    super::write_defaults(out, n_student, built_in)?;
    Ok(state.log.final_loss())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_nest_and_end_clean() {
        assert_eq!(
            trailing_grid(4, 1000),
            vec![Some(999), Some(749), Some(499), Some(249), None]
        );
        for n in [1, 2, 4, 8, 16, 32, 64] {
            let (coarse, fine) = (trailing_grid(n, 1000), trailing_grid(2 * n, 1000));
            for (k, t) in coarse.iter().enumerate() {
                assert_eq!(*t, fine[2 * k], "{n} steps, point {k}");
            }
        }
    }

    /// A DDIM step with x̂ = x̃ from z lands on z″; the target recovers x̃, at an ordinary
    /// step, from pure noise (α = 0) and onto the clean end (σ″ = 0).
    #[test]
    fn the_target_is_what_one_step_needs() -> Result<()> {
        let dev = Device::Cpu;
        let col = |v: f64| Tensor::full(v as f32, (1, 1, 1, 1), &dev);
        let x = Tensor::randn(0f32, 1.0, (1, 4, 2, 2), &dev)?;
        let eps = Tensor::randn(0f32, 1.0, (1, 4, 2, 2), &dev)?;
        for (abar, abar2) in [(0.3, 0.7), (0.0, 0.2), (0.5, 1.0)] {
            let (a, s) = (col(f64::sqrt(abar))?, col(f64::sqrt(1.0 - abar))?);
            let (a2, s2) = (col(f64::sqrt(abar2))?, col(f64::sqrt(1.0 - abar2))?);
            let z = (x.broadcast_mul(&a)? + eps.broadcast_mul(&s)?)?;
            // DDIM with x̂ = x: ε̂ = (z − α x)/σ, z″ = α″ x + σ″ ε̂.
            let e = (&z - x.broadcast_mul(&a)?)?.broadcast_div(&s)?;
            let z2 = (x.broadcast_mul(&a2)? + e.broadcast_mul(&s2)?)?;
            let got = one_step_target(&z, &z2, (&a, &s), (&a2, &s2))?;
            let err = (got - &x)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-5, "ᾱ {abar} → {abar2}: {err}");
        }
        Ok(())
    }

    #[test]
    fn step_counts_must_halve_to_the_student() {
        let with = |teacher_steps, steps| ProgressiveOptions {
            teacher_steps,
            steps,
            ..ProgressiveOptions::default()
        };
        assert_eq!(with(16, 4).halvings(), vec![(16, 8), (8, 4)]);
        assert!(with(16, 4).check().is_ok());
        for (t, s) in [(12, 4), (8, 3), (4, 4), (2, 4), (8, 0), (1024, 2)] {
            assert!(with(t, s).check().is_err(), "{t} → {s}");
        }
    }
}
