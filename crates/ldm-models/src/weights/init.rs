//! Seeded initialisation: fresh weights for a network from its constructor's `Init` hints, for
//! training (reproducible runs) and for benchmarks (the real architectures without files).

use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;

/// How the fresh weights of linear and convolution layers are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InitScheme {
    /// The layers' own hints: PyTorch's defaults for `nn.Linear` and `nn.Conv2d`, weight and
    /// bias uniform in ±1/√fan_in ([`torch_default_init`](crate::layers::linear::torch_default_init)).
    #[default]
    Torch,
    /// candle-nn's constructors' scheme: weights from Kaiming's normal for ReLU,
    /// std √(2/fan_in), biases uniform in ±1/√C_in (the layer's inputs, without the kernel
    /// area). It draws exactly what `candle_nn::conv2d` and `candle_nn::linear` drew.
    HeNormal,
}

impl std::str::FromStr for InitScheme {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "torch" => Ok(Self::Torch),
            "he-normal" | "he_normal" => Ok(Self::HeNormal),
            other => Err(format!(
                "unknown initialisation `{other}` (torch, he-normal)"
            )),
        }
    }
}

/// A `VarBuilder` backend that creates the variables of a fresh model from a seeded stream, so a
/// training run is reproducible (candle's own initialisers draw from an unseeded thread RNG).
/// The distributions are the layers' `Init` hints, or [`InitScheme::HeNormal`]'s in their
/// place; the variables land in `map`.
pub struct SeededInit {
    map: VarMap,
    scheme: InitScheme,
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
        Self::var_builder_with(map, seed, InitScheme::Torch, device)
    }

    /// A builder over `map` drawing from `seed` with the given scheme.
    pub fn var_builder_with(
        map: &VarMap,
        seed: u64,
        scheme: InitScheme,
        device: &candle_core::Device,
    ) -> candle_nn::VarBuilder<'static> {
        use rand::SeedableRng;
        let backend = SeededInit {
            map: map.clone(),
            scheme,
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
            scheme: InitScheme::Torch,
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
        let init = match (self.scheme, init) {
            (InitScheme::HeNormal, Init::Uniform { .. }) => {
                he_normal(name, &shape, |n| data.get(n).map(|v| v.dims().to_vec())).unwrap_or(init)
            }
            (_, init) => init,
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

/// [`InitScheme::HeNormal`]'s distribution for a variable that a layer hints uniform: a weight
/// of rank 2 or more draws from Kaiming's normal for ReLU; a bias, uniform in ±1/√C_in, where
/// C_in is its layer's weight's second dimension (`dims_of` looks the weight up). `None` keeps
/// the hint.
fn he_normal(
    name: &str,
    shape: &candle_core::Shape,
    dims_of: impl Fn(&str) -> Option<Vec<usize>>,
) -> Option<candle_nn::Init> {
    if name.ends_with("weight") && shape.rank() >= 2 {
        return Some(candle_nn::init::DEFAULT_KAIMING_NORMAL);
    }
    let layer = name.strip_suffix("bias")?;
    let weight = dims_of(&format!("{layer}weight"))?;
    let inputs = *weight.get(1)?;
    let bound = 1.0 / (inputs.max(1) as f64).sqrt();
    Some(candle_nn::Init::Uniform {
        lo: -bound,
        up: bound,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Conv2d;
    use candle_core::Device;

    /// (weight std, largest |weight|, largest |bias|) of a fresh 3×3 conv, 64 → 64 channels.
    fn fresh_conv(scheme: InitScheme) -> (f64, f64, f64) {
        let map = VarMap::new();
        let vb = SeededInit::var_builder_with(&map, 3, scheme, &Device::Cpu);
        Conv2d::new(vb.pp("conv"), 64, 64, 3, 1, 1).unwrap();
        let get = |n: &str| -> Vec<f32> {
            let data = map.data().lock().unwrap();
            data[n]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (w, b) = (get("conv.weight"), get("conv.bias"));
        let std = (w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
        let max = |v: &[f32]| v.iter().fold(0f64, |m, &x| m.max(x.abs() as f64));
        (std, max(&w), max(&b))
    }

    #[test]
    fn schemes_draw_their_distributions() {
        let fan_in = (64 * 9) as f64;
        // PyTorch: both uniform in ±1/√fan_in (std 1/√(3 fan_in)).
        let (std, w_max, b_max) = fresh_conv(InitScheme::Torch);
        assert!((std * (3.0 * fan_in).sqrt() - 1.0).abs() < 0.03, "{std}");
        assert!(w_max <= 1.0 / fan_in.sqrt() && b_max <= 1.0 / fan_in.sqrt());
        // candle-nn's: weight N(0, 2/fan_in), bias uniform in ±1/√C_in, past ±1/√fan_in.
        let (std, _, b_max) = fresh_conv(InitScheme::HeNormal);
        assert!((std * (fan_in / 2.0).sqrt() - 1.0).abs() < 0.03, "{std}");
        assert!(b_max <= 1.0 / 8.0 && b_max > 1.0 / fan_in.sqrt(), "{b_max}");
    }

    #[test]
    fn scheme_names_parse() {
        assert_eq!("torch".parse::<InitScheme>(), Ok(InitScheme::Torch));
        assert_eq!("he-normal".parse::<InitScheme>(), Ok(InitScheme::HeNormal));
        assert!("xavier"
            .parse::<InitScheme>()
            .unwrap_err()
            .contains("torch, he-normal"));
    }
}
