//! Group normalisation (Wu & He 2018), diffusers' `GroupNorm` layer. On the CPU in f32 and f64
//! it runs the fused kernel of [`crate::kernels::group_norm`] (forward and backward in one pass
//! each, optionally with the SiLU that follows it fused in); other devices and dtypes use
//! candle's composition.

use crate::kernels::group_norm::GroupNormOp;
use candle_core::{DType, Result, Tensor};
use candle_nn::{Module, VarBuilder};

#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    composed: candle_nn::GroupNorm,
}

/// Builds a [`GroupNorm`] over `channels` in `groups` from `weight` and `bias` under `vb`.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = super::compute_param(vb.get_with_hints(
        channels,
        "weight",
        candle_nn::Init::Const(1.0),
    )?)?;
    let bias =
        super::compute_param(vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?)?;
    let composed = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
    Ok(GroupNorm {
        weight,
        bias,
        groups,
        eps,
        composed,
    })
}

impl GroupNorm {
    /// A group norm over given scale and shift tensors (`[C]` each).
    pub fn new(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Result<Self> {
        let channels = weight.dim(0)?;
        let composed =
            candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
            composed,
        })
    }
}

impl GroupNorm {
    /// `silu(group_norm(x))`, the pre-activation of every ResNet block: in one pass over the
    /// data on the CPU (f32 and f64), and one pass for its backward.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        let fused =
            x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.rank() >= 2;
        if !fused {
            return self.forward(x)?.silu();
        }
        let op = GroupNormOp {
            groups: self.groups,
            eps: self.eps,
            silu: true,
        };
        // candle records the op for the backward only when an input takes a gradient.
        x.contiguous()?.apply_op3(&self.weight, &self.bias, op)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let fused =
            x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.rank() >= 2;
        if !fused {
            return self.composed.forward(x);
        }
        x.contiguous()?.apply_op3(
            &self.weight,
            &self.bias,
            GroupNormOp {
                groups: self.groups,
                eps: self.eps,
                silu: false,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_matches_candle_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.5, 8, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, 8, &dev)?)?;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (3, 8, 5, 4), &dev)? + 1.0)?)?;
        let dy = Tensor::randn(0f32, 1.0, (3, 8, 5, 4), &dev)?;
        let fused = GroupNorm {
            weight: w.as_tensor().clone(),
            bias: b.as_tensor().clone(),
            groups: 4,
            eps: 1e-5,
            composed: candle_nn::GroupNorm::new(
                w.as_tensor().clone(),
                b.as_tensor().clone(),
                8,
                4,
                1e-5,
            )?,
        };
        let close = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        // Output and the gradients of x, γ and β agree between two ways to compute one thing.
        let agree = |y1: &Tensor, y2: &Tensor, what: &str| -> Result<()> {
            let g1 = (y1 * &dy)?.sum_all()?.backward()?;
            let g2 = (y2 * &dy)?.sum_all()?.backward()?;
            assert!(close(y1, y2)? < 1e-5, "{what}: output");
            for v in [&x, &w, &b] {
                let d = close(
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                )?;
                assert!(d < 1e-4, "{what}: {d}");
            }
            Ok(())
        };
        let y1 = fused.forward(x.as_tensor())?;
        agree(&y1, &fused.composed.forward(x.as_tensor())?, "norm")?;
        // Inference with the SiLU fused in equals the norm followed by candle's SiLU.
        let plain = GroupNorm::new(w.as_tensor().detach(), b.as_tensor().detach(), 4, 1e-5)?;
        let xd = x.as_tensor().detach();
        let fused_silu = plain.forward_silu(&xd)?;
        assert!(close(&fused_silu, &plain.forward(&xd)?.silu()?)? < 1e-5);
        // So does training: output and every gradient against candle's composition + SiLU.
        let y1 = fused.forward_silu(x.as_tensor())?;
        agree(&y1, &fused.composed.forward(x.as_tensor())?.silu()?, "SiLU")?;
        Ok(())
    }
}
