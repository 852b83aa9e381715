//! Multi-head scaled dot-product attention ("Attention Is All You Need", eq. 1) and diffusers'
//! `Attention` module (self- or cross-attention with `to_q`, `to_k`, `to_v`, `to_out.0`).

use crate::layers::linear::{linear, Linear};
use candle_core::{DType, Result, Tensor};
use candle_nn::{Module, VarBuilder};
use std::cell::RefCell;

/// Bytes of f32 attention scores computed at once by the composed path (GPUs, masks, f64):
/// beyond it attention runs head by head, and a head's query rows in chunks (sliced attention),
/// so large images need memory linear, not quadratic, in their size.
pub const ATTENTION_CHUNK_BYTES: usize = 256 << 20;

/// `softmax(q kᵀ · scale + mask) v` over `[B, H, L, d]` tensors. Scores and softmax run in f32
/// whatever the input dtype (what diffusers' `upcast_attention`/`upcast_softmax` ask for). Rows
/// of `q` are independent, so chunking them changes only the peak memory (and the matmul's
/// rounding, by an ulp). On the CPU without a mask the fused block-wise kernel
/// ([`crate::kernels::fused_attention`]) runs instead of the composed ops: for inference, and in f32 with
/// its backward for training.
pub fn scaled_dot_product(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    attention_with(q, k, v, scale, mask, false)
}

/// [`scaled_dot_product`]; `bf16`: the fused CPU kernel multiplies bf16 operands (for models
/// whose weights are bf16, see [`super::compute_dtype`]).
fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    bf16: bool,
) -> Result<Tensor> {
    let tracked = q.track_op() || k.track_op() || v.track_op();
    if mask.is_none() && !tracked && q.device().is_cpu() && v.dtype() != DType::F64 {
        // Block-wise fused kernel: never more than a block of scores, so no slicing needed.
        let dtype = v.dtype();
        let f32 = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
        let op = crate::kernels::fused_attention::FusedAttention {
            scale: scale as f32,
            bf16,
        };
        let (b, h, lq, d) = q.dims4()?;
        let lk = k.dim(2)?;
        crate::flops::add(
            crate::flops::matmul(b * h * lq, d, lk)
                + crate::flops::matmul(b * h * lq, lk, v.dim(3)?),
        );
        return f32(q)?
            .apply_op3_no_bwd(&f32(k)?, &f32(v)?, &op)?
            .to_dtype(dtype);
    }
    let f32_cpu = [q, k, v]
        .iter()
        .all(|t| t.dtype() == DType::F32 && t.device().is_cpu());
    if mask.is_none() && tracked && f32_cpu {
        // Training: the block-wise kernel with its own backward (scores never stored).
        let (b, h, lq, d) = q.dims4()?;
        let lk = k.dim(2)?;
        crate::flops::add(
            crate::flops::matmul(b * h * lq, d, lk)
                + crate::flops::matmul(b * h * lq, lk, v.dim(3)?),
        );
        let op = crate::kernels::fused_attention::FusedAttentionTrain {
            scale: scale as f32,
        };
        return q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    sliced(q, k, v, scale, mask, ATTENTION_CHUNK_BYTES)
}

fn sliced(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    chunk_bytes: usize,
) -> Result<Tensor> {
    let (b, h, lq, _) = q.dims4()?;
    let lk = k.dim(2)?;
    if mask.is_some() || b * h * lq * lk * 4 <= chunk_bytes {
        return attention_block(q, k, v, scale, mask);
    }
    // Too large at once: one head at a time (no score matrix of every head ever exists), each
    // in chunks of query rows if even one head's scores exceed the budget.
    let rows = (chunk_bytes / (lk * 4).max(1)).max(1);
    let mut heads = Vec::with_capacity(b * h);
    for bi in 0..b {
        for hi in 0..h {
            let one = |t: &Tensor| t.narrow(0, bi, 1)?.narrow(1, hi, 1);
            let (qh, kh, vh) = (one(q)?, one(k)?, one(v)?);
            let mut outs = Vec::with_capacity(lq.div_ceil(rows));
            let mut start = 0;
            while start < lq {
                let n = rows.min(lq - start);
                outs.push(attention_block(
                    &qh.narrow(2, start, n)?,
                    &kh,
                    &vh,
                    scale,
                    None,
                )?);
                start += n;
            }
            heads.push(Tensor::cat(&outs, 2)?);
        }
    }
    let dv = v.dim(3)?;
    Tensor::cat(&heads, 1)?.reshape((b, h, lq, dv))
}

fn attention_block(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    Ok(attention_block_with_probs(q, k, v, scale, mask)?.0)
}

/// [`attention_block`] and its probabilities, `[B, H, Lq, Lk]` in the values' dtype.
fn attention_block_with_probs(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let dtype = v.dtype();
    let (b, h, lq, d) = q.dims4()?;
    let (lk, dv) = (k.dim(2)?, v.dim(3)?);
    crate::flops::add(
        crate::flops::matmul(b * h * lq, d, lk) + crate::flops::matmul(b * h * lq, lk, dv),
    );
    // Half precisions are upcast; f32 and f64 keep their own precision.
    let work = match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let q = q.to_dtype(work)?.contiguous()?;
    let k = k.to_dtype(work)?.contiguous()?;
    let scores = (q.matmul(&k.t()?)? * scale)?; // [B, H, Lq, Lk]
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(scores.dtype())?)?,
        None => scores,
    };
    let probs = super::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    Ok((probs.matmul(&v.contiguous()?)?, probs))
}

/// `[B, L, H·d]` → `[B, H, L, d]`.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, c) = x.dims3()?;
    x.reshape((b, l, heads, c / heads))?.transpose(1, 2)
}

/// `[B, H, L, d]` → `[B, L, H·d]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, l, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, l, h * d))
}

/// diffusers' `Attention`: projections to `heads × dim_head`, attention, output projection.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    /// IP-Adapter's decoupled cross-attention: `to_k_ip`, `to_v_ip` over the image tokens.
    ip: Option<(Linear, Linear)>,
}

/// Image tokens an IP-Adapter attends to, and its weight (`set_ip_adapter_scale`).
#[derive(Debug, Clone)]
pub struct IpTokens {
    /// `[B, N, cross_attention_dim]`, batched like the text context.
    pub tokens: Tensor,
    pub scale: f64,
}

impl Attention {
    /// `context_dim` is `None` for self-attention; `qkv_bias` is diffusers' `bias`.
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
        qkv_bias: bool,
    ) -> Result<Self> {
        let inner = heads * dim_head;
        let context_dim = context_dim.unwrap_or(query_dim);
        let lin = |vb: VarBuilder, i, o, bias: bool| {
            if bias {
                linear(i, o, vb)
            } else {
                crate::layers::linear::linear_no_bias(i, o, vb)
            }
        };
        Ok(Self {
            to_q: lin(vb.pp("to_q"), query_dim, inner, qkv_bias)?,
            to_k: lin(vb.pp("to_k"), context_dim, inner, qkv_bias)?,
            to_v: lin(vb.pp("to_v"), context_dim, inner, qkv_bias)?,
            to_out: linear(inner, query_dim, vb.pp("to_out").pp("0"))?,
            heads,
            scale: 1.0 / (dim_head as f64).sqrt(),
            ip: None,
        })
    }

    /// Gives this cross-attention IP-Adapter's key and value projections of image tokens.
    pub fn set_ip(&mut self, to_k_ip: Linear, to_v_ip: Linear) {
        self.ip = Some((to_k_ip, to_v_ip));
    }

    /// `[key, value]` input width and inner width this layer's IP projections must have.
    pub fn ip_shape(&self) -> (usize, usize) {
        (self.to_k.in_dim(), self.to_k.out_dim())
    }

    /// [`Self::forward`] plus, when this layer holds IP-Adapter projections and `ip` is given,
    /// `scale ×` the attention of the same queries over the image tokens (diffusers'
    /// `IPAdapterAttnProcessor2_0`: a second softmax, added before the output projection).
    pub fn forward_ip(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        ip: Option<&IpTokens>,
    ) -> Result<Tensor> {
        let record = context.is_some() && recording();
        let (q, text) = self.attend(x, context.unwrap_or(x), record)?;
        let out = match (&self.ip, ip) {
            (Some((to_k_ip, to_v_ip)), Some(ip)) => {
                let tokens = ip.tokens.to_dtype(x.dtype())?;
                let k = split_heads(&to_k_ip.forward(&tokens)?, self.heads)?;
                let v = split_heads(&to_v_ip.forward(&tokens)?, self.heads)?;
                let bf16 = self.to_q.is_packed_bf16();
                let image = attention_with(&q, &k, &v, self.scale, None, bf16)?;
                (text + (image * ip.scale)?)?
            }
            _ => text,
        };
        self.to_out.forward(&merge_heads(&out)?)
    }

    /// `x`: `[B, L, query_dim]`; `context`: `[B, Lc, context_dim]` or `None` for self-attention.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        self.forward_ip(x, context, None)
    }

    /// The heads' queries of `x` and their attention over `context` (`[B, H, L, d]` each):
    /// what the text and the image branches share. `record`: by the composed ops, the
    /// probabilities (mean over heads) kept for [`record_cross_attention`].
    fn attend(&self, x: &Tensor, context: &Tensor, record: bool) -> Result<(Tensor, Tensor)> {
        let q = split_heads(&self.to_q.forward(x)?, self.heads)?;
        let k = split_heads(&self.to_k.forward(context)?, self.heads)?;
        let v = split_heads(&self.to_v.forward(context)?, self.heads)?;
        let out = if record {
            let (out, probs) = attention_block_with_probs(&q, &k, &v, self.scale, None)?;
            let map = probs.mean(1)?;
            CROSS_ATTENTION_MAPS.with(|m| {
                if let Some(maps) = m.borrow_mut().as_mut() {
                    maps.push(map);
                }
            });
            out
        } else {
            attention_with(&q, &k, &v, self.scale, None, self.to_q.is_packed_bf16())?
        };
        Ok((q, out))
    }
}

thread_local! {
    /// Cross-attention maps recorded on this thread, while [`record_cross_attention`] runs.
    static CROSS_ATTENTION_MAPS: RefCell<Option<Vec<Tensor>>> = const { RefCell::new(None) };
}

fn recording() -> bool {
    CROSS_ATTENTION_MAPS.with(|m| m.borrow().is_some())
}

/// Runs `f` (a forward pass) and returns, beside its result, every cross-attention layer's
/// attention probabilities in the order the layers ran: `[B, Lq, Lk]` each, the mean over
/// heads, each query's row summing to 1 over the context tokens. The recorded layers compute
/// their scores by the composed ops, so the maps take gradients (a training loss on where the
/// text's tokens attend: token-level grounding, as TokenCompose does with segmentation masks).
/// Per thread: forward passes on other threads (training shards) record their own.
pub fn record_cross_attention<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Vec<Tensor>)> {
    let outer = CROSS_ATTENTION_MAPS.with(|m| m.borrow_mut().replace(Vec::new()));
    let out = f();
    let maps = CROSS_ATTENTION_MAPS.with(|m| std::mem::replace(&mut *m.borrow_mut(), outer));
    Ok((out?, maps.unwrap_or_default()))
}

/// A causal mask `[L, L]`: 0 on and below the diagonal, -inf above.
pub fn causal_mask(len: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (len, len), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Recording runs the same attention by the composed ops and hands back each
    /// cross-attention layer's maps, rows summing to 1; self-attention is not recorded.
    #[test]
    fn recorded_cross_attention_is_the_same_attention() -> Result<()> {
        let dev = Device::Cpu;
        let map = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let cross = Attention::new(vb.pp("cross"), 16, Some(12), 2, 8, false)?;
        let own = Attention::new(vb.pp("own"), 16, None, 2, 8, false)?;
        let x = Tensor::randn(0f32, 1.0, (3, 10, 16), &dev)?;
        let ctx = Tensor::randn(0f32, 1.0, (3, 7, 12), &dev)?;
        let plain = cross.forward(&own.forward(&x, None)?, Some(&ctx))?;
        let (recorded, maps) =
            record_cross_attention(|| cross.forward(&own.forward(&x, None)?, Some(&ctx)))?;
        let diff = (&plain - &recorded)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        assert_eq!(maps.len(), 1);
        assert_eq!(maps[0].dims(), &[3, 10, 7]);
        let rows = maps[0].sum(2)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(rows.iter().all(|r| (r - 1.0).abs() < 1e-5), "{rows:?}");
        // Outside the recording nothing is kept.
        let (_, none) = record_cross_attention(|| Ok(()))?;
        assert!(none.is_empty() && !recording());
        Ok(())
    }

    #[test]
    fn sliced_attention_equals_whole() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 37, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 3, 29, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, 3, 29, 8), &dev)?;
        let whole = sliced(&q, &k, &v, 0.3, None, usize::MAX)?;
        // One head's scores are 37·29·4 bytes: head by head whole, or in chunks of 2 rows.
        for budget in [37 * 29 * 4, 2 * 29 * 4] {
            let chunked = sliced(&q, &k, &v, 0.3, None, budget)?;
            assert_eq!(chunked.dims(), whole.dims());
            // Equal up to the matmul's blocking over a different number of rows.
            let diff = (&whole - chunked)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "{budget}: {diff}");
        }
        Ok(())
    }
}
