//! diffusers' `ResnetBlock2D`: pre-activation GroupNorm → SiLU → conv, twice, with the timestep
//! embedding added between the two convolutions and a 1×1 shortcut when channels change
//! (He et al., "Identity Mappings in Deep Residual Networks"; DDPM's U-Net, Ho et al. 2020).

use super::conv2d;
use crate::layers::linear::{linear, Linear};
use crate::layers::norm::GroupNorm;
use crate::layers::ops::add_bias;
use crate::layers::Conv2d;
use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};

/// Shapes and norms of one ResNet block.
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the timestep embedding; `None` in the autoencoder.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

/// One ResNet block.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    /// Builds the block; parameter paths are diffusers' (`norm1`, `conv1`, `time_emb_proj`, …).
    pub fn new(vb: VarBuilder, c: ResnetConfig) -> Result<Self> {
        let norm1 =
            crate::layers::norm::group_norm(c.groups, c.in_channels, c.eps, vb.pp("norm1"))?;
        let conv1 = conv2d(vb.pp("conv1"), c.in_channels, c.out_channels, 3, 1, 1)?;
        let time_emb_proj = match c.temb_channels {
            Some(t) => Some(linear(t, c.out_channels, vb.pp("time_emb_proj"))?),
            None => None,
        };
        let norm2 =
            crate::layers::norm::group_norm(c.groups, c.out_channels, c.eps, vb.pp("norm2"))?;
        let conv2 = conv2d(vb.pp("conv2"), c.out_channels, c.out_channels, 3, 1, 1)?;
        let conv_shortcut = if c.in_channels != c.out_channels {
            Some(conv2d(
                vb.pp("conv_shortcut"),
                c.in_channels,
                c.out_channels,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            output_scale_factor: c.output_scale_factor,
        })
    }

    /// `x`: `[B, C_in, H, W]`, `temb`: `[B, T]` → `[B, C_out, H, W]`.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                // Each image's own channel bias: as rows `[B·C, H·W]` with a bias `[B·C]`, one
                // fused pass forward and a per-row sum backward (`add_bias`), where a broadcast
                // add would reduce over the spatial axes in its backward.
                let t = proj.forward(&temb.silu()?)?;
                let (b, c, hh, ww) = h.dims4()?;
                if t.dims() == [b, c] {
                    let rows = h.contiguous()?.reshape((b * c, hh * ww))?;
                    add_bias(&rows, &t.contiguous()?.reshape(b * c)?, 0)?.reshape((b, c, hh, ww))?
                } else {
                    h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?
                }
            }
            _ => h,
        };
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let out = (shortcut + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}
