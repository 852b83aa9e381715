//! IP-Adapter (Ye et al. 2023): an image prompt. A CLIP image encoder's output is projected
//! into a few "image tokens" (base: a linear map and a LayerNorm of the image embedding; Plus:
//! a perceiver resampler over the encoder's penultimate hidden states), and every U-Net
//! cross-attention attends to them through its own key and value projections beside the
//! text's (decoupled cross-attention, [`crate::layers::attention::Attention::forward_ip`]).
//! Files in the original layout (`image_proj.…`, `ip_adapter.N.to_k_ip` / `to_v_ip`), as
//! diffusers' `load_ip_adapter` reads them; module paths here are those keys.

use crate::error::{Error, Result as ModelResult};
use crate::layers::linear::{linear, linear_no_bias, Linear};
use crate::layers::ops::LayerNorm;
use crate::unet::UNet2DConditionModel;
use crate::weights::{Checkpoint, Weights};
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{Module, VarBuilder};
use std::path::Path;

/// The base IP-Adapter's `ImageProjection`: the image embedding to `tokens` tokens.
#[derive(Debug, Clone)]
struct ImageProjection {
    proj: Linear,
    norm: LayerNorm,
    tokens: usize,
}

impl ImageProjection {
    fn forward(&self, embeds: &Tensor) -> Result<Tensor> {
        let b = embeds.dim(0)?;
        let x = self.proj.forward(embeds)?.reshape((b, self.tokens, ()))?;
        self.norm.forward(&x)
    }
}

/// One perceiver layer of the resampler: attention of the latents over the image features
/// and themselves, then a feed-forward, each added to the latents.
#[derive(Debug, Clone)]
struct PerceiverLayer {
    norm1: LayerNorm,
    norm2: LayerNorm,
    to_q: Linear,
    to_kv: Linear,
    to_out: Linear,
    heads: usize,
    ff_norm: LayerNorm,
    ff1: Linear,
    ff2: Linear,
}

impl PerceiverLayer {
    fn forward(&self, x: &Tensor, latents: &Tensor) -> Result<Tensor> {
        let x_n = self.norm1.forward(x)?;
        let l_n = self.norm2.forward(latents)?;
        let (b, len, _) = l_n.dims3()?;
        let q = self.to_q.forward(&l_n)?;
        let kv = self.to_kv.forward(&Tensor::cat(&[&x_n, &l_n], 1)?)?;
        let inner = q.dim(D::Minus1)?;
        let (k, v) = (kv.narrow(2, 0, inner)?, kv.narrow(2, inner, inner)?);
        let split = |t: &Tensor| crate::layers::attention::split_heads(t, self.heads);
        let dim_head = inner / self.heads;
        let out = crate::layers::attention::scaled_dot_product(
            &split(&q)?,
            &split(&k)?,
            &split(&v)?,
            1.0 / (dim_head as f64).sqrt(),
            None,
        )?;
        let out = crate::layers::attention::merge_heads(&out)?.reshape((b, len, inner))?;
        let latents = (self.to_out.forward(&out)? + latents)?;
        let h = self.ff2.forward(&crate::layers::gelu(
            &self.ff1.forward(&self.ff_norm.forward(&latents)?)?,
        )?)?;
        h + latents
    }
}

/// IP-Adapter Plus's `Resampler` (`IPAdapterPlusImageProjection`).
#[derive(Debug, Clone)]
struct Resampler {
    latents: Tensor,
    proj_in: Linear,
    layers: Vec<PerceiverLayer>,
    proj_out: Linear,
    norm_out: LayerNorm,
}

impl Resampler {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        let mut latents = self.latents.repeat((b, 1, 1))?;
        let x = self.proj_in.forward(x)?;
        for layer in &self.layers {
            latents = layer.forward(&x, &latents)?;
        }
        self.norm_out.forward(&self.proj_out.forward(&latents)?)
    }
}

/// Which image projection a file holds, and so what of the image encoder it reads.
#[derive(Debug, Clone)]
enum Projection {
    /// The projected image embedding.
    Base(ImageProjection),
    /// The encoder's penultimate hidden states.
    Plus(Resampler),
}

/// An IP-Adapter file's image projection (its decoupled key/value projections go into the
/// U-Net: [`IpAdapter::load`]).
#[derive(Debug, Clone)]
pub struct IpAdapter {
    projection: Projection,
}

/// The width of tensor `key`'s dimension `dim` in `ckpt`.
fn width(ckpt: &Checkpoint, key: &str, dim: usize) -> Option<usize> {
    ckpt.tensors().get(key)?.shape.get(dim).copied()
}

impl IpAdapter {
    /// Reads an IP-Adapter file (original layout) and gives `unet`'s cross-attention layers
    /// their `to_k_ip` / `to_v_ip` in the order the file numbers them. The file is checked
    /// whole first: its kind (base or Plus), one projection pair per cross-attention layer of
    /// the right widths, and no tensor left unused.
    pub fn load(
        file: &Path,
        unet: &mut UNet2DConditionModel,
        dtype: DType,
        device: &Device,
    ) -> ModelResult<Self> {
        let weights = Weights::new(Checkpoint::open_file(file)?);
        let ckpt = weights.checkpoint();
        let bad = |msg: String| Error::Checkpoint {
            path: file.to_path_buf(),
            msg,
        };
        let vb = weights.var_builder(dtype, device);
        let p = vb.pp("image_proj");
        let projection = if ckpt.tensors().contains_key("image_proj.latents") {
            let dim = width(ckpt, "image_proj.latents", 2).unwrap_or(0);
            let queries = width(ckpt, "image_proj.latents", 1).unwrap_or(0);
            let embed = width(ckpt, "image_proj.proj_in.weight", 1).unwrap_or(0);
            let out = width(ckpt, "image_proj.proj_out.weight", 0).unwrap_or(0);
            let inner = width(ckpt, "image_proj.layers.0.0.to_q.weight", 0).unwrap_or(0);
            let ff = width(ckpt, "image_proj.layers.0.1.1.weight", 0).unwrap_or(0);
            let depth = (0..)
                .take_while(|i| {
                    ckpt.tensors()
                        .contains_key(&format!("image_proj.layers.{i}.0.to_q.weight"))
                })
                .count();
            // diffusers takes 64-wide heads (`_convert_ip_adapter_image_proj_to_diffusers`).
            let heads = inner / 64;
            if depth == 0 || heads == 0 || !inner.is_multiple_of(64) {
                return Err(bad(format!(
                    "an IP-Adapter Plus resampler of {depth} layers {inner} wide: not 64-wide heads"
                )));
            }
            let ln = |vb: VarBuilder, d| crate::layers::ops::layer_norm(d, 1e-5, vb);
            let layer = |i: usize| -> Result<PerceiverLayer> {
                let l = p.pp("layers").pp(i);
                let (a, f) = (l.pp(0), l.pp(1));
                Ok(PerceiverLayer {
                    norm1: ln(a.pp("norm1"), dim)?,
                    norm2: ln(a.pp("norm2"), dim)?,
                    to_q: linear_no_bias(dim, inner, a.pp("to_q"))?,
                    to_kv: linear_no_bias(dim, 2 * inner, a.pp("to_kv"))?,
                    to_out: linear_no_bias(inner, dim, a.pp("to_out"))?,
                    heads,
                    ff_norm: ln(f.pp(0), dim)?,
                    ff1: linear_no_bias(dim, ff, f.pp(1))?,
                    ff2: linear_no_bias(ff, dim, f.pp(3))?,
                })
            };
            let build = || -> Result<Resampler> {
                Ok(Resampler {
                    latents: p.get((1, queries, dim), "latents")?,
                    proj_in: linear(embed, dim, p.pp("proj_in"))?,
                    layers: (0..depth).map(layer).collect::<Result<_>>()?,
                    proj_out: linear(dim, out, p.pp("proj_out"))?,
                    norm_out: ln(p.pp("norm_out"), out)?,
                })
            };
            Projection::Plus(build().map_err(|e| bad(format!("its resampler: {e}")))?)
        } else if ckpt.tensors().contains_key("image_proj.proj.weight") {
            let cross = width(ckpt, "image_proj.norm.weight", 0).unwrap_or(0);
            let rows = width(ckpt, "image_proj.proj.weight", 0).unwrap_or(0);
            let embed = width(ckpt, "image_proj.proj.weight", 1).unwrap_or(0);
            if cross == 0 || !rows.is_multiple_of(cross) {
                return Err(bad(format!(
                    "an image projection of {rows} rows for {cross}-wide tokens"
                )));
            }
            let build = || -> Result<ImageProjection> {
                Ok(ImageProjection {
                    proj: linear(embed, rows, p.pp("proj"))?,
                    norm: crate::layers::ops::layer_norm(cross, 1e-5, p.pp("norm"))?,
                    tokens: rows / cross,
                })
            };
            Projection::Base(build().map_err(|e| bad(format!("its projection: {e}")))?)
        } else {
            return Err(bad(
                "not an IP-Adapter this loader knows (base `image_proj.proj` or Plus \
                 `image_proj.latents`; FaceID and full-face variants are not supported)"
                    .into(),
            ));
        };
        // The decoupled projections, by their number.
        let mut ids: Vec<usize> = ckpt
            .tensors()
            .keys()
            .filter_map(|k| {
                k.strip_prefix("ip_adapter.")?
                    .strip_suffix(".to_k_ip.weight")?
                    .parse()
                    .ok()
            })
            .collect();
        ids.sort_unstable();
        let layers = unet.cross_attentions_mut();
        if ids.len() != layers.len() {
            return Err(bad(format!(
                "{} IP projection pairs for a U-Net with {} cross-attention layers",
                ids.len(),
                layers.len()
            )));
        }
        let mut pairs = Vec::with_capacity(ids.len());
        for (&id, attn) in ids.iter().zip(&layers) {
            let (cross, inner) = attn.ip_shape();
            let l = vb.pp("ip_adapter").pp(id);
            let pair = (|| -> Result<(Linear, Linear)> {
                Ok((
                    linear_no_bias(cross, inner, l.pp("to_k_ip"))?,
                    linear_no_bias(cross, inner, l.pp("to_v_ip"))?,
                ))
            })()
            .map_err(|e| bad(format!("ip_adapter.{id}: {e}")))?;
            pairs.push(pair);
        }
        let unused = weights.unused();
        if !unused.is_empty() {
            return Err(bad(format!(
                "{} tensors no part of the IP-Adapter uses ({} …)",
                unused.len(),
                unused[0]
            )));
        }
        for (attn, (k, v)) in layers.into_iter().zip(pairs) {
            attn.set_ip(k, v);
        }
        Ok(Self { projection })
    }

    /// Whether it reads the encoder's penultimate hidden states (Plus) rather than the image
    /// embedding (base).
    pub fn uses_hidden_states(&self) -> bool {
        matches!(self.projection, Projection::Plus(_))
    }

    /// The image tokens `[B, N, cross_attention_dim]` of what the encoder gave: `[B, P]`
    /// embeddings (base) or `[B, 1 + patches, D]` hidden states (Plus).
    pub fn project(&self, encoded: &Tensor) -> Result<Tensor> {
        match &self.projection {
            Projection::Base(p) => p.forward(encoded),
            Projection::Plus(r) => r.forward(encoded),
        }
    }
}
