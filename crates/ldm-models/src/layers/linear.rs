//! The affine layer `x Wᵀ + b` (PyTorch's `nn.Linear`, weights `[out, in]`), counting its
//! operations in [`crate::flops`].

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    weight: Tensor,
    /// `Wᵀ` as `[in, out]`: a contiguous copy for constant weights (the product's right-hand side
    /// then streams row by row), or a transposed view of a trainable `weight`.
    weight_t: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        let contiguous_t = if weight.is_variable() {
            None
        } else {
            weight.t().and_then(|t| t.contiguous()).ok()
        };
        match contiguous_t {
            // The [out, in] weight becomes a view of the copy, so the memory is not doubled.
            Some(wt) => Self {
                weight: wt.t().unwrap_or_else(|_| wt.clone()),
                weight_t: wt,
                bias,
            },
            None => Self {
                weight_t: weight.t().unwrap_or_else(|_| weight.clone()),
                weight,
                bias,
            },
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// `weight` and `bias` under `vb`, initialised as PyTorch does when training.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let l = candle_nn::linear(in_dim, out_dim, vb)?;
    Ok(Linear::new(l.weight().clone(), l.bias().cloned()))
}

/// `weight` only.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let l = candle_nn::linear_no_bias(in_dim, out_dim, vb)?;
    Ok(Linear::new(l.weight().clone(), None))
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (out_dim, in_dim) = self.weight.dims2()?;
        let rows = x.elem_count() / in_dim.max(1);
        crate::flops::add(crate::flops::matmul(rows, in_dim, out_dim));
        // Leading dimensions are folded into rows so that one 2-D product runs.
        let dims = x.dims();
        let y = if dims.len() > 2 && x.is_contiguous() {
            let mut out_shape = dims.to_vec();
            *out_shape.last_mut().expect("rank > 2") = out_dim;
            x.reshape((rows, in_dim))?
                .matmul(&self.weight_t)?
                .reshape(out_shape)?
        } else {
            x.broadcast_matmul(&self.weight_t)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
