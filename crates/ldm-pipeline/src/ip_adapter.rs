//! IP-Adapter in the pipelines, as diffusers' `load_ip_adapter` and
//! `prepare_ip_adapter_image_embeds` run it: the image prompt is prepared as CLIP's image
//! processor prepares it, encoded, projected into image tokens, and batched like the text
//! (negative first under guidance: for the base adapter zero embeddings, for Plus the
//! encoder's states of an all-zero image).

use crate::{Components, Error, Result};
use candle_core::{Device, Tensor};
use image::RgbImage;
use ldm_models::clip::ClipVisionModel;
use ldm_models::ip_adapter::IpAdapter;
use ldm_models::layers::attention::IpTokens;
use std::path::Path;

/// transformers' `CLIPImageProcessor` settings (`preprocessor_config.json`; its defaults
/// without one, as diffusers makes it).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipImageProcessor {
    pub shortest_edge: Option<usize>,
    pub crop: Option<(usize, usize)>,
    pub rescale: Option<f64>,
    pub normalize: Option<([f64; 3], [f64; 3])>,
}

impl Default for ClipImageProcessor {
    fn default() -> Self {
        Self {
            shortest_edge: Some(224),
            crop: Some((224, 224)),
            rescale: Some(1.0 / 255.0),
            normalize: Some((
                [0.48145466, 0.4578275, 0.40821073],
                [0.26862954, 0.26130258, 0.27577711],
            )),
        }
    }
}

impl ClipImageProcessor {
    /// Reads `dir/preprocessor_config.json`, or the defaults when there is none.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let text = std::fs::read_to_string(&path).map_err(io)?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::InvalidRequest(format!("{}: {e}", path.display())))?;
        let d = Self::default();
        let flag = |k: &str| v.get(k).and_then(|x| x.as_bool()).unwrap_or(true);
        let side = |x: &serde_json::Value, k: &str| {
            x.as_u64()
                .or_else(|| x.get(k).and_then(|y| y.as_u64()))
                .map(|n| n as usize)
        };
        let shortest_edge = match v.get("size") {
            Some(s) => side(s, "shortest_edge"),
            None => d.shortest_edge,
        };
        let crop = match v.get("crop_size") {
            Some(s) => side(s, "height").zip(side(s, "width")),
            None => d.crop,
        };
        let triple = |k: &str, dflt: [f64; 3]| -> [f64; 3] {
            v.get(k)
                .and_then(|x| x.as_array())
                .filter(|a| a.len() == 3)
                .map(|a| [0, 1, 2].map(|i| a[i].as_f64().unwrap_or(dflt[i])))
                .unwrap_or(dflt)
        };
        let (mean, std) = d.normalize.unwrap_or_default();
        Ok(Self {
            shortest_edge: shortest_edge.filter(|_| flag("do_resize")),
            crop: crop.filter(|_| flag("do_center_crop")),
            rescale: flag("do_rescale").then(|| {
                v.get("rescale_factor")
                    .and_then(|x| x.as_f64())
                    .unwrap_or(1.0 / 255.0)
            }),
            normalize: flag("do_normalize")
                .then(|| (triple("image_mean", mean), triple("image_std", std))),
        })
    }

    /// `[1, 3, H, W]` pixel values: the shortest side resized (bicubic), the centre cropped,
    /// rescaled and normalised.
    pub fn preprocess(&self, img: &RgbImage, device: &Device) -> Result<Tensor> {
        let mut img = img.clone();
        if let Some(edge) = self.shortest_edge {
            let (w, h) = (img.width() as usize, img.height() as usize);
            let (nw, nh) = if w <= h {
                (edge, edge * h / w)
            } else {
                (edge * w / h, edge)
            };
            if (nw, nh) != (w, h) {
                img = image::imageops::resize(
                    &img,
                    nw as u32,
                    nh as u32,
                    image::imageops::FilterType::CatmullRom,
                );
            }
        }
        if let Some((ch, cw)) = self.crop {
            let (w, h) = (img.width() as usize, img.height() as usize);
            if ch > h || cw > w {
                return Err(Error::InvalidRequest(format!(
                    "a {w}×{h} image prompt is smaller than the encoder's {cw}×{ch} crop"
                )));
            }
            let (top, left) = ((h - ch) / 2, (w - cw) / 2);
            img = image::imageops::crop_imm(&img, left as u32, top as u32, cw as u32, ch as u32)
                .to_image();
        }
        let (w, h) = (img.width() as usize, img.height() as usize);
        let scale = self.rescale.unwrap_or(1.0);
        let mut data = vec![0f32; 3 * h * w];
        for (i, p) in img.pixels().enumerate() {
            for c in 0..3 {
                let mut x = p.0[c] as f64 * scale;
                if let Some((mean, std)) = self.normalize {
                    x = (x - mean[c]) / std[c];
                }
                data[c * h * w + i] = x as f32;
            }
        }
        Ok(Tensor::from_vec(data, (1, 3, h, w), device)?)
    }
}

/// A loaded IP-Adapter: the image encoder, its preprocessing and the adapter's projection (its
/// key/value projections live in the U-Net's cross-attention layers).
#[derive(Debug, Clone)]
pub struct IpAdapterState {
    pub encoder: ClipVisionModel,
    pub processor: ClipImageProcessor,
    pub adapter: IpAdapter,
}

impl IpAdapterState {
    /// The image tokens of `image` at `scale`, batched for `rows` images (negative first when
    /// `guided`).
    pub fn tokens(
        &self,
        image: &RgbImage,
        scale: f64,
        rows: usize,
        guided: bool,
        device: &Device,
    ) -> Result<IpTokens> {
        let pixels = self.processor.preprocess(image, device)?;
        let encoded = |px: &Tensor| -> Result<Tensor> {
            let out = self.encoder.forward(px)?;
            Ok(if self.adapter.uses_hidden_states() {
                let n = out.hidden_states.len();
                out.hidden_states[n - 2].clone()
            } else {
                out.image_embeds.ok_or_else(|| {
                    Error::InvalidRequest(
                        "the image encoder has no projection (CLIPVisionModelWithProjection)"
                            .into(),
                    )
                })?
            })
        };
        let positive = encoded(&pixels)?;
        let mut batch = vec![positive.clone(); rows];
        if guided {
            let negative = if self.adapter.uses_hidden_states() {
                encoded(&pixels.zeros_like()?)?
            } else {
                positive.zeros_like()?
            };
            let mut both = vec![negative; rows];
            both.append(&mut batch);
            batch = both;
        }
        let embeds = Tensor::cat(&batch, 0)?;
        Ok(IpTokens {
            tokens: self.adapter.project(&embeds)?,
            scale,
        })
    }
}

impl Components {
    /// Loads an IP-Adapter file and the CLIP image encoder folder it needs, and gives the
    /// U-Net's cross-attention layers its key/value projections. Apply LoRA files first: they
    /// rebuild the U-Net.
    pub fn use_ip_adapter(&mut self, file: &Path, encoder_dir: &Path) -> Result<()> {
        let encoder = ClipVisionModel::load(encoder_dir, self.dtype, &self.device)?;
        let processor = ClipImageProcessor::from_dir(encoder_dir)?;
        let adapter = IpAdapter::load(file, &mut self.unet, self.dtype, &self.device)?;
        self.ip_adapter = Some(IpAdapterState {
            encoder,
            processor,
            adapter,
        });
        Ok(())
    }
}
