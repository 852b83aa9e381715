//! U-Nets with a guidance embedding (`time_cond_proj_dim`: guidance-distilled and
//! latent-consistency models) against diffusers, on the fixtures of
//! `tools/oracle/make_guidance_embedding_fixtures.py`: the embedding of w, the U-Net with and
//! without it, and `LatentConsistencyModelPipeline`'s images, which `generate` reproduces with
//! one U-Net pass a step.

use candle_core::{DType, Device, Tensor};
use ldm_models::layers::timestep::guidance_scale_embedding;
use ldm_pipeline::generate::Request;
use ldm_pipeline::Components;
use ldm_sampling::NoHook;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn lcm_fixture() -> PathBuf {
    fixtures().join("tiny/sd15_lcm")
}

fn refs() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(lcm_fixture().join("reference.safetensors"), &Device::Cpu)
        .unwrap()
}

/// The whole model folder: the fixture's U-Net, scheduler and model index with the tiny SD1's
/// text encoder, tokenizer and autoencoder (linked, not copied).
fn assemble(dir: &Path) -> PathBuf {
    let root = dir.join("sd15_lcm");
    std::fs::create_dir_all(&root).unwrap();
    let sd15 = fixtures().join("tiny/sd15");
    for (from, part) in [
        (&sd15, "text_encoder"),
        (&sd15, "tokenizer"),
        (&sd15, "vae"),
        (&lcm_fixture(), "unet"),
        (&lcm_fixture(), "scheduler"),
    ] {
        std::os::unix::fs::symlink(from.join(part).canonicalize().unwrap(), root.join(part))
            .unwrap();
    }
    std::fs::copy(
        lcm_fixture().join("model_index.json"),
        root.join("model_index.json"),
    )
    .unwrap();
    root
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let a: Vec<f64> = a
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f64> = b
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    num / b.iter().map(|y| y * y).sum::<f64>().sqrt()
}

/// Equal up to the rounding of the sine's argument 1000·w·f (an ulp of f, from `exp`, is
/// 1000·w times larger there): |Δ| ≤ 1e-5 + 1e-7 · 1000 w.
#[test]
fn guidance_embedding_matches_diffusers() {
    let refs = refs();
    let w: Vec<f64> = refs["embedding.w"].to_vec1().unwrap();
    for dim in [32, 31, 256] {
        let ours = guidance_scale_embedding(&w, dim, &Device::Cpu).unwrap();
        let theirs = &refs[&format!("embedding.{dim}")];
        assert_eq!(ours.dims(), theirs.dims());
        let ours: Vec<Vec<f32>> = ours.to_vec2().unwrap();
        let theirs: Vec<Vec<f32>> = theirs.to_vec2().unwrap();
        for ((a, b), w) in ours.iter().zip(&theirs).zip(&w) {
            let diff = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            println!("guidance embedding, {dim} wide, w = {w}: max |Δ| {diff:.2e}");
            assert!(
                diff as f64 <= 1e-5 + 1e-4 * w,
                "{dim} wide, w = {w}: {diff}"
            );
        }
    }
}

#[test]
fn a_unet_with_a_guidance_embedding_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let folder = ldm_models::model::ModelFolder::open(&assemble(dir.path())).unwrap();
    assert_eq!(folder.unet.time_cond_proj_dim, Some(32));
    let loaded = folder.load_unet(DType::F32, &Device::Cpu).unwrap();
    assert!(loaded.unused.is_empty(), "unused {:?}", loaded.unused);
    let unet = loaded.model;
    let refs = refs();
    let sample = &refs["unet.sample"];
    let context = &refs["unet.encoder_hidden_states"];
    let w: Vec<f64> = refs["unet.w"].to_vec1().unwrap();
    let cond = guidance_scale_embedding(&w, 32, &Device::Cpu).unwrap();
    let timesteps: Vec<f32> = refs["unet.timesteps"].to_vec1().unwrap();
    let at = |t: f32, cond: Option<&Tensor>| {
        let ts = Tensor::full(t, 2, &Device::Cpu).unwrap();
        unet.forward_with(sample, &ts, context, None, cond).unwrap()
    };
    for (i, &t) in timesteps.iter().enumerate() {
        let err = rel(&at(t, Some(&cond)), &refs[&format!("unet.out.{i}")]);
        println!("U-Net with the guidance embedding, t = {t}: relative error {err:.2e}");
        assert!(err < 1e-5, "t = {t}: {err}");
    }
    let err = rel(&at(timesteps[0], None), &refs["unet.out_uncond"]);
    assert!(err < 1e-5, "without the embedding: {err}");
    // The embedding matters (a U-Net ignoring it would pass the first check only by luck).
    let change = rel(&at(timesteps[0], None), &refs["unet.out.0"]);
    assert!(
        change > 1e-2,
        "the embedding changed the output by {change:.2e}"
    );
}

#[test]
fn latent_consistency_pipeline_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let components = Components::load(&assemble(dir.path()), DType::F32, &Device::Cpu).unwrap();
    assert!(!components.classifier_free(8.0));
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(lcm_fixture().join("cases.json")).unwrap())
            .unwrap();
    assert_eq!(cases.len(), 3);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let req = Request {
            prompt: case["prompt"].as_str().unwrap().to_string(),
            width: case["width"].as_u64().unwrap() as usize,
            height: case["height"].as_u64().unwrap() as usize,
            steps: case["steps"].as_u64().unwrap() as usize,
            guidance_scale: case["guidance_scale"].as_f64().unwrap(),
            seed: case["seed"].as_u64().unwrap(),
            ..Request::default()
        };
        let out = ldm_pipeline::generate(&components, &req, &mut NoHook).unwrap();
        let theirs = image::open(lcm_fixture().join(format!("{name}.png")))
            .unwrap()
            .to_rgb8();
        let diffs: Vec<f64> = out.images[0]
            .as_raw()
            .iter()
            .zip(theirs.as_raw())
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .collect();
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        let latents: HashMap<String, Tensor> = candle_core::safetensors::load(
            lcm_fixture().join(format!("{name}.latents.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let err = rel(&out.latents, &latents["latents"]);
        println!("{name}: mean |Δ| {mean:.3} levels, latents relative error {err:.2e}");
        assert!(
            mean <= 1.0 && err < 1e-4,
            "{name}: mean {mean}, latents {err}"
        );
    }
}
