//! The CLIP BPE tokenizer (Radford et al. 2021; Sennrich et al. 2016 byte-level BPE), giving
//! transformers' `CLIPTokenizer` ids. Built on the `tokenizers` crate: from a folder's
//! `tokenizer.json` when present, otherwise from `vocab.json` + `merges.txt` with CLIP's
//! normalisation (NFC, whitespace runs to one space, lower case), its split pattern, byte-level
//! BPE with the `</w>` end-of-word suffix, then start/end tokens, truncation and padding to 77.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// CLIP's pre-tokenisation pattern (transformers' `CLIPTokenizer.pat`, case-folded beforehand).
const CLIP_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

/// A CLIP tokenizer with its special ids and context length.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    /// Added multi-vector tokens: the id the name tokenizes to → the ids it stands for.
    expansions: std::collections::HashMap<u32, Vec<u32>>,
    pub bos_id: u32,
    pub eos_id: u32,
    pub pad_id: u32,
    pub max_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("path", &self.path)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_length", &self.max_length)
            .finish()
    }
}

fn tok_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Tokenizer {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

/// A special token in `tokenizer_config.json` / `special_tokens_map.json`: a string or
/// `{"content": ...}`.
fn special_token(json: &serde_json::Value, key: &str) -> Option<String> {
    match json.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

fn read_optional_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::config(path, e.to_string()))
}

impl ClipTokenizer {
    /// Loads a tokenizer folder: `tokenizer.json` if present, else `vocab.json` + `merges.txt`.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let inner = if json.exists() {
            let mut t = Tokenizer::from_file(&json).map_err(|e| tok_err(&json, e))?;
            t.with_padding(None);
            t.with_truncation(None).map_err(|e| tok_err(&json, e))?;
            t
        } else {
            Self::build_bpe(dir)?
        };
        Self::finish(inner, dir)
    }

    /// Loads from `vocab.json` + `merges.txt` only, ignoring any `tokenizer.json`.
    pub fn from_vocab_merges(dir: &Path) -> Result<Self> {
        let inner = Self::build_bpe(dir)?;
        Self::finish(inner, dir)
    }

    fn build_bpe(dir: &Path) -> Result<Tokenizer> {
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        for p in [&vocab, &merges] {
            if !p.exists() {
                return Err(tok_err(dir, format!("missing {}", p.display())));
            }
        }
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .unk_token(EOS.into())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .build()
            .map_err(|e| tok_err(dir, e))?;
        let mut t = Tokenizer::new(bpe);
        let whitespace = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(|e| tok_err(dir, e))?;
        t.with_normalizer(Some(NormSeq::new(vec![
            NFC.into(),
            whitespace.into(),
            Lowercase.into(),
        ])));
        let split = Split::new(
            SplitPattern::Regex(CLIP_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| tok_err(dir, e))?;
        t.with_pre_tokenizer(Some(PreSeq::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])));
        Ok(t)
    }

    fn finish(mut inner: Tokenizer, dir: &Path) -> Result<Self> {
        let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let special = read_optional_json(&dir.join("special_tokens_map.json"))?;
        let lookup = |key: &str| {
            config
                .as_ref()
                .and_then(|c| special_token(c, key))
                .or_else(|| special.as_ref().and_then(|s| special_token(s, key)))
        };
        let bos = lookup("bos_token").unwrap_or_else(|| BOS.into());
        let eos = lookup("eos_token").unwrap_or_else(|| EOS.into());
        let pad = lookup("pad_token").unwrap_or_else(|| EOS.into());
        let id = |token: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| tok_err(dir, format!("token `{token}` is not in the vocabulary")))
        };
        let bos_id = id(&bos)?;
        let eos_id = id(&eos)?;
        let pad_id = id(&pad)?;
        // As in transformers, special tokens are matched whole wherever they appear in the text
        // (so SD2's pad token "!" is never merged into a word). Already-known ones are no-ops.
        let specials: Vec<AddedToken> = [&bos, &eos, &pad]
            .into_iter()
            .map(|t| AddedToken::from(t.clone(), true))
            .collect();
        inner.add_special_tokens(&specials);
        // Some configs say "no limit" with a huge number; CLIP's context is 77.
        let max_length = config
            .as_ref()
            .and_then(|c| c.get("model_max_length"))
            .and_then(|v| v.as_u64())
            .filter(|&n| (2..=1024).contains(&n))
            .map_or(77, |n| n as usize);
        Ok(Self {
            inner,
            path: dir.to_path_buf(),
            expansions: Default::default(),
            bos_id,
            eos_id,
            pad_id,
            max_length,
        })
    }

    /// The BPE ids of `text`, without start/end tokens or padding; an added name of several
    /// vectors becomes all of their ids.
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| tok_err(&self.path, e))?;
        if self.expansions.is_empty() {
            return Ok(enc.get_ids().to_vec());
        }
        let mut ids = Vec::with_capacity(enc.get_ids().len());
        for id in enc.get_ids() {
            match self.expansions.get(id) {
                Some(all) => ids.extend_from_slice(all),
                None => ids.push(*id),
            }
        }
        Ok(ids)
    }

    /// Adds `name` as a token standing for `count` new ids (`name`, `name_1`, … as diffusers'
    /// `load_textual_inversion` names them), matched in prompts as one word; returns the new
    /// ids, which follow the vocabulary.
    pub fn add_token(&mut self, name: &str, count: usize) -> Result<Vec<u32>> {
        if name.trim().is_empty() || count == 0 {
            return Err(tok_err(
                &self.path,
                "an added token needs a name and a vector",
            ));
        }
        let names: Vec<String> = (0..count)
            .map(|i| {
                if i == 0 {
                    name.to_string()
                } else {
                    format!("{name}_{i}")
                }
            })
            .collect();
        if names.iter().any(|n| self.inner.token_to_id(n).is_some()) {
            return Err(tok_err(
                &self.path,
                format!("`{name}` is already a token of this tokenizer"),
            ));
        }
        let tokens: Vec<AddedToken> = names
            .iter()
            .map(|n| AddedToken::from(n.clone(), false))
            .collect();
        self.inner.add_tokens(&tokens);
        let ids = names
            .iter()
            .map(|n| {
                self.inner
                    .token_to_id(n)
                    .ok_or_else(|| tok_err(&self.path, format!("`{n}` was not added")))
            })
            .collect::<Result<Vec<u32>>>()?;
        self.expansions.insert(ids[0], ids.clone());
        Ok(ids)
    }

    /// `[start] tokens… [end] [pad]…` of exactly `max_length` ids, truncating long prompts.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let raw = self.encode_raw(text)?;
        let keep = raw.len().min(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&raw[..keep]);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// The token string of `id`, if it is in the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size, special tokens included.
    /// The id of a whole token (an added embedding's word, say), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
