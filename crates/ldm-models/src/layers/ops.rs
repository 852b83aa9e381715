//! Ops whose candle fast paths have no (or a wrong) backward pass, each with one fast forward
//! for inference and one differentiable composition that is used whenever the input takes part
//! in a gradient computation (`Tensor::track_op`). candle 0.11's `softmax_last_dim` and its
//! contiguous `LayerNorm` kernel record no backward at all, and `upsample_nearest2d`'s backward
//! overwrites, rather than adds to, the gradient of an input that is also used elsewhere.
//! The compositions are checked against finite differences in f64 (`tests` below and
//! `ldm-train`'s gradient tests). The fused kernels are in [`crate::kernels::elementwise`].

use crate::kernels::elementwise::{ChannelBias, Geglu, Softmax};
use candle_core::{DType, Result, Tensor, D};
use candle_nn::{Module, VarBuilder};

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

/// GEGLU (Shazeer 2020): the last dimension of `h` is `[hidden | gate]`; returns
/// `hidden · gelu(gate)` with the exact (erf) GELU. One pass on the CPU in f32, and one for
/// its backward; elsewhere (and in f64, the gradient checks) a composition.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let half = h.dim(D::Minus1)? / 2;
    if h.device().is_cpu() && h.dtype() == DType::F32 {
        // Recorded for the backward only when `h` takes a gradient.
        return h.contiguous()?.apply_op1(Geglu);
    }
    let (hidden, gate) = (
        h.narrow(D::Minus1, 0, half)?,
        h.narrow(D::Minus1, half, half)?,
    );
    hidden * super::gelu(&gate)?
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
    /// The fused GEGLU's output and input gradient against the composition (narrow, erf-GELU,
    /// product) that f64 and other devices run.
    #[test]
    fn geglu_training_matches_the_composition() -> Result<()> {
        let dev = Device::Cpu;
        let h = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (3, 5, 14), &dev)?))?;
        let dy = Tensor::randn(0f32, 1.0, (3, 5, 7), &dev)?;
        let fused = geglu(h.as_tensor())?;
        let (hidden, gate) = (h.narrow(2, 0, 7)?, h.narrow(2, 7, 7)?);
        let composed = (hidden * gate.gelu_erf()?)?;
        assert!(max_abs(&fused, &composed) < 1e-5);
        let g1 = (&fused * &dy)?.sum_all()?.backward()?;
        let g2 = (&composed * &dy)?.sum_all()?.backward()?;
        let (a, b) = (
            g1.get(h.as_tensor()).unwrap(),
            g2.get(h.as_tensor()).unwrap(),
        );
        assert!(max_abs(a, b) < 1e-4, "{}", max_abs(a, b));
        Ok(())
    }

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
