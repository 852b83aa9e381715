//! Bad input gives a clear error, never a panic: broken safetensors, lying headers, absurd
//! configs, missing components and tensors, folders that are not models.

mod common;

use candle_core::{DType, Device, Tensor};
use common::scratch_copy;
use ldm_models::model::ModelFolder;
use std::path::Path;

fn unet_file(root: &Path) -> std::path::PathBuf {
    ldm_models::weights::component_files(&root.join("unet"))
        .unwrap()
        .remove(0)
}

fn load_unet_err(root: &Path) -> String {
    let folder = ModelFolder::open(root).unwrap();
    folder
        .load_unet(DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string()
}

/// A safetensors file with the given JSON header and `data_len` zero bytes of data.
fn write_raw(path: &Path, header: &str, data_len: usize) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + data_len, 0);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn truncated_checkpoint_is_reported_with_its_path() {
    let (_tmp, root) = scratch_copy("sd15");
    let file = unet_file(&root);
    let len = std::fs::metadata(&file).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(len / 2).unwrap();
    let err = load_unet_err(&root);
    assert!(
        err.contains("truncated") && err.contains(&file.display().to_string()),
        "{err}"
    );
}

#[test]
fn lying_headers_are_rejected() {
    let (_tmp, root) = scratch_copy("sd15");
    let file = unet_file(&root);
    let cases = [
        // offsets past the end of the data
        (
            r#"{"a":{"dtype":"F32","shape":[250],"data_offsets":[0,1000]}}"#,
            16,
            "truncated",
        ),
        // byte size inconsistent with dtype × shape
        (
            r#"{"a":{"dtype":"F32","shape":[10,10],"data_offsets":[0,16]}}"#,
            16,
            "does not match its dtype",
        ),
        // overlapping tensors
        (
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
            24,
            "overlap",
        ),
        // not JSON at all
        ("this is not json", 0, "invalid checkpoint"),
    ];
    for (header, data, expect) in cases {
        write_raw(&file, header, data);
        let err = load_unet_err(&root);
        assert!(err.contains(expect), "header {header}: {err}");
    }
    // a header length of 2^64-1
    std::fs::write(&file, u64::MAX.to_le_bytes()).unwrap();
    let err = load_unet_err(&root);
    assert!(err.contains("invalid checkpoint"), "{err}");
    // an empty file
    std::fs::write(&file, b"").unwrap();
    let err = load_unet_err(&root);
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    let (_tmp, root) = scratch_copy("sd15");
    let file = unet_file(&root);
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let victim = "conv_in.weight";
    let original = tensors.remove(victim).unwrap();
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let err = load_unet_err(&root);
    assert!(
        err.contains(victim) && err.contains("missing") && err.contains("expected shape"),
        "{err}"
    );

    let wrong = Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap();
    tensors.insert(victim.to_string(), wrong);
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let err = load_unet_err(&root);
    let expected = format!("{:?}", original.dims());
    assert!(
        err.contains(victim) && err.contains("[3, 3]") && err.contains(&expected),
        "{err}"
    );
}

#[test]
fn unused_tensors_are_reported() {
    let (_tmp, root) = scratch_copy("sd15");
    let file = unet_file(&root);
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    tensors.insert(
        "stray.weight".into(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let folder = ModelFolder::open(&root).unwrap();
    let loaded = folder.load_unet(DType::F32, &Device::Cpu).unwrap();
    assert_eq!(loaded.unused, vec!["stray.weight".to_string()]);
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn absurd_configs_are_rejected() {
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "unet",
            serde_json::json!({"block_out_channels": [32, 1000000000]}),
            "outside",
        ),
        (
            "unet",
            serde_json::json!({"layers_per_block": 0}),
            "layers_per_block",
        ),
        ("unet", serde_json::json!({"norm_num_groups": 7}), "groups"),
        (
            "unet",
            serde_json::json!({"block_out_channels": -3}),
            "invalid config",
        ),
        (
            "unet",
            serde_json::json!({"down_block_types": ["Nonsense2D", "DownBlock2D"]}),
            "Nonsense2D",
        ),
        (
            "unet",
            serde_json::json!({"attention_head_dim": [1, 2, 3, 4, 5]}),
            "entries",
        ),
        (
            "unet",
            serde_json::json!({"addition_embed_type": "text", "addition_embed_type_num_heads": 5}),
            "divisible",
        ),
        (
            "unet",
            serde_json::json!({"addition_embed_type": "text", "cross_attention_dim": [32, 32]}),
            "one `cross_attention_dim`",
        ),
        (
            "unet",
            serde_json::json!({"addition_embed_type": "image"}),
            "image",
        ),
        (
            "vae",
            serde_json::json!({"scaling_factor": -1.0}),
            "scaling_factor",
        ),
        (
            "vae",
            serde_json::json!({"latent_channels": 0}),
            "latent_channels",
        ),
        (
            "text_encoder",
            serde_json::json!({"num_attention_heads": 7}),
            "divisible",
        ),
        (
            "text_encoder",
            serde_json::json!({"hidden_act": "relu6"}),
            "relu6",
        ),
    ];
    for (component, patch, expect) in cases {
        let (_tmp, root) = scratch_copy("sd15");
        edit_json(&root.join(component).join("config.json"), |v| {
            for (k, val) in patch.as_object().unwrap() {
                v[k] = val.clone();
            }
        });
        let err = ModelFolder::open(&root).unwrap_err().to_string();
        assert!(
            err.contains(expect) && err.contains("config.json"),
            "{component} {patch}: {err}"
        );
    }
}

#[test]
fn a_config_that_disagrees_with_the_weights_names_both_shapes() {
    let (_tmp, root) = scratch_copy("sd15");
    edit_json(&root.join("unet/config.json"), |v| {
        let d = v["cross_attention_dim"].as_u64().unwrap();
        v["cross_attention_dim"] = serde_json::json!(d * 2);
    });
    let err = load_unet_err(&root);
    assert!(
        err.contains("attn2.to_k.weight") && err.contains("expected"),
        "{err}"
    );
}

#[test]
fn missing_components_and_non_models() {
    let (_tmp, root) = scratch_copy("sd15");
    std::fs::remove_dir_all(root.join("vae")).unwrap();
    let err = ModelFolder::open(&root).unwrap_err().to_string();
    assert!(err.contains("vae/") && err.contains("missing"), "{err}");

    let empty = tempfile::tempdir().unwrap();
    let err = ModelFolder::open(empty.path()).unwrap_err().to_string();
    assert!(err.contains("model_index.json"), "{err}");

    let err = ModelFolder::open(Path::new("/no/such/model"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no such file"), "{err}");

    let (_tmp2, root2) = scratch_copy("sd15");
    for f in std::fs::read_dir(root2.join("unet")).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let err = load_unet_err(&root2);
    assert!(err.contains("no .safetensors"), "{err}");
}

#[test]
fn out_of_vocabulary_ids_are_an_error() {
    let folder = ModelFolder::open(&common::tiny("sd15")).unwrap();
    let te = folder
        .load_text_encoder(
            ldm_models::model::TextEncoderSlot::First,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
        .model;
    let ids = Tensor::new(&[[0u32, 1_000_000]], &Device::Cpu).unwrap();
    assert!(te
        .forward(&ids)
        .unwrap_err()
        .to_string()
        .contains("outside the vocabulary"));
}
