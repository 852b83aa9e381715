//! The patch-based discriminator of latent diffusion's autoencoder training (Esser et al. 2021,
//! "Taming Transformers", §3.2; pix2pix's PatchGAN, Isola et al. 2017): strided 4×4
//! convolutions with leaky ReLUs give one real/fake logit per overlapping patch, trained with
//! the hinge loss. Normalisation is GroupNorm rather than BatchNorm, so a logit does not depend
//! on the rest of the batch and there are no running statistics to checkpoint.

use crate::Result;
use candle_core::Tensor;
use candle_nn::{Module, VarBuilder};
use ldm_models::layers::norm::{group_norm, GroupNorm};
use ldm_models::layers::{conv2d, Conv2d};

/// `NLayerDiscriminator`: `layers` stride-2 stages from `width` channels (doubling, capped at
/// 8×), one stride-1 stage, and a 1-channel stride-1 output convolution.
pub struct PatchDiscriminator {
    first: Conv2d,
    stages: Vec<(Conv2d, GroupNorm)>,
    last: Conv2d,
}

fn leaky_relu(x: &Tensor) -> Result<Tensor> {
    // max(x, 0.2x), built from ops with exact gradients.
    Ok((x.relu()? - (x.neg()?.relu()? * 0.2)?)?)
}

fn groups_for(channels: usize) -> usize {
    (1..=32)
        .rev()
        .find(|g| channels.is_multiple_of(*g))
        .unwrap_or(1)
}

impl PatchDiscriminator {
    pub fn new(vb: VarBuilder, in_channels: usize, width: usize, layers: usize) -> Result<Self> {
        let first = conv2d(vb.pp("main.0"), in_channels, width, 4, 2, 1)?;
        let mut stages = Vec::new();
        let mut ch = width;
        for n in 1..=layers {
            let out = width * (1 << n.min(3));
            let stride = if n < layers { 2 } else { 1 };
            let v = vb.pp(format!("stage.{n}"));
            stages.push((
                conv2d(v.pp("conv"), ch, out, 4, stride, 1)?,
                group_norm(groups_for(out), out, 1e-5, v.pp("norm"))?,
            ));
            ch = out;
        }
        let last = conv2d(vb.pp("out"), ch, 1, 4, 1, 1)?;
        Ok(Self {
            first,
            stages,
            last,
        })
    }

    /// Patch logits `[B, 1, h, w]` for images `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = leaky_relu(&self.first.forward(x)?)?;
        for (conv, norm) in &self.stages {
            h = leaky_relu(&norm.forward(&conv.forward(&h)?)?)?;
        }
        Ok(self.last.forward(&h)?)
    }
}

/// The discriminator's hinge loss: `½ (mean relu(1 − D(x)) + mean relu(1 + D(x̂)))`.
pub fn hinge_d_loss(real: &Tensor, fake: &Tensor) -> Result<Tensor> {
    let r = (1.0 - real)?.relu()?.mean_all()?;
    let f = (fake + 1.0)?.relu()?.mean_all()?;
    Ok(((r + f)? * 0.5)?)
}

/// The autoencoder's adversarial loss: `−mean D(x̂)`.
pub fn generator_loss(fake: &Tensor) -> Result<Tensor> {
    Ok(fake.mean_all()?.neg()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn patch_logits_and_hinge() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let d = PatchDiscriminator::new(VarBuilder::from_varmap(&map, DType::F32, &dev), 3, 8, 3)?;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &dev)?;
        let logits = d.forward(&x)?;
        // 64 → 32 → 16 → 8, then two stride-1 4×4 convolutions: 7, 6.
        assert_eq!(logits.dims(), &[2, 1, 6, 6]);
        let real = Tensor::new(&[2f32, 0.5], &dev)?;
        let fake = Tensor::new(&[-2f32, 0.0], &dev)?;
        // ½ (mean(0, 0.5) + mean(0, 1)) = ½ (0.25 + 0.5)
        let l = hinge_d_loss(&real, &fake)?.to_scalar::<f32>()?;
        assert!((l - 0.375).abs() < 1e-6);
        let x = Tensor::new(&[-1f32, 2.0], &dev)?;
        assert_eq!(leaky_relu(&x)?.to_vec1::<f32>()?, vec![-0.2, 2.0]);
        Ok(())
    }
}
