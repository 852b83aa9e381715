//! A half-precision VAE that overflows (as SD1.5's and SDXL's do in f16) is retried in f32.

use candle_core::{DType, Device, Tensor};
use ldm_pipeline::image_io::to_images;
use ldm_pipeline::{Components, Request};
use std::collections::HashMap;
use std::path::PathBuf;

mod common;
use common::copy_dir;

#[test]
fn an_overflowing_f16_vae_is_decoded_again_in_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("sd15");
    copy_dir(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny/sd15"),
        &root,
    );
    // Scale the decoder's first convolution so its activations exceed f16's range (65504);
    // the following GroupNorm makes the f32 decode indifferent to the scale.
    let vae_file = root.join("vae/diffusion_pytorch_model.safetensors");
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(&vae_file, &Device::Cpu).unwrap();
    for key in ["decoder.conv_in.weight", "decoder.conv_in.bias"] {
        let t = (&tensors[key] * 1e6).unwrap();
        tensors.insert(key.into(), t);
    }
    candle_core::safetensors::save(&tensors, &vae_file).unwrap();

    let c = Components::load(&root, DType::F16, &Device::Cpu).unwrap();
    let req = Request {
        prompt: "a red circle".into(),
        width: 32,
        height: 32,
        steps: 3,
        ..Request::default()
    };
    // The f16 decode alone overflows…
    let z = c
        .vae
        .unscale_latents(&Tensor::ones((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let raw = c
        .vae
        .decode(&z.to_dtype(DType::F16).unwrap())
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let max = raw
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        !max.is_finite(),
        "the test VAE should overflow in f16, max {max}"
    );
    // …and generation still gives the f32 decode of its latents.
    let out = ldm_pipeline::generate(&c, &req, &mut ldm_sampling::NoHook).unwrap();
    let vae32 = c.folder.load_vae(DType::F32, &Device::Cpu).unwrap().model;
    let expect = to_images(
        &vae32
            .decode(&vae32.unscale_latents(&out.latents).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(out.images[0].as_raw(), expect[0].as_raw());
}
