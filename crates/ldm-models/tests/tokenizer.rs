//! CLIP tokenizer ids against transformers' `CLIPTokenizer` on awkward strings (fixture
//! `fixtures/tiny/tokenizer_cases.json`, written by the oracle script): ids identical.

mod common;

use ldm_models::clip::ClipTokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    tokenizer: String,
    text: String,
    ids: Vec<u32>,
}

fn cases() -> Vec<Case> {
    let path = common::fixtures().join("tiny/tokenizer_cases.json");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn check(load: fn(&std::path::Path) -> ldm_models::Result<ClipTokenizer>, how: &str) {
    let cases = cases();
    assert!(cases.len() >= 20, "too few tokenizer cases");
    let mut tokenizers = std::collections::HashMap::new();
    for case in &cases {
        let tok = tokenizers.entry(case.tokenizer.clone()).or_insert_with(|| {
            load(&common::tiny(&case.tokenizer))
                .unwrap_or_else(|e| panic!("{}: {e}", case.tokenizer))
        });
        let ids = tok.encode(&case.text).unwrap();
        assert_eq!(ids, case.ids, "{how} {}: {:?}", case.tokenizer, case.text);
    }
    println!("{how}: {} cases identical", cases.len());
}

#[test]
fn folder_tokenizer_matches_transformers() {
    check(ClipTokenizer::from_folder, "folder");
}

#[test]
fn vocab_and_merges_alone_match_transformers() {
    check(ClipTokenizer::from_vocab_merges, "vocab.json+merges.txt");
}

#[test]
fn long_prompts_truncate_to_77_with_end_token() {
    let tok = ClipTokenizer::from_folder(&common::tiny("sd15/tokenizer")).unwrap();
    let ids = tok.encode(&"red circle ".repeat(100)).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[0], tok.bos_id);
    assert_eq!(ids[76], tok.eos_id);
    let empty = tok.encode("").unwrap();
    assert_eq!(&empty[..2], &[tok.bos_id, tok.eos_id]);
    assert!(empty[2..].iter().all(|&i| i == tok.pad_id));
}
