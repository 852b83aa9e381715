//! `.ckpt` files through the restricted unpickler: tensors of several dtypes come back exactly,
//! and a pickle that names any global beyond what `torch.save` of tensors uses is refused
//! before anything is read (fixtures from tools/oracle/make_single_file_fixtures.py).

mod common;

use candle_core::{DType, Device};
use ldm_models::weights::{ckpt, Checkpoint};

#[test]
fn small_ckpt_matches_its_safetensors_twin() {
    let dir = common::fixtures().join("single_file");
    let from_ckpt = ckpt::read(&dir.join("small.ckpt")).unwrap();
    let twin = Checkpoint::open(&[dir.join("small.safetensors")]).unwrap();
    let names: Vec<&String> = twin.tensors().keys().collect();
    assert_eq!(from_ckpt.tensors().keys().collect::<Vec<_>>(), names);
    for name in names {
        let (a, b) = (&from_ckpt.tensors()[name], &twin.tensors()[name]);
        assert_eq!((a.dtype, &a.shape), (b.dtype, &b.shape), "{name}");
        let load = |c: &Checkpoint| -> Vec<f64> {
            c.load(name, DType::F64, &Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert_eq!(load(&from_ckpt), load(&twin), "{name}");
    }
}

#[test]
fn forbidden_pickle_globals_are_refused() {
    let dir = common::fixtures().join("single_file");
    let err = ckpt::read(&dir.join("malicious.ckpt"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("refusing pickle global `posix.system`"),
        "{err}"
    );
    // Not a zip at all, and a truncated zip.
    let tmp = tempfile::tempdir().unwrap();
    let fake = tmp.path().join("fake.ckpt");
    std::fs::write(&fake, b"not a zip").unwrap();
    assert!(ckpt::read(&fake)
        .unwrap_err()
        .to_string()
        .contains("not a PyTorch zip"));
    let bytes = std::fs::read(dir.join("small.ckpt")).unwrap();
    std::fs::write(&fake, &bytes[..bytes.len() / 2]).unwrap();
    assert!(ckpt::read(&fake).is_err());
}
