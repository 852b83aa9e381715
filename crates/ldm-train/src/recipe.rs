//! The Shapes World model's architecture: diffusers configs for a small autoencoder, U-Net and
//! CLIP text encoder, written as the `config.json` files of a diffusers folder so that the
//! trained model loads like any Stable Diffusion model (here and in diffusers).

use serde_json::{json, Value};

/// Sizes of the Shapes model; [`Recipe::default`] is the embedded model's.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// Image side in pixels.
    pub image_size: usize,
    /// Autoencoder widths, one per resolution; the downsampling factor is `2^(len − 1)`.
    /// Factor 8 with 16 latent channels (16/32/64/64, as many latent values as 4 × 16²) was
    /// tried: 27.45 dB held-out PSNR after the recipe's 2500 steps against 30.6 dB, and its U-Net
    /// (10 000 steps) read back far worse (one object exact 1.0 %, colour 13.7 %).
    pub vae_channels: Vec<usize>,
    /// ResNet blocks per autoencoder level (diffusers' `layers_per_block`; the decoder has one
    /// more).
    pub vae_layers: usize,
    pub vae_groups: usize,
    /// Latent channels. 16/32/64 with 4 channels (the first embedded model) read back only
    /// 77 / 60 % of held-out scenes exactly (one / two objects): corners were lost. 32/64/64
    /// with 8 channels, trained 12 000 steps, reads back 99.6 / 99.3 %.
    pub latent_channels: usize,
    /// U-Net widths, one per resolution; the last level has no attention.
    pub unet_channels: Vec<usize>,
    /// GroupNorm groups in the U-Net. 32 groups leave 2 channels a group at the 64-channel
    /// level; 8 groups let `tools/screen/layout_probe.py` learn the caption at the pure-noise
    /// step far sooner (held-out loss 0.245 against 0.69 at step 500), but the whole recipe
    /// with 8 read back worse (one object, Euler 20, guidance 7.5, 2 seeds: exact 6.0 % against
    /// 13.5 %, count 65.5 % against 77 %), so the embedded model keeps 32.
    pub unet_groups: usize,
    pub unet_heads: usize,
    pub text_hidden: usize,
    pub text_layers: usize,
    pub text_heads: usize,
    /// The text encoder's context window (tokens, start and end included). The longest
    /// Shapes caption is 16 tokens; CLIP's 77 would spend most of the text encoder's and the
    /// cross-attention's work on padding.
    pub text_context: usize,
}

impl Default for Recipe {
    fn default() -> Self {
        Self {
            image_size: 64,
            vae_channels: vec![32, 64, 64],
            vae_layers: 1,
            vae_groups: 8,
            latent_channels: 8,
            unet_channels: vec![64, 128, 128],
            unet_groups: 32,
            unet_heads: 4,
            text_hidden: 128,
            text_layers: 3,
            text_heads: 4,
            text_context: 32,
        }
    }
}

impl Recipe {
    /// A miniature of the same architecture, for tests and CI.
    pub fn miniature() -> Self {
        Self {
            image_size: 64,
            vae_channels: vec![8, 16, 16],
            vae_layers: 1,
            vae_groups: 4,
            latent_channels: 4,
            unet_channels: vec![16, 32],
            // (first level plain, second with attention)
            unet_groups: 8,
            unet_heads: 2,
            text_hidden: 32,
            text_layers: 1,
            text_heads: 2,
            text_context: 32,
        }
    }

    pub fn downsample_factor(&self) -> usize {
        1 << (self.vae_channels.len() - 1)
    }

    pub fn latent_size(&self) -> usize {
        self.image_size / self.downsample_factor()
    }

    /// `vae/config.json`; `scaling_factor` is 1/std of the trained latents.
    pub fn vae_config(&self, scaling_factor: f64) -> Value {
        let n = self.vae_channels.len();
        json!({
            "_class_name": "AutoencoderKL",
            "_diffusers_version": "0.42.1",
            "act_fn": "silu",
            "block_out_channels": self.vae_channels,
            "down_block_types": vec!["DownEncoderBlock2D"; n],
            "up_block_types": vec!["UpDecoderBlock2D"; n],
            "force_upcast": false,
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": self.latent_channels,
            "layers_per_block": self.vae_layers,
            "norm_num_groups": self.vae_groups,
            "sample_size": self.image_size,
            "scaling_factor": scaling_factor,
            "mid_block_add_attention": true,
            "use_quant_conv": true,
            "use_post_quant_conv": true,
        })
    }

    /// `unet/config.json`: cross-attention at every level but the first (full latent
    /// resolution, where attention over all positions costs most and adds least), and the
    /// attention-pooled caption added to the timestep embedding (`addition_embed_type:
    /// "text"`, DeepFloyd IF's conditioning): every ResNet block then sees the whole caption,
    /// which a from-scratch model uses for colours much sooner than cross-attention alone
    /// (a 1500-step proxy: object colour read back 20 % of the time against 10 %).
    pub fn unet_config(&self) -> Value {
        let n = self.unet_channels.len();
        let mut down = vec!["DownBlock2D"];
        down.extend(vec!["CrossAttnDownBlock2D"; n - 1]);
        let mut up = vec!["CrossAttnUpBlock2D"; n - 1];
        up.push("UpBlock2D");
        json!({
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": "0.42.1",
            "act_fn": "silu",
            "addition_embed_type": "text",
            "addition_embed_type_num_heads": self.unet_heads,
            "attention_head_dim": self.unet_heads,
            "block_out_channels": self.unet_channels,
            "center_input_sample": false,
            "cross_attention_dim": self.text_hidden,
            "down_block_types": down,
            "up_block_types": up,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "downsample_padding": 1,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "in_channels": self.latent_channels,
            "out_channels": self.latent_channels,
            "layers_per_block": 1,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-5,
            "norm_num_groups": self.unet_groups,
            "sample_size": self.latent_size(),
            "use_linear_projection": false,
        })
    }

    /// `text_encoder/config.json` for a vocabulary of `vocab_size` with the given special ids.
    pub fn text_config(&self, vocab_size: usize, bos: u32, eos: u32) -> Value {
        json!({
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "attention_dropout": 0.0,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": eos,
            "hidden_act": "quick_gelu",
            "hidden_size": self.text_hidden,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": 4 * self.text_hidden,
            "layer_norm_eps": 1e-5,
            "max_position_embeddings": self.text_context,
            "num_attention_heads": self.text_heads,
            "num_hidden_layers": self.text_layers,
            "projection_dim": self.text_hidden,
            "vocab_size": vocab_size,
        })
    }

    /// `scheduler/scheduler_config.json`: SD's scaled-linear DDPM schedule, sampled with Euler
    /// (`EulerDiscreteScheduler`) by default; with `zero_terminal_snr`, rescaled betas and
    /// trailing timesteps (sampling starts at the pure-noise step the model was trained on).
    pub fn scheduler_config(&self, prediction_type: &str, zero_terminal_snr: bool) -> Value {
        json!({
            "_class_name": "EulerDiscreteScheduler",
            "_diffusers_version": "0.42.1",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "num_train_timesteps": 1000,
            "prediction_type": prediction_type,
            "steps_offset": 1,
            "timestep_spacing": if zero_terminal_snr { "trailing" } else { "leading" },
            "rescale_betas_zero_snr": zero_terminal_snr,
            "interpolation_type": "linear",
            "use_karras_sigmas": false,
            "trained_betas": null,
            // For the other classes a user may pick: DDIM and DDPM would clip the latents to
            // [−1, 1] by default; DDIM and PNDM end on a clean sample (ᾱ = 1), not at σ_min
            // (PNDM's default, which left the embedded model's PLMS pictures with half the
            // counts right); PNDM runs PLMS, as Stable Diffusion's configs ask.
            "clip_sample": false,
            "set_alpha_to_one": true,
            "skip_prk_steps": true,
        })
    }

    /// `model_index.json` of a `StableDiffusionPipeline`.
    pub fn model_index() -> Value {
        json!({
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.42.1",
            "feature_extractor": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ldm_models::clip::config::ClipTextConfig;
    use ldm_models::unet::UNetConfig;
    use ldm_models::vae::VaeConfig;
    use std::path::Path;

    /// Both recipes' configs pass the same validation as any loaded model's.
    #[test]
    fn configs_validate() {
        for r in [Recipe::default(), Recipe::miniature()] {
            let p = Path::new("config.json");
            let vae = VaeConfig::from_json(&serde_json::from_value(r.vae_config(0.2)).unwrap(), p)
                .unwrap();
            assert_eq!(vae.downsample_factor(), r.downsample_factor());
            let unet = UNetConfig::from_json(&serde_json::from_value(r.unet_config()).unwrap(), p)
                .unwrap();
            assert_eq!(unet.sample_size, Some(r.latent_size()));
            assert_eq!(unet.cross_attention_dim[0], r.text_hidden);
            assert_eq!(unet.text_pool_heads, Some(r.unet_heads));
            ClipTextConfig::from_json(
                &serde_json::from_value(r.text_config(600, 598, 599)).unwrap(),
                p,
            )
            .unwrap();
        }
    }
}
