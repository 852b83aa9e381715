//! LoRA files against diffusers' `load_lora_weights` (`tools/oracle/make_lora_fixtures.py`):
//! PEFT adapters with random factors on the tiny SD1.5, SD2.1 and SDXL pipelines' U-Net and every
//! text encoder, saved in diffusers/PEFT naming and converted to kohya's (alphas at half the
//! rank); the pictures match (mean difference ≤ 1 level, under 1 % of values off by more than
//! 2), and files for another network are refused whole.

mod common;

use candle_core::{DType, Device};
use common::compare;
use ldm_pipeline::{generate, Components, Request};
use ldm_sampling::NoHook;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn render(model: &str, loras: &[(&str, f64)]) -> Result<image::RgbImage, String> {
    let mut c = Components::load(
        &fixtures().join("tiny").join(model),
        DType::F32,
        &Device::Cpu,
    )
    .map_err(|e| e.to_string())?;
    let files: Vec<ldm_models::lora::LoraSpec> = loras
        .iter()
        .map(|(f, m)| ldm_models::lora::LoraSpec::new(fixtures().join("lora").join(f), *m))
        .collect();
    c.apply_loras(&files).map_err(|e| e.to_string())?;
    let req = Request {
        prompt: "a red circle".into(),
        width: 32,
        height: 32,
        steps: 8,
        guidance_scale: if model == "sdxl" { 5.0 } else { 7.5 },
        seed: 1,
        ..Request::default()
    };
    let out = generate(&c, &req, &mut NoHook).map_err(|e| e.to_string())?;
    Ok(out.images[0].clone())
}

fn expect(name: &str) -> image::RgbImage {
    image::open(fixtures().join("lora").join(format!("{name}.png")))
        .unwrap()
        .to_rgb8()
}

#[test]
fn lora_files_match_diffusers() {
    // (model, the diffusers picture, LoRA files with multipliers)
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, f64)>);
    let cases: [Case; 9] = [
        ("sd15", "sd15_base", vec![]),
        ("sd15", "sd15_peft", vec![("sd15_peft.safetensors", 1.0)]),
        ("sd15", "sd15_kohya", vec![("sd15_kohya.safetensors", 1.0)]),
        ("sd21", "sd21_base", vec![]),
        ("sd21", "sd21_peft", vec![("sd21_peft.safetensors", 1.0)]),
        ("sd21", "sd21_kohya", vec![("sd21_kohya.safetensors", 1.0)]),
        ("sdxl", "sdxl_base", vec![]),
        ("sdxl", "sdxl_peft", vec![("sdxl_peft.safetensors", 0.7)]),
        // The kohya copy's alphas halve its scale: 1.4 × ½ is the PEFT file at 0.7.
        ("sdxl", "sdxl_peft", vec![("sdxl_kohya.safetensors", 1.4)]),
    ];
    let mut worst: f64 = 0.0;
    for (model, png, loras) in cases {
        let ours = render(model, &loras).unwrap();
        let (mean, over2) = compare(&ours, &expect(png));
        println!(
            "{png} with {loras:?}: mean |Δ| {mean:.3} levels, {:.2} % > 2",
            over2 * 100.0
        );
        assert!(
            mean <= 1.0 && over2 < 0.01,
            "{png} {loras:?}: mean {mean:.3}"
        );
        worst = worst.max(mean);
    }
    // The LoRA changes the picture well beyond the tolerance, text encoder included.
    let (changed, _) = compare(&expect("sd15_peft"), &expect("sd15_base"));
    assert!(changed > 3.0, "{changed}");
    println!("worst mean |Δ| {worst:.3}");
}

#[test]
fn lora_files_for_other_networks_are_refused() {
    let e = render("sd15", &[("sdxl_peft.safetensors", 1.0)]).unwrap_err();
    assert!(e.contains("network this model does not have"), "{e}");
    assert!(e.contains("text_encoder_2."), "{e}");
    let e = render("sdxl", &[("sd15_kohya.safetensors", 1.0)]).unwrap_err();
    assert!(e.contains("does not have"), "{e}");
}

/// LyCORIS kinds (LoHa with and without its Tucker form, LoKr full, factored and Tucker,
/// LoCon's `lora_mid`, a full `diff` with `diff_b`) against the updates
/// `tools/oracle/make_lycoris_fixtures.py` computes in LyCORIS/ComfyUI semantics, and the
/// picture of the pipeline with them merged (diffusers cannot load these files).
#[test]
fn lycoris_kinds_match_their_formulas() {
    use ldm_models::lora::{LoraFile, LoraTarget};
    let dev = Device::Cpu;
    let folder = ldm_models::model::ModelFolder::open(&fixtures().join("tiny/sd15")).unwrap();
    let nets = folder.lora_targets().unwrap();
    let lora = LoraFile::open(
        &fixtures().join("lycoris/sd15_lycoris.safetensors"),
        &nets,
        &dev,
    )
    .unwrap();
    let mut patches = std::collections::BTreeMap::new();
    lora.add_to(
        LoraTarget::Unet,
        &mut patches,
        1.0,
        &nets[&LoraTarget::Unet],
    )
    .unwrap();
    let expected =
        candle_core::safetensors::load(fixtures().join("lycoris/expected.safetensors"), &dev)
            .unwrap();
    assert_eq!(patches.len(), expected.len());
    for (key, want) in &expected {
        let got = &patches[key];
        let largest = |t: &candle_core::Tensor| -> f32 {
            t.abs()
                .and_then(|a| a.max_all())
                .and_then(|m| m.to_scalar::<f32>())
                .unwrap()
        };
        let (err, scale) = (largest(&(got - want).unwrap()), largest(want));
        println!("{key}: max |Δ| {err:.1e} of {scale:.2}");
        assert!(err <= 1e-5 * scale.max(1.0), "{key}: {err} of {scale}");
    }
    let ours = render("sd15", &[("../lycoris/sd15_lycoris.safetensors", 1.0)]).unwrap();
    let theirs = image::open(fixtures().join("lycoris/sd15_merged.png"))
        .unwrap()
        .to_rgb8();
    let (mean, over2) = compare(&ours, &theirs);
    println!(
        "merged picture: mean |Δ| {mean:.3}, {:.2} % > 2",
        over2 * 100.0
    );
    assert!(mean <= 1.0 && over2 < 0.01);
}

/// The kohya file with its U-Net keys renamed to the original LDM layout
/// (`lora_unet_input_blocks_1_1_…`) gives the same picture.
#[test]
fn kohya_names_in_the_original_layout_resolve() {
    use ldm_models::weights::original::flat_ldm_unet_module;
    let folder = ldm_models::model::ModelFolder::open(&fixtures().join("tiny/sd15")).unwrap();
    let cfg = &folder.unet;
    // Every original-layout module name of this U-Net, by the diffusers name it maps to.
    let parts = [
        "in_layers_0",
        "in_layers_2",
        "emb_layers_1",
        "out_layers_0",
        "out_layers_3",
        "skip_connection",
        "op",
        "conv",
        "proj_in",
        "proj_out",
        "norm",
    ];
    let attention = [
        "attn1_to_q",
        "attn1_to_k",
        "attn1_to_v",
        "attn1_to_out_0",
        "attn2_to_q",
        "attn2_to_k",
        "attn2_to_v",
        "attn2_to_out_0",
        "ff_net_0_proj",
        "ff_net_2",
    ];
    let mut inverse = std::collections::HashMap::new();
    let mut candidates = Vec::new();
    for block in ["input_blocks", "output_blocks"] {
        for k in 0..12 {
            for m in 0..3 {
                for p in parts {
                    candidates.push(format!("{block}_{k}_{m}_{p}"));
                }
                for a in attention {
                    candidates.push(format!("{block}_{k}_{m}_transformer_blocks_0_{a}"));
                }
            }
        }
    }
    for m in 0..3 {
        for p in parts {
            candidates.push(format!("middle_block_{m}_{p}"));
        }
        for a in attention {
            candidates.push(format!("middle_block_{m}_transformer_blocks_0_{a}"));
        }
    }
    for c in candidates {
        if let Some(d) = flat_ldm_unet_module(&c, cfg) {
            inverse.entry(d).or_insert(c);
        }
    }
    let dev = Device::Cpu;
    let tensors =
        candle_core::safetensors::load(fixtures().join("lora/sd15_kohya.safetensors"), &dev)
            .unwrap();
    let mut renamed = std::collections::HashMap::new();
    for (k, v) in tensors {
        let key = match k.strip_prefix("lora_unet_").and_then(|r| r.split_once('.')) {
            Some((module, part)) => format!("lora_unet_{}.{part}", inverse[module]),
            None => k,
        };
        renamed.insert(key, v);
    }
    assert!(renamed
        .keys()
        .any(|k| k.starts_with("lora_unet_input_blocks_1_1_")));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ldm_names.safetensors");
    candle_core::safetensors::save(&renamed, &file).unwrap();
    let ours = render("sd15", &[(file.to_str().unwrap(), 1.0)]).unwrap();
    let (mean, _) = compare(&ours, &expect("sd15_kohya"));
    assert!(mean <= 1.0, "{mean}");
}

/// DoRA (`tools/oracle/make_dora_fixtures.py`): peft's `use_dora` adapters on the tiny SD1.5
/// U-Net (linear and convolution layers, magnitudes moved off their starting norms) give
/// diffusers' picture; without their magnitudes the same factors do not. A kohya/LyCORIS file
/// with magnitudes on the output and the input axis merges to the updates the script computes,
/// at multiplier 1 and at 0.6 (blended, as A1111 and ComfyUI apply a multiplier).
#[test]
fn dora_matches_diffusers_and_its_formula() {
    use ldm_models::lora::{LoraFile, LoraTarget};
    let dev = Device::Cpu;
    let dora = fixtures().join("dora");
    let theirs = image::open(dora.join("sd15_peft_dora.png"))
        .unwrap()
        .to_rgb8();
    let ours = render("sd15", &[("../dora/sd15_peft_dora.safetensors", 1.0)]).unwrap();
    let (mean, over2) = compare(&ours, &theirs);
    println!("peft DoRA: mean |Δ| {mean:.3}, {:.2} % > 2", over2 * 100.0);
    assert!(mean <= 1.0 && over2 < 0.01, "{mean}");
    // The same file without its magnitudes is plain LoRA: visibly another picture.
    let tmp = tempfile::tempdir().unwrap();
    let plain = tmp.path().join("plain.safetensors");
    let tensors: std::collections::HashMap<String, candle_core::Tensor> =
        candle_core::safetensors::load(dora.join("sd15_peft_dora.safetensors"), &dev)
            .unwrap()
            .into_iter()
            .filter(|(k, _)| !k.contains("lora_magnitude_vector"))
            .collect();
    candle_core::safetensors::save(&tensors, &plain).unwrap();
    let without = render("sd15", &[(plain.to_str().unwrap(), 1.0)]).unwrap();
    let (apart, _) = compare(&without, &theirs);
    println!("without the magnitudes: mean |Δ| {apart:.3}");
    assert!(apart > 3.0, "{apart}");

    let folder = ldm_models::model::ModelFolder::open(&fixtures().join("tiny/sd15")).unwrap();
    let nets = folder.lora_targets().unwrap();
    let lora = LoraFile::open(&dora.join("sd15_kohya_dora.safetensors"), &nets, &dev).unwrap();
    for s in ["1.0", "0.6"] {
        let mut patches = std::collections::BTreeMap::new();
        let m: f64 = s.parse().unwrap();
        lora.add_to(LoraTarget::Unet, &mut patches, m, &nets[&LoraTarget::Unet])
            .unwrap();
        let expected = candle_core::safetensors::load(
            dora.join(format!("expected_kohya_{s}.safetensors")),
            &dev,
        )
        .unwrap();
        assert_eq!(patches.len(), expected.len());
        for (key, want) in &expected {
            let largest = |t: &candle_core::Tensor| -> f32 {
                t.abs()
                    .and_then(|a| a.max_all())
                    .and_then(|m| m.to_scalar::<f32>())
                    .unwrap()
            };
            let (err, scale) = (largest(&(&patches[key] - want).unwrap()), largest(want));
            println!("kohya DoRA ×{s} {key}: max |Δ| {err:.1e} of {scale:.2}");
            assert!(err <= 1e-5 * scale.max(1.0), "{key}: {err} of {scale}");
        }
    }
}

/// Text-encoder LoRA layers on a fused attention input projection (`…self_attn_in_proj`, and
/// OpenCLIP's own `transformer_resblocks_N_attn_in_proj`): q, k and v stacked by rows, each
/// weight taking its third of the update. The SDXL kohya file with its second encoder's q/k/v
/// factors fused (block-diagonal up, stacked down, α × 3 for the tripled rank) gives the same
/// picture as the file itself.
#[test]
fn fused_qkv_layers_split_over_q_k_and_v() {
    use candle_core::Tensor;
    use std::collections::HashMap;
    let dev = Device::Cpu;
    let src = candle_core::safetensors::load(fixtures().join("lora/sdxl_kohya.safetensors"), &dev)
        .unwrap();
    let mut out: HashMap<String, Tensor> = HashMap::new();
    let mut fused = 0;
    for (k, v) in &src {
        let is_qkv = k.starts_with("lora_te2_")
            && ["_q_proj.", "_k_proj.", "_v_proj."]
                .iter()
                .any(|p| k.contains(p));
        if !is_qkv {
            out.insert(k.clone(), v.clone());
        }
    }
    for layer in 0.. {
        let base = format!("lora_te2_text_model_encoder_layers_{layer}_self_attn_");
        let part = |p: &str, t: &str| src.get(&format!("{base}{p}_proj.{t}")).cloned();
        let Some(dq) = part("q", "lora_down.weight") else {
            break;
        };
        let (dk, dv) = (
            part("k", "lora_down.weight").unwrap(),
            part("v", "lora_down.weight").unwrap(),
        );
        let ups = ["q", "k", "v"].map(|p| part(p, "lora_up.weight").unwrap());
        let (d, r) = ups[0].dims2().unwrap();
        let down = Tensor::cat(&[&dq, &dk, &dv], 0).unwrap();
        let mut up = Tensor::zeros((3 * d, 3 * r), DType::F32, &dev).unwrap();
        for (i, u) in ups.iter().enumerate() {
            up = up
                .slice_assign(&[i * d..(i + 1) * d, i * r..(i + 1) * r], u)
                .unwrap();
        }
        let alpha = part("q", "alpha").unwrap();
        // Half the layers in OpenCLIP's own names.
        let name = if layer % 2 == 0 {
            format!("{base}in_proj")
        } else {
            format!("lora_te2_model_transformer_resblocks_{layer}_attn_in_proj")
        };
        out.insert(format!("{name}.lora_down.weight"), down);
        out.insert(format!("{name}.lora_up.weight"), up);
        out.insert(format!("{name}.alpha"), (alpha * 3.0).unwrap());
        fused += 1;
    }
    assert!(fused >= 2, "{fused}");
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("fused.safetensors");
    candle_core::safetensors::save(&out, &file).unwrap();
    let ours = render("sdxl", &[(file.to_str().unwrap(), 1.4)]).unwrap();
    let (mean, over2) = compare(&ours, &expect("sdxl_peft"));
    println!(
        "fused q/k/v: mean |Δ| {mean:.3}, {:.2} % > 2",
        over2 * 100.0
    );
    assert!(mean <= 1.0 && over2 < 0.01, "{mean}");
}

/// Textual-inversion embeddings survive a LoRA merge (the rebuilt text encoder keeps the added
/// rows, so `--embeddings` and `--lora` work together), and a LoRA file that bundles the same
/// embedding (`bundle_emb.NAME.string_to_param.*`, as kohya and A1111 write them) gives the same
/// picture on its own.
#[test]
fn embeddings_survive_loras_and_bundled_ones_load() {
    use std::collections::HashMap;
    let dev = Device::Cpu;
    let f = fixtures();
    let req = Request {
        prompt: "a red circle shapestyle".into(),
        width: 32,
        height: 32,
        steps: 8,
        seed: 1,
        ..Request::default()
    };
    let run = |c: &Components| generate(c, &req, &mut NoHook).unwrap().images[0].clone();
    let lora = ldm_models::lora::LoraSpec::new(f.join("lora/sd15_peft.safetensors"), 1.0);

    let mut c = Components::load(&f.join("tiny/sd15"), DType::F32, &dev).unwrap();
    let base_vocab = c.text_encoders[0].1.config.vocab_size;
    c.load_embeddings(&f.join("embeddings/sd15")).unwrap();
    let added = c.text_encoders[0]
        .1
        .token_embeddings_from(base_vocab)
        .unwrap()
        .unwrap();
    c.apply_loras(std::slice::from_ref(&lora)).unwrap();
    let kept = c.text_encoders[0]
        .1
        .token_embeddings_from(base_vocab)
        .unwrap()
        .unwrap();
    assert_eq!(
        added.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        kept.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    let both = run(&c);

    let mut tensors: HashMap<String, candle_core::Tensor> =
        candle_core::safetensors::load(f.join("lora/sd15_peft.safetensors"), &dev)
            .unwrap()
            .into_iter()
            .collect();
    let emb =
        candle_core::safetensors::load(f.join("embeddings/sd15/shapestyle.safetensors"), &dev)
            .unwrap();
    tensors.insert(
        "bundle_emb.shapestyle.string_to_param.*".into(),
        emb["emb_params"].clone(),
    );
    let tmp = tempfile::tempdir().unwrap();
    let bundled = tmp.path().join("bundled.safetensors");
    candle_core::safetensors::save(&tensors, &bundled).unwrap();
    let mut c2 = Components::load(&f.join("tiny/sd15"), DType::F32, &dev).unwrap();
    c2.apply_loras(&[ldm_models::lora::LoraSpec::new(&bundled, 1.0)])
        .unwrap();
    let (same, _) = compare(&run(&c2), &both);
    assert_eq!(
        same, 0.0,
        "the bundled embedding, as if loaded from the folder"
    );

    let mut c3 = Components::load(&f.join("tiny/sd15"), DType::F32, &dev).unwrap();
    c3.apply_loras(&[lora]).unwrap();
    let (apart, _) = compare(&run(&c3), &both);
    println!("with the embedding against the word's plain tokens: {apart:.3} levels");
    assert!(apart > 1.0, "{apart}");
}
