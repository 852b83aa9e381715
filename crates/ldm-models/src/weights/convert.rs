//! Converting a diffusers folder's weights to another float dtype (`ldm convert`): every
//! `.safetensors` file is rewritten with its floating-point tensors cast, configs and tokenizer
//! files are copied; each file is written beside its target and renamed into place.

use crate::error::{Error, Result};
use candle_core::{DType, Device};
use std::path::Path;

/// Files of a model folder that belong to the model (checkpoints and training state excluded).
fn model_file(name: &str) -> bool {
    name.ends_with(".safetensors") || name.ends_with(".json") || name.ends_with(".txt")
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::Msg(format!("writing {}: {e}", path.display()))
        })
}

/// Copies the model folder `src` to `dst` with float weights cast to `dtype`. Subfolders whose
/// names end in `-train` (training checkpoints) are left out.
pub fn convert_folder(src: &Path, dst: &Path, dtype: DType) -> Result<()> {
    if !src.join("model_index.json").is_file() {
        return Err(Error::Msg(format!(
            "{}: not a diffusers folder (no model_index.json)",
            src.display()
        )));
    }
    copy_dir(src, dst, dtype)
}

fn copy_dir(src: &Path, dst: &Path, dtype: DType) -> Result<()> {
    let io = |e: std::io::Error, p: &Path| Error::Msg(format!("{}: {e}", p.display()));
    std::fs::create_dir_all(dst).map_err(|e| io(e, dst))?;
    let mut entries: Vec<_> = std::fs::read_dir(src)
        .map_err(|e| io(e, src))?
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().to_string();
        let path = entry.path();
        if path.is_dir() {
            if !name.ends_with("-train") && !name.starts_with('.') {
                copy_dir(&path, &dst.join(&name), dtype)?;
            }
        } else if name.ends_with(".safetensors") {
            let tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
            let mut cast = Vec::with_capacity(tensors.len());
            for (k, t) in tensors {
                let t = if t.dtype().is_float() {
                    t.to_dtype(dtype)?
                } else {
                    t
                };
                cast.push((k, t));
            }
            cast.sort_by(|a, b| a.0.cmp(&b.0));
            let views: Vec<(&str, &candle_core::Tensor)> =
                cast.iter().map(|(k, t)| (k.as_str(), t)).collect();
            let bytes = safetensors::serialize(views, None)
                .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
            write_atomic(&dst.join(&name), &bytes)?;
        } else if model_file(&name) {
            let bytes = std::fs::read(&path).map_err(|e| io(e, &path))?;
            write_atomic(&dst.join(&name), &bytes)?;
        }
    }
    Ok(())
}
