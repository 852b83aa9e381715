//! The CPU inference convolution: `out[b] = W · cols(x[b]) + bias`, where `W` is the
//! `[C_out, C·k·k]` weight and `cols` the `[C·k·k, H_out·W_out]` patch matrix (Caffe's layout,
//! so the product lands directly in NCHW). The patch matrix is built for a band of output rows
//! at a time, so its memory stays bounded (about [`BAND_BYTES`]) whatever the image size, and
//! each band is one large GEMM (the `gemm` crate's AVX-512/AVX2 kernels, on rayon). 1×1
//! convolutions skip the patches: the input already is the matrix. The bias initialises the
//! output, which the GEMM then accumulates into.
//!
//! This path has no backward; training uses [`super::conv::conv2d_im2col`].

use super::bf16_gemm::{self, PackedRef, LANES};
use super::cpu::{contiguous, contiguous_f32, gemm, Operand};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;
use std::ops::Range;

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

impl ConvGemm {
    /// The bf16 path: the `[C_out, C·k·k]` weight's rows are already the kernel's pairs (a
    /// padded copy when `C·k·k` is odd or the slice is not word-aligned); each band of patches
    /// is packed straight from the image, rounded to bf16.
    fn forward_bf16(
        &self,
        x: &[f32],
        (c, h, w): (usize, usize, usize),
        wt: &[half::bf16],
        c_out: usize,
        k: usize,
        out: &mut [f32],
    ) {
        let (ho, wo) = (self.out(h, k), self.out(w, k));
        let plane = ho * wo;
        let ck = c * k * k;
        let pairs = ck.div_ceil(2);
        // SAFETY: bf16 is a 16-bit plain value; reading it as u16 is a reinterpretation.
        let bits: &[u16] =
            unsafe { std::slice::from_raw_parts(wt.as_ptr() as *const u16, wt.len()) };
        // SAFETY: u16 pairs read as u32 words (little-endian: the even element in the low
        // half), used only when the slice is word-aligned.
        let (head, words, _) = unsafe { bits.align_to::<u32>() };
        let owned: Vec<u32>;
        let a: &[u32] = if ck.is_multiple_of(2) && head.is_empty() && words.len() >= c_out * pairs {
            &words[..c_out * pairs]
        } else {
            owned = (0..c_out * pairs)
                .map(|i| {
                    let (o, p) = (i / pairs, i % pairs);
                    let lo = bits[o * ck + 2 * p] as u32;
                    let hi = if 2 * p + 1 < ck {
                        bits[o * ck + 2 * p + 1] as u32
                    } else {
                        0
                    };
                    lo | (hi << 16)
                })
                .collect();
            &owned
        };
        if self.stride == 1 && wo % LANES == 0 {
            return self.implicit_bf16(x, (c, h, w), bits, c_out, k, out);
        }
        let band_rows = (BAND_BYTES / (2 * ck * wo).max(1)).clamp(1, ho);
        let mut cols = vec![0u32; bf16_gemm::packed_len(ck, band_rows * wo)];
        for (img, dst) in x.chunks(c * h * w).zip(out.chunks_mut(c_out * plane)) {
            let mut oy0 = 0;
            while oy0 < ho {
                let rows = band_rows.min(ho - oy0);
                let n = rows * wo;
                let len = bf16_gemm::packed_len(ck, n);
                let src = Patches {
                    conv: self,
                    img,
                    dims: (c, h, w),
                    k,
                    oy0,
                    n,
                };
                bf16_gemm::pack(&mut cols[..len], ck, n, &src);
                let b = PackedRef {
                    data: &cols[..len],
                    pairs,
                    n,
                };
                let parallel = c_out * n * ck >= 1 << 18;
                bf16_gemm::gemm(
                    c_out,
                    a,
                    pairs,
                    b,
                    &mut dst[oy0 * wo..],
                    plane,
                    true,
                    parallel,
                );
                oy0 += rows;
            }
        }
    }
}

impl ConvGemm {
    /// Stride 1 with an output width a multiple of 16: [`bf16_gemm::conv`] reads the padded
    /// input in place for every tap, so no patch matrix is built; the weight is reordered to
    /// `[C_out, k·k, C/2]` channel pairs.
    fn implicit_bf16(
        &self,
        x: &[f32],
        (c, h, w): (usize, usize, usize),
        bits: &[u16],
        c_out: usize,
        k: usize,
        out: &mut [f32],
    ) {
        let (ho, wo) = (self.out(h, k), self.out(w, k));
        let pairs = c.div_ceil(2);
        let taps = k * k;
        let pad = self.padding;
        let (hp, wp) = (h + 2 * pad, w + 2 * pad);
        let mut weight = vec![0u32; c_out * taps * pairs];
        weight
            .par_chunks_mut(taps * pairs)
            .enumerate()
            .for_each(|(o, row)| {
                let wo_ = &bits[o * c * taps..(o + 1) * c * taps];
                for t in 0..taps {
                    for p in 0..pairs {
                        let lo = wo_[2 * p * taps + t] as u32;
                        let hi = if 2 * p + 1 < c {
                            wo_[(2 * p + 1) * taps + t] as u32
                        } else {
                            0
                        };
                        row[t * pairs + p] = lo | (hi << 16);
                    }
                }
            });
        let row_stride = pairs * wp;
        let tap_offsets: Vec<usize> = (0..taps).map(|t| (t / k) * row_stride + t % k).collect();
        let mut input = vec![0u32; hp * row_stride];
        for (img, dst) in x.chunks(c * h * w).zip(out.chunks_mut(c_out * ho * wo)) {
            input[pad * row_stride..(pad + h) * row_stride]
                .par_chunks_mut(row_stride)
                .enumerate()
                .for_each(|(y, lines)| {
                    for (p, line) in lines.chunks_exact_mut(wp).enumerate() {
                        let line = &mut line[pad..pad + w];
                        let lo = &img[(2 * p * h + y) * w..][..w];
                        let hi = (2 * p + 1 < c).then(|| &img[((2 * p + 1) * h + y) * w..][..w]);
                        bf16_gemm::pair_slices(line, lo, hi);
                    }
                });
            let ops = bf16_gemm::ConvOperands {
                weight: &weight,
                input: &input,
                pairs,
                taps: &tap_offsets,
                row_stride,
                pair_stride: wp,
                out_hw: (ho, wo),
            };
            let parallel = c_out * ho * wo * c * taps >= 1 << 18;
            bf16_gemm::conv(c_out, ops, dst, parallel);
        }
    }
}

/// The patch matrix of output rows `oy0 ..` of one image (see [`ConvGemm::patches`]) as
/// [`bf16_gemm::Segments`]: a stride-1 segment inside an input line is a slice of it; others are
/// gathered with zeros for the padding.
struct Patches<'a> {
    conv: &'a ConvGemm,
    img: &'a [f32],
    dims: (usize, usize, usize),
    k: usize,
    oy0: usize,
    /// Columns (output pixels) of the band.
    n: usize,
}

impl bf16_gemm::Segments for Patches<'_> {
    /// Two channels' taps: the group reads `2·k` input lines, streaming along them.
    fn group(&self) -> usize {
        2 * self.k * self.k
    }

    #[inline(always)]
    fn rows(&self, rows: Range<usize>, col0: usize, emit: &mut impl FnMut(&[f32; LANES])) {
        let (_, h, w) = self.dims;
        let k = self.k;
        let wo = self.conv.out(w, k);
        let (s, p) = (self.conv.stride, self.conv.padding as isize);
        let (r, ox) = (col0 / wo, col0 % wo);
        // The block's 16 pixels lie in one output row and are all real.
        let one_row = col0 + LANES <= self.n && ox + LANES <= wo;
        let mut buf = [0f32; LANES];
        let (mut ci, mut ki, mut kj) = (rows.start / (k * k), rows.start / k % k, rows.start % k);
        for _ in rows {
            let plane = &self.img[ci * h * w..(ci + 1) * h * w];
            let iy = ((self.oy0 + r) * s + ki) as isize - p;
            let ix = (ox * s + kj) as isize - p;
            if s == 1
                && one_row
                && iy >= 0
                && iy < h as isize
                && ix >= 0
                && ix as usize + LANES <= w
            {
                let at = iy as usize * w + ix as usize;
                emit(plane[at..at + LANES].try_into().expect("16 elements"));
            } else {
                for (i, v) in buf.iter_mut().enumerate() {
                    let col = col0 + i;
                    let (r, ox) = (col / wo, col % wo);
                    let iy = ((self.oy0 + r) * s + ki) as isize - p;
                    let ix = (ox * s + kj) as isize - p;
                    let inside = iy >= 0 && iy < h as isize && ix >= 0 && ix < w as isize;
                    *v = if col < self.n && inside {
                        plane[iy as usize * w + ix as usize]
                    } else {
                        0.0
                    };
                }
                emit(&buf);
            }
            kj += 1;
            if kj == k {
                kj = 0;
                ki += 1;
                if ki == k {
                    ki = 0;
                    ci += 1;
                }
            }
        }
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
        if let CpuStorage::BF16(wt) = ws {
            let wt = contiguous(wt, wl, self.name())?;
            self.forward_bf16(x, (c, h, w), wt, c_out, k, &mut out);
            return Ok((CpuStorage::F32(out), Shape::from((batch, c_out, ho, wo))));
        }
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

    /// bf16 weights: the same geometries against candle's f32 convolution of the
    /// bf16-rounded input and weight (odd `C·k·k` included), and several bands.
    #[test]
    fn bf16_weights_match_the_rounded_f32_convolution() -> Result<()> {
        if !bf16_gemm::available() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let round = |t: &Tensor| t.to_dtype(candle_core::DType::BF16);
        for &(b, c, h, w, o, k, s, p) in &[
            (2, 3, 9, 7, 5, 3, 1, 1),
            (1, 4, 8, 8, 6, 3, 2, 0),
            (2, 4, 9, 11, 3, 3, 2, 1),
            (1, 5, 6, 6, 7, 1, 1, 0),
            (1, 2, 3, 5, 2, 3, 1, 2),
            // 16 MB bands of 64·9·2 bytes × 40 columns a row: 364 rows, so two bands.
            (1, 64, 400, 40, 20, 3, 1, 1),
            // Output widths of 16s: the implicit GEMM (odd channels, 1×1, no padding, several
            // blocks of channel pairs, output channels not a multiple of the tile).
            (2, 5, 6, 32, 7, 3, 1, 1),
            (1, 8, 5, 18, 9, 3, 1, 0),
            (1, 6, 4, 16, 5, 1, 1, 0),
            (1, 160, 6, 32, 10, 3, 1, 1),
            (1, 3, 20, 48, 17, 3, 1, 1),
        ] {
            let x = Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (o, c, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 1.0, o, &dev)?;
            let op = ConvGemm {
                stride: s,
                padding: p,
            };
            let ours = x.apply_op3_no_bwd(&round(&wt)?, &bias, &op)?;
            let f32_of = |t: &Tensor| round(t)?.to_dtype(candle_core::DType::F32);
            let theirs = f32_of(&x)?
                .conv2d(&f32_of(&wt)?, p, s, 1, 1)?
                .broadcast_add(&bias.reshape((1, o, 1, 1))?)?;
            assert_eq!(ours.dims(), theirs.dims());
            let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-3, "{b} {c} {h} {w} {o} k{k} s{s} p{p}: {diff}");
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
