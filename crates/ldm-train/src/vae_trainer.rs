//! Training the KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, §3 and
//! appendix G): L1 reconstruction plus a small KL term towards the standard normal, computed as
//! the LDM code does (sums over pixels per image, KL weight 1e-6), divided by the pixel count so
//! that the learning rate reads as for a mean loss. Reports PSNR on held-out scenes and sets the
//! latent scaling factor to 1/std of the latents, as Stable Diffusion's 0.18215 was chosen.
//! Optionally, after a warm-up, the patch-based adversarial loss with its adaptive weight
//! ([`crate::discriminator`]), and the LPIPS perceptual term ([`crate::lpips`]) when its
//! weights are supplied.

use crate::checkpoint::{self, LogRow};
use crate::component::{named_vars, strip, write_component, InitScheme, SeededInit};
use crate::data::{batch, psnr, to_bytes};
use crate::discriminator::{generator_loss, hinge_d_loss, PatchDiscriminator};
use crate::lpips::Lpips;
use crate::noise::TrainRng;
use crate::optim::{clip_grad_norm, warmup_cosine, AdamW, AdamWConfig};
use crate::recipe::Recipe;
use crate::{Error, Progress, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use ldm_models::vae::{AutoencoderKL, VaeConfig};
use std::path::{Path, PathBuf};

/// Options of `ldm train vae`.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeOptions {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub warmup: usize,
    pub kl_weight: f64,
    pub seed: u64,
    /// Held-out scenes (drawn with `seed + 1`) for PSNR.
    pub held_out: usize,
    pub checkpoint_every: usize,
    pub grad_clip: f64,
    /// Train on random square crops of this side (a multiple of the downsampling factor): the
    /// network is convolutional, so crops teach it the same local statistics at a fraction of
    /// the cost. `None` trains on whole images.
    pub crop: Option<usize>,
    /// The adversarial loss: off (`None`) or switched on at this step, after the reconstruction
    /// warm-up, as in the paper.
    pub disc_start: Option<usize>,
    /// Scale of the adaptive adversarial weight.
    pub disc_weight: f64,
    /// Width of the patch discriminator's first layer.
    pub disc_width: usize,
    /// LPIPS weights (the `lpips` package's VGG state dict as safetensors): adds the
    /// perceptual distance to the reconstruction loss, as latent diffusion's autoencoders do.
    pub lpips: Option<PathBuf>,
    /// Weight of the LPIPS term (the paper's `perceptual_weight`).
    pub lpips_weight: f64,
    /// How fresh weights are drawn (the autoencoder's and the discriminator's).
    pub init: InitScheme,
}

impl Default for VaeOptions {
    fn default() -> Self {
        Self {
            steps: 800,
            batch: 8,
            lr: 1e-3,
            warmup: 50,
            kl_weight: 1e-6,
            seed: 0,
            held_out: 64,
            checkpoint_every: 100,
            grad_clip: 1.0,
            crop: Some(32),
            disc_start: None,
            disc_weight: 0.5,
            disc_width: 32,
            lpips: None,
            lpips_weight: 1.0,
            init: InitScheme::Torch,
        }
    }
}

/// What a finished autoencoder run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeReport {
    pub psnr: f64,
    /// Mean held-out LPIPS, when LPIPS weights were given.
    pub lpips: Option<f64>,
    pub scaling_factor: f64,
    pub final_loss: f64,
    pub steps: usize,
}

fn vae_config(recipe: &Recipe, scaling: f64) -> Result<VaeConfig> {
    Ok(VaeConfig::from_json(
        &serde_json::from_value(recipe.vae_config(scaling))?,
        Path::new("vae/config.json"),
    )?)
}

/// Trains the autoencoder and writes `out/vae` (diffusers layout) and `out/vae-train`
/// (checkpoint and losses). Resumes from `out/vae-train` when it holds a checkpoint.
pub fn train_vae(
    recipe: &Recipe,
    opts: &VaeOptions,
    out: &Path,
    device: &Device,
    progress: &mut dyn FnMut(&Progress),
) -> Result<VaeReport> {
    let lpips = opts
        .lpips
        .as_deref()
        .map(|p| Lpips::load(p, device))
        .transpose()?;
    let varmap = VarMap::new();
    let vb = SeededInit::var_builder_with(&varmap, opts.seed, opts.init, device);
    let vae = AutoencoderKL::new(vb, &vae_config(recipe, 1.0)?)?;
    let params = named_vars(&varmap, "");
    let mut opt = AdamW::new(params.clone(), AdamWConfig::default())?;
    // The discriminator and its optimiser (Adam with β = (0.5, 0.9), as in the paper's code).
    let disc_map = VarMap::new();
    let disc = match opts.disc_start {
        Some(_) => Some(PatchDiscriminator::new(
            SeededInit::var_builder_with(&disc_map, opts.seed.wrapping_add(7), opts.init, device),
            3,
            opts.disc_width,
            3,
        )?),
        None => None,
    };
    let disc_params = named_vars(&disc_map, "discriminator.");
    let disc_cfg = AdamWConfig {
        beta1: 0.5,
        beta2: 0.9,
        weight_decay: 0.0,
        ..AdamWConfig::default()
    };
    let mut disc_opt = AdamW::new(disc_params.clone(), disc_cfg)?;
    let last_layer = params
        .iter()
        .find(|(n, _)| n == "decoder.conv_out.weight")
        .map(|(_, v)| v.clone())
        .ok_or_else(|| Error::Msg("the decoder has no conv_out".into()))?;
    let state_dir = out.join("vae-train");
    let resumed = if disc.is_some() {
        checkpoint::resume(&state_dir, &mut [&mut opt, &mut disc_opt], None, device)?
    } else {
        checkpoint::resume(&state_dir, &mut [&mut opt], None, device)?
    };
    let (mut step, mut rng, mut history) = match resumed {
        Some(r) => (r.step, r.rng, r.history),
        None => (0, TrainRng::new(opts.seed), Vec::new()),
    };
    let s = recipe.image_size;
    let side = opts.crop.map_or(s, |c| c.min(s));
    let pixels = (3 * side * side) as f64;
    while step < opts.steps {
        let start = (step * opts.batch) as u64;
        let (x, _) = batch(opts.seed, start..start + opts.batch as u64, s, device)?;
        let x = match opts.crop {
            Some(c) if c < s => {
                let f = recipe.downsample_factor();
                let slots = (s - c) / f + 1;
                let (dy, dx) = (rng.below(slots) * f, rng.below(slots) * f);
                x.narrow(2, dy, c)?.narrow(3, dx, c)?.contiguous()?
            }
            _ => x,
        };
        let posterior = vae.encode(&x)?;
        let eps = rng.randn(posterior.mean.dims(), device)?;
        let recon = vae.decode(&posterior.sample(&eps)?)?;
        let mut rec = (&recon - &x)?.abs()?.mean_all()?;
        if let Some(net) = &lpips {
            rec = (rec + (net.forward(&x, &recon)?.mean_all()? * opts.lpips_weight)?)?;
        }
        let kl = (posterior.kl()?.mean_all()? * (opts.kl_weight / pixels))?;
        let nll = (&rec + kl)?;
        let mut grads = nll.backward()?;
        let mut loss = nll.to_scalar::<f32>()? as f64;
        let lr = warmup_cosine(step, opts.lr, opts.warmup, opts.steps, 0.1);
        let adversarial = opts.disc_start.is_some_and(|start| step >= start);
        if let (Some(d), true) = (&disc, adversarial) {
            // The autoencoder's adversarial term, weighted adaptively (Esser et al. 2021,
            // eq. 7): ‖∇_L nll‖ / ‖∇_L g‖ at the decoder's last layer L.
            let g_loss = generator_loss(&d.forward(&recon)?)?;
            let g_grads = g_loss.backward()?;
            let norm_of = |g: Option<&Tensor>| -> Result<f64> {
                Ok(match g {
                    Some(g) => g.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64,
                    None => 0.0,
                })
            };
            let n_rec = norm_of(grads.get(last_layer.as_tensor()))?;
            let n_g = norm_of(g_grads.get(last_layer.as_tensor()))?;
            let weight = (n_rec / (n_g + 1e-4)).clamp(0.0, 1e4) * opts.disc_weight;
            for (_, p) in &params {
                if let Some(gg) = g_grads.get(p.as_tensor()) {
                    let total = match grads.remove(p.as_tensor()) {
                        Some(g) => (g + (gg * weight)?)?,
                        None => (gg * weight)?,
                    };
                    grads.insert(p.as_tensor(), total);
                }
            }
            loss += weight * g_loss.to_scalar::<f32>()? as f64;
            // The discriminator's step on real images and the detached reconstructions.
            let real = d.forward(&x)?;
            let fake = d.forward(&recon.detach())?;
            let mut d_grads = hinge_d_loss(&real, &fake)?.backward()?;
            clip_grad_norm(&mut d_grads, &disc_params, opts.grad_clip)?;
            disc_opt.step(&d_grads, lr)?;
        }
        let grad_norm = clip_grad_norm(&mut grads, &params, opts.grad_clip)?;
        opt.step(&grads, lr)?;
        step += 1;
        checkpoint::record(
            &mut history,
            progress,
            "vae",
            opts.steps,
            LogRow {
                step,
                loss,
                lr,
                grad_norm,
            },
        );
        if step % opts.checkpoint_every == 0 || step == opts.steps {
            let opts_saved: Vec<&AdamW> = if disc.is_some() {
                vec![&opt, &disc_opt]
            } else {
                vec![&opt]
            };
            checkpoint::save(&state_dir, step, &opts_saved, None, &rng, &history)?;
        }
    }
    // Held-out PSNR of the posterior mean's reconstruction, and the latents' spread.
    let mut psnrs = Vec::new();
    let mut distances = Vec::new();
    let mut latents = Vec::new();
    let chunk = 16;
    for first in (0..opts.held_out).step_by(chunk) {
        let n = chunk.min(opts.held_out - first) as u64;
        let (x, _) = batch(opts.seed + 1, first as u64..first as u64 + n, s, device)?;
        let posterior = vae.encode(&x)?;
        let recon = vae.decode(&posterior.mean)?;
        for (a, b) in to_bytes(&x)?.iter().zip(to_bytes(&recon)?) {
            psnrs.push(psnr(a, &b));
        }
        if let Some(net) = &lpips {
            distances.extend(net.forward(&x, &recon)?.to_vec1::<f32>()?);
        }
        let eps = rng.randn(posterior.mean.dims(), device)?;
        latents.push(posterior.sample(&eps)?.flatten_all()?);
    }
    let all = Tensor::cat(&latents, 0)?;
    let mean = all.mean_all()?.to_scalar::<f32>()? as f64;
    let var = (all - mean)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
    let scaling_factor = 1.0 / var.sqrt().max(1e-6);
    let values: Vec<Tensor> = params.iter().map(|(_, v)| v.as_tensor().clone()).collect();
    write_component(
        &out.join("vae"),
        &recipe.vae_config(scaling_factor),
        "diffusion_pytorch_model.safetensors",
        &strip(&params, &values, ""),
        DType::F32,
    )?;
    let psnr = psnrs.iter().sum::<f64>() / psnrs.len().max(1) as f64;
    let lpips = (!distances.is_empty())
        .then(|| distances.iter().map(|&d| d as f64).sum::<f64>() / distances.len() as f64);
    Ok(VaeReport {
        psnr,
        lpips,
        scaling_factor,
        final_loss: history.last().map_or(f64::NAN, |r| r.loss),
        steps: step,
    })
}
