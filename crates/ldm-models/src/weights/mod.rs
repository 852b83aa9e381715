//! Weight loading: memory-mapped safetensors checkpoints behind a strict `VarBuilder` backend.
//!
//! Model constructors ask for tensors by their checkpoint key and shape; the [`Weights`] backend
//! answers from one or more safetensors files, converts to the compute dtype, and records what
//! was used. Loading is strict: a missing tensor or a wrong shape is an error naming the file, the
//! tensor and both shapes, and [`Weights::unused`] lists what the checkpoint held but no module
//! asked for. Renaming of other key layouts lives in [`rename`], never in model code.

pub mod ckpt;
pub mod convert;
pub mod init;
pub mod original;
pub mod rename;

use crate::error::{Error, Result};
use candle_core::{safetensors::Load, DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use memmap2::Mmap;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Where one tensor lives: which file, its stored dtype and shape, and its byte range.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub file: usize,
    pub dtype: safetensors::Dtype,
    /// The shape served (a reshape of the stored one where a layout conversion asked for it).
    pub shape: Vec<usize>,
    start: usize,
    end: usize,
    /// Served transposed (2-D tensors stored the other way round, e.g. OpenCLIP's projection).
    pub transpose: bool,
}

impl TensorEntry {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The same bytes viewed with another shape of equal size.
    pub fn reshaped(&self, shape: Vec<usize>) -> Option<Self> {
        (shape.iter().product::<usize>() == self.numel()).then(|| Self {
            shape,
            ..self.clone()
        })
    }

    /// Rows `from..from + count` of the first dimension (a contiguous byte range).
    pub fn rows(&self, from: usize, count: usize) -> Option<Self> {
        let rows = *self.shape.first()?;
        if from + count > rows || self.transpose {
            return None;
        }
        let row_bytes = (self.end - self.start) / rows.max(1);
        let mut shape = self.shape.clone();
        shape[0] = count;
        Some(Self {
            shape,
            start: self.start + from * row_bytes,
            end: self.start + (from + count) * row_bytes,
            ..self.clone()
        })
    }

    /// The transpose of a 2-D tensor.
    pub fn transposed(&self) -> Option<Self> {
        match self.shape.as_slice() {
            [a, b] => Some(Self {
                shape: vec![*b, *a],
                transpose: !self.transpose,
                ..self.clone()
            }),
            _ => None,
        }
    }
}

/// One or more memory-mapped safetensors files, validated and indexed by (possibly renamed) key.
/// A checkpoint's bytes: memory-mapped, or read into memory (converted `.ckpt` files).
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

pub struct Checkpoint {
    files: Arc<Vec<(PathBuf, Bytes)>>,
    tensors: BTreeMap<String, TensorEntry>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field(
                "files",
                &self.files.iter().map(|f| &f.0).collect::<Vec<_>>(),
            )
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Checkpoint {
    /// Maps and validates `paths` (header, offsets and sizes) and indexes their tensors.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        for path in paths {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the map is read-only; a file changed under us can only yield wrong values.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            files.push((path.clone(), Bytes::Mapped(mmap)));
        }
        Self::index(files)
    }

    /// One checkpoint file: `.safetensors` memory-mapped, or a pickled PyTorch file (`.ckpt`,
    /// `.pt`, `.pth`, `.bin`) through the restricted reader of [`ckpt`].
    pub fn open_file(file: &Path) -> Result<Self> {
        let ext = file
            .extension()
            .map(|e| e.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        if ["ckpt", "pt", "pth", "bin"].contains(&ext.as_str()) {
            ckpt::read(file)
        } else {
            Self::open(&[file.to_path_buf()])
        }
    }

    /// A checkpoint over safetensors bytes held in memory; `path` names it in messages.
    pub fn from_buffer(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        Self::index(vec![(path.to_path_buf(), Bytes::Owned(bytes))])
    }

    fn index(files: Vec<(PathBuf, Bytes)>) -> Result<Self> {
        let mut tensors = BTreeMap::new();
        for (index, (path, bytes)) in files.iter().enumerate() {
            let (header_len, metadata) =
                safetensors::SafeTensors::read_metadata(bytes).map_err(|e| Error::Checkpoint {
                    path: path.clone(),
                    msg: describe_safetensors_error(&e, bytes.len()),
                })?;
            let data_start = 8 + header_len;
            for (name, info) in metadata.tensors() {
                let key = name;
                let entry = TensorEntry {
                    file: index,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + info.data_offsets.0,
                    end: data_start + info.data_offsets.1,
                    transpose: false,
                };
                if tensors.insert(key.clone(), entry).is_some() {
                    return Err(Error::Checkpoint {
                        path: path.clone(),
                        msg: format!("tensor `{key}` appears twice in the checkpoint"),
                    });
                }
            }
        }
        Ok(Self {
            files: Arc::new(files),
            tensors,
        })
    }

    /// A checkpoint over the same files with another set of (renamed, resliced) entries.
    pub fn with_tensors(&self, tensors: BTreeMap<String, TensorEntry>) -> Self {
        Self {
            files: Arc::clone(&self.files),
            tensors,
        }
    }

    /// Renames every key with `f` (see [`rename`] for the layouts we translate).
    pub fn map_keys(&mut self, f: impl Fn(&str) -> String) {
        let tensors = std::mem::take(&mut self.tensors);
        self.tensors = tensors.into_iter().map(|(k, v)| (f(&k), v)).collect();
    }

    /// Every tensor, by key.
    pub fn tensors(&self) -> &BTreeMap<String, TensorEntry> {
        &self.tensors
    }

    /// The files behind this checkpoint.
    pub fn paths(&self) -> Vec<&Path> {
        self.files.iter().map(|(p, _)| p.as_path()).collect()
    }

    fn file_of(&self, entry: &TensorEntry) -> &Path {
        &self.files[entry.file].0
    }

    fn paths_display(&self) -> String {
        let paths: Vec<String> = self
            .paths()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        paths.join(", ")
    }

    /// Loads tensor `name` onto `device`, converted to `dtype`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let entry = self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{}: tensor `{name}` is missing",
                self.paths_display()
            ))
        })?;
        let data = &self.files[entry.file].1[entry.start..entry.end];
        let stored_shape = if entry.transpose {
            entry.shape.iter().rev().copied().collect()
        } else {
            entry.shape.clone()
        };
        let view =
            safetensors::tensor::TensorView::new(entry.dtype, stored_shape, data).map_err(|e| {
                candle_core::Error::Msg(format!(
                    "{}: tensor `{name}`: {e}",
                    self.file_of(entry).display()
                ))
            })?;
        let tensor = view.load(device).map_err(|e| {
            candle_core::Error::Msg(format!(
                "{}: tensor `{name}` ({:?}): {e}",
                self.file_of(entry).display(),
                entry.dtype
            ))
        })?;
        let tensor = if entry.transpose {
            tensor.t()?.contiguous()?
        } else {
            tensor
        };
        tensor.to_dtype(dtype)
    }
}

fn describe_safetensors_error(e: &safetensors::SafeTensorError, file_len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer => format!(
            "the header's tensor offsets do not match the file size ({file_len} bytes): truncated or padded file"
        ),
        E::HeaderTooSmall | E::InvalidHeaderLength => {
            format!("header length runs past the end of the file ({file_len} bytes): truncated or not a safetensors file")
        }
        E::InvalidOffset(name) => format!("tensor `{name}` has data offsets that overlap or leave gaps"),
        E::TensorInvalidInfo => "a tensor's byte size does not match its dtype and shape".into(),
        other => other.to_string(),
    }
}

/// A strict `VarBuilder` backend over a [`Checkpoint`] that records which tensors were used.
#[derive(Debug)]
pub struct Weights {
    checkpoint: Checkpoint,
    used: Mutex<BTreeSet<String>>,
    /// Updates added to tensors as they load (merged LoRA layers), by key, in f32.
    patches: BTreeMap<String, Tensor>,
}

impl Weights {
    /// Wraps an opened checkpoint.
    pub fn new(checkpoint: Checkpoint) -> Arc<Self> {
        Self::with_patches(checkpoint, BTreeMap::new())
    }

    /// Wraps an opened checkpoint whose tensors named in `patches` load with the update added.
    pub fn with_patches(checkpoint: Checkpoint, patches: BTreeMap<String, Tensor>) -> Arc<Self> {
        Arc::new(Self {
            checkpoint,
            used: Mutex::new(BTreeSet::new()),
            patches,
        })
    }

    /// Loads `name`, with its patch added.
    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.patches.get(name) {
            None => self.checkpoint.load(name, dtype, dev),
            Some(p) => {
                (self.checkpoint.load(name, DType::F32, dev)? + p.to_device(dev)?)?.to_dtype(dtype)
            }
        }
    }

    /// The checkpoint behind this backend.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// A `VarBuilder` whose paths are checkpoint keys.
    pub fn var_builder(self: &Arc<Self>, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let backend: Box<dyn SimpleBackend> = Box::new(StrictBackend(Arc::clone(self)));
        VarBuilder::from_backend(backend, dtype, device.clone())
    }

    /// Tensors present in the checkpoint that no module asked for (known buffers excluded).
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().map(|u| u.clone()).unwrap_or_default();
        self.checkpoint
            .tensors
            .keys()
            .filter(|k| !used.contains(*k) && !rename::is_ignorable_buffer(k))
            .cloned()
            .collect()
    }

    fn mark_used(&self, name: &str) {
        if let Ok(mut used) = self.used.lock() {
            used.insert(name.to_string());
        }
    }
}

struct StrictBackend(Arc<Weights>);

impl SimpleBackend for StrictBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let ckpt = &self.0.checkpoint;
        let Some(entry) = ckpt.tensors.get(name) else {
            return Err(candle_core::Error::Msg(format!(
                "{}: tensor `{name}` (expected shape {:?}) is missing",
                ckpt.paths_display(),
                shape.dims()
            )));
        };
        if entry.shape.as_slice() != shape.dims() {
            return Err(candle_core::Error::Msg(format!(
                "{}: tensor `{name}` has shape {:?}, expected {:?}",
                ckpt.file_of(entry).display(),
                entry.shape,
                shape.dims()
            )));
        }
        self.0.mark_used(name);
        self.0.load(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.mark_used(name);
        self.0.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.checkpoint.tensors.contains_key(name)
    }
}

/// A backend that allocates nothing: it records every requested (name, shape) and hands back a
/// zero-strided tensor, so full-size networks can be built to check their structure.
#[derive(Debug, Default)]
pub struct StructureRecorder {
    seen: Mutex<BTreeMap<String, Vec<usize>>>,
}

impl StructureRecorder {
    /// A new, empty recorder.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A `VarBuilder` over this recorder (f32, CPU).
    pub fn var_builder(self: &Arc<Self>) -> VarBuilder<'static> {
        let backend: Box<dyn SimpleBackend> = Box::new(RecordingBackend(Arc::clone(self)));
        VarBuilder::from_backend(backend, DType::F32, Device::Cpu)
    }

    /// Every parameter requested so far, by name.
    pub fn parameters(&self) -> BTreeMap<String, Vec<usize>> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

struct RecordingBackend(Arc<StructureRecorder>);

impl SimpleBackend for RecordingBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Ok(mut seen) = self.0.seen.lock() {
            seen.insert(name.to_string(), shape.dims().to_vec());
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!(
            "structure recorder cannot provide `{name}` without a shape"
        )))
    }

    /// Every tensor of the architecture is there; LoRA factors, which layers take only when a
    /// checkpoint brings them, are not.
    fn contains_tensor(&self, name: &str) -> bool {
        !(name.ends_with("lora_A.weight") || name.ends_with("lora_B.weight"))
    }
}

/// Builds a model from a component folder's weights, strictly: a missing or misshapen tensor
/// fails, and so does any tensor the model did not use (except those `ignored` names, such as
/// buffers a framework saves), which says the folder holds another `what`.
pub fn load_folder_strict<T>(
    dir: &Path,
    dtype: DType,
    device: &Device,
    what: &str,
    ignored: impl Fn(&str) -> bool,
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<T>,
) -> Result<T> {
    let weights = Weights::new(Checkpoint::open(&component_files(dir)?)?);
    let model = build(weights.var_builder(dtype, device))
        .map_err(|e| Error::Msg(format!("loading {}: {e}", dir.display())))?;
    let unused: Vec<String> = weights
        .unused()
        .into_iter()
        .filter(|k| !ignored(k))
        .collect();
    if !unused.is_empty() {
        return Err(Error::NotAModel {
            path: dir.to_path_buf(),
            msg: format!(
                "not {what} of this config: {} tensors unused ({} …)",
                unused.len(),
                unused[0]
            ),
        });
    }
    Ok(model)
}

/// The safetensors files of a component folder (`unet/`, `vae/`, …): a sharded index's files, or
/// the single weights file, preferring full precision over an `.fp16` variant.
pub fn component_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    if let Some(index) = names
        .iter()
        .find(|n| n.ends_with(".safetensors.index.json"))
    {
        let path = dir.join(index);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::config(&path, e.to_string()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::config(&path, "no `weight_map` object"))?;
        let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        let mut out = Vec::new();
        for f in files {
            if f.contains('/') || f.contains("..") {
                return Err(Error::config(
                    &path,
                    format!("shard name `{f}` leaves the folder"),
                ));
            }
            out.push(dir.join(f));
        }
        return Ok(out);
    }
    let safetensors: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    let pick = safetensors
        .iter()
        .find(|n| !n.contains(".fp16.") && !n.contains(".bf16."))
        .or_else(|| safetensors.first());
    match pick {
        Some(name) => Ok(vec![dir.join(name)]),
        None if names.iter().any(|n| n.ends_with(".bin")) => Err(Error::NotAModel {
            path: dir.to_path_buf(),
            msg: "only PyTorch .bin weights found; ldm reads .safetensors (convert them first)"
                .into(),
        }),
        None => Err(Error::NotAModel {
            path: dir.to_path_buf(),
            msg: "no .safetensors weights in this folder".into(),
        }),
    }
}

/// Makes freed buffers stay in the process for reuse. Inference allocates and frees the same
/// activation sizes at every layer; by default glibc maps large buffers afresh each time
/// (`mmap`) and trims the heap's top, so every layer pays page faults to zero new pages and
/// TLB shootdowns to unmap them — about a tenth of a 512-pixel SD1.5 U-Net step and VAE
/// decode on 2 cores. Here every allocation comes from the heap and freed memory is kept; the
/// peak resident memory is about the same, and the process holds on to it between steps
/// ([`release_free_memory`] still returns it explicitly). Threads other than the main one (a
/// training step's shards) allocate from arenas of 64 MB heaps, which glibc unmaps as soon as
/// one falls empty, whatever the trim threshold — a live set that rises and falls across a
/// heap's end maps, faults in and unmaps it again at every step (docs/shapes-research.md,
/// "Fused training kernels and the allocator"); a top pad of a whole heap keeps such heaps.
/// Call once at start-up; glibc only
/// (`mallopt`), a no-op elsewhere.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's thresholds.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Returns the heap's free pages to the system. Loading converts, transposes and drops many
/// tensors, and glibc's allocator keeps the holes between the survivors resident; after a model
/// is built this trims them (glibc's `malloc_trim`; a no-op elsewhere).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}
