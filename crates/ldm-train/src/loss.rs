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
}
