//! Helpers of the CPU kernels: slices out of candle's storage, the `gemm` crate's matrix
//! product behind a bounds-checked call, and branch-free elementwise math (exp, SiLU, erf-GELU)
//! that the compiler vectorises, applied in place on rayon with AVX-512 or AVX2 chosen at run
//! time.

use candle_core::{backend::BackendStorage, CpuStorage, Layout, Result};

/// Defines `fn $name(args) { body }` compiled three times — for AVX-512, for AVX2 with FMA and
/// for the baseline the crate is built for — and calls the widest the CPU has (detected at
/// run time). The body's `#[inline(always)]` loops then vectorise with those registers.
macro_rules! best_isa {
    ($(#[$m:meta])* pub fn $name:ident($($a:ident: $t:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        pub fn $name($($a: $t),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,fma")]
                unsafe fn avx512($($a: $t),*) $body
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) $body
                if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
                    // SAFETY: the CPU has the features the function is compiled for.
                    return unsafe { avx512($($a),*) };
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($a),*) };
                }
            }
            $body
        }
    };
}

/// The elements of a contiguous tensor's storage; `op` names the kernel in the error.
pub fn contiguous<'a, T>(s: &'a [T], l: &Layout, op: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("{op}: expected a contiguous input"),
    }
}

/// The f32 elements of a contiguous tensor; `op` and `what` name it in errors.
pub fn contiguous_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(s) => contiguous(s, l, op),
        s => candle_core::bail!("{op}: {what} must be f32, not {:?}", s.dtype()),
    }
}

/// A matrix operand: its elements and its (row, column) strides.
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Operand<'a> {
    /// A row-major matrix whose rows are `row_stride` apart.
    pub fn rows(data: &'a [f32], row_stride: usize) -> Self {
        Self {
            data,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix whose rows are `row_stride` apart.
    pub fn transposed(data: &'a [f32], row_stride: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            col_stride: row_stride,
        }
    }

    pub(crate) fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || self.data.len() > (rows - 1) * self.row_stride + (cols - 1) * self.col_stride
    }
}

/// `dst[m×n] = lhs[m×k] · rhs[k×n]` (`accumulate`: `dst +=`), `dst` row-major with rows
/// `dst_rs` apart; on rayon's threads when `parallel`.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
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
    assert!(dst.len() >= (m - 1) * dst_rs + n, "gemm: dst too short");
    assert!(lhs.fits(m, k) && rhs.fits(k, n), "gemm: operand too short");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every index the strides reach inside the slices; `dst`
    // is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            if accumulate { 1.0f32 } else { 0.0 },
            1.0f32,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// `Σ f(v)` in f64, kept in eight independent lanes (added in a fixed order, so the result is
/// deterministic) so that the loop vectorises: a single accumulator is a chain of dependent
/// adds the compiler may not reorder.
#[inline(always)]
pub fn lane_sum<T: Copy>(v: &[T], f: impl Fn(T) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += f(x);
        }
    }
    lanes.iter().sum::<f64>() + chunks.remainder().iter().map(|&x| f(x)).sum::<f64>()
}

/// `e^x` for `x ≤ 0` (the softmax's shifted scores) to about 2e-7 relative: `x = n·ln2 + r` with
/// `n` the nearest integer (Cody–Waite: ln 2 in two parts, so `r` is exact), `e^r` by its Taylor
/// polynomial for `|r| ≤ ½ ln 2` (degree 6, truncation error 1.2e-7), `2^n` added to the exponent
/// bits. Below e^-86 the result is clamped at about 4e-38, still a normal float (denormals would
/// slow the next product). Branch-free, so loops over slices vectorise.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5·2²³ rounds to an integer held in the low mantissa bits: `n` both as a float
    // and, by subtracting the constant's bits, as an integer (no float→int conversion, which
    // would not vectorise).
    const MAGIC: f32 = 12_582_912.0;
    let x = x.max(-86.0);
    let shifted = x.mul_add(std::f32::consts::LOG2_E, MAGIC);
    let n = shifted - MAGIC;
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let p = 1.0 / 720.0f32;
    let p = p.mul_add(r, 1.0 / 120.0);
    let p = p.mul_add(r, 1.0 / 24.0);
    let p = p.mul_add(r, 1.0 / 6.0);
    let p = p.mul_add(r, 0.5);
    let p = p.mul_add(r, 1.0);
    let p = p.mul_add(r, 1.0);
    let n_bits = shifted.to_bits().wrapping_sub(MAGIC.to_bits());
    f32::from_bits(p.to_bits().wrapping_add(n_bits << 23))
}

/// `x·σ(x)`, with `σ` from `e^{−|x|}` so the exponential's argument is never positive.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    let e = exp_nonpositive(-x.abs());
    let sigmoid = if x >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    };
    x * sigmoid
}

/// `x·Φ(x)` with the error function of Abramowitz & Stegun 7.1.26 (absolute error 1.5e-7).
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_half_sqrt2(x).0)
}

/// `erf(x/√2)` (Abramowitz & Stegun 7.1.26, absolute error 1.5e-7) and `e^(−x²/2)`, which
/// that formula computes on the way.
#[inline(always)]
fn erf_half_sqrt2(x: f32) -> (f32, f32) {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / 0.327_591_1f32.mul_add(a, 1.0);
    let p = 1.061_405_4f32;
    let p = p.mul_add(t, -1.453_152_1);
    let p = p.mul_add(t, 1.421_413_8);
    let p = p.mul_add(t, -0.284_496_72);
    let p = p.mul_add(t, 0.254_829_6);
    let gauss = exp_nonpositive(-a * a);
    let erf_abs = 1.0 - p * t * gauss;
    (if z >= 0.0 { erf_abs } else { -erf_abs }, gauss)
}

/// GEGLU's backward for one element: `hidden · gelu(gate)`'s gradients for the output gradient
/// `dy`, `(dy·gelu(gate), dy·hidden·gelu'(gate))` with `gelu'(x) = Φ(x) + x·φ(x)`.
#[inline(always)]
fn geglu_backward_one(hidden: f32, gate: f32, dy: f32) -> (f32, f32) {
    let (erf, gauss) = erf_half_sqrt2(gate);
    let cdf = 0.5 * (1.0 + erf);
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let dgelu = gate.mul_add(gauss * INV_SQRT_2PI, cdf);
    (dy * gate * cdf, dy * hidden * dgelu)
}

#[inline(always)]
fn geglu_backward_body(h: &[f32], dy: &[f32], dh: &mut [f32]) {
    let half = dy.len();
    let (hidden, gate) = h.split_at(half);
    let (d_hidden, d_gate) = dh.split_at_mut(half);
    for i in 0..half {
        let (a, b) = geglu_backward_one(hidden[i], gate[i], dy[i]);
        d_hidden[i] = a;
        d_gate[i] = b;
    }
}

best_isa! {
    /// GEGLU's backward over one row: `h` is `[hidden | gate]`, `dy` the output gradient (half
    /// as long), `dh` receives `[d hidden | d gate]`; vectorised for the running CPU.
    pub fn geglu_backward_row(h: &[f32], dy: &[f32], dh: &mut [f32]) {
        geglu_backward_body(h, dy, dh)
    }
}

/// `x·σ(1.702·x)` (OpenAI CLIP's activation) as `silu(1.702·x) / 1.702`.
#[inline(always)]
pub fn quick_gelu(x: f32) -> f32 {
    silu(1.702 * x) * (1.0 / 1.702)
}

#[inline(always)]
fn map_body(v: &mut [f32], f: impl Fn(f32) -> f32) {
    for x in v.iter_mut() {
        *x = f(*x);
    }
}

macro_rules! vectorised_map {
    ($name:ident, $f:path) => {
        best_isa! {
            /// Applies the function to every element, vectorised for the running CPU.
            pub fn $name(v: &mut [f32]) {
                map_body(v, $f)
            }
        }
    };
}

vectorised_map!(silu_slice, silu);
vectorised_map!(gelu_erf_slice, gelu_erf);
vectorised_map!(quick_gelu_slice, quick_gelu);

/// `dy · silu'(n)` = `dy·σ(n)·(1 + n·(1 − σ(n)))`: SiLU's backward at `n` for the output
/// gradient `dy`.
#[inline(always)]
pub fn silu_backward(n: f32, dy: f32) -> f32 {
    let e = exp_nonpositive(-n.abs());
    let sigmoid = if n >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    };
    dy * sigmoid * n.mul_add(1.0 - sigmoid, 1.0)
}

#[inline(always)]
fn zip_body(v: &mut [f32], w: &[f32], f: impl Fn(f32, f32) -> f32) {
    for (x, &y) in v.iter_mut().zip(w) {
        *x = f(*x, y);
    }
}

best_isa! {
    /// `v[i] = silu_backward(v[i], dy[i])` over two slices, vectorised for the running CPU.
    pub fn silu_backward_slice(v: &mut [f32], dy: &[f32]) {
        zip_body(v, dy, silu_backward)
    }
}

/// [`silu_slice`], [`gelu_erf_slice`] or [`quick_gelu_slice`] over a large buffer, in parallel
/// chunks.
pub fn par_map(v: &mut [f32], f: fn(&mut [f32])) {
    use rayon::prelude::*;
    v.par_chunks_mut(1 << 14).for_each(f);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_on_the_softmax_range() {
        let mut worst = 0f64;
        for i in 0..200_000 {
            let x = -(i as f32) * 0.0005; // 0 … -100
            let ours = exp_nonpositive(x) as f64;
            let exact = (x as f64).exp();
            if exact > 1e-37 {
                worst = worst.max(((ours - exact) / exact).abs());
            }
        }
        assert!(worst < 1e-6, "relative error {worst}");
        assert!(exp_nonpositive(-1000.0) < 1e-37 && exp_nonpositive(-1000.0).is_normal());
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    #[test]
    fn silu_backward_matches_its_derivative() {
        let mut worst = 0f64;
        for i in -8000..8000 {
            let x = i as f32 * 0.005; // -40 … 40
            let xd = x as f64;
            let sg = 1.0 / (1.0 + (-xd).exp());
            let want = 0.7 * sg * (1.0 + xd * (1.0 - sg));
            let mut v = [x];
            silu_backward_slice(&mut v, &[0.7]);
            worst = worst.max((v[0] as f64 - want).abs() / (1.0 + want.abs()));
        }
        assert!(worst < 1e-6, "{worst}");
    }

    #[test]
    fn geglu_backward_matches_its_derivatives() {
        let mut worst = 0f64;
        for i in -8000..8000 {
            let gate = i as f32 * 0.001; // -8 … 8
            let (hidden, dy) = (1.3f32, -0.6f32);
            let (mut dh, g) = ([0f32; 2], gate as f64);
            geglu_backward_row(&[hidden, gate], &[dy], &mut dh);
            let cdf = 0.5 * (1.0 + erf(g / std::f64::consts::SQRT_2));
            let pdf = (-g * g / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let want = [
                dy as f64 * g * cdf,
                dy as f64 * hidden as f64 * (cdf + g * pdf),
            ];
            for k in 0..2 {
                worst = worst.max((dh[k] as f64 - want[k]).abs() / (1.0 + want[k].abs()));
            }
        }
        assert!(worst < 1e-6, "{worst}");
    }

    #[test]
    fn silu_and_gelu_match_their_definitions() {
        let mut worst = (0f64, 0f64);
        for i in -40_000..40_000 {
            let x = i as f32 * 0.00025 * 40.0; // -40 … 40
            let xd = x as f64;
            let s = xd / (1.0 + (-xd).exp());
            let g = 0.5 * xd * (1.0 + erf(xd / std::f64::consts::SQRT_2));
            worst.0 = worst.0.max((silu(x) as f64 - s).abs() / (1.0 + s.abs()));
            worst.1 = worst
                .1
                .max((gelu_erf(x) as f64 - g).abs() / (1.0 + g.abs()));
        }
        assert!(worst.0 < 1e-6 && worst.1 < 1e-6, "{worst:?}");
        let mut v: Vec<f32> = (0..100_000).map(|i| (i as f32 - 50_000.0) * 1e-3).collect();
        let want: Vec<f32> = v.iter().map(|&x| silu(x)).collect();
        par_map(&mut v, silu_slice);
        assert_eq!(v, want);
    }

    /// erf to f64 precision: the Taylor series for |x| < 2.5, else 1 − erfc by its continued
    /// fraction `erfc z = e^{−z²}/√π / (z + ½/(z + 1/(z + 3⁄2/(z + …))))`.
    fn erf(x: f64) -> f64 {
        let z = x.abs();
        if z < 2.5 {
            let (mut sum, mut term, mut n) = (x, x, 0.0);
            while term.abs() > 1e-18 {
                n += 1.0;
                term *= -x * x / n;
                sum += term / (2.0 * n + 1.0);
            }
            return 2.0 / std::f64::consts::PI.sqrt() * sum;
        }
        let mut k = z;
        for n in (1..=80).rev() {
            k = z + (n as f64 / 2.0) / k;
        }
        let erfc = (-z * z).exp() / std::f64::consts::PI.sqrt() / k;
        x.signum() * (1.0 - erfc)
    }
}
