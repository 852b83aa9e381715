//! Optimisation: AdamW (Loshchilov & Hutter 2019, Algorithm 2) with its state exposed for exact
//! checkpoints, global-norm gradient clipping, linear warm-up with cosine decay, and an
//! exponential moving average of the weights.

use crate::parallel::{cores, on_threads};
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
    ///
    /// Fused: each parameter's moments and value are updated in place in one pass over its f32
    /// data (the composed tensor form took about fifteen passes, each allocating), the
    /// parameters spread over the CPU's cores. Other dtypes and devices take the composed path.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        let jobs: Vec<usize> = (0..self.params.len())
            .filter(|&i| grads.get(self.params[i].1.as_tensor()).is_some())
            .collect();
        let fused = jobs.iter().all(|&i| {
            let p = self.params[i].1.as_tensor();
            p.dtype() == candle_core::DType::F32 && p.device().is_cpu()
        });
        if !fused {
            for &i in &jobs {
                let p = &self.params[i].1;
                let g = grads.get(p.as_tensor()).expect("filtered above");
                let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
                let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                let denom = ((&v / bc2)?.sqrt()? + c.eps)?;
                let update = ((&m / bc1)? / denom)?;
                let decayed = (p.as_tensor() * (1.0 - lr * c.weight_decay))?;
                p.set(&(decayed - (update * lr)?)?)?;
                self.m[i] = m;
                self.v[i] = v;
            }
            return Ok(());
        }
        let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
        let (inv_bc1, inv_bc2) = ((1.0 / bc1) as f32, (1.0 / bc2) as f32);
        let (eps, lr32) = (c.eps as f32, lr as f32);
        let decay = (1.0 - lr * c.weight_decay) as f32;
        let (params, m, v) = (&self.params, &self.m, &self.v);
        let update_one = |i: usize| -> Result<()> {
            let p = params[i].1.as_tensor();
            let gv = f32_data(grads.get(p).expect("filtered above"))?;
            with_f32_mut(&m[i], |mv| {
                with_f32_mut(&v[i], |vv| {
                    with_f32_mut(p, |pv| {
                        for (((pk, mk), vk), &gk) in pv.iter_mut().zip(mv).zip(vv).zip(gv.iter()) {
                            *mk = b1 * *mk + (1.0 - b1) * gk;
                            *vk = b2 * *vk + (1.0 - b2) * gk * gk;
                            let update = (*mk * inv_bc1) / ((*vk * inv_bc2).sqrt() + eps);
                            *pk = *pk * decay - lr32 * update;
                        }
                        Ok(())
                    })
                })
            })
        };
        on_threads(&jobs, cores(), |i| params[i].1.elem_count(), update_one)?;
        Ok(())
    }
}

/// A contiguous f32 CPU tensor's values, without copying.
fn f32_data(t: &Tensor) -> Result<F32View<'_>> {
    let (storage, layout) = t.storage_and_layout();
    let offsets = layout.contiguous_offsets().ok_or_else(|| {
        crate::Error::Msg("optimiser: a parameter's data is not contiguous".into())
    })?;
    Ok(F32View {
        storage,
        range: offsets.0..offsets.1,
    })
}

/// Runs `f` on a contiguous f32 CPU tensor's values, writable in place (through candle's
/// [`InplaceOp1`](candle_core::InplaceOp1), which holds the storage's write lock meanwhile).
/// Only for tensors that no graph reads: the optimiser's parameters, moments and averages
/// between steps.
fn with_f32_mut<R>(t: &Tensor, f: impl FnOnce(&mut [f32]) -> Result<R>) -> Result<R> {
    struct Op<F, R>(
        std::cell::RefCell<Option<F>>,
        std::cell::RefCell<Option<Result<R>>>,
    );
    impl<F: FnOnce(&mut [f32]) -> Result<R>, R> candle_core::InplaceOp1 for Op<F, R> {
        fn name(&self) -> &'static str {
            "optimiser-update"
        }
        fn cpu_fwd(
            &self,
            storage: &mut candle_core::CpuStorage,
            layout: &candle_core::Layout,
        ) -> candle_core::Result<()> {
            let (Some((a, b)), candle_core::CpuStorage::F32(v)) =
                (layout.contiguous_offsets(), storage)
            else {
                candle_core::bail!("optimiser: expected a contiguous f32 tensor")
            };
            let f = self.0.borrow_mut().take().expect("called once");
            *self.1.borrow_mut() = Some(f(&mut v[a..b]));
            Ok(())
        }
    }
    let op = Op(
        std::cell::RefCell::new(Some(f)),
        std::cell::RefCell::new(None),
    );
    t.inplace_op1(&op)?;
    op.1.into_inner()
        .unwrap_or_else(|| Err(crate::Error::Msg("optimiser: not a CPU tensor".into())))
}

/// A read guard on a tensor's storage and the range of its data.
struct F32View<'a> {
    storage: candle_core::StorageRef<'a>,
    range: std::ops::Range<usize>,
}

impl std::ops::Deref for F32View<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &*self.storage {
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => &v[self.range.clone()],
            _ => &[],
        }
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
        let fused = params
            .iter()
            .all(|(_, p)| p.dtype() == candle_core::DType::F32 && p.device().is_cpu());
        if fused {
            // One pass per parameter, over the CPU's cores (see `AdamW::step`).
            let jobs: Vec<usize> = (0..params.len()).collect();
            let (d32, rest) = (d as f32, (1.0 - d) as f32);
            let shadow = &self.shadow;
            on_threads(
                &jobs,
                cores(),
                |i| params[i].1.elem_count(),
                |i| -> Result<()> {
                    let pv = f32_data(params[i].1.as_tensor())?;
                    with_f32_mut(&shadow[i], |sv| {
                        for (s, p) in sv.iter_mut().zip(pv.iter()) {
                            *s = d32 * *s + rest * p;
                        }
                        Ok(())
                    })
                },
            )?;
        } else {
            for (s, (_, p)) in self.shadow.iter_mut().zip(params) {
                *s = ((&*s * d)? + (p.as_tensor().detach() * (1.0 - d))?)?.detach();
            }
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

#[cfg(test)]
mod fused_tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The fused f32 step and EMA give the composed (f64) path's values.
    #[test]
    fn fused_step_and_average_equal_the_composed_ones() -> Result<()> {
        let dev = Device::Cpu;
        let init: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let run = |dtype: DType| -> Result<(Vec<f64>, Vec<f64>)> {
            let a = Var::from_tensor(&Tensor::new(init.as_slice(), &dev)?.to_dtype(dtype)?)?;
            let b = Var::from_tensor(
                &Tensor::new(&[[0.5f32, -2.0], [3.0, 1.0]], &dev)?.to_dtype(dtype)?,
            )?;
            let params = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
            let mut opt = AdamW::new(params.clone(), AdamWConfig::default())?;
            let mut ema = Ema::new(&params, 0.9)?;
            for step in 0..20 {
                let loss = ((a.as_tensor().sin()? * a.as_tensor())?.sum_all()?
                    + b.as_tensor().sqr()?.sum_all()?)?;
                let grads = loss.backward()?;
                opt.step(&grads, 0.01 * (1.0 + step as f64 / 10.0))?;
                ema.update(&params)?;
            }
            let flat = |t: &Tensor| -> Result<Vec<f64>> {
                Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
            };
            let mut values = flat(a.as_tensor())?;
            values.extend(flat(b.as_tensor())?);
            values.extend(flat(&opt.v[0])?);
            let mut averages = flat(&ema.shadow[0])?;
            averages.extend(flat(&ema.shadow[1])?);
            Ok((values, averages))
        };
        let (v32, e32) = run(DType::F32)?;
        let (v64, e64) = run(DType::F64)?;
        for (x, y) in v32.iter().zip(&v64).chain(e32.iter().zip(&e64)) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
        }
        Ok(())
    }
}
