//! PyTorch `.ckpt` / `.pt` files (a zip holding `data.pkl` and raw storages), read through a
//! restricted unpickler: the pickle is parsed as data only (candle's interpreter never runs
//! code) and every global it names must be one that a plain `torch.save` of tensors uses —
//! anything else (`os.system`, `builtins.eval`, …) is refused before any tensor is read.

use super::Checkpoint;
use crate::error::{Error, Result};
use candle_core::pickle::{Object, Stack};
use std::io::Read;
use std::path::Path;

/// The globals `torch.save` of a state dict pickles: the tensor rebuilders, the storages, and
/// the containers.
const ALLOWED: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "DoubleStorage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ShortStorage"),
    ("torch", "CharStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
];

fn ckpt_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Every global named anywhere in a parsed pickle.
fn globals(obj: &Object, out: &mut Vec<(String, String)>) {
    match obj {
        Object::Class {
            module_name,
            class_name,
        } => out.push((module_name.clone(), class_name.clone())),
        Object::Tuple(v) | Object::List(v) => v.iter().for_each(|o| globals(o, out)),
        Object::Dict(kv) => kv.iter().for_each(|(k, v)| {
            globals(k, out);
            globals(v, out)
        }),
        Object::Reduce { callable, args } | Object::Build { callable, args } => {
            globals(callable, out);
            globals(args, out)
        }
        Object::PersistentLoad(o) => globals(o, out),
        _ => {}
    }
}

/// Checks the pickle of a `.ckpt` against the allow-list; the error names the first intruder.
pub fn check_pickle(path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| ckpt_err(path, format!("not a PyTorch zip checkpoint: {e}")))?;
    let name = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n.ends_with("/data.pkl") || n == "data.pkl")
        .ok_or_else(|| ckpt_err(path, "no data.pkl inside"))?;
    let mut pickle = Vec::new();
    zip.by_name(&name)
        .and_then(|mut f| f.read_to_end(&mut pickle).map_err(Into::into))
        .map_err(|e| ckpt_err(path, format!("{name}: {e}")))?;
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut std::io::BufReader::new(pickle.as_slice()))
        .map_err(|e| ckpt_err(path, format!("unreadable pickle: {e}")))?;
    let obj = stack
        .finalize()
        .map_err(|e| ckpt_err(path, format!("unreadable pickle: {e}")))?;
    let mut found = Vec::new();
    globals(&obj, &mut found);
    if let Some((m, c)) = found
        .iter()
        .find(|(m, c)| !ALLOWED.contains(&(m.as_str(), c.as_str())))
    {
        return Err(ckpt_err(
            path,
            format!("refusing pickle global `{m}.{c}`: a checkpoint needs only tensors (never loaded, nothing run)"),
        ));
    }
    Ok(())
}

/// Reads a `.ckpt` (its `state_dict` entry, or the top-level dict) into an in-memory
/// safetensors checkpoint, after [`check_pickle`].
pub fn read(path: &Path) -> Result<Checkpoint> {
    read_with_key(path, "state_dict")
}

/// [`read`] with the tensors of the top-level dict's entry `key` when it has one (A1111's
/// embeddings keep theirs under `string_to_param`), else the top level's.
pub fn read_with_key(path: &Path, key: &str) -> Result<Checkpoint> {
    check_pickle(path)?;
    let tensors = candle_core::pickle::read_all_with_key(path, Some(key))
        .ok()
        .filter(|t| !t.is_empty())
        .map_or_else(|| candle_core::pickle::read_all(path), Ok)
        .map_err(|e| ckpt_err(path, format!("reading tensors: {e}")))?;
    let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), None)
        .map_err(|e| ckpt_err(path, e.to_string()))?;
    Checkpoint::from_buffer(path, bytes)
}
