//! A1111's "NV" seeds: Philox4x32-10 (Salmon et al. 2011) with A1111's Box–Muller, which
//! emulates torch's CUDA generator so a seed gives the same noise on any device.

use super::NoiseSource;

/// A1111's `rng_philox.Generator`.
#[derive(Debug, Clone)]
pub struct PhiloxRng {
    seed: u64,
    offset: u32,
}

impl PhiloxRng {
    pub fn new(seed: u64) -> Self {
        Self { seed, offset: 0 }
    }
}

const M: [u32; 2] = [0xD251_1F53, 0xCD9E_8D57];
const W: [u32; 2] = [0x9E37_79B9, 0xBB67_AE85];

fn round(c: &mut [u32; 4], k: [u32; 2]) {
    let v1 = c[0] as u64 * M[0] as u64;
    let v2 = c[2] as u64 * M[1] as u64;
    let (v1_lo, v1_hi) = (v1 as u32, (v1 >> 32) as u32);
    let (v2_lo, v2_hi) = (v2 as u32, (v2 >> 32) as u32);
    *c = [v2_hi ^ c[1] ^ k[0], v2_lo, v1_hi ^ c[3] ^ k[1], v1_lo];
}

fn philox4x32_10(mut c: [u32; 4], mut k: [u32; 2]) -> [u32; 4] {
    for _ in 0..9 {
        round(&mut c, k);
        k = [k[0].wrapping_add(W[0]), k[1].wrapping_add(W[1])];
    }
    round(&mut c, k);
    c
}

impl NoiseSource for PhiloxRng {
    fn randn(&mut self, n: usize) -> Vec<f32> {
        // numpy promotes uint32 × float32 to float64: the transform runs in double precision
        // with the two float32 constants A1111 writes.
        let two_pow32_inv = 2.328_306_4e-10_f32 as f64;
        let two_pow32_inv_2pi = (2.328_306_4e-10_f32 * 6.283_185_5_f32) as f64;
        let key = [self.seed as u32, (self.seed >> 32) as u32];
        let out = (0..n)
            .map(|i| {
                let g = philox4x32_10([self.offset, 0, i as u32, 0], key);
                let u = g[0] as f64 * two_pow32_inv + two_pow32_inv / 2.0;
                let v = g[1] as f64 * two_pow32_inv_2pi + two_pow32_inv_2pi / 2.0;
                ((-2.0 * u.ln()).sqrt() * v.sin()) as f32
            })
            .collect();
        self.offset += 1;
        out
    }
}
