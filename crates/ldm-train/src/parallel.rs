//! Running independent pieces of a training step on their own threads (candle runs most CPU
//! ops on one thread): the optimiser's per-parameter updates and the shards of a batch.

use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use std::ops::Range;

/// `f` applied to every job, the jobs grouped by `size` into at most `workers` balanced groups
/// (largest first, each to the least loaded group) and each group run on its own thread. The
/// results come back grouped, not in `jobs`' order; the first error is returned.
pub fn on_threads<T: Send>(
    jobs: &[usize],
    workers: usize,
    size: impl Fn(usize) -> usize,
    f: impl Fn(usize) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let workers = workers.min(jobs.len()).max(1);
    if workers == 1 {
        return jobs.iter().map(|&i| f(i)).collect();
    }
    let mut order: Vec<usize> = jobs.to_vec();
    order.sort_by_key(|&i| std::cmp::Reverse(size(i)));
    let mut groups: Vec<(usize, Vec<usize>)> = vec![(0, Vec::new()); workers];
    for i in order {
        let g = groups
            .iter_mut()
            .min_by_key(|(load, _)| *load)
            .expect("at least one worker");
        g.0 += size(i);
        g.1.push(i);
    }
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = groups
            .into_iter()
            .map(|(_, group)| scope.spawn(move || group.into_iter().map(f).collect::<Vec<_>>()))
            .collect();
        let mut out = Vec::with_capacity(jobs.len());
        for h in handles {
            let results = h
                .join()
                .map_err(|_| Error::Msg("a training thread panicked".into()))?;
            for r in results {
                out.push(r?);
            }
        }
        Ok(out)
    })
}

/// The machine's CPU cores (1 when unknown).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `f(0)`, …, `f(n − 1)`, each on its own thread inside its own one-thread rayon pool (kept for
/// later calls), results in order; the first error is returned. The shards of a training batch
/// run this way: a rayon-parallel kernel called from a shard then runs inline on the shard's
/// thread, where from plain threads every shard's kernels would queue for the one global pool
/// and hand their work back and forth between threads.
pub fn on_own_pools<T: Send>(n: usize, f: impl Fn(usize) -> Result<T> + Sync) -> Result<Vec<T>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    static POOLS: std::sync::Mutex<Vec<std::sync::Arc<rayon::ThreadPool>>> =
        std::sync::Mutex::new(Vec::new());
    let pools: Vec<std::sync::Arc<rayon::ThreadPool>> = {
        let mut kept = POOLS
            .lock()
            .map_err(|_| Error::Msg("a training thread panicked".into()))?;
        while kept.len() < n {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .thread_name(|i| format!("ldm-shard-{i}"))
                .build()
                .map_err(|e| Error::Msg(format!("cannot start a training thread: {e}")))?;
            kept.push(std::sync::Arc::new(pool));
        }
        kept[..n].to_vec()
    };
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = pools[1..]
            .iter()
            .enumerate()
            .map(|(i, pool)| scope.spawn(move || pool.install(|| f(i + 1))))
            .collect();
        let mut out = Vec::with_capacity(n);
        out.push(pools[0].install(|| f(0))?);
        for h in handles {
            out.push(
                h.join()
                    .map_err(|_| Error::Msg("a training thread panicked".into()))??,
            );
        }
        Ok(out)
    })
}

/// The shards a batch on `device` is computed in: `shards` on a CPU; on a GPU the whole
/// batch is one pass (threads would only queue on its one stream).
pub fn batch_shards(shards: usize, device: &Device) -> usize {
    if device.is_cpu() {
        shards
    } else {
        1
    }
}

/// A batch of `b` cut into at most `shards` contiguous, non-empty parts of near-equal size.
pub fn shard_ranges(b: usize, shards: usize) -> Vec<Range<usize>> {
    let shards = shards.clamp(1, b.max(1));
    (0..shards)
        .map(|i| (i * b / shards)..((i + 1) * b / shards))
        .filter(|r| !r.is_empty())
        .collect()
}

/// `f` on every shard of a batch, results in order: one shard runs on this thread, its kernels
/// spread over the global pool; several run one thread each ([`on_own_pools`]).
pub fn on_shards<T: Send>(
    ranges: &[Range<usize>],
    f: impl Fn(Range<usize>) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    match ranges {
        [one] => Ok(vec![f(one.clone())?]),
        _ => on_own_pools(ranges.len(), |i| f(ranges[i].clone())),
    }
}

/// Adds `extra`'s gradients for `params` into `grads` (a parameter missing from one side
/// takes the other's).
pub fn add_grads(grads: &mut GradStore, extra: &GradStore, params: &[(String, Var)]) -> Result<()> {
    for (_, p) in params {
        if let Some(e) = extra.get(p.as_tensor()) {
            let sum = match grads.remove(p.as_tensor()) {
                Some(mine) => (mine + e)?,
                None => e.clone(),
            };
            grads.insert(p.as_tensor(), sum);
        }
    }
    Ok(())
}

/// The loss over a batch of `b` and its gradients for `params`, computed in `shards` contiguous
/// parts on as many threads: `shard_loss(range)` returns that part's contribution to the loss
/// (the losses add up to the whole). The summed gradients equal one pass over the batch.
pub fn sharded_loss_and_grads(
    shards: usize,
    b: usize,
    params: &[(String, Var)],
    shard_loss: impl Fn(Range<usize>) -> Result<Tensor> + Sync,
) -> Result<(Tensor, GradStore)> {
    let shards = match params.first() {
        Some((_, p)) => batch_shards(shards, p.device()),
        None => shards,
    };
    let mut results = on_shards(&shard_ranges(b, shards), |r| {
        let loss = shard_loss(r)?;
        let grads = loss.backward()?;
        Ok((loss.detach(), grads))
    })?;
    let (mut loss, mut grads) = results.remove(0);
    for (l, g) in results {
        loss = (loss + l)?;
        add_grads(&mut grads, &g, params)?;
    }
    Ok((loss, grads))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_ranges_cover_the_batch() {
        assert_eq!(shard_ranges(5, 2), vec![0..2, 2..5]);
        assert_eq!(shard_ranges(2, 8), vec![0..1, 1..2]);
        assert_eq!(shard_ranges(4, 0), vec![0..4]);
    }

    /// Any number of shards gives the whole batch's loss and gradient.
    #[test]
    fn shards_sum_to_the_whole_batch() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(
            &[[0.5f32, -1.0, 2.0], [1.5, 0.25, -0.75]],
            &dev,
        )?)?;
        let unused = Var::from_tensor(&Tensor::new(&[1f32], &dev)?)?;
        let params = vec![("w".to_string(), w.clone()), ("unused".to_string(), unused)];
        let x = Tensor::new(
            &[
                [1f32, 2.0],
                [-1.0, 0.5],
                [3.0, -2.0],
                [0.25, 4.0],
                [2.0, 2.0],
            ],
            &dev,
        )?;
        let b = 5;
        let shard_loss = |r: std::ops::Range<usize>| -> Result<Tensor> {
            let y = x.narrow(0, r.start, r.len())?.matmul(w.as_tensor())?;
            Ok((y.tanh()?.sqr()?.sum_all()? / b as f64)?)
        };
        let (l1, g1) = sharded_loss_and_grads(1, b, &params, shard_loss)?;
        let g1 = g1
            .get(w.as_tensor())
            .unwrap()
            .flatten_all()?
            .to_vec1::<f32>()?;
        for shards in [2, 3, 5] {
            let (l, g) = sharded_loss_and_grads(shards, b, &params, shard_loss)?;
            let l_diff = (l.to_scalar::<f32>()? - l1.to_scalar::<f32>()?).abs();
            assert!(l_diff < 1e-6, "{shards} shards: loss off by {l_diff}");
            let g = g
                .get(w.as_tensor())
                .unwrap()
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (a, e) in g.iter().zip(&g1) {
                assert!((a - e).abs() < 1e-6, "{shards} shards: {a} vs {e}");
            }
            assert!(g1.iter().any(|v| v.abs() > 1e-3));
        }
        Ok(())
    }

    #[test]
    fn own_pools_return_results_in_order() {
        let out = on_own_pools(3, |i| Ok(i * 10)).unwrap();
        assert_eq!(out, vec![0, 10, 20]);
        assert!(on_own_pools(0, Ok).unwrap().is_empty());
        let err = on_own_pools(2, |i| {
            if i == 1 {
                Err(crate::Error::Msg("shard 1 failed".into()))
            } else {
                Ok(i)
            }
        });
        assert!(err.unwrap_err().to_string().contains("shard 1 failed"));
    }
}
