//! The embedded default model: the Shapes World model trained by `ldm train shapes` (see the
//! README), compiled into the binary and unpacked once into the user's cache folder, so that
//! `ldm generate "a red circle on a blue background"` works on a fresh machine with no download.

use anyhow::Result;
use std::path::PathBuf;

/// The model files compiled in, and their unpacking.
#[cfg(feature = "embed")]
mod files {
    use anyhow::{Context, Result};
    use sha2::{Digest, Sha256};
    use std::path::PathBuf;

    macro_rules! fast_file {
        ($path:literal) => {
            (
                $path,
                include_bytes!(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../../models/shapes-fast/",
                    $path
                )) as &[u8],
            )
        };
    }

    macro_rules! model_file {
        ($path:literal) => {
            (
                $path,
                include_bytes!(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../../models/shapes/",
                    $path
                )) as &[u8],
            )
        };
    }

    /// The teacher's files shared by every embedded model (text encoder, tokenizer, autoencoder).
    const SHARED: &[(&str, &[u8])] = &[
        model_file!("tokenizer/vocab.json"),
        model_file!("tokenizer/merges.txt"),
        model_file!("tokenizer/tokenizer_config.json"),
        model_file!("tokenizer/special_tokens_map.json"),
        model_file!("text_encoder/config.json"),
        model_file!("text_encoder/model.safetensors"),
        model_file!("vae/config.json"),
        model_file!("vae/diffusion_pytorch_model.safetensors"),
    ];

    /// The teacher's own files.
    pub(super) const SHAPES: &[(&str, &[u8])] = &[
        model_file!("model_index.json"),
        model_file!("scheduler/scheduler_config.json"),
        model_file!("unet/config.json"),
        model_file!("unet/diffusion_pytorch_model.safetensors"),
    ];

    /// The distilled student's own files (`models/shapes-fast`): its U-Net, scheduler and index.
    pub(super) const SHAPES_FAST: &[(&str, &[u8])] = &[
        fast_file!("model_index.json"),
        fast_file!("scheduler/scheduler_config.json"),
        fast_file!("unet/config.json"),
        fast_file!("unet/diffusion_pytorch_model.safetensors"),
    ];

    fn cache_root() -> PathBuf {
        if let Some(dir) = std::env::var_os("LDM_CACHE") {
            return PathBuf::from(dir);
        }
        if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
            return PathBuf::from(dir).join("ldm");
        }
        match std::env::var_os("HOME") {
            Some(home) => PathBuf::from(home).join(".cache").join("ldm"),
            None => std::env::temp_dir().join("ldm"),
        }
    }

    /// An embedded model as a diffusers folder, unpacked on first use: `own` beside the shared
    /// files. The folder is named by the contents' hash and appears whole or not at all (written
    /// beside, then renamed).
    pub(super) fn unpack(name: &str, own: &[(&'static str, &'static [u8])]) -> Result<PathBuf> {
        let files: Vec<&(&str, &[u8])> = own.iter().chain(SHARED).collect();
        let mut hasher = Sha256::new();
        for (file, bytes) in &files {
            hasher.update(file.as_bytes());
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        }
        let digest = hasher.finalize();
        let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
        let root = cache_root();
        let dir = root.join(format!("{name}-{hex}"));
        if dir.join("model_index.json").is_file() {
            return Ok(dir);
        }
        let tmp = root.join(format!(".{name}-{hex}.tmp-{}", std::process::id()));
        let unpack = || -> Result<()> {
            for (file, bytes) in &files {
                let path = tmp.join(file);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(&path, bytes)?;
            }
            Ok(())
        };
        let result = unpack().and_then(|()| {
            std::fs::rename(&tmp, &dir).or_else(|e| {
                // Another process may have unpacked it first.
                if dir.join("model_index.json").is_file() {
                    Ok(())
                } else {
                    Err(e.into())
                }
            })
        });
        let _ = std::fs::remove_dir_all(&tmp);
        result.with_context(|| format!("unpacking the embedded model into {}", root.display()))?;
        Ok(dir)
    }
}

/// The embedded teacher as a diffusers folder (see [`named`]).
pub fn path() -> Result<PathBuf> {
    named("shapes").expect("shapes is an embedded model's name")
}

/// The embedded model called `name` (`shapes` or `shapes-fast`), if it is one.
#[cfg(feature = "embed")]
pub fn named(name: &str) -> Option<Result<PathBuf>> {
    match name {
        "shapes" => Some(files::unpack("shapes", files::SHAPES)),
        "shapes-fast" => Some(files::unpack("shapes-fast", files::SHAPES_FAST)),
        _ => None,
    }
}

/// A build without the `embed` feature (a smaller binary, e.g. to carry to a GPU machine)
/// finds the embedded models' folders in `models/` under the current folder or
/// `$LDM_MODELS`: the repository's own.
#[cfg(not(feature = "embed"))]
pub fn named(name: &str) -> Option<Result<PathBuf>> {
    if !matches!(name, "shapes" | "shapes-fast") {
        return None;
    }
    let root =
        std::env::var_os("LDM_MODELS").map_or_else(|| PathBuf::from("models"), PathBuf::from);
    let dir = root.join(name);
    Some(if dir.join("model_index.json").is_file() {
        Ok(dir)
    } else {
        Err(anyhow::anyhow!(
            "this ldm was built without its embedded models and {} holds no `{name}` model: \
             run it from the repository's root, set LDM_MODELS, or give --model DIR",
            root.display()
        ))
    })
}
