//! The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, §3 and appendix G;
//! diffusers' `AutoencoderKL`): a convolutional encoder to a diagonal Gaussian posterior over
//! latents, and a decoder back to pixels. Latents are scaled by the config's `scaling_factor`
//! (and shifted by `shift_factor`) before the U-Net sees them.

pub mod config;
mod tiled;
pub mod tiny;

pub use config::VaeConfig;
pub use tiny::{AutoencoderTiny, AutoencoderTinyConfig};

use crate::layers::attention::Attention;
use crate::layers::conv2d;
use crate::layers::norm::GroupNorm;
use crate::layers::resnet::{ResnetBlock2D, ResnetConfig};
use crate::layers::sampling::{Downsample2D, Upsample2D};
use crate::layers::Conv2d;
use candle_core::{Result, Tensor, D};
use candle_nn::{Module, VarBuilder};

/// GroupNorm epsilon of every autoencoder norm.
const EPS: f64 = 1e-6;

fn resnet(vb: VarBuilder, cfg: &VaeConfig, in_ch: usize, out_ch: usize) -> Result<ResnetBlock2D> {
    ResnetBlock2D::new(
        vb,
        ResnetConfig {
            in_channels: in_ch,
            out_channels: out_ch,
            temb_channels: None,
            groups: cfg.norm_num_groups,
            eps: EPS,
            output_scale_factor: 1.0,
        },
    )
}

/// Single-head spatial self-attention with its own GroupNorm and a residual connection.
#[derive(Debug, Clone)]
struct SpatialSelfAttention {
    group_norm: GroupNorm,
    attention: Attention,
    channels: usize,
}

impl SpatialSelfAttention {
    fn new(vb: VarBuilder, cfg: &VaeConfig, channels: usize) -> Result<Self> {
        Ok(Self {
            group_norm: crate::layers::norm::group_norm(
                cfg.norm_num_groups,
                channels,
                EPS,
                vb.pp("group_norm"),
            )?,
            attention: Attention::new(vb, channels, None, 1, channels, true)?,
            channels,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?; // [B, HW, C]
        let out = self.attention.forward(&tokens, None)?;
        let out = out.transpose(1, 2)?.reshape((b, self.channels, h, w))?;
        out + x
    }
}

/// `UNetMidBlock2D`: ResNet, (attention, ResNet).
#[derive(Debug, Clone)]
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attention: Option<SpatialSelfAttention>,
}

impl MidBlock {
    fn new(vb: VarBuilder, cfg: &VaeConfig, channels: usize) -> Result<Self> {
        let resnets = (0..2)
            .map(|i| resnet(vb.pp("resnets").pp(i), cfg, channels, channels))
            .collect::<Result<Vec<_>>>()?;
        let attention = if cfg.mid_block_add_attention {
            Some(SpatialSelfAttention::new(
                vb.pp("attentions").pp(0),
                cfg,
                channels,
            )?)
        } else {
            None
        };
        Ok(Self { resnets, attention })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.resnets[0].forward(x, None)?;
        if let Some(attn) = &self.attention {
            x = attn.forward(&x)?;
        }
        self.resnets[1].forward(&x, None)
    }
}

/// `DownEncoderBlock2D` / `UpDecoderBlock2D`: ResNets then an optional resampler.
#[derive(Debug, Clone)]
struct ResnetStack {
    resnets: Vec<ResnetBlock2D>,
    down: Option<Downsample2D>,
    up: Option<Upsample2D>,
}

impl ResnetStack {
    fn forward(&self, mut x: Tensor) -> Result<Tensor> {
        for r in &self.resnets {
            x = r.forward(&x, None)?;
        }
        if let Some(d) = &self.down {
            x = d.forward(&x)?;
        }
        if let Some(u) = &self.up {
            x = u.forward(&x, None)?;
        }
        Ok(x)
    }
}

/// Pixels `[B, 3, H, W]` → posterior moments `[B, 2·latent, H/f, W/f]`.
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<ResnetStack>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let conv_in = conv2d(vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?;
        let mut down_blocks = Vec::with_capacity(ch.len());
        let mut out_ch = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(i);
            let in_ch = out_ch;
            out_ch = c;
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let cin = if j == 0 { in_ch } else { out_ch };
                    resnet(vb.pp("resnets").pp(j), cfg, cin, out_ch)
                })
                .collect::<Result<Vec<_>>>()?;
            let down = if i + 1 < ch.len() {
                Some(Downsample2D::new(
                    vb.pp("downsamplers").pp(0),
                    out_ch,
                    out_ch,
                    0,
                )?)
            } else {
                None
            };
            down_blocks.push(ResnetStack {
                resnets,
                down,
                up: None,
            });
        }
        let last = ch[ch.len() - 1];
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: MidBlock::new(vb.pp("mid_block"), cfg, last)?,
            conv_norm_out: crate::layers::norm::group_norm(
                cfg.norm_num_groups,
                last,
                EPS,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv2d(vb.pp("conv_out"), last, 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for b in &self.down_blocks {
            x = b.forward(x)?;
        }
        let x = self.mid_block.forward(&x)?;
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&x)?)
    }
}

/// Latents `[B, latent, h, w]` → pixels `[B, 3, h·f, w·f]`.
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<ResnetStack>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let conv_in = conv2d(vb.pp("conv_in"), cfg.latent_channels, rev[0], 3, 1, 1)?;
        let mid_block = MidBlock::new(vb.pp("mid_block"), cfg, rev[0])?;
        let mut up_blocks = Vec::with_capacity(rev.len());
        let mut out_ch = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let vb = vb.pp("up_blocks").pp(i);
            let prev = out_ch;
            out_ch = c;
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| {
                    let cin = if j == 0 { prev } else { out_ch };
                    resnet(vb.pp("resnets").pp(j), cfg, cin, out_ch)
                })
                .collect::<Result<Vec<_>>>()?;
            let up = if i + 1 < rev.len() {
                Some(Upsample2D::new(vb.pp("upsamplers").pp(0), out_ch, out_ch)?)
            } else {
                None
            };
            up_blocks.push(ResnetStack {
                resnets,
                down: None,
                up,
            });
        }
        let first = cfg.block_out_channels[0];
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: crate::layers::norm::group_norm(
                cfg.norm_num_groups,
                first,
                EPS,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv2d(vb.pp("conv_out"), first, cfg.out_channels, 3, 1, 1)?,
        })
    }

    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let x = self.conv_in.forward(z)?;
        let mut x = self.mid_block.forward(&x)?;
        for b in &self.up_blocks {
            x = b.forward(x)?;
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&x)?)
    }
}

/// The encoder's diagonal Gaussian `q(z|x)` (Kingma & Welling 2014), log-variance clamped to
/// [-30, 20] as the LDM code does.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits moments `[B, 2C, h, w]` into mean and clamped log-variance.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let c = moments.dim(1)? / 2;
        let mean = moments.narrow(1, 0, c)?;
        let logvar = moments.narrow(1, c, c)?.clamp(-30f32, 20f32)?;
        Ok(Self { mean, logvar })
    }

    /// Standard deviation `exp(logvar / 2)`.
    pub fn std(&self) -> Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }

    /// `mean + std · noise`, with `noise` drawn by the caller's noise source (same shape).
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        self.mean.add(&self.std()?.mul(noise)?)
    }

    /// The mode (the mean).
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }

    /// `KL(q ‖ N(0, I))` per batch item: `½ Σ (μ² + σ² − 1 − log σ²)` → `[B]`.
    pub fn kl(&self) -> Result<Tensor> {
        let terms = ((self.mean.sqr()? + self.logvar.exp()?)? - 1.0)? - &self.logvar;
        terms?.flatten_from(1)?.sum(D::Minus1)? * 0.5
    }
}

/// diffusers' `AutoencoderKL`.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    pub encoder: Encoder,
    pub decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    pub config: VaeConfig,
}

impl AutoencoderKL {
    /// Builds the autoencoder; `vb` paths are the keys of `vae/diffusion_pytorch_model.safetensors`.
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let l2 = 2 * config.latent_channels;
        let quant_conv = if config.use_quant_conv {
            Some(conv2d(vb.pp("quant_conv"), l2, l2, 1, 1, 0)?)
        } else {
            None
        };
        let post_quant_conv = if config.use_post_quant_conv {
            let l = config.latent_channels;
            Some(conv2d(vb.pp("post_quant_conv"), l, l, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), config)?,
            decoder: Decoder::new(vb.pp("decoder"), config)?,
            quant_conv,
            post_quant_conv,
            config: config.clone(),
        })
    }

    /// Pixels in [-1, 1] `[B, 3, H, W]` → posterior over raw (unscaled) latents.
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let moments = self.encoder.forward(x)?;
        let moments = match &self.quant_conv {
            Some(c) => c.forward(&moments)?,
            None => moments,
        };
        DiagonalGaussian::from_moments(&moments)
    }

    /// Raw (unscaled) latents `[B, C, h, w]` → pixels, nominally in [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    /// Raw latents → the scaled latents the U-Net works in: `(z − shift) · scale`.
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        (z - self.config.shift_factor)? * self.config.scaling_factor
    }

    /// Scaled latents → raw latents: `z / scale + shift`.
    pub fn unscale_latents(&self, z: &Tensor) -> Result<Tensor> {
        (z / self.config.scaling_factor)? + self.config.shift_factor
    }
}
