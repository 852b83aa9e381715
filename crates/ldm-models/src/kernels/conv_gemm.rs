//! The CPU inference convolution: `out[b] = W · cols(x[b]) + bias`, where `W` is the
//! `[C_out, C·k·k]` weight and `cols` the `[C·k·k, H_out·W_out]` patch matrix (Caffe's layout,
//! so the product lands directly in NCHW). The patch matrix is built for a band of output rows
//! at a time, so its memory stays bounded (about [`BAND_BYTES`]) whatever the image size, and
//! each band is one large GEMM (the `gemm` crate's AVX-512/AVX2 kernels, on rayon). 1×1
//! convolutions skip the patches: the input already is the matrix. The bias initialises the
//! output, which the GEMM then accumulates into.
//!
//! This path has no backward; training uses [`super::conv_train::conv2d_im2col`].

use super::cpu::{contiguous_f32, gemm, Operand};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

/// Target size of one band of the patch matrix.
pub const BAND_BYTES: usize = 16 << 20;

/// `[B, C, H, W]` ⊛ `[C_out, C, k, k]` + `[C_out]`, stride and zero padding on both sides.
#[derive(Debug, Clone, Copy)]
pub struct ConvGemm {
    pub stride: usize,
    pub padding: usize,
}

impl ConvGemm {
    fn out(&self, n: usize, k: usize) -> usize {
        (n + 2 * self.padding - k) / self.stride + 1
    }

    /// Fills `cols` (`[C·k·k, rows·W_out]`) with the patches of output rows
    /// `oy0 .. oy0 + rows` of one image `[C, H, W]`.
    fn patches(
        &self,
        img: &[f32],
        dims: (usize, usize, usize),
        k: usize,
        oy0: usize,
        rows: usize,
        cols: &mut [f32],
    ) {
        let (c, h, w) = dims;
        let wo = self.out(w, k);
        let n = rows * wo;
        let (s, p) = (self.stride, self.padding as isize);
        cols.par_chunks_mut(k * k * n)
            .take(c)
            .enumerate()
            .for_each(|(ci, block)| {
                let plane = &img[ci * h * w..(ci + 1) * h * w];
                for ki in 0..k {
                    for kj in 0..k {
                        let row = &mut block[(ki * k + kj) * n..(ki * k + kj + 1) * n];
                        for r in 0..rows {
                            let out = &mut row[r * wo..(r + 1) * wo];
                            let iy = ((oy0 + r) * s + ki) as isize - p;
                            if iy < 0 || iy >= h as isize {
                                out.fill(0.0);
                                continue;
                            }
                            let line = &plane[iy as usize * w..(iy as usize + 1) * w];
                            let shift = kj as isize - p;
                            if s == 1 {
                                // Output column ox reads input column ox + shift.
                                let lo = (-shift).clamp(0, wo as isize) as usize;
                                let hi = ((w as isize - shift).clamp(0, wo as isize)) as usize;
                                out[..lo].fill(0.0);
                                if hi > lo {
                                    let a = (lo as isize + shift) as usize;
                                    out[lo..hi].copy_from_slice(&line[a..a + hi - lo]);
                                }
                                out[hi.max(lo)..].fill(0.0);
                            } else {
                                for (ox, v) in out.iter_mut().enumerate() {
                                    let ix = (ox * s) as isize + shift;
                                    *v = if ix >= 0 && ix < w as isize {
                                        line[ix as usize]
                                    } else {
                                        0.0
                                    };
                                }
                            }
                        }
                    }
                }
            });
    }
}

impl CustomOp3 for ConvGemm {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, c, h, w) = xl.shape().dims4()?;
        let (c_out, c_in, k, k2) = wl.shape().dims4()?;
        if c_in != c || k != k2 || bl.shape().elem_count() != c_out {
            candle_core::bail!(
                "conv_gemm: weight {:?} / bias {:?} do not fit input {:?}",
                wl.shape(),
                bl.shape(),
                xl.shape()
            );
        }
        if h + 2 * self.padding < k || w + 2 * self.padding < k || self.stride == 0 {
            candle_core::bail!("conv_gemm: kernel {k} larger than the padded input {h}×{w}");
        }
        let x = contiguous_f32(xs, xl, self.name(), "input")?;
        let bias = contiguous_f32(bs, bl, self.name(), "bias")?;
        let (ho, wo) = (self.out(h, k), self.out(w, k));
        let plane = ho * wo;
        let mut out = vec![0f32; batch * c_out * plane];
        // The bias first; every GEMM below accumulates.
        out.par_chunks_mut(plane)
            .enumerate()
            .for_each(|(i, p)| p.fill(bias[i % c_out]));
        let wt = contiguous_f32(ws, wl, self.name(), "weight")?;
        let ck = c * k * k;
        let direct = k == 1 && self.stride == 1 && self.padding == 0;
        let band_rows = (BAND_BYTES / (4 * ck * wo).max(1)).clamp(1, ho);
        let mut cols = if direct {
            Vec::new()
        } else {
            vec![0f32; ck * band_rows * wo]
        };
        for (img, dst) in x.chunks(c * h * w).zip(out.chunks_mut(c_out * plane)) {
            if direct {
                let big = c_out * plane * c >= 1 << 18;
                gemm(
                    (c_out, plane, c),
                    dst,
                    plane,
                    true,
                    Operand::rows(wt, c),
                    Operand::rows(img, plane),
                    big,
                );
                continue;
            }
            let mut oy0 = 0;
            while oy0 < ho {
                let rows = band_rows.min(ho - oy0);
                let n = rows * wo;
                let band = &mut cols[..ck * n];
                self.patches(img, (c, h, w), k, oy0, rows, band);
                gemm(
                    (c_out, n, ck),
                    &mut dst[oy0 * wo..],
                    plane,
                    true,
                    Operand::rows(wt, ck),
                    Operand::rows(band, n),
                    c_out * n * ck >= 1 << 18,
                );
                oy0 += rows;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((batch, c_out, ho, wo))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn matches_candle_conv_in_every_geometry() -> Result<()> {
        let dev = Device::Cpu;
        // (batch, channels, h, w, c_out, k, stride, padding)
        for &(b, c, h, w, o, k, s, p) in &[
            (2, 3, 9, 7, 5, 3, 1, 1),
            (1, 4, 8, 8, 6, 3, 2, 0),
            (2, 4, 9, 11, 3, 3, 2, 1),
            (1, 5, 6, 6, 7, 1, 1, 0),
            (1, 2, 5, 4, 3, 1, 2, 0),
            (2, 3, 4, 4, 2, 3, 1, 0),
            (1, 2, 3, 5, 2, 3, 1, 2),
        ] {
            let x = Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (o, c, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 1.0, o, &dev)?;
            let ours = x.apply_op3_no_bwd(
                &wt,
                &bias,
                &ConvGemm {
                    stride: s,
                    padding: p,
                },
            )?;
            let theirs = x
                .conv2d(&wt, p, s, 1, 1)?
                .broadcast_add(&bias.reshape((1, o, 1, 1))?)?;
            assert_eq!(ours.dims(), theirs.dims());
            let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "{b} {c} {h} {w} {o} k{k} s{s} p{p}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn banded_patches_equal_one_band() -> Result<()> {
        // 64 channels · 9 taps · 4 bytes · 40 columns = 92 kB a row: a 16 MB band holds every
        // row of a 40×40 image, so make a tall image that needs several bands.
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 64, 200, 40), &dev)?;
        let wt = Tensor::randn(0f32, 1.0, (8, 64, 3, 3), &dev)?;
        let bias = Tensor::zeros(8, candle_core::DType::F32, &dev)?;
        let ours = x.apply_op3_no_bwd(
            &wt,
            &bias,
            &ConvGemm {
                stride: 1,
                padding: 1,
            },
        )?;
        let theirs = x.conv2d(&wt, 1, 1, 1, 1)?;
        let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-3, "{diff}");
        Ok(())
    }
}
