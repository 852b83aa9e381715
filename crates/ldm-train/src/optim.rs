//! Optimisation: AdamW (Loshchilov & Hutter 2019, Algorithm 2) with its state exposed for exact
//! checkpoints, global-norm gradient clipping, linear warm-up with cosine decay, and an
//! exponential moving average of the weights.

use crate::Result;
use candle_core::{backprop::GradStore, Tensor, Var};

/// AdamW's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW over named variables.
pub struct AdamW {
    pub params: Vec<(String, Var)>,
    /// First and second moments, one per parameter.
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Updates taken so far.
    pub step: usize,
    pub config: AdamWConfig,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let zeros = |p: &Var| p.as_tensor().zeros_like();
        let m = params
            .iter()
            .map(|(_, p)| zeros(p))
            .collect::<candle_core::Result<_>>()?;
        let v = params
            .iter()
            .map(|(_, p)| zeros(p))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            params,
            m,
            v,
            step: 0,
            config,
        })
    }

    /// One update with learning rate `lr`. Parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for (i, (_, p)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(p.as_tensor()) else {
                continue;
            };
            let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&v / bc2)?.sqrt()? + c.eps)?;
            let update = ((&m / bc1)? / denom)?;
            let decayed = (p.as_tensor() * (1.0 - lr * c.weight_decay))?;
            p.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// Scales the gradients so that their global L2 norm is at most `max_norm`; returns the norm
/// before clipping.
pub fn clip_grad_norm(
    grads: &mut GradStore,
    params: &[(String, Var)],
    max_norm: f64,
) -> Result<f64> {
    let mut total = 0f64;
    for (_, p) in params {
        if let Some(g) = grads.get(p.as_tensor()) {
            total += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let norm = total.sqrt();
    if norm > max_norm && norm.is_finite() {
        let scale = max_norm / norm;
        for (_, p) in params {
            if let Some(g) = grads.remove(p.as_tensor()) {
                grads.insert(p.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}

/// Linear warm-up from 0 to `peak` over `warmup` steps, then cosine decay to `floor · peak` at
/// `total` steps.
pub fn warmup_cosine(step: usize, peak: f64, warmup: usize, total: usize, floor: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    peak * (floor + (1.0 - floor) * cosine)
}

/// Exponential moving average of parameters, with the usual warm-up of the decay
/// (`min(decay, (1 + n)/(10 + n))`) so early averages are not dominated by the initialisation.
pub struct Ema {
    pub decay: f64,
    pub shadow: Vec<Tensor>,
    pub updates: usize,
}

impl Ema {
    pub fn new(params: &[(String, Var)], decay: f64) -> Result<Self> {
        // Detached: a shadow that recorded its ops would keep every earlier shadow alive.
        let shadow = params
            .iter()
            .map(|(_, p)| p.as_tensor().detach().copy())
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            decay,
            shadow,
            updates: 0,
        })
    }

    pub fn update(&mut self, params: &[(String, Var)]) -> Result<()> {
        let n = self.updates as f64;
        let d = self.decay.min((1.0 + n) / (10.0 + n));
        for (s, (_, p)) in self.shadow.iter_mut().zip(params) {
            *s = ((&*s * d)? + (p.as_tensor().detach() * (1.0 - d))?)?.detach();
        }
        self.updates += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// AdamW on a quadratic bowl reaches the minimum; the first step moves every coordinate by
    /// about `lr` (Adam's scale invariance).
    #[test]
    fn adamw_minimises_a_quadratic() -> Result<()> {
        let dev = Device::Cpu;
        let target = Tensor::new(&[3f32, -2.0, 0.5], &dev)?;
        let x = Var::new(&[0f32, 0.0, 0.0], &dev)?;
        let cfg = AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("x".into(), x.clone())], cfg)?;
        for i in 0..2000 {
            let loss = (x.as_tensor() - &target)?.sqr()?.sum_all()?;
            let grads = loss.backward()?;
            opt.step(&grads, 0.01)?;
            if i == 0 {
                let moved = x.as_tensor().abs()?.to_vec1::<f32>()?;
                assert!(moved.iter().all(|m| (m - 0.01).abs() < 1e-4), "{moved:?}");
            }
        }
        let err = (x.as_tensor() - &target)?
            .abs()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(err < 1e-3, "{err}");
        Ok(())
    }

    #[test]
    fn clipping_and_schedule() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::new(&[3f32, 4.0], &dev)?;
        let params = vec![("x".to_string(), x.clone())];
        let mut grads = x
            .as_tensor()
            .sqr()?
            .sum_all()?
            .affine(0.5, 0.0)?
            .backward()?;
        let norm = clip_grad_norm(&mut grads, &params, 1.0)?;
        assert!((norm - 5.0).abs() < 1e-6);
        let g = grads.get(x.as_tensor()).unwrap().to_vec1::<f32>()?;
        assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6);
        assert!((warmup_cosine(0, 1.0, 10, 100, 0.1) - 0.1).abs() < 1e-12);
        assert!((warmup_cosine(10, 1.0, 10, 100, 0.1) - 1.0).abs() < 1e-12);
        assert!((warmup_cosine(100, 1.0, 10, 100, 0.1) - 0.1).abs() < 1e-12);
        let mut ema = Ema::new(&params, 0.5)?;
        x.set(&Tensor::new(&[13f32, 14.0], &dev)?)?;
        ema.update(&params)?; // decay min(0.5, 0.1) = 0.1
        let s = ema.shadow[0].to_vec1::<f32>()?;
        assert!((s[0] - 12.0).abs() < 1e-5, "{s:?}");
        // The average records no graph (a recorded one kept every earlier step alive).
        assert!(!ema.shadow[0].track_op());
        Ok(())
    }
}
