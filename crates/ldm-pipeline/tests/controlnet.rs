//! ControlNet against diffusers (`tools/oracle/make_controlnet_fixtures.py`): ControlNets made
//! by `ControlNetModel.from_unet` on the tiny SD1.5, SD2.1 and SDXL pipelines, every zero
//! convolution and the hint's output made non-zero, rendered by diffusers'
//! `StableDiffusion(XL)ControlNetPipeline` — one ControlNet, a window of the schedule at half
//! scale, guess mode, two at once — and reproduced here (mean difference ≤ 1 level, under 1 %
//! of values off by more than 2); each case moves the picture well beyond that.

mod common;

use candle_core::{DType, Device};
use common::assert_same_picture;
use ldm_pipeline::control::ControlInput;
use ldm_pipeline::{generate, Components, Request};
use ldm_sampling::NoHook;
use serde_json::Value;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn render(case: &Value) -> image::RgbImage {
    let dev = Device::Cpu;
    let mut c = Components::load(
        &fixtures().join(case["pipeline_folder"].as_str().unwrap()),
        DType::F32,
        &dev,
    )
    .unwrap();
    let (w, h) = (
        case["width"].as_u64().unwrap() as usize,
        case["height"].as_u64().unwrap() as usize,
    );
    let nets = case["controlnets"].as_array().unwrap();
    let images = case["control_images"].as_array().unwrap();
    let scales: Vec<f64> = match &case["controlnet_conditioning_scale"] {
        Value::Array(a) => a.iter().map(|v| v.as_f64().unwrap()).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap(); nets.len()],
        _ => vec![],
    };
    let mut control = Vec::new();
    for (i, (net, img)) in nets.iter().zip(images).enumerate() {
        let k = c
            .add_controlnet(&fixtures().join(net.as_str().unwrap()))
            .unwrap();
        let image = ldm_pipeline::image_io::load_control(
            &fixtures().join(img.as_str().unwrap()),
            w,
            h,
            &dev,
        )
        .unwrap();
        control.push(ControlInput {
            start: case["control_guidance_start"].as_f64().unwrap_or(0.0),
            end: case["control_guidance_end"].as_f64().unwrap_or(1.0),
            ..ControlInput::new(k, image, scales[i])
        });
    }
    let req = Request {
        prompt: case["prompt"].as_str().unwrap().into(),
        width: w,
        height: h,
        steps: case["steps"].as_u64().unwrap() as usize,
        guidance_scale: case["guidance_scale"].as_f64().unwrap(),
        seed: case["seed"].as_u64().unwrap(),
        control,
        guess_mode: case["guess_mode"].as_bool().unwrap_or(false),
        ..Request::default()
    };
    generate(&c, &req, &mut NoHook).unwrap().images[0].clone()
}

#[test]
fn controlnets_match_diffusers() {
    let text = std::fs::read_to_string(fixtures().join("controlnet/cases.json")).unwrap();
    let cases: Value = serde_json::from_str(&text).unwrap();
    let mut seen = 0;
    for case in cases["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let theirs = image::open(fixtures().join(case["image"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        let ours = render(case);
        assert_same_picture(name, &ours, &theirs);
        if let Some(base) = case["levels_from_base"].as_f64() {
            assert!(
                base > 3.0,
                "{name}: the ControlNet moves the picture only {base}"
            );
        }
        seen += !case["controlnets"].as_array().unwrap().is_empty() as usize;
    }
    assert!(seen >= 6, "{seen} ControlNet cases");
}

/// A ControlNet for another architecture, an image of the wrong size and a window that is not
/// one are refused with a clear error.
#[test]
fn bad_controlnet_input_is_refused() {
    let dev = Device::Cpu;
    let mut c = Components::load(&fixtures().join("tiny/sd15"), DType::F32, &dev).unwrap();
    let e = c
        .add_controlnet(&fixtures().join("controlnet/sdxl_a"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("another architecture"), "{e}");
    let e = c
        .add_controlnet(&fixtures().join("tiny/sd15/unet"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a ControlNetModel"), "{e}");
    let k = c
        .add_controlnet(&fixtures().join("controlnet/sd15_a"))
        .unwrap();
    let image = |s: usize| candle_core::Tensor::zeros((1, 3, s, s), DType::F32, &dev).unwrap();
    for (unit, what) in [
        (ControlInput::new(k, image(16), 1.0), "shape"),
        (ControlInput::new(k + 1, image(32), 1.0), "loaded"),
        (
            ControlInput {
                start: 0.8,
                end: 0.2,
                ..ControlInput::new(k, image(32), 1.0)
            },
            "start",
        ),
    ] {
        let req = Request {
            prompt: "x".into(),
            width: 32,
            height: 32,
            steps: 2,
            control: vec![unit],
            ..Request::default()
        };
        let e = match generate(&c, &req, &mut NoHook) {
            Ok(_) => panic!("{what}: accepted"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(what), "{what}: {e}");
    }
}

/// The original (lllyasviel) single-file layout of `sd15_a` and `sd21_a` (`control_model.…`,
/// `zero_convs`, `input_hint_block`, `middle_block_out`; SD2's linear projections; diffusers'
/// `from_single_file` reads each back to the same tensors) gives the same picture as the folder.
#[test]
fn original_single_files_load() {
    let text = std::fs::read_to_string(fixtures().join("controlnet/cases.json")).unwrap();
    let cases: Value = serde_json::from_str(&text).unwrap();
    for model in ["sd15", "sd21"] {
        let name = format!("{model}_single");
        let mut case = cases["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name.as_str())
            .unwrap()
            .clone();
        case["controlnets"] =
            serde_json::json!([format!("controlnet/{model}_a_original.safetensors")]);
        let theirs = image::open(fixtures().join(format!("controlnet/{name}.png")))
            .unwrap()
            .to_rgb8();
        assert_same_picture(
            &format!("{model}: the original single file"),
            &render(&case),
            &theirs,
        );
    }
    // On an SDXL model the same file does not fit.
    let mut c = Components::load(&fixtures().join("tiny/sdxl"), DType::F32, &Device::Cpu).unwrap();
    let e = c
        .add_controlnet(&fixtures().join("controlnet/sd15_a_original.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("ControlNet"), "{e}");
}
