//! A CLIP BPE tokenizer for the Shapes World vocabulary, written in CLIP's files (`vocab.json`,
//! `merges.txt`, `tokenizer_config.json`, `special_tokens_map.json`) so that our loader and
//! transformers' `CLIPTokenizer` both read it. Like CLIP's, the vocabulary starts with the 256
//! byte symbols and their end-of-word forms, so any text tokenizes; merges then build every
//! Shapes word into a single token.

use crate::{Error, Result};
use ldm_models::clip::tokenizer::ClipTokenizer;
use std::collections::BTreeSet;
use std::path::Path;

/// Every word Shapes World captions use.
pub fn shapes_words() -> Vec<&'static str> {
    use crate::shapes::{Position, Relation, Shape, PALETTE};
    let mut words: BTreeSet<&'static str> = BTreeSet::new();
    words.extend(["a", "an", "small", "large", "on", "background"]);
    words.extend(PALETTE.iter().map(|(n, _)| *n));
    words.extend(Shape::ALL.iter().map(|s| s.name()));
    for phrase in Position::ALL.iter().map(|p| p.phrase()) {
        words.extend(phrase.split(' '));
    }
    for phrase in Relation::ALL.iter().map(|r| r.phrase()) {
        words.extend(phrase.split(' '));
    }
    words.into_iter().collect()
}

/// GPT-2/CLIP's reversible map from bytes to printable characters.
fn byte_symbols() -> Vec<char> {
    let printable = |b: u32| {
        (b'!' as u32..=b'~' as u32).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b)
    };
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap_or('?')
            }
        })
        .collect()
}

/// Writes the tokenizer files for `words` into `dir`, padding to `context` tokens, and returns
/// the loaded tokenizer.
pub fn write_tokenizer(dir: &Path, words: &[&str], context: usize) -> Result<ClipTokenizer> {
    std::fs::create_dir_all(dir)?;
    let symbols = byte_symbols();
    let mut vocab: Vec<String> = symbols.iter().map(|c| c.to_string()).collect();
    vocab.extend(symbols.iter().map(|c| format!("{c}</w>")));
    let mut merges: Vec<(String, String)> = Vec::new();
    // Each word is merged left to right; a word that another word's merges split differently
    // gets merges for the pieces it actually ends up in, until every word is one token.
    let mut pending: Vec<Vec<String>> = words
        .iter()
        .map(|w| {
            let chars: Vec<char> = w.chars().collect();
            chars
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    if i + 1 == chars.len() {
                        format!("{c}</w>")
                    } else {
                        c.to_string()
                    }
                })
                .collect()
        })
        .collect();
    for _round in 0..8 {
        for pieces in &pending {
            let mut acc = pieces[0].clone();
            for p in &pieces[1..] {
                let merged = format!("{acc}{p}");
                if !merges.contains(&(acc.clone(), p.clone())) {
                    merges.push((acc.clone(), p.clone()));
                }
                if !vocab.contains(&merged) {
                    vocab.push(merged.clone());
                }
                acc = merged;
            }
        }
        let tok = save(dir, &vocab, &merges, context)?;
        pending.clear();
        for w in words {
            let ids = tok.encode_raw(w)?;
            if ids.len() != 1 {
                let pieces = ids
                    .iter()
                    .map(|&id| {
                        tok.id_to_token(id)
                            .ok_or_else(|| Error::Msg(format!("tokenizer: id {id} has no token")))
                    })
                    .collect::<Result<Vec<String>>>()?;
                pending.push(pieces);
            }
        }
        if pending.is_empty() {
            return Ok(tok);
        }
    }
    Err(Error::Msg("tokenizer: merges did not converge".into()))
}

fn save(
    dir: &Path,
    vocab: &[String],
    merges: &[(String, String)],
    context: usize,
) -> Result<ClipTokenizer> {
    let mut map = serde_json::Map::new();
    for (i, v) in vocab.iter().enumerate() {
        map.insert(v.clone(), i.into());
    }
    let n = vocab.len();
    map.insert("<|startoftext|>".into(), n.into());
    map.insert("<|endoftext|>".into(), (n + 1).into());
    crate::io::write_atomic(
        &dir.join("vocab.json"),
        serde_json::to_string(&serde_json::Value::Object(map))?.as_bytes(),
    )?;
    let mut text = String::from("#version: 0.2\n");
    for (a, b) in merges {
        text += &format!("{a} {b}\n");
    }
    crate::io::write_atomic(&dir.join("merges.txt"), text.as_bytes())?;
    let special = serde_json::json!({
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    });
    let mut config = special.clone();
    config["model_max_length"] = context.into();
    config["tokenizer_class"] = "CLIPTokenizer".into();
    config["do_lower_case"] = true.into();
    crate::io::write_json(&dir.join("tokenizer_config.json"), &config)?;
    crate::io::write_json(&dir.join("special_tokens_map.json"), &special)?;
    Ok(ClipTokenizer::from_vocab_merges(dir)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shapes_word_is_one_token_and_any_text_tokenizes() {
        let dir = tempfile::tempdir().unwrap();
        let words = shapes_words();
        let tok = write_tokenizer(dir.path(), &words, 32).unwrap();
        let mut ids = BTreeSet::new();
        for w in &words {
            let raw = tok.encode_raw(w).unwrap();
            assert_eq!(raw.len(), 1, "{w}: {raw:?}");
            ids.insert(raw[0]);
        }
        assert_eq!(ids.len(), words.len());
        let caption = "a large red circle on the left on a blue background";
        assert_eq!(tok.encode_raw(caption).unwrap().len(), 11);
        let odd = tok.encode_raw("A zebra!! ünïcode").unwrap();
        assert!(!odd.is_empty());
        let full = tok.encode(caption).unwrap();
        assert_eq!(full.len(), 32);
    }
}
