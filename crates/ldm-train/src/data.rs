//! Shapes World batches as tensors: images in `[-1, 1]`, `[B, 3, S, S]`, with their captions.

use crate::shapes::{
    render::{coverage, render},
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
        let mut cells = vec![0f32; h * h];
        for (n, c) in cov.iter().enumerate() {
            let (y, x) = (n / size / factor, n % size / factor);
            cells[y * h + x] += c / (factor * factor) as f32;
        }
        masks.push(Tensor::from_vec(cells, (1, h, h), device)?);
    }
    Ok(Tensor::stack(&masks, 0)?)
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
}
