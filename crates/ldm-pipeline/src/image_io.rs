//! Images in and out: tensors to 8-bit RGB the way diffusers' `VaeImageProcessor` does it,
//! reading input images and masks, and PNGs with an A1111-style `parameters` text chunk,
//! written atomically (a temporary file, then a rename).

use crate::{Error, Result};
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

/// Reads an image as RGB, resized (Lanczos) to `width × height` if it differs, as
/// `[1, 3, H, W]` in [-1, 1] on `device`.
pub fn load_image(path: &Path, width: usize, height: usize, device: &Device) -> Result<Tensor> {
    let img = image::open(path).map_err(|e| image_err(path, e))?.to_rgb8();
    let img = fit(img, width, height);
    let data: Vec<f32> = img
        .as_raw()
        .iter()
        .map(|&v| v as f32 / 127.5 - 1.0)
        .collect();
    Ok(Tensor::from_vec(data, (1, height, width, 3), device)?
        .permute((0, 3, 1, 2))?
        .contiguous()?)
}

/// Reads a mask (white = repaint) as `[1, 1, H, W]` of 0 and 1 (diffusers binarises at ½).
pub fn load_mask(path: &Path, width: usize, height: usize, device: &Device) -> Result<Tensor> {
    let img: GrayImage = image::open(path)
        .map_err(|e| image_err(path, e))?
        .to_luma8();
    let img = fit(img, width, height);
    let data: Vec<f32> = img
        .as_raw()
        .iter()
        .map(|&v| if v as f32 / 255.0 >= 0.5 { 1.0 } else { 0.0 })
        .collect();
    Ok(Tensor::from_vec(data, (1, 1, height, width), device)?)
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
        {
            let mut enc = png::Encoder::new(&mut w, img.width(), img.height());
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            enc.add_text_chunk("parameters".into(), parameters.into())
                .map_err(|e| image_err(path, e))?;
            let mut writer = enc.write_header().map_err(|e| image_err(path, e))?;
            writer
                .write_image_data(img.as_raw())
                .map_err(|e| image_err(path, e))?;
            writer.finish().map_err(|e| image_err(path, e))?;
        }
        w.flush().map_err(io_err)?;
        w.get_ref().sync_all().map_err(io_err)?;
        std::fs::rename(&tmp, path).map_err(io_err)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The `parameters` text chunk of a PNG, if it has one.
pub fn read_parameters(path: &Path) -> Result<Option<String>> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder.read_info().map_err(|e| image_err(path, e))?;
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
