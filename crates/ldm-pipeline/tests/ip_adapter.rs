//! IP-Adapter against diffusers (`tools/oracle/make_ip_adapter_fixtures.py`): a tiny CLIP
//! image encoder (`CLIPVisionModelWithProjection`) and random base and Plus IP-Adapters in the
//! original file layout for the tiny SD1.5, SD2.1 and SDXL pipelines. The encoder's states, the image
//! processing, each projection's image tokens, and the pictures of diffusers' pipelines with
//! `load_ip_adapter` (scale 1 and ½) are reproduced; each adapter moves the picture 9–17
//! levels from the plain one.

mod common;

use candle_core::{DType, Device};
use common::{assert_same_picture, max_diff};
use ldm_models::clip::ClipVisionModel;
use ldm_pipeline::ip_adapter::ClipImageProcessor;
use ldm_pipeline::{generate, Components, Request};
use ldm_sampling::NoHook;
use serde_json::Value;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join("ip_adapter/cases.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

#[test]
fn the_image_encoder_and_its_processing_match_transformers() {
    let dev = Device::Cpu;
    let dir = fixtures().join("ip_adapter/image_encoder");
    let want = candle_core::safetensors::load(
        fixtures().join("ip_adapter/encoder_outputs.safetensors"),
        &dev,
    )
    .unwrap();
    let image = image::open(fixtures().join("pipelines/inputs/gradient_circle_32x32.png"))
        .unwrap()
        .to_rgb8();
    let pixels = ClipImageProcessor::from_dir(&dir)
        .unwrap()
        .preprocess(&image, &dev)
        .unwrap();
    assert!(max_diff(&pixels, &want["pixel_values"]) < 1e-5);
    let enc = ClipVisionModel::load(&dir, DType::F32, &dev).unwrap();
    let out = enc.forward(&want["pixel_values"]).unwrap();
    for (i, h) in out.hidden_states.iter().enumerate() {
        let err = max_diff(h, &want[&format!("hidden_state.{i}")]);
        assert!(err < 1e-4, "hidden state {i}: {err}");
    }
    let n = out.hidden_states.len();
    assert!(max_diff(&out.hidden_states[n - 2], &want["penultimate"]) < 1e-4);
    let embeds = out.image_embeds.unwrap();
    assert!(max_diff(&embeds, &want["image_embeds"]) < 1e-4);
    let zero = enc
        .forward(&want["pixel_values"].zeros_like().unwrap())
        .unwrap();
    assert!(max_diff(&zero.hidden_states[n - 2], &want["zero_penultimate"]) < 1e-4);
}

fn render(case: &Value) -> image::RgbImage {
    let dev = Device::Cpu;
    let mut c = Components::load(
        &fixtures().join(case["pipeline_folder"].as_str().unwrap()),
        DType::F32,
        &dev,
    )
    .unwrap();
    let ip_image = case["ip_adapter"].as_str().map(|file| {
        c.use_ip_adapter(
            &fixtures().join(file),
            &fixtures().join(case["image_encoder"].as_str().unwrap()),
        )
        .unwrap();
        image::open(fixtures().join(case["ip_adapter_image"].as_str().unwrap()))
            .unwrap()
            .to_rgb8()
    });
    let req = Request {
        prompt: case["prompt"].as_str().unwrap().into(),
        width: 32,
        height: 32,
        steps: case["steps"].as_u64().unwrap() as usize,
        guidance_scale: case["guidance_scale"].as_f64().unwrap(),
        seed: case["seed"].as_u64().unwrap(),
        ip_image,
        ip_scale: case["ip_adapter_scale"].as_f64().unwrap_or(1.0),
        ..Request::default()
    };
    let out = generate(&c, &req, &mut NoHook).unwrap().images[0].clone();
    // The image tokens alone, from the embeddings diffusers projected (negative first).
    if let (Some(tokens), Some(ip)) = (case["ip_tokens"].as_str(), &c.ip_adapter) {
        let want = candle_core::safetensors::load(fixtures().join(tokens), &dev).unwrap();
        let got = ip
            .adapter
            .project(&want["image_embeds"].squeeze(1).unwrap())
            .unwrap();
        let err = max_diff(&got, &want["ip_tokens"].squeeze(1).unwrap());
        assert!(err < 1e-4, "{tokens}: {err}");
    }
    out
}

#[test]
fn ip_adapters_match_diffusers_pictures() {
    let mut adapted = 0;
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let theirs = image::open(fixtures().join(case["image"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        assert_same_picture(name, &render(&case), &theirs);
        if let Some(base) = case["levels_from_base"].as_f64() {
            assert!(base > 3.0, "{name}: {base}");
            adapted += 1;
        }
    }
    assert_eq!(adapted, 5);
}

#[test]
fn ip_adapters_for_other_models_are_refused() {
    let dev = Device::Cpu;
    let f = fixtures();
    let mut c = Components::load(&f.join("tiny/sd15"), DType::F32, &dev).unwrap();
    let e = c
        .use_ip_adapter(
            &f.join("ip_adapter/sdxl_base.safetensors"),
            &f.join("ip_adapter/image_encoder"),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cross-attention layers") || e.contains("shape"),
        "{e}"
    );
    let e = c
        .use_ip_adapter(
            &f.join("lora/sd15_peft.safetensors"),
            &f.join("ip_adapter/image_encoder"),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("not an IP-Adapter"), "{e}");
    let req = Request {
        prompt: "x".into(),
        width: 32,
        height: 32,
        steps: 2,
        ip_image: Some(image::RgbImage::new(32, 32)),
        ..Request::default()
    };
    let e = match generate(&c, &req, &mut NoHook) {
        Ok(_) => panic!("an image prompt without an adapter was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("needs an IP-Adapter"), "{e}");
}
