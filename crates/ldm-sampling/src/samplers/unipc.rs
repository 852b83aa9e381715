//! UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework", Alg. 1–2 with
//! B(h) = e^h − 1, "bh2", data prediction), as diffusers' `UniPCMultistepScheduler` computes it,
//! in the VE parametrisation (λ = −log σ). Each model evaluation first corrects the sample the
//! previous predictor made (UniC), then predicts the next one (UniP).

use super::Run;
use crate::Result;
use candle_core::Tensor;

/// The ρ coefficients: solves `R ρ = b` with `R[i][k] = r_k^i`, `b[i] = h φ_{i+1}(h) (i+1)! / B(h)`
/// for `rks` (the last of which is 1) — diffusers' `R`, `b` construction.
fn rhos(rks: &[f64], hh: f64, order: usize, corrector: bool) -> Vec<f64> {
    let b_h = hh.exp_m1();
    let mut h_phi_k = hh.exp_m1() / hh - 1.0;
    let mut factorial = 1.0;
    let mut b = Vec::with_capacity(order);
    for i in 1..=order {
        b.push(h_phi_k * factorial / b_h);
        factorial *= (i + 1) as f64;
        h_phi_k = h_phi_k / hh - 1.0 / factorial;
    }
    let n = if corrector { order } else { order - 1 };
    if n == 0 {
        return vec![];
    }
    if (corrector && order == 1) || (!corrector && order == 2) {
        return vec![0.5];
    }
    // Gaussian elimination on the n×n system R[:n, :n] ρ = b[:n].
    let mut m: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            let mut row: Vec<f64> = (0..n).map(|k| rks[k].powi(i as i32)).collect();
            row.push(b[i]);
            row
        })
        .collect();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))
            .unwrap_or(col);
        m.swap(col, pivot);
        let pivot_row = m[col].clone();
        for (r, row) in m.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / pivot_row[col];
                for (v, p) in row.iter_mut().zip(&pivot_row).skip(col) {
                    *v -= f * p;
                }
            }
        }
    }
    (0..n).map(|i| m[i][n] / m[i][i]).collect()
}

/// `(σ'/σ) x − (e^{−h} − 1) m₀ − (e^{−h} − 1) Σ ρ_k D_k`, the shared form of UniP and UniC.
fn update(
    x: &Tensor,
    sigma: f64,
    sigma_next: f64,
    m0: &Tensor,
    res: Option<Tensor>,
) -> Result<Tensor> {
    if sigma_next == 0.0 {
        return Ok(m0.clone());
    }
    let hh = sigma_next.ln() - sigma.ln(); // −h
    let b_h = hh.exp_m1();
    let mut out = ((x * (sigma_next / sigma))? - (m0 * b_h)?)?;
    if let Some(res) = res {
        out = (out - (res * b_h)?)?;
    }
    Ok(out)
}

/// `Σ ρ_k (m_k − m₀) / r_k` over the history entries `(denoised, σ)` before the newest.
fn weighted_differences(
    history: &[(Tensor, f64)],
    newest: usize,
    count: usize,
    sigma_s0: f64,
    h: f64,
    rho: &[f64],
) -> Result<Option<Tensor>> {
    let mut acc: Option<Tensor> = None;
    for k in 1..=count {
        let (mk, sk) = &history[newest - k];
        let rk = (sigma_s0.ln() - sk.ln()) / h;
        let term = ((mk - &history[newest].0)? * (rho[k - 1] / rk))?;
        acc = Some(match acc {
            Some(a) => (a + term)?,
            None => term,
        });
    }
    Ok(acc)
}

fn rks_of(
    history: &[(Tensor, f64)],
    newest: usize,
    count: usize,
    sigma_s0: f64,
    h: f64,
) -> Vec<f64> {
    let mut rks: Vec<f64> = (1..=count)
        .map(|k| (sigma_s0.ln() - history[newest - k].1.ln()) / h)
        .collect();
    rks.push(1.0);
    rks
}

pub(super) fn sample_unipc(
    mut x: Tensor,
    run: &mut Run,
    solver_order: usize,
    lower_order_final: bool,
) -> Result<Tensor> {
    let steps = run.sigmas.len() - 1;
    let mut history: Vec<(Tensor, f64)> = Vec::new(); // (denoised, σ)
    let mut last: Option<(Tensor, usize)> = None; // (sample before the last predictor, its order)
    for i in 0..steps {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let denoised = run.denoiser.denoise(&x, sigma)?;
        if let Some((last_x, order)) = &last {
            // UniC: correct x (at σ) using the new evaluation; the history's newest is σ_prev.
            let sigma_s0 = run.sigmas[i - 1];
            let h = sigma_s0.ln() - sigma.ln();
            let newest = history.len() - 1;
            let count = order - 1;
            let rks = rks_of(&history, newest, count, sigma_s0, h);
            let rho = rhos(&rks, -h, *order, true);
            let mut res = weighted_differences(&history, newest, count, sigma_s0, h, &rho)?;
            let d1_t = ((&denoised - &history[newest].0)? * rho[rho.len() - 1])?;
            res = Some(match res {
                Some(r) => (r + d1_t)?,
                None => d1_t,
            });
            x = update(last_x, sigma_s0, sigma, &history[newest].0, res)?;
        }
        history.push((denoised.clone(), sigma));
        if history.len() > solver_order {
            history.remove(0);
        }
        let mut order = if lower_order_final {
            solver_order.min(steps - i)
        } else {
            solver_order
        };
        order = order.min(i + 1);
        last = Some((x.clone(), order));
        // UniP: predict the sample at σ'.
        let newest = history.len() - 1;
        let res = if order > 1 && sigma_next > 0.0 {
            let h = sigma.ln() - sigma_next.ln();
            let rks = rks_of(&history, newest, order - 1, sigma, h);
            let rho = rhos(&rks, -h, order, false);
            weighted_differences(&history, newest, order - 1, sigma, h, &rho)?
        } else {
            None
        };
        x = update(&x, sigma, sigma_next, &denoised, res)?;
        x = run.report(i, x, &denoised)?;
    }
    Ok(x)
}
