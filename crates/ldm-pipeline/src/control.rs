//! ControlNet in the pipelines, as diffusers' `StableDiffusion(XL)ControlNetPipeline` runs it:
//! at every U-Net evaluation each ControlNet sees the same latents, timestep and text (and
//! SDXL's added conditioning) plus its conditioning image, and the residuals of all of them,
//! scaled, are summed into the U-Net's skip connections and mid block. A ControlNet acts only
//! inside its window of the schedule (`control_guidance_start` / `_end`, as fractions of the
//! U-Net evaluations); guess mode runs it on the conditional half alone, with the shallow
//! residuals weighted down.

use crate::model_denoiser::Conditioning;
use candle_core::{Result, Tensor};
use ldm_models::controlnet::{ControlNetModel, ControlScale};
use ldm_models::unet::{AddedCond, ControlResiduals};
use ldm_sampling::noise::NoiseSource;
use ldm_sampling::samplers::NoHook;
use ldm_sampling::scheduler_config::Plan;
use ldm_sampling::Denoiser;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One ControlNet of a request.
#[derive(Debug, Clone)]
pub struct ControlInput {
    /// Which of [`crate::Components::controlnets`].
    pub net: usize,
    /// The conditioning image `[1, 3, H, W]` in [0, 1] at the request's size
    /// ([`crate::image_io::load_control`]).
    pub image: Tensor,
    /// diffusers' `controlnet_conditioning_scale`.
    pub scale: f64,
    /// The window of the schedule it acts in: `control_guidance_start` and `_end`.
    pub start: f64,
    pub end: f64,
}

impl ControlInput {
    /// A ControlNet at `scale` over the whole schedule.
    pub fn new(net: usize, image: Tensor, scale: f64) -> Self {
        Self {
            net,
            image,
            scale,
            start: 0.0,
            end: 1.0,
        }
    }

    /// Whether it acts at evaluation `i` of `n` (diffusers' `controlnet_keep`).
    pub fn keeps(&self, i: usize, n: usize) -> bool {
        let n = n.max(1) as f64;
        !((i as f64) / n < self.start || (i as f64 + 1.0) / n > self.end)
    }
}

/// The ControlNets of one generation, as the denoiser calls them.
pub struct ControlRun<'a> {
    pub units: Vec<(&'a ControlNetModel, &'a ControlInput)>,
    pub guess_mode: bool,
    /// The U-Net evaluations the sampler makes (diffusers' `len(timesteps)`), and how many
    /// have been made.
    pub evaluations: usize,
    pub calls: AtomicUsize,
}

impl ControlRun<'_> {
    /// The summed residuals for one U-Net evaluation at `input` (the scaled latents, one row
    /// per image, before any inpainting channels), `timesteps` (one per image), with `cond`
    /// batched as the U-Net takes it (unconditional rows first when `guided`). `None` when no
    /// ControlNet acts at this evaluation.
    pub fn residuals(
        &self,
        input: &Tensor,
        timesteps: &Tensor,
        cond: &Conditioning,
        guided: bool,
    ) -> Result<Option<ControlResiduals>> {
        let i = self.calls.fetch_add(1, Ordering::Relaxed);
        let b = input.dim(0)?;
        let cond_half = guided && self.guess_mode;
        let half = |t: &Tensor| t.narrow(0, b, b);
        let (sample, t, context, added) = if cond_half {
            let added = match &cond.added {
                Some(a) => Some(AddedCond {
                    text_embeds: half(&a.text_embeds)?,
                    time_ids: half(&a.time_ids)?,
                }),
                None => None,
            };
            (
                input.clone(),
                timesteps.clone(),
                half(&cond.context)?,
                added,
            )
        } else if guided {
            (
                Tensor::cat(&[input, input], 0)?,
                Tensor::cat(&[timesteps, timesteps], 0)?,
                cond.context.clone(),
                cond.added.clone(),
            )
        } else {
            (
                input.clone(),
                timesteps.clone(),
                cond.context.clone(),
                cond.added.clone(),
            )
        };
        let rows = sample.dim(0)?;
        let mut total: Option<ControlResiduals> = None;
        for (net, unit) in &self.units {
            if !unit.keeps(i, self.evaluations) || unit.scale == 0.0 {
                continue;
            }
            let image = unit.image.repeat((rows, 1, 1, 1))?;
            let r = net.forward(
                &sample,
                &t,
                &context,
                added.as_ref(),
                &image,
                ControlScale {
                    scale: unit.scale,
                    guess_mode: self.guess_mode,
                },
            )?;
            total = Some(match total {
                Some(sum) => sum.add(&r)?,
                None => r,
            });
        }
        // Guess mode: the unconditional half gets no residuals.
        Ok(match total {
            Some(r) if cond_half => {
                let zeros_first = |t: &Tensor| Tensor::cat(&[&t.zeros_like()?, t], 0);
                Some(ControlResiduals {
                    down: r.down.iter().map(zeros_first).collect::<Result<_>>()?,
                    mid: zeros_first(&r.mid)?,
                })
            }
            other => other,
        })
    }
}

/// A denoiser that only counts its calls (and denoises to the sample itself).
struct Counting(AtomicUsize);

impl Denoiser for Counting {
    fn denoise(&self, x: &Tensor, _sigma: f64) -> Result<Tensor> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(x.clone())
    }
}

/// Noise of zeros: a dry run draws nothing from the request's generator.
struct Silent;

impl NoiseSource for Silent {
    fn randn(&mut self, n: usize) -> Vec<f32> {
        vec![0.0; n]
    }
}

/// How many times `plan`'s sampler evaluates the model from `x`: a dry run with a denoiser
/// that costs nothing, so that the count is exact for every sampler (diffusers' `timesteps`
/// repeat the second-order samplers' and PNDM's extra evaluations).
pub fn count_evaluations(plan: &Plan, x: &Tensor) -> ldm_sampling::Result<usize> {
    let counting = Counting(AtomicUsize::new(0));
    let mut run = ldm_sampling::samplers::Run {
        denoiser: &counting,
        sigmas: &plan.sigmas,
        landings: plan.landings.as_deref(),
        noise: &mut Silent,
        hook: &mut NoHook,
    };
    plan.sampler.sample(x.clone(), &mut run)?;
    Ok(counting.0.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// diffusers' `controlnet_keep` for 10 evaluations and the window [0.25, 0.75]: kept for
    /// i = 3…6 (i/10 ≥ 0.25 and (i+1)/10 ≤ 0.75).
    #[test]
    fn the_window_keeps_what_diffusers_keeps() {
        let dev = candle_core::Device::Cpu;
        let unit = ControlInput {
            start: 0.25,
            end: 0.75,
            ..ControlInput::new(
                0,
                Tensor::zeros(1, candle_core::DType::F32, &dev).unwrap(),
                1.0,
            )
        };
        let kept: Vec<usize> = (0..10).filter(|&i| unit.keeps(i, 10)).collect();
        assert_eq!(kept, [3, 4, 5, 6]);
        let whole = ControlInput::new(
            0,
            Tensor::zeros(1, candle_core::DType::F32, &dev).unwrap(),
            1.0,
        );
        assert!((0..7).all(|i| whole.keeps(i, 7)));
    }
}

/// One T2I-Adapter of a request.
#[derive(Debug, Clone)]
pub struct AdapterInput {
    /// Which of [`crate::Components::adapters`].
    pub net: usize,
    /// The conditioning image `[1, C, H, W]` in [0, 1] at the request's size, `C` the
    /// adapter's `in_channels`.
    pub image: Tensor,
    /// diffusers' `adapter_conditioning_scale` (several adapters: their features add, each
    /// at its scale, as `MultiAdapter` sums them).
    pub scale: f64,
}

/// The T2I-Adapter features of one generation: computed once, batched as the U-Net's input,
/// and handed to the first `active` evaluations (diffusers' `adapter_conditioning_factor`:
/// evaluation `i` takes them while `i < ⌊steps · factor⌋`).
pub struct AdapterRun {
    pub features: Vec<Tensor>,
    pub active: usize,
    pub calls: AtomicUsize,
}

impl AdapterRun {
    /// The summed, scaled features of `inputs` for `rows` images (twice that with guidance).
    pub fn new(
        adapters: &[ldm_models::t2i_adapter::T2IAdapter],
        inputs: &[AdapterInput],
        rows: usize,
        guided: bool,
        dtype: candle_core::DType,
        active: usize,
    ) -> Result<Self> {
        let mut sum: Option<Vec<Tensor>> = None;
        for input in inputs {
            let f = adapters[input.net].forward(&input.image.to_dtype(dtype)?)?;
            let f = f
                .into_iter()
                .map(|t| t * input.scale)
                .collect::<Result<Vec<_>>>()?;
            sum = Some(match sum {
                None => f,
                Some(s) => {
                    if s.len() != f.len() {
                        return Err(candle_core::Error::Msg(
                            "T2I-Adapters with different numbers of features".into(),
                        ));
                    }
                    s.iter()
                        .zip(&f)
                        .map(|(a, b)| a + b)
                        .collect::<Result<_>>()?
                }
            });
        }
        let n = if guided { 2 * rows } else { rows };
        let features = sum
            .unwrap_or_default()
            .iter()
            .map(|t| t.repeat((n, 1, 1, 1)))
            .collect::<Result<_>>()?;
        Ok(Self {
            features,
            active,
            calls: AtomicUsize::new(0),
        })
    }

    /// The features for the next evaluation, while they act.
    pub fn next(&self) -> Option<&[Tensor]> {
        let i = self.calls.fetch_add(1, Ordering::Relaxed);
        (i < self.active).then_some(self.features.as_slice())
    }
}
