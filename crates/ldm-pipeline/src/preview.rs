//! Cheap previews of a generation in progress: latents to RGB by one linear map, as A1111's
//! "Approx cheap" live preview does. A1111 hard-codes the map for SD's latents; here it is fitted
//! once for whatever autoencoder the model has, by encoding flat images of the 27 colours of
//! {−1, 0, 1}³ and solving the least-squares problem colour ≈ W·[z; 1] on their mean latents,
//! so that any latent layout (4, 8 or 16 channels) gets a preview.

use crate::{Components, Result};
use candle_core::{DType, Tensor};
use image::RgbImage;

/// A linear map from one latent pixel (scaled latents, the samplers' space) to RGB in [-1, 1].
#[derive(Debug, Clone)]
pub struct LatentPreview {
    /// `[3][C + 1]`: the last column is the bias.
    weights: Vec<Vec<f64>>,
    /// Pixels per latent pixel (the autoencoder's downsampling factor).
    factor: usize,
}

impl LatentPreview {
    /// Fits the map for the model's autoencoder (27 small encoder passes in one batch).
    pub fn fit(c: &Components) -> Result<Self> {
        let f = c.vae_scale_factor();
        let side = 8 * f;
        let levels = [-1.0f32, 0.0, 1.0];
        let mut colours = Vec::new();
        for r in levels {
            for g in levels {
                for b in levels {
                    colours.push([r, g, b]);
                }
            }
        }
        let n = colours.len();
        let mut pixels = Vec::with_capacity(n * 3 * side * side);
        for col in &colours {
            for v in col {
                pixels.extend(std::iter::repeat_n(*v, side * side));
            }
        }
        let images =
            Tensor::from_vec(pixels, (n, 3, side, side), &c.device)?.to_dtype(c.compute_dtype())?;
        let mean = c.vae.encode(&images)?.mean.to_dtype(DType::F32)?;
        let z = c.vae.scale_latents(&mean)?.mean((2, 3))?; // [27, C]
        let z: Vec<Vec<f32>> = z.to_vec2()?;
        let channels = z[0].len();
        // Normal equations with a small ridge: (ZᵀZ + λI) w = Zᵀy per colour channel.
        let k = channels + 1;
        let row = |i: usize| -> Vec<f64> {
            let mut r: Vec<f64> = z[i].iter().map(|&v| v as f64).collect();
            r.push(1.0);
            r
        };
        let mut ata = vec![vec![0.0; k]; k];
        let mut aty = vec![vec![0.0; k]; 3];
        for (i, col) in colours.iter().enumerate() {
            let r = row(i);
            for a in 0..k {
                for b in 0..k {
                    ata[a][b] += r[a] * r[b];
                }
                for (ch, v) in col.iter().enumerate() {
                    aty[ch][a] += r[a] * *v as f64;
                }
            }
        }
        for (a, line) in ata.iter_mut().enumerate().take(channels) {
            line[a] += 1e-3;
        }
        let weights = aty.iter().map(|y| solve(&ata, y)).collect();
        Ok(Self { weights, factor: f })
    }

    /// The first image of a `[B, C, h, w]` batch of scaled latents as an RGB image of the
    /// output's size (each latent pixel drawn as a block).
    pub fn render(&self, latents: &Tensor) -> Result<RgbImage> {
        let z = latents.get(0)?.to_dtype(DType::F32)?; // [C, h, w]
        let (c, h, w) = z.dims3()?;
        let data: Vec<f32> = z.flatten_all()?.to_vec1()?;
        let mut small = RgbImage::new(w as u32, h as u32);
        for y in 0..h {
            for x in 0..w {
                let mut rgb = [0u8; 3];
                for (ch, wt) in self.weights.iter().enumerate() {
                    let mut v = wt[c.min(wt.len() - 1)];
                    for (i, coef) in wt.iter().take(c.min(wt.len() - 1)).enumerate() {
                        v += coef * data[i * h * w + y * w + x] as f64;
                    }
                    rgb[ch] = ((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8;
                }
                small.put_pixel(x as u32, y as u32, image::Rgb(rgb));
            }
        }
        Ok(image::imageops::resize(
            &small,
            (w * self.factor) as u32,
            (h * self.factor) as u32,
            image::imageops::FilterType::Triangle,
        ))
    }
}

/// Solves `a·x = y` for a small symmetric positive-definite `a` (Gaussian elimination with
/// partial pivoting).
fn solve(a: &[Vec<f64>], y: &[f64]) -> Vec<f64> {
    let n = y.len();
    let mut m: Vec<Vec<f64>> = a
        .iter()
        .zip(y)
        .map(|(r, &v)| {
            let mut r = r.clone();
            r.push(v);
            r
        })
        .collect();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| m[i][col].abs().total_cmp(&m[j][col].abs()))
            .unwrap_or(col);
        m.swap(col, pivot);
        let p = m[col][col];
        if p.abs() < 1e-12 {
            continue;
        }
        let pivot_row = m[col].clone();
        for (r, row) in m.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / p;
                for (v, pv) in row.iter_mut().zip(&pivot_row).skip(col) {
                    *v -= f * pv;
                }
            }
        }
    }
    (0..n)
        .map(|i| {
            if m[i][i].abs() < 1e-12 {
                0.0
            } else {
                m[i][n] / m[i][i]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::solve;

    #[test]
    fn solves_a_small_system() {
        let a = vec![
            vec![4.0, 1.0, 0.0],
            vec![1.0, 3.0, 1.0],
            vec![0.0, 1.0, 2.0],
        ];
        let x = [1.0, -2.0, 0.5];
        let y: Vec<f64> = a
            .iter()
            .map(|r| r.iter().zip(&x).map(|(p, q)| p * q).sum())
            .collect();
        for (got, want) in solve(&a, &y).iter().zip(x) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
    }
}
