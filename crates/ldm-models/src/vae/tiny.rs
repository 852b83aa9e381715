//! The tiny autoencoder TAESD (Ollin Boer Bohan, madebyollin/taesd; diffusers'
//! `AutoencoderTiny`): plain convolution stacks that encode pixels to SD's scaled latents and
//! decode them back, a few percent of the KL autoencoder's work, for live previews and fast
//! decodes. No posterior: the encoder's output is the latent. Module paths are diffusers'
//! (`encoder.layers.N…`, `decoder.layers.N…`, the indices of its `nn.Sequential`).

use crate::error::{Error, Result as ModelResult};
use crate::layers::Conv2d;
use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};
use serde::Deserialize;
use std::path::Path;

/// diffusers' `AutoencoderTiny` config (`config.json`), field for field (the fields we read).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default)]
pub struct AutoencoderTinyConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub encoder_block_out_channels: Vec<usize>,
    pub decoder_block_out_channels: Vec<usize>,
    pub act_fn: String,
    pub upsample_fn: String,
    pub latent_channels: usize,
    pub upsampling_scaling_factor: usize,
    pub num_encoder_blocks: Vec<usize>,
    pub num_decoder_blocks: Vec<usize>,
    /// The pipeline divides latents by this before decoding (1.0 for TAESD, which works on SD's
    /// scaled latents directly).
    pub scaling_factor: f64,
    pub shift_factor: f64,
}

impl Default for AutoencoderTinyConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            encoder_block_out_channels: vec![64, 64, 64, 64],
            decoder_block_out_channels: vec![64, 64, 64, 64],
            act_fn: "relu".into(),
            upsample_fn: "nearest".into(),
            latent_channels: 4,
            upsampling_scaling_factor: 2,
            num_encoder_blocks: vec![1, 3, 3, 3],
            num_decoder_blocks: vec![3, 3, 3, 1],
            scaling_factor: 1.0,
            shift_factor: 0.0,
        }
    }
}

impl AutoencoderTinyConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> ModelResult<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        let bad = |msg: String| Error::Config {
            path: path.to_path_buf(),
            msg,
        };
        let levels = cfg.encoder_block_out_channels.len();
        if levels == 0
            || cfg.num_encoder_blocks.len() != levels
            || cfg.decoder_block_out_channels.len() != cfg.num_decoder_blocks.len()
            || cfg.decoder_block_out_channels.is_empty()
        {
            return Err(bad("block lists of different lengths".into()));
        }
        if !matches!(cfg.act_fn.as_str(), "relu" | "silu" | "swish") {
            return Err(bad(format!(
                "act_fn `{}` (relu, silu or swish)",
                cfg.act_fn
            )));
        }
        if cfg.upsample_fn != "nearest" || cfg.upsampling_scaling_factor == 0 {
            return Err(bad("only nearest upsampling by a positive factor".into()));
        }
        let bad_width = cfg
            .encoder_block_out_channels
            .iter()
            .chain(&cfg.decoder_block_out_channels)
            .chain([&cfg.latent_channels, &cfg.in_channels, &cfg.out_channels])
            .any(|&c| c == 0 || c > crate::config::MAX_CHANNELS);
        if bad_width {
            return Err(bad("a channel count of 0 or beyond the limit".into()));
        }
        if cfg.scaling_factor <= 0.0 || !cfg.scaling_factor.is_finite() {
            return Err(bad("scaling_factor must be positive".into()));
        }
        Ok(cfg)
    }

    /// Pixels per latent pixel.
    pub fn downsample_factor(&self) -> usize {
        1 << (self.encoder_block_out_channels.len() - 1)
    }
}

fn activation(name: &str, x: &Tensor) -> Result<Tensor> {
    match name {
        "silu" | "swish" => candle_nn::ops::silu(x),
        _ => x.relu(),
    }
}

/// `AutoencoderTinyBlock`: three 3×3 convolutions with activations between, a 1×1 skip where the
/// width changes, and a ReLU over the sum.
#[derive(Debug, Clone)]
struct Block {
    convs: [Conv2d; 3],
    skip: Option<Conv2d>,
    act: String,
}

impl Block {
    fn new(vb: VarBuilder, in_ch: usize, out_ch: usize, act: &str) -> Result<Self> {
        let c = vb.pp("conv");
        Ok(Self {
            convs: [
                Conv2d::new(c.pp("0"), in_ch, out_ch, 3, 1, 1)?,
                Conv2d::new(c.pp("2"), out_ch, out_ch, 3, 1, 1)?,
                Conv2d::new(c.pp("4"), out_ch, out_ch, 3, 1, 1)?,
            ],
            skip: if in_ch != out_ch {
                Some(Conv2d::new_no_bias(vb.pp("skip"), in_ch, out_ch, 1, 1, 0)?)
            } else {
                None
            },
            act: act.to_string(),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = activation(&self.act, &self.convs[0].forward(x)?)?;
        let h = activation(&self.act, &self.convs[1].forward(&h)?)?;
        let h = self.convs[2].forward(&h)?;
        let skip = match &self.skip {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        (h + skip)?.relu()
    }
}

/// One entry of an `nn.Sequential` stack.
#[derive(Debug, Clone)]
enum Layer {
    Conv(Conv2d),
    Block(Block),
    Act,
    Upsample(usize),
}

#[derive(Debug, Clone)]
struct Stack {
    layers: Vec<Layer>,
    act: String,
}

impl Stack {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for layer in &self.layers {
            x = match layer {
                Layer::Conv(c) => c.forward(&x)?,
                Layer::Block(b) => b.forward(&x)?,
                Layer::Act => activation(&self.act, &x)?,
                Layer::Upsample(f) => {
                    let (_, _, h, w) = x.dims4()?;
                    x.upsample_nearest2d(h * f, w * f)?
                }
            };
        }
        Ok(x)
    }
}

/// The tiny autoencoder.
#[derive(Debug, Clone)]
pub struct AutoencoderTiny {
    encoder: Stack,
    decoder: Stack,
    pub config: AutoencoderTinyConfig,
}

impl AutoencoderTiny {
    /// Loads a diffusers `AutoencoderTiny` folder (`config.json` and its safetensors), strictly:
    /// a missing or misshapen tensor fails, and so do tensors no layer used.
    pub fn load(
        dir: &Path,
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> ModelResult<Self> {
        let cfg = AutoencoderTinyConfig::from_file(&dir.join("config.json"))?;
        crate::weights::load_folder_strict(
            dir,
            dtype,
            device,
            "an AutoencoderTiny",
            |_| false,
            |vb| Self::new(vb, &cfg),
        )
    }

    pub fn new(vb: VarBuilder, cfg: &AutoencoderTinyConfig) -> Result<Self> {
        let act = cfg.act_fn.clone();
        // EncoderTiny: a convolution per level (strided after the first), its blocks, then a
        // convolution to the latent channels.
        let e = vb.pp("encoder").pp("layers");
        let mut layers = Vec::new();
        for (i, (&ch, &n)) in cfg
            .encoder_block_out_channels
            .iter()
            .zip(&cfg.num_encoder_blocks)
            .enumerate()
        {
            let at = e.pp(layers.len().to_string());
            layers.push(Layer::Conv(if i == 0 {
                Conv2d::new(at, cfg.in_channels, ch, 3, 1, 1)?
            } else {
                Conv2d::new_no_bias(at, ch, ch, 3, 2, 1)?
            }));
            for _ in 0..n {
                let at = e.pp(layers.len().to_string());
                layers.push(Layer::Block(Block::new(at, ch, ch, &act)?));
            }
        }
        let last = *cfg.encoder_block_out_channels.last().unwrap_or(&1);
        let at = e.pp(layers.len().to_string());
        layers.push(Layer::Conv(Conv2d::new(
            at,
            last,
            cfg.latent_channels,
            3,
            1,
            1,
        )?));
        let encoder = Stack {
            layers,
            act: act.clone(),
        };
        // DecoderTiny: a convolution and activation, then per level its blocks, an upsampling
        // (not after the last) and a convolution (with a bias only on the last, to RGB).
        let d = vb.pp("decoder").pp("layers");
        let first = cfg.decoder_block_out_channels[0];
        let mut layers = vec![
            Layer::Conv(Conv2d::new(d.pp("0"), cfg.latent_channels, first, 3, 1, 1)?),
            Layer::Act,
        ];
        let levels = cfg.num_decoder_blocks.len();
        for (i, (&ch, &n)) in cfg
            .decoder_block_out_channels
            .iter()
            .zip(&cfg.num_decoder_blocks)
            .enumerate()
        {
            let is_final = i + 1 == levels;
            for _ in 0..n {
                let at = d.pp(layers.len().to_string());
                layers.push(Layer::Block(Block::new(at, ch, ch, &act)?));
            }
            if !is_final {
                layers.push(Layer::Upsample(cfg.upsampling_scaling_factor));
            }
            let at = d.pp(layers.len().to_string());
            layers.push(Layer::Conv(if is_final {
                Conv2d::new(at, ch, cfg.out_channels, 3, 1, 1)?
            } else {
                Conv2d::new_no_bias(at, ch, ch, 3, 1, 1)?
            }));
        }
        let decoder = Stack { layers, act };
        Ok(Self {
            encoder,
            decoder,
            config: cfg.clone(),
        })
    }

    /// Pixels `[B, 3, H, W]` in [-1, 1] → latents `[B, C, H/f, W/f]` (diffusers'
    /// `AutoencoderTiny.encode(x).latents`).
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        self.encoder.forward(&((x + 1.0)? / 2.0)?)
    }

    /// Latents → pixels in [-1, 1] (diffusers' `AutoencoderTiny.decode(z).sample`); the latents
    /// are clamped softly to ±3 first, as TAESD does.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = ((z / 3.0)?.tanh()? * 3.0)?;
        self.decoder.forward(&z)?.affine(2.0, -1.0)
    }

    /// The pipeline's latents (scaled as the U-Net sees them) → pixels: divided by this
    /// autoencoder's own scaling factor (1 for TAESD) and shift, then decoded.
    pub fn decode_scaled(&self, latents: &Tensor) -> Result<Tensor> {
        let z = ((latents / self.config.scaling_factor)? + self.config.shift_factor)?;
        self.decode(&z)
    }

    /// Pixels → the pipeline's latents (`encode(x) · scaling_factor`, as diffusers' pipelines
    /// scale what `retrieve_latents` returns).
    pub fn encode_scaled(&self, x: &Tensor) -> Result<Tensor> {
        (self.encode(x)? - self.config.shift_factor)? * self.config.scaling_factor
    }
}
