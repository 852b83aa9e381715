//! What the oracle-fixture tests share: the oracle's analytic stand-in model as a denoiser, and
//! replayed noise.

use candle_core::Tensor;
use ldm_sampling::denoiser::scale_input;
use ldm_sampling::noise::NoiseSource;
use ldm_sampling::scheduler_config::Plan;
use ldm_sampling::Denoiser;

/// The oracle's stand-in model, op for op in float32:
/// `0.6·x·(1 − 0.5 s) + 0.3·sin(3x + s) + 0.1 s` with `s = t / 1000`.
pub fn standin(x: &Tensor, t: f64) -> candle_core::Result<Tensor> {
    let s = t / 1000.0;
    let a = ((x * 0.6)? * (1.0 - 0.5 * s))?;
    let b = (((x * 3.0)? + s)?.sin()? * 0.3)?;
    (a + b)? + 0.1 * s
}

/// The stand-in model called as a diffusers pipeline calls it: scaled input, the plan's
/// timestep, the plan's prediction type and x̂₀ processing.
pub struct Standin<'a>(pub &'a Plan);

impl Denoiser for Standin<'_> {
    fn denoise(&self, x: &Tensor, sigma: f64) -> candle_core::Result<Tensor> {
        let out = standin(&scale_input(x, sigma)?, self.0.timestep(sigma))?;
        let x0 = self.0.prediction.to_denoised(x, &out, sigma)?;
        self.0.finish_denoised(x, x0, sigma)
    }
}

/// Replays recorded noise (torchsde's Brownian increments) in order.
pub struct Replay(pub Vec<Vec<f32>>, pub usize);

impl NoiseSource for Replay {
    fn randn(&mut self, n: usize) -> Vec<f32> {
        let v = self.0.get(self.1).cloned().unwrap_or_default();
        self.1 += 1;
        assert_eq!(v.len(), n, "replayed noise {} has the wrong size", self.1);
        v
    }
}
