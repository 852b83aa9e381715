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
