//! Matrix products with bf16 inputs and f32 accumulation for CPU inference (what PyTorch's bf16
//! autocast does to a convolution or a linear layer). On CPUs with AVX512-BF16 the inner kernel is
//! `vdpbf16ps`, which adds two bf16 products to each of 16 f32 lanes — twice the work of an f32
//! FMA per instruction and half the bytes per operand; elsewhere a portable loop computes the same
//! sums in f32 (callers normally fall back to f32 weights there, see [`available`]).
//!
//! `C[m×n] += A[m×k] · B[k×n]`, with both inputs as 32-bit words that each hold a pair of bf16
//! values adjacent along `k` (low half the even index):
//! * `A` row-major: row `i` holds words `(A[i,2p], A[i,2p+1])`, `p < ⌈k/2⌉`; an odd `k` pads with
//!   a zero. Each word is broadcast to all lanes.
//! * `B` packed in blocks of 16 columns ([`PackedRef`]): block `j`, pair `p` is the vector of the
//!   16 words `(B[2p, 16j+l], B[2p+1, 16j+l])`; columns past `n` are zero.
//! * `C` f32 row-major; the product is added to what it holds (the caller writes bias or zeros).
//!
//! The register tile is [`MR`] rows × [`NV`]·16 columns (24 accumulators); the loops block `k` by
//! [`KC`] pairs so a tile's slice of `B` stays in L1 while the rows of `A` stream past it, and the
//! tiles are shared out over rayon's threads.

use super::cpu::Operand;
use rayon::prelude::*;
use std::ops::Range;

/// Columns per packed block (one 512-bit vector of f32).
pub const LANES: usize = 16;
/// Rows of the register tile.
pub const MR: usize = 8;
/// Vectors (blocks of 16 columns) of the register tile.
pub const NV: usize = 3;
/// Pairs of `k` per cache block.
pub const KC: usize = 256;

/// Calls the AVX512-BF16 tile function `$f::<MR, NV>` for the runtime tile size `(mr, nv)`,
/// `mr ≤` [`MR`], `nv ≤` [`NV`] (one instance per size, so the accumulators stay in registers).
#[cfg(target_arch = "x86_64")]
macro_rules! dispatch_tile {
    ($f:ident, $size:expr, $args:tt) => {
        dispatch_tile!(@rows $f, $size, $args; 1, 2, 3, 4, 5, 6, 7, 8)
    };
    (@rows $f:ident, $size:expr, $args:tt; $($r:literal),*) => {{
        const _: () = assert!(MR == 8 && NV == 3, "dispatch_tile lists rows 1..=8, vectors 1..=3");
        match $size {
            $( ($r, 1) => avx512::$f::<$r, 1> $args,
               ($r, 2) => avx512::$f::<$r, 2> $args,
               ($r, 3) => avx512::$f::<$r, 3> $args, )*
            (mr, nv) => unreachable!("tile {mr}×{nv}"),
        }
    }};
}

/// Whether the running CPU has the AVX512-BF16 kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x` rounded to the nearest bf16 (ties to even), as its 16 bits; NaN stays NaN.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    if x.is_nan() {
        (b >> 16) | 0x40
    } else {
        rounded
    }
}

/// The word holding `lo` (even index) and `hi` (odd index) as bf16.
#[inline(always)]
pub fn pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) | (bf16_bits(hi) << 16)
}

/// The f32 value of a bf16 held in the low 16 bits.
#[inline(always)]
pub fn bf16_to_f32(bits: u32) -> f32 {
    f32::from_bits(bits << 16)
}

/// `dst[i] = pair(lo[i], hi[i])` (`hi` zero when absent), vectorised for the running CPU.
pub fn pair_slices(dst: &mut [u32], lo: &[f32], hi: Option<&[f32]>) {
    #[inline(always)]
    fn body(dst: &mut [u32], lo: &[f32], hi: Option<&[f32]>) {
        match hi {
            Some(hi) => {
                for ((d, &a), &b) in dst.iter_mut().zip(lo).zip(hi) {
                    *d = pair(a, b);
                }
            }
            None => {
                for (d, &a) in dst.iter_mut().zip(lo) {
                    *d = pair(a, 0.0);
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        #[target_feature(enable = "avx512f")]
        unsafe fn wide(dst: &mut [u32], lo: &[f32], hi: Option<&[f32]>) {
            body(dst, lo, hi)
        }
        // SAFETY: the CPU has the feature the function is compiled for.
        return unsafe { wide(dst, lo, hi) };
    }
    body(dst, lo, hi)
}

/// A bf16 tensor's elements as bits, row-major (for packing a weight once).
pub fn tensor_bits(t: &candle_core::Tensor) -> candle_core::Result<Vec<u16>> {
    Ok(t.flatten_all()?
        .to_dtype(candle_core::DType::BF16)?
        .to_vec1::<half::bf16>()?
        .into_iter()
        .map(|v| v.to_bits())
        .collect())
}

/// f32 rows `[rows, k]` (row stride `ld`) → words `[rows, ⌈k/2⌉]`, in parallel.
pub fn pair_rows(src: &[f32], rows: usize, k: usize, ld: usize, dst: &mut [u32]) {
    let pairs = k.div_ceil(2);
    assert!(dst.len() >= rows * pairs && (rows == 0 || src.len() >= (rows - 1) * ld + k));
    dst[..rows * pairs]
        .par_chunks_mut(pairs.max(1))
        .enumerate()
        .for_each(|(r, out)| {
            let row = &src[r * ld..r * ld + k];
            let (even, odd) = row.split_at(k - k % 2);
            for (w, p) in out.iter_mut().zip(even.chunks_exact(2)) {
                *w = pair(p[0], p[1]);
            }
            if let Some(&last) = odd.first() {
                out[pairs - 1] = pair(last, 0.0);
            }
        });
}

/// A packed `B` (see the module's documentation), borrowed.
#[derive(Clone, Copy, Debug)]
pub struct PackedRef<'a> {
    pub data: &'a [u32],
    /// `⌈k/2⌉`.
    pub pairs: usize,
    /// Columns.
    pub n: usize,
}

/// Words a packed `[k, n]` matrix takes.
pub fn packed_len(k: usize, n: usize) -> usize {
    k.div_ceil(2) * n.div_ceil(LANES) * LANES
}

/// Where [`pack`] reads `B[k×n]` from: 16 consecutive columns of a run of rows at a time.
pub trait Segments: Sync {
    /// Rows per group (even): [`pack`] visits groups of rows outermost and blocks of columns
    /// within them, so a source that reads several input lines per row group streams them.
    fn group(&self) -> usize {
        64
    }

    /// Calls `emit` with `B[row, col0 .. col0 + 16]` for each `row` of `rows` in order
    /// (columns past `n` zero).
    fn rows(&self, rows: Range<usize>, col0: usize, emit: &mut impl FnMut(&[f32; LANES]));
}

/// A row-major f32 matrix `[k, n]` with rows `ld` apart.
pub struct Rows<'a> {
    pub data: &'a [f32],
    pub n: usize,
    pub ld: usize,
}

impl Segments for Rows<'_> {
    #[inline(always)]
    fn rows(&self, rows: Range<usize>, col0: usize, emit: &mut impl FnMut(&[f32; LANES])) {
        let width = (self.n - col0).min(LANES);
        let mut buf = [0f32; LANES];
        for row in rows {
            let at = row * self.ld + col0;
            if width == LANES {
                emit(self.data[at..at + LANES].try_into().expect("16 elements"));
            } else {
                buf[..width].copy_from_slice(&self.data[at..at + width]);
                emit(&buf);
            }
        }
    }
}

/// Blocks of columns per parallel task of [`pack`].
const PACK_BLOCKS: usize = 8;

/// Packs `B[k×n]` into `dst` (at least [`packed_len`] words), in parallel over blocks,
/// rounding to bf16.
pub fn pack(dst: &mut [u32], k: usize, n: usize, src: &impl Segments) {
    let pairs = k.div_ceil(2);
    assert!(dst.len() >= packed_len(k, n));
    if pairs == 0 {
        return;
    }
    let group = src.group().max(2).next_multiple_of(2);
    dst[..packed_len(k, n)]
        .par_chunks_mut(pairs * LANES * PACK_BLOCKS)
        .enumerate()
        .for_each(|(t, blocks)| {
            let col0 = t * PACK_BLOCKS * LANES;
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx512f") {
                #[target_feature(enable = "avx512f")]
                unsafe fn wide(
                    blocks: &mut [u32],
                    (k, pairs, group, col0): (usize, usize, usize, usize),
                    src: &impl Segments,
                ) {
                    pack_blocks(blocks, (k, pairs, group, col0), src)
                }
                // SAFETY: the CPU has the feature the function is compiled for.
                return unsafe { wide(blocks, (k, pairs, group, col0), src) };
            }
            pack_blocks(blocks, (k, pairs, group, col0), src)
        });
}

/// Consecutive blocks starting at column `col0`, a group of rows at a time; rows are paired
/// as they arrive (groups are even, so pairs never straddle two), an odd last row with zeros.
#[inline(always)]
fn pack_blocks(
    blocks: &mut [u32],
    (k, pairs, group, col0): (usize, usize, usize, usize),
    src: &impl Segments,
) {
    let mut g0 = 0;
    while g0 < k {
        let g1 = (g0 + group).min(k);
        for (b, block) in blocks.chunks_exact_mut(pairs * LANES).enumerate() {
            let out = &mut block[g0 / 2 * LANES..g1.div_ceil(2) * LANES];
            let mut words = out.chunks_exact_mut(LANES);
            let mut even = [0f32; LANES];
            let mut have_even = false;
            let mut put = |lo: &[f32; LANES], hi: &[f32; LANES]| {
                let out: &mut [u32] = words.next().expect("a word vector per pair");
                for l in 0..LANES {
                    out[l] = pair(lo[l], hi[l]);
                }
            };
            src.rows(g0..g1, col0 + b * LANES, &mut |seg| {
                if have_even {
                    put(&even, seg);
                } else {
                    even = *seg;
                }
                have_even = !have_even;
            });
            if have_even {
                put(&even, &[0.0; LANES]);
            }
        }
        g0 = g1;
    }
}

/// Packs `B = Xᵀ` for f32 `X` `[n, k]` (row-major, rows `k` apart) into `dst` (at least
/// [`packed_len`] words): attention's keys, whose rows become the columns of the scores.
pub fn pack_transposed(dst: &mut [u32], x: &[f32], n: usize, k: usize) {
    let pairs = k.div_ceil(2);
    assert!(dst.len() >= packed_len(k, n) && x.len() >= n * k);
    if pairs == 0 {
        return;
    }
    for (j, block) in dst[..packed_len(k, n)]
        .chunks_exact_mut(pairs * LANES)
        .enumerate()
    {
        pack_transposed_block(block, j, (x, k), n, k);
    }
}

/// Block `j` (columns `16j ..`) of the packed `B = Xᵀ`, `X` given as (elements, row stride):
/// each row of `X` read in order, its pairs written 16 words apart.
fn pack_transposed_block(
    block: &mut [u32],
    j: usize,
    (x, ld): (&[f32], usize),
    n: usize,
    k: usize,
) {
    let pairs = k.div_ceil(2);
    for l in 0..LANES {
        let col = j * LANES + l;
        if col >= n {
            for p in 0..pairs {
                block[p * LANES + l] = 0;
            }
            continue;
        }
        let row = &x[col * ld..col * ld + k];
        let (even, odd) = row.split_at(k - k % 2);
        for (p, w) in even.chunks_exact(2).enumerate() {
            block[p * LANES + l] = pair(w[0], w[1]);
        }
        if let Some(&last) = odd.first() {
            block[(pairs - 1) * LANES + l] = pair(last, 0.0);
        }
    }
}

/// A packed `B` that owns its words: a constant weight, packed once when loaded.
#[derive(Clone, Debug)]
pub struct PackedB {
    data: Vec<u32>,
    k: usize,
    n: usize,
}

impl PackedB {
    /// `B = Wᵀ` for `W` `[n, k]` given as bf16 bits, row-major.
    pub fn from_transposed_bf16(w: &[u16], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "PackedB: weight size");
        let pairs = k.div_ceil(2);
        let mut data = vec![0u32; packed_len(k, n)];
        if pairs > 0 {
            data.par_chunks_mut(pairs * LANES)
                .enumerate()
                .for_each(|(j, block)| {
                    for l in 0..LANES.min(n - j * LANES) {
                        let row = &w[(j * LANES + l) * k..(j * LANES + l + 1) * k];
                        for p in 0..pairs {
                            let hi = row.get(2 * p + 1).copied().unwrap_or(0) as u32;
                            block[p * LANES + l] = row[2 * p] as u32 | (hi << 16);
                        }
                    }
                });
        }
        Self { data, k, n }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn view(&self) -> PackedRef<'_> {
        PackedRef {
            data: &self.data,
            pairs: self.k.div_ceil(2),
            n: self.n,
        }
    }

    /// `B[row, col]` as f32.
    pub fn get(&self, row: usize, col: usize) -> f32 {
        let word = self.data[((col / LANES) * self.k.div_ceil(2) + row / 2) * LANES + col % LANES];
        bf16_to_f32(if row.is_multiple_of(2) {
            word & 0xffff
        } else {
            word >> 16
        })
    }
}

/// `C[m×n] += A · B` (`accumulate`), else `C = A · B` (layouts in the module's documentation);
/// `a` rows are `lda` words apart, `c` rows `ldc` floats apart. On rayon's threads when
/// `parallel`.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    a: &[u32],
    lda: usize,
    b: PackedRef,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) {
    let (n, pairs) = (b.n, b.pairs);
    if m == 0 || n == 0 {
        return;
    }
    if pairs == 0 {
        if !accumulate {
            for r in 0..m {
                c[r * ldc..r * ldc + n].fill(0.0);
            }
        }
        return;
    }
    let blocks = n.div_ceil(LANES);
    assert!(
        lda >= pairs && a.len() >= (m - 1) * lda + pairs,
        "bf16 gemm: A too short"
    );
    assert!(
        b.data.len() >= blocks * pairs * LANES,
        "bf16 gemm: B too short"
    );
    assert!(
        ldc >= n && c.len() >= (m - 1) * ldc + n,
        "bf16 gemm: C too short"
    );
    let fast = available();
    let kc_block = pairs.div_ceil(pairs.div_ceil(KC));
    // Tasks: a band of rows × a band of tiles of columns, each writing its own part of C.
    let tile_cols = NV * LANES;
    let col_tiles = n.div_ceil(tile_cols);
    let tiles_per_task = if m >= 256 { 4 } else { 2 };
    let rows_per_task = if parallel { 64 * MR } else { m };
    let col_tasks = col_tiles.div_ceil(tiles_per_task);
    let row_tasks = m.div_ceil(rows_per_task);
    let c_ptr = SendPtr(c.as_mut_ptr());
    let task = |t: usize| {
        let (rt, ct) = (t / col_tasks, t % col_tasks);
        let rows = rt * rows_per_task..((rt + 1) * rows_per_task).min(m);
        let tiles = ct * tiles_per_task..((ct + 1) * tiles_per_task).min(col_tiles);
        let mut p0 = 0;
        while p0 < pairs {
            let kc = kc_block.min(pairs - p0);
            for tile in tiles.clone() {
                let col0 = tile * tile_cols;
                let cols = (n - col0).min(tile_cols);
                let nv = cols.div_ceil(LANES);
                let mut r = rows.start;
                while r < rows.end {
                    let mr = MR.min(rows.end - r);
                    // SAFETY: the asserts above bound every index the kernel touches: rows
                    // r..r+mr < m of A (pairs p0..p0+kc ≤ pairs) and of C (columns
                    // col0..col0+cols ≤ n), blocks col0/16 .. +nv of B. Tasks write disjoint
                    // (row band × tile band) parts of C.
                    unsafe {
                        let a_ptr = a.as_ptr().add(r * lda + p0);
                        let b_ptr = b
                            .data
                            .as_ptr()
                            .add((col0 / LANES) * pairs * LANES + p0 * LANES);
                        let c_tile = c_ptr.get().add(r * ldc + col0);
                        kernel(
                            fast,
                            (mr, nv),
                            (kc, accumulate || p0 > 0),
                            a_ptr,
                            lda,
                            b_ptr,
                            pairs * LANES,
                            c_tile,
                            ldc,
                            cols,
                        );
                    }
                    r += mr;
                }
            }
            p0 += kc;
        }
    };
    let tasks = row_tasks * col_tasks;
    if parallel && tasks > 1 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// `B[k×n]` read through arbitrary strides: element `(r, c)` at `data[r·row_stride +
/// c·col_stride]` (a transposed operand has `row_stride` 1).
struct Strided<'a>(Operand<'a>, usize);

impl Segments for Strided<'_> {
    #[inline(always)]
    fn rows(&self, rows: Range<usize>, col0: usize, emit: &mut impl FnMut(&[f32; LANES])) {
        let (op, n) = (&self.0, self.1);
        let width = (n - col0).min(LANES);
        let mut buf = [0f32; LANES];
        for row in rows {
            let at = row * op.row_stride + col0 * op.col_stride;
            for (l, v) in buf[..width].iter_mut().enumerate() {
                *v = op.data[at + l * op.col_stride];
            }
            emit(&buf);
        }
    }
}

/// `A[m×k]` (any strides) as rows of bf16 pairs along `k`, `⌈k/2⌉` words a row. Rows are
/// taken 16 at a time so that a transposed source — whose rows are columns in memory — is read
/// a cache line at a time.
fn pair_operand(a: Operand, m: usize, k: usize) -> Vec<u32> {
    let pairs = k.div_ceil(2);
    let mut out = vec![0u32; m * pairs];
    if a.col_stride == 1 {
        pair_rows(a.data, m, k, a.row_stride, &mut out);
        return out;
    }
    const ROWS: usize = 16;
    out.par_chunks_mut((ROWS * pairs).max(1))
        .enumerate()
        .for_each(|(blk, dst)| {
            let i0 = blk * ROWS;
            let rows = dst.len() / pairs.max(1);
            for p in 0..pairs {
                let (lo, hi) = (2 * p, 2 * p + 1);
                for r in 0..rows {
                    let at = (i0 + r) * a.row_stride;
                    let h = if hi < k {
                        a.data[at + hi * a.col_stride]
                    } else {
                        0.0
                    };
                    dst[r * pairs + p] = pair(a.data[at + lo * a.col_stride], h);
                }
            }
        });
    out
}

/// `dst[m×n] = lhs[m×k] · rhs[k×n]` (`accumulate`: `dst +=`) with f32 operands rounded to
/// bf16 as they are paired and packed, products accumulated in f32: the mixed-precision form of
/// [`super::cpu::gemm`], with the same arguments, for training with bf16 products and f32
/// master weights (what PyTorch's bf16 autocast does to a matrix product). Without
/// AVX512-BF16 ([`available`]) the portable kernel computes the same rounded sums.
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        lhs.fits(m, k) && rhs.fits(k, n),
        "bf16 gemm: operand too short"
    );
    let a = pair_operand(lhs, m, k);
    let mut b = vec![0u32; packed_len(k, n)];
    if rhs.col_stride == 1 {
        pack(
            &mut b,
            k,
            n,
            &Rows {
                data: rhs.data,
                n,
                ld: rhs.row_stride,
            },
        );
    } else if rhs.row_stride == 1 {
        // The transpose of a row-major matrix: its rows are read in order.
        let pairs = k.div_ceil(2);
        if pairs > 0 {
            b.par_chunks_mut(pairs * LANES)
                .enumerate()
                .for_each(|(j, block)| {
                    pack_transposed_block(block, j, (rhs.data, rhs.col_stride), n, k)
                });
        }
    } else {
        pack(&mut b, k, n, &Strided(rhs, n));
    }
    let view = PackedRef {
        data: &b,
        pairs: k.div_ceil(2),
        n,
    };
    gemm(
        m,
        &a,
        k.div_ceil(2).max(1),
        view,
        dst,
        dst_rs,
        accumulate,
        parallel,
    );
}

/// A stride-1 convolution's operands for [`conv`]: the input as channel pairs, zero-padded,
/// and the weight reordered by tap. `out[o, y·W_out + x] += Σ_{t, p} A[o, t, p] ·
/// X[y·row_stride + p·pair_stride + x + tap_t]` — the patch matrix is never built: each tap reads
/// the padded input at a shifted address (an implicit GEMM). The input is stored row by row,
/// each padded row holding every channel pair's line, so the pairs a tile runs through lie close
/// together in memory.
#[derive(Clone, Copy, Debug)]
pub struct ConvOperands<'a> {
    /// `[C_out, taps, pairs]` words: `(W[o, 2p, t], W[o, 2p+1, t])`.
    pub weight: &'a [u32],
    /// `[H_p, pairs, W_p]` words: `(x[2p, y, x], x[2p+1, y, x])`, the padding zeros.
    pub input: &'a [u32],
    /// Channel pairs.
    pub pairs: usize,
    /// Word offsets of the taps: `k_i·row_stride + k_j`.
    pub taps: &'a [usize],
    /// Words between padded rows (`pairs·W_p`) and between pairs' lines (`W_p`).
    pub row_stride: usize,
    pub pair_stride: usize,
    /// Output height and width; the width a multiple of 16.
    pub out_hw: (usize, usize),
}

/// Adds the convolution of [`ConvOperands`] to `out` (`[C_out, H_out·W_out]`, the bias already
/// in it), on rayon's threads when `parallel`.
pub fn conv(c_out: usize, ops: ConvOperands, out: &mut [f32], parallel: bool) {
    conv_with(available(), c_out, ops, out, parallel)
}

/// [`conv`] with the AVX512-BF16 tile (`fast`) or the portable loop.
fn conv_with(fast: bool, c_out: usize, ops: ConvOperands, out: &mut [f32], parallel: bool) {
    let (ho, wo) = ops.out_hw;
    let (pairs, taps) = (ops.pairs, ops.taps.len());
    if c_out == 0 || ho == 0 || pairs == 0 || taps == 0 {
        return;
    }
    assert!(
        wo % LANES == 0,
        "bf16 conv: output width {wo} not a multiple of 16"
    );
    assert!(
        ops.weight.len() >= c_out * taps * pairs,
        "bf16 conv: weight too short"
    );
    let max_tap = *ops.taps.iter().max().expect("taps");
    assert!(
        (ho - 1) * ops.row_stride + (pairs - 1) * ops.pair_stride + wo - 1 + max_tap
            < ops.input.len(),
        "bf16 conv: input too short"
    );
    let n = ho * wo;
    assert!(out.len() >= c_out * n, "bf16 conv: output too short");
    let fast = fast && available();
    let lda = taps * pairs;
    // Blocks: MC output channels × KC_CONV channel pairs of A (about 256 kB, in L2) against a
    // few tiles of pixels, whose input lines stay in L1 while the rows of A stream past.
    const MC: usize = 16 * MR;
    let kc = ((256 << 10) / (4 * MC * taps)).clamp(16, 256);
    // Equal blocks: a short last one would reload the output tiles for little work.
    let kc = pairs.div_ceil(pairs.div_ceil(kc));
    let tile_cols = NV * LANES;
    let col_tiles = n.div_ceil(tile_cols);
    let tiles_per_task = 4;
    let col_tasks = col_tiles.div_ceil(tiles_per_task);
    let row_tasks = c_out.div_ceil(MC);
    let tasks = row_tasks * col_tasks;
    let out_ptr = SendPtr(out.as_mut_ptr());
    let task = |t: usize| {
        let (rt, ct) = (t / col_tasks, t % col_tasks);
        let rows = rt * MC..((rt + 1) * MC).min(c_out);
        let tiles = ct * tiles_per_task..((ct + 1) * tiles_per_task).min(col_tiles);
        let mut p0 = 0;
        while p0 < pairs {
            let p1 = (p0 + kc).min(pairs);
            for tile in tiles.clone() {
                let col0 = tile * tile_cols;
                let nv = (n - col0).min(tile_cols) / LANES;
                // Each vector's 16 pixels lie in one output row (W_out is a multiple of 16).
                let mut bases = [0usize; NV];
                for (v, b) in bases.iter_mut().enumerate().take(nv) {
                    let q = col0 + v * LANES;
                    *b = (q / wo) * ops.row_stride + q % wo;
                }
                let mut r = rows.start;
                while r < rows.end {
                    let mr = MR.min(rows.end - r);
                    // SAFETY: the asserts above bound every read: weight rows r..r+mr < C_out,
                    // words t·pairs + p < taps·pairs; input words p·pair_stride + base + tap
                    // with base + 15 ≤ (H_out−1)·row_stride + W_out − 1; output
                    // rows < C_out, columns col0 .. col0 + 16·nv ≤ n. Tasks write disjoint
                    // (channel block × column range) parts.
                    unsafe {
                        conv_kernel(
                            fast,
                            (mr, nv),
                            (p0, p1),
                            ops,
                            ops.weight.as_ptr().add(r * lda),
                            lda,
                            &bases,
                            out_ptr.get().add(r * n + col0),
                            n,
                        );
                    }
                    r += mr;
                }
            }
            p0 = p1;
        }
    };
    if parallel && tasks > 1 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn conv_kernel(
    fast: bool,
    (mr, nv): (usize, usize),
    (p0, p1): (usize, usize),
    ops: ConvOperands,
    a: *const u32,
    lda: usize,
    bases: &[usize; NV],
    c: *mut f32,
    ldc: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if fast {
        return dispatch_tile!(conv_tile, (mr, nv), ((p0, p1), ops, a, lda, bases, c, ldc));
    }
    let _ = fast;
    for r in 0..mr {
        for (v, &base) in bases.iter().enumerate().take(nv) {
            for l in 0..LANES {
                let mut acc = 0f32;
                for (t, &tap) in ops.taps.iter().enumerate() {
                    for p in p0..p1 {
                        let wa = *a.add(r * lda + t * ops.pairs + p);
                        let wb = *ops.input.as_ptr().add(p * ops.pair_stride + base + tap + l);
                        acc += bf16_to_f32(wa & 0xffff) * bf16_to_f32(wb & 0xffff)
                            + bf16_to_f32(wa >> 16) * bf16_to_f32(wb >> 16);
                    }
                }
                *c.add(r * ldc + v * LANES + l) += acc;
            }
        }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the tasks that share it write disjoint parts of the buffer it points to.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// One register tile: `mr ≤ MR` rows, `nv ≤ NV` blocks of which the first `cols` columns are
/// stored, `kc` pairs.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn kernel(
    fast: bool,
    (mr, nv): (usize, usize),
    (kc, add): (usize, bool),
    a: *const u32,
    lda: usize,
    b: *const u32,
    b_stride: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if fast {
        return dispatch_tile!(
            tile,
            (mr, nv),
            ((kc, add), a, lda, b, b_stride, c, ldc, cols)
        );
    }
    let _ = fast;
    portable_tile(mr, (kc, add), a, lda, b, b_stride, c, ldc, cols);
}

/// The same sums as the AVX512-BF16 tile, in plain f32 arithmetic.
#[allow(clippy::too_many_arguments)]
unsafe fn portable_tile(
    mr: usize,
    (kc, add): (usize, bool),
    a: *const u32,
    lda: usize,
    b: *const u32,
    b_stride: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    for r in 0..mr {
        for col in 0..cols {
            let (blk, l) = (col / LANES, col % LANES);
            let mut acc = 0f32;
            for p in 0..kc {
                let wa = *a.add(r * lda + p);
                let wb = *b.add(blk * b_stride + p * LANES + l);
                acc += bf16_to_f32(wa & 0xffff) * bf16_to_f32(wb & 0xffff)
                    + bf16_to_f32(wa >> 16) * bf16_to_f32(wb >> 16);
            }
            let dst = c.add(r * ldc + col);
            *dst = if add { *dst + acc } else { acc };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::LANES;
    use std::arch::x86_64::*;

    /// `acc[r][v] += (pair at row r's word) · bv[v]` for every row and vector: one broadcast
    /// of A per row, `vdpbf16ps` against each loaded vector of B. A macro, not a function, so
    /// it is compiled inside the caller's `target_feature` context.
    macro_rules! rank2_update {
        ($acc:ident, $bv:ident, |$r:ident| $word:expr) => {
            for ($r, row) in $acc.iter_mut().enumerate() {
                let av = _mm512_set1_epi32($word.read_unaligned() as i32);
                for (v, x) in row.iter_mut().enumerate() {
                    *x = _mm512_dpbf16_ps(
                        *x,
                        std::mem::transmute::<__m512i, __m512bh>(av),
                        std::mem::transmute::<__m512i, __m512bh>($bv[v]),
                    );
                }
            }
        };
    }

    /// `MR`×`NV`·16 accumulators in registers; per pair, `NV` vector loads of `B`, `MR`
    /// broadcasts of `A` and `MR·NV` `vdpbf16ps`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn tile<const MR: usize, const NV: usize>(
        (kc, add): (usize, bool),
        a: *const u32,
        lda: usize,
        b: *const u32,
        b_stride: usize,
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        for p in 0..kc {
            let mut bv = [_mm512_setzero_si512(); NV];
            for (v, slot) in bv.iter_mut().enumerate() {
                *slot = _mm512_loadu_si512(b.add(v * b_stride + p * LANES) as *const _);
            }
            rank2_update!(acc, bv, |r| a.add(r * lda + p));
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                let valid = cols.saturating_sub(v * LANES).min(LANES);
                if valid == 0 {
                    continue;
                }
                let mask: __mmask16 = if valid == LANES {
                    0xffff
                } else {
                    (1u16 << valid) - 1
                };
                let ptr = c.add(r * ldc + v * LANES);
                let sum = if add {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(mask, ptr), *x)
                } else {
                    *x
                };
                _mm512_mask_storeu_ps(ptr, mask, sum);
            }
        }
    }
    /// The tile of [`super::conv`]: for each tap and channel pair, `NV` vector loads of the
    /// shifted input, `MR` broadcasts of the weight, `MR·NV` `vdpbf16ps`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn conv_tile<const MR: usize, const NV: usize>(
        (p0, p1): (usize, usize),
        ops: super::ConvOperands,
        a: *const u32,
        lda: usize,
        bases: &[usize; super::NV],
        c: *mut f32,
        ldc: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        let input = ops.input.as_ptr();
        for (t, &tap) in ops.taps.iter().enumerate() {
            let mut b = [input; NV];
            for (v, ptr) in b.iter_mut().enumerate() {
                *ptr = input.add(p0 * ops.pair_stride + bases[v] + tap);
            }
            let at = a.add(t * ops.pairs);
            for p in p0..p1 {
                let mut bv = [_mm512_setzero_si512(); NV];
                for (v, slot) in bv.iter_mut().enumerate() {
                    *slot = _mm512_loadu_si512(b[v] as *const _);
                    b[v] = b[v].add(ops.pair_stride);
                }
                rank2_update!(acc, bv, |r| at.add(r * lda + p));
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                let ptr = c.add(r * ldc + v * LANES);
                _mm512_storeu_ps(ptr, _mm512_add_ps(_mm512_loadu_ps(ptr), *x));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn reference(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        // The inputs rounded to bf16 as the kernel sees them, products summed in f64.
        let r = |x: f32| bf16_to_f32(bf16_bits(x)) as f64;
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| r(a[i * k + p]) * r(b[p * n + j])).sum();
            }
        }
        c
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16_bits(-2.5), 0xc020);
        assert!(bf16_to_f32(bf16_bits(f32::NAN)).is_nan());
        assert_eq!(bf16_to_f32(bf16_bits(f32::INFINITY)), f32::INFINITY);
        for &x in &[0.1f32, -3.7, 1e-3, 123456.0] {
            let y = bf16_to_f32(bf16_bits(x));
            assert!(((y - x) / x).abs() <= 1.0 / 256.0, "{x} -> {y}");
            assert_eq!(half::bf16::from_f32(x).to_bits() as u32, bf16_bits(x));
        }
    }

    /// Every tile shape, odd `k`, columns not a multiple of 16, several `k` blocks, row and
    /// column tasks — against f64 sums of the bf16-rounded inputs.
    #[test]
    fn products_match_f64_in_every_shape() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 17, 5),
            (8, 48, 2),
            (9, 49, 257),
            (13, 100, 300),
            (600, 70, 33),
            (37, 200, 700),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let want = reference(&a, &b, m, n, k);
            let pairs = k.div_ceil(2);
            let lda = pairs + 3;
            let mut aw = vec![0u32; m * lda];
            for i in 0..m {
                pair_rows(&a[i * k..], 1, k, k, &mut aw[i * lda..]);
            }
            let mut bw = vec![0u32; packed_len(k, n)];
            pack(&mut bw, k, n, &Rows { data: &b, n, ld: n });
            let bt: Vec<u16> = (0..n * k)
                .map(|i| bf16_bits(b[(i % k) * n + i / k]) as u16)
                .collect();
            let owned = PackedB::from_transposed_bf16(&bt, n, k);
            assert_eq!(owned.view().data, &bw[..], "two packings of the same B");
            let bt_f32: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let mut from_t = vec![7u32; packed_len(k, n)];
            pack_transposed(&mut from_t, &bt_f32, n, k);
            assert_eq!(from_t, bw, "packing Bᵀ");
            assert_eq!(
                owned.get(k - 1, n - 1),
                bf16_to_f32(bf16_bits(b[k * n - 1]))
            );
            for (parallel, accumulate) in [(false, true), (true, true), (true, false)] {
                let ldc = n + 1;
                let mut c = vec![0.5f32; m * ldc];
                let base = if accumulate { 0.5 } else { 0.0 };
                let view = PackedRef {
                    data: &bw,
                    pairs,
                    n,
                };
                gemm(m, &aw, lda, view, &mut c, ldc, accumulate, parallel);
                for i in 0..m {
                    for j in 0..n {
                        let got = c[i * ldc + j] as f64 - base;
                        let tol = 1e-5 * (k as f64).sqrt().max(1.0) + 1e-6;
                        assert!(
                            (got - want[i * n + j]).abs() < tol,
                            "{m}×{n}×{k} [{i},{j}]: {got} vs {}",
                            want[i * n + j]
                        );
                    }
                    assert_eq!(c[i * ldc + n], 0.5, "column past n written");
                }
            }
        }
    }

    /// The mixed-precision product of f32 operands in each layout the training ops pass
    /// (row-major and transposed, with padded strides), against f64 sums of the rounded
    /// inputs; an unrounded f32 product would miss the bound by far.
    #[test]
    fn f32_operands_are_rounded_in_every_layout() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for &(m, n, k) in &[(1, 1, 1), (5, 33, 7), (40, 17, 64), (70, 90, 129)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let want = reference(&a, &b, m, n, k);
            // Each operand stored row-major (rows `ld` apart), as the rows of its transpose, or
            // with both strides above 1 (every other element of padded rows).
            let store =
                |x: &[f32], r: usize, c: usize, layout: u8| -> (Vec<f32>, Operand<'static>) {
                    let (rs, cs) = match layout {
                        0 => (c + 3, 1),
                        1 => (1, r + 2),
                        _ => (2 * c + 1, 2),
                    };
                    let mut v = vec![f32::NAN; r * rs + c * cs + 1];
                    for i in 0..r {
                        for j in 0..c {
                            v[i * rs + j * cs] = x[i * c + j];
                        }
                    }
                    let shape = Operand {
                        data: &[],
                        row_stride: rs,
                        col_stride: cs,
                    };
                    (v, shape)
                };
            for (la, lb) in (0..3).flat_map(|a| (0..3).map(move |b| (a, b))) {
                let (av, sa) = store(&a, m, k, la);
                let (bv, sb) = store(&b, k, n, lb);
                let lhs = Operand { data: &av, ..sa };
                let rhs = Operand { data: &bv, ..sb };
                let mut c = vec![0f32; m * n];
                gemm_f32((m, n, k), &mut c, n, false, lhs, rhs, true);
                for (i, (&got, &w)) in c.iter().zip(&want).enumerate() {
                    let tol = 1e-5 * (k as f64).sqrt().max(1.0) + 1e-6;
                    assert!(
                        (got as f64 - w).abs() < tol,
                        "{m}×{n}×{k} layouts {la} {lb} [{i}]: {got} vs {w}"
                    );
                }
            }
        }
    }

    /// The implicit-GEMM convolution with both tiles against direct sums: 5 channels (an odd
    /// pair), a 3×3 kernel with padding 1, 10 output channels (a partial tile of rows).
    #[test]
    fn implicit_convolution_matches_direct_sums() {
        let (c, h, w, c_out, k): (usize, usize, usize, usize, usize) = (5, 3, 32, 10, 3);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let x: Vec<f32> = (0..c * h * w)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let wt: Vec<f32> = (0..c_out * c * k * k)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let r = |v: f32| bf16_to_f32(bf16_bits(v)) as f64;
        let pairs = c.div_ceil(2);
        let (hp, wp) = (h + 2, w + 2);
        let at = |v: &[f32], i: usize| v.get(i).copied().unwrap_or(0.0);
        let mut input = vec![0u32; hp * pairs * wp];
        for y in 0..h {
            for p in 0..pairs {
                for xx in 0..w {
                    let hi = if 2 * p + 1 < c {
                        at(&x, ((2 * p + 1) * h + y) * w + xx)
                    } else {
                        0.0
                    };
                    input[((y + 1) * pairs + p) * wp + xx + 1] =
                        pair(x[((2 * p) * h + y) * w + xx], hi);
                }
            }
        }
        let mut weight = vec![0u32; c_out * 9 * pairs];
        for o in 0..c_out {
            for t in 0..9 {
                for p in 0..pairs {
                    let hi = if 2 * p + 1 < c {
                        wt[(o * c + 2 * p + 1) * 9 + t]
                    } else {
                        0.0
                    };
                    weight[(o * 9 + t) * pairs + p] = pair(wt[(o * c + 2 * p) * 9 + t], hi);
                }
            }
        }
        let taps: Vec<usize> = (0..9).map(|t| (t / 3) * pairs * wp + t % 3).collect();
        let ops = ConvOperands {
            weight: &weight,
            input: &input,
            pairs,
            taps: &taps,
            row_stride: pairs * wp,
            pair_stride: wp,
            out_hw: (h, w),
        };
        for fast in [true, false] {
            let mut out = vec![0.25f32; c_out * h * w];
            conv_with(fast, c_out, ops, &mut out, true);
            for o in 0..c_out {
                for y in 0..h {
                    for xx in 0..w {
                        let mut want = 0.25f64;
                        for ci in 0..c {
                            for t in 0..9 {
                                let (iy, ix) = (
                                    y as isize + (t / 3) as isize - 1,
                                    xx as isize + (t % 3) as isize - 1,
                                );
                                if iy >= 0 && iy < h as isize && ix >= 0 && ix < w as isize {
                                    want += r(wt[(o * c + ci) * 9 + t])
                                        * r(x[(ci * h + iy as usize) * w + ix as usize]);
                                }
                            }
                        }
                        let got = out[(o * h + y) * w + xx] as f64;
                        assert!(
                            (got - want).abs() < 1e-4,
                            "fast={fast} [{o},{y},{xx}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn portable_tile_equals_the_fast_one() {
        if !available() {
            return;
        }
        let (m, n, k) = (8, 48, 64);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let a: Vec<u32> = (0..m * k / 2)
            .map(|_| pair(rng.random(), rng.random()))
            .collect();
        let b: Vec<u32> = (0..n * k / 2)
            .map(|_| pair(rng.random(), rng.random()))
            .collect();
        let (mut fast, mut slow) = (vec![0f32; m * n], vec![0f32; m * n]);
        // SAFETY: the buffers hold exactly one 8×48 tile over 32 pairs.
        unsafe {
            kernel(
                true,
                (8, 3),
                (k / 2, true),
                a.as_ptr(),
                k / 2,
                b.as_ptr(),
                k / 2 * 16,
                fast.as_mut_ptr(),
                n,
                n,
            );
            kernel(
                false,
                (8, 3),
                (k / 2, true),
                a.as_ptr(),
                k / 2,
                b.as_ptr(),
                k / 2 * 16,
                slow.as_mut_ptr(),
                n,
                n,
            );
        }
        for (x, y) in fast.iter().zip(&slow) {
            assert!((x - y).abs() < 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }
}
