//! The weight update of each adapter kind a LoRA-family file may hold for one layer, in
//! LyCORIS's and ComfyUI's semantics (`comfy/weight_adapter/`): low-rank LoRA/LoCon (with
//! LoCon's Tucker `lora_mid`), LoHa's Hadamard product of two low-rank products (with its
//! Tucker form), LoKr's Kronecker product (full or factored, with a Tucker `lokr_t2`), and a
//! full `diff` (with `diff_b` for the bias). The file's α scales the update by α/rank, where
//! the kind has a rank (LoKr with both factors full has none: scale 1).

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
