//! Running independent pieces of a training step on their own threads (candle runs most CPU
//! ops on one thread): the optimiser's per-parameter updates and the shards of a batch.

use crate::{Error, Result};

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

#[cfg(test)]
mod tests {
    #[test]
    fn own_pools_return_results_in_order() {
        let out = super::on_own_pools(3, |i| Ok(i * 10)).unwrap();
        assert_eq!(out, vec![0, 10, 20]);
        assert!(super::on_own_pools(0, Ok).unwrap().is_empty());
        let err = super::on_own_pools(2, |i| {
            if i == 1 {
                Err(crate::Error::Msg("shard 1 failed".into()))
            } else {
                Ok(i)
            }
        });
        assert!(err.unwrap_err().to_string().contains("shard 1 failed"));
    }
}
