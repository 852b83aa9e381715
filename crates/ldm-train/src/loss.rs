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

/// Token-level grounding (TokenCompose, Wang et al. 2024, its token loss): for each object
/// word, the share of its cross-attention that falls on its object, `Σ A·M / Σ A` over the
/// layer's query positions, and the loss `(1 − share)²`, summed over the chosen words of each
/// example. `map`: one layer's recorded attention `[n, Lq, Lk]` (Lq = r², r dividing the
/// masks' side), `masks`: `[n, J, h, h]` each object's latent-grid coverage, `chosen`:
/// `[n, J, Lk]` in {0, 1}, which tokens name object j. Returns `[n]`.
///
/// The denoising target is untouched: this teaches where the words' attention goes — at pure
/// noise, where the caption alone can say where an object is, to the region its position word
/// names — which the denoising loss rewards too little to learn (docs/shapes-research.md).
pub fn grounding_per_example(map: &Tensor, masks: &Tensor, chosen: &Tensor) -> Result<Tensor> {
    let (n, lq, _) = map.dims3()?;
    let (_, j, h, _) = masks.dims4()?;
    let r = (lq as f64).sqrt().round() as usize;
    let masks = if r == h {
        masks.clone()
    } else {
        masks.avg_pool2d(h / r)?
    };
    let masks = masks.reshape((n, j, r * r))?.contiguous()?;
    let inside = masks.matmul(&map.contiguous()?)?; // [n, J, Lk]
    let total = (map.sum_keepdim(1)? + 1e-8)?; // [n, 1, Lk]
    let share = inside.broadcast_div(&total)?;
    let miss = share.affine(-1.0, 1.0)?.sqr()?;
    Ok((miss * chosen)?.flatten_from(1)?.sum(1)?)
}

/// A shard's part of a batch of `b`'s grounding loss: each example's
/// [`grounding_per_example`] summed over the recorded layers `maps` and divided by its chosen
/// words × layers (a mean; 0 for an example with none, and with no layers), summed over the
/// shard, divided by `b`.
pub fn grounding_share(
    maps: &[Tensor],
    masks: &Tensor,
    chosen: &Tensor,
    b: usize,
) -> Result<Tensor> {
    let words = (chosen.flatten_from(1)?.sum(1)? * maps.len() as f64)?.maximum(1.0)?;
    let mut sum = Tensor::zeros(chosen.dim(0)?, chosen.dtype(), chosen.device())?;
    for map in maps {
        sum = (sum + grounding_per_example(map, masks, chosen)?)?;
    }
    Ok(((sum / words)?.sum_all()? / b as f64)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Attention wholly on the object costs nothing; wholly off it, 1 a chosen word; the
    /// loss's gradient agrees with finite differences of the attention logits.
    #[test]
    fn grounding_counts_attention_off_the_object() -> Result<()> {
        use candle_core::Var;
        let dev = Device::Cpu;
        // 1 example, 2 × 2 queries, 3 tokens; object 0 covers the top row, object 1 nothing.
        let masks =
            Tensor::new(&[1f64, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], &dev)?.reshape((1, 2, 2, 2))?;
        let chosen = Tensor::new(&[0f64, 1.0, 0.0, 0.0, 0.0, 0.0], &dev)?.reshape((1, 2, 3))?;
        let on = Tensor::new(
            &[0f64, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0],
            &dev,
        )?
        .reshape((1, 4, 3))?;
        let off = Tensor::new(
            &[1f64, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0],
            &dev,
        )?
        .reshape((1, 4, 3))?;
        let v = |t: Tensor| -> Result<f64> { Ok(t.to_vec1::<f64>()?[0]) };
        assert!(v(grounding_per_example(&on, &masks, &chosen)?)?.abs() < 1e-12);
        assert!((v(grounding_per_example(&off, &masks, &chosen)?)? - 1.0).abs() < 1e-6);
        // One word, two layers (one on, one off): a mean of 0.5, over a batch of 2.
        let share = grounding_share(&[on.clone(), off.clone()], &masks, &chosen, 2)?;
        assert!((share.to_scalar::<f64>()? - 0.25).abs() < 1e-9);
        // Gradient through a softmax over the tokens, against finite differences, in f64.
        let logits = Var::from_tensor(&Tensor::randn(0f64, 1.0, (1, 4, 3), &dev)?)?;
        let loss = |l: &Tensor| -> Result<Tensor> {
            let map = ldm_models::layers::ops::softmax_last_dim(l)?;
            Ok(grounding_per_example(&map, &masks, &chosen)?.sum_all()?)
        };
        let grads = loss(logits.as_tensor())?.backward()?;
        let g = grads
            .get(&logits)
            .unwrap()
            .flatten_all()?
            .to_vec1::<f64>()?;
        let base = logits.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        for (i, gi) in g.iter().enumerate() {
            let at = |d: f64| -> Result<f64> {
                let mut x = base.clone();
                x[i] += d;
                loss(&Tensor::from_vec(x, (1, 4, 3), &dev)?)?
                    .to_scalar::<f64>()
                    .map_err(Into::into)
            };
            let fd = (at(1e-6)? - at(-1e-6)?) / 2e-6;
            assert!((fd - gi).abs() < 1e-6, "{i}: {fd} against {gi}");
        }
        Ok(())
    }

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
