//! The trainers' random stream: ChaCha8 with a saved word position, so a resumed run draws the
//! same numbers an uninterrupted one would.

use crate::Result;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// A seeded, checkpointable source of uniform and normal numbers.
pub struct TrainRng {
    rng: ChaCha8Rng,
}

impl TrainRng {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }
    /// `(seed bytes, word position)`, enough to restore the stream exactly.
    pub fn state(&self) -> ([u8; 32], u128) {
        (self.rng.get_seed(), self.rng.get_word_pos())
    }
    pub fn restore(seed: [u8; 32], word_pos: u128) -> Self {
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_word_pos(word_pos);
        Self { rng }
    }
    pub fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }
    pub fn below(&mut self, n: usize) -> usize {
        self.rng.random_range(0..n)
    }
    pub fn normal(&mut self) -> f64 {
        self.rng.sample(StandardNormal)
    }
    /// A standard normal f32 tensor.
    pub fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.rng.sample(StandardNormal)).collect();
        Ok(Tensor::from_vec(v, shape, device)?)
    }
}
