//! The embedded Shapes World model (`models/shapes`, trained by `ldm train shapes`) against
//! diffusers: `tools/oracle/check_shapes_model.py` loaded the same folder with
//! `StableDiffusionPipeline.from_pretrained` and rendered the cases in `fixtures/shapes/`;
//! our pipeline renders them again and must give the same pictures, and our tokenizer the same
//! ids as transformers' `CLIPTokenizer`.

use candle_core::{DType, Device};
use ldm_pipeline::{generate, Components, Request};
use ldm_sampling::NoHook;
use serde_json::Value;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn the_embedded_model_renders_as_in_diffusers() {
    let fixtures = root().join("fixtures/shapes");
    let cases: Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("cases.json")).unwrap()).unwrap();
    let c = Components::load(&root().join("models/shapes"), DType::F32, &Device::Cpu).unwrap();
    let tok = &c.text_encoders[0].0;
    let ids = tok
        .encode("a large red circle on the left on a blue background")
        .unwrap();
    let theirs: Vec<u32> = cases["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(&ids[..theirs.len()], &theirs[..]);
    for case in cases["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let req = Request {
            prompt: case["prompt"].as_str().unwrap().into(),
            negative_prompt: case["negative"].as_str().map(String::from),
            width: 64,
            height: 64,
            steps: case["steps"].as_u64().unwrap() as usize,
            guidance_scale: case["guidance"].as_f64().unwrap(),
            seed: case["seed"].as_u64().unwrap(),
            ..Default::default()
        };
        let out = generate(&c, &req, &mut NoHook).unwrap();
        let ours = &out.images[0];
        let theirs = image::open(fixtures.join(format!("{name}.png")))
            .unwrap()
            .to_rgb8();
        let (mut sum, mut far) = (0f64, 0usize);
        for (a, b) in ours.as_raw().iter().zip(theirs.as_raw()) {
            let d = (*a as f64 - *b as f64).abs();
            sum += d;
            far += (d > 2.0) as usize;
        }
        let n = ours.as_raw().len() as f64;
        let (mean, far) = (sum / n, far as f64 / n);
        println!(
            "{name}: mean |Δ| {mean:.4} levels, {:.2}% > 2 levels",
            100.0 * far
        );
        assert!(mean <= 1.0 && far < 0.01, "{name}: mean {mean}, far {far}");
    }
}

/// Without `--guidance-rescale`, a zero-terminal-SNR model (the embedded one) gets φ = 0.7 and
/// any other model diffusers' 0.
#[test]
fn guidance_rescale_defaults_follow_the_noise_schedule() {
    let load = |dir: &str| Components::load(&root().join(dir), DType::F32, &Device::Cpu).unwrap();
    let shapes = load("models/shapes");
    assert_eq!(shapes.scheduler.rescale_betas_zero_snr, Some(true));
    assert_eq!(shapes.default_guidance_rescale(), 0.7);
    let sd15 = load("fixtures/tiny/sd15");
    assert_ne!(sd15.scheduler.rescale_betas_zero_snr, Some(true));
    assert_eq!(sd15.default_guidance_rescale(), 0.0);
}

/// The fitted latent preview reads flat colours back from their latents, and a whole
/// generation's final latents as roughly the decoded picture.
#[test]
fn latent_preview_follows_the_autoencoder() {
    use ldm_pipeline::preview::LatentPreview;
    let c = Components::load(&root().join("models/shapes"), DType::F32, &Device::Cpu).unwrap();
    let preview = LatentPreview::fit(&c).unwrap();
    for rgb in [[230u8, 30, 30], [30, 30, 220], [240, 240, 40]] {
        let img = image::RgbImage::from_pixel(64, 64, image::Rgb(rgb));
        let x = ldm_pipeline::image_io::image_to_tensor(img, 64, 64, &Device::Cpu).unwrap();
        let z = c
            .vae
            .scale_latents(&c.vae.encode(&x).unwrap().mean)
            .unwrap();
        let p = preview.render(&z).unwrap();
        assert_eq!(p.dimensions(), (64, 64));
        let centre = p.get_pixel(32, 32).0;
        for ch in 0..3 {
            let d = (centre[ch] as i32 - rgb[ch] as i32).abs();
            assert!(d < 60, "{rgb:?} previewed as {centre:?}");
        }
    }
    let req = Request {
        prompt: "a red circle on a blue background".into(),
        width: 64,
        height: 64,
        steps: 8,
        ..Request::default()
    };
    let out = generate(&c, &req, &mut NoHook).unwrap();
    let p = preview.render(&out.latents).unwrap();
    let decoded = &out.images[0];
    let mean_diff: f64 = p
        .as_raw()
        .iter()
        .zip(decoded.as_raw())
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .sum::<f64>()
        / p.as_raw().len() as f64;
    assert!(
        mean_diff < 40.0,
        "preview differs from the picture by {mean_diff:.1} levels"
    );
}
