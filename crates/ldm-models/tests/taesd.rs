//! The tiny autoencoder (TAESD) against diffusers' `AutoencoderTiny`: a seeded random model in
//! the tiny SD1.5 pipeline's latent layout (`tools/oracle/make_taesd_fixtures.py`), its encoder
//! and decoder outputs on fixed inputs.

use candle_core::{DType, Device, Tensor};
use ldm_models::vae::AutoencoderTiny;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/taesd")
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let s = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d / s
}

#[test]
fn taesd_matches_diffusers() {
    let dev = Device::Cpu;
    let model = AutoencoderTiny::load(&fixtures().join("model"), DType::F32, &dev).unwrap();
    assert_eq!(model.config.downsample_factor(), 4);
    let cases = candle_core::safetensors::load(fixtures().join("cases.safetensors"), &dev).unwrap();
    let encoded = model.encode(&cases["x"]).unwrap();
    let e = max_rel(&encoded, &cases["encoded"]);
    let decoded = model.decode(&cases["z"]).unwrap();
    let d = max_rel(&decoded, &cases["decoded"]);
    println!("encoder max relative error {e:.1e}, decoder {d:.1e}");
    assert!(e < 1e-5 && d < 1e-5, "encoder {e:.1e}, decoder {d:.1e}");
}

#[test]
fn taesd_folders_that_do_not_fit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // A config whose blocks do not match the weights.
    let cfg = std::fs::read_to_string(fixtures().join("model/config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        cfg.replace(
            "\"num_decoder_blocks\": [\n    2,",
            "\"num_decoder_blocks\": [\n    3,",
        ),
    )
    .unwrap();
    std::fs::copy(
        fixtures().join("model/diffusion_pytorch_model.safetensors"),
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let e = AutoencoderTiny::load(dir.path(), DType::F32, &Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("decoder.layers"), "{e}");
    // A config that is not one.
    std::fs::write(dir.path().join("config.json"), "{\"act_fn\": \"tanh\"}").unwrap();
    let e = AutoencoderTiny::load(dir.path(), DType::F32, &Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("act_fn"), "{e}");
    // No folder.
    assert!(AutoencoderTiny::load(&dir.path().join("nothing"), DType::F32, &Device::Cpu).is_err());
}
