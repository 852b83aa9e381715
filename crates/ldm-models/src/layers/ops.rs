//! Ops whose candle fast paths have no (or a wrong) backward pass, each with one fast forward
//! for inference and one differentiable composition that is used whenever the input takes part
//! in a gradient computation (`Tensor::track_op`). candle 0.11's `softmax_last_dim` and its
//! contiguous `LayerNorm` kernel record no backward at all, and `upsample_nearest2d`'s backward
//! overwrites, rather than adds to, the gradient of an input that is also used elsewhere.
//! The compositions are checked against finite differences in f64 (`tests` below and
//! `ldm-train`'s gradient tests).

use super::cpu::{contiguous, lane_sum};
use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape,
    Tensor, D,
};
use candle_nn::{Module, VarBuilder};
use rayon::prelude::*;

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        candle_nn::ops::softmax_last_dim(x)
    } else if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }
}

/// Fused CPU softmax over the last dimension, with backward `y ⊙ (g − Σ g⊙y)`.
#[derive(Debug, Clone, Copy)]
struct Softmax;

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

/// Nearest-neighbour resize of `[B, C, H, W]` to `[B, C, th, tw]`. Integer factors compose a
/// broadcast when a gradient is needed, whose backward sums over the repeated pixels.
pub fn upsample_nearest2d(x: &Tensor, th: usize, tw: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if x.track_op() && th.is_multiple_of(h) && tw.is_multiple_of(w) {
        let (fh, fw) = (th / h, tw / w);
        x.reshape((b, c, h, 1, w, 1))?
            .broadcast_as((b, c, h, fh, w, fw))?
            .contiguous()?
            .reshape((b, c, th, tw))
    } else {
        x.upsample_nearest2d(th, tw)
    }
}

/// LayerNorm over the last dimension with an affine weight and bias (`torch.nn.LayerNorm`).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

/// Builds a [`LayerNorm`] of width `dim` from `weight` and `bias` under `vb`.
pub fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    let weight =
        super::compute_param(vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?)?;
    let bias =
        super::compute_param(vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?)?;
    Ok(LayerNorm { weight, bias, eps })
}

impl LayerNorm {
    /// A layer norm over given scale and shift tensors.
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let training = x.track_op() || self.weight.track_op() || self.bias.track_op();
        if !training && x.is_contiguous() && x.dtype() != DType::F64 {
            return candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps as f32);
        }
        let fused = x.device().is_cpu()
            && matches!(x.dtype(), DType::F32 | DType::F64)
            && self.weight.dtype() == x.dtype()
            && x.rank() >= 1;
        if fused {
            // LayerNorm over the last dimension is GroupNorm with one group over `[rows, C]`:
            // the fused kernel and its tested backward (the composition below costs four
            // broadcasts, each with a strided reduction in its backward).
            let c = x.dim(D::Minus1)?;
            let rows = x.elem_count() / c.max(1);
            let gn =
                super::norm::GroupNorm::new(self.weight.clone(), self.bias.clone(), 1, self.eps)?;
            return gn.forward(&x.reshape((rows, c))?)?.reshape(x.shape());
        }
        let dtype = x.dtype();
        let internal = match dtype {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        };
        let x = x.to_dtype(internal)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn fast_and_differentiable_paths_agree() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &dev)?;
        let v = Var::from_tensor(&x)?;
        assert!(max_abs(&softmax_last_dim(&x)?, &softmax_last_dim(v.as_tensor())?) < 1e-6);
        assert!(
            max_abs(
                &upsample_nearest2d(&x, 8, 10)?,
                &upsample_nearest2d(v.as_tensor(), 8, 10)?
            ) < 1e-7
        );
        let ln = LayerNorm {
            weight: Tensor::randn(0f32, 1.0, 5, &dev)?,
            bias: Tensor::randn(0f32, 1.0, 5, &dev)?,
            eps: 1e-5,
        };
        assert!(max_abs(&ln.forward(&x)?, &ln.forward(v.as_tensor())?) < 1e-5);
        let h = (Tensor::randn(0f32, 1.0, (2, 7, 12), &dev)? * 3.0)?;
        let hv = Var::from_tensor(&h)?;
        assert!(max_abs(&geglu(&h)?, &geglu(hv.as_tensor())?) < 1e-5);
        let q = super::super::quick_gelu(&h)?;
        assert!(max_abs(&q, &super::super::quick_gelu(hv.as_tensor())?) < 1e-5);
        let g = super::super::gelu(&h)?;
        assert!(max_abs(&g, &super::super::gelu(hv.as_tensor())?) < 1e-5);
        assert_eq!(geglu(&h)?.dims(), &[2, 7, 6]);
        Ok(())
    }

    /// The fused bias op against the broadcast it replaces: values, and both gradients, for a
    /// convolution's channel axis (long rows) and a linear layer's last axis (short rows).
    #[test]
    fn add_bias_matches_broadcast() -> Result<()> {
        let dev = Device::Cpu;
        for (dims, axis) in [
            (vec![3usize, 5, 9, 70], 1usize),
            (vec![4, 6, 5], 2),
            (vec![130, 7], 1),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, dims.as_slice(), &dev)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f64, 1.0, dims[axis], &dev)?)?;
            let w = Tensor::randn(0f64, 1.0, dims.as_slice(), &dev)?;
            let mut shape = vec![1; dims.len()];
            shape[axis] = dims[axis];
            let reference = x
                .as_tensor()
                .broadcast_add(&b.as_tensor().reshape(shape)?)?;
            let fused = add_bias(x.as_tensor(), b.as_tensor(), axis)?;
            assert!(max_abs(&reference, &fused) < 1e-12);
            let g_ref = (reference * &w)?.sum_all()?.backward()?;
            let g = (fused * &w)?.sum_all()?.backward()?;
            for v in [&x, &b] {
                let (a, c) = (
                    g_ref.get(v.as_tensor()).unwrap(),
                    g.get(v.as_tensor()).unwrap(),
                );
                assert!(max_abs(a, c) < 1e-10, "{dims:?} axis {axis}");
            }
        }
        Ok(())
    }
}

/// GEGLU (Shazeer 2020): the last dimension of `h` is `[hidden | gate]`; returns
/// `hidden · gelu(gate)` with the exact (erf) GELU. One pass on the CPU for f32 inference.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let half = h.dim(D::Minus1)? / 2;
    if !h.track_op() && h.device().is_cpu() && h.dtype() == DType::F32 {
        return h.contiguous()?.apply_op1_no_bwd(&Geglu);
    }
    let (hidden, gate) = (
        h.narrow(D::Minus1, 0, half)?,
        h.narrow(D::Minus1, half, half)?,
    );
    hidden * super::gelu(&gate)?
}

/// An elementwise activation's inference kernel: one vectorised pass of one of
/// [`super::cpu`]'s slice functions (quick-GELU, erf-GELU).
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
        let mut out = super::cpu::contiguous_f32(storage, layout, self.name, "input")?.to_vec();
        super::cpu::par_map(&mut out, self.f);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[derive(Debug, Clone, Copy)]
struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = super::cpu::contiguous_f32(storage, layout, self.name(), "input")?;
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
                super::cpu::gelu_erf_slice(o);
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
}

/// `x + bias`, with `bias` `[C]` laid along dimension `axis` of `x` (a convolution's or linear
/// layer's bias). On the CPU, for f32/f64, one pass forward and a fused per-channel sum
/// backward: candle's broadcast backward sums over non-trailing dimensions with a strided
/// reduction, ~13 % of a training step in profiles.
pub fn add_bias(x: &Tensor, bias: &Tensor, axis: usize) -> Result<Tensor> {
    let fused = x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && bias.dtype() == x.dtype()
        && bias.rank() == 1
        && axis < x.rank()
        && x.dim(axis)? == bias.dim(0)?;
    if !fused {
        let mut shape = vec![1; x.rank()];
        if let Some(s) = shape.get_mut(axis) {
            *s = bias.elem_count();
        }
        return x.broadcast_add(&bias.reshape(shape)?);
    }
    let op = ChannelBias { axis };
    if x.track_op() || bias.track_op() {
        x.contiguous()?.apply_op2(&bias.contiguous()?, op)
    } else {
        x.contiguous()?.apply_op2_no_bwd(&bias.contiguous()?, &op)
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

/// [`add_bias`]'s op; its backward is [`ChannelSum`].
#[derive(Debug, Clone, Copy)]
struct ChannelBias {
    axis: usize,
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
