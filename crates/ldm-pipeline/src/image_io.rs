//! Images in and out: tensors to 8-bit RGB the way diffusers' `VaeImageProcessor` does it,
//! reading input images and masks, and PNGs with an A1111-style `parameters` text chunk,
//! written atomically (a temporary file, then a rename).

use crate::{Error, Request, Result};
use candle_core::{DType, Device, Tensor};
use image::{GrayImage, RgbImage};
use std::io::Write;
use std::path::{Path, PathBuf};

/// `[B, 3, H, W]` in [-1, 1] → RGB images: `round(clamp(x/2 + ½, 0, 1) · 255)`.
pub fn to_images(pixels: &Tensor) -> Result<Vec<RgbImage>> {
    let (b, c, h, w) = pixels.dims4()?;
    if c != 3 {
        return Err(Error::InvalidRequest(format!(
            "expected 3 image channels, got {c}"
        )));
    }
    let u8s = ((pixels.to_dtype(DType::F32)? / 2.0)? + 0.5)?
        .clamp(0f32, 1f32)?
        .affine(255.0, 0.0)?
        .round()?
        .to_dtype(DType::U8)?
        .permute((0, 2, 3, 1))?
        .contiguous()?; // [B, H, W, 3]
    (0..b)
        .map(|i| {
            let data: Vec<u8> = u8s.get(i)?.flatten_all()?.to_vec1()?;
            RgbImage::from_raw(w as u32, h as u32, data)
                .ok_or_else(|| Error::InvalidRequest("image buffer has the wrong size".into()))
        })
        .collect()
}

fn image_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Image {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

/// Resizes (Lanczos) to `width × height` where the size differs.
fn fit<P: image::Pixel<Subpixel = u8> + 'static>(
    img: image::ImageBuffer<P, Vec<u8>>,
    width: usize,
    height: usize,
) -> image::ImageBuffer<P, Vec<u8>> {
    if img.width() as usize == width && img.height() as usize == height {
        return img;
    }
    image::imageops::resize(
        &img,
        width as u32,
        height as u32,
        image::imageops::FilterType::Lanczos3,
    )
}

/// An image resized (Lanczos) to `width × height` if it differs, as `[1, C, H, W]` of
/// `level(v)` for every 8-bit value.
fn to_tensor<P: image::Pixel<Subpixel = u8> + 'static>(
    img: image::ImageBuffer<P, Vec<u8>>,
    width: usize,
    height: usize,
    device: &Device,
    level: impl Fn(u8) -> f32,
) -> Result<Tensor> {
    let img = fit(img, width, height);
    let channels = P::CHANNEL_COUNT as usize;
    let data: Vec<f32> = img.as_raw().iter().map(|&v| level(v)).collect();
    Ok(
        Tensor::from_vec(data, (1, height, width, channels), device)?
            .permute((0, 3, 1, 2))?
            .contiguous()?,
    )
}

/// An RGB image, resized (Lanczos) to `width × height` if it differs, as `[1, 3, H, W]` in
/// [-1, 1] on `device`.
pub fn image_to_tensor(
    img: RgbImage,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    to_tensor(img, width, height, device, |v| v as f32 / 127.5 - 1.0)
}

/// A mask (white = repaint), resized to `width × height`, as `[1, 1, H, W]` of 0 and 1
/// (diffusers binarises at ½).
pub fn mask_to_tensor(
    img: GrayImage,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    to_tensor(img, width, height, device, |v| {
        if v as f32 / 255.0 >= 0.5 {
            1.0
        } else {
            0.0
        }
    })
}

/// Reads an image file as [`image_to_tensor`] takes it.
pub fn load_image(path: &Path, width: usize, height: usize, device: &Device) -> Result<Tensor> {
    let img = image::open(path).map_err(|e| image_err(path, e))?.to_rgb8();
    image_to_tensor(img, width, height, device)
}

/// A ControlNet's conditioning image, resized (Lanczos) to `width × height` if it differs, as
/// `[1, 3, H, W]` in [0, 1] (diffusers' `prepare_image`: no normalisation).
pub fn control_to_tensor(
    img: RgbImage,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    to_tensor(img, width, height, device, |v| v as f32 / 255.0)
}

/// Reads a conditioning image file as [`control_to_tensor`] takes it.
pub fn load_control(path: &Path, width: usize, height: usize, device: &Device) -> Result<Tensor> {
    let img = image::open(path).map_err(|e| image_err(path, e))?.to_rgb8();
    control_to_tensor(img, width, height, device)
}

/// A one-channel conditioning image (sketch T2I-Adapters), `[1, 1, H, W]` in [0, 1].
pub fn load_control_gray(
    path: &Path,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    let img = image::open(path)
        .map_err(|e| image_err(path, e))?
        .to_luma8();
    to_tensor(img, width, height, device, |v| v as f32 / 255.0)
}

/// Reads a mask file as [`mask_to_tensor`] takes it.
pub fn load_mask(path: &Path, width: usize, height: usize, device: &Device) -> Result<Tensor> {
    let img: GrayImage = image::open(path)
        .map_err(|e| image_err(path, e))?
        .to_luma8();
    mask_to_tensor(img, width, height, device)
}

/// Encodes `img` as PNG bytes with a `parameters` text chunk (A1111's infotext).
pub fn encode_png(
    img: &RgbImage,
    parameters: &str,
    out: &mut impl Write,
) -> std::result::Result<(), png::EncodingError> {
    let mut enc = png::Encoder::new(out, img.width(), img.height());
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    if !parameters.is_empty() {
        enc.add_text_chunk("parameters".into(), parameters.into())?;
    }
    let mut writer = enc.write_header()?;
    writer.write_image_data(img.as_raw())?;
    writer.finish()
}

/// Writes `img` as a PNG with a `parameters` text chunk, atomically: a temporary file in the
/// target's folder, then a rename, so a failure never leaves a half-written image.
pub fn save_png(img: &RgbImage, parameters: &str, path: &Path) -> Result<()> {
    let io_err = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| image_err(path, "not a file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let file = std::fs::File::create(&tmp).map_err(io_err)?;
        let mut w = std::io::BufWriter::new(file);
        encode_png(img, parameters, &mut w).map_err(|e| image_err(path, e))?;
        w.flush().map_err(io_err)?;
        w.get_ref().sync_all().map_err(io_err)?;
        std::fs::rename(&tmp, path).map_err(io_err)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The `parameters` text chunk of a PNG file, if it has one.
pub fn read_parameters(path: &Path) -> Result<Option<String>> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    png_parameters(std::io::BufReader::new(file)).map_err(|e| image_err(path, e))
}

/// The `parameters` text chunk of PNG data (tEXt, iTXt or zTXt), if it has one.
pub fn png_parameters<R: std::io::BufRead + std::io::Seek>(
    data: R,
) -> std::result::Result<Option<String>, png::DecodingError> {
    let reader = png::Decoder::new(data).read_info()?;
    let info = reader.info();
    let text = info
        .uncompressed_latin1_text
        .iter()
        .find(|c| c.keyword == "parameters")
        .map(|c| c.text.clone())
        .or_else(|| {
            info.utf8_text
                .iter()
                .find(|c| c.keyword == "parameters")
                .and_then(|c| c.get_text().ok())
        })
        .or_else(|| {
            info.compressed_latin1_text
                .iter()
                .find(|c| c.keyword == "parameters")
                .and_then(|c| c.get_text().ok())
        });
    Ok(text)
}

/// A1111's infotext (the PNG `parameters` chunk): prompt, negative prompt, then the settings
/// line.
pub fn infotext(req: &Request, sampler: &str, schedule: &str, model: &str, hash: &str) -> String {
    let seed = req.seed;
    let mut text = req.prompt.clone();
    if let Some(neg) = &req.negative_prompt {
        text.push_str(&format!("\nNegative prompt: {neg}"));
    }
    text.push_str(&format!(
        "\nSteps: {}, Sampler: {sampler}, Schedule type: {schedule}, CFG scale: {}, Seed: {seed}, Size: {}x{}, Model hash: {hash}, Model: {model}",
        req.steps, req.guidance_scale, req.width, req.height
    ));
    if let Some(eta) = req.eta {
        text.push_str(&format!(", Eta: {eta}"));
    }
    if req.guidance_rescale != 0.0 {
        // As A1111's CFG Rescale extension writes it.
        text.push_str(&format!(", CFG Rescale phi: {}", req.guidance_rescale));
    }
    if req.init_image.is_some() {
        text.push_str(&format!(", Denoising strength: {}", req.strength));
    }
    text
}
