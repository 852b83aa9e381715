//! The weight update of each adapter kind a LoRA-family file may hold for one layer, in
//! LyCORIS's and ComfyUI's semantics (`comfy/weight_adapter/`): low-rank LoRA/LoCon (with
//! LoCon's Tucker `lora_mid`), LoHa's Hadamard product of two low-rank products (with its
//! Tucker form), LoKr's Kronecker product (full or factored, with a Tucker `lokr_t2`), and a
//! full `diff` (with `diff_b` for the bias). The file's α scales the update by α/rank, where
//! the kind has a rank (LoKr with both factors full has none: scale 1). DoRA (Liu et al. 2024)
//! rescales any of them: [`Dora`].

use crate::error::{Error, Result};
use candle_core::Tensor;
use std::collections::BTreeMap;

/// One layer's adapter tensors, by kind.
#[derive(Debug, Clone)]
pub enum Adapter {
    LowRank {
        down: Tensor,
        up: Tensor,
        mid: Option<Tensor>,
    },
    Hadamard {
        w1a: Tensor,
        w1b: Tensor,
        w2a: Tensor,
        w2b: Tensor,
        t1: Option<Tensor>,
        t2: Option<Tensor>,
    },
    Kronecker {
        w1: Option<Tensor>,
        w1a: Option<Tensor>,
        w1b: Option<Tensor>,
        w2: Option<Tensor>,
        w2a: Option<Tensor>,
        w2b: Option<Tensor>,
        t2: Option<Tensor>,
    },
    Full {
        diff: Tensor,
        diff_b: Option<Tensor>,
    },
}

/// `einsum("i j k l, j r, i p -> p r k l", t, b, a)`: a Tucker core `t` `[R, R, k, l]` with its
/// factors `b` `[R, in]` and `a` `[R, out]`, as a convolution weight `[out, in, k, l]`.
fn tucker(t: &Tensor, b: &Tensor, a: &Tensor) -> Result<Tensor> {
    let (i, j, k, l) = t.dims4()?;
    let r = b.dim(1)?;
    let p = a.dim(1)?;
    // Σ_j t[i, j, k, l] b[j, r] → [i, k, l, r]
    let u = t
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .reshape((i * k * l, j))?
        .matmul(b)?
        .reshape((i, k * l * r))?;
    // Σ_i a[i, p] u[i, …] → [p, k, l, r] → [p, r, k, l]
    Ok(a.t()?
        .contiguous()?
        .matmul(&u)?
        .reshape((p, k, l, r))?
        .permute((0, 3, 1, 2))?
        .contiguous()?)
}

/// `torch.kron` of a 2-D `a` (broadcast over `b`'s kernel dims when `b` is 4-D) and `b`.
fn kron(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (ra, ca) = a.dims2()?;
    Ok(match b.rank() {
        2 => {
            let (rb, cb) = b.dims2()?;
            a.reshape((ra, 1, ca, 1))?
                .broadcast_mul(&b.reshape((1, rb, 1, cb))?)?
                .reshape((ra * rb, ca * cb))?
        }
        _ => {
            let (rb, cb, k, l) = b.dims4()?;
            a.reshape((ra, 1, ca, 1, 1))?
                .broadcast_mul(&b.reshape((1, rb, 1, cb, k * l))?)?
                .reshape((ra * rb, ca * cb, k, l))?
        }
    })
}

fn product(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.flatten_from(1)?.matmul(&b.flatten_from(1)?)?)
}

impl Adapter {
    /// Builds the adapter from a layer's tensors, named by their canonical suffixes
    /// (`lora_down.weight`, `hada_w1_a`, `lokr_w2_b`, `diff`, …); `None` if they make no
    /// known kind.
    pub fn from_parts(parts: &mut BTreeMap<&'static str, Tensor>) -> Option<Self> {
        let mut take = |k: &str| parts.remove(k);
        if let (Some(down), Some(up)) = (take("lora_down.weight"), take("lora_up.weight")) {
            return Some(Adapter::LowRank {
                down,
                up,
                mid: take("lora_mid.weight"),
            });
        }
        if let (Some(w1a), Some(w1b), Some(w2a), Some(w2b)) = (
            take("hada_w1_a"),
            take("hada_w1_b"),
            take("hada_w2_a"),
            take("hada_w2_b"),
        ) {
            return Some(Adapter::Hadamard {
                w1a,
                w1b,
                w2a,
                w2b,
                t1: take("hada_t1"),
                t2: take("hada_t2"),
            });
        }
        let kr = Adapter::Kronecker {
            w1: take("lokr_w1"),
            w1a: take("lokr_w1_a"),
            w1b: take("lokr_w1_b"),
            w2: take("lokr_w2"),
            w2a: take("lokr_w2_a"),
            w2b: take("lokr_w2_b"),
            t2: take("lokr_t2"),
        };
        if let Adapter::Kronecker {
            w1,
            w1a,
            w1b,
            w2,
            w2a,
            w2b,
            ..
        } = &kr
        {
            let one = w1.is_some() || (w1a.is_some() && w1b.is_some());
            let two = w2.is_some() || (w2a.is_some() && w2b.is_some());
            if one && two {
                return Some(kr);
            }
        }
        take("diff").map(|diff| Adapter::Full {
            diff,
            diff_b: take("diff_b"),
        })
    }

    /// The rank α is divided by (none for full updates and LoKr with both factors full).
    pub fn rank(&self) -> Option<usize> {
        match self {
            Adapter::LowRank { down, .. } => down.dims().first().copied(),
            Adapter::Hadamard { w1b, .. } => w1b.dims().first().copied(),
            Adapter::Kronecker { w1b, w2b, .. } => w2b
                .as_ref()
                .or(w1b.as_ref())
                .and_then(|t| t.dims().first().copied()),
            Adapter::Full { .. } => None,
        }
    }

    /// The unscaled update of a weight of shape `weight`.
    pub fn delta(&self, weight: &[usize]) -> Result<Tensor> {
        let d = match self {
            Adapter::LowRank { down, up, mid } => {
                let down = match mid {
                    // LoCon's Tucker form: the down projection through the k×k core.
                    Some(mid) => {
                        let (r, c_in) = (down.dim(0)?, down.flatten_from(1)?.dim(1)?);
                        let (_, _, k, l) = mid.dims4()?;
                        down.flatten_from(1)?
                            .t()?
                            .contiguous()?
                            .matmul(&mid.transpose(0, 1)?.contiguous()?.flatten_from(1)?)?
                            .reshape((c_in, r, k, l))?
                            .transpose(0, 1)?
                            .contiguous()?
                    }
                    None => down.clone(),
                };
                if up.dim(0)? != weight.first().copied().unwrap_or(0)
                    || up.flatten_from(1)?.dim(1)? != down.dim(0)?
                {
                    return Err(Error::Msg(format!(
                        "LoRA factors {:?} × {:?} do not make a weight of shape {weight:?}",
                        up.dims(),
                        down.dims()
                    )));
                }
                product(up, &down)?
            }
            Adapter::Hadamard {
                w1a,
                w1b,
                w2a,
                w2b,
                t1,
                t2,
            } => {
                let (m1, m2) = match (t1, t2) {
                    (Some(t1), Some(t2)) => (tucker(t1, w1b, w1a)?, tucker(t2, w2b, w2a)?),
                    _ => (product(w1a, w1b)?, product(w2a, w2b)?),
                };
                (m1.flatten_all()? * m2.flatten_all()?)?
            }
            Adapter::Kronecker {
                w1,
                w1a,
                w1b,
                w2,
                w2a,
                w2b,
                t2,
            } => {
                let w1 = match (w1, w1a, w1b) {
                    (Some(w), _, _) => w.clone(),
                    (None, Some(a), Some(b)) => product(a, b)?,
                    _ => return Err(Error::Msg("LoKr without its first factor".into())),
                };
                let w2 = match (w2, w2a, w2b, t2) {
                    (Some(w), _, _, _) => w.clone(),
                    (None, Some(a), Some(b), Some(t)) => tucker(t, b, a)?,
                    (None, Some(a), Some(b), None) => {
                        let p = product(a, b)?;
                        // A convolution's second factor comes flattened: its kernel is the
                        // weight's.
                        if weight.len() == 4 {
                            let rows = p.dim(0)?;
                            let per = weight[2] * weight[3];
                            p.reshape((rows, p.dim(1)? / per, weight[2], weight[3]))?
                        } else {
                            p
                        }
                    }
                    _ => return Err(Error::Msg("LoKr without its second factor".into())),
                };
                kron(&w1, &w2)?
            }
            Adapter::Full { diff, .. } => diff.clone(),
        };
        let elements: usize = weight.iter().product();
        if d.elem_count() != elements {
            return Err(Error::Msg(format!(
                "an update of {} values for a weight of shape {weight:?}",
                d.elem_count()
            )));
        }
        Ok(d.reshape(weight)?)
    }

    /// The bias update, where the kind carries one (`diff_b`).
    pub fn bias_delta(&self) -> Option<&Tensor> {
        match self {
            Adapter::Full { diff_b, .. } => diff_b.as_ref(),
            _ => None,
        }
    }
}

/// The axis a DoRA magnitude scales: one value per output row (PEFT; LyCORIS since 2025) or
/// per input channel (older LyCORIS and kohya files).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DoraAxis {
    Output,
    Input,
}

/// How a multiplier `s` other than 1 acts on a DoRA layer, as the tool each form comes from
/// does it (the two agree at 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DoraBlend {
    /// PEFT/diffusers (`lora_magnitude_vector`): `s` scales the update inside the
    /// decomposition, `W' = m·V/‖V‖` with `V = W + s·ΔW`.
    Inside,
    /// kohya/LyCORIS files in A1111 and ComfyUI (`dora_scale`): the decomposed weight is
    /// blended in, `W + s·(m·V/‖V‖ − W)` with `V = W + ΔW`.
    Blend,
}

/// DoRA's weight decomposition: the adapted weight `V = W + ΔW` is normalised along every axis
/// but the magnitude's and rescaled by the learnt magnitude `m`, `W' = m·V/(‖V‖ + ε)` — PEFT's
/// merge and LyCORIS's `apply_weight_decompose`. (ComfyUI divides by the norm of the original
/// `W` on the output axis, which its own open fix calls a bug; with a small update the two
/// differ little.)
#[derive(Debug, Clone)]
pub struct Dora {
    /// Shaped to broadcast against the weight: `[out, 1, …]` or `[1, in, …]`.
    magnitude: Tensor,
    pub axis: DoraAxis,
    pub blend: DoraBlend,
}

impl Dora {
    /// From a file's magnitude for a weight of shape `weight`: PEFT's `lora_magnitude_vector`
    /// (`peft`: `[out]`, or `[1, out, 1, 1]` for a convolution) or a kohya/LyCORIS
    /// `dora_scale` (`[out, 1, …]` on the output axis, `[1, in, …]` on the input axis; a 1-D
    /// one by its length, the output axis first).
    pub fn new(m: &Tensor, weight: &[usize], peft: bool) -> Result<Self> {
        let (out, inp) = match weight {
            [o, i, ..] => (*o, *i),
            _ => return Err(Error::Msg(format!("DoRA on a weight of shape {weight:?}"))),
        };
        let dims = m.dims();
        let ones_after = |k: usize| dims.iter().skip(k).all(|&d| d == 1);
        let axis = if peft {
            (m.elem_count() == out
                && (dims.len() == 1 || (dims.first() == Some(&1) && ones_after(2))))
            .then_some(DoraAxis::Output)
        } else if dims.len() == 1 {
            if dims[0] == out {
                Some(DoraAxis::Output)
            } else if dims[0] == inp {
                Some(DoraAxis::Input)
            } else {
                None
            }
        } else if dims[0] == out && ones_after(1) {
            Some(DoraAxis::Output)
        } else if dims[0] == 1 && dims.get(1) == Some(&inp) && ones_after(2) {
            Some(DoraAxis::Input)
        } else {
            None
        };
        let Some(axis) = axis else {
            return Err(Error::Msg(format!(
                "a DoRA magnitude of shape {dims:?} fits neither axis of a weight of shape {weight:?}"
            )));
        };
        let mut shape = vec![1; weight.len()];
        match axis {
            DoraAxis::Output => shape[0] = out,
            DoraAxis::Input => shape[1] = inp,
        }
        Ok(Self {
            magnitude: m.reshape(shape)?,
            axis,
            blend: if peft {
                DoraBlend::Inside
            } else {
                DoraBlend::Blend
            },
        })
    }

    /// `m·V/(‖V‖ + ε)`, the norm over every axis but the magnitude's.
    pub fn decompose(&self, v: &Tensor) -> Result<Tensor> {
        let norm = match self.axis {
            DoraAxis::Output => v.flatten_from(1)?.sqr()?.sum_keepdim(1)?.sqrt()?,
            DoraAxis::Input => v
                .transpose(0, 1)?
                .flatten_from(1)?
                .sqr()?
                .sum_keepdim(1)?
                .sqrt()?
                .transpose(0, 1)?,
        };
        let norm = (norm.reshape(self.magnitude.dims())? + f32::EPSILON as f64)?;
        Ok(v.broadcast_mul(&self.magnitude.broadcast_div(&norm)?)?)
    }

    /// The change this layer makes to the weight `w` as it stands, given its low-rank update
    /// `delta` (α/rank applied) at multiplier `s`.
    pub fn update(&self, w: &Tensor, delta: &Tensor, s: f64) -> Result<Tensor> {
        Ok(match self.blend {
            DoraBlend::Inside => (self.decompose(&(w + (delta * s)?)?)? - w)?,
            DoraBlend::Blend => ((self.decompose(&(w + delta)?)? - w)? * s)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn ones(shape: &[usize]) -> Tensor {
        Tensor::ones(shape, candle_core::DType::F32, &Device::Cpu).unwrap()
    }

    /// Each shape files use finds its axis; one that fits neither is refused.
    #[test]
    fn dora_magnitudes_find_their_axis() {
        // (magnitude's shape, weight's shape, PEFT's form, the axis or a refusal)
        type Case<'a> = (&'a [usize], &'a [usize], bool, Option<DoraAxis>);
        let cases: [Case; 10] = [
            (&[4], &[4, 3], true, Some(DoraAxis::Output)),
            (&[1, 4, 1, 1], &[4, 3, 3, 3], true, Some(DoraAxis::Output)),
            (&[3], &[4, 3], true, None),
            (&[4, 1], &[4, 3], false, Some(DoraAxis::Output)),
            (&[4, 1, 1, 1], &[4, 3, 3, 3], false, Some(DoraAxis::Output)),
            (&[1, 3], &[4, 3], false, Some(DoraAxis::Input)),
            (&[1, 3, 1, 1], &[4, 3, 3, 3], false, Some(DoraAxis::Input)),
            (&[3], &[4, 3], false, Some(DoraAxis::Input)),
            (&[4], &[4, 4], false, Some(DoraAxis::Output)),
            (&[2, 2], &[4, 3], false, None),
        ];
        for (m, w, peft, want) in cases {
            let got = Dora::new(&ones(m), w, peft).map(|d| d.axis);
            match want {
                Some(a) => assert_eq!(got.unwrap(), a, "{m:?} for {w:?}"),
                None => assert!(
                    got.unwrap_err().to_string().contains("fits neither axis"),
                    "{m:?} for {w:?}"
                ),
            }
        }
    }

    /// `W' = m·V/‖V‖` row by row (output axis) and column by column (input axis); PEFT's
    /// multiplier acts inside the decomposition, kohya's blends the result in.
    #[test]
    fn dora_decomposes_and_blends() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[3f32, 4.0], [0.0, 2.0]], &dev)?;
        let d = Tensor::new(&[[0f32, 0.0], [1.0, 0.0]], &dev)?;
        let m = Tensor::new(&[10f32, 1.0], &dev)?;
        // Rows of V = W + ΔW: [3, 4] (norm 5) and [1, 2] (norm √5).
        let out = Dora::new(&m.reshape((2, 1))?, &[2, 2], false)?;
        let merged = (out.update(&w, &d, 1.0)? + &w)?.to_vec2::<f32>()?;
        let r5 = 5f32.sqrt();
        let want = [[6.0, 8.0], [1.0 / r5, 2.0 / r5]];
        for (g, e) in merged.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - e).abs() < 1e-5, "{merged:?}");
        }
        // Columns of V: [3, 1] (norm √10) and [4, 2] (norm √20).
        let inp = Dora::new(&m.reshape((1, 2))?, &[2, 2], false)?;
        let merged = (inp.update(&w, &d, 1.0)? + &w)?.to_vec2::<f32>()?;
        let (r10, r20) = (10f32.sqrt(), 20f32.sqrt());
        let want = [[30.0 / r10, 4.0 / r20], [10.0 / r10, 2.0 / r20]];
        for (g, e) in merged.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - e).abs() < 1e-4, "{merged:?}");
        }
        // At ×0.5: kohya blends halfway to W'; PEFT decomposes W + ½ΔW.
        let blended = out.update(&w, &d, 0.5)?;
        let full = out.update(&w, &d, 1.0)?;
        let gap = (blended - (full * 0.5)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(gap < 1e-6);
        let peft = Dora::new(&m, &[2, 2], true)?;
        let inside = (peft.update(&w, &d, 0.5)? + &w)?;
        let direct = peft.decompose(&(&w + (&d * 0.5)?)?)?;
        let gap = (inside - direct)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(gap < 1e-6);
        Ok(())
    }
}
