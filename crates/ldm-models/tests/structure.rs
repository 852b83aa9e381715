//! Full-size structure without weights: the SD1.5, SD2.1, SDXL-base and SDXL-refiner networks
//! are built from their real `config.json` files through a recording backend that allocates
//! nothing, and every parameter name and shape is checked against the lists the oracle script
//! wrote from diffusers / transformers (`fixtures/structure/`).

mod common;

use ldm_models::clip::{ClipTextConfig, ClipTextModel};
use ldm_models::unet::{UNet2DConditionModel, UNetConfig};
use ldm_models::vae::{AutoencoderKL, VaeConfig};
use ldm_models::weights::{rename, StructureRecorder};
use std::collections::BTreeMap;
use std::path::Path;

fn oracle_list(path: &Path) -> BTreeMap<String, Vec<usize>> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            let (name, shape) = line.split_once('\t').expect("name<TAB>shape");
            let shape = if shape.is_empty() {
                vec![]
            } else {
                shape.split(',').map(|d| d.parse().unwrap()).collect()
            };
            (name.to_string(), shape)
        })
        .collect()
}

fn compare(
    what: &str,
    ours: BTreeMap<String, Vec<usize>>,
    oracle: BTreeMap<String, Vec<usize>>,
) -> usize {
    let missing: Vec<_> = oracle.keys().filter(|k| !ours.contains_key(*k)).collect();
    let extra: Vec<_> = ours.keys().filter(|k| !oracle.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: missing {missing:?}, extra {extra:?}"
    );
    for (k, shape) in &oracle {
        assert_eq!(&ours[k], shape, "{what}: shape of {k}");
    }
    let params: usize = oracle.values().map(|s| s.iter().product::<usize>()).sum();
    println!(
        "{what}: {} tensors, {params} parameters identical",
        oracle.len()
    );
    params
}

fn check_model(model: &str) {
    let configs = common::fixtures().join("configs").join(model);
    let lists = common::fixtures().join("structure").join(model);

    let rec = StructureRecorder::new();
    let cfg = UNetConfig::from_file(&configs.join("unet/config.json")).unwrap();
    UNet2DConditionModel::new(rec.var_builder(), &cfg).unwrap();
    compare(
        &format!("{model} unet"),
        rec.parameters(),
        oracle_list(&lists.join("unet.txt")),
    );

    let rec = StructureRecorder::new();
    let cfg = VaeConfig::from_file(&configs.join("vae/config.json")).unwrap();
    AutoencoderKL::new(rec.var_builder(), &cfg).unwrap();
    compare(
        &format!("{model} vae"),
        rec.parameters(),
        oracle_list(&lists.join("vae.txt")),
    );

    for te in ["text_encoder", "text_encoder_2"] {
        let cfg_path = configs.join(te).join("config.json");
        if !cfg_path.exists() {
            continue;
        }
        let rec = StructureRecorder::new();
        let cfg = ClipTextConfig::from_file(&cfg_path).unwrap();
        ClipTextModel::new(rec.var_builder(), &cfg).unwrap();
        let raw = oracle_list(&lists.join(format!("{te}.txt")));
        let prefixed = rename::has_clip_prefix(raw.keys());
        let oracle = raw
            .into_iter()
            .filter(|(k, _)| !rename::is_ignorable_buffer(k))
            .map(|(k, v)| (rename::clip_text_key(&k, prefixed), v))
            .collect();
        compare(&format!("{model} {te}"), rec.parameters(), oracle);
    }
}

#[test]
fn sd15_full_size_structure() {
    check_model("sd15");
}

#[test]
fn sd21_full_size_structure() {
    check_model("sd21");
}

#[test]
fn sdxl_base_full_size_structure() {
    check_model("sdxl_base");
}

#[test]
fn sdxl_refiner_full_size_structure() {
    check_model("sdxl_refiner");
}

#[test]
fn sd15_parameter_counts_are_the_released_ones() {
    let lists = common::fixtures().join("structure/sd15");
    let count = |f: &str| -> usize {
        oracle_list(&lists.join(f))
            .iter()
            .filter(|(k, _)| !rename::is_ignorable_buffer(k))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    };
    assert_eq!(count("unet.txt"), 859_520_964);
    assert_eq!(count("vae.txt"), 83_653_863);
    assert_eq!(count("text_encoder.txt"), 123_060_480);
}
