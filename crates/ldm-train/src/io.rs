//! Atomic file writes: a temporary file in the same folder, flushed, then renamed over the
//! target, so a crash or SIGKILL never leaves a half-written file behind.

use crate::Result;
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(result?)
}

/// Writes pretty JSON atomically.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    write_atomic(path, serde_json::to_string_pretty(value)?.as_bytes())
}

/// Writes named tensors as safetensors atomically.
pub fn write_safetensors(path: &Path, tensors: &[(String, candle_core::Tensor)]) -> Result<()> {
    let views: Vec<(&str, &candle_core::Tensor)> =
        tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let bytes = safetensors::serialize(views, None)?;
    write_atomic(path, &bytes)
}

/// Encodes `size × size` RGB bytes as a PNG and writes it atomically.
pub fn write_png(path: &Path, rgb: &[u8], size: usize) -> Result<()> {
    write_png_wh(path, rgb, size, size)
}

/// Encodes `width × height` RGB bytes as a PNG and writes it atomically.
pub fn write_png_wh(path: &Path, rgb: &[u8], width: usize, height: usize) -> Result<()> {
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc
            .write_header()
            .map_err(|e| crate::Error::Msg(format!("png: {e}")))?;
        w.write_image_data(rgb)
            .map_err(|e| crate::Error::Msg(format!("png: {e}")))?;
    }
    write_atomic(path, &bytes)
}
