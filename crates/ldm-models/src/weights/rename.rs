//! Key renaming: the one place where other checkpoint layouts are translated to the module paths
//! our constructors use (which are diffusers' and transformers' released key names).

/// Buffers some exporters save that are not parameters (they are recomputed, never loaded).
pub fn is_ignorable_buffer(key: &str) -> bool {
    key.ends_with("embeddings.position_ids")
}

/// Whether a CLIP checkpoint uses the released layout (tower under `text_model.`).
pub fn has_clip_prefix<'a>(mut keys: impl Iterator<Item = &'a String>) -> bool {
    keys.any(|k| k.starts_with("text_model."))
}

/// Released SD folders name the CLIP tower `text_model.*`; transformers 5 saves `CLIPTextModel`
/// without that prefix. Brings `key` to the released layout (`prefixed` from [`has_clip_prefix`]).
pub fn clip_text_key(key: &str, prefixed: bool) -> String {
    let tower = key.starts_with("embeddings.")
        || key.starts_with("encoder.")
        || key.starts_with("final_layer_norm.");
    if !prefixed && tower {
        format!("text_model.{key}")
    } else {
        key.to_string()
    }
}

/// diffusers before 0.14 saved the VAE's mid-block attention as `query`/`key`/`value`/`proj_attn`.
pub fn vae_legacy_attention(key: &str) -> String {
    const MAP: [(&str, &str); 4] = [
        (".query.", ".to_q."),
        (".key.", ".to_k."),
        (".value.", ".to_v."),
        (".proj_attn.", ".to_out.0."),
    ];
    for (old, new) in MAP {
        if key.contains(".attentions.") && key.contains(old) {
            return key.replacen(old, new, 1);
        }
    }
    key.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_prefix_added_only_when_absent() {
        let bare = ["embeddings.token_embedding.weight".to_string()];
        assert!(!has_clip_prefix(bare.iter()));
        assert_eq!(
            clip_text_key("encoder.layers.0.mlp.fc1.weight", false),
            "text_model.encoder.layers.0.mlp.fc1.weight"
        );
        assert_eq!(
            clip_text_key("text_projection.weight", false),
            "text_projection.weight"
        );
        let released = ["text_model.embeddings.token_embedding.weight".to_string()];
        assert!(has_clip_prefix(released.iter()));
        assert_eq!(
            clip_text_key("text_model.final_layer_norm.bias", true),
            "text_model.final_layer_norm.bias"
        );
    }

    #[test]
    fn legacy_vae_attention_names() {
        assert_eq!(
            vae_legacy_attention("encoder.mid_block.attentions.0.proj_attn.weight"),
            "encoder.mid_block.attentions.0.to_out.0.weight"
        );
        assert_eq!(
            vae_legacy_attention("encoder.mid_block.attentions.0.key.bias"),
            "encoder.mid_block.attentions.0.to_k.bias"
        );
        assert_eq!(
            vae_legacy_attention("decoder.conv_in.weight"),
            "decoder.conv_in.weight"
        );
    }
}
