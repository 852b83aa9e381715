//! An auxiliary head that reads where the scene's objects are from the U-Net's last features:
//! a training-time probe turned loss, in the spirit of REPA (Yu et al. 2024, aligning a
//! diffusion model's hidden states with a clean image's representation), with the renderer's
//! own object masks as that representation.
//!
//! At the noisiest steps the denoising loss barely rewards placing an object by its position
//! word (knowing the word takes the best loss at pure noise from 0.266 only to 0.264,
//! docs/shapes-research.md): the optimal prediction there is a blurred mean. Predicting each
//! object's mask is a different matter: from pure noise and the caption "a circle on the left"
//! the best guess puts the object's probability in the left third, and a per-cell binary
//! cross-entropy pays for every cell that guess gets wrong. The head is one linear map per
//! latent cell over what `conv_out` reads ([`UNet2DConditionModel::forward_and_features`]), so
//! the features the output is made from must hold where the objects will be; the head itself
//! is dropped when the model is written (diffusers' architecture is unchanged).
//!
//! [`UNet2DConditionModel::forward_and_features`]: ldm_models::unet::UNet2DConditionModel::forward_and_features

use crate::Result;
use candle_core::{Module, Tensor};
use candle_nn::{Linear, VarBuilder};

/// The head: `objects` logits a latent cell from the U-Net's `channels` features.
pub struct LayoutHead {
    linear: Linear,
}

impl LayoutHead {
    pub fn new(vb: VarBuilder, channels: usize, objects: usize) -> Result<Self> {
        Ok(Self {
            linear: candle_nn::linear(channels, objects, vb)?,
        })
    }

    /// `features` `[n, C, h, w]` → logits `[n, objects, h, w]`.
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let x = features.permute((0, 2, 3, 1))?.contiguous()?;
        Ok(self.linear.forward(&x)?.permute((0, 3, 1, 2))?)
    }
}

/// Binary cross-entropy of `logits` against soft `targets` in `[0, 1]` (a cell's covered
/// share), elementwise and stable: `max(l, 0) − y·l + ln(1 + e^(−|l|))`.
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let softplus_neg_abs = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok(((logits.relu()? - (targets * logits)?)? + softplus_neg_abs)?)
}

/// A shard's part of a batch of `b`'s mask loss: each example's mean cross-entropy over its
/// objects' cells, summed over the shard, divided by `b`.
pub fn mask_loss_share(logits: &Tensor, masks: &Tensor, b: usize) -> Result<Tensor> {
    let per_example = bce_with_logits(logits, masks)?.flatten_from(1)?.mean(1)?;
    Ok((per_example.sum_all()? / b as f64)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// The cross-entropy is ln 2 at a zero logit, the closed form elsewhere (also where
    /// e^l would overflow), and its gradient is σ(l) − y.
    #[test]
    fn cross_entropy_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let l = Var::new(&[0f64, 2.0, -3.0, 800.0, -800.0], &dev)?;
        let y = Tensor::new(&[0.5f64, 1.0, 0.25, 0.0, 1.0], &dev)?;
        let loss = bce_with_logits(l.as_tensor(), &y)?;
        let got = loss.to_vec1::<f64>()?;
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        let want: Vec<f64> = [0f64, 2.0, -3.0, 800.0, -800.0]
            .iter()
            .zip([0.5, 1.0, 0.25, 0.0, 1.0])
            .map(|(&x, y): (&f64, f64)| {
                let p = sigmoid(x).clamp(1e-300, 1.0 - 1e-16);
                if x.abs() > 100.0 {
                    // −y·l + max(l, 0) exactly.
                    x.max(0.0) - y * x
                } else {
                    -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
                }
            })
            .collect();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-9, "{got:?} against {want:?}");
        }
        assert!((got[0] - 2f64.ln()).abs() < 1e-12);
        let grads = loss.sum_all()?.backward()?;
        let g = grads.get(&l).unwrap().to_vec1::<f64>()?;
        for (i, (x, y)) in [0f64, 2.0, -3.0, 800.0, -800.0]
            .iter()
            .zip([0.5, 1.0, 0.25, 0.0, 1.0])
            .enumerate()
        {
            assert!((g[i] - (sigmoid(*x) - y)).abs() < 1e-9, "{i}: {}", g[i]);
        }
        Ok(())
    }

    /// The head maps each cell's features alone; the loss of a split batch adds up, and its
    /// gradient reaches the head and the features.
    #[test]
    fn head_reads_each_cell_and_shares_add_up() -> Result<()> {
        let dev = Device::Cpu;
        let map = candle_nn::VarMap::new();
        let head = LayoutHead::new(
            VarBuilder::from_varmap(&map, DType::F32, &dev).pp("layout_head"),
            6,
            2,
        )?;
        let features = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 6, 4, 4), &dev)?)?;
        let logits = head.forward(features.as_tensor())?;
        assert_eq!(logits.dims(), [3, 2, 4, 4]);
        // Cell (1, 2) of example 1 from that cell's features only.
        let cell = features
            .as_tensor()
            .narrow(0, 1, 1)?
            .narrow(2, 1, 1)?
            .narrow(3, 2, 1)?;
        let alone = head.forward(&cell)?.flatten_all()?.to_vec1::<f32>()?;
        let inside = logits
            .narrow(0, 1, 1)?
            .narrow(2, 1, 1)?
            .narrow(3, 2, 1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(alone, inside);
        let masks = Tensor::rand(0f32, 1.0, (3, 2, 4, 4), &dev)?;
        let whole = mask_loss_share(&logits, &masks, 3)?.to_scalar::<f32>()?;
        let part = |s: usize, n: usize| -> Result<f32> {
            Ok(
                mask_loss_share(&logits.narrow(0, s, n)?, &masks.narrow(0, s, n)?, 3)?
                    .to_scalar::<f32>()?,
            )
        };
        assert!((part(0, 1)? + part(1, 2)? - whole).abs() < 1e-6);
        let grads = mask_loss_share(&logits, &masks, 3)?.backward()?;
        assert!(grads.get(features.as_tensor()).is_some());
        for var in map.all_vars() {
            let g = grads.get(&var).unwrap();
            assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        Ok(())
    }
}
