//! A process-wide count of the floating-point operations the networks' matrix products,
//! convolutions and attention perform (2 per multiply-add, as PyTorch's `FlopCounterMode`
//! counts them). Benchmarks read it to report GFLOP/s; nothing else depends on it.
//! Elementwise work (norms, activations, softmax) is not counted.

use std::sync::atomic::{AtomicU64, Ordering};

static COUNT: AtomicU64 = AtomicU64::new(0);

/// Adds `n` operations to the count.
pub fn add(n: u64) {
    COUNT.fetch_add(n, Ordering::Relaxed);
}

/// Returns the count so far and restarts it at zero.
pub fn take() -> u64 {
    COUNT.swap(0, Ordering::Relaxed)
}

/// `2·m·k·n` for a product of `[m, k]` and `[k, n]`.
pub fn matmul(m: usize, k: usize, n: usize) -> u64 {
    2 * m as u64 * k as u64 * n as u64
}
