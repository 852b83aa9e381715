//! States of a student's own sampling (the idea of DAgger, Ross et al. 2011). A distiller
//! trained only on the forward process's states never sees where its student's own errors lead
//! it; at sampling time those are the states it meets. Every `every` training steps, and at each
//! checkpoint, the student samples `trajectories` captions from pure noise with its own sampler,
//! one pass a step, each trajectory at a guidance scale drawn from the range, and `share` of each
//! batch is drawn from the states it passed through; the distiller's target there is the
//! teacher's, as for any other state. [`super::guidance`] samples with DDIM on the teacher's
//! default trailing grid, [`super::lcm`] with the multistep consistency sampler at the student's
//! default steps.

use super::{alpha_sigma, draw_scales, x_and_eps, LatentPool};
use crate::noise::TrainRng;
use crate::parallel::{batch_shards, on_shards, shard_ranges};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use ldm_models::layers::timestep::guidance_scale_embedding;
use ldm_models::unet::UNet2DConditionModel;
use ldm_sampling::Prediction;

/// How much of each batch comes from the student's own trajectories, and how often they are
/// sampled afresh.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OwnStates {
    pub share: f64,
    pub every: usize,
    pub trajectories: usize,
}

impl OwnStates {
    /// `share` of each batch, 32 trajectories sampled every 100 steps.
    pub fn with_share(share: f64) -> Self {
        Self {
            share,
            every: 100,
            trajectories: 32,
        }
    }

    pub fn check(&self) -> Result<()> {
        if !((0.0..=1.0).contains(&self.share) && self.every > 0 && self.trajectories > 0) {
            return Err(Error::Msg(format!(
                "own-state share {}: need 0 to 1 (and at least one trajectory, refreshed every \
                 step or more)",
                self.share
            )));
        }
        Ok(())
    }

    /// The pool for training step `step`, sampled afresh by `sample` every `every` steps and at
    /// every checkpoint too, where a resumed run starts, so that it draws the same states as an
    /// uninterrupted one.
    pub fn refreshed<'a>(
        &self,
        pool: &'a mut Option<StatePool>,
        step: usize,
        checkpoint_every: usize,
        sample: impl FnOnce() -> Result<StatePool>,
    ) -> Result<&'a StatePool> {
        let due = step.is_multiple_of(self.every) || step.is_multiple_of(checkpoint_every);
        if due || pool.is_none() {
            *pool = Some(sample()?);
        }
        Ok(pool.as_ref().expect("sampled above"))
    }

    /// How many of a batch of `b` examples are the student's own states.
    pub fn count(&self, b: usize) -> usize {
        ((b as f64 * self.share).round() as usize).min(b)
    }
}

/// One sampling step of some of the pool's trajectories, handed to the distiller's sampler.
pub struct TrajectoryStep<'a> {
    /// `[m, C, H, W]` at timestep `t`.
    pub z: &'a Tensor,
    pub t: usize,
    /// `(α, σ)` at `t` and at the next grid point (`(1, 0)` at the clean end).
    pub at: (f64, f64),
    pub at_next: (f64, f64),
    pub context: &'a Tensor,
    /// The guidance embedding of each trajectory's w = s − 1 (none for a student without one).
    pub w_emb: Option<&'a Tensor>,
    /// Fresh noise for a sampler that re-noises (drawn only when asked for).
    pub noise: Option<&'a Tensor>,
}

impl TrajectoryStep<'_> {
    /// `net`'s one pass at this step, read as (x̂, ε̂) in `prediction`'s parametrisation.
    pub fn predict(
        &self,
        net: &UNet2DConditionModel,
        prediction: Prediction,
    ) -> Result<(Tensor, Tensor)> {
        let (m, device) = (self.z.dim(0)?, self.z.device());
        let t = Tensor::from_vec(vec![self.t as f32; m], m, device)?;
        let out = net
            .forward_with(self.z, &t, self.context, None, self.w_emb)?
            .detach();
        let col = |v: f64| Tensor::from_vec(vec![v as f32; m], (m, 1, 1, 1), device);
        x_and_eps(prediction, self.z, &out, &col(self.at.0)?, &col(self.at.1)?)
    }

    /// DDIM's deterministic step to the next grid point, `√ᾱ′·x̂ + √(1−ᾱ′)·ε̂`, by `net`.
    pub fn ddim(&self, net: &UNet2DConditionModel, prediction: Prediction) -> Result<Tensor> {
        let (x, e) = self.predict(net, prediction)?;
        Ok(((x * self.at_next.0)? + (e * self.at_next.1)?)?)
    }
}

/// The states of the student's latest trajectories.
pub struct StatePool {
    /// `[N, C, H, W]`.
    z: Tensor,
    t: Vec<usize>,
    /// `[N, L, D]`.
    context: Tensor,
    scales: Vec<f64>,
}

/// What a pool is sampled with.
pub struct Sampling<'a> {
    pub data: &'a LatentPool,
    pub abar: &'a [f32],
    /// The timesteps of the student's sampler, then `None` for the clean end.
    pub grid: &'a [Option<usize>],
    pub scales: (f64, f64),
    /// The width of the student's guidance embedding (`None`: it has none).
    pub embedding_dim: Option<usize>,
    /// Whether the sampler re-noises after each step (consistency sampling).
    pub fresh_noise: bool,
    pub shards: usize,
}

impl StatePool {
    /// Samples `own.trajectories` captions of the data from pure noise, `step` taking each
    /// trajectory from one grid point to the next (one student pass), and keeps every state it
    /// passes through.
    pub fn sample(
        own: &OwnStates,
        how: &Sampling,
        rng: &mut TrainRng,
        latent_dims: &[usize],
        device: &Device,
        step: impl Fn(&TrajectoryStep) -> Result<Tensor> + Sync,
    ) -> Result<Self> {
        let n = own.trajectories;
        let data = how.data;
        let picks: Vec<u32> = (0..n).map(|_| rng.below(data.len()) as u32).collect();
        let context = data
            .contexts
            .index_select(&Tensor::new(picks.as_slice(), device)?, 0)?;
        let scales = draw_scales(rng, n, how.scales);
        let w: Vec<f64> = scales.iter().map(|s| s - 1.0).collect();
        let w_emb = match how.embedding_dim {
            Some(dim) => Some(guidance_scale_embedding(&w, dim, device)?),
            None => None,
        };
        let mut dims = latent_dims.to_vec();
        dims[0] = n;
        let mut z = rng.randn(&dims, device)?;
        let (mut zs, mut ts) = (Vec::new(), Vec::new());
        let ranges = shard_ranges(n, batch_shards(how.shards, device));
        for pair in how.grid.windows(2) {
            let (Some(t), next) = (pair[0], pair[1]) else {
                break;
            };
            zs.push(z.clone());
            ts.extend(std::iter::repeat_n(t, n));
            let noise = match (how.fresh_noise, next) {
                (true, Some(_)) => Some(rng.randn(&dims, device)?),
                _ => None,
            };
            let parts = on_shards(&ranges, |r| {
                let m = r.len();
                let rows = |x: &Tensor| x.narrow(0, r.start, m);
                let noise = noise.as_ref().map(rows).transpose()?;
                let w_emb = w_emb.as_ref().map(rows).transpose()?;
                let out = step(&TrajectoryStep {
                    z: &rows(&z)?,
                    t,
                    at: alpha_sigma(how.abar, Some(t)),
                    at_next: alpha_sigma(how.abar, next),
                    context: &rows(&context)?,
                    w_emb: w_emb.as_ref(),
                    noise: noise.as_ref(),
                })?;
                Ok(out.detach())
            })?;
            z = Tensor::cat(&parts, 0)?;
        }
        let steps = zs.len();
        Ok(Self {
            z: Tensor::cat(&zs, 0)?,
            t: ts,
            context: context.repeat((steps, 1, 1))?,
            scales: scales.repeat(steps),
        })
    }

    /// Replaces the first `k` examples of a batch (noised latents `z`, captions `context`,
    /// timesteps and scales) by states drawn from the pool.
    pub fn mix_into(
        &self,
        k: usize,
        rng: &mut TrainRng,
        z: &Tensor,
        context: &Tensor,
        ts: &mut [usize],
        scales: &mut [f64],
    ) -> Result<(Tensor, Tensor)> {
        let b = ts.len();
        if k == 0 {
            return Ok((z.clone(), context.clone()));
        }
        let device = z.device();
        let picks: Vec<u32> = (0..k).map(|_| rng.below(self.t.len()) as u32).collect();
        let idx = Tensor::new(picks.as_slice(), device)?;
        let z = Tensor::cat(&[self.z.index_select(&idx, 0)?, z.narrow(0, k, b - k)?], 0)?;
        let context = Tensor::cat(
            &[
                self.context.index_select(&idx, 0)?,
                context.narrow(0, k, b - k)?,
            ],
            0,
        )?;
        for (j, &i) in picks.iter().enumerate() {
            ts[j] = self.t[i as usize];
            scales[j] = self.scales[i as usize];
        }
        Ok((z, context))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first `k` examples become pool states (latent, caption, timestep and scale
    /// together); the rest stay as they were.
    #[test]
    fn mixing_replaces_the_first_examples() -> Result<()> {
        let dev = Device::Cpu;
        let pool = StatePool {
            z: Tensor::from_vec(vec![10f32, 11.0, 12.0], (3, 1, 1, 1), &dev)?,
            t: vec![999, 759, 499],
            context: Tensor::from_vec(vec![20f32, 21.0, 22.0], (3, 1, 1), &dev)?,
            scales: vec![2.0, 3.0, 4.0],
        };
        let z = Tensor::from_vec(vec![0f32, 1.0, 2.0, 3.0], (4, 1, 1, 1), &dev)?;
        let ctx = Tensor::from_vec(vec![5f32, 6.0, 7.0, 8.0], (4, 1, 1), &dev)?;
        let (mut ts, mut scales) = (vec![1, 2, 3, 4], vec![7.5; 4]);
        let mut rng = TrainRng::new(0);
        let (z2, ctx2) = pool.mix_into(2, &mut rng, &z, &ctx, &mut ts, &mut scales)?;
        let z2 = z2.flatten_all()?.to_vec1::<f32>()?;
        let ctx2 = ctx2.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(
            (&z2[2..], &ctx2[2..], &ts[2..]),
            (&[2.0, 3.0][..], &[7.0, 8.0][..], &[3, 4][..])
        );
        for j in 0..2 {
            let i = (z2[j] - 10.0) as usize;
            assert_eq!(
                (ctx2[j], ts[j], scales[j]),
                (20.0 + i as f32, pool.t[i], pool.scales[i])
            );
        }
        let (z3, _) = pool.mix_into(0, &mut rng, &z, &ctx, &mut ts, &mut scales)?;
        assert_eq!(
            z3.flatten_all()?.to_vec1::<f32>()?,
            vec![0.0, 1.0, 2.0, 3.0]
        );
        Ok(())
    }

    #[test]
    fn shares_round_and_are_checked() {
        assert_eq!(OwnStates::with_share(0.75).count(16), 12);
        assert_eq!(OwnStates::with_share(0.5).count(3), 2);
        assert_eq!(OwnStates::with_share(1.0).count(5), 5);
        assert!(OwnStates::with_share(1.5).check().is_err());
        assert!(OwnStates {
            every: 0,
            ..OwnStates::with_share(0.5)
        }
        .check()
        .is_err());
    }
}
