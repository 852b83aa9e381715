//! Prompt encoding beyond diffusers: A1111 weights, BREAK, and prompts past 75 tokens in chunks.

use candle_core::{DType, Device, Tensor};
use ldm_pipeline::prompt::{encode, equalize};
use ldm_pipeline::Components;
use std::path::PathBuf;

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
