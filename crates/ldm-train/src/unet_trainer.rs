//! Training the text-to-image latent diffusion model (Rombach et al. 2022, §3.3): the
//! autoencoder frozen, a CLIP-style text transformer trained from scratch jointly with the
//! U-Net, as the paper does for its text-to-image model. DDPM's objective (Ho et al. 2020,
//! Algorithm 1) with ε, v (Salimans & Ho 2022) or x₀ targets; uniform or log-normal (Karras et
//! al. 2022) timesteps; caption dropout for classifier-free guidance (Ho & Salimans 2022);
//! min-SNR-γ weighting (Hang et al. 2023) as an option; AdamW, warm-up + cosine, clipping, EMA.

use crate::checkpoint::TrainingState;
use crate::component::{check_all_used, named_vars, strip, write_component, SeededInit};
use crate::data::{batch, object_grounding, object_masks};
use crate::layout_head::{mask_loss_share, LayoutHead};
use crate::loss::{
    grounding_share, object_pixel_weights, pixel_weighted_mse_share, weighted_mse_share,
};
use crate::noise::TrainRng;
use crate::optim::{warmup_cosine, AdamW, AdamWConfig, Ema};
use crate::parallel::sharded_loss_and_grads;
use crate::recipe::Recipe;
use crate::tokenizer::{shapes_words, write_tokenizer};
use crate::{Error, Progress, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use ldm_models::clip::{config::ClipTextConfig, text_model::ClipTextModel};
use ldm_models::unet::{UNet2DConditionModel, UNetConfig};
use ldm_models::vae::{AutoencoderKL, VaeConfig};
use ldm_models::weights::{component_files, Checkpoint, Weights};
use ldm_sampling::schedule::{BetaSchedule, NoiseSchedule};
use ldm_sampling::Prediction;
use std::path::Path;

/// How training timesteps are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TimestepSampling {
    /// Uniform over the 1000 training steps (DDPM).
    Uniform,
    /// `ln σ ~ N(mean, std)` (EDM's choice), mapped to the nearest training timestep.
    LogNormal { mean: f64, std: f64 },
}

/// Options of `ldm train unet`.
#[derive(Debug, Clone, PartialEq)]
pub struct UnetOptions {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub warmup: usize,
    pub prediction: Prediction,
    pub timesteps: TimestepSampling,
    /// A share of each batch drawn from this second distribution instead (each example with
    /// that probability): `ldm train unet --noisy-share` draws them from the noisiest steps,
    /// where a layout is decided and the recipe's log-normal hardly goes (σ > 11, t > 850, for
    /// 6 % of its examples).
    pub extra_timesteps: Option<(f64, TimestepSampling)>,
    pub caption_dropout: f64,
    pub ema_decay: f64,
    pub min_snr_gamma: Option<f64>,
    /// A floor under the per-sample loss weight. The weight is min-SNR-γ's when
    /// `min_snr_gamma` is set, else the ε loss's (`snr/(snr+1)` for v, `snr` for x₀); at zero
    /// terminal SNR both vanish at the pure-noise step — the one that must follow the caption —
    /// and the floor keeps it in the loss. Plain v-loss instead gives the noisiest steps (the
    /// whole image guessed from the caption) as much weight as the nearly clean ones; their
    /// large, noisy gradients dominate Adam's scale and fine denoising is learned slowly
    /// (samples keep a noise texture).
    pub snr_weight_floor: Option<f64>,
    /// Latent cells the scene's objects cover weigh `1 + object_weight` in the loss against 1
    /// for the background, each example's weights scaled to average 1 (0: off). An object
    /// covers 5–14 % of a Shapes picture, so under a plain loss the words that place it are
    /// worth little against the background's. A weight that depends on where the objects are
    /// also moves the loss's optimum towards drawing them (docs/shapes-research.md, "Weighting
    /// the objects in the loss": two objects came out as overlapping blobs), so it is off in
    /// the recipe.
    pub object_weight: f64,
    /// Weight of a token-level grounding loss beside the denoising loss (0: off): each object
    /// word's cross-attention (its size, colour and shape words, and the position word) should
    /// fall on its object, `(1 − share on the object)²` averaged over the words and the
    /// cross-attention layers (TokenCompose's token loss, Wang et al. 2024; the renderer knows
    /// every object's mask). Unlike `object_weight` it leaves the denoising target alone.
    pub attention_grounding: f64,
    /// Weight of an auxiliary mask loss beside the denoising loss (0: off): a linear head on
    /// the features `conv_out` reads predicts each named object's coverage of every latent
    /// cell (the renderer's masks, first and second object), under a binary cross-entropy
    /// ([`crate::layout_head`]). At pure noise only the caption says where an object will be,
    /// and the masks pay for that far more than the denoising loss does. The head is not
    /// written out.
    pub layout_head: f64,
    pub grad_clip: f64,
    /// Start every residual branch's last layer and the output convolution at zero: the
    /// resnets' `conv2`, the transformers' `proj_out` and `conv_out` (the latent-diffusion
    /// code's `zero_module` on the same layers; diffusers starts them as PyTorch's defaults).
    /// A fresh U-Net then begins as the identity through its skip paths with a zero output.
    /// On the Shapes recipe it read back far worse than PyTorch's default start (one object
    /// exact 6.5 % against 21 %, 6000 steps each), so it is off unless asked for.
    pub zero_init: bool,
    /// Rescale the betas to zero terminal SNR (Lin et al. 2024) and sample with trailing
    /// timesteps: the last training step is pure noise, as sampling starts. With SD's schedule
    /// the last step keeps √ᾱ ≈ 0.07 of the image, enough for a flat background's colour to
    /// survive in the noise — the model then reads it from the noise instead of the caption,
    /// and at sampling time (pure noise) it follows the seed, not the prompt. Needs v or x₀
    /// prediction (ε says nothing about the image at zero SNR).
    pub zero_terminal_snr: bool,
    pub seed: u64,
    /// Parts of each batch computed in parallel, one thread each with its own one-thread rayon
    /// pool (data parallelism over the CPU's cores; the gradient is the same for any number).
    /// One per core by default. Fastest when candle's element-wise ops run on the calling
    /// thread (`CANDLE_NUM_THREADS=1`, which `ldm train` sets): with candle's spinning barrier
    /// pool the shards queue for it in turn (`tools/bench/train_step.py` measures the step).
    pub shards: usize,
    /// Scenes rendered and encoded once, then sampled from.
    pub pool: usize,
    pub checkpoint_every: usize,
    /// Every this many steps, the EMA model as a whole diffusers folder under
    /// `unet-train/snapshots/step-NNNNNNN` (autoencoder and tokenizer copied in), kept: what
    /// adherence against training time is measured on. None: no snapshots.
    pub snapshot_every: Option<usize>,
}

impl Default for UnetOptions {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch: 32,
            lr: 5e-4,
            warmup: 100,
            prediction: Prediction::Epsilon,
            timesteps: TimestepSampling::Uniform,
            extra_timesteps: None,
            caption_dropout: 0.1,
            ema_decay: 0.995,
            min_snr_gamma: None,
            snr_weight_floor: None,
            object_weight: 0.0,
            attention_grounding: 0.0,
            layout_head: 0.0,
            grad_clip: 1.0,
            zero_init: false,
            zero_terminal_snr: false,
            seed: 0,
            shards: crate::parallel::cores(),
            pool: 20_000,
            checkpoint_every: 100,
            snapshot_every: None,
        }
    }
}

/// What a finished run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct UnetReport {
    pub final_loss: f64,
    pub steps: usize,
}

const TRAIN_STEPS: usize = 1000;

/// SD's scaled-linear schedule, the one [`Recipe::scheduler_config`] writes, optionally
/// rescaled to zero terminal SNR.
fn schedule(zero_terminal_snr: bool) -> Result<NoiseSchedule> {
    Ok(NoiseSchedule::new(
        TRAIN_STEPS,
        0.00085,
        0.012,
        &BetaSchedule::ScaledLinear,
        zero_terminal_snr,
    )?)
}

fn prediction_name(p: Prediction) -> &'static str {
    match p {
        Prediction::Epsilon => "epsilon",
        Prediction::V => "v_prediction",
        Prediction::Sample => "sample",
    }
}

/// The per-sample loss weight at `ᾱ = a`: min-SNR-γ's `min(snr, γ)` (or the ε loss's `snr`)
/// as an x₀-space weight, expressed in the space of the prediction and floored; 1 (the plain
/// mean) when neither γ nor a floor is set.
fn loss_weight(opts: &UnetOptions, a: f32) -> f64 {
    if opts.min_snr_gamma.is_none() && opts.snr_weight_floor.is_none() {
        return 1.0;
    }
    let snr = a as f64 / (1.0 - a as f64);
    let x0_weight = opts.min_snr_gamma.map_or(snr, |gamma| snr.min(gamma));
    let w = match opts.prediction {
        Prediction::Epsilon => x0_weight / snr,
        Prediction::V => x0_weight / (snr + 1.0),
        Prediction::Sample => x0_weight,
    };
    match opts.snr_weight_floor {
        Some(floor) if w.is_finite() => w.max(floor),
        Some(floor) => floor,
        None => w,
    }
}

/// One example's training timestep: from [`UnetOptions::timesteps`], or with the share of
/// [`UnetOptions::extra_timesteps`] from that distribution.
fn draw_timestep(opts: &UnetOptions, rng: &mut TrainRng, sched: &NoiseSchedule) -> usize {
    let sampling = match opts.extra_timesteps {
        Some((share, extra)) if rng.uniform() < share => extra,
        _ => opts.timesteps,
    };
    match sampling {
        TimestepSampling::Uniform => rng.below(TRAIN_STEPS),
        TimestepSampling::LogNormal { mean, std } => {
            let sigma = (mean + std * rng.normal()).exp();
            (sched.sigma_to_t(sigma).round() as usize).min(TRAIN_STEPS - 1)
        }
    }
}

/// Loads a trained autoencoder component folder (`config.json` + weights), strictly.
pub fn load_vae(dir: &Path, device: &Device) -> Result<AutoencoderKL> {
    let config = VaeConfig::from_file(&dir.join("config.json"))?;
    let weights = Weights::new(Checkpoint::open(&component_files(dir)?)?);
    let vae = AutoencoderKL::new(weights.var_builder(DType::F32, device), &config)?;
    check_all_used(&weights, dir)?;
    Ok(vae)
}

/// Whether a U-Net variable ends a residual branch or the network: what
/// [`UnetOptions::zero_init`] starts at zero.
fn is_residual_output(name: &str) -> bool {
    (name.contains(".resnets.") && name.contains(".conv2."))
        || (name.contains(".attentions.") && name.contains(".proj_out."))
        || name.starts_with("conv_out.")
}

/// Sets the U-Net's residual-branch outputs to zero ([`UnetOptions::zero_init`]).
fn zero_residual_outputs(unet_map: &VarMap) -> Result<()> {
    let data = unet_map.data().lock().unwrap_or_else(|e| e.into_inner());
    for (name, var) in data.iter() {
        if is_residual_output(name) {
            var.set(&var.as_tensor().zeros_like()?)?;
        }
    }
    Ok(())
}

/// Trains the text encoder and U-Net on latents of the autoencoder in `out/vae`, then writes
/// the whole diffusers folder into `out`. Resumes from `out/unet-train` when it holds a
/// checkpoint.
pub fn train_unet(
    recipe: &Recipe,
    opts: &UnetOptions,
    out: &Path,
    device: &Device,
    progress: &mut dyn FnMut(&Progress),
) -> Result<UnetReport> {
    if opts.zero_terminal_snr && opts.prediction == Prediction::Epsilon {
        return Err(Error::Msg(
            "zero terminal SNR needs v or x0 prediction (at pure noise ε says nothing about the image)"
                .into(),
        ));
    }
    // The frozen autoencoder; the U-Net takes its latent channels.
    let vae_dir = out.join("vae");
    let vae = load_vae(&vae_dir, device)?;
    let recipe = &Recipe {
        latent_channels: vae.config.latent_channels,
        ..recipe.clone()
    };
    let tokenizer = write_tokenizer(&out.join("tokenizer"), &shapes_words(), recipe.text_context)?;
    let (bos, eos) = (tokenizer.bos_id, tokenizer.eos_id);
    let text_json = recipe.text_config(tokenizer.vocab_size(), bos, eos);
    let text_cfg = ClipTextConfig::from_json(
        &serde_json::from_value(text_json.clone())?,
        Path::new("text_encoder/config.json"),
    )?;
    let unet_json = recipe.unet_config();
    let unet_cfg = UNetConfig::from_json(
        &serde_json::from_value(unet_json.clone())?,
        Path::new("unet/config.json"),
    )?;
    let text_map = VarMap::new();
    let text = ClipTextModel::new(
        SeededInit::var_builder(&text_map, opts.seed, device),
        &text_cfg,
    )?;
    let unet_map = VarMap::new();
    let unet = UNet2DConditionModel::new(
        SeededInit::var_builder(&unet_map, opts.seed.wrapping_add(1), device),
        &unet_cfg,
    )?;
    if opts.zero_init {
        zero_residual_outputs(&unet_map)?;
    }
    let mut params = named_vars(&text_map, "text_encoder.");
    params.extend(named_vars(&unet_map, "unet."));
    let head_map = VarMap::new();
    let head = if opts.layout_head > 0.0 {
        let vb = SeededInit::var_builder(&head_map, opts.seed.wrapping_add(2), device);
        let head = LayoutHead::new(vb, unet_cfg.block_out_channels[0], 2)?;
        params.extend(named_vars(&head_map, "layout_head."));
        Some(head)
    } else {
        None
    };
    let mut opt = AdamW::new(params.clone(), AdamWConfig::default())?;
    let mut ema = Ema::new(&params, opts.ema_decay)?;
    let mut state = TrainingState::resume_or_start(
        &out.join("unet-train"),
        opts.checkpoint_every,
        "unet",
        opts.steps,
        opts.seed,
        &mut [&mut opt],
        Some(&mut ema),
        device,
    )?;

    // The pool: posterior means and standard deviations of `pool` scenes, and their captions.
    let s = recipe.image_size;
    let scaling = vae.config.scaling_factor;
    let (mut means, mut stds, mut ids, mut masks) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut own_masks, mut chosen) = (Vec::new(), Vec::new());
    let chunk = 64;
    for first in (0..opts.pool).step_by(chunk) {
        let n = chunk.min(opts.pool - first) as u64;
        let range = first as u64..first as u64 + n;
        let (x, captions) = batch(opts.seed, range.clone(), s, device)?;
        let posterior = vae.encode(&x)?;
        let factor = s / posterior.mean.dim(3)?;
        if opts.object_weight > 0.0 {
            masks.push(object_masks(opts.seed, range.clone(), s, factor, device)?);
        }
        if opts.attention_grounding > 0.0 || opts.layout_head > 0.0 {
            let len = recipe.text_context;
            let (m, c) = object_grounding(opts.seed, range, s, factor, len, device)?;
            own_masks.push(m);
            chosen.push(c);
        }
        means.push(posterior.mean.clone());
        stds.push(posterior.std()?);
        for c in captions {
            ids.push(tokenizer.encode(&c)?);
        }
    }
    let means = Tensor::cat(&means, 0)?.contiguous()?;
    let stds = Tensor::cat(&stds, 0)?.contiguous()?;
    let masks = if masks.is_empty() {
        None
    } else {
        Some(Tensor::cat(&masks, 0)?.contiguous()?)
    };
    let (own_masks, grounding) = if own_masks.is_empty() {
        (None, None)
    } else {
        let m = Tensor::cat(&own_masks, 0)?;
        let grounding = if opts.attention_grounding > 0.0 {
            Some((m.clone(), Tensor::cat(&chosen, 0)?))
        } else {
            None
        };
        (Some(m), grounding)
    };
    let empty = tokenizer.encode("")?;

    let model = Model {
        text_json: &text_json,
        unet_json: &unet_json,
        scheduler_json: recipe
            .scheduler_config(prediction_name(opts.prediction), opts.zero_terminal_snr),
        params: &params,
    };
    let sched = schedule(opts.zero_terminal_snr)?;
    while state.step < opts.steps {
        let (step, rng) = (state.step, &mut state.rng);
        let b = opts.batch;
        let picks: Vec<u32> = (0..b).map(|_| rng.below(opts.pool) as u32).collect();
        let picks_t = Tensor::new(picks.as_slice(), device)?;
        let mean = means.index_select(&picks_t, 0)?;
        let std = stds.index_select(&picks_t, 0)?;
        let dims = mean.dims().to_vec();
        let x0 = ((mean + (std * rng.randn(&dims, device)?)?)? * scaling)?;
        let mut tokens: Vec<u32> = Vec::with_capacity(b * empty.len());
        let mut kept: Vec<f32> = Vec::with_capacity(b);
        for &p in &picks {
            let dropped = rng.uniform() < opts.caption_dropout;
            tokens.extend_from_slice(if dropped { &empty } else { &ids[p as usize] });
            kept.push(if dropped { 0.0 } else { 1.0 });
        }
        // Each example's object masks and the tokens naming its objects (none when its caption
        // was dropped).
        let layout = match (&head, &own_masks) {
            (Some(_), Some(m)) => Some(m.index_select(&picks_t, 0)?),
            _ => None,
        };
        let grounding = match &grounding {
            Some((m, c)) => {
                let kept = Tensor::from_vec(kept, (b, 1, 1), device)?;
                let c = c.index_select(&picks_t, 0)?.broadcast_mul(&kept)?;
                Some((m.index_select(&picks_t, 0)?, c))
            }
            None => None,
        };
        let tokens = Tensor::from_vec(tokens, (b, empty.len()), device)?;
        let ts: Vec<usize> = (0..b).map(|_| draw_timestep(opts, rng, &sched)).collect();
        let abar: Vec<f32> = ts.iter().map(|&t| sched.alphas_cumprod[t]).collect();
        let col = |v: Vec<f32>| Tensor::from_vec(v, (b, 1, 1, 1), device);
        let a = col(abar.iter().map(|a| a.sqrt()).collect())?;
        let sg = col(abar.iter().map(|a| (1.0 - a).sqrt()).collect())?;
        let noise = rng.randn(&dims, device)?;
        let noisy = (x0.broadcast_mul(&a)? + noise.broadcast_mul(&sg)?)?;
        let target = match opts.prediction {
            Prediction::Epsilon => noise.clone(),
            Prediction::V => (noise.broadcast_mul(&a)? - x0.broadcast_mul(&sg)?)?,
            Prediction::Sample => x0.clone(),
        };
        let t_tensor =
            Tensor::from_vec(ts.iter().map(|&t| t as f32).collect::<Vec<_>>(), b, device)?;
        let weights: Vec<f32> = abar.iter().map(|&a| loss_weight(opts, a) as f32).collect();
        let weights = Tensor::from_vec(weights, b, device)?;
        let pixel_weights = match &masks {
            Some(m) => Some(object_pixel_weights(
                &m.index_select(&picks_t, 0)?,
                opts.object_weight,
            )?),
            None => None,
        };
        // Data parallelism over the CPU's cores: candle runs most ops on one thread, so each
        // shard of the batch goes forward and backward on its own thread and the gradients are
        // summed — the same gradient as one pass over the whole batch.
        let (loss, grads) = sharded_loss_and_grads(opts.shards.min(b).max(1), b, &params, |r| {
            let n = r.len();
            let context = text
                .forward(&tokens.narrow(0, r.start, n)?)?
                .last_hidden_state;
            let (sample, t) = (
                noisy.narrow(0, r.start, n)?,
                t_tensor.narrow(0, r.start, n)?,
            );
            let mut features = None;
            let mut forward = || match head {
                Some(_) => {
                    let (pred, f) = unet.forward_and_features(&sample, &t, &context, None)?;
                    features = Some(f);
                    Ok(pred)
                }
                None => unet.forward(&sample, &t, &context, None),
            };
            let (pred, maps) = if grounding.is_some() {
                ldm_models::layers::attention::record_cross_attention(forward)?
            } else {
                (forward()?, Vec::new())
            };
            let layout = match (&head, &features, &layout) {
                (Some(h), Some(f), Some(m)) => {
                    let logits = h.forward(f)?;
                    let share = mask_loss_share(&logits, &m.narrow(0, r.start, n)?, b)?;
                    Some((share * opts.layout_head)?)
                }
                _ => None,
            };
            let (target, weights) = (
                target.narrow(0, r.start, n)?,
                weights.narrow(0, r.start, n)?,
            );
            let denoising = match &pixel_weights {
                Some(pw) => {
                    let pw = pw.narrow(0, r.start, n)?;
                    pixel_weighted_mse_share(&pred, &target, &pw, &weights, b)
                }
                None => weighted_mse_share(&pred, &target, &weights, b),
            }?;
            let loss = match &grounding {
                Some((m, c)) => {
                    let (m, c) = (m.narrow(0, r.start, n)?, c.narrow(0, r.start, n)?);
                    let share = (grounding_share(&maps, &m, &c, b)? * opts.attention_grounding)?;
                    (denoising + share)?
                }
                _ => denoising,
            };
            Ok(match layout {
                Some(share) => (loss + share)?,
                None => loss,
            })
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
        if let Some(every) = opts.snapshot_every.filter(|&e| e > 0) {
            if state.step % every == 0 {
                model.snapshot(out, state.step, &ema.shadow)?;
            }
        }
    }

    // The model: EMA weights in a diffusers folder.
    model.write(out, &ema.shadow)?;
    Ok(UnetReport {
        final_loss: state.log.final_loss(),
        steps: state.step,
    })
}

/// What the U-Net stage writes: the text encoder and U-Net (from the given values, the EMA's),
/// their scheduler and the pipeline's index.
struct Model<'a> {
    text_json: &'a serde_json::Value,
    unet_json: &'a serde_json::Value,
    scheduler_json: serde_json::Value,
    params: &'a [(String, Var)],
}

impl Model<'_> {
    fn write(&self, out: &Path, values: &[Tensor]) -> Result<()> {
        write_component(
            &out.join("text_encoder"),
            self.text_json,
            "model.safetensors",
            &strip(self.params, values, "text_encoder."),
            DType::F32,
        )?;
        write_component(
            &out.join("unet"),
            self.unet_json,
            "diffusion_pytorch_model.safetensors",
            &strip(self.params, values, "unet."),
            DType::F32,
        )?;
        std::fs::create_dir_all(out.join("scheduler"))?;
        crate::io::write_json(
            &out.join("scheduler").join("scheduler_config.json"),
            &self.scheduler_json,
        )?;
        crate::io::write_json(&out.join("model_index.json"), &Recipe::model_index())
    }

    /// A loadable folder `out/unet-train/snapshots/step-NNNNNNN` with the model at this step
    /// and copies of the autoencoder and tokenizer; built beside its name and renamed into
    /// place, so a killed run leaves no half-written snapshot.
    fn snapshot(&self, out: &Path, step: usize, values: &[Tensor]) -> Result<()> {
        let root = out.join("unet-train").join("snapshots");
        let dir = root.join(format!("step-{step:07}"));
        let tmp = root.join(format!(".step-{step:07}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        self.write(&tmp, values)?;
        for sub in ["vae", "tokenizer"] {
            std::fs::create_dir_all(tmp.join(sub))?;
            for entry in std::fs::read_dir(out.join(sub))? {
                let entry = entry?;
                if entry.file_type()?.is_file() {
                    std::fs::copy(entry.path(), tmp.join(sub).join(entry.file_name()))?;
                }
            }
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::rename(&tmp, &dir)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recipe's log-normal hardly reaches the noisiest steps; an extra share drawn from
    /// ln σ ~ N(3, 0.5) puts about that share of the examples there, and no share draws
    /// exactly as before.
    #[test]
    fn an_extra_share_of_timesteps_goes_to_the_noisiest_steps() -> Result<()> {
        let sched = schedule(true)?;
        let recipe = UnetOptions {
            timesteps: TimestepSampling::LogNormal {
                mean: 0.5,
                std: 1.2,
            },
            ..UnetOptions::default()
        };
        let noisy = |opts: &UnetOptions| -> Vec<usize> {
            let mut rng = TrainRng::new(7);
            (0..4000)
                .map(|_| draw_timestep(opts, &mut rng, &sched))
                .collect()
        };
        let share =
            |ts: &[usize]| ts.iter().filter(|&&t| t >= 850).count() as f64 / ts.len() as f64;
        let plain = share(&noisy(&recipe));
        assert!(plain < 0.08, "{plain}");
        let extra = |p: f64| UnetOptions {
            extra_timesteps: Some((
                p,
                TimestepSampling::LogNormal {
                    mean: 3.0,
                    std: 0.5,
                },
            )),
            ..recipe.clone()
        };
        let all = share(&noisy(&extra(1.0)));
        assert!(all > 0.8, "{all}");
        let quarter = share(&noisy(&extra(0.25)));
        assert!(
            (quarter - (0.75 * plain + 0.25 * all)).abs() < 0.03,
            "{quarter}"
        );
        // The plain draws are those of the trainer before the option: one normal each.
        let mut rng = TrainRng::new(7);
        let first = (0.5 + 1.2 * rng.normal()).exp();
        assert_eq!(
            noisy(&recipe)[0],
            (sched.sigma_to_t(first).round() as usize).min(TRAIN_STEPS - 1)
        );
        Ok(())
    }

    /// The recipe's miniature U-Net, seeded into `map`, and inputs for it: two 8 × 8 samples,
    /// their timesteps and a random context.
    fn miniature_unet(map: &VarMap) -> Result<(UNet2DConditionModel, UNetConfig, [Tensor; 3])> {
        let dev = Device::Cpu;
        let recipe = Recipe::miniature();
        let cfg = UNetConfig::from_json(
            &serde_json::from_value(recipe.unet_config())?,
            Path::new("unet/config.json"),
        )?;
        let unet = UNet2DConditionModel::new(SeededInit::var_builder(map, 3, &dev), &cfg)?;
        let sample = Tensor::randn(0f32, 1.0, (2, cfg.in_channels, 8, 8), &dev)?;
        let t = Tensor::new(&[10f32, 900.0], &dev)?;
        let context = Tensor::randn(0f32, 1.0, (2, 5, recipe.text_hidden), &dev)?;
        Ok((unet, cfg, [sample, t, context]))
    }

    /// `zero_init` zeroes every resnet's conv2, every transformer's proj_out and conv_out of
    /// the recipe's U-Net, nothing else, and the fresh model then predicts exactly zero.
    #[test]
    fn zero_init_starts_residual_branches_at_zero() -> Result<()> {
        let map = VarMap::new();
        let (unet, _, [sample, t, context]) = miniature_unet(&map)?;
        zero_residual_outputs(&map)?;
        let (mut conv2, mut proj_out, mut others) = (0, 0, 0);
        for (name, var) in map.data().lock().unwrap().iter() {
            let max = var.as_tensor().abs()?.max_all()?.to_scalar::<f32>()?;
            if is_residual_output(name) {
                assert_eq!(max, 0.0, "{name} was not zeroed");
                conv2 += usize::from(name.contains(".conv2."));
                proj_out += usize::from(name.contains(".proj_out."));
            } else if name.ends_with("weight") && !name.contains("norm") {
                assert!(max > 0.0, "{name} was zeroed");
                others += 1;
            }
        }
        assert!(map.data().lock().unwrap().contains_key("conv_out.weight"));
        assert!(
            conv2 >= 2 && proj_out >= 2 && others > 10,
            "{conv2} {proj_out} {others}"
        );
        let out = unet.forward(&sample, &t, &context, None)?;
        assert_eq!(out.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    /// `forward_and_features` gives `forward`'s output, and the features `conv_out` reads on
    /// the latent's grid (what `--layout-head` is trained on).
    #[test]
    fn forward_and_features_is_forward_with_its_last_features() -> Result<()> {
        let map = VarMap::new();
        let (unet, cfg, [sample, t, context]) = miniature_unet(&map)?;
        let out = unet.forward(&sample, &t, &context, None)?;
        let (same, features) = unet.forward_and_features(&sample, &t, &context, None)?;
        let v = |x: &Tensor| x.flatten_all().and_then(|x| x.to_vec1::<f32>());
        assert_eq!(v(&out)?, v(&same)?);
        assert_eq!(features.dims(), [2, cfg.block_out_channels[0], 8, 8]);
        Ok(())
    }
}
