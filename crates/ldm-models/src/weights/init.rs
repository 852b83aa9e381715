//! Seeded initialisation: fresh weights for a network from its constructor's `Init` hints, for
//! training (reproducible runs) and for benchmarks (the real architectures without files).

use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;

/// A `VarBuilder` backend that creates the variables of a fresh model from a seeded stream, so a
/// training run is reproducible (candle's own initialisers draw from an unseeded thread RNG).
/// The distributions are candle's (`Init`); the variables land in `map`.
pub struct SeededInit {
    map: VarMap,
    rng: std::sync::Mutex<rand_chacha::ChaCha8Rng>,
    /// Hand out plain tensors instead of the variables (an inference-only model: no op records
    /// a graph for backpropagation).
    detached: bool,
}

impl SeededInit {
    /// A builder over `map` drawing from `seed`.
    pub fn var_builder(
        map: &VarMap,
        seed: u64,
        device: &candle_core::Device,
    ) -> candle_nn::VarBuilder<'static> {
        use rand::SeedableRng;
        let backend = SeededInit {
            map: map.clone(),
            rng: std::sync::Mutex::new(rand_chacha::ChaCha8Rng::seed_from_u64(seed)),
            detached: false,
        };
        candle_nn::VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone())
    }

    /// A builder of constant (non-trainable) weights drawn from `seed` exactly as
    /// [`SeededInit::var_builder`] draws them.
    pub fn constants(seed: u64, device: &candle_core::Device) -> candle_nn::VarBuilder<'static> {
        use rand::SeedableRng;
        let backend = SeededInit {
            map: VarMap::new(),
            rng: std::sync::Mutex::new(rand_chacha::ChaCha8Rng::seed_from_u64(seed)),
            detached: true,
        };
        candle_nn::VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone())
    }

    fn hand_out(&self, t: Tensor) -> Tensor {
        if self.detached {
            t.detach()
        } else {
            t
        }
    }
}

impl candle_nn::var_builder::SimpleBackend for SeededInit {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        dev: &candle_core::Device,
    ) -> candle_core::Result<Tensor> {
        use candle_nn::init::NormalOrUniform;
        use candle_nn::Init;
        use rand::Rng;
        let mut data = self.map.data().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = data.get(name) {
            if v.shape() != &shape {
                candle_core::bail!("{name}: shape {:?} requested again as {shape:?}", v.shape());
            }
            return Ok(self.hand_out(v.as_tensor().clone()));
        }
        let n = shape.elem_count();
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        let uniform = |rng: &mut rand_chacha::ChaCha8Rng, lo: f64, hi: f64| -> Vec<f32> {
            (0..n)
                .map(|_| (lo + (hi - lo) * rng.random::<f64>()) as f32)
                .collect()
        };
        let normal = |rng: &mut rand_chacha::ChaCha8Rng, mean: f64, std: f64| -> Vec<f32> {
            (0..n)
                .map(|_| (mean + std * rng.sample::<f64, _>(rand_distr::StandardNormal)) as f32)
                .collect()
        };
        let values = match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Uniform { lo, up } => uniform(&mut rng, lo, up),
            Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(&shape) as f64).sqrt();
                match dist {
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        uniform(&mut rng, -bound, bound)
                    }
                    NormalOrUniform::Normal => normal(&mut rng, 0.0, std),
                }
            }
        };
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)?)?;
        let t = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(self.hand_out(t))
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &candle_core::Device,
    ) -> candle_core::Result<Tensor> {
        let data = self.map.data().lock().unwrap_or_else(|e| e.into_inner());
        match data.get(name) {
            Some(v) => Ok(self.hand_out(v.as_tensor().clone())),
            None => candle_core::bail!("{name} is not initialised"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        let data = self.map.data().lock().unwrap_or_else(|e| e.into_inner());
        data.contains_key(name)
    }
}
