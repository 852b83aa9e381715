//! Prompt encoding beyond diffusers: A1111 weights, BREAK, and prompts past 75 tokens in chunks.

use candle_core::{DType, Device, Tensor};
use ldm_pipeline::prompt::{encode, equalize};
use ldm_pipeline::Components;
use std::path::PathBuf;

mod common;
use common::copy_dir;

fn sd15() -> Components {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny/sd15");
    Components::load(&dir, DType::F32, &Device::Cpu).unwrap()
}

fn mean(t: &Tensor) -> f32 {
    t.mean_all().unwrap().to_scalar().unwrap()
}

#[test]
fn chunks_weights_and_breaks() {
    let c = sd15();
    let plain = encode(&c, "a red circle on a blue background", None).unwrap();
    assert_eq!(plain.context.dims(), &[1, 77, 32]);

    // Weighting changes the weighted tokens and keeps the chunk's mean.
    let weighted = encode(&c, "a (red:1.5) circle on a blue background", None).unwrap();
    assert_eq!(weighted.context.dims(), &[1, 77, 32]);
    assert!((mean(&weighted.context) - mean(&plain.context)).abs() < 1e-5);
    let diff = (&weighted.context - &plain.context)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() > 1e-3);

    // BREAK starts a second chunk; a long prompt fills several.
    let broken = encode(&c, "a red circle BREAK a blue background", None).unwrap();
    assert_eq!(broken.context.dims(), &[1, 154, 32]);
    let long = encode(&c, &"red circle, blue square, ".repeat(30), None).unwrap();
    assert!(
        long.context.dim(1).unwrap() >= 77 * 3,
        "{:?}",
        long.context.dims()
    );

    // The shorter side of a guided pair is padded with empty-prompt chunks.
    let mut neg = encode(&c, "", None).unwrap();
    let mut pos = broken.clone();
    equalize(&c, &mut neg, &mut pos, None).unwrap();
    assert_eq!(neg.context.dims(), pos.context.dims());
}

#[test]
fn long_prompts_generate() {
    let c = sd15();
    let req = ldm_pipeline::Request {
        prompt: "a red circle on a blue background, ".repeat(12),
        negative_prompt: Some("green".into()),
        width: 32,
        height: 32,
        steps: 4,
        ..Default::default()
    };
    let out = ldm_pipeline::generate(&c, &req, &mut ldm_sampling::NoHook).unwrap();
    assert_eq!(out.images.len(), 1);
}

/// A model whose tokenizer has a shorter context window than CLIP's 77 (the embedded Shapes
/// model's is 32) gets chunks of that window: the same hidden states before the padding (the
/// encoder is causal), long prompts in several short chunks, and a U-Net that attends to them.
#[test]
fn a_shorter_context_window() {
    let dir = tempfile::tempdir().unwrap();
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny/sd15");
    copy_dir(&src, dir.path());
    let cfg_path = dir.path().join("tokenizer/tokenizer_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["model_max_length"] = 16.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let short = Components::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let full = sd15();

    let text = "a red circle on a blue background";
    let a = encode(&short, text, None).unwrap();
    let b = encode(&full, text, None).unwrap();
    assert_eq!(a.context.dims(), &[1, 16, 32]);
    assert_eq!(a.window, 16);
    let n = short.text_encoders[0].0.encode_raw(text).unwrap().len() + 2;
    let diff = (a.context.narrow(1, 0, n).unwrap() - b.context.narrow(1, 0, n).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "{diff}");

    let long = encode(&short, &"red circle ".repeat(10), None).unwrap();
    assert_eq!(long.context.dims(), &[1, 32, 32]);
    assert_eq!(long.chunks().unwrap(), 2);

    let req = ldm_pipeline::Request {
        prompt: "red circle ".repeat(10),
        negative_prompt: Some("green".into()),
        width: 32,
        height: 32,
        steps: 2,
        ..Default::default()
    };
    let out = ldm_pipeline::generate(&short, &req, &mut ldm_sampling::NoHook).unwrap();
    assert_eq!(out.images.len(), 1);
}
