//! Linear multistep (k-diffusion `sample_lms`; diffusers `LMSDiscreteScheduler`): the
//! derivative is extrapolated by the Lagrange polynomial through the last `order` derivatives,
//! integrated exactly over the step in sigma.

use super::{derivative, Run};
use crate::Result;
use candle_core::Tensor;

/// ∫ from σᵢ to σᵢ₊₁ of the Lagrange basis polynomial for point `j` of the `order` most recent
/// sigmas `sigmas[i], sigmas[i−1], …` — Gauss–Legendre with 4 nodes, exact up to degree 7.
pub fn lms_coefficient(order: usize, sigmas: &[f64], i: usize, j: usize) -> f64 {
    let basis = |tau: f64| -> f64 {
        let mut prod = 1.0;
        for k in 0..order {
            if k != j {
                prod *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k]);
            }
        }
        prod
    };
    const NODES: [(f64, f64); 4] = [
        (-0.861_136_311_594_052_6, 0.347_854_845_137_453_9),
        (-0.339_981_043_584_856_3, 0.652_145_154_862_546_1),
        (0.339_981_043_584_856_3, 0.652_145_154_862_546_1),
        (0.861_136_311_594_052_6, 0.347_854_845_137_453_9),
    ];
    let (a, b) = (sigmas[i], sigmas[i + 1]);
    let (half, mid) = ((b - a) / 2.0, (a + b) / 2.0);
    NODES
        .iter()
        .map(|(x, w)| w * basis(mid + half * x))
        .sum::<f64>()
        * half
}

pub(super) fn sample(mut x: Tensor, run: &mut Run, order: usize) -> Result<Tensor> {
    let mut ds: Vec<Tensor> = Vec::with_capacity(order);
    for i in 0..run.sigmas.len() - 1 {
        let sigma = run.sigmas[i];
        let denoised = run.denoiser.denoise(&x, sigma)?;
        ds.insert(0, derivative(&x, &denoised, sigma)?);
        ds.truncate(order);
        let cur_order = ds.len().min(i + 1);
        let mut step = Tensor::zeros_like(&x)?;
        for (j, d) in ds.iter().enumerate().take(cur_order) {
            step = (step + (d * lms_coefficient(cur_order, run.sigmas, i, j))?)?;
        }
        x = (x + step)?;
        x = run.report(i, x, &denoised)?;
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    #[test]
    fn first_order_coefficient_is_the_step() {
        let sigmas = [3.0, 2.0, 0.5];
        assert!((super::lms_coefficient(1, &sigmas, 1, 0) - (-1.5)).abs() < 1e-12);
        // Two points: ∫₂^0.5 (τ − 3)/(2 − 3) dτ = −[(τ−3)²/2]₂^0.5 = −(6.25 − 1)/2
        assert!((super::lms_coefficient(2, &sigmas, 1, 0) - (-2.625)).abs() < 1e-12);
    }
}
