//! T2I-Adapter (Mou et al. 2023), as diffusers' `T2IAdapter` computes it: a small network that
//! turns a conditioning image (sketch, depth, pose…) into one feature map per U-Net down block,
//! which the U-Net adds inside its down path (`down_intrablock_additional_residuals`). Three
//! architectures: `full_adapter` (SD1/SD2), `full_adapter_xl` (SDXL) and `light_adapter`.

use crate::error::{Error, Result as ModelResult};
use crate::layers::{conv2d, Conv2d};
use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};
use serde::Deserialize;
use std::path::Path;

/// The adapter's architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterType {
    Full,
    FullXl,
    Light,
}

/// diffusers' `T2IAdapter` config.
#[derive(Debug, Clone, PartialEq)]
pub struct T2IAdapterConfig {
    pub in_channels: usize,
    pub channels: Vec<usize>,
    pub num_res_blocks: usize,
    pub downscale_factor: usize,
    pub adapter_type: AdapterType,
}

#[derive(Deserialize)]
#[serde(default)]
struct ConfigJson {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
    in_channels: usize,
    channels: Vec<usize>,
    num_res_blocks: usize,
    downscale_factor: usize,
    adapter_type: String,
}

impl Default for ConfigJson {
    fn default() -> Self {
        Self {
            class_name: None,
            in_channels: 3,
            channels: vec![320, 640, 1280, 1280],
            num_res_blocks: 2,
            downscale_factor: 8,
            adapter_type: "full_adapter".into(),
        }
    }
}

impl T2IAdapterConfig {
    /// Reads and validates a `T2IAdapter` `config.json`.
    pub fn from_file(path: &Path) -> ModelResult<Self> {
        let j: ConfigJson = crate::config::read_json_with_nulls(path, &[])?;
        if j.class_name.as_deref().is_some_and(|c| c != "T2IAdapter") {
            return Err(Error::config(
                path,
                format!("a `{}`, not a T2IAdapter", j.class_name.unwrap_or_default()),
            ));
        }
        let adapter_type = match j.adapter_type.as_str() {
            "full_adapter" => AdapterType::Full,
            "full_adapter_xl" => AdapterType::FullXl,
            "light_adapter" => AdapterType::Light,
            other => {
                return Err(Error::config(
                    path,
                    format!("unsupported adapter_type `{other}`"),
                ))
            }
        };
        use crate::config::{check_range, MAX_CHANNELS};
        check_range(path, "channels (count)", j.channels.len(), 1, 8)?;
        for &c in &j.channels {
            check_range(path, "channels", c, 4, MAX_CHANNELS)?;
        }
        check_range(path, "in_channels", j.in_channels, 1, 16)?;
        check_range(path, "num_res_blocks", j.num_res_blocks, 1, 16)?;
        check_range(path, "downscale_factor", j.downscale_factor, 1, 64)?;
        Ok(Self {
            in_channels: j.in_channels,
            channels: j.channels,
            num_res_blocks: j.num_res_blocks,
            downscale_factor: j.downscale_factor,
            adapter_type,
        })
    }

    /// How much smaller than the image its last feature map is.
    pub fn total_downscale_factor(&self) -> usize {
        let n = self.channels.len() as u32;
        match self.adapter_type {
            AdapterType::Full => self.downscale_factor * 2usize.pow(n - 1),
            AdapterType::FullXl => self.downscale_factor * 2,
            AdapterType::Light => self.downscale_factor * 2usize.pow(n),
        }
    }
}

/// `[B, C, H, W]` → `[B, C·r², H/r, W/r]` (PyTorch's `PixelUnshuffle`).
fn pixel_unshuffle(x: &Tensor, r: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if !h.is_multiple_of(r) || !w.is_multiple_of(r) {
        return Err(candle_core::Error::Msg(format!(
            "a {h}×{w} adapter image does not divide into {r}×{r} blocks"
        )));
    }
    x.reshape((b, c, h / r, r, w / r, r))?
        .permute((0, 1, 3, 5, 2, 4))?
        .reshape((b, c * r * r, h / r, w / r))
}

/// `AvgPool2d(2, stride 2, ceil_mode=True)`: an odd edge's last window averages the values it
/// covers.
fn avg_pool_ceil(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h.is_multiple_of(2) && w.is_multiple_of(2) {
        return x.avg_pool2d(2);
    }
    let pad = |t: &Tensor| -> Result<Tensor> {
        let t = if h % 2 == 1 {
            t.pad_with_zeros(2, 0, 1)?
        } else {
            t.clone()
        };
        if w % 2 == 1 {
            t.pad_with_zeros(3, 0, 1)
        } else {
            Ok(t)
        }
    };
    let sums = pad(x)?.avg_pool2d(2)?;
    let counts = pad(&x.ones_like()?)?.avg_pool2d(2)?;
    sums / counts
}

/// `AdapterResnetBlock` (3×3, ReLU, 1×1) or `LightAdapterResnetBlock` (3×3, ReLU, 3×3), with
/// the identity added.
#[derive(Debug, Clone)]
struct ResBlock {
    block1: Conv2d,
    block2: Conv2d,
}

impl ResBlock {
    fn new(vb: VarBuilder, c: usize, k2: usize) -> Result<Self> {
        Ok(Self {
            block1: conv2d(vb.pp("block1"), c, c, 3, 1, 1)?,
            block2: conv2d(vb.pp("block2"), c, c, k2, 1, k2 / 2)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.block2.forward(&self.block1.forward(x)?.relu()?)? + x
    }
}

/// `AdapterBlock` / `LightAdapterBlock`: an optional 2×2 average pool, a 1×1 projection, the
/// residual blocks, and (light) a 1×1 projection out.
#[derive(Debug, Clone)]
struct Block {
    down: bool,
    in_conv: Option<Conv2d>,
    resnets: Vec<ResBlock>,
    out_conv: Option<Conv2d>,
}

impl Block {
    fn full(vb: VarBuilder, cin: usize, cout: usize, n: usize, down: bool) -> Result<Self> {
        let in_conv = if cin != cout {
            Some(conv2d(vb.pp("in_conv"), cin, cout, 1, 1, 0)?)
        } else {
            None
        };
        let resnets = (0..n)
            .map(|i| ResBlock::new(vb.pp("resnets").pp(i), cout, 1))
            .collect::<Result<_>>()?;
        Ok(Self {
            down,
            in_conv,
            resnets,
            out_conv: None,
        })
    }

    fn light(vb: VarBuilder, cin: usize, cout: usize, n: usize, down: bool) -> Result<Self> {
        let mid = cout / 4;
        Ok(Self {
            down,
            in_conv: Some(conv2d(vb.pp("in_conv"), cin, mid, 1, 1, 0)?),
            resnets: (0..n)
                .map(|i| ResBlock::new(vb.pp("resnets").pp(i), mid, 3))
                .collect::<Result<_>>()?,
            out_conv: Some(conv2d(vb.pp("out_conv"), mid, cout, 1, 1, 0)?),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = if self.down {
            avg_pool_ceil(x)?
        } else {
            x.clone()
        };
        if let Some(c) = &self.in_conv {
            x = c.forward(&x)?;
        }
        for r in &self.resnets {
            x = r.forward(&x)?;
        }
        match &self.out_conv {
            Some(c) => c.forward(&x),
            None => Ok(x),
        }
    }
}

/// diffusers' `T2IAdapter`.
#[derive(Debug, Clone)]
pub struct T2IAdapter {
    conv_in: Option<Conv2d>,
    body: Vec<Block>,
    pub config: T2IAdapterConfig,
}

impl T2IAdapter {
    /// Builds the adapter; `vb` paths are its checkpoint's keys (under `adapter.`).
    pub fn new(vb: VarBuilder, cfg: &T2IAdapterConfig) -> Result<Self> {
        let vb = vb.pp("adapter");
        let ch = &cfg.channels;
        let n = cfg.num_res_blocks;
        let cin = cfg.in_channels * cfg.downscale_factor * cfg.downscale_factor;
        let b = |i: usize| vb.pp("body").pp(i);
        let (conv_in, body) = match cfg.adapter_type {
            AdapterType::Full => {
                let mut body = vec![Block::full(b(0), ch[0], ch[0], n, false)?];
                for i in 1..ch.len() {
                    body.push(Block::full(b(i), ch[i - 1], ch[i], n, true)?);
                }
                (Some(conv2d(vb.pp("conv_in"), cin, ch[0], 3, 1, 1)?), body)
            }
            AdapterType::FullXl => {
                let mut body = Vec::new();
                for i in 0..ch.len() {
                    body.push(match i {
                        0 => Block::full(b(0), ch[0], ch[0], n, false)?,
                        1 => Block::full(b(1), ch[0], ch[1], n, false)?,
                        2 => Block::full(b(2), ch[1], ch[2], n, true)?,
                        _ => Block::full(b(i), ch[i], ch[i], n, false)?,
                    });
                }
                (Some(conv2d(vb.pp("conv_in"), cin, ch[0], 3, 1, 1)?), body)
            }
            AdapterType::Light => {
                let mut body = vec![Block::light(b(0), cin, ch[0], n, false)?];
                for i in 0..ch.len() - 1 {
                    body.push(Block::light(b(i + 1), ch[i], ch[i + 1], n, true)?);
                }
                let last = ch[ch.len() - 1];
                body.push(Block::light(b(ch.len()), last, last, n, true)?);
                (None, body)
            }
        };
        Ok(Self {
            conv_in,
            body,
            config: cfg.clone(),
        })
    }

    /// Loads a diffusers `T2IAdapter` folder, strictly (every tensor used, none missing).
    pub fn load(
        dir: &Path,
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> ModelResult<Self> {
        let cfg = T2IAdapterConfig::from_file(&dir.join("config.json"))?;
        crate::weights::load_folder_strict(
            dir,
            dtype,
            device,
            "a T2IAdapter",
            |_| false,
            |vb| Self::new(vb, &cfg),
        )
    }

    /// The feature maps of an image `[B, in_channels, H, W]` in [0, 1], one per body block.
    pub fn forward(&self, image: &Tensor) -> Result<Vec<Tensor>> {
        let mut x = pixel_unshuffle(image, self.config.downscale_factor)?;
        if let Some(c) = &self.conv_in {
            x = c.forward(&x)?;
        }
        let mut features = Vec::with_capacity(self.body.len());
        for block in &self.body {
            x = block.forward(&x)?;
            features.push(x.clone());
        }
        Ok(features)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// PixelUnshuffle's channel order: out[c·r² + i·r + j, h, w] = in[c, h·r + i, w·r + j].
    #[test]
    fn pixel_unshuffle_orders_channels_as_pytorch() -> Result<()> {
        let x = Tensor::arange(0f32, 32.0, &Device::Cpu)?.reshape((1, 2, 4, 4))?;
        let y = pixel_unshuffle(&x, 2)?;
        assert_eq!(y.dims(), [1, 8, 2, 2]);
        let y = y.squeeze(0)?.to_vec3::<f32>()?;
        // channel 1·4 + 1·2 + 0 = 6: in[1, 2h + 1, 2w]
        assert_eq!(y[6][0][0], 16.0 + 4.0);
        assert_eq!(y[6][1][1], 16.0 + 3.0 * 4.0 + 2.0);
        Ok(())
    }

    /// Ceil-mode average pooling over an odd edge averages the values the last window covers.
    #[test]
    fn odd_edges_pool_what_they_cover() -> Result<()> {
        let x = Tensor::new(
            &[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]],
            &Device::Cpu,
        )?
        .reshape((1, 1, 3, 3))?;
        let y = avg_pool_ceil(&x)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(y, [3.0, 4.5, 7.5, 9.0]);
        Ok(())
    }
}
