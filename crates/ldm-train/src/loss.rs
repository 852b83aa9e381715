//! Losses over a batch computed in shards: each shard returns its part of the batch's loss.

use crate::Result;
use candle_core::Tensor;

/// `mean((a − b)²)` of each example: `[B]`.
pub fn per_example_mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a - b)?.sqr()?.flatten_from(1)?.mean(1)?)
}

/// A shard's part of a batch of `b`'s weighted mean squared error: `Σ wᵢ·mse(predᵢ, targetᵢ) / b`
/// over the shard's examples (`weights`: `[n]`, the shard's own).
pub fn weighted_mse_share(
    pred: &Tensor,
    target: &Tensor,
    weights: &Tensor,
    b: usize,
) -> Result<Tensor> {
    Ok(((per_example_mse(pred, target)? * weights)?.sum_all()? / b as f64)?)
}

/// Per-pixel loss weights from object masks (`[B, 1, h, w]` in `[0, 1]`): `1 + object_weight`
/// where an object covers the cell, 1 elsewhere, scaled so that each example's weights average 1
/// — the loss is redistributed towards the objects within each image, not raised.
pub fn object_pixel_weights(masks: &Tensor, object_weight: f64) -> Result<Tensor> {
    let w = ((masks * object_weight)? + 1.0)?;
    let mean = w
        .flatten_from(1)?
        .mean_keepdim(1)?
        .unsqueeze(2)?
        .unsqueeze(3)?;
    Ok(w.broadcast_div(&mean)?)
}

/// A shard's part of a batch of `b`'s weighted mean squared error (as [`weighted_mse_share`]),
/// each example's squared errors first weighted per pixel (`pixel_weights`: `[n, 1, h, w]`,
/// shared by the channels; see [`object_pixel_weights`]).
pub fn pixel_weighted_mse_share(
    pred: &Tensor,
    target: &Tensor,
    pixel_weights: &Tensor,
    weights: &Tensor,
    b: usize,
) -> Result<Tensor> {
    let per_example = (pred - target)?
        .sqr()?
        .broadcast_mul(pixel_weights)?
        .flatten_from(1)?
        .mean(1)?;
    Ok(((per_example * weights)?.sum_all()? / b as f64)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Shares of a split batch add up to the whole batch's weighted mean.
    #[test]
    fn shares_add_up_to_the_weighted_mean() -> Result<()> {
        let dev = Device::Cpu;
        let pred = Tensor::new(&[[1f32, 2.0], [0.0, -1.0], [3.0, 3.0]], &dev)?;
        let target = Tensor::new(&[[0f32, 2.0], [1.0, 1.0], [3.0, 1.0]], &dev)?;
        let w = Tensor::new(&[2f32, 0.5, 1.0], &dev)?;
        // Per example: 0.5, 2.5, 2.0 → (2·0.5 + 0.5·2.5 + 1·2.0) / 3.
        let whole = weighted_mse_share(&pred, &target, &w, 3)?.to_scalar::<f32>()?;
        assert!((whole - 4.25 / 3.0).abs() < 1e-6, "{whole}");
        let part = |s: usize, n: usize| -> Result<f32> {
            Ok(weighted_mse_share(
                &pred.narrow(0, s, n)?,
                &target.narrow(0, s, n)?,
                &w.narrow(0, s, n)?,
                3,
            )?
            .to_scalar::<f32>()?)
        };
        assert!((part(0, 1)? + part(1, 2)? - whole).abs() < 1e-6);
        Ok(())
    }

    /// Object weights average 1 per example; uniform weights give the plain loss, and a mask
    /// moves the loss towards the pixels it covers.
    #[test]
    fn object_weights_redistribute_the_loss() -> Result<()> {
        let dev = Device::Cpu;
        // Two examples of 1 channel, 2×2: one with an object in its first pixel, one empty.
        let masks = Tensor::new(
            &[[[[1f32, 0.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]],
            &dev,
        )?;
        let pw = object_pixel_weights(&masks, 3.0)?;
        let v = pw.flatten_all()?.to_vec1::<f32>()?;
        // 1 + 3 = 4 and 1, 1, 1 → mean 7/4: 16/7 and 4/7; the empty example stays at 1.
        let want = [
            16.0 / 7.0,
            4.0 / 7.0,
            4.0 / 7.0,
            4.0 / 7.0,
            1.0,
            1.0,
            1.0,
            1.0,
        ];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{v:?}");
        }
        let pred = Tensor::new(
            &[[[[1f32, 0.0], [0.0, 0.0]]], [[[2.0, 0.0], [0.0, 0.0]]]],
            &dev,
        )?;
        let target = pred.zeros_like()?;
        let w = Tensor::new(&[1f32, 1.0], &dev)?;
        let plain = weighted_mse_share(&pred, &target, &w, 2)?.to_scalar::<f32>()?;
        let ones = object_pixel_weights(&masks, 0.0)?;
        let same = pixel_weighted_mse_share(&pred, &target, &ones, &w, 2)?.to_scalar::<f32>()?;
        assert!((plain - same).abs() < 1e-6);
        // The error on the object counts 16/7 times: (16/7 · 1 / 4 + 4 / 4) / 2.
        let moved = pixel_weighted_mse_share(&pred, &target, &pw, &w, 2)?.to_scalar::<f32>()?;
        assert!((moved - (16.0 / 28.0 + 1.0) / 2.0).abs() < 1e-6, "{moved}");
        Ok(())
    }
}
