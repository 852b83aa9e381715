//! Textual-inversion embeddings (Gal et al. 2022): learned token vectors a prompt names by a
//! word. The files people have: A1111's `.safetensors` (`emb_params`, `[n, width]`), SDXL's
//! (`clip_l` and `clip_g`, one per text encoder) and diffusers' `learned_embeds`
//! (`{"<token>": [width]}` or `[n, width]`, `.safetensors` or `.bin`), and A1111's `.pt`
//! (`string_to_param`) through the restricted unpickler, which never runs code.

use crate::error::{Error, Result};
use crate::weights::Checkpoint;
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// One embedding file's vectors.
#[derive(Debug, Clone)]
pub struct TextualInversion {
    /// `[n, width]` for every text encoder (SDXL: `clip_l`, `clip_g`), or one set for whichever
    /// encoder has its width.
    pub per_encoder: Vec<Tensor>,
}

impl TextualInversion {
    /// Reads an embedding file.
    pub fn read(path: &Path, device: &Device) -> Result<Self> {
        let pickled = path
            .extension()
            .is_some_and(|x| matches!(x.to_string_lossy().to_lowercase().as_str(), "pt" | "bin"));
        // A1111's `.pt`: `{"string_to_param": {"*": vectors}, "name": …}`.
        let ckpt = if pickled {
            crate::weights::ckpt::read_with_key(path, "string_to_param")?
        } else {
            Checkpoint::open_file(path)?
        };
        let tensors = ckpt
            .tensors()
            .keys()
            .map(|k| Ok((k.clone(), ckpt.load(k, DType::F32, device)?)))
            .collect::<Result<std::collections::BTreeMap<_, _>>>()?;
        Self::from_tensors(&tensors, path)
    }

    /// The vectors among `tensors` (named as in an embedding file; `path` names it in errors):
    /// `clip_l` + `clip_g`, `emb_params`, or a single tensor of any name.
    pub fn from_tensors(
        tensors: &std::collections::BTreeMap<String, Tensor>,
        path: &Path,
    ) -> Result<Self> {
        let keys: Vec<&String> = tensors.keys().collect();
        let bad = |msg: String| Error::Checkpoint {
            path: path.to_path_buf(),
            msg,
        };
        let load = |key: &str| -> Result<Tensor> {
            let t = tensors[key].to_dtype(DType::F32)?;
            match t.rank() {
                1 => Ok(t.unsqueeze(0)?),
                2 if t.dim(0)? > 0 => Ok(t),
                _ => Err(bad(format!(
                    "`{key}` has shape {:?}, not [vectors, width]",
                    t.dims()
                ))),
            }
        };
        let has = |k: &str| tensors.contains_key(k);
        let per_encoder = if has("clip_l") && has("clip_g") {
            vec![load("clip_l")?, load("clip_g")?]
        } else if has("emb_params") {
            vec![load("emb_params")?]
        } else if keys.len() == 1 {
            vec![load(keys[0])?]
        } else {
            return Err(bad(format!(
                "not an embedding file (emb_params, clip_l + clip_g, or a single token's vectors); its tensors: {}",
                keys.iter().take(6).map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
            )));
        };
        Ok(Self { per_encoder })
    }
}
