//! The 2-D convolution layer (`torch.nn.Conv2d` with a square kernel, optional PEFT LoRA
//! factors). It picks its kernel: on the CPU in f32, inference runs
//! [`conv_gemm`](crate::kernels::conv_gemm) (banded patches + GEMM) and training
//! [`conv_train`](crate::kernels::conv_train) (im2col + GEMM with its own backward); bf16
//! weights run [`conv_bf16`](crate::kernels::conv_bf16); elsewhere candle's kernel.

use crate::kernels::conv_bf16::PackedConv;
use crate::kernels::conv_train::{conv2d_im2col, ConvTrain};
use crate::kernels::{bf16_gemm, bf16_products, conv_bf16, conv_gemm};
use candle_core::{DType, Result, Tensor};
use candle_nn::{Module, VarBuilder};
use std::sync::Arc;

#[derive(Debug, Clone)]
enum Weight {
    /// `[C_out, C, k, k]`.
    Dense(Tensor),
    /// bf16 on the CPU, reordered once for [`conv_bf16`].
    Bf16(Arc<PackedConv>),
}

/// A convolution layer with bias (`torch.nn.Conv2d` with a square kernel).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Weight,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    /// A LoRA update kept beside the weight (PEFT's for a convolution): `A`, a convolution
    /// `[r, C, k, k]` at the layer's stride and padding, then `B`, a 1×1 convolution
    /// `[C_out, r, 1, 1]`, their output added to the layer's (α/r folded in).
    lora: Option<Box<(Conv2d, Conv2d)>>,
}

impl Conv2d {
    /// Builds the layer from `weight` and `bias` under `vb` (a fresh layer starts as PyTorch's
    /// `nn.Conv2d`, see [`torch_default_init`](super::linear::torch_default_init)).
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Self::build(vb, in_channels, out_channels, kernel, stride, padding, true)
    }

    /// The layer without a bias (`nn.Conv2d(…, bias=False)`).
    pub fn new_no_bias(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Self::build(
            vb,
            in_channels,
            out_channels,
            kernel,
            stride,
            padding,
            false,
        )
    }

    fn build(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        with_bias: bool,
    ) -> Result<Self> {
        let init = super::linear::torch_default_init(in_channels * kernel * kernel);
        let weight =
            vb.get_with_hints((out_channels, in_channels, kernel, kernel), "weight", init)?;
        let bias = if with_bias {
            Some(super::compute_param(vb.get_with_hints(
                out_channels,
                "bias",
                init,
            )?)?)
        } else {
            None
        };
        let cpu_bf16 = weight.dtype() == DType::BF16 && weight.device().is_cpu();
        let weight = if cpu_bf16 && bf16_gemm::available() {
            let bits = bf16_gemm::tensor_bits(&weight)?;
            let packed = PackedConv::from_bf16(&bits, out_channels, in_channels, kernel);
            Weight::Bf16(Arc::new(packed))
        } else if cpu_bf16 {
            // Without the bf16 kernel, bf16 weights on the CPU compute in f32.
            Weight::Dense(weight.to_dtype(DType::F32)?)
        } else {
            Weight::Dense(weight)
        };
        let layer = Self {
            weight,
            bias,
            stride,
            padding,
            lora: None,
        };
        if !vb.contains_tensor("lora_A.weight") {
            return Ok(layer);
        }
        let down = vb.get_unchecked("lora_A.weight")?;
        let up = vb.get_unchecked("lora_B.weight")?;
        let (rank, c, k, _) = down.dims4()?;
        if (c, k) != (in_channels, kernel) || up.dims4()? != (out_channels, rank, 1, 1) {
            candle_core::bail!(
                "LoRA factors {:?} and {:?} do not fit a {in_channels} → {out_channels} \
                 convolution of kernel {kernel}",
                down.dims(),
                up.dims()
            )
        }
        let bare = |w: Tensor, stride, padding| Conv2d {
            weight: Weight::Dense(w),
            bias: None,
            stride,
            padding,
            lora: None,
        };
        Ok(Self {
            lora: Some(Box::new((bare(down, stride, padding), bare(up, 1, 0)))),
            ..layer
        })
    }

    /// `(C_out, C_in, k)`.
    fn dims(&self) -> Result<(usize, usize, usize)> {
        match &self.weight {
            Weight::Dense(w) => {
                let (o, i, k, _) = w.dims4()?;
                Ok((o, i, k))
            }
            Weight::Bf16(p) => Ok((p.c_out, p.c_in, p.k)),
        }
    }
}

/// `2 · B · C_out · C_in · k² · H_out · W_out`, added to [`crate::flops`].
fn count_flops(x: &Tensor, (o, i, k): (usize, usize, usize), stride: usize, padding: usize) {
    if let Ok((b, _, h, w)) = x.dims4() {
        let out = |n: usize| (n + 2 * padding).saturating_sub(k) / stride + 1;
        crate::flops::add(crate::flops::matmul(b * out(h) * out(w), i * k * k, o));
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_weight(x)?;
        match &self.lora {
            Some(lora) => y + lora.1.forward(&lora.0.forward(x)?)?,
            None => Ok(y),
        }
    }
}

impl Conv2d {
    fn forward_weight(&self, x: &Tensor) -> Result<Tensor> {
        let dims = self.dims()?;
        count_flops(x, dims, self.stride, self.padding);
        let c_out = dims.0;
        let zeros = || Tensor::zeros(c_out, DType::F32, x.device());
        let weight = match &self.weight {
            Weight::Bf16(packed) => {
                let op = conv_bf16::ConvBf16 {
                    weight: packed.clone(),
                    stride: self.stride,
                    padding: self.padding,
                };
                let bias = self.bias.clone().map_or_else(zeros, Ok)?;
                return x.contiguous()?.apply_op2_no_bwd(&bias, &op);
            }
            Weight::Dense(w) => w,
        };
        let training = x.track_op() || weight.track_op();
        let cpu = x.device().is_cpu();
        if !training && cpu && x.dtype() == DType::F32 {
            let bias = self.bias.clone().map_or_else(zeros, Ok)?;
            let op = conv_gemm::ConvGemm {
                stride: self.stride,
                padding: self.padding,
            };
            return x.contiguous()?.apply_op3_no_bwd(weight, &bias, &op);
        }
        if training && cpu && x.dtype() == DType::F32 && weight.dtype() == DType::F32 {
            let bias = self.bias.clone().map_or_else(zeros, Ok)?;
            let op = ConvTrain {
                stride: self.stride,
                padding: self.padding,
                weight_grad: weight.track_op(),
                bf16: bf16_products(),
            };
            return x.contiguous()?.apply_op3(&weight.contiguous()?, &bias, op);
        }
        let y = if training && cpu && x.dtype() != DType::BF16 {
            conv2d_im2col(x, weight, self.stride, self.padding)?
        } else {
            x.conv2d(weight, self.padding, self.stride, 1, 1)?
        };
        match &self.bias {
            Some(b) => super::ops::add_bias(&y, b, 1),
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A frozen convolution under an input that takes gradients: the input's gradient equals
    /// the composed (candle-differentiated) convolution's, and the weight keeps none.
    #[test]
    fn a_frozen_convolution_passes_gradients_through_and_keeps_none() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (4, 3, 3, 3), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 4, &dev)?;
        let map = [("c.weight", &w), ("c.bias", &b)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let vb = candle_nn::VarBuilder::from_tensors(map, DType::F32, &dev);
        let layer = Conv2d::new(vb.pp("c"), 3, 4, 3, 2, 1)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 7, 6), &dev)?)?;
        let grads = layer.forward(x.as_tensor())?.sqr()?.sum_all()?.backward()?;
        assert!(grads.get(&w).is_none());
        let composed =
            super::super::ops::add_bias(&conv2d_im2col(x.as_tensor(), &w, 2, 1)?, &b, 1)?;
        let expect = composed.sqr()?.sum_all()?.backward()?;
        let (a, e) = (
            grads.get(x.as_tensor()).expect("dx"),
            expect.get(x.as_tensor()).expect("dx"),
        );
        let err = (a - e)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-3, "{err}");
        Ok(())
    }
}
