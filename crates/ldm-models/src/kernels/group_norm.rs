//! Group normalisation (Wu & He 2018) as one fused CPU kernel with a fused backward pass.
//! candle's `GroupNorm` is a composition of a dozen whole-tensor ops, each with its own
//! backward; here one pass computes each group's statistics and the output, and one pass the
//! input, scale and shift gradients:
//! `x̂ = (x − μ)·r`, `dx = r·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))` with `dx̂ = dy·γ`,
//! `dγ = Σ dy·x̂`, `dβ = Σ dy`. SiLU can follow in the same pass (`silu(γ·x̂ + β)`, every
//! ResNet block's pre-activation); its backward then recomputes the norm's output `n` and
//! takes `dy·σ(n)·(1 + n·(1 − σ(n)))` as the norm's output gradient, in the same pass too.

use super::cpu::{self, contiguous, lane_sum};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupNormOp {
    pub(crate) groups: usize,
    pub(crate) eps: f64,
    /// Apply SiLU to the output.
    pub(crate) silu: bool,
}

/// The backward pass: inputs `x`, `γ` (or `[γ | β]` after a SiLU), `dy`; output
/// `[dx (N·C·S) | dγ (C) | dβ (C)]` flat.
#[derive(Debug, Clone, Copy)]
struct GroupNormBackward {
    groups: usize,
    eps: f64,
    silu: bool,
}

/// The float types the fused kernels run in.
trait Float: num_traits::Float + Send + Sync + 'static {
    fn of(v: f64) -> Self;
    fn f(self) -> f64;
    /// `n[i] ← dy[i]·silu'(n[i])`: SiLU's backward, in place over the recomputed outputs.
    fn silu_backward_slice(n: &mut [Self], dy: &[Self]);
    /// SiLU over a slice, in place.
    fn silu_slice(v: &mut [Self]);
}
impl Float for f32 {
    fn of(v: f64) -> Self {
        v as f32
    }
    fn f(self) -> f64 {
        self as f64
    }
    fn silu_backward_slice(n: &mut [f32], dy: &[f32]) {
        cpu::silu_backward_slice(n, dy)
    }
    fn silu_slice(v: &mut [f32]) {
        cpu::silu_slice(v)
    }
}
impl Float for f64 {
    fn of(v: f64) -> Self {
        v
    }
    fn f(self) -> f64 {
        self
    }
    fn silu_backward_slice(n: &mut [f64], dy: &[f64]) {
        for (n, &d) in n.iter_mut().zip(dy) {
            let sg = 1.0 / (1.0 + (-*n).exp());
            *n = d * sg * (1.0 + *n * (1.0 - sg));
        }
    }
    fn silu_slice(v: &mut [f64]) {
        v.iter_mut().for_each(|x| *x /= 1.0 + (-*x).exp());
    }
}

/// Evaluates `$body` (a `Vec` of the inputs' float type) with the three inputs bound as slices
/// of one float type.
macro_rules! with_floats {
    (($a:expr, $la:expr), ($b:expr, $lb:expr), ($c:expr, $lc:expr), |$x:ident, $y:ident, $z:ident| $body:expr) => {
        match ($a, $b, $c) {
            (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(c)) => {
                let ($x, $y, $z) = (
                    contiguous(a, $la, "group norm")?,
                    contiguous(b, $lb, "group norm")?,
                    contiguous(c, $lc, "group norm")?,
                );
                CpuStorage::F32($body)
            }
            (CpuStorage::F64(a), CpuStorage::F64(b), CpuStorage::F64(c)) => {
                let ($x, $y, $z) = (
                    contiguous(a, $la, "group norm")?,
                    contiguous(b, $lb, "group norm")?,
                    contiguous(c, $lc, "group norm")?,
                );
                CpuStorage::F64($body)
            }
            _ => candle_core::bail!("group norm: f32 or f64 inputs of one dtype expected"),
        }
    };
}

/// `(N, C, spatial)` of a `[N, C, …]` layout.
fn dims(l: &Layout, groups: usize) -> Result<(usize, usize, usize)> {
    let d = l.dims();
    let (n, c) = (d[0], d[1]);
    if groups == 0 || c % groups != 0 {
        candle_core::bail!("group norm: {c} channels do not split into {groups} groups");
    }
    Ok((n, c, d[2..].iter().product()))
}

/// Mean and reciprocal standard deviation of one group's values (two-pass, f64 sums kept in
/// eight independent lanes so that the loops vectorise: [`lane_sum`]).
#[inline(always)]
fn stats<T: Float>(v: &[T], eps: f64) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = lane_sum(v, |x| x.f()) / n;
    let var = lane_sum(v, |x| (x.f() - mean) * (x.f() - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// `out = γ·x̂ + β` for one group `grp` of `cg` channels of `s` values (`x̂ = (v − mean)·r`, as a
/// per-channel scale and shift): the forward's output before any SiLU, and what the backward
/// recomputes after one — the same arithmetic, so the same values.
#[inline(always)]
fn normalise_group<T: Float>(
    v: &[T],
    out: &mut [T],
    (w, b): (&[T], &[T]),
    grp: usize,
    (cg, s): (usize, usize),
    (mean, r): (f64, f64),
) {
    for k in 0..cg {
        let ch = grp * cg + k;
        let scale = w[ch].f() * r;
        let shift = b[ch].f() - mean * scale;
        let (scale, shift) = (T::of(scale), T::of(shift));
        for j in k * s..(k + 1) * s {
            out[j] = v[j] * scale + shift;
        }
    }
}

fn forward<T: Float>(
    x: &[T],
    w: &[T],
    b: &[T],
    groups: usize,
    eps: f64,
    (c, s): (usize, usize),
    silu: bool,
) -> Vec<T> {
    let cg = c / groups;
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(cg * s)
        .zip(x.par_chunks(cg * s))
        .enumerate()
        .for_each(|(i, (o, v))| {
            let (mean, r) = stats(v, eps);
            normalise_group(v, o, (w, b), i % groups, (cg, s), (mean, r));
            if silu {
                T::silu_slice(o);
            }
        });
    out
}

/// `[dx | dγ | dβ]`; with `beta` the output went through a SiLU, whose derivative at the
/// recomputed `n = γ·x̂ + β` turns `dy` into the norm's output gradient first.
fn backward<T: Float>(
    x: &[T],
    w: &[T],
    beta: Option<&[T]>,
    dy: &[T],
    groups: usize,
    eps: f64,
    (c, s): (usize, usize),
) -> Vec<T> {
    let cg = c / groups;
    let mut dx = vec![T::zero(); x.len()];
    // Per (sample, group): dx, and the partial dγ, dβ of the group's channels.
    let partial: Vec<Vec<(f64, f64)>> = dx
        .par_chunks_mut(cg * s)
        .zip(x.par_chunks(cg * s).zip(dy.par_chunks(cg * s)))
        .enumerate()
        .map(|(i, (dxg, (v, g)))| {
            let (mean, r) = stats(v, eps);
            let grp = i % groups;
            // After a SiLU: dn = dy·σ(n)·(1 + n·(1 − σ(n))), n recomputed as the forward did,
            // written into this group's part of dx (no buffer of its own: a temporary per
            // group churned glibc's per-thread heaps) and read from there below.
            if let Some(beta) = beta {
                normalise_group(v, dxg, (w, beta), grp, (cg, s), (mean, r));
                T::silu_backward_slice(dxg, g);
            }
            let in_place = beta.is_some();
            let m = (cg * s) as f64;
            // Σ dy·x̂ and Σ dy per channel, in eight independent f64 lanes (as in `stats`) so
            // that the loop vectorises; the group's Σ dy·γ and Σ dy·γ·x̂ follow from them.
            let (mut sum_dxh, mut sum_dxh_xh) = (0f64, 0f64);
            let mut per_channel = Vec::with_capacity(cg);
            let grad: &[T] = if in_place { dxg } else { g };
            for k in 0..cg {
                let gamma = w[grp * cg + k].f();
                let (vc, gc) = (&v[k * s..(k + 1) * s], &grad[k * s..(k + 1) * s]);
                let (mut lanes_g, mut lanes_b) = ([0f64; 8], [0f64; 8]);
                let (mut vs, mut gs) = (vc.chunks_exact(8), gc.chunks_exact(8));
                for (v8, g8) in (&mut vs).zip(&mut gs) {
                    for l in 0..8 {
                        let d = g8[l].f();
                        lanes_g[l] += d * (v8[l].f() - mean) * r;
                        lanes_b[l] += d;
                    }
                }
                let (mut dgamma, mut dbeta) = (lanes_g.iter().sum::<f64>(), lanes_b.iter().sum());
                for (&x, &d) in vs.remainder().iter().zip(gs.remainder()) {
                    dgamma += d.f() * (x.f() - mean) * r;
                    dbeta += d.f();
                }
                sum_dxh += gamma * dbeta;
                sum_dxh_xh += gamma * dgamma;
                per_channel.push((dgamma, dbeta));
            }
            let (a, b) = (sum_dxh / m, sum_dxh_xh / m);
            // dx = r·(dy·γ − a − x̂·b) = dy·(rγ) + x·(−r²b) + (r²b·μ − r·a): per channel an
            // affine map of (dy, x) with constants in f64, the pass itself in T.
            for k in 0..cg {
                let gamma = w[grp * cg + k].f();
                let (k1, k2) = (T::of(r * gamma), T::of(-r * r * b));
                let k3 = T::of(r * r * b * mean - r * a);
                for j in k * s..(k + 1) * s {
                    let d = if in_place { dxg[j] } else { g[j] };
                    dxg[j] = d * k1 + v[j] * k2 + k3;
                }
            }
            per_channel
        })
        .collect();
    let mut dgamma = vec![0f64; c];
    let mut dbeta = vec![0f64; c];
    for (i, per_channel) in partial.iter().enumerate() {
        let grp = i % groups;
        for (k, (dg, db)) in per_channel.iter().enumerate() {
            dgamma[grp * cg + k] += dg;
            dbeta[grp * cg + k] += db;
        }
    }
    let mut out = dx;
    out.extend(dgamma.iter().map(|&v| T::of(v)));
    out.extend(dbeta.iter().map(|&v| T::of(v)));
    out
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm"
    }
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, s) = dims(xl, self.groups)?;
        let (g, eps, silu) = (self.groups, self.eps, self.silu);
        let out = with_floats!((xs, xl), (ws, wl), (bs, bl), |x, w, b| forward(
            x,
            w,
            b,
            g,
            eps,
            (c, s),
            silu
        ));
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = x.dim(1)?;
        let op = GroupNormBackward {
            groups: self.groups,
            eps: self.eps,
            silu: self.silu,
        };
        // After a SiLU the backward recomputes the norm's output, which takes β too.
        let params = if self.silu {
            Tensor::cat(&[weight, bias], 0)?
        } else {
            weight.clone()
        };
        let flat = x.apply_op3_no_bwd(&params, &grad.contiguous()?, &op)?;
        super::split_gradients(&flat, x.shape(), weight.shape(), c)
    }
}

impl CustomOp3 for GroupNormBackward {
    fn name(&self) -> &'static str {
        "group-norm-backward"
    }
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, s) = dims(xl, self.groups)?;
        let (groups, eps, silu) = (self.groups, self.eps, self.silu);
        let out = with_floats!((xs, xl), (ws, wl), (gs, gl), |x, params, dy| {
            let (w, beta) = if silu {
                (&params[..c], Some(&params[c..]))
            } else {
                (params, None)
            };
            backward(x, w, beta, dy, groups, eps, (c, s))
        });
        let len = xl.shape().elem_count() + 2 * c;
        Ok((out, Shape::from(len)))
    }
}
