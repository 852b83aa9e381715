//! Training the KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, §3 and
//! appendix G): L1 reconstruction plus a small KL term towards the standard normal, computed as
//! the LDM code does (sums over pixels per image, KL weight 1e-6), divided by the pixel count so
//! that the learning rate reads as for a mean loss. Reports PSNR on held-out scenes and sets the
//! latent scaling factor to 1/std of the latents, as Stable Diffusion's 0.18215 was chosen.
//! Optionally, after a warm-up, the patch-based adversarial loss with its adaptive weight
//! ([`crate::discriminator`]), and the LPIPS perceptual term ([`crate::lpips`]) when its
//! weights are supplied.

use crate::checkpoint::TrainingState;
use crate::component::{
    named_vars, set_from_folder, strip, write_component, InitScheme, SeededInit,
};
use crate::data::batch;
use crate::discriminator::{generator_loss, hinge_d_loss, PatchDiscriminator};
use crate::eval::{round_trip, RoundTrip, HELD_OUT_SEED};
use crate::io::write_atomic;
use crate::lpips::Lpips;
use crate::optim::{clip_grad_norm, warmup_cosine, AdamW, AdamWConfig};
use crate::parallel::{add_grads, on_shards, shard_ranges, sharded_loss_and_grads};
use crate::recipe::Recipe;
use crate::{Error, Progress, Result};
use candle_core::backprop::GradStore;
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
    /// Held-out scenes ([`crate::eval::HELD_OUT_SEED`]) round-tripped and read back at each
    /// checkpoint (logged in `vae-train/readback.csv`), and for the latents' spread.
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
    /// Parts of each batch computed in parallel, one thread each (the gradient is the same for
    /// any number); one per core by default.
    pub shards: usize,
    /// Start from the autoencoder in this folder and train only its decoder: the encoder, its
    /// latents and the scaling factor stay as they are, so a U-Net trained on them stays valid
    /// (how Stability's `sd-vae-ft-mse` decoder was made). The folder's architecture replaces
    /// the recipe's.
    pub finetune_decoder: Option<PathBuf>,
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
            shards: crate::parallel::cores(),
            finetune_decoder: None,
        }
    }
}

/// Whether an autoencoder variable belongs to the decoder side (what
/// [`VaeOptions::finetune_decoder`] trains).
fn is_decoder_side(name: &str) -> bool {
    name.starts_with("decoder.") || name.starts_with("post_quant_conv.")
}

/// What a finished autoencoder run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeReport {
    /// The held-out round trip read back (with its PSNR).
    pub readback: RoundTrip,
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
    // The architecture: the recipe's, or the fine-tuned autoencoder's own (its config as
    // written, scaling factor included).
    let start_config: Option<serde_json::Value> = match &opts.finetune_decoder {
        Some(dir) => Some(serde_json::from_slice(
            &std::fs::read(dir.join("config.json")).map_err(|e| {
                Error::Msg(format!(
                    "{}: not an autoencoder folder ({e})",
                    dir.display()
                ))
            })?,
        )?),
        None => None,
    };
    let config = match (&start_config, &opts.finetune_decoder) {
        (Some(json), Some(dir)) => VaeConfig::from_json(
            &serde_json::from_value(json.clone())?,
            &dir.join("config.json"),
        )?,
        _ => vae_config(recipe, 1.0)?,
    };
    let varmap = VarMap::new();
    let vb = SeededInit::var_builder_with(&varmap, opts.seed, opts.init, device);
    let vae = AutoencoderKL::new(vb, &config)?;
    let mut params = named_vars(&varmap, "");
    if let Some(dir) = &opts.finetune_decoder {
        let missing = set_from_folder(&params, dir, device)?;
        if !missing.is_empty() {
            return Err(Error::Msg(format!(
                "{}: lacks {} of the autoencoder's tensors ({})",
                dir.display(),
                missing.len(),
                missing[0]
            )));
        }
        params.retain(|(n, _)| is_decoder_side(n));
    }
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
    let mut state = {
        let mut restored: Vec<&mut AdamW> = vec![&mut opt];
        if disc.is_some() {
            restored.push(&mut disc_opt);
        }
        TrainingState::resume_or_start(
            &out.join("vae-train"),
            opts.checkpoint_every,
            "vae",
            opts.steps,
            opts.seed,
            &mut restored,
            None,
            device,
        )?
    };
    let mut readbacks = ReadbackLog::resume(&state.dir().join("readback.csv"), state.step)?;
    let s = recipe.image_size;
    let factor = config.downsample_factor();
    let side = opts.crop.map_or(s, |c| c.min(s));
    if !side.is_multiple_of(factor) {
        return Err(Error::Msg(format!(
            "crop {side} is not a multiple of the autoencoder's factor {factor}"
        )));
    }
    let pixels = (3 * side * side) as f64;
    let frozen_encoder = opts.finetune_decoder.is_some();
    while state.step < opts.steps {
        let (step, rng) = (state.step, &mut state.rng);
        let start = (step * opts.batch) as u64;
        let (x, _) = batch(opts.seed, start..start + opts.batch as u64, s, device)?;
        let x = match opts.crop {
            Some(c) if c < s => {
                let f = factor;
                let slots = (s - c) / f + 1;
                let (dy, dx) = (rng.below(slots) * f, rng.below(slots) * f);
                x.narrow(2, dy, c)?.narrow(3, dx, c)?.contiguous()?
            }
            _ => x,
        };
        let b = opts.batch;
        let latent_side = side / factor;
        let eps = rng.randn(
            &[b, config.latent_channels, latent_side, latent_side],
            device,
        )?;
        let lr = warmup_cosine(step, opts.lr, opts.warmup, opts.steps, 0.1);
        let adversarial = disc
            .as_ref()
            .filter(|_| opts.disc_start.is_some_and(|at| step >= at));
        // Each shard of the batch forward and backward on its own thread; its losses are its
        // part of the batch means, so the summed gradients are the whole batch's.
        let shards = on_shards(&shard_ranges(b, opts.shards), |r| {
            let n = r.len();
            let x = x.narrow(0, r.start, n)?;
            let posterior = vae.encode(&x)?;
            let z = posterior.sample(&eps.narrow(0, r.start, n)?)?;
            // A frozen encoder: no gradient flows into it, and its KL term is a constant.
            let z = if frozen_encoder { z.detach() } else { z };
            let recon = vae.decode(&z)?;
            let part = n as f64 / b as f64;
            let mut nll = ((&recon - &x)?.abs()?.mean_all()? * part)?;
            if let Some(net) = &lpips {
                let d = net.forward(&x, &recon)?.sum_all()?;
                nll = (nll + (d * (opts.lpips_weight / b as f64))?)?;
            }
            if !frozen_encoder {
                let kl = posterior.kl()?.sum_all()?;
                nll = (nll + (kl * (opts.kl_weight / pixels / b as f64))?)?;
            }
            let grads = nll.backward()?;
            let adv = match adversarial {
                Some(d) => {
                    let g = (generator_loss(&d.forward(&recon)?)? * part)?;
                    Some((g.to_scalar::<f32>()? as f64, g.backward()?))
                }
                None => None,
            };
            Ok(Shard {
                nll: nll.to_scalar::<f32>()? as f64,
                grads,
                adv,
                recon: recon.detach(),
            })
        })?;
        let mut shards = shards.into_iter();
        let first = shards
            .next()
            .ok_or_else(|| Error::Msg("an empty batch".into()))?;
        let (mut loss, mut grads, mut adv) = (first.nll, first.grads, first.adv);
        let mut recons = vec![first.recon];
        for sh in shards {
            loss += sh.nll;
            add_grads(&mut grads, &sh.grads, &params)?;
            if let (Some(acc), Some((g, g_grads))) = (adv.as_mut(), sh.adv) {
                acc.0 += g;
                add_grads(&mut acc.1, &g_grads, &params)?;
            }
            recons.push(sh.recon);
        }
        if let (Some(d), Some((g_loss, g_grads))) = (adversarial, adv) {
            // The autoencoder's adversarial term, weighted adaptively (Esser et al. 2021,
            // eq. 7): ‖∇_L nll‖ / ‖∇_L g‖ at the decoder's last layer L.
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
            loss += weight * g_loss;
            // The discriminator's step on real images and the detached reconstructions.
            let recon = Tensor::cat(&recons, 0)?;
            let (_, mut d_grads) = sharded_loss_and_grads(opts.shards, b, &disc_params, |r| {
                let n = r.len();
                let real = d.forward(&x.narrow(0, r.start, n)?)?;
                let fake = d.forward(&recon.narrow(0, r.start, n)?)?;
                Ok((hinge_d_loss(&real, &fake)? * (n as f64 / b as f64))?)
            })?;
            clip_grad_norm(&mut d_grads, &disc_params, opts.grad_clip)?;
            disc_opt.step(&d_grads, lr)?;
        }
        let grad_norm = clip_grad_norm(&mut grads, &params, opts.grad_clip)?;
        opt.step(&grads, lr)?;
        state.record(loss, lr, grad_norm, progress);
        if state.checkpoint_due() {
            let mut saved = vec![&opt];
            if disc.is_some() {
                saved.push(&disc_opt);
            }
            // The read-back row first: the checkpoint is the commit point, and a resumed run
            // keeps the rows up to its step.
            let r = round_trip(&vae, opts.held_out, s, device, &mut |_, _| {})?;
            let note = readbacks.push(state.step, &r)?;
            state.save(&saved, None)?;
            state.log.note(note, progress);
        }
    }
    let readback = match readbacks.last {
        Some((at, r)) if at == state.step => r,
        _ => round_trip(&vae, opts.held_out, s, device, &mut |_, _| {})?,
    };
    // The latents' spread (for the scaling factor) and LPIPS, on the held-out scenes.
    let mut distances = Vec::new();
    let mut latents = Vec::new();
    let chunk = 16;
    for first in (0..opts.held_out).step_by(chunk) {
        let n = chunk.min(opts.held_out - first) as u64;
        let (x, _) = batch(HELD_OUT_SEED, first as u64..first as u64 + n, s, device)?;
        let posterior = vae.encode(&x)?;
        if let Some(net) = &lpips {
            let recon = vae.decode(&posterior.mean)?;
            distances.extend(net.forward(&x, &recon)?.to_vec1::<f32>()?);
        }
        let eps = state.rng.randn(posterior.mean.dims(), device)?;
        latents.push(posterior.sample(&eps)?.flatten_all()?);
    }
    let all = Tensor::cat(&latents, 0)?;
    let mean = all.mean_all()?.to_scalar::<f32>()? as f64;
    let var = (all - mean)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
    // A fine-tuned decoder keeps its encoder's latents, so the scaling factor it was trained
    // with stays.
    let (scaling_factor, written_config) = match start_config {
        Some(json) => (config.scaling_factor, json),
        None => {
            let f = 1.0 / var.sqrt().max(1e-6);
            (f, recipe.vae_config(f))
        }
    };
    let all_params = named_vars(&varmap, "");
    let values: Vec<Tensor> = all_params
        .iter()
        .map(|(_, v)| v.as_tensor().clone())
        .collect();
    write_component(
        &out.join("vae"),
        &written_config,
        "diffusion_pytorch_model.safetensors",
        &strip(&all_params, &values, ""),
        DType::F32,
    )?;
    let lpips = (!distances.is_empty())
        .then(|| distances.iter().map(|&d| d as f64).sum::<f64>() / distances.len() as f64);
    Ok(VaeReport {
        readback,
        lpips,
        scaling_factor,
        final_loss: state.log.final_loss(),
        steps: state.step,
    })
}

/// One shard's part of an autoencoder step.
struct Shard {
    nll: f64,
    grads: GradStore,
    /// The adversarial term and its gradients, once the discriminator is on.
    adv: Option<(f64, GradStore)>,
    recon: Tensor,
}

/// The held-out read-back at each checkpoint: `vae-train/readback.csv`, rewritten whole
/// (atomically) at each checkpoint; a resumed run keeps the rows up to its step.
struct ReadbackLog {
    path: PathBuf,
    rows: Vec<String>,
    last: Option<(usize, RoundTrip)>,
}

const READBACK_HEADER: &str = "step,psnr,one_exact,two_exact,one_shape,two_shape,\
one_exact_caption,two_exact_caption";

impl ReadbackLog {
    fn resume(path: &Path, step: usize) -> Result<Self> {
        let rows = match std::fs::read_to_string(path) {
            Ok(text) => text
                .lines()
                .skip(1)
                .filter(|l| {
                    l.split(',')
                        .next()
                        .and_then(|v| v.parse::<usize>().ok())
                        .is_some_and(|at| at <= step)
                })
                .map(String::from)
                .collect(),
            Err(_) => Vec::new(),
        };
        Ok(Self {
            path: path.to_path_buf(),
            rows,
            last: None,
        })
    }

    /// Logs `r` at `step`; returns the line for the progress log.
    fn push(&mut self, step: usize, r: &RoundTrip) -> Result<String> {
        let rate = |(m, n): (usize, usize)| m as f64 / n.max(1) as f64;
        let (one, two) = (&r.drawn.one, &r.drawn.two);
        let values = [
            rate((one.exact, one.images)),
            rate((two.exact, two.images)),
            rate(one.attributes[0]),
            rate(two.attributes[0]),
            rate((r.caption.one.exact, r.caption.one.images)),
            rate((r.caption.two.exact, r.caption.two.images)),
        ];
        let mut row = format!("{step},{:.3}", r.psnr);
        for v in values {
            row += &format!(",{v:.4}");
        }
        self.rows.push(row);
        let text = std::iter::once(READBACK_HEADER.to_string())
            .chain(self.rows.iter().cloned())
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        write_atomic(&self.path, text.as_bytes())?;
        self.last = Some((step, r.clone()));
        Ok(format!(
            "held-out read-back (everything drawn): exact {:.1} % one object, {:.1} % two; \
             shape {:.1} / {:.1} %; PSNR {:.2} dB",
            100.0 * values[0],
            100.0 * values[1],
            100.0 * values[2],
            100.0 * values[3],
            r.psnr
        ))
    }
}
