//! The training convolution on the CPU: im2col followed by a matrix product (Chellapilla et
//! al. 2006), so that both backward products (input and weight gradients) run through the
//! optimised GEMM instead of candle's direct-loop `conv_transpose2d`. In f32 that is one op,
//! [`ConvTrain`], with its own backward (its three products in bf16 when
//! [`super::set_bf16_products`] is on); other dtypes (the f64 gradient checks) compose
//! [`Im2Col`] — a CustomOp whose backward is its adjoint, col2im, and vice versa — with candle's
//! matrix product ([`conv2d_im2col`]). Both forms are checked against finite differences or each
//! other.

use super::cpu::{contiguous_f32, gemm, Operand};
use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor,
    WithDType,
};
use rayon::prelude::*;

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
    /// The geometry of convolving an input of shape `x` with a weight of shape `w`, and the
    /// output channels.
    fn new(x: &Shape, w: &Shape, stride: usize, padding: usize) -> Result<(Self, usize)> {
        let (batch, channels, height, width) = x.dims4()?;
        let (c_out, c_in, kernel, kernel_w) = w.dims4()?;
        if c_in != channels || kernel != kernel_w {
            candle_core::bail!("conv2d: weight {w:?} does not fit input {x:?}")
        }
        let g = Self {
            batch,
            channels,
            height,
            width,
            kernel,
            stride,
            padding,
        };
        Ok((g, c_out))
    }
    fn out_hw(&self) -> (usize, usize) {
        let o = |n: usize| (n + 2 * self.padding - self.kernel) / self.stride + 1;
        (o(self.height), o(self.width))
    }
    /// Columns per output pixel: `k · k · C`, ordered (kernel row, kernel column, channel) so
    /// that each tap copies `C` consecutive values of a channels-last image; the weight is
    /// permuted to `[C_out, k, k, C]` to match.
    fn cols(&self) -> usize {
        self.channels * self.kernel * self.kernel
    }
    /// Calls `f(Some(pixel), column)` for every tap of an image's patches, in column order:
    /// `pixel` indexes the channels-last image (`y · W + x`) and `column` the first of the tap's
    /// `C` columns, relative to the image's patches; taps in the padding get `None`.
    fn for_each_tap(&self, mut f: impl FnMut(Option<usize>, usize)) {
        let (ho, wo) = self.out_hw();
        let (k, s, p) = (self.kernel, self.stride, self.padding as isize);
        let c = self.channels;
        for oy in 0..ho {
            for ox in 0..wo {
                let row = (oy * wo + ox) * self.cols();
                for ki in 0..k {
                    let iy = (oy * s + ki) as isize - p;
                    for kj in 0..k {
                        let ix = (ox * s + kj) as isize - p;
                        let inside = (0..self.height as isize).contains(&iy)
                            && (0..self.width as isize).contains(&ix);
                        let px = inside.then(|| iy as usize * self.width + ix as usize);
                        f(px, row + (ki * k + kj) * c);
                    }
                }
            }
        }
    }
}

/// `[rows, cols]` → `[cols, rows]` (channels-first ↔ channels-last): whole 8 × 8 blocks through
/// fixed-size arrays (which the compiler turns into register shuffles), the ragged edges one
/// element at a time.
fn transpose<T: WithDType>(src: &[T], rows: usize, cols: usize, dst: &mut [T]) {
    const B: usize = 8;
    let (rb, cb) = (rows / B * B, cols / B * B);
    for r0 in (0..rb).step_by(B) {
        for c0 in (0..cb).step_by(B) {
            let mut block = [[T::zero(); B]; B];
            for (i, row) in block.iter_mut().enumerate() {
                row.copy_from_slice(&src[(r0 + i) * cols + c0..][..B]);
            }
            for j in 0..B {
                let out: [T; B] = std::array::from_fn(|i| block[i][j]);
                dst[(c0 + j) * rows + r0..][..B].copy_from_slice(&out);
            }
        }
    }
    for r in 0..rows {
        let from = if r < rb { cb } else { 0 };
        for c in from..cols {
            dst[c * rows + r] = src[r * cols + c];
        }
    }
}

/// `[B, C, H, W]` → `[B, H_out·W_out, k·k·C]` patches.
#[derive(Debug, Clone, Copy)]
struct Im2Col(Geometry);

/// The adjoint of [`Im2Col`]: `[B, H_out·W_out, k·k·C]` → `[B, C, H, W]`, summing overlaps.
#[derive(Debug, Clone, Copy)]
struct Col2Im(Geometry);

fn im2col<T: WithDType>(src: &[T], g: &Geometry) -> Vec<T> {
    let (ho, wo) = g.out_hw();
    let (c, hw) = (g.channels, g.height * g.width);
    let per_out = ho * wo * g.cols();
    let len = g.batch * per_out;
    // Every element is written exactly once below (zero-filling them first was a second pass
    // over the largest buffer of the step).
    let mut out: Vec<T> = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(per_out)
        .zip(src.par_chunks(c * hw))
        .for_each(|(dst, img)| {
            let mut hwc = vec![T::zero(); c * hw];
            transpose(img, c, hw, &mut hwc);
            g.for_each_tap(|px, col| {
                let dst = &mut dst[col..col + c];
                match px {
                    Some(px) => {
                        dst.write_copy_of_slice(&hwc[px * c..(px + 1) * c]);
                    }
                    None => dst.fill(std::mem::MaybeUninit::new(T::zero())),
                }
            })
        });
    // SAFETY: the taps of every output pixel cover each image's `per_out` columns exactly
    // once, and the images cover the `len` elements, so all of them were written above.
    unsafe { out.set_len(len) };
    out
}

fn col2im<T: WithDType>(src: &[T], g: &Geometry) -> Vec<T> {
    let (ho, wo) = g.out_hw();
    let (c, hw) = (g.channels, g.height * g.width);
    let per_out = ho * wo * g.cols();
    let mut out = vec![T::zero(); g.batch * c * hw];
    out.par_chunks_mut(c * hw)
        .zip(src.par_chunks(per_out))
        .for_each(|(img, cols)| {
            let mut hwc = vec![T::zero(); c * hw];
            g.for_each_tap(|px, col| {
                let Some(px) = px else { return };
                let acc = &mut hwc[px * c..(px + 1) * c];
                for (a, &v) in acc.iter_mut().zip(&cols[col..col + c]) {
                    *a += v;
                }
            });
            transpose(&hwc, hw, c, img);
        });
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
    let (g, c_out) = Geometry::new(x.shape(), weight.shape(), stride, padding)?;
    let (ho, wo) = g.out_hw();
    let cols = x.contiguous()?.apply_op1(Im2Col(g))?; // [B, Ho·Wo, k·k·C]
    let w = weight.permute((0, 2, 3, 1))?.reshape((c_out, g.cols()))?;
    cols.reshape((g.batch * ho * wo, g.cols()))?
        .matmul(&w.t()?)? // [B·Ho·Wo, C_out]
        .reshape((g.batch, ho, wo, c_out))?
        .permute((0, 3, 1, 2))
}

/// Each consecutive `[rows, cols]` block of `src` transposed: with `(C, k·k)` a weight
/// `[C_out, C, k, k]` becomes `[C_out, k·k·C]`, the column order of [`im2col`], and with
/// `(k·k, C)` back.
fn transpose_blocks(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; src.len()];
    for (dst, block) in out.chunks_mut(rows * cols).zip(src.chunks(rows * cols)) {
        transpose(block, rows, cols, dst);
    }
    out
}

/// The training convolution on the CPU in f32 as one op: `x` `[B, C, H, W]`, weight
/// `[C_out, C, k, k]`, bias `[C_out]` → `[B, C_out, H_out, W_out]`. The same im2col + GEMM as
/// [`conv2d_im2col`], but the whole batch's product is copied out channels-first with the bias
/// added, and the backward recomputes the patches instead of keeping them in the graph: one node
/// where the
/// composed form has six (patches, two reshapes, the product, the permute and the bias), so the
/// backward pass allocates, adds and copies less.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvTrain {
    pub(crate) stride: usize,
    pub(crate) padding: usize,
    /// Whether the weight takes a gradient; a frozen one's (a teacher's weights under LoRA
    /// factors) is neither computed nor kept.
    pub(crate) weight_grad: bool,
    /// Products with bf16 operands and f32 sums ([`super::set_bf16_products`]).
    pub(crate) bf16: bool,
}

impl ConvTrain {
    fn geometry(&self, xl: &Layout, wl: &Layout) -> Result<(Geometry, usize)> {
        Geometry::new(xl.shape(), wl.shape(), self.stride, self.padding)
    }

    /// The product in this op's precision (the arguments of [`gemm`]).
    fn gemm(
        &self,
        mnk: (usize, usize, usize),
        dst: &mut [f32],
        dst_rs: usize,
        lhs: Operand,
        rhs: Operand,
    ) {
        if self.bf16 {
            super::bf16_gemm::gemm_f32(mnk, dst, dst_rs, false, lhs, rhs, true)
        } else {
            gemm(mnk, dst, dst_rs, false, lhs, rhs, true)
        }
    }
}

/// The backward of [`ConvTrain`]: inputs `x`, weight, `dy`; output `[dx | dW | db]` flat.
#[derive(Debug, Clone, Copy)]
struct ConvTrainBackward(ConvTrain);

impl CustomOp3 for ConvTrain {
    fn name(&self) -> &'static str {
        "conv2d-train"
    }
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, c_out) = self.geometry(xl, wl)?;
        let x = contiguous_f32(xs, xl, "conv2d-train", "input")?;
        let w = contiguous_f32(ws, wl, "conv2d-train", "weight")?;
        let bias = contiguous_f32(bs, bl, "conv2d-train", "bias")?;
        if bias.len() != c_out {
            candle_core::bail!("conv2d: bias {:?} for {c_out} channels", bl.shape())
        }
        let (ho, wo) = g.out_hw();
        let (p, kkc) = (ho * wo, g.cols());
        let wc = transpose_blocks(w, g.channels, g.kernel * g.kernel);
        let cols = im2col(x, &g);
        // One product for the whole batch, yᵀ = W · patchesᵀ: `[C_out, B·P]` (a product per
        // image has only P columns — 16 at a 4 × 4 level, where the batch's product is 1.2×
        // faster), then each image's planes copied out channels-first with the bias added.
        let n = g.batch * p;
        let mut y = vec![0f32; g.batch * c_out * p];
        if self.bf16 {
            // y' = patches · Wᵀ, `[B·P, C_out]`: the large operand's rows are its own (pairing
            // them is a streaming pass; packing a transposed one is a gather), then each
            // image's `[P, C_out]` transposed channels-first with the bias added.
            let mut yr = vec![0f32; n * c_out];
            let (patches, wt) = (Operand::rows(&cols, kkc), Operand::transposed(&wc, kkc));
            super::bf16_gemm::gemm_f32((n, c_out, kkc), &mut yr, c_out, false, patches, wt, true);
            drop(cols);
            y.par_chunks_mut(c_out * p)
                .zip(yr.par_chunks(p * c_out))
                .for_each(|(dst, src)| {
                    transpose(src, p, c_out, dst);
                    for (plane, &bias) in dst.chunks_mut(p).zip(bias) {
                        plane.iter_mut().for_each(|v| *v += bias);
                    }
                });
            return Ok((CpuStorage::F32(y), Shape::from((g.batch, c_out, ho, wo))));
        }
        let mut yt = vec![0f32; c_out * n];
        self.gemm(
            (c_out, n, kkc),
            &mut yt,
            n,
            Operand::rows(&wc, kkc),
            Operand::transposed(&cols, kkc),
        );
        drop(cols);
        for (b, dst) in y.chunks_mut(c_out * p).enumerate() {
            for ((plane, src), &bias) in dst.chunks_mut(p).zip(yt.chunks(n)).zip(bias) {
                for (o, &v) in plane.iter_mut().zip(&src[b * p..(b + 1) * p]) {
                    *o = v + bias;
                }
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((g.batch, c_out, ho, wo))))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let flat = x.apply_op3_no_bwd(w, &grad.contiguous()?, &ConvTrainBackward(*self))?;
        let (dx, dw, db) = super::split_gradients(&flat, x.shape(), w.shape(), w.dim(0)?)?;
        // A frozen weight and bias get no gradient (candle would keep one for each).
        Ok((dx, dw.filter(|_| w.track_op()), db.filter(|_| b.track_op())))
    }
}

impl CustomOp3 for ConvTrainBackward {
    fn name(&self) -> &'static str {
        "conv2d-train-backward"
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
        let (g, c_out) = self.0.geometry(xl, wl)?;
        let x = contiguous_f32(xs, xl, "conv2d-train-backward", "input")?;
        let w = contiguous_f32(ws, wl, "conv2d-train-backward", "weight")?;
        let dy = contiguous_f32(gs, gl, "conv2d-train-backward", "gradient")?;
        let (ho, wo) = g.out_hw();
        let (p, kkc) = (ho * wo, g.cols());
        let rows = g.batch * p;
        if dy.len() != rows * c_out {
            candle_core::bail!("conv2d-train-backward: gradient {:?}", gl.shape())
        }
        // dy as one `[C_out, B·P]` matrix, so that each product below is one GEMM over the
        // batch: d(patches) = dyᵀ · W, then dx = col2im(d(patches)); dW = dy · patches.
        let mut dyt = vec![0f32; c_out * rows];
        for (b, img) in dy.chunks(c_out * p).enumerate() {
            for (plane, dst) in img.chunks(p).zip(dyt.chunks_mut(rows)) {
                dst[b * p..(b + 1) * p].copy_from_slice(plane);
            }
        }
        let db: Vec<f32> = dyt.chunks(rows).map(|r| r.iter().sum::<f32>()).collect();
        let wc = transpose_blocks(w, g.channels, g.kernel * g.kernel);
        let mut dcols = vec![0f32; rows * kkc];
        if self.0.bf16 {
            // dy as `[B·P, C_out]` rows (pairing a transposed operand strides through memory).
            let mut dyr = vec![0f32; rows * c_out];
            dyr.par_chunks_mut(p * c_out)
                .zip(dy.par_chunks(c_out * p))
                .for_each(|(dst, img)| transpose(img, c_out, p, dst));
            let (dy_rows, w_rows) = (Operand::rows(&dyr, c_out), Operand::rows(&wc, kkc));
            super::bf16_gemm::gemm_f32(
                (rows, kkc, c_out),
                &mut dcols,
                kkc,
                false,
                dy_rows,
                w_rows,
                true,
            );
        } else {
            self.0.gemm(
                (rows, kkc, c_out),
                &mut dcols,
                kkc,
                Operand::transposed(&dyt, rows),
                Operand::rows(&wc, kkc),
            );
        }
        let dx = col2im(&dcols, &g);
        drop(dcols);
        let mut out = dx;
        if self.0.weight_grad {
            let cols = im2col(x, &g);
            let mut dwc = vec![0f32; c_out * kkc];
            self.0.gemm(
                (c_out, kkc, rows),
                &mut dwc,
                kkc,
                Operand::rows(&dyt, rows),
                Operand::rows(&cols, kkc),
            );
            out.extend(transpose_blocks(&dwc, g.kernel * g.kernel, g.channels));
        } else {
            out.resize(out.len() + c_out * kkc, 0.0);
        }
        out.extend_from_slice(&db);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// The fused training op gives the composed im2col path's output and gradients (input,
    /// weight, bias), with and without padding, at stride 1 and 2.
    /// (kernel, stride, padding, height, width) of the tests.
    const GEOMETRIES: [(usize, usize, usize, usize, usize); 4] = [
        (3, 1, 1, 7, 6),
        (3, 2, 1, 8, 8),
        (3, 2, 0, 9, 9),
        (1, 1, 0, 5, 4),
    ];

    /// Also with bf16 products: on inputs and output gradient that are bf16 values already,
    /// rounding changes nothing, so the op must give the f32 composition's numbers (f32 sums).
    #[test]
    fn fused_training_conv_matches_the_composed_one() -> Result<()> {
        let dev = Device::Cpu;
        let bf16_values = |shape: &[usize]| -> Result<Tensor> {
            Tensor::randn(0f32, 1.0, shape, &dev)?
                .to_dtype(DType::BF16)?
                .to_dtype(DType::F32)
        };
        for ((k, s, p, h, w), bf16) in GEOMETRIES.into_iter().flat_map(|g| [(g, false), (g, true)])
        {
            let x = Var::from_tensor(&bf16_values(&[2, 3, h, w])?)?;
            let wt = Var::from_tensor(&bf16_values(&[4, 3, k, k])?)?;
            let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, 4, &dev)?)?;
            let fused = x.as_tensor().apply_op3(
                wt.as_tensor(),
                b.as_tensor(),
                ConvTrain {
                    stride: s,
                    padding: p,
                    weight_grad: true,
                    bf16,
                },
            )?;
            let composed = crate::layers::ops::add_bias(
                &conv2d_im2col(x.as_tensor(), wt.as_tensor(), s, p)?,
                b.as_tensor(),
                1,
            )?;
            let r = bf16_values(fused.dims())?;
            let ga = (&fused * &r)?.sum_all()?.backward()?;
            let gb = (&composed * &r)?.sum_all()?.backward()?;
            let maxdiff = |a: &Tensor, b: &Tensor| -> Result<f32> {
                (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
            };
            let case = format!("k{k} s{s} p{p} bf16 {bf16}");
            assert!(maxdiff(&fused, &composed)? < 1e-4, "{case}: output");
            for (name, v) in [("x", &x), ("w", &wt), ("b", &b)] {
                let (a, c) = (ga.get(v).expect("grad"), gb.get(v).expect("grad"));
                assert!(maxdiff(a, c)? < 1e-4, "{case}: d{name}");
            }
        }
        Ok(())
    }

    #[test]
    fn im2col_matches_candle_conv() -> Result<()> {
        let dev = Device::Cpu;
        for (k, s, p, h, w) in GEOMETRIES {
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
