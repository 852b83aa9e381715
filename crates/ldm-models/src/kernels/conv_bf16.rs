//! The CPU inference convolution with bf16 weights ([`crate::layers::compute_dtype`]): f32 activations,
//! bf16 operands, f32 accumulation on [`super::bf16_gemm`]'s kernels. The weight is reordered
//! once, when the layer is built, to `[C_out, k·k, ⌈C/2⌉]` words — for each output channel and
//! tap, the input channels in pairs — the layout both paths multiply by:
//! - stride 1 with an output width a multiple of 16 (every convolution of the SD U-Nets and VAEs
//!   above 8×8 latents): an implicit GEMM ([`bf16_gemm::conv`]) over the input converted once to
//!   padded rows of channel pairs, so no patch matrix is built;
//! - otherwise (the stride-2 downsamplers, small or odd widths): bands of the patch matrix,
//!   packed straight from the image in the same (tap, channel pair) order, and a GEMM.
//!
//! The bias initialises the output. No backward: bf16 weights are for inference.

use super::bf16_gemm::{self, PackedRef, LANES};
use super::conv_gemm::BAND_BYTES;
use super::cpu::contiguous_f32;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::Arc;

/// A `[C_out, C, k, k]` weight as `[C_out, k·k, ⌈C/2⌉]` bf16 pairs (an odd `C` pads each tap's
/// last pair with a zero).
#[derive(Debug, Clone)]
pub struct PackedConv {
    words: Vec<u32>,
    pub c_out: usize,
    pub c_in: usize,
    pub k: usize,
}

impl PackedConv {
    /// From the weight's bf16 bits, row-major `[C_out, C, k, k]`.
    pub fn from_bf16(bits: &[u16], c_out: usize, c_in: usize, k: usize) -> Self {
        assert_eq!(bits.len(), c_out * c_in * k * k, "PackedConv: weight size");
        let (taps, pairs) = (k * k, c_in.div_ceil(2));
        let mut words = vec![0u32; c_out * taps * pairs];
        if !words.is_empty() {
            words
                .par_chunks_mut(taps * pairs)
                .enumerate()
                .for_each(|(o, row)| {
                    let w = &bits[o * c_in * taps..(o + 1) * c_in * taps];
                    for t in 0..taps {
                        for p in 0..pairs {
                            let lo = w[2 * p * taps + t] as u32;
                            let hi = if 2 * p + 1 < c_in {
                                w[(2 * p + 1) * taps + t] as u32
                            } else {
                                0
                            };
                            row[t * pairs + p] = lo | (hi << 16);
                        }
                    }
                });
        }
        Self {
            words,
            c_out,
            c_in,
            k,
        }
    }

    fn pairs(&self) -> usize {
        self.c_in.div_ceil(2)
    }
}

/// `[B, C, H, W]` (f32) ⊛ a [`PackedConv`] + `[C_out]` (f32), stride and zero padding.
#[derive(Debug, Clone)]
pub struct ConvBf16 {
    pub weight: Arc<PackedConv>,
    pub stride: usize,
    pub padding: usize,
}

impl ConvBf16 {
    fn out(&self, n: usize) -> usize {
        (n + 2 * self.padding - self.weight.k) / self.stride + 1
    }

    /// Stride 1, output width a multiple of 16: the input as `[H_p, pairs, W_p]` words, then
    /// [`bf16_gemm::conv`] per image.
    fn implicit(&self, x: &[f32], (c, h, w): (usize, usize, usize), out: &mut [f32]) {
        let pw = &self.weight;
        let (k, pairs, pad) = (pw.k, pw.pairs(), self.padding);
        let (ho, wo) = (self.out(h), self.out(w));
        let (hp, wp) = (h + 2 * pad, w + 2 * pad);
        let row_stride = pairs * wp;
        let taps: Vec<usize> = (0..k * k).map(|t| (t / k) * row_stride + t % k).collect();
        let mut input = vec![0u32; hp * row_stride];
        for (img, dst) in x.chunks(c * h * w).zip(out.chunks_mut(pw.c_out * ho * wo)) {
            input[pad * row_stride..(pad + h) * row_stride]
                .par_chunks_mut(row_stride)
                .enumerate()
                .for_each(|(y, lines)| {
                    for (p, line) in lines.chunks_exact_mut(wp).enumerate() {
                        let lo = &img[(2 * p * h + y) * w..][..w];
                        let hi = (2 * p + 1 < c).then(|| &img[((2 * p + 1) * h + y) * w..][..w]);
                        bf16_gemm::pair_slices(&mut line[pad..pad + w], lo, hi);
                    }
                });
            let ops = bf16_gemm::ConvOperands {
                weight: &pw.words,
                input: &input,
                pairs,
                taps: &taps,
                row_stride,
                pair_stride: wp,
                out_hw: (ho, wo),
            };
            let parallel = pw.c_out * ho * wo * c * k * k >= 1 << 18;
            bf16_gemm::conv(pw.c_out, ops, dst, parallel);
        }
    }

    /// Any geometry: bands of the patch matrix packed from the image, one GEMM each.
    fn banded(&self, x: &[f32], (c, h, w): (usize, usize, usize), out: &mut [f32]) {
        let pw = &self.weight;
        let (k, pairs) = (pw.k, pw.pairs());
        let (ho, wo) = (self.out(h), self.out(w));
        let plane = ho * wo;
        // Rows of the patch matrix: (tap, channel), channels padded to 2·pairs.
        let rows_k = k * k * 2 * pairs;
        let band_rows = (BAND_BYTES / (2 * rows_k * wo).max(1)).clamp(1, ho);
        let mut cols = vec![0u32; bf16_gemm::packed_len(rows_k, band_rows * wo)];
        for (img, dst) in x.chunks(c * h * w).zip(out.chunks_mut(pw.c_out * plane)) {
            let mut oy0 = 0;
            while oy0 < ho {
                let rows = band_rows.min(ho - oy0);
                let n = rows * wo;
                let len = bf16_gemm::packed_len(rows_k, n);
                let src = Patches {
                    conv: self,
                    img,
                    dims: (c, h, w),
                    oy0,
                    n,
                };
                bf16_gemm::pack(&mut cols[..len], rows_k, n, &src);
                let b = PackedRef {
                    data: &cols[..len],
                    pairs: rows_k / 2,
                    n,
                };
                let parallel = pw.c_out * n * rows_k >= 1 << 18;
                let dst = &mut dst[oy0 * wo..];
                bf16_gemm::gemm(
                    pw.c_out,
                    &pw.words,
                    rows_k / 2,
                    b,
                    dst,
                    plane,
                    true,
                    parallel,
                );
                oy0 += rows;
            }
        }
    }
}

/// The patch matrix of output rows `oy0 ..` of one image, rows ordered (tap, channel) with the
/// channels padded to an even count, as [`bf16_gemm::Segments`]: a stride-1 segment inside an
/// input line is a slice of it; others are gathered with zeros for the padding.
struct Patches<'a> {
    conv: &'a ConvBf16,
    img: &'a [f32],
    dims: (usize, usize, usize),
    oy0: usize,
    /// Columns (output pixels) of the band.
    n: usize,
}

impl bf16_gemm::Segments for Patches<'_> {
    #[inline(always)]
    fn rows(&self, rows: Range<usize>, col0: usize, emit: &mut impl FnMut(&[f32; LANES])) {
        let (c, h, w) = self.dims;
        let k = self.conv.weight.k;
        let channels = 2 * self.conv.weight.pairs();
        let wo = self.conv.out(w);
        let (s, p) = (self.conv.stride, self.conv.padding as isize);
        let (r, ox) = (col0 / wo, col0 % wo);
        // The block's 16 pixels lie in one output row and are all real.
        let one_row = col0 + LANES <= self.n && ox + LANES <= wo;
        let mut buf = [0f32; LANES];
        const ZERO: [f32; LANES] = [0.0; LANES];
        for row in rows {
            let (t, ci) = (row / channels, row % channels);
            if ci >= c {
                emit(&ZERO);
                continue;
            }
            let (ki, kj) = (t / k, t % k);
            let plane = &self.img[ci * h * w..(ci + 1) * h * w];
            let iy = ((self.oy0 + r) * s + ki) as isize - p;
            let ix = (ox * s + kj) as isize - p;
            let inside_row = iy >= 0 && iy < h as isize;
            if s == 1 && one_row && inside_row && ix >= 0 && ix as usize + LANES <= w {
                let at = iy as usize * w + ix as usize;
                emit(plane[at..at + LANES].try_into().expect("16 elements"));
                continue;
            }
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
    }
}

impl CustomOp2 for ConvBf16 {
    fn name(&self) -> &'static str {
        "conv2d-bf16"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, c, h, w) = xl.shape().dims4()?;
        let pw = &self.weight;
        if pw.c_in != c || bl.shape().elem_count() != pw.c_out {
            candle_core::bail!(
                "conv_bf16: weight [{}, {}, {k}, {k}] / bias {:?} do not fit input {:?}",
                pw.c_out,
                pw.c_in,
                bl.shape(),
                xl.shape(),
                k = pw.k
            );
        }
        let k = pw.k;
        if h + 2 * self.padding < k || w + 2 * self.padding < k || self.stride == 0 {
            candle_core::bail!("conv_bf16: kernel {k} larger than the padded input {h}×{w}");
        }
        let x = contiguous_f32(xs, xl, self.name(), "input")?;
        let bias = contiguous_f32(bs, bl, self.name(), "bias")?;
        let (ho, wo) = (self.out(h), self.out(w));
        let plane = ho * wo;
        let mut out = vec![0f32; batch * pw.c_out * plane];
        out.par_chunks_mut(plane.max(1))
            .enumerate()
            .for_each(|(i, p)| p.fill(bias[i % pw.c_out]));
        if self.stride == 1 && wo.is_multiple_of(LANES) {
            self.implicit(x, (c, h, w), &mut out);
        } else {
            self.banded(x, (c, h, w), &mut out);
        }
        Ok((CpuStorage::F32(out), Shape::from((batch, pw.c_out, ho, wo))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    /// Every geometry against candle's f32 convolution of the bf16-rounded input and weight:
    /// the banded path (odd widths, stride 2, odd channel counts, several bands) and the
    /// implicit one (output widths of 16s: odd channels, 1×1, no padding, several blocks of
    /// channel pairs, output channels not a multiple of the tile).
    #[test]
    fn matches_the_rounded_f32_convolution() -> Result<()> {
        if !bf16_gemm::available() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let round = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
        for &(b, c, h, w, o, k, s, p) in &[
            (2, 3, 9, 7, 5, 3, 1, 1),
            (1, 4, 8, 8, 6, 3, 2, 0),
            (2, 4, 9, 11, 3, 3, 2, 1),
            (1, 5, 6, 6, 7, 1, 1, 0),
            (1, 3, 3, 5, 2, 3, 1, 2),
            (1, 5, 17, 33, 4, 3, 2, 1),
            // 16 MB bands of 64·9·2 bytes × 40 columns a row: 364 rows, so two bands.
            (1, 64, 400, 40, 20, 3, 1, 1),
            (2, 5, 6, 32, 7, 3, 1, 1),
            (1, 8, 5, 18, 9, 3, 1, 0),
            (1, 6, 4, 16, 5, 1, 1, 0),
            (1, 160, 6, 32, 10, 3, 1, 1),
            (1, 3, 20, 48, 17, 3, 1, 1),
        ] {
            let x = Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (o, c, k, k), &dev)?.to_dtype(DType::BF16)?;
            let bias = Tensor::randn(0f32, 1.0, o, &dev)?;
            let bits = bf16_gemm::tensor_bits(&wt)?;
            let op = ConvBf16 {
                weight: Arc::new(PackedConv::from_bf16(&bits, o, c, k)),
                stride: s,
                padding: p,
            };
            let ours = x.apply_op2_no_bwd(&bias, &op)?;
            let theirs = round(&x)?
                .conv2d(&wt.to_dtype(DType::F32)?, p, s, 1, 1)?
                .broadcast_add(&bias.reshape((1, o, 1, 1))?)?;
            assert_eq!(ours.dims(), theirs.dims());
            let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-3, "{b} {c} {h} {w} {o} k{k} s{s} p{p}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn mismatched_shapes_are_errors() -> Result<()> {
        let dev = Device::Cpu;
        let op = ConvBf16 {
            weight: Arc::new(PackedConv::from_bf16(&[0; 2 * 3 * 9], 2, 3, 3)),
            stride: 1,
            padding: 0,
        };
        let bias = Tensor::zeros(2, DType::F32, &dev)?;
        assert!(Tensor::zeros((1, 4, 5, 5), DType::F32, &dev)?
            .apply_op2_no_bwd(&bias, &op)
            .is_err());
        assert!(Tensor::zeros((1, 3, 2, 2), DType::F32, &dev)?
            .apply_op2_no_bwd(&bias, &op)
            .is_err());
        Ok(())
    }
}
