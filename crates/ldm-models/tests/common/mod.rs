//! Helpers shared by the parity tests: fixture paths and tensor comparison.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// The repository's `fixtures/` folder.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// A tiny model folder under `fixtures/tiny/`.
pub fn tiny(name: &str) -> PathBuf {
    fixtures().join("tiny").join(name)
}

/// The oracle's reference tensors for a tiny model.
pub fn reference(name: &str) -> HashMap<String, Tensor> {
    let path = tiny(name).join("reference.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn get<'a>(refs: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    refs.get(key)
        .unwrap_or_else(|| panic!("reference tensor `{key}` missing"))
}

/// `‖a − b‖ / ‖b‖` in f64.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let values = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (a, b) = (values(a), values(b));
    let num: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-30)
}

/// Asserts relative L2 error ≤ `tol`, printing the measured error (for the closing notes).
pub fn assert_close(what: &str, ours: &Tensor, oracle: &Tensor, tol: f64) -> f64 {
    let err = rel_l2(ours, oracle);
    println!("{what}: relative L2 error {err:.3e}");
    assert!(err <= tol, "{what}: relative error {err:.3e} > {tol:.0e}");
    err
}

/// Copies a directory tree (tests modify the copy, never the fixture).
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A scratch copy of a tiny model folder.
pub fn scratch_copy(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join(name);
    copy_dir(&tiny(name), &root);
    (dir, root)
}
