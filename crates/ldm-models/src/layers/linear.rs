//! The affine layer `x Wᵀ + b` (PyTorch's `nn.Linear`, weights `[out, in]`), counting its
//! operations in [`crate::flops`]. Weights loaded in bf16 on the CPU are packed once for the
//! [`super::bf16_gemm`] kernel and take f32 inputs (see [`super::compute_dtype`]).

use super::bf16_gemm::{self, PackedB};
use super::cpu::{contiguous_f32, Operand};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
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
        let y = if f32_cpu && weight.track_op() && super::bf16_products() {
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

/// `x Wᵀ` for a constant `W` while `x` takes gradients (a frozen layer in training, such as the
/// teacher's weights under LoRA factors): the backward gives `x` its gradient and `W` none.
/// candle's product would compute and keep a gradient for every constant weight it touches — a
/// copy of all frozen weights and a third of the backward's products.
struct FrozenProduct {
    /// `[in, out]`, contiguous.
    weight_t: Tensor,
}

impl CustomOp1 for FrozenProduct {
    fn name(&self) -> &'static str {
        "linear-frozen"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "linear-frozen", "input")?;
        let (in_dim, out_dim) = self.weight_t.dims2()?;
        let rows = x.len() / in_dim.max(1);
        let y = Tensor::from_slice(x, (rows, in_dim), &candle_core::Device::Cpu)?
            .matmul(&self.weight_t)?;
        let mut shape = layout.shape().dims().to_vec();
        *shape.last_mut().expect("an input of rank ≥ 1") = out_dim;
        Ok((
            CpuStorage::F32(y.flatten_all()?.to_vec1()?),
            Shape::from(shape),
        ))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (in_dim, out_dim) = self.weight_t.dims2()?;
        let rows = grad.elem_count() / out_dim.max(1);
        let dx = grad
            .contiguous()?
            .reshape((rows, out_dim))?
            .matmul(&self.weight_t.t()?)?;
        debug_assert_eq!(dx.dim(1)?, in_dim);
        Ok(Some(dx.reshape(x.shape())?))
    }
}

/// `x Wᵀ` for a trainable f32 weight `[out, in]` with bf16 products and f32 sums
/// ([`super::set_bf16_products`]): forward and both backward products through
/// [`bf16_gemm::gemm_f32`].
struct MixedProduct;

/// Its backward: inputs `x`, `W`, `dy`; output `[dx | dW]` flat.
struct MixedProductBackward;

/// `(rows, in, out)` of `x` `[…, in]` times `W` `[out, in]`.
fn product_dims(xl: &Layout, wl: &Layout, op: &str) -> Result<(usize, usize, usize)> {
    let (out_dim, in_dim) = wl.shape().dims2()?;
    if xl.shape().dims().last() != Some(&in_dim) {
        candle_core::bail!("{op}: input {:?} for a {in_dim}-wide layer", xl.shape())
    }
    Ok((xl.shape().elem_count() / in_dim.max(1), in_dim, out_dim))
}

impl candle_core::CustomOp2 for MixedProduct {
    fn name(&self) -> &'static str {
        "linear-bf16-products"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, k, n) = product_dims(xl, wl, self.name())?;
        let x = contiguous_f32(xs, xl, self.name(), "input")?;
        let w = contiguous_f32(ws, wl, self.name(), "weight")?;
        let mut y = vec![0f32; rows * n];
        bf16_gemm::gemm_f32(
            (rows, n, k),
            &mut y,
            n,
            false,
            Operand::rows(x, k),
            Operand::transposed(w, k),
            true,
        );
        let mut shape = xl.shape().dims().to_vec();
        *shape.last_mut().expect("rank ≥ 1") = n;
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let flat = x.apply_op3_no_bwd(w, &grad.contiguous()?, &MixedProductBackward)?;
        let mut grads = super::split_flat(&flat, &[x.shape(), w.shape()])?.into_iter();
        Ok((grads.next(), grads.next()))
    }
}

impl CustomOp3 for MixedProductBackward {
    fn name(&self) -> &'static str {
        "linear-bf16-products-backward"
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
        let (rows, k, n) = product_dims(xl, wl, self.name())?;
        let x = contiguous_f32(xs, xl, self.name(), "input")?;
        let w = contiguous_f32(ws, wl, self.name(), "weight")?;
        let dy = contiguous_f32(gs, gl, self.name(), "gradient")?;
        if dy.len() != rows * n {
            candle_core::bail!("{}: gradient {:?}", self.name(), gl.shape())
        }
        // dx = dy · W, `[rows, in]`; dW = dyᵀ · x, `[out, in]`.
        let mut out = vec![0f32; rows * k + n * k];
        let (dx, dw) = out.split_at_mut(rows * k);
        let (dy_rows, w_rows) = (Operand::rows(dy, n), Operand::rows(w, k));
        bf16_gemm::gemm_f32((rows, k, n), dx, k, false, dy_rows, w_rows, true);
        let (dy_t, x_rows) = (Operand::transposed(dy, n), Operand::rows(x, k));
        bf16_gemm::gemm_f32((n, k, rows), dw, k, false, dy_t, x_rows, true);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// `x Wᵀ + b` for f32 `x` `[…, in]` and a packed bf16 `Wᵀ`: `x` rounded to bf16 pairs, one
/// GEMM into an output that starts as the bias.
struct PackedLinear {
    weight: Arc<PackedB>,
    bias: Option<Tensor>,
}

impl CustomOp1 for PackedLinear {
    fn name(&self) -> &'static str {
        "linear-bf16"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name(), "input")?;
        let (k, n) = (self.weight.k(), self.weight.n());
        let dims = l.shape().dims();
        if dims.last() != Some(&k) {
            candle_core::bail!("linear: input {:?} does not end in {k} features", l.shape());
        }
        let rows = x.len() / k.max(1);
        let pairs = k.div_ceil(2);
        let mut a = vec![0u32; rows * pairs];
        bf16_gemm::pair_rows(x, rows, k, k, &mut a);
        let mut out = vec![0f32; rows * n];
        if let Some(b) = &self.bias {
            let b = b.to_vec1::<f32>()?;
            for row in out.chunks_mut(n) {
                row.copy_from_slice(&b);
            }
        }
        let parallel = rows * n * k >= 1 << 18;
        bf16_gemm::gemm(
            rows,
            &a,
            pairs,
            self.weight.view(),
            &mut out,
            n,
            true,
            parallel,
        );
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank ≥ 1") = n;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
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

    /// The bf16-products training op against candle's f32 product on inputs, weight and
    /// output gradient that are bf16 values already (so rounding changes nothing): output and
    /// both gradients agree to f32 summation error.
    #[test]
    fn bf16_products_give_the_f32_gradients_of_bf16_values() -> Result<()> {
        let dev = Device::Cpu;
        let values = |shape: &[usize]| -> Result<Tensor> {
            Tensor::randn(0f32, 1.0, shape, &dev)?
                .to_dtype(DType::BF16)?
                .to_dtype(DType::F32)
        };
        for &(rows, k, n) in &[(1, 1, 1), (7, 33, 17), (130, 64, 96)] {
            let x = candle_core::Var::from_tensor(&values(&[2, rows, k])?)?;
            let w = candle_core::Var::from_tensor(&values(&[n, k])?)?;
            let r = values(&[2, rows, n])?;
            let ours = x.as_tensor().apply_op2(w.as_tensor(), MixedProduct)?;
            let theirs = x.as_tensor().broadcast_matmul(&w.as_tensor().t()?)?;
            let ga = (&ours * &r)?.sum_all()?.backward()?;
            let gb = (&theirs * &r)?.sum_all()?.backward()?;
            let maxdiff = |a: &Tensor, b: &Tensor| -> Result<f32> {
                (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
            };
            let tol = 1e-5 * (k.max(n).max(rows) as f32).sqrt() + 1e-5;
            assert!(maxdiff(&ours, &theirs)? < tol, "{rows}×{k}→{n}: output");
            for (name, v) in [("x", &x), ("w", &w)] {
                let (a, b) = (ga.get(v).expect("grad"), gb.get(v).expect("grad"));
                assert!(maxdiff(a, b)? < 10.0 * tol, "{rows}×{k}→{n}: d{name}");
            }
        }
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
