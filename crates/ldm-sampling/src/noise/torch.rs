//! PyTorch's CPU generator, reproduced bit for bit: `torch.Generator("cpu").manual_seed(s)`
//! followed by `torch.randn` / `torch.rand` (float32 and float64).
//!
//! torch's CPU engine is the 32-bit Mersenne Twister (Matsumoto & Nishimura 1998) seeded with
//! the low 32 bits of the seed. Uniforms take 24 random bits (53 for float64, from two draws).
//! Normals come from Box–Muller in two ways, as in ATen's `normal_kernel`:
//! * fewer than 16 values: one at a time, in double precision, each pair's sine cached in the
//!   generator for the next value (`at::normal_distribution<double>`);
//! * 16 or more: all uniforms first, then Box–Muller over blocks of 16 (cosines in the first 8,
//!   sines in the last 8), the last block redrawn when the count is not a multiple of 16.
//!   The block transform runs either in scalar libm arithmetic (`normal_fill_16`) or, on CPUs
//!   with AVX2, in the Cephes polynomials of `avx_mathfun.h` (`normal_fill_16_AVX2`);
//!   [`NormalFill`] picks which, detected like ATen.

use rand_mt::Mt;

/// Which of ATen's Box–Muller block transforms to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormalFill {
    /// `normal_fill_16` with libm `log`/`cos`/`sin` (ATen's DEFAULT capability).
    Scalar,
    /// `normal_fill_16_AVX2` with `avx_mathfun`'s `log256_ps`/`sincos256_ps`.
    Avx2,
}

impl NormalFill {
    /// The transform torch uses on this CPU: the vectorised one whenever ATen's capability is
    /// AVX2 or AVX512 (measured: both give identical draws; `ATEN_CPU_CAPABILITY=default`
    /// gives the scalar ones), i.e. on any x86-64 CPU with AVX2 and FMA.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return NormalFill::Avx2;
            }
        }
        NormalFill::Scalar
    }
}

/// `torch.Generator("cpu")` after `manual_seed(seed)`.
#[derive(Clone)]
pub struct TorchCpuRng {
    mt: Mt,
    next_double_normal: Option<f64>,
    fill: NormalFill,
}

impl std::fmt::Debug for TorchCpuRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchCpuRng")
            .field("fill", &self.fill)
            .finish()
    }
}

impl TorchCpuRng {
    /// Seeds like `manual_seed(seed)`, with the block transform this CPU's torch would use.
    pub fn new(seed: u64) -> Self {
        Self::with_fill(seed, NormalFill::detect())
    }

    /// Seeds with an explicit block transform (to reproduce another machine's torch).
    pub fn with_fill(seed: u64, fill: NormalFill) -> Self {
        Self {
            mt: Mt::new(seed as u32),
            next_double_normal: None,
            fill,
        }
    }

    fn random(&mut self) -> u32 {
        self.mt.next_u32()
    }

    fn random64(&mut self) -> u64 {
        let hi = self.random() as u64;
        let lo = self.random() as u64;
        (hi << 32) | lo
    }

    fn uniform_f32(&mut self) -> f32 {
        (self.random() & ((1 << 24) - 1)) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    fn uniform_f64(&mut self) -> f64 {
        (self.random64() & ((1 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `at::normal_distribution<double>`: one value, with the cached second value of a pair.
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_double_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.rand(n)` in float32.
    pub fn rand_f32(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform_f32()).collect()
    }

    /// `torch.rand(n, dtype=torch.float64)`.
    pub fn rand_f64(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.uniform_f64()).collect()
    }

    /// `torch.randn(n)` in float32.
    pub fn randn_f32(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        let fill = self.fill;
        let block = |d: &mut [f32]| match fill {
            NormalFill::Scalar => normal_fill_16_f32(d),
            NormalFill::Avx2 => avx2::normal_fill_16(d),
        };
        for start in (0..=n - 16).step_by(16) {
            block(&mut data[start..start + 16]);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            block(tail);
        }
        data
    }

    /// `torch.randn(n, dtype=torch.float64)`.
    pub fn randn_f64(&mut self, n: usize) -> Vec<f64> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64()).collect();
        }
        let mut data: Vec<f64> = (0..n).map(|_| self.uniform_f64()).collect();
        for start in (0..=n - 16).step_by(16) {
            normal_fill_16_f64(&mut data[start..start + 16]);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f64();
            }
            normal_fill_16_f64(tail);
        }
        data
    }
}

/// ATen's `normal_fill_16<float>`: note θ is formed in double, then rounded to float.
fn normal_fill_16_f32(d: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0f32 - d[j];
        let u2 = d[j + 8];
        let radius = (-2.0f32 * u1.ln()).sqrt();
        let theta = (2.0f64 * std::f64::consts::PI * u2 as f64) as f32;
        d[j] = radius * theta.cos();
        d[j + 8] = radius * theta.sin();
    }
}

fn normal_fill_16_f64(d: &mut [f64]) {
    for j in 0..8 {
        let u1 = 1.0 - d[j];
        let u2 = d[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        d[j] = radius * theta.cos();
        d[j + 8] = radius * theta.sin();
    }
}

/// Scalar emulation of `avx_mathfun.h` (Cephes-derived `log256_ps`, `sincos256_ps`), lane by
/// lane in the same f32 operation order, so results match torch's AVX2 kernel bit for bit.
/// torch's build lets GCC contract a multiply whose only use is an add into one FMA (the first
/// such multiply in statement order when both operands of the add are products); `mul_add`
/// marks exactly those places.
/// The constants are written exactly as in the C header.
#[allow(clippy::excessive_precision)]
mod avx2 {
    fn log(x: f32) -> f32 {
        if x <= 0.0 || x.is_nan() {
            return f32::NAN;
        }
        let x = x.max(f32::from_bits(0x0080_0000)); // min_norm_pos
        let bits = x.to_bits();
        let imm0 = (bits >> 23) as i32 - 0x7f;
        let mut x = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
        let mut e = imm0 as f32 + 1.0;
        let mask = x < std::f32::consts::FRAC_1_SQRT_2; // cephes_SQRTHF
        let tmp = if mask { x } else { 0.0 };
        x -= 1.0;
        e -= if mask { 1.0 } else { 0.0 };
        x += tmp;
        let z = x * x;
        let p = [
            7.0376836292E-2f32,
            -1.1514610310E-1,
            1.1676998740E-1,
            -1.2420140846E-1,
            1.4249322787E-1,
            -1.6668057665E-1,
            2.0000714765E-1,
            -2.4999993993E-1,
            3.3333331174E-1,
        ];
        let mut y = p[0];
        for &c in &p[1..] {
            y = y.mul_add(x, c);
        }
        y *= x;
        y = y.mul_add(z, e * -2.12194440e-4);
        y = (-z).mul_add(0.5, y);
        x += y;
        e.mul_add(0.693359375, x)
    }

    fn sincos(x: f32) -> (f32, f32) {
        let mut sign_sin = x.to_bits() & 0x8000_0000;
        let mut x = x.abs();
        let y = x * 1.27323954473516; // 4/π
        let mut j = y as i32; // truncation, as _mm256_cvttps_epi32
        j = (j + 1) & !1;
        let y = j as f32;
        let swap_sign_sin = ((j & 4) as u32) << 29;
        let poly_mask = (j & 2) == 0;
        sign_sin ^= swap_sign_sin;
        x = y.mul_add(-0.78515625, x);
        x = y.mul_add(-2.4187564849853515625e-4, x);
        x = y.mul_add(-3.77489497744594108e-8, x);
        let sign_cos = ((!(j - 2) & 4) as u32) << 29;
        let z = x * x;
        let mut yc = 2.443315711809948E-005f32;
        yc = yc.mul_add(z, -1.388731625493765E-003);
        yc = yc.mul_add(z, 4.166664568298827E-002);
        yc *= z;
        yc = yc.mul_add(z, -(z * 0.5));
        yc += 1.0;
        let mut ys = -1.9515295891E-4f32;
        ys = ys.mul_add(z, 8.3321608736E-3);
        ys = ys.mul_add(z, -1.6666654611E-1);
        ys *= z;
        ys = ys.mul_add(x, x);
        let (s, c) = if poly_mask { (ys, yc) } else { (yc, ys) };
        (
            f32::from_bits(s.to_bits() ^ sign_sin),
            f32::from_bits(c.to_bits() ^ sign_cos),
        )
    }

    /// `normal_fill_16_AVX2` with mean 0 and std 1.
    pub(super) fn normal_fill_16(d: &mut [f32]) {
        let two_pi = (2.0 * std::f64::consts::PI) as f32;
        for j in 0..8 {
            let u1 = 1.0f32 - d[j];
            let u2 = d[j + 8];
            let radius = (-2.0f32 * log(u1)).sqrt();
            let (s, c) = sincos(two_pi * u2);
            d[j] = radius * c;
            d[j + 8] = radius * s;
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn cephes_polynomials_are_accurate() {
            for i in 1..1000 {
                let x = i as f32 / 1000.0;
                assert!((super::log(x) - x.ln()).abs() < 1e-6, "log {x}");
                let t = x * 6.0;
                let (s, c) = super::sincos(t);
                assert!(
                    (s - t.sin()).abs() < 1e-6 && (c - t.cos()).abs() < 1e-6,
                    "sincos {t}"
                );
            }
        }
    }
}
