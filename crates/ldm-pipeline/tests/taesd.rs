//! `pipe.vae = AutoencoderTiny(…)` in diffusers against [`Components::use_taesd`]: the tiny
//! SD1.5 pipeline with a seeded random TAESD (`tools/oracle/make_taesd_fixtures.py`), txt2img
//! and img2img, the same PNGs (mean difference ≤ 1 level, under 1 % of values off by more
//! than 2).

mod common;
use candle_core::{DType, Device};
use common::compare;
use ldm_pipeline::{generate, Components, Request};
use ldm_sampling::NoHook;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

#[test]
fn taesd_in_the_pipeline_matches_diffusers() {
    let dev = Device::Cpu;
    let mut c = Components::load(&fixtures().join("tiny/sd15"), DType::F32, &dev).unwrap();
    c.use_taesd(&fixtures().join("taesd/model")).unwrap();
    let init = ldm_pipeline::image_io::load_image(
        &fixtures().join("pipelines/inputs/gradient_circle_32x32.png"),
        32,
        32,
        &dev,
    )
    .unwrap();
    let euler = ldm_sampling::names::SamplerName::Euler;
    for (name, init_image, sampler) in [
        ("sd15_taesd", None, None),
        ("sd15_taesd_img2img", Some(init), Some(euler)),
    ] {
        let req = Request {
            prompt: "a red circle".into(),
            width: 32,
            height: 32,
            steps: 8,
            guidance_scale: 7.5,
            seed: 1,
            strength: 0.6,
            init_image,
            sampler,
            ..Request::default()
        };
        let out = generate(&c, &req, &mut NoHook).unwrap();
        let theirs = image::open(fixtures().join(format!("taesd/{name}.png")))
            .unwrap()
            .to_rgb8();
        let (mean, over2) = compare(&out.images[0], &theirs);
        println!(
            "{name}: mean |Δ| {mean:.3} levels, {:.2} % > 2",
            over2 * 100.0
        );
        assert!(
            mean <= 1.0 && over2 < 0.01,
            "{name}: mean {mean:.3}, {:.2} % > 2",
            over2 * 100.0
        );
    }
}

#[test]
fn a_taesd_for_other_latents_is_refused() {
    // A fresh TAESD for 8 latent channels, written as a folder.
    let dir = tempfile::tempdir().unwrap();
    let cfg_text = std::fs::read_to_string(fixtures().join("taesd/model/config.json"))
        .unwrap()
        .replace("\"latent_channels\": 4", "\"latent_channels\": 8");
    std::fs::write(dir.path().join("config.json"), &cfg_text).unwrap();
    let cfg: ldm_models::vae::AutoencoderTinyConfig = serde_json::from_str(&cfg_text).unwrap();
    let vm = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    ldm_models::vae::AutoencoderTiny::new(vb, &cfg).unwrap();
    vm.save(dir.path().join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    let mut c = Components::load(&fixtures().join("tiny/sd15"), DType::F32, &Device::Cpu).unwrap();
    let e = c.use_taesd(dir.path()).unwrap_err();
    assert!(
        e.to_string()
            .contains("a tiny autoencoder for 8 latent channels at factor 4, the model has 4"),
        "{e}"
    );
    assert!(c.taesd.is_none());
}
