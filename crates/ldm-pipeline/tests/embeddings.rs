//! Textual inversion against diffusers' `load_textual_inversion`
//! (`tools/oracle/make_embedding_fixtures.py`): an A1111 `emb_params` file of three vectors on
//! the tiny SD1.5 pipeline and an SDXL `clip_l` + `clip_g` file on the tiny SDXL one, named in
//! the prompt by their file stems; the pictures match, and files that fit no text encoder are
//! refused.

mod common;

use candle_core::{DType, Device, Tensor};
use common::compare;
use ldm_pipeline::{generate, Components, Request};
use ldm_sampling::NoHook;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn render(c: &Components, prompt: &str, guidance: f64) -> image::RgbImage {
    let req = Request {
        prompt: prompt.into(),
        width: 32,
        height: 32,
        steps: 8,
        guidance_scale: guidance,
        seed: 1,
        ..Request::default()
    };
    generate(c, &req, &mut NoHook).unwrap().images[0].clone()
}

#[test]
fn embeddings_match_diffusers() {
    for (case, model, name, guidance) in [
        ("sd15", "sd15", "shapestyle", 7.5),
        ("sdxl", "sdxl", "xlstyle", 5.0),
        ("sd15pt", "sd15", "shapept", 7.5),
    ] {
        let mut c = Components::load(
            &fixtures().join("tiny").join(model),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let without = render(&c, &format!("a red circle, {name}"), guidance);
        let names = c
            .load_embeddings(&fixtures().join("embeddings").join(case))
            .unwrap();
        assert_eq!(names.len(), 1);
        assert_eq!(names[0].0, name);
        let ours = render(&c, &format!("a red circle, {name}"), guidance);
        let theirs = image::open(fixtures().join(format!("embeddings/{case}_ti.png")))
            .unwrap()
            .to_rgb8();
        let (mean, over2) = compare(&ours, &theirs);
        println!(
            "{case}: mean |Δ| {mean:.3} levels, {:.2} % > 2",
            over2 * 100.0
        );
        assert!(mean <= 1.0 && over2 < 0.01, "{model}: mean {mean:.3}");
        let (changed, _) = compare(&ours, &without);
        assert!(
            changed > 2.0,
            "{model}: the embedding changed the picture by {changed:.2} only"
        );
        // The same name twice is refused.
        let again = c.load_embeddings(&fixtures().join("embeddings").join(case));
        assert!(again.unwrap_err().to_string().contains("already a token"));
    }
}

#[test]
fn embeddings_that_fit_no_encoder_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let odd = Tensor::zeros((2, 7), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("emb_params".to_string(), odd)]),
        dir.path().join("odd.safetensors"),
    )
    .unwrap();
    let mut c = Components::load(&fixtures().join("tiny/sd15"), DType::F32, &Device::Cpu).unwrap();
    let e = c.load_embeddings(dir.path()).unwrap_err().to_string();
    assert!(e.contains("width 7") && e.contains("fit"), "{e}");
    std::fs::write(dir.path().join("odd.safetensors"), b"not a file").unwrap();
    assert!(c.load_embeddings(dir.path()).is_err());
}
