//! 2-D convolution. Inference on the CPU in f32 uses [`super::conv_gemm`] (banded patches +
//! GEMM), with bf16 weights [`super::conv_bf16`], elsewhere candle's kernel; when a gradient is
//! needed on the CPU the convolution is computed as im2col followed by a matrix product
//! (Chellapilla et al. 2006), so that both backward products (input and weight gradients) run
//! through the optimised GEMM instead of candle's direct-loop `conv_transpose2d`. [`Im2Col`] is a
//! CustomOp whose backward is its adjoint, col2im, and vice versa; both are checked against
//! finite differences.

use super::conv_bf16::PackedConv;
use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType,
};
use candle_nn::{Module, VarBuilder};
use rayon::prelude::*;
use std::sync::Arc;

/// Geometry of a square-kernel convolution over `[B, C, H, W]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Geometry {
    fn out_hw(&self) -> (usize, usize) {
        let o = |n: usize| (n + 2 * self.padding - self.kernel) / self.stride + 1;
        (o(self.height), o(self.width))
    }
    /// Columns per output pixel: `C · k · k`, ordered (channel, kernel row, kernel column) as
    /// a contiguous `[C_out, C, k, k]` weight is.
    fn cols(&self) -> usize {
        self.channels * self.kernel * self.kernel
    }
    /// Calls `f(input_index, column_index)` for every in-bounds tap of image `b`'s patches;
    /// indices are relative to the image.
    fn for_each_tap(&self, mut f: impl FnMut(usize, usize)) {
        let (ho, wo) = self.out_hw();
        let (k, s, p) = (self.kernel, self.stride, self.padding as isize);
        let cols = self.cols();
        for oy in 0..ho {
            for ox in 0..wo {
                let row = (oy * wo + ox) * cols;
                for c in 0..self.channels {
                    for ki in 0..k {
                        let iy = (oy * s + ki) as isize - p;
                        if iy < 0 || iy >= self.height as isize {
                            continue;
                        }
                        for kj in 0..k {
                            let ix = (ox * s + kj) as isize - p;
                            if ix < 0 || ix >= self.width as isize {
                                continue;
                            }
                            let input = (c * self.height + iy as usize) * self.width + ix as usize;
                            f(input, row + (c * k + ki) * k + kj);
                        }
                    }
                }
            }
        }
    }
}

/// `[B, C, H, W]` → `[B, H_out·W_out, C·k·k]` patches.
#[derive(Debug, Clone, Copy)]
struct Im2Col(Geometry);

/// The adjoint of [`Im2Col`]: `[B, H_out·W_out, C·k·k]` → `[B, C, H, W]`, summing overlaps.
#[derive(Debug, Clone, Copy)]
struct Col2Im(Geometry);

fn im2col<T: WithDType>(src: &[T], g: &Geometry) -> Vec<T> {
    let (ho, wo) = g.out_hw();
    let per_in = g.channels * g.height * g.width;
    let per_out = ho * wo * g.cols();
    let mut out = vec![T::zero(); g.batch * per_out];
    out.par_chunks_mut(per_out)
        .zip(src.par_chunks(per_in))
        .for_each(|(dst, img)| g.for_each_tap(|i, o| dst[o] = img[i]));
    out
}

fn col2im<T: WithDType>(src: &[T], g: &Geometry) -> Vec<T> {
    let (ho, wo) = g.out_hw();
    let per_in = g.channels * g.height * g.width;
    let per_out = ho * wo * g.cols();
    let mut out = vec![T::zero(); g.batch * per_in];
    out.par_chunks_mut(per_in)
        .zip(src.par_chunks(per_out))
        .for_each(|(img, cols)| g.for_each_tap(|i, o| img[i] += cols[o]));
    out
}

macro_rules! dispatch {
    ($storage:expr, $layout:expr, $f:ident, $g:expr) => {
        match $storage {
            CpuStorage::F32(s) => {
                CpuStorage::F32($f(super::cpu::contiguous(s, $layout, "im2col/col2im")?, $g))
            }
            CpuStorage::F64(s) => {
                CpuStorage::F64($f(super::cpu::contiguous(s, $layout, "im2col/col2im")?, $g))
            }
            CpuStorage::F16(s) => {
                CpuStorage::F16($f(super::cpu::contiguous(s, $layout, "im2col/col2im")?, $g))
            }
            CpuStorage::BF16(s) => {
                CpuStorage::BF16($f(super::cpu::contiguous(s, $layout, "im2col/col2im")?, $g))
            }
            s => candle_core::bail!("im2col: unsupported dtype {:?}", s.dtype()),
        }
    };
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }
    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let (ho, wo) = g.out_hw();
        Ok((
            dispatch!(storage, layout, im2col, g),
            Shape::from((g.batch, ho * wo, g.cols())),
        ))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Col2Im(self.0))?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }
    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        Ok((
            dispatch!(storage, layout, col2im, g),
            Shape::from((g.batch, g.channels, g.height, g.width)),
        ))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Im2Col(self.0))?))
    }
}

/// Convolution of `x` `[B, C, H, W]` with `weight` `[C_out, C, k, k]` as im2col + GEMM; exact
/// gradients for both through [`Im2Col`]'s adjoint and the matrix product's backward.
pub fn conv2d_im2col(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (batch, channels, height, width) = x.dims4()?;
    let (c_out, c_in, kernel, kernel_w) = weight.dims4()?;
    if c_in != channels || kernel != kernel_w {
        candle_core::bail!(
            "conv2d: weight {:?} does not fit input {:?}",
            weight.shape(),
            x.shape()
        )
    }
    let g = Geometry {
        batch,
        channels,
        height,
        width,
        kernel,
        stride,
        padding,
    };
    let (ho, wo) = g.out_hw();
    let cols = x.contiguous()?.apply_op1(Im2Col(g))?; // [B, Ho·Wo, C·k·k]
    let w = weight.reshape((c_out, g.cols()))?;
    cols.reshape((batch * ho * wo, g.cols()))?
        .matmul(&w.t()?)? // [B·Ho·Wo, C_out]
        .reshape((batch, ho, wo, c_out))?
        .permute((0, 3, 1, 2))
}

#[derive(Debug, Clone)]
enum Weight {
    /// `[C_out, C, k, k]`.
    Dense(Tensor),
    /// bf16 on the CPU, reordered once for [`super::conv_bf16`].
    Bf16(Arc<PackedConv>),
}

/// A convolution layer with bias (`torch.nn.Conv2d` with a square kernel).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Weight,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
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
        let init = super::linear::torch_default_init(in_channels * kernel * kernel);
        let weight =
            vb.get_with_hints((out_channels, in_channels, kernel, kernel), "weight", init)?;
        let bias = Some(super::compute_param(vb.get_with_hints(
            out_channels,
            "bias",
            init,
        )?)?);
        let cpu_bf16 = weight.dtype() == DType::BF16 && weight.device().is_cpu();
        let weight = if cpu_bf16 && super::bf16_gemm::available() {
            let bits = super::bf16_gemm::tensor_bits(&weight)?;
            let packed = PackedConv::from_bf16(&bits, out_channels, in_channels, kernel);
            Weight::Bf16(Arc::new(packed))
        } else if cpu_bf16 {
            // Without the bf16 kernel, bf16 weights on the CPU compute in f32.
            Weight::Dense(weight.to_dtype(DType::F32)?)
        } else {
            Weight::Dense(weight)
        };
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
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
        let dims = self.dims()?;
        count_flops(x, dims, self.stride, self.padding);
        let c_out = dims.0;
        let zeros = || Tensor::zeros(c_out, DType::F32, x.device());
        let weight = match &self.weight {
            Weight::Bf16(packed) => {
                let op = super::conv_bf16::ConvBf16 {
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
            let op = super::conv_gemm::ConvGemm {
                stride: self.stride,
                padding: self.padding,
            };
            return x.contiguous()?.apply_op3_no_bwd(weight, &bias, &op);
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
    use candle_core::Device;

    #[test]
    fn im2col_matches_candle_conv() -> Result<()> {
        let dev = Device::Cpu;
        for (k, s, p, h, w) in [
            (3, 1, 1, 7, 6),
            (3, 2, 1, 8, 8),
            (3, 2, 0, 9, 9),
            (1, 1, 0, 5, 4),
        ] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (4, 3, k, k), &dev)?;
            let ours = conv2d_im2col(&x, &wt, s, p)?;
            let theirs = x.conv2d(&wt, p, s, 1, 1)?;
            let diff = (ours - theirs)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-4, "k{k} s{s} p{p}: {diff}");
        }
        Ok(())
    }
}
