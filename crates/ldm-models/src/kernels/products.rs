//! The linear layer's products on the CPU beyond candle's `matmul`: a frozen weight's product
//! that keeps no weight gradient, the bf16-operand product of a trainable f32 weight (forward
//! and both backward products, [`super::set_bf16_products`]) and the packed bf16 weight's
//! inference product ([`super::bf16_gemm`]).

use super::bf16_gemm::{self, PackedB};
use super::cpu::{contiguous_f32, Operand};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// `x Wᵀ` for a constant `W` while `x` takes gradients (a frozen layer in training, such as the
/// teacher's weights under LoRA factors): the backward gives `x` its gradient and `W` none.
/// candle's product would compute and keep a gradient for every constant weight it touches — a
/// copy of all frozen weights and a third of the backward's products.
pub(crate) struct FrozenProduct {
    /// `[in, out]`, contiguous.
    pub(crate) weight_t: Tensor,
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
pub(crate) struct MixedProduct;

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
pub(crate) struct PackedLinear {
    pub(crate) weight: Arc<PackedB>,
    pub(crate) bias: Option<Tensor>,
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
    use candle_core::{DType, Device};

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
}
