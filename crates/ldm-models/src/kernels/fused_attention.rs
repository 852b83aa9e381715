//! Fused CPU attention for inference: `softmax(q kᵀ · scale) v` computed a block of query rows
//! at a time, so the scores of one block (`BLOCK_ROWS × L_k`, in cache) are all that ever
//! exists of the `L_q × L_k` matrix — memory linear in the number of tokens, as in
//! FlashAttention (Dao et al. 2022), here with the whole key row per block since a CPU cache
//! holds it. Each block is two GEMMs (`gemm` crate, one thread each) around a softmax whose
//! exponential is vectorised; blocks of all batches and heads run in parallel on rayon.
//!
//! With `bf16` set (the model's weights are bf16 on the CPU), both products take bf16 operands
//! with f32 accumulation ([`super::bf16_gemm`]): keys and values are packed once per head, and
//! the softmax still runs in f32 — PyTorch's bf16 autocast rounds the same operands.
//!
//! f32 activations, no mask. For training, [`FusedAttentionTrain`] adds the backward in the same
//! block-wise form (FlashAttention's, Dao et al. 2022, §3.1): per block of query rows the
//! probabilities are recomputed from `q` and `k`, and `dV`, `dK` accumulate over the blocks
//! of a head, so the backward's memory is linear in the tokens too. Masked (causal) attention
//! uses the composed path in [`crate::layers::attention`].

use super::bf16_gemm::{self, PackedRef};
use super::cpu::{contiguous_f32, exp_nonpositive, gemm, Operand};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Query rows per block; fewer when a key row is so long that the block would not fit in
/// [`BLOCK_BYTES`].
const BLOCK_ROWS: usize = 64;
const BLOCK_BYTES: usize = 4 << 20;

/// `q` `[B, H, Lq, d]`, `k` `[B, H, Lk, d]`, `v` `[B, H, Lk, dv]` → `[B, H, Lq, dv]`.
#[derive(Debug, Clone, Copy)]
pub struct FusedAttention {
    pub scale: f32,
    /// bf16 operands for both products.
    pub bf16: bool,
}

/// Lanes of the max and sum reductions: independent partial results let the compiler keep
/// them in vector registers instead of one serial chain.
const LANES: usize = 16;

/// Each row of `s` (`rows × n`) becomes `exp((s − max) · scale)`; `sums` gets each row's total.
/// With `words`, each row is also written there as bf16 pairs (`⌈n/2⌉` words a row) while it is
/// in cache.
#[inline(always)]
fn softmax_numerators_body(
    s: &mut [f32],
    n: usize,
    scale: f32,
    sums: &mut [f32],
    mut words: Option<&mut [u32]>,
) {
    for (i, (row, sum)) in s.chunks_exact_mut(n).zip(sums.iter_mut()).enumerate() {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for c in &mut chunks {
            for (m, &v) in lanes.iter_mut().zip(c) {
                *m = if v > *m { v } else { *m };
            }
        }
        let mut max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for &v in chunks.remainder() {
            max = max.max(v);
        }
        let shift = max * scale;
        let mut totals = [0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (t, v) in totals.iter_mut().zip(c.iter_mut()) {
                let e = exp_nonpositive(v.mul_add(scale, -shift));
                *v = e;
                *t += e;
            }
        }
        let mut total: f32 = totals.iter().sum();
        for v in chunks.into_remainder() {
            let e = exp_nonpositive(v.mul_add(scale, -shift));
            *v = e;
            total += e;
        }
        *sum = total;
        if let Some(words) = words.as_deref_mut() {
            let pairs = n.div_ceil(2);
            let out = &mut words[i * pairs..(i + 1) * pairs];
            let mut it = row.chunks_exact(2);
            for (w, p) in out.iter_mut().zip(&mut it) {
                *w = bf16_gemm::pair(p[0], p[1]);
            }
            if let [last] = it.remainder() {
                out[pairs - 1] = bf16_gemm::pair(*last, 0.0);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,fma")]
unsafe fn softmax_numerators_avx512(
    s: &mut [f32],
    n: usize,
    scale: f32,
    sums: &mut [f32],
    words: Option<&mut [u32]>,
) {
    softmax_numerators_body(s, n, scale, sums, words)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_numerators_avx2(
    s: &mut [f32],
    n: usize,
    scale: f32,
    sums: &mut [f32],
    words: Option<&mut [u32]>,
) {
    softmax_numerators_body(s, n, scale, sums, words)
}

fn softmax_numerators(
    s: &mut [f32],
    n: usize,
    scale: f32,
    sums: &mut [f32],
    words: Option<&mut [u32]>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { softmax_numerators_avx512(s, n, scale, sums, words) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { softmax_numerators_avx2(s, n, scale, sums, words) };
        }
    }
    softmax_numerators_body(s, n, scale, sums, words)
}

/// Divides each row of `dst` (`dv` wide) by its softmax total.
fn normalise(dst: &mut [f32], dv: usize, sums: &[f32]) {
    for (row, &sum) in dst.chunks_exact_mut(dv).zip(sums.iter()) {
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

impl FusedAttention {
    /// The bf16 products: per head, `Kᵀ` and `V` packed once; per block of query rows, the
    /// queries and then the softmax numerators rounded to bf16 pairs.
    fn bf16_heads(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        (lq, lk, d, dv): (usize, usize, usize, usize),
        rows: usize,
        out: &mut [f32],
    ) {
        let (d_pairs, k_pairs) = (d.div_ceil(2), lk.div_ceil(2));
        out.par_chunks_mut(lq * dv)
            .enumerate()
            .for_each(|(head, out_h)| {
                let qh = &q[head * lq * d..(head + 1) * lq * d];
                let kh = &k[head * lk * d..(head + 1) * lk * d];
                let vh = &v[head * lk * dv..(head + 1) * lk * dv];
                let mut k_packed = vec![0u32; bf16_gemm::packed_len(d, lk)];
                bf16_gemm::pack_transposed(&mut k_packed, kh, lk, d);
                let mut v_packed = vec![0u32; bf16_gemm::packed_len(lk, dv)];
                let src = bf16_gemm::Rows {
                    data: vh,
                    n: dv,
                    ld: dv,
                };
                bf16_gemm::pack(&mut v_packed, lk, dv, &src);
                let kt = PackedRef {
                    data: &k_packed,
                    pairs: d_pairs,
                    n: lk,
                };
                let vp = PackedRef {
                    data: &v_packed,
                    pairs: k_pairs,
                    n: dv,
                };
                out_h.par_chunks_mut(rows * dv).enumerate().for_each_init(
                    || {
                        (
                            vec![0f32; rows * lk],
                            vec![0f32; rows],
                            vec![0u32; rows * d_pairs.max(k_pairs)],
                        )
                    },
                    |(scores, sums, words), (j, dst)| {
                        let m = dst.len() / dv;
                        let s = &mut scores[..m * lk];
                        bf16_gemm::pair_rows(&qh[j * rows * d..], m, d, d, words);
                        bf16_gemm::gemm(m, words, d_pairs, kt, s, lk, false, false);
                        softmax_numerators(s, lk, self.scale, &mut sums[..m], Some(words));
                        bf16_gemm::gemm(m, words, k_pairs, vp, dst, dv, false, false);
                        normalise(dst, dv, sums);
                    },
                );
            });
    }
}

/// `[B, H, L, d]` sizes of attention's operands: `(b, h, lq, lk, d, dv)`.
type Sizes = (usize, usize, usize, usize, usize, usize);

/// `q`, `k`, `v` as contiguous f32 slices with their sizes, checked to fit together.
#[allow(clippy::type_complexity)]
fn operands<'a>(
    op: &str,
    (qs, ql): (&'a CpuStorage, &Layout),
    (ks, kl): (&'a CpuStorage, &Layout),
    (vs, vl): (&'a CpuStorage, &Layout),
) -> Result<((&'a [f32], &'a [f32], &'a [f32]), Sizes)> {
    let (b, h, lq, d) = ql.shape().dims4()?;
    let (kb, kh, lk, kd) = kl.shape().dims4()?;
    let (vb, vh, vk, dv) = vl.shape().dims4()?;
    if (kb, kh, kd) != (b, h, d) || (vb, vh, vk) != (b, h, lk) {
        candle_core::bail!(
            "{op}: q {:?}, k {:?}, v {:?} do not fit",
            ql.shape(),
            kl.shape(),
            vl.shape()
        );
    }
    let q = contiguous_f32(qs, ql, op, "q")?;
    let k = contiguous_f32(ks, kl, op, "k")?;
    let v = contiguous_f32(vs, vl, op, "v")?;
    Ok(((q, k, v), (b, h, lq, lk, d, dv)))
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ((q, k, v), (b, h, lq, lk, d, dv)) =
            operands(self.name(), (qs, ql), (ks, kl), (vs, vl))?;
        let rows = BLOCK_ROWS.min(BLOCK_BYTES / (4 * lk.max(1))).max(1);
        let mut out = vec![0f32; b * h * lq * dv];
        let scale = self.scale;
        if self.bf16 && bf16_gemm::available() {
            self.bf16_heads((q, k, v), (lq, lk, d, dv), rows, &mut out);
            return Ok((CpuStorage::F32(out), Shape::from((b, h, lq, dv))));
        }
        // One task per block of query rows of one head; each owns its output rows.
        out.par_chunks_mut(lq * dv)
            .enumerate()
            .for_each(|(head, out_h)| {
                let qh = &q[head * lq * d..(head + 1) * lq * d];
                let kh = &k[head * lk * d..(head + 1) * lk * d];
                let vh = &v[head * lk * dv..(head + 1) * lk * dv];
                out_h.par_chunks_mut(rows * dv).enumerate().for_each_init(
                    || (vec![0f32; rows * lk], vec![0f32; rows]),
                    |(scores, sums), (j, dst)| {
                        let m = dst.len() / dv;
                        let s = &mut scores[..m * lk];
                        let qb = &qh[j * rows * d..];
                        gemm(
                            (m, lk, d),
                            s,
                            lk,
                            false,
                            Operand::rows(qb, d),
                            Operand::transposed(kh, d),
                            false,
                        );
                        softmax_numerators(s, lk, scale, &mut sums[..m], None);
                        gemm(
                            (m, dv, lk),
                            dst,
                            dv,
                            false,
                            Operand::rows(s, lk),
                            Operand::rows(vh, dv),
                            false,
                        );
                        normalise(dst, dv, sums);
                    },
                );
            });
        Ok((CpuStorage::F32(out), Shape::from((b, h, lq, dv))))
    }
}

/// [`FusedAttention`] (f32 products) with a backward: for attention that takes gradients.
#[derive(Debug, Clone, Copy)]
pub struct FusedAttentionTrain {
    pub scale: f32,
}

impl CustomOp3 for FusedAttentionTrain {
    fn name(&self) -> &'static str {
        "fused-attention-train"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let forward = FusedAttention {
            scale: self.scale,
            bf16: false,
        };
        forward.cpu_fwd(qs, ql, ks, kl, vs, vl)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = AttentionBackward {
            scale: self.scale,
            out: res.flatten_all()?.to_vec1()?,
            dout: grad.flatten_all()?.to_vec1()?,
        };
        let flat = q.apply_op3_no_bwd(k, v, &op)?;
        let mut grads = super::split_flat(&flat, &[q.shape(), k.shape(), v.shape()])?.into_iter();
        Ok((grads.next(), grads.next(), grads.next()))
    }
}

/// The backward of [`FusedAttentionTrain`]: inputs `q`, `k`, `v`, with the forward's output and
/// its gradient held here (`[B, H, Lq, dv]` each); output `[dq | dk | dv]` flat.
struct AttentionBackward {
    scale: f32,
    out: Vec<f32>,
    dout: Vec<f32>,
}

impl CustomOp3 for AttentionBackward {
    fn name(&self) -> &'static str {
        "fused-attention-backward"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ((q, k, v), (b, h, lq, lk, d, dv)) =
            operands(self.name(), (qs, ql), (ks, kl), (vs, vl))?;
        if self.out.len() != b * h * lq * dv || self.dout.len() != self.out.len() {
            candle_core::bail!(
                "{}: output or gradient does not fit {:?}",
                self.name(),
                ql.shape()
            )
        }
        let rows = BLOCK_ROWS.min(BLOCK_BYTES / (4 * lk.max(1))).max(1);
        let scale = self.scale;
        let (nq, nk, nv) = (b * h * lq * d, b * h * lk * d, b * h * lk * dv);
        let mut grads = vec![0f32; nq + nk + nv];
        let (dq, rest) = grads.split_at_mut(nq);
        let (dk, dvs) = rest.split_at_mut(nk);
        // One task per head: its blocks of query rows in turn, each adding to the head's dK
        // and dV.
        dq.par_chunks_mut((lq * d).max(1))
            .zip(dk.par_chunks_mut((lk * d).max(1)))
            .zip(dvs.par_chunks_mut((lk * dv).max(1)))
            .enumerate()
            .for_each(|(head, ((dq_h, dk_h), dv_h))| {
                let qh = &q[head * lq * d..(head + 1) * lq * d];
                let kh = &k[head * lk * d..(head + 1) * lk * d];
                let vh = &v[head * lk * dv..(head + 1) * lk * dv];
                let oh = &self.out[head * lq * dv..(head + 1) * lq * dv];
                let doh = &self.dout[head * lq * dv..(head + 1) * lq * dv];
                let (mut p, mut ds) = (vec![0f32; rows * lk], vec![0f32; rows * lk]);
                let mut sums = vec![0f32; rows];
                for r0 in (0..lq).step_by(rows) {
                    let m = rows.min(lq - r0);
                    let (p, ds) = (&mut p[..m * lk], &mut ds[..m * lk]);
                    let qb = &qh[r0 * d..(r0 + m) * d];
                    let (ob, dob) = (&oh[r0 * dv..(r0 + m) * dv], &doh[r0 * dv..(r0 + m) * dv]);
                    // P = softmax(q kᵀ · scale), recomputed.
                    let (qr, kt) = (Operand::rows(qb, d), Operand::transposed(kh, d));
                    gemm((m, lk, d), p, lk, false, qr, kt, false);
                    softmax_numerators(p, lk, scale, &mut sums[..m], None);
                    normalise(p, lk, &sums[..m]);
                    // dV += Pᵀ dO; dP = dO Vᵀ.
                    let (pt, dor) = (Operand::transposed(p, lk), Operand::rows(dob, dv));
                    gemm((lk, dv, m), dv_h, dv, true, pt, dor, false);
                    gemm(
                        (m, lk, dv),
                        ds,
                        lk,
                        false,
                        dor,
                        Operand::transposed(vh, dv),
                        false,
                    );
                    // dS = P ∘ (dP − rowsum(dO ∘ O)) · scale.
                    for i in 0..m {
                        let (o, g) = (&ob[i * dv..(i + 1) * dv], &dob[i * dv..(i + 1) * dv]);
                        let dot: f32 = o.iter().zip(g).map(|(a, b)| a * b).sum();
                        let (pr, dr) = (&p[i * lk..(i + 1) * lk], &mut ds[i * lk..(i + 1) * lk]);
                        for (x, &pv) in dr.iter_mut().zip(pr) {
                            *x = pv * (*x - dot) * scale;
                        }
                    }
                    // dQ = dS K; dK += dSᵀ Q.
                    let dq_b = &mut dq_h[r0 * d..(r0 + m) * d];
                    gemm(
                        (m, d, lk),
                        dq_b,
                        d,
                        false,
                        Operand::rows(ds, lk),
                        Operand::rows(kh, d),
                        false,
                    );
                    let dst = Operand::transposed(ds, lk);
                    gemm((lk, d, m), dk_h, d, true, dst, Operand::rows(qb, d), false);
                }
            });
        let len = grads.len();
        Ok((CpuStorage::F32(grads), Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The training op's output and gradients (q, k, v) against the composed ops' candle
    /// backward: several blocks of query rows, a partial block, cross-attention with
    /// `dv ≠ d`.
    #[test]
    fn training_attention_matches_the_composed_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for &(b, h, lq, lk, d, dv) in &[
            (2, 3, 150, 150, 8, 8),
            (1, 2, 1, 7, 4, 4),
            (2, 1, 70, 77, 16, 12),
        ] {
            let var = |shape: (usize, usize, usize, usize)| -> Result<Var> {
                Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev)?)
            };
            let (q, k, v) = (
                var((b, h, lq, d))?,
                var((b, h, lk, d))?,
                var((b, h, lk, dv))?,
            );
            let scale = 1.0 / (d as f64).sqrt();
            let r = Tensor::randn(0f32, 1.0, (b, h, lq, dv), &dev)?;
            let ours = q.as_tensor().apply_op3(
                k.as_tensor(),
                v.as_tensor(),
                FusedAttentionTrain {
                    scale: scale as f32,
                },
            )?;
            let scores = (q.as_tensor().matmul(&k.as_tensor().t()?)? * scale)?;
            let probs = candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?;
            let theirs = probs.matmul(v.as_tensor())?;
            let ga = (&ours * &r)?.sum_all()?.backward()?;
            let gb = (&theirs * &r)?.sum_all()?.backward()?;
            let maxdiff = |a: &Tensor, b: &Tensor| -> Result<f32> {
                (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
            };
            let case = format!("{b} {h} {lq} {lk} {d} {dv}");
            assert!(maxdiff(&ours, &theirs)? < 1e-5, "{case}: output");
            for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, e) = (ga.get(t).expect("grad"), gb.get(t).expect("grad"));
                assert!(maxdiff(a, e)? < 1e-4, "{case}: d{name}");
            }
        }
        Ok(())
    }

    #[test]
    fn matches_composed_attention() -> Result<()> {
        let dev = Device::Cpu;
        // Lq not a multiple of the block, Lq = 1, cross-attention with short keys.
        for &(b, h, lq, lk, d, dv) in &[
            (2, 3, 150, 150, 8, 8),
            (1, 2, 1, 7, 4, 4),
            (2, 1, 70, 77, 16, 16),
            (1, 1, 64, 5000, 8, 4),
        ] {
            let q = Tensor::randn(0f32, 1.0, (b, h, lq, d), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (b, h, lk, d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (b, h, lk, dv), &dev)?;
            let scale = 1.0 / (d as f64).sqrt();
            let op = |bf16| FusedAttention {
                scale: scale as f32,
                bf16,
            };
            let ours = q.apply_op3_no_bwd(&k, &v, &op(false))?;
            let probs = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?)?;
            let theirs = probs.matmul(&v)?;
            let diff = (ours - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{b} {h} {lq} {lk} {d}: {diff}");
            // bf16 operands: the scores and the output each to about bf16's 2⁻⁸ relative.
            let ours = q.apply_op3_no_bwd(&k, &v, &op(true))?;
            let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 0.03, "bf16 {b} {h} {lq} {lk} {d}: {diff}");
        }
        Ok(())
    }
}
