//! Tiled encoding and decoding for large images in bounded memory, as diffusers'
//! `AutoencoderKL.tiled_encode` / `tiled_decode` compute it: overlapping tiles processed one at
//! a time, each blended linearly into its upper and left neighbours over the overlap, then
//! cropped and stitched.

use super::{AutoencoderKL, DiagonalGaussian};
use candle_core::{Result, Tensor};

/// Blends the last `extent` rows (dim 2) or columns (dim 3) of `a` into the first of `b`.
fn blend(a: &Tensor, b: &Tensor, dim: usize, extent: usize) -> Result<Tensor> {
    let extent = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    let len_a = a.dim(dim)?;
    let head = b.narrow(dim, 0, extent)?;
    let tail = a.narrow(dim, len_a - extent, extent)?;
    let ramp: Vec<f32> = (0..extent).map(|i| i as f32 / extent as f32).collect();
    let shape: Vec<usize> = (0..4).map(|d| if d == dim { extent } else { 1 }).collect();
    let w = Tensor::from_vec(ramp, shape, b.device())?.to_dtype(b.dtype())?;
    let mixed = (tail.broadcast_mul(&w.affine(-1.0, 1.0)?)? + head.broadcast_mul(&w)?)?;
    let rest = b.narrow(dim, extent, b.dim(dim)? - extent)?;
    Tensor::cat(&[mixed, rest], dim)
}

/// Runs `f` on overlapping tiles of `x` (`tile` input pixels, stride `tile·(1 − overlap)`) and
/// stitches the outputs, whose size is the input's times `scale` (a ratio `num/den`).
fn tiled(
    x: &Tensor,
    tile: usize,
    overlap: f64,
    (num, den): (usize, usize),
    f: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let stride = ((tile as f64 * (1.0 - overlap)) as usize).max(1);
    let out_tile = tile * num / den;
    let extent = (out_tile as f64 * overlap) as usize;
    let limit = out_tile - extent;
    let starts = |n: usize| (0..n).step_by(stride).collect::<Vec<_>>();
    let mut rows: Vec<Vec<Tensor>> = Vec::new();
    for &i in &starts(h) {
        let mut row = Vec::new();
        for &j in &starts(w) {
            let t = x
                .narrow(2, i, tile.min(h - i))?
                .narrow(3, j, tile.min(w - j))?;
            row.push(f(&t)?);
        }
        rows.push(row);
    }
    let mut out_rows = Vec::with_capacity(rows.len());
    for r in 0..rows.len() {
        let mut parts = Vec::with_capacity(rows[r].len());
        for c in 0..rows[r].len() {
            let mut t = rows[r][c].clone();
            if r > 0 {
                t = blend(&rows[r - 1][c], &t, 2, extent)?;
            }
            if c > 0 {
                t = blend(&rows[r][c - 1], &t, 3, extent)?;
            }
            rows[r][c] = t.clone();
            let t = t.narrow(2, 0, limit.min(t.dim(2)?))?;
            parts.push(t.narrow(3, 0, limit.min(t.dim(3)?))?);
        }
        out_rows.push(Tensor::cat(&parts, 3)?);
    }
    let out = Tensor::cat(&out_rows, 2)?;
    let (oh, ow) = (h * num / den, w * num / den);
    out.narrow(2, 0, oh.min(out.dim(2)?))?
        .narrow(3, 0, ow.min(out.dim(3)?))
}

impl AutoencoderKL {
    /// [`AutoencoderKL::decode`] over latent tiles of `tile` (diffusers: `sample_size / 8`)
    /// with `overlap` (diffusers: 0.25).
    pub fn decode_tiled(&self, z: &Tensor, tile: usize, overlap: f64) -> Result<Tensor> {
        let f = self.config.downsample_factor();
        tiled(z, tile, overlap, (f, 1), &|t| self.decode(t))
    }

    /// [`AutoencoderKL::encode`] over pixel tiles of `tile` (diffusers: `sample_size`).
    pub fn encode_tiled(&self, x: &Tensor, tile: usize, overlap: f64) -> Result<DiagonalGaussian> {
        let f = self.config.downsample_factor();
        let moments = tiled(x, tile, overlap, (1, f), &|t| {
            let p = self.encode(t)?;
            Tensor::cat(&[&p.mean, &p.logvar], 1)
        })?;
        DiagonalGaussian::from_moments(&moments)
    }
}
