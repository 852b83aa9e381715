//! T2I-Adapter against diffusers (`tools/oracle/make_t2i_adapter_fixtures.py`): random
//! `full_adapter`, `light_adapter` and `full_adapter_xl` adapters sized for the tiny SD1.5,
//! SD2.1 and SDXL pipelines give diffusers' feature maps, and the pictures of
//! `StableDiffusion(XL)AdapterPipeline` at scale 1 and 0.6 (and SDXL's conditioning factor ½)
//! are reproduced (mean difference ≤ 1 level, under 1 % of values off by more than 2); each
//! moves the picture 9.6–23 levels from the plain pipeline's.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_same_picture, max_diff};
use ldm_pipeline::control::AdapterInput;
use ldm_pipeline::{generate, Components, Request};
use ldm_sampling::NoHook;
use serde_json::Value;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn cases() -> Value {
    let text = std::fs::read_to_string(fixtures().join("t2i_adapter/cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn adapter_features_match_diffusers() {
    let dev = Device::Cpu;
    let mut seen = std::collections::BTreeSet::new();
    for case in cases()["cases"].as_array().unwrap() {
        let Some(dir) = case["adapter"].as_str() else {
            continue;
        };
        if !seen.insert(dir.to_string()) {
            continue;
        }
        let a = ldm_models::t2i_adapter::T2IAdapter::load(&fixtures().join(dir), DType::F32, &dev)
            .unwrap();
        let want = candle_core::safetensors::load(
            fixtures().join(case["adapter_features"].as_str().unwrap()),
            &dev,
        )
        .unwrap();
        let got = a.forward(&want["input"]).unwrap();
        for (i, f) in got.iter().enumerate() {
            let w: &Tensor = &want[&format!("feature.{i}")];
            let err = max_diff(f, w);
            println!("{dir} feature {i} {:?}: max |Δ| {err:.1e}", f.dims());
            assert!(err < 1e-4, "{dir} feature {i}: {err}");
        }
        // The image diffusers prepared is the one ldm prepares from the PNG.
        let image = ldm_pipeline::image_io::load_control(
            &fixtures().join(case["control_image"].as_str().unwrap()),
            32,
            32,
            &dev,
        )
        .unwrap();
        let gap = max_diff(&image, &want["input"]);
        assert_eq!(gap, 0.0);
    }
    assert_eq!(seen.len(), 4, "{seen:?}");
}

#[test]
fn adapters_match_diffusers_pictures() {
    let dev = Device::Cpu;
    let mut adapted = 0;
    for case in cases()["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let mut c = Components::load(
            &fixtures().join(case["pipeline_folder"].as_str().unwrap()),
            DType::F32,
            &dev,
        )
        .unwrap();
        let mut adapter = Vec::new();
        if let Some(dir) = case["adapter"].as_str() {
            let net = c.add_t2i_adapter(&fixtures().join(dir)).unwrap();
            let image = ldm_pipeline::image_io::load_control(
                &fixtures().join(case["control_image"].as_str().unwrap()),
                32,
                32,
                &dev,
            )
            .unwrap();
            adapter.push(AdapterInput {
                net,
                image,
                scale: case["adapter_conditioning_scale"].as_f64().unwrap(),
            });
            adapted += 1;
        }
        let req = Request {
            prompt: case["prompt"].as_str().unwrap().into(),
            width: 32,
            height: 32,
            steps: case["steps"].as_u64().unwrap() as usize,
            guidance_scale: case["guidance_scale"].as_f64().unwrap(),
            seed: case["seed"].as_u64().unwrap(),
            adapter,
            adapter_factor: case["adapter_conditioning_factor"].as_f64().unwrap_or(1.0),
            ..Request::default()
        };
        let ours = generate(&c, &req, &mut NoHook).unwrap().images[0].clone();
        let theirs = image::open(fixtures().join(case["image"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        assert_same_picture(name, &ours, &theirs);
        if let Some(base) = case["levels_from_base"].as_f64() {
            assert!(base > 3.0, "{name}: {base}");
        }
    }
    assert!(adapted >= 6, "{adapted}");
}

#[test]
fn adapters_for_other_models_are_refused() {
    let dev = Device::Cpu;
    let mut c = Components::load(&fixtures().join("tiny/sd15"), DType::F32, &dev).unwrap();
    let e = c
        .add_t2i_adapter(&fixtures().join("t2i_adapter/sdxl_full"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("another architecture"), "{e}");
    let e = c
        .add_t2i_adapter(&fixtures().join("controlnet/sd15_a"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a T2IAdapter"), "{e}");
}
