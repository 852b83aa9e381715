//! Spatial down- and up-sampling (diffusers' `Downsample2D` and `Upsample2D`).

use super::conv2d;
use crate::layers::Conv2d;
use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};

/// Strided 3×3 convolution halving height and width.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    /// The autoencoder pads right and bottom by one and convolves without padding.
    asymmetric_pad: bool,
}

impl Downsample2D {
    /// `padding` is diffusers' `padding` argument: 1 in the U-Net, 0 in the autoencoder.
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        out_channels: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Self {
            conv: conv2d(vb.pp("conv"), channels, out_channels, 3, 2, padding)?,
            asymmetric_pad: padding == 0,
        })
    }

    /// `[B, C, H, W]` → `[B, C', ⌈H/2⌉, ⌈W/2⌉]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.asymmetric_pad {
            let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// Nearest-neighbour doubling followed by a 3×3 convolution.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize, out_channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv2d(vb.pp("conv"), channels, out_channels, 3, 1, 1)?,
        })
    }

    /// Upsamples to `size` (the matching skip's height and width) or to twice the input size.
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv
            .forward(&super::ops::upsample_nearest2d(x, th, tw)?)
    }
}
