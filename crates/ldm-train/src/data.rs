//! Shapes World batches as tensors: images in `[-1, 1]`, `[B, 3, S, S]`, with their captions.

use crate::shapes::{
    object_words,
    render::{coverage, coverage_each, render},
    Scene,
};
use crate::Result;
use candle_core::{Device, Tensor};

/// One image's RGB bytes as `[3, S, S]` in `[-1, 1]`.
pub fn image_tensor(rgb: &[u8], size: usize, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = rgb.iter().map(|&b| b as f32 / 127.5 - 1.0).collect();
    Ok(Tensor::from_vec(v, (size, size, 3), device)?
        .permute((2, 0, 1))?
        .contiguous()?)
}

/// Scenes `seed`, `indices…` rendered at `size`: `([B, 3, S, S], captions)`.
pub fn batch(
    seed: u64,
    indices: impl IntoIterator<Item = u64>,
    size: usize,
    device: &Device,
) -> Result<(Tensor, Vec<String>)> {
    let mut images = Vec::new();
    let mut captions = Vec::new();
    for i in indices {
        let scene = Scene::generate(seed, i, size);
        images.push(image_tensor(&render(&scene), size, device)?);
        captions.push(scene.caption());
    }
    Ok((Tensor::stack(&images, 0)?, captions))
}

/// How much of each latent cell the objects of scenes `seed`, `indices…` cover: `[B, 1, S/f,
/// S/f]` in `[0, 1]`, each cell the mean [`coverage`] of the `f × f` pixels it encodes.
pub fn object_masks(
    seed: u64,
    indices: impl IntoIterator<Item = u64>,
    size: usize,
    factor: usize,
    device: &Device,
) -> Result<Tensor> {
    let h = size / factor;
    let mut masks = Vec::new();
    for i in indices {
        let cov = coverage(&Scene::generate(seed, i, size));
        masks.push(Tensor::from_vec(
            pool_to_cells(&cov, size, factor),
            (1, h, h),
            device,
        )?);
    }
    Ok(Tensor::stack(&masks, 0)?)
}

/// Pools a `size × size` map to the latent grid (`factor` pixels a cell side): each cell the
/// mean of the pixels it encodes.
fn pool_to_cells(map: &[f32], size: usize, factor: usize) -> Vec<f32> {
    let h = size / factor;
    let mut cells = vec![0f32; h * h];
    for (n, c) in map.iter().enumerate() {
        let (y, x) = (n / size / factor, n % size / factor);
        cells[y * h + x] += c / (factor * factor) as f32;
    }
    cells
}

/// What a grounding loss needs of scenes `seed`, `indices…`: each object's own mask on the
/// latent grid, `[B, 2, S/f, S/f]` (the second zero for one-object scenes), and which of the
/// caption's `tokens` token positions name each object, `[B, 2, tokens]` in {0, 1}
/// ([`object_words`]; the tokenizer's one token a word after the start token).
pub fn object_grounding(
    seed: u64,
    indices: impl IntoIterator<Item = u64>,
    size: usize,
    factor: usize,
    tokens: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let h = size / factor;
    let (mut masks, mut chosen) = (Vec::new(), Vec::new());
    for i in indices {
        let scene = Scene::generate(seed, i, size);
        let each = coverage_each(&scene);
        let words = object_words(&scene.stated);
        for k in 0..2 {
            match each.get(k) {
                Some(m) => masks.extend(pool_to_cells(m, size, factor)),
                None => masks.extend(std::iter::repeat_n(0f32, h * h)),
            }
            let mut row = vec![0f32; tokens];
            for &w in words.get(k).map(Vec::as_slice).unwrap_or_default() {
                // Word w is token w + 1; the last position holds the end token at the latest.
                if w + 1 < tokens.saturating_sub(1) {
                    row[w + 1] = 1.0;
                }
            }
            chosen.extend(row);
        }
    }
    let n = masks.len() / (2 * h * h);
    Ok((
        Tensor::from_vec(masks, (n, 2, h, h), device)?,
        Tensor::from_vec(chosen, (n, 2, tokens), device)?,
    ))
}

/// `[B, 3, S, S]` in `[-1, 1]` → RGB bytes per image (rounded, clamped).
pub fn to_bytes(images: &Tensor) -> Result<Vec<Vec<u8>>> {
    let x = ((images.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?
        .round()?
        .permute((0, 2, 3, 1))?
        .to_dtype(candle_core::DType::U8)?;
    let b = x.dim(0)?;
    (0..b)
        .map(|i| Ok(x.get(i)?.flatten_all()?.to_vec1::<u8>()?))
        .collect()
}

/// Peak signal-to-noise ratio in dB between two byte images.
pub fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / a.len().max(1) as f64;
    if mse == 0.0 {
        return f64::INFINITY;
    }
    10.0 * (255.0f64 * 255.0 / mse).log10()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A latent cell's mask is the mean coverage of the pixels it encodes.
    #[test]
    fn object_masks_pool_the_coverage() -> Result<()> {
        let dev = Device::Cpu;
        let m = object_masks(1, 3..5, 64, 4, &dev)?;
        assert_eq!(m.dims(), &[2, 1, 16, 16]);
        for (k, i) in (3..5).enumerate() {
            let cov = coverage(&Scene::generate(1, i, 64));
            let cells = m.get(k)?.flatten_all()?.to_vec1::<f32>()?;
            assert!(cells.iter().all(|&c| (0.0..=1.0).contains(&c)));
            let total: f32 = cov.iter().sum::<f32>() / 16.0;
            assert!((cells.iter().sum::<f32>() - total).abs() < 1e-3);
            // Cell (y, x) = (2, 5) averages pixels 8..12 × 20..24.
            let want: f32 = (8..12)
                .flat_map(|y| (20..24).map(move |x| (y, x)))
                .map(|(y, x)| cov[y * 64 + x])
                .sum::<f32>()
                / 16.0;
            assert!((cells[2 * 16 + 5] - want).abs() < 1e-6);
        }
        Ok(())
    }

    /// Each object's mask pools its own coverage, and its row marks its words' tokens as the
    /// tokenizer numbers them.
    #[test]
    fn object_grounding_marks_each_objects_cells_and_tokens() -> Result<()> {
        let dev = Device::Cpu;
        let dir = std::env::temp_dir().join(format!("ldm-grounding-{}", std::process::id()));
        let tok = crate::tokenizer::write_tokenizer(&dir, &crate::tokenizer::shapes_words(), 32)?;
        let (masks, chosen) = object_grounding(1, 0..40, 64, 4, 32, &dev)?;
        assert_eq!(masks.dims(), &[40, 2, 16, 16]);
        assert_eq!(chosen.dims(), &[40, 2, 32]);
        let whole = object_masks(1, 0..40, 64, 4, &dev)?;
        let sum = masks.sum_keepdim(1)?;
        assert!((sum - whole)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
        for i in 0..40u64 {
            let scene = Scene::generate(1, i, 64);
            let caption = scene.caption();
            let ids = tok.encode(&caption)?;
            let words: Vec<&str> = caption.split(' ').collect();
            for k in 0..2 {
                let row = chosen.get(i as usize)?.get(k)?.to_vec1::<f32>()?;
                let marked: Vec<usize> = (0..32).filter(|&p| row[p] == 1.0).collect();
                match scene.stated.objects.get(k) {
                    None => assert!(marked.is_empty()),
                    Some(o) => {
                        // The shape's word is among them, at its token.
                        let shape_id = tok.encode(o.shape.name())?[1];
                        assert!(marked.iter().any(|&p| ids[p] == shape_id), "{caption}");
                        for &p in &marked {
                            assert_eq!(ids[p], tok.encode(words[p - 1])?[1], "{caption}");
                        }
                    }
                }
            }
        }
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }
}
