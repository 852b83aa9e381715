//! LPIPS, the learned perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of
//! Deep Features as a Perceptual Metric"), VGG16 variant: the perceptual term of latent
//! diffusion's autoencoder loss. Images in `[-1, 1]` are shifted and scaled as the `lpips`
//! package does, passed through VGG16's five convolution slices (ReLU outputs `relu1_2` …
//! `relu5_3`), each feature map is normalised to unit length over channels, and the squared
//! differences are weighted per channel by a 1×1 head and averaged over space; the five terms
//! are summed.
//!
//! Weights are never downloaded: the user supplies one safetensors file holding the package's
//! state dict (`net.sliceK.N.weight/bias` — torchvision's `features.N` under the slice that
//! holds it — and `linK.model.1.weight`; `tools/export_lpips.py` writes it from the `lpips`
//! package). Widths are read from the file, so the reduced-width test weights load through the
//! same code. The network is frozen: gradients flow to the images only. Max pooling is composed
//! from a reshape and two maxima, whose backward is exact (candle's `max_pool2d` backward is
//! not).

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Module, VarBuilder};
use ldm_models::layers::{conv2d, Conv2d};
use ldm_models::weights::{Checkpoint, Weights};
use std::path::Path;

/// Indices of the convolutions in torchvision's `vgg16().features`, by LPIPS slice (each is
/// followed by a ReLU; slices 2–5 start with a 2×2 max pool).
const SLICES: [&[usize]; 5] = [
    &[0, 2],
    &[5, 7],
    &[10, 12, 14],
    &[17, 19, 21],
    &[24, 26, 28],
];

/// The `lpips` package's `ScalingLayer` constants.
const SHIFT: [f32; 3] = [-0.030, -0.088, -0.188];
const SCALE: [f32; 3] = [0.458, 0.448, 0.450];

/// The LPIPS network (VGG16 features and linear heads).
pub struct Lpips {
    slices: Vec<Vec<Conv2d>>,
    /// Per-channel weights of the five 1×1 heads, `[1, C, 1, 1]`.
    heads: Vec<Tensor>,
    shift: Tensor,
    scale: Tensor,
}

/// 2×2 max pooling with stride 2 (odd sizes floored, as PyTorch's `MaxPool2d(2, 2)`).
pub fn max_pool2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (h2, w2) = (h / 2, w / 2);
    let x = x.narrow(2, 0, 2 * h2)?.narrow(3, 0, 2 * w2)?;
    Ok(x.reshape((b, c, h2, 2, w2, 2))?.max(5)?.max(3)?)
}

impl Lpips {
    /// Builds the network with slice widths `widths` (VGG16's: 64, 128, 256, 512, 512) from
    /// `vb`, whose paths are the `lpips` package's state-dict keys.
    pub fn new(vb: VarBuilder, widths: [usize; 5]) -> Result<Self> {
        let mut slices = Vec::new();
        let mut channels = 3;
        for (k, (convs, &width)) in SLICES.iter().zip(&widths).enumerate() {
            let v = vb.pp(format!("net.slice{}", k + 1));
            let mut layers = Vec::new();
            for &index in convs.iter() {
                layers.push(conv2d(v.pp(index.to_string()), channels, width, 3, 1, 1)?);
                channels = width;
            }
            slices.push(layers);
        }
        let heads = widths
            .iter()
            .enumerate()
            .map(|(k, &w)| vb.get((1, w, 1, 1), &format!("lin{k}.model.1.weight")))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let device = vb.device();
        let constant = |name: &str, values: [f32; 3]| -> Result<Tensor> {
            if vb.contains_tensor(name) {
                Ok(vb.get((1, 3, 1, 1), name)?)
            } else {
                Ok(Tensor::new(&values, device)?.reshape((1, 3, 1, 1))?)
            }
        };
        Ok(Self {
            shift: constant("scaling_layer.shift", SHIFT)?,
            scale: constant("scaling_layer.scale", SCALE)?,
            slices,
            heads,
        })
    }

    /// Loads the network from a safetensors file in the `lpips` package's layout, strictly: a
    /// missing, misshapen or unexpected tensor is an error naming it.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let checkpoint = Checkpoint::open(&[path.to_path_buf()])?;
        let mut widths = [0usize; 5];
        for (k, w) in widths.iter_mut().enumerate() {
            let key = format!("net.slice{}.{}.weight", k + 1, SLICES[k][0]);
            *w = match checkpoint.tensors().get(&key).map(|e| e.shape.as_slice()) {
                Some([out, _, 3, 3]) => *out,
                Some(other) => {
                    return Err(Error::Msg(format!(
                        "{}: {key} has shape {other:?}, expected [C_out, C_in, 3, 3]",
                        path.display()
                    )))
                }
                None => {
                    return Err(Error::Msg(format!(
                        "{}: no {key}; expected the lpips package's VGG state dict \
                         (tools/export_lpips.py writes one)",
                        path.display()
                    )))
                }
            };
        }
        let weights = Weights::new(checkpoint);
        let net = Self::new(weights.var_builder(DType::F32, device), widths)?;
        crate::component::check_all_used(&weights, path)?;
        Ok(net)
    }

    /// The distance between each pair of images `[B, 3, H, W]` in `[-1, 1]`: `[B]`.
    pub fn forward(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let n = a.dim(0)?;
        if a.dims() != b.dims() {
            return Err(Error::Msg(format!(
                "LPIPS of images of different shapes {:?} and {:?}",
                a.dims(),
                b.dims()
            )));
        }
        let (h, w) = (a.dim(2)?, a.dim(3)?);
        if h < 16 || w < 16 {
            return Err(Error::Msg(format!(
                "LPIPS needs images of at least 16×16 (four 2×2 poolings), not {h}×{w}"
            )));
        }
        // Both images in one pass through the network.
        let x = Tensor::cat(&[a, b], 0)?;
        let mut h = x
            .broadcast_sub(&self.shift.to_dtype(x.dtype())?)?
            .broadcast_div(&self.scale.to_dtype(x.dtype())?)?;
        let mut total: Option<Tensor> = None;
        for (k, (convs, head)) in self.slices.iter().zip(&self.heads).enumerate() {
            if k > 0 {
                h = max_pool2(&h)?;
            }
            for conv in convs {
                h = conv.forward(&h)?.relu()?;
            }
            let unit = unit_over_channels(&h)?;
            let diff = (unit.narrow(0, 0, n)? - unit.narrow(0, n, n)?)?.sqr()?;
            let term = diff
                .broadcast_mul(&head.to_dtype(diff.dtype())?)?
                .sum(1)?
                .flatten_from(1)?
                .mean(D::Minus1)?;
            total = Some(match total {
                Some(t) => (t + term)?,
                None => term,
            });
        }
        total.ok_or_else(|| Error::Msg("LPIPS without layers".into()))
    }
}

/// `f / (‖f‖ + 1e-10)` over the channel axis, as `lpips.normalize_tensor`. The norm is taken
/// of the squared sum plus 1e-20 so that a pixel whose features are all zero (every ReLU off)
/// has a finite gradient; the values move by at most 1e-10.
fn unit_over_channels(f: &Tensor) -> Result<Tensor> {
    let norm = (f.sqr()?.sum_keepdim(1)? + 1e-20)?.sqrt()?;
    Ok(f.broadcast_div(&(norm + 1e-10)?)?)
}
