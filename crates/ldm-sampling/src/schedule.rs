//! Noise schedules as data. The training schedule (betas → ᾱ, Ho et al. 2020 §2) is computed in
//! float32 exactly as torch does in diffusers, since the smallest sigmas are sensitive to every
//! rounding; inference sigma spacings (Karras et al. 2022 eq. 5, exponential, beta — Lee et al.
//! 2024 —, ComfyUI's `sgm_uniform` and `simple`) are pure functions returning sigmas.

use crate::error::{Error, Result};

/// How betas are laid out over the training timesteps.
#[derive(Debug, Clone, PartialEq)]
pub enum BetaSchedule {
    /// `torch.linspace(beta_start, beta_end, N)`.
    Linear,
    /// `torch.linspace(√beta_start, √beta_end, N)²` (Stable Diffusion).
    ScaledLinear,
    /// The cosine schedule of Nichol & Dhariwal 2021, betas capped at 0.999.
    SquaredCosCapV2,
    /// Explicit betas.
    Trained(Vec<f64>),
}

/// The training noise schedule: ᾱ per timestep, in float32 as torch holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    pub alphas_cumprod: Vec<f32>,
}

/// `torch.linspace(start, end, steps, dtype=float32)` as ATen's CPU kernel computes it: the first
/// half counts up from `start`, the second half down from `end`, each value one fused
/// multiply-add (GCC contracts `start + step * i`; measured bit-identical to torch 2.15).
pub fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// `np.linspace(start, end, steps)` in float64.
pub fn linspace_f64(start: f64, end: f64, steps: usize) -> Vec<f64> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f64;
    let mut out: Vec<f64> = (0..steps).map(|i| start + i as f64 * step).collect();
    out[steps - 1] = end;
    out
}

/// `torch.cumprod` over float32 (ATen accumulates in double and rounds each output).
fn cumprod_f32(v: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    v.iter()
        .map(|&x| {
            acc *= x as f64;
            acc as f32
        })
        .collect()
}

/// Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps Are Flawed", Alg. 1:
/// shift and scale √ᾱ so the last timestep has zero SNR (float32, as diffusers).
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_ac: Vec<f32> = cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt_ac[0], sqrt_ac[sqrt_ac.len() - 1]);
    let scale = first / (first - last);
    for s in sqrt_ac.iter_mut() {
        *s -= last;
        *s *= scale;
    }
    let ac: Vec<f32> = sqrt_ac.iter().map(|s| s * s).collect();
    let mut out = Vec::with_capacity(ac.len());
    out.push(1.0 - ac[0]);
    for i in 1..ac.len() {
        out.push(1.0 - ac[i] / ac[i - 1]);
    }
    out
}

/// ᾱ that stands in for the zero of a zero-terminal-SNR schedule's last step where a sampler
/// needs a finite σ (diffusers' choice in its Euler, Euler a, DPM++ multistep and UniPC
/// schedulers): σ = √((1 − ᾱ)/ᾱ) ≈ 4096.
pub const ZERO_SNR_END_ALPHA_BAR: f32 = 1.0 / 16_777_216.0;

/// Whether `sigma` is the pure noise of a zero-terminal-SNR schedule's finite end
/// ([`ZERO_SNR_END_ALPHA_BAR`]) or beyond: nothing of the image is left in the sample, so a
/// step from it can only be "denoise, then noise to σ_next".
pub fn is_pure_noise(sigma: f64) -> bool {
    let end = ZERO_SNR_END_ALPHA_BAR as f64;
    sigma >= 0.99 * ((1.0 - end) / end).sqrt()
}

impl NoiseSchedule {
    /// Builds ᾱ from the config's betas; `zero_snr` applies the terminal-SNR rescale.
    pub fn new(
        num_train_timesteps: usize,
        beta_start: f64,
        beta_end: f64,
        schedule: &BetaSchedule,
        zero_snr: bool,
    ) -> Result<Self> {
        if !(2..=100_000).contains(&num_train_timesteps) {
            return Err(Error::Config(format!(
                "num_train_timesteps = {num_train_timesteps} is outside [2, 100000]"
            )));
        }
        let n = num_train_timesteps;
        let betas: Vec<f32> = match schedule {
            BetaSchedule::Linear => linspace_f32(beta_start as f32, beta_end as f32, n),
            BetaSchedule::ScaledLinear => {
                linspace_f32(beta_start.sqrt() as f32, beta_end.sqrt() as f32, n)
                    .iter()
                    .map(|b| b * b)
                    .collect()
            }
            BetaSchedule::SquaredCosCapV2 => {
                let alpha_bar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                    })
                    .collect()
            }
            BetaSchedule::Trained(b) => {
                if b.len() != n {
                    return Err(Error::Config(format!(
                        "trained_betas has {} values but num_train_timesteps is {n}",
                        b.len()
                    )));
                }
                b.iter().map(|&x| x as f32).collect()
            }
        };
        if betas
            .iter()
            .any(|b| !(b.is_finite() && *b >= 0.0 && *b <= 1.0))
        {
            return Err(Error::Config("betas must lie in [0, 1]".into()));
        }
        let betas = if zero_snr {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        };
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_cumprod = cumprod_f32(&alphas);
        if alphas_cumprod[0] <= 0.0 || alphas_cumprod.iter().any(|a| !a.is_finite()) {
            return Err(Error::Config(
                "the noise schedule degenerates (ᾱ ≤ 0)".into(),
            ));
        }
        Ok(Self { alphas_cumprod })
    }

    /// Number of training timesteps.
    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// Whether the schedule is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.alphas_cumprod.is_empty()
    }

    /// `((1 − ᾱ) / ᾱ) ** 0.5` per training timestep, in float32.
    pub fn sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod
            .iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect()
    }

    /// `np.log` of the float32 training sigmas (a float32 array in diffusers).
    pub fn log_sigmas(&self) -> Vec<f32> {
        self.sigmas().iter().map(|&s| s.ln()).collect()
    }

    /// The (fractional) timestep whose sigma is `sigma`, interpolating linearly in log-sigma
    /// between training timesteps (k-diffusion's `sigma_to_t`; diffusers' `_sigma_to_t`).
    pub fn sigma_to_t(&self, sigma: f64) -> f64 {
        sigma_to_t(sigma, &self.log_sigmas())
    }

    /// The training sigma at fractional timestep `t`, interpolating linearly in sigma
    /// (`np.interp(t, arange(N), sigmas)`).
    pub fn t_to_sigma(&self, t: f64) -> f64 {
        interp(t, &self.sigmas())
    }
}

/// `np.interp(t, arange(len), table)`.
pub fn interp(t: f64, table: &[f32]) -> f64 {
    let last = table.len() - 1;
    if t <= 0.0 {
        return table[0] as f64;
    }
    if t >= last as f64 {
        return table[last] as f64;
    }
    let lo = t.floor() as usize;
    let w = t - lo as f64;
    let (a, b) = (table[lo] as f64, table[lo + 1] as f64);
    // numpy returns the table value at an exact knot: (∞ − a)·0 would be NaN next to a
    // zero-terminal-SNR schedule's infinite last sigma.
    if w == 0.0 {
        return a;
    }
    // numpy: slope * (x - xp[j]) + fp[j]
    (b - a) * w + a
}

/// See [`NoiseSchedule::sigma_to_t`]. Mirrors numpy's promotions: the table is float32, so
/// `low − high` is a float32 difference while `low − log σ` is float64.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // low = the last index whose log-sigma is ≤ log_sigma (log-sigmas increase with t).
    let count = log_sigmas
        .iter()
        .filter(|&&ls| log_sigma - ls as f64 >= 0.0)
        .count();
    let low = count.saturating_sub(1).min(n - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo as f64 - log_sigma) / (lo - hi) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// Karras et al. 2022, eq. 5: `(σ_max^(1/ρ) + i/(n−1) (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ`.
pub fn karras(sigma_min: f64, sigma_max: f64, n: usize, rho: f64) -> Vec<f64> {
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    linspace_f64(0.0, 1.0, n)
        .iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// Log-linear from `sigma_max` down to `sigma_min`.
pub fn exponential(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    linspace_f64(sigma_max.ln(), sigma_min.ln(), n)
        .iter()
        .map(|l| l.exp())
        .collect()
}

/// Beta-distributed spacing (Lee et al. 2024, "Beta Sampling is All You Need"; diffusers'
/// `use_beta_sigmas`): `σ_min + F⁻¹(1 − i/(n−1)) (σ_max − σ_min)` with F the Beta(α, β) CDF.
pub fn beta(sigma_min: f64, sigma_max: f64, n: usize, alpha: f64, beta: f64) -> Vec<f64> {
    linspace_f64(0.0, 1.0, n)
        .iter()
        .map(|r| {
            let p = 1.0 - r;
            let ppf = if p <= 0.0 {
                0.0
            } else if p >= 1.0 {
                1.0
            } else {
                puruspe::invbetai(p, alpha, beta)
            };
            sigma_min + ppf * (sigma_max - sigma_min)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    /// numpy's interp returns the knot's value at a knot; next to a zero-terminal-SNR
    /// schedule's infinite last sigma, (∞ − a)·0 gave NaN and DDIM/DDPM at 999 steps took
    /// t = 998 for pure noise.
    #[test]
    fn interp_at_a_knot_next_to_infinity_is_the_knot() {
        let table = [1.0f32, 2.0, f32::INFINITY];
        assert_eq!(super::interp(1.0, &table), 2.0);
        assert_eq!(super::interp(0.5, &table), 1.5);
        assert!(super::interp(1.5, &table).is_infinite());
    }
}
