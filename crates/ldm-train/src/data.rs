//! Shapes World batches as tensors: images in `[-1, 1]`, `[B, 3, S, S]`, with their captions.

use crate::shapes::{render::render, Scene};
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
