//! Parity of the three networks with diffusers / transformers on the oracle's tiny random models
//! (fixtures written by `tools/oracle/make_fixtures.py`): relative L2 error ≤ 1e-5 in f32 (the
//! largest measured is 2.6e-6, on an AVX2-only CPU; AVX-512 machines measured up to 2.1e-6).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, get, reference, rel_l2, tiny};
use ldm_models::model::{ModelFolder, TextEncoderSlot};
use ldm_models::unet::AddedCond;

const TOL: f64 = 1e-5;
const MODELS: [&str; 4] = ["sd15", "sd21", "sdxl", "sd15_inpaint"];

fn open(name: &str) -> ModelFolder {
    ModelFolder::open(&tiny(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn vae_encode_decode_match_diffusers() {
    for name in MODELS {
        let folder = open(name);
        let refs = reference(name);
        let vae = folder.load_vae(DType::F32, &Device::Cpu).unwrap();
        assert!(
            vae.unused.is_empty(),
            "{name}: unused VAE tensors {:?}",
            vae.unused
        );
        let vae = vae.model;
        let posterior = vae.encode(get(&refs, "vae.encode.input")).unwrap();
        assert_close(
            &format!("{name} vae mean"),
            &posterior.mean,
            get(&refs, "vae.encode.mean"),
            TOL,
        );
        assert_close(
            &format!("{name} vae logvar"),
            &posterior.logvar,
            get(&refs, "vae.encode.logvar"),
            TOL,
        );
        let sample = posterior.sample(get(&refs, "vae.encode.noise")).unwrap();
        assert_close(
            &format!("{name} vae sample"),
            &sample,
            get(&refs, "vae.encode.sample"),
            TOL,
        );
        assert_close(
            &format!("{name} vae kl"),
            &posterior.kl().unwrap(),
            get(&refs, "vae.encode.kl"),
            TOL,
        );
        let decoded = vae.decode(get(&refs, "vae.decode.input")).unwrap();
        assert_close(
            &format!("{name} vae decode"),
            &decoded,
            get(&refs, "vae.decode.output"),
            TOL,
        );
    }
}

#[test]
fn text_encoders_match_transformers() {
    for name in MODELS {
        let folder = open(name);
        let refs = reference(name);
        for (slot, prefix) in [
            (TextEncoderSlot::First, "text_encoder"),
            (TextEncoderSlot::Second, "text_encoder_2"),
        ] {
            let key = |k: &str| format!("{prefix}.{k}");
            if !refs.contains_key(&key("input_ids")) {
                continue;
            }
            let te = folder
                .load_text_encoder(slot, DType::F32, &Device::Cpu)
                .unwrap();
            assert!(
                te.unused.is_empty(),
                "{name}/{prefix}: unused tensors {:?}",
                te.unused
            );
            let out = te.model.forward(get(&refs, &key("input_ids"))).unwrap();
            let what = |k: &str| format!("{name} {prefix} {k}");
            assert_close(
                &what("last"),
                &out.last_hidden_state,
                get(&refs, &key("last_hidden_state")),
                TOL,
            );
            let penultimate = out.from_end(1).unwrap();
            assert_close(
                &what("penultimate"),
                penultimate,
                get(&refs, &key("penultimate_hidden_state")),
                TOL,
            );
            let pooled = out.text_embeds.as_ref().unwrap_or(&out.pooled);
            assert_close(&what("pooled"), pooled, get(&refs, &key("pooled")), TOL);
        }
    }
}

#[test]
fn unet_matches_diffusers_at_several_timesteps() {
    for name in MODELS {
        let folder = open(name);
        let refs = reference(name);
        let unet = folder.load_unet(DType::F32, &Device::Cpu).unwrap();
        assert!(
            unet.unused.is_empty(),
            "{name}: unused U-Net tensors {:?}",
            unet.unused
        );
        let unet = unet.model;
        let sample = get(&refs, "unet.sample");
        let context = get(&refs, "unet.encoder_hidden_states");
        let added = refs.get("unet.text_embeds").map(|te| AddedCond {
            text_embeds: te.clone(),
            time_ids: get(&refs, "unet.time_ids").clone(),
        });
        assert_eq!(added.is_some(), folder.unet.text_time.is_some());
        let timesteps: Vec<f32> = get(&refs, "unet.timesteps").to_vec1().unwrap();
        let batch = sample.dim(0).unwrap();
        for (i, &t) in timesteps.iter().enumerate() {
            let ts = Tensor::full(t, batch, &Device::Cpu).unwrap();
            let out = unet.forward(sample, &ts, context, added.as_ref()).unwrap();
            let oracle = get(&refs, &format!("unet.out.{i}"));
            assert_close(&format!("{name} unet t={t}"), &out, oracle, TOL);
            if i == 0 {
                // The two batch items share the sample and differ by one prompt token: the
                // output must differ visibly, or the text path is not being tested.
                let a = out.get(0).unwrap();
                let b = out.get(1).unwrap();
                let change = rel_l2(&a, &b);
                println!("{name} unet one-token change: {change:.3e}");
                assert!(
                    change > 1e-2,
                    "{name}: a one-token change moved the output by only {change:.3e}"
                );
            }
        }
        if let Some(added) = &added {
            // SDXL: the added conditioning must matter too.
            let zeroed = AddedCond {
                text_embeds: added.text_embeds.zeros_like().unwrap(),
                time_ids: added.time_ids.clone(),
            };
            let ts = Tensor::full(timesteps[0], batch, &Device::Cpu).unwrap();
            let a = unet.forward(sample, &ts, context, Some(added)).unwrap();
            let b = unet.forward(sample, &ts, context, Some(&zeroed)).unwrap();
            assert!(
                rel_l2(&a, &b) > 1e-3,
                "{name}: pooled text embedding has no effect"
            );
        }
    }
}

#[test]
fn unet_requires_exactly_its_added_conditioning() {
    let folder = open("sdxl");
    let refs = reference("sdxl");
    let unet = folder.load_unet(DType::F32, &Device::Cpu).unwrap().model;
    let sample = get(&refs, "unet.sample");
    let ts = Tensor::full(10f32, sample.dim(0).unwrap(), &Device::Cpu).unwrap();
    let err = unet
        .forward(sample, &ts, get(&refs, "unet.encoder_hidden_states"), None)
        .unwrap_err();
    assert!(err.to_string().contains("pooled text embedding"), "{err}");
}

/// Runs the SD1.5 VAE decoder, U-Net and text encoder with weights in `dtype` on the CPU and
/// checks each against the f32 oracle within `tol` (relative L2).
fn reduced_precision_stays_close(dtype: DType, tol: f64) {
    let dev = Device::Cpu;
    let compute = ldm_models::layers::compute_dtype(dtype, &dev);
    let folder = open("sd15");
    let refs = reference("sd15");
    let input = |name: &str| get(&refs, name).to_dtype(compute).unwrap();
    let check = |what: &str, out: Tensor, oracle: &str| {
        assert_eq!(out.dtype(), compute, "{what} computes in {compute:?}");
        let err = rel_l2(&out.to_dtype(DType::F32).unwrap(), get(&refs, oracle));
        println!("sd15 {what}, {dtype:?} weights: relative error {err:.3e}");
        assert!(err < tol, "{what}, {dtype:?} weights: {err}");
    };
    let vae = folder.load_vae(dtype, &dev).unwrap().model;
    let out = vae.decode(&input("vae.decode.input")).unwrap();
    check("vae decode", out, "vae.decode.output");
    let unet = folder.load_unet(dtype, &dev).unwrap().model;
    let t = get(&refs, "unet.timesteps").to_vec1::<f32>().unwrap()[0];
    let t = Tensor::full(t, 2, &dev).unwrap();
    let out = unet
        .forward(
            &input("unet.sample"),
            &t,
            &input("unet.encoder_hidden_states"),
            None,
        )
        .unwrap();
    check("unet", out, "unet.out.0");
    let te = folder
        .load_text_encoder(TextEncoderSlot::First, dtype, &dev)
        .unwrap()
        .model;
    let out = te.forward(get(&refs, "text_encoder.input_ids")).unwrap();
    check(
        "text encoder",
        out.last_hidden_state,
        "text_encoder.last_hidden_state",
    );
}

/// f16 compute is not bit-parity, but must track f32 closely on the same weights.
#[test]
fn half_precision_compute_stays_close() {
    reduced_precision_stays_close(DType::F16, 2e-2);
}

/// bf16 weights on the CPU: bf16 operands in every convolution, linear layer and attention
/// product (the AVX512-BF16 kernels, or f32 copies of the weights without them), f32 elsewhere.
#[test]
fn bf16_weights_on_the_cpu_stay_close() {
    assert_eq!(
        ldm_models::layers::compute_dtype(DType::BF16, &Device::Cpu),
        DType::F32
    );
    reduced_precision_stays_close(DType::BF16, 3e-2);
}

#[test]
fn tiled_vae_matches_diffusers_tiling() {
    // fixtures/tiling from tools/oracle/make_tiling_fixtures.py: diffusers' tiled decode and
    // encode of the tiny SD1.5 VAE with latent tiles of 16 (pixels 64) and overlap 0.25.
    let folder = open("sd15");
    let vae = folder.load_vae(DType::F32, &Device::Cpu).unwrap().model;
    let path = common::fixtures().join("tiling/sd15_vae_tiled.safetensors");
    let refs = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let decoded = vae.decode_tiled(get(&refs, "latents"), 16, 0.25).unwrap();
    assert_close("tiled decode", &decoded, get(&refs, "decoded_tiled"), TOL);
    let posterior = vae.encode_tiled(get(&refs, "image"), 64, 0.25).unwrap();
    assert_close(
        "tiled encode mean",
        &posterior.mean,
        get(&refs, "mean_tiled"),
        TOL,
    );
    assert_close(
        "tiled encode logvar",
        &posterior.logvar,
        get(&refs, "logvar_tiled"),
        TOL,
    );
}

#[test]
fn separate_vae_files_in_every_layout_load_the_same_weights() {
    let folder = open("sd15");
    let refs = reference("sd15");
    let z = get(&refs, "vae.decode.input");
    let expect = folder
        .load_vae(DType::F32, &Device::Cpu)
        .unwrap()
        .model
        .decode(z)
        .unwrap();
    let single = common::fixtures().join("single_file/sd15.safetensors");
    // Original keys without the checkpoint prefix, as VAE releases ship them.
    let tmp = tempfile::tempdir().unwrap();
    let bare = tmp.path().join("vae.safetensors");
    let all = candle_core::safetensors::load(&single, &Device::Cpu).unwrap();
    let stripped: std::collections::HashMap<String, Tensor> = all
        .into_iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("first_stage_model.")
                .map(|k| (k.to_string(), v))
        })
        .collect();
    candle_core::safetensors::save(&stripped, &bare).unwrap();
    let diffusers = common::tiny("sd15").join("vae/diffusion_pytorch_model.safetensors");
    for file in [diffusers, single, bare] {
        let vae = folder
            .load_vae_file(&file, DType::F32, &Device::Cpu)
            .unwrap();
        assert!(
            vae.unused.is_empty() || file.ends_with("sd15.safetensors"),
            "{:?}",
            vae.unused
        );
        let out = vae.model.decode(z).unwrap();
        assert_eq!(rel_l2(&out, &expect), 0.0, "{}", file.display());
    }
    let not_vae = common::tiny("sd15").join("unet/diffusion_pytorch_model.safetensors");
    let err = folder
        .load_vae_file(&not_vae, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a VAE"), "{err}");
}
