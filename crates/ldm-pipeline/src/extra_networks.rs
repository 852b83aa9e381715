//! A1111's extra-network tags in prompts (`modules/extra_networks.py`): `<lora:NAME>`,
//! `<lora:NAME:W>` and `<lora:NAME:TE_W:UNET_W>` (also `te=`/`unet=` named, and `lyco:` for
//! LyCORIS files) are taken out of the prompt text; the text-encoder multiplier defaults to 1
//! and the U-Net's to the text encoder's. Names are looked up as file stems in the LoRA folders
//! (or by the `ss_output_name` a kohya file records), as A1111 does.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// One `<lora:…>` tag.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTag {
    pub name: String,
    pub text_encoder: f64,
    pub unet: f64,
}

/// Removes the `<lora:…>` / `<lyco:…>` tags from `prompt`, returning the text left and the
/// tags. Other `<…>` text is left alone.
pub fn extract(prompt: &str) -> Result<(String, Vec<LoraTag>)> {
    let mut text = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut rest = prompt;
    while let Some(open) = rest.find('<') {
        let after = &rest[open + 1..];
        let kind_len = after
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let kind = &after[..kind_len];
        let is_lora = matches!(kind, "lora" | "lyco") && after[kind_len..].starts_with(':');
        let close = after.find('>');
        match (is_lora, close) {
            (true, Some(close)) => {
                text.push_str(&rest[..open]);
                tags.push(parse_tag(&after[kind_len + 1..close])?);
                rest = &after[close + 1..];
            }
            _ => {
                text.push_str(&rest[..open + 1]);
                rest = after;
            }
        }
    }
    text.push_str(rest);
    Ok((text, tags))
}

fn parse_tag(args: &str) -> Result<LoraTag> {
    let bad = |msg: String| Error::InvalidRequest(format!("<lora:{args}>: {msg}"));
    let mut parts = args.split(':');
    let name = parts.next().unwrap_or("").trim().to_string();
    if name.is_empty() {
        return Err(bad("no LoRA name".into()));
    }
    let (mut positional, mut te, mut unet) = (Vec::new(), None, None);
    for p in parts {
        let p = p.trim();
        let number = |s: &str| {
            s.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| bad(format!("`{s}` is not a number")))
        };
        if let Some(v) = p.strip_prefix("te=") {
            te = Some(number(v)?);
        } else if let Some(v) = p.strip_prefix("unet=") {
            unet = Some(number(v)?);
        } else if p.contains('=') {
            // Other named arguments (A1111's `dyn=`) do not apply here.
            continue;
        } else {
            positional.push(number(p)?);
        }
    }
    let text_encoder = te.or(positional.first().copied()).unwrap_or(1.0);
    let unet = unet.or(positional.get(1).copied()).unwrap_or(text_encoder);
    Ok(LoraTag {
        name,
        text_encoder,
        unet,
    })
}

/// The `ss_output_name` a kohya-trained file records in its safetensors metadata.
fn output_name(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return None;
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
    v.get("__metadata__")?
        .get("ss_output_name")?
        .as_str()
        .map(String::from)
}

/// Finds the file a tag names in `dirs`: a `.safetensors` whose stem is the name (exactly,
/// then ignoring case), or whose `ss_output_name` is.
pub fn find_lora(name: &str, dirs: &[PathBuf]) -> Option<PathBuf> {
    let files = lora_files(dirs);
    let stem = |p: &PathBuf| p.file_stem().map(|s| s.to_string_lossy().into_owned());
    files
        .iter()
        .find(|p| stem(p).as_deref() == Some(name))
        .or_else(|| {
            files
                .iter()
                .find(|p| stem(p).is_some_and(|s| s.eq_ignore_ascii_case(name)))
        })
        .or_else(|| {
            files
                .iter()
                .find(|p| output_name(p).as_deref() == Some(name))
        })
        .cloned()
}

/// A1111's short hash of a LoRA file (the first 12 hex digits of its SHA-256), as its
/// `Lora hashes` parameter records it.
pub fn short_hash(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(name: &str, te: f64, unet: f64) -> LoraTag {
        LoraTag {
            name: name.into(),
            text_encoder: te,
            unet,
        }
    }

    #[test]
    fn tags_leave_the_prompt_with_their_multipliers() {
        let (text, tags) =
            extract("a cat <lora:style:0.8>, <lora:detail:0.5:1.2> in <b>bold</b> <lyco:x>")
                .unwrap();
        assert_eq!(text, "a cat ,  in <b>bold</b> ");
        assert_eq!(
            tags,
            vec![
                tag("style", 0.8, 0.8),
                tag("detail", 0.5, 1.2),
                tag("x", 1.0, 1.0)
            ]
        );
        let (_, tags) = extract("<lora:a:te=0.3:unet=0.7:dyn=16>").unwrap();
        assert_eq!(tags, vec![tag("a", 0.3, 0.7)]);
        let (text, tags) = extract("no tags <here").unwrap();
        assert_eq!((text.as_str(), tags.len()), ("no tags <here", 0));
        assert!(extract("<lora:a:lots>").is_err());
        assert!(extract("<lora::1>").is_err());
    }

    #[test]
    fn names_are_file_stems_or_output_names() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, meta: &str| {
            let header = format!("{{\"__metadata__\":{{{meta}}}}}");
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend(header.as_bytes());
            std::fs::write(dir.path().join(name), bytes).unwrap();
        };
        write("Style.safetensors", "");
        write("v2-final.safetensors", "\"ss_output_name\":\"detail\"");
        let dirs = [dir.path().to_path_buf()];
        let found = |n: &str| {
            find_lora(n, &dirs).map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        };
        assert_eq!(found("Style").as_deref(), Some("Style.safetensors"));
        assert_eq!(found("style").as_deref(), Some("Style.safetensors"));
        assert_eq!(found("detail").as_deref(), Some("v2-final.safetensors"));
        assert_eq!(found("missing"), None);
        assert_eq!(
            short_hash(&dir.path().join("Style.safetensors"))
                .unwrap()
                .len(),
            12
        );
    }
}

/// A prompt's `<lora:…>` tags resolved in `dirs`: the prompt without them, the files to merge
/// at their multipliers, A1111's `Lora hashes` entries (`NAME: hash`), and the names no file
/// matched.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PromptLoras {
    pub text: String,
    pub specs: Vec<ldm_models::lora::LoraSpec>,
    pub hashes: Vec<String>,
    pub missing: Vec<String>,
}

/// Resolves `prompt`'s tags ([`extract`], [`find_lora`], [`short_hash`]).
pub fn prompt_loras(prompt: &str, dirs: &[PathBuf]) -> Result<PromptLoras> {
    let (text, tags) = extract(prompt)?;
    let mut out = PromptLoras {
        text,
        ..PromptLoras::default()
    };
    for tag in tags {
        match find_lora(&tag.name, dirs) {
            Some(path) => {
                out.hashes
                    .push(format!("{}: {}", tag.name, short_hash(&path)?));
                out.specs.push(ldm_models::lora::LoraSpec {
                    path,
                    text_encoder: tag.text_encoder,
                    unet: tag.unet,
                });
            }
            None => out.missing.push(tag.name),
        }
    }
    Ok(out)
}

/// The LoRA files in `dirs` as A1111's `/sdapi/v1/loras` lists them: `(name, alias, path)`,
/// the alias being the `ss_output_name` a kohya file records (else the name).
pub fn list_loras(dirs: &[PathBuf]) -> Vec<(String, String, PathBuf)> {
    lora_files(dirs)
        .into_iter()
        .filter_map(|p| {
            let name = p.file_stem()?.to_string_lossy().into_owned();
            let alias = output_name(&p).unwrap_or_else(|| name.clone());
            Some((name, alias, p))
        })
        .collect()
}

/// The `.safetensors` files in `dirs` (unreadable folders skipped), sorted.
fn lora_files(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = dirs
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flat_map(|entries| entries.flatten().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x.eq_ignore_ascii_case("safetensors"))
                && p.is_file()
        })
        .collect();
    files.sort();
    files
}
