//! Element-wise and row-wise CPU kernels with their backwards where training needs them:
//! softmax over the last dimension (backward `y ⊙ (g − Σ g⊙y)`), one vectorised pass of an
//! activation, GEGLU, and a per-channel bias with its fused per-channel sum. The ops that pick
//! them or a differentiable composition are in [`crate::layers::ops`].

use super::cpu::{self, contiguous, lane_sum};
use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

/// Fused CPU softmax over the last dimension, with backward `y ⊙ (g − Σ g⊙y)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Softmax;

/// The softmax backward pass for rows of `y` (the softmax) and `g` (the output gradient).
#[derive(Debug, Clone, Copy)]
struct SoftmaxBackward;

fn row_len(layout: &Layout) -> Result<usize> {
    layout
        .dims()
        .last()
        .copied()
        .filter(|&n| n > 0)
        .ok_or_else(|| candle_core::Error::Msg("softmax over an empty last dimension".into()))
}

fn softmax_rows<T: num_traits::Float + Send + Sync>(x: &[T], n: usize) -> Vec<T> {
    let mut out = x.to_vec();
    out.par_chunks_mut(n).for_each(|row| {
        let max = row.iter().copied().fold(T::neg_infinity(), T::max);
        let mut sum = T::zero();
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum = sum + *v;
        }
        for v in row.iter_mut() {
            *v = *v / sum;
        }
    });
    out
}

fn softmax_backward_rows<T: num_traits::Float + Send + Sync>(y: &[T], g: &[T], n: usize) -> Vec<T> {
    let mut out = vec![T::zero(); y.len()];
    out.par_chunks_mut(n)
        .zip(y.par_chunks(n).zip(g.par_chunks(n)))
        .for_each(|(dx, (y, g))| {
            let dot = y.iter().zip(g).fold(T::zero(), |acc, (&a, &b)| acc + a * b);
            for ((d, &yv), &gv) in dx.iter_mut().zip(y).zip(g) {
                *d = yv * (gv - dot);
            }
        });
    out
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim-differentiable"
    }
    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = row_len(layout)?;
        let out = match storage {
            CpuStorage::F32(x) => {
                CpuStorage::F32(softmax_rows(contiguous(x, layout, "softmax")?, n))
            }
            CpuStorage::F64(x) => {
                CpuStorage::F64(softmax_rows(contiguous(x, layout, "softmax")?, n))
            }
            s => candle_core::bail!("softmax: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, layout.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward)?,
        ))
    }
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-last-dim-backward"
    }
    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        ly: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = row_len(ly)?;
        let out = match (y, g) {
            (CpuStorage::F32(y), CpuStorage::F32(g)) => CpuStorage::F32(softmax_backward_rows(
                contiguous(y, ly, "softmax")?,
                contiguous(g, lg, "softmax")?,
                n,
            )),
            (CpuStorage::F64(y), CpuStorage::F64(g)) => CpuStorage::F64(softmax_backward_rows(
                contiguous(y, ly, "softmax")?,
                contiguous(g, lg, "softmax")?,
                n,
            )),
            _ => candle_core::bail!("softmax backward: unsupported dtypes"),
        };
        Ok((out, ly.shape().clone()))
    }
}

/// An elementwise activation's inference kernel: one vectorised pass of one of
/// [`crate::kernels::cpu`]'s slice functions (quick-GELU, erf-GELU).
#[derive(Clone, Copy)]
pub(crate) struct Elementwise {
    pub name: &'static str,
    pub f: fn(&mut [f32]),
}

impl Elementwise {
    /// `f` over `x` when it is an untracked f32 CPU tensor; `None` otherwise.
    pub fn apply(self, x: &Tensor) -> Option<Result<Tensor>> {
        (!x.track_op() && x.device().is_cpu() && x.dtype() == DType::F32)
            .then(|| x.contiguous()?.apply_op1_no_bwd(&self))
    }
}

impl CustomOp1 for Elementwise {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut out = cpu::contiguous_f32(storage, layout, self.name, "input")?.to_vec();
        cpu::par_map(&mut out, self.f);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = cpu::contiguous_f32(storage, layout, self.name(), "input")?;
        let dims = layout.dims();
        let width = *dims.last().unwrap_or(&0);
        if !width.is_multiple_of(2) {
            candle_core::bail!("geglu: odd last dimension {width}");
        }
        let half = width / 2;
        let mut out = vec![0f32; h.len() / 2];
        // Rows in parallel; each row: copy the gate, GELU it in place, multiply by the hidden half.
        out.par_chunks_mut(half.max(1))
            .zip(h.par_chunks(width.max(1)))
            .for_each(|(o, row)| {
                o.copy_from_slice(&row[half..]);
                cpu::gelu_erf_slice(o);
                for (y, &x) in o.iter_mut().zip(&row[..half]) {
                    *y *= x;
                }
            });
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = half;
        }
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            h.apply_op2_no_bwd(&grad.contiguous()?, &GegluBackward)?,
        ))
    }
}

/// [`Geglu`]'s backward: inputs `h` `[…, 2n]` and `dy` `[…, n]`; output `dh` `[…, 2n]`, one
/// pass ([`cpu::geglu_backward_row`]).
#[derive(Debug, Clone, Copy)]
struct GegluBackward;

impl CustomOp2 for GegluBackward {
    fn name(&self) -> &'static str {
        "geglu-backward"
    }

    fn cpu_fwd(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = cpu::contiguous_f32(hs, hl, self.name(), "input")?;
        let dy = cpu::contiguous_f32(gs, gl, self.name(), "gradient")?;
        let width = *hl.dims().last().unwrap_or(&0);
        if !width.is_multiple_of(2) || dy.len() * 2 != h.len() {
            candle_core::bail!(
                "geglu backward: gradient {:?} for input {:?}",
                gl.shape(),
                hl.shape()
            );
        }
        let half = width / 2;
        let mut dh = vec![0f32; h.len()];
        dh.par_chunks_mut(width.max(1))
            .zip(h.par_chunks(width.max(1)).zip(dy.par_chunks(half.max(1))))
            .for_each(|(dh, (h, dy))| cpu::geglu_backward_row(h, dy, dh));
        Ok((CpuStorage::F32(dh), hl.shape().clone()))
    }
}

/// `(outer, C, inner)` of a layout split at `axis`.
fn split_at_axis(l: &Layout, axis: usize) -> (usize, usize, usize) {
    let d = l.dims();
    (
        d[..axis].iter().product(),
        d[axis],
        d[axis + 1..].iter().product(),
    )
}

/// [`add_bias`](crate::layers::ops::add_bias)'s op; its backward is [`ChannelSum`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChannelBias {
    pub(crate) axis: usize,
}

/// Sum of every element of one channel (the bias gradient): `[…, C, …]` → `[C]`.
#[derive(Debug, Clone, Copy)]
struct ChannelSum {
    axis: usize,
}

fn add_channel_bias<T: num_traits::Float + Send + Sync>(
    x: &[T],
    b: &[T],
    (c, inner): (usize, usize),
) -> Vec<T> {
    let mut out = x.to_vec();
    out.par_chunks_mut((c * inner).max(1)).for_each(|block| {
        for (row, &bv) in block.chunks_mut(inner.max(1)).zip(b) {
            for v in row {
                *v = *v + bv;
            }
        }
    });
    out
}

/// Per-channel sums in f64. Many channels of long rows: one task per channel; short rows (a
/// linear layer's, `inner` = 1): partial sums over bands of the outer dimension.
fn channel_sums<T: num_traits::Float + Send + Sync>(
    g: &[T],
    (outer, c, inner): (usize, usize, usize),
) -> Vec<T> {
    let f = |v: T| v.to_f64().unwrap_or(0.0);
    let sums: Vec<f64> = if inner >= 64 {
        (0..c)
            .into_par_iter()
            .map(|ch| {
                (0..outer)
                    .map(|o| {
                        let start = (o * c + ch) * inner;
                        lane_sum(&g[start..start + inner], f)
                    })
                    .sum()
            })
            .collect()
    } else {
        let band = (outer / (4 * rayon::current_num_threads()).max(1)).max(1);
        g.par_chunks((band * c * inner).max(1))
            .map(|block| {
                let mut acc = vec![0f64; c];
                for row in block.chunks(c * inner) {
                    for (a, ch) in acc.iter_mut().zip(row.chunks(inner.max(1))) {
                        *a += lane_sum(ch, f);
                    }
                }
                acc
            })
            .reduce(
                || vec![0f64; c],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    a
                },
            )
    };
    sums.into_iter()
        .map(|v| T::from(v).unwrap_or_else(T::zero))
        .collect()
}

impl CustomOp2 for ChannelBias {
    fn name(&self) -> &'static str {
        "add-channel-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, inner) = split_at_axis(xl, self.axis);
        let out = match (xs, bs) {
            (CpuStorage::F32(x), CpuStorage::F32(b)) => CpuStorage::F32(add_channel_bias(
                contiguous(x, xl, self.name())?,
                contiguous(b, bl, self.name())?,
                (c, inner),
            )),
            (CpuStorage::F64(x), CpuStorage::F64(b)) => CpuStorage::F64(add_channel_bias(
                contiguous(x, xl, self.name())?,
                contiguous(b, bl, self.name())?,
                (c, inner),
            )),
            _ => candle_core::bail!("add bias: f32 or f64 operands of one dtype expected"),
        };
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = grad
            .contiguous()?
            .apply_op1_no_bwd(&ChannelSum { axis: self.axis })?;
        Ok((Some(grad.clone()), Some(db)))
    }
}

impl CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "channel-sum"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = split_at_axis(layout, self.axis);
        let out = match storage {
            CpuStorage::F32(g) => CpuStorage::F32(channel_sums(contiguous(g, layout, "")?, dims)),
            CpuStorage::F64(g) => CpuStorage::F64(channel_sums(contiguous(g, layout, "")?, dims)),
            s => candle_core::bail!("channel sum: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, Shape::from(dims.1)))
    }
}
