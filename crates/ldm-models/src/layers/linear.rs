//! The affine layer `x Wᵀ + b` (PyTorch's `nn.Linear`, weights `[out, in]`), counting its
//! operations in [`crate::flops`]. Weights loaded in bf16 on the CPU are packed once for the
//! [`bf16_gemm`] kernel and take f32 inputs (see [`super::compute_dtype`]); the products
//! themselves are in [`crate::kernels::products`].

use crate::kernels::bf16_gemm::{self, PackedB};
use crate::kernels::bf16_products;
use crate::kernels::products::{FrozenProduct, MixedProduct, PackedLinear};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use std::sync::Arc;

#[derive(Debug, Clone)]
enum Weight {
    /// `[out, in]` and `Wᵀ` as `[in, out]`: a contiguous copy for constant weights (the
    /// product's right-hand side then streams row by row, and the `[out, in]` tensor is a view
    /// of it), or a transposed view of a trainable weight.
    Dense { weight: Tensor, weight_t: Tensor },
    /// `Wᵀ` packed for the bf16 kernel.
    Bf16(Arc<PackedB>),
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    in_dim: usize,
    out_dim: usize,
    /// A LoRA update kept beside the weight: `x Aᵀ Bᵀ` added to the output, with `Aᵀ`
    /// `[in, r]` and `Bᵀ` `[r, out]` (what `ldm distill lcm --lora` trains; α/r folded in).
    lora: Option<(Tensor, Tensor)>,
}

impl Linear {
    /// Input width.
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        let bias = bias.map(super::compute_param).transpose()?;
        let cpu_bf16 = weight.dtype() == DType::BF16 && weight.device().is_cpu();
        if cpu_bf16 && !weight.is_variable() && bf16_gemm::available() {
            let bits = bf16_gemm::tensor_bits(&weight)?;
            let packed = PackedB::from_transposed_bf16(&bits, out_dim, in_dim);
            return Ok(Self {
                weight: Weight::Bf16(Arc::new(packed)),
                bias,
                in_dim,
                out_dim,
                lora: None,
            });
        }
        // Without the bf16 kernel, bf16 weights on the CPU compute in f32.
        let weight = if cpu_bf16 {
            weight.to_dtype(DType::F32)?
        } else {
            weight
        };
        let weight = if weight.is_variable() {
            Weight::Dense {
                weight_t: weight.t()?,
                weight,
            }
        } else {
            let weight_t = weight.t()?.contiguous()?;
            Weight::Dense {
                weight: weight_t.t()?,
                weight_t,
            }
        };
        Ok(Self {
            weight,
            bias,
            in_dim,
            out_dim,
            lora: None,
        })
    }

    /// Adds the LoRA factors `lora_A.weight` `[r, in]` and `lora_B.weight` `[out, r]` found
    /// under `vb` (PEFT's names), applied beside the weight rather than merged into it, so that
    /// only the factors take gradients. Without them the layer is unchanged.
    pub fn with_lora(mut self, vb: &VarBuilder) -> Result<Self> {
        if !vb.contains_tensor("lora_A.weight") {
            return Ok(self);
        }
        let down = vb.get_unchecked("lora_A.weight")?;
        let up = vb.get_unchecked("lora_B.weight")?;
        let (rank, in_dim) = down.dims2()?;
        if in_dim != self.in_dim || up.dims2()? != (self.out_dim, rank) {
            candle_core::bail!(
                "LoRA factors {:?} and {:?} do not fit a {} → {} layer",
                down.dims(),
                up.dims(),
                self.in_dim,
                self.out_dim
            )
        }
        self.lora = Some((down.t()?, up.t()?));
        Ok(self)
    }

    /// Whether the weight is packed for the bf16 kernel (bf16 weights on a CPU that has it).
    pub fn is_packed_bf16(&self) -> bool {
        matches!(self.weight, Weight::Bf16(_))
    }

    /// The `[out, in]` weight as a tensor (unpacked from the bf16 layout when packed).
    pub fn weight(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense { weight, .. } => Ok(weight.clone()),
            Weight::Bf16(p) => {
                let mut w = Vec::with_capacity(self.out_dim * self.in_dim);
                for o in 0..self.out_dim {
                    w.extend((0..self.in_dim).map(|i| half::bf16::from_f32(p.get(i, o))));
                }
                Tensor::from_vec(w, (self.out_dim, self.in_dim), &candle_core::Device::Cpu)
            }
        }
    }
}

/// `weight` and `bias` under `vb`; a fresh layer starts as PyTorch's `nn.Linear` (see
/// [`torch_default_init`]).
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let init = torch_default_init(in_dim);
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
    let bias = vb.get_with_hints(out_dim, "bias", init)?;
    Linear::new(weight, Some(bias))?.with_lora(&vb)
}

/// How PyTorch initialises a fresh `nn.Linear` or `nn.Conv2d`, and so every diffusers and
/// original-LDM model trained from scratch: `kaiming_uniform_(a = √5)` for the weight and the
/// same bound for the bias — both uniform in ±1/√fan_in, fan_in = inputs × kernel area.
/// (candle-nn's constructors draw the weight from Kaiming's normal for ReLU, std √(2/fan_in),
/// √6 times wider, which trained our U-Net markedly worse than PyTorch's start.)
pub fn torch_default_init(fan_in: usize) -> candle_nn::Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    candle_nn::Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// `weight` and `bias` under `vb`; a fresh layer draws its weight from `N(0, std²)` and starts
/// with a zero bias (the initialisation transformers gives CLIP).
pub fn linear_normal(in_dim: usize, out_dim: usize, std: f64, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        candle_nn::Init::Randn {
            mean: 0.0,
            stdev: std,
        },
    )?;
    let bias = vb.get_with_hints(out_dim, "bias", candle_nn::Init::Const(0.0))?;
    Linear::new(weight, Some(bias))?.with_lora(&vb)
}

/// `weight` only.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", torch_default_init(in_dim))?;
    Linear::new(weight, None)?.with_lora(&vb)
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_weight(x)?;
        match &self.lora {
            Some((down_t, up_t)) => {
                let dims = x.dims();
                let rows = x.elem_count() / self.in_dim.max(1);
                let delta = x
                    .reshape((rows, self.in_dim))?
                    .matmul(down_t)?
                    .matmul(up_t)?;
                let mut out_shape = dims.to_vec();
                *out_shape.last_mut().expect("rank ≥ 1") = self.out_dim;
                y + delta.reshape(out_shape)?
            }
            None => Ok(y),
        }
    }
}

impl Linear {
    fn forward_weight(&self, x: &Tensor) -> Result<Tensor> {
        let (in_dim, out_dim) = (self.in_dim, self.out_dim);
        let rows = x.elem_count() / in_dim.max(1);
        crate::flops::add(crate::flops::matmul(rows, in_dim, out_dim));
        let (weight, weight_t) = match &self.weight {
            Weight::Bf16(packed) => {
                let op = PackedLinear {
                    weight: packed.clone(),
                    bias: self.bias.clone(),
                };
                return x.contiguous()?.apply_op1_no_bwd(&op);
            }
            Weight::Dense { weight, weight_t } => (weight, weight_t),
        };
        let f32_cpu = x.device().is_cpu() && x.dtype() == DType::F32;
        let dims = x.dims();
        let y = if f32_cpu && weight.track_op() && bf16_products() {
            x.contiguous()?.apply_op2(weight, MixedProduct)?
        } else if f32_cpu && x.track_op() && !weight_t.track_op() {
            x.contiguous()?.apply_op1(FrozenProduct {
                weight_t: weight_t.clone(),
            })?
        } else if dims.len() > 2 && x.is_contiguous() {
            // Leading dimensions are folded into rows so that one 2-D product runs.
            let mut out_shape = dims.to_vec();
            *out_shape.last_mut().expect("rank > 2") = out_dim;
            x.reshape((rows, in_dim))?
                .matmul(weight_t)?
                .reshape(out_shape)?
        } else {
            x.broadcast_matmul(weight_t)?
        };
        match &self.bias {
            Some(b) => super::ops::add_bias(&y, b, y.rank() - 1),
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A frozen layer under an input that takes gradients: the same output and input gradient
    /// as candle's product (checked against finite differences too), and no gradient kept
    /// for the weight.
    #[test]
    fn a_frozen_weight_passes_gradients_through_and_keeps_none() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f64, 1.0, (5, 3), &dev)?.to_dtype(DType::F32)?;
        let b = Tensor::randn(0f32, 1.0, 5, &dev)?;
        let layer = Linear::new(w.clone(), Some(b.clone()))?;
        let x0 = Tensor::randn(0f32, 1.0, (2, 4, 3), &dev)?;
        let x = candle_core::Var::from_tensor(&x0)?;
        let y = layer.forward(x.as_tensor())?;
        let reference = x0.broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
        let err = (&y - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "{err}");
        let loss = |y: &Tensor| y.sqr()?.sum_all();
        let grads = loss(&y)?.backward()?;
        let dx = grads.get(x.as_tensor()).expect("a gradient for x");
        assert!(grads.get(&w).is_none());
        // d/dx of Σ (x Wᵀ + b)² = 2 (x Wᵀ + b) W.
        let expect = (reference * 2.0)?.broadcast_matmul(&w)?;
        let err = (dx - &expect)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-4, "{err}");
        // One element by central differences.
        let h = 1e-2f32;
        let bump = |d: f32| -> Result<f32> {
            let mut v = x0.flatten_all()?.to_vec1::<f32>()?;
            v[7] += d;
            let xs = Tensor::from_vec(v, x0.shape(), &dev)?;
            loss(&layer.forward(&xs)?)?.to_scalar::<f32>()
        };
        let fd = (bump(h)? - bump(-h)?) / (2.0 * h);
        let an = dx.flatten_all()?.to_vec1::<f32>()?[7];
        assert!((fd - an).abs() < 1e-2 * an.abs().max(1.0), "{fd} vs {an}");
        Ok(())
    }

    /// bf16 weights on the CPU: the packed kernel (or the f32 fallback) against the f32 layer
    /// over the same bf16-rounded weights and inputs.
    #[test]
    fn bf16_weights_compute_in_f32() -> Result<()> {
        let dev = Device::Cpu;
        for &(rows, k, n) in &[(1, 3, 5), (7, 64, 40), (300, 129, 70)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?.to_dtype(DType::BF16)?;
            let b = Tensor::randn(0f32, 1.0, n, &dev)?.to_dtype(DType::BF16)?;
            let x = Tensor::randn(0f32, 1.0, (2, rows, k), &dev)?;
            let ours = Linear::new(w.clone(), Some(b.clone()))?.forward(&x)?;
            assert_eq!(ours.dtype(), DType::F32);
            // The packed kernel rounds the input to bf16; the f32 fallback (a CPU without
            // AVX512-BF16) keeps it.
            let x_r = if bf16_gemm::available() {
                x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?
            } else {
                x.clone()
            };
            let theirs = Linear::new(w.to_dtype(DType::F32)?, Some(b.to_dtype(DType::F32)?))?
                .forward(&x_r)?;
            let diff = (ours - theirs)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-4 * (k as f32).sqrt(), "{rows}×{k}→{n}: {diff}");
        }
        let w = Tensor::randn(0f32, 1.0, (6, 4), &dev)?.to_dtype(DType::BF16)?;
        let back = Linear::new(w.clone(), None)?
            .weight()?
            .to_dtype(DType::F32)?;
        let diff = (back - w.to_dtype(DType::F32)?)?
            .abs()?
            .sum_all()?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "weight() returns the packed weight");
        Ok(())
    }
}
