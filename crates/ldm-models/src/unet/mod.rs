//! The conditional U-Net of latent diffusion (Rombach et al. 2022, §3.3; Ronneberger et al. 2015;
//! Ho et al. 2020, appendix B), as diffusers' `UNet2DConditionModel` computes it: a timestep
//! embedding, ResNet blocks conditioned on it, spatial transformers cross-attending to the text,
//! skip connections from each down-path stage to its up-path twin, and added conditioning: for
//! SDXL `text_time` (pooled text embedding and size/crop micro-conditioning), or `text` (the
//! caption attention-pooled inside the U-Net, as the Shapes model uses it).

pub mod config;
pub mod transformer;

pub use config::{BlockKind, UNetConfig};

use crate::layers::attention::{Attention, IpTokens};
use crate::layers::conv2d;
use crate::layers::norm::GroupNorm;
use crate::layers::resnet::{ResnetBlock2D, ResnetConfig};
use crate::layers::sampling::{Downsample2D, Upsample2D};
use crate::layers::timestep::{sinusoidal_embedding, TextTimeEmbedding, TimestepEmbedding};
use crate::layers::Conv2d;
use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};
use transformer::{Transformer2DModel, TransformerConfig};

/// SDXL's added conditioning: pooled text embedding `[B, P]` and time ids `[B, 6]`
/// (original height, width, crop top, left, target height, width).
#[derive(Debug, Clone)]
pub struct AddedCond {
    pub text_embeds: Tensor,
    pub time_ids: Tensor,
}

/// ResNets, each optionally followed by a spatial transformer.
#[derive(Debug, Clone)]
struct Stage {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl Stage {
    fn forward_layer(
        &self,
        i: usize,
        x: &Tensor,
        emb: &Tensor,
        ctx: &Tensor,
        ip: Option<&IpTokens>,
    ) -> Result<Tensor> {
        let x = self.resnets[i].forward(x, Some(emb))?;
        match self.attentions.get(i) {
            Some(attn) => attn.forward_ip(&x, ctx, ip),
            None => Ok(x),
        }
    }
}

#[derive(Debug, Clone)]
struct DownBlock {
    stage: Stage,
    downsampler: Option<Downsample2D>,
}

#[derive(Debug, Clone)]
struct UpBlock {
    stage: Stage,
    upsampler: Option<Upsample2D>,
}

/// The encoder half the U-Net and ControlNet share, at the same checkpoint keys: the timestep
/// embedding with its added conditioning, `conv_in`, the down blocks and the mid block.
#[derive(Debug, Clone)]
pub(crate) struct Encoder {
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TimestepEmbedding>,
    text_embedding: Option<TextTimeEmbedding>,
    pub(crate) conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: Stage,
}

fn resnet_cfg(cfg: &UNetConfig, i: usize, o: usize, scale: f64) -> ResnetConfig {
    ResnetConfig {
        in_channels: i,
        out_channels: o,
        temb_channels: Some(cfg.time_embed_dim),
        groups: cfg.norm_num_groups,
        eps: cfg.norm_eps,
        output_scale_factor: scale,
    }
}

fn transformer_cfg(
    cfg: &UNetConfig,
    channels: usize,
    heads: usize,
    depth: usize,
    context_dim: usize,
) -> TransformerConfig {
    TransformerConfig {
        channels,
        heads,
        depth,
        context_dim,
        groups: cfg.norm_num_groups,
        use_linear_projection: cfg.use_linear_projection,
    }
}

impl Encoder {
    pub(crate) fn new(vb: &VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let temb = cfg.time_embed_dim;
        let time_embedding = TimestepEmbedding::with_condition(
            vb.pp("time_embedding"),
            ch[0],
            temb,
            cfg.time_cond_proj_dim,
        )?;
        let add_embedding = match cfg.text_time {
            Some(tt) => Some(TimestepEmbedding::new(
                vb.pp("add_embedding"),
                tt.projection_class_embeddings_input_dim,
                temb,
            )?),
            None => None,
        };
        // `addition_embed_type: "text"` lives at the same key as SDXL's (they never coexist).
        let text_embedding = match cfg.text_pool_heads {
            Some(heads) => Some(TextTimeEmbedding::new(
                vb.pp("add_embedding"),
                cfg.cross_attention_dim[0],
                temb,
                heads,
            )?),
            None => None,
        };
        let conv_in = conv2d(
            vb.pp("conv_in"),
            cfg.in_channels,
            ch[0],
            cfg.conv_in_kernel,
            1,
            cfg.conv_in_kernel / 2,
        )?;

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_ch = ch[0];
        for (i, &block_ch) in ch.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(i);
            let in_ch = out_ch;
            out_ch = block_ch;
            let mut stage = Stage {
                resnets: vec![],
                attentions: vec![],
            };
            for j in 0..cfg.layers_per_block[i] {
                let cin = if j == 0 { in_ch } else { out_ch };
                stage.resnets.push(ResnetBlock2D::new(
                    vb.pp("resnets").pp(j),
                    resnet_cfg(cfg, cin, out_ch, 1.0),
                )?);
                if cfg.down_blocks[i] == BlockKind::CrossAttn {
                    let tc = transformer_cfg(
                        cfg,
                        out_ch,
                        cfg.num_attention_heads[i],
                        cfg.transformer_layers_per_block[i],
                        cfg.cross_attention_dim[i],
                    );
                    stage
                        .attentions
                        .push(Transformer2DModel::new(vb.pp("attentions").pp(j), tc)?);
                }
            }
            let downsampler = if i + 1 < n {
                Some(Downsample2D::new(
                    vb.pp("downsamplers").pp(0),
                    out_ch,
                    out_ch,
                    cfg.downsample_padding,
                )?)
            } else {
                None
            };
            down_blocks.push(DownBlock { stage, downsampler });
        }

        let mid_vb = vb.pp("mid_block");
        let last = ch[n - 1];
        let mid_block = Stage {
            resnets: (0..2)
                .map(|j| {
                    ResnetBlock2D::new(
                        mid_vb.pp("resnets").pp(j),
                        resnet_cfg(cfg, last, last, cfg.mid_block_scale_factor),
                    )
                })
                .collect::<Result<Vec<_>>>()?,
            attentions: vec![Transformer2DModel::new(
                mid_vb.pp("attentions").pp(0),
                transformer_cfg(
                    cfg,
                    last,
                    cfg.num_attention_heads[n - 1],
                    cfg.transformer_layers_per_block[n - 1],
                    cfg.cross_attention_dim[n - 1],
                ),
            )?],
        };
        Ok(Self {
            time_embedding,
            add_embedding,
            text_embedding,
            conv_in,
            down_blocks,
            mid_block,
        })
    }

    /// The timestep embedding `[B, T]` with the added conditioning the config names, in
    /// `dtype`.
    pub(crate) fn embed(
        &self,
        cfg: &UNetConfig,
        dtype: candle_core::DType,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&AddedCond>,
        timestep_cond: Option<&Tensor>,
    ) -> Result<Tensor> {
        let t_emb = sinusoidal_embedding(
            timesteps,
            cfg.block_out_channels[0],
            cfg.flip_sin_to_cos,
            cfg.freq_shift,
        )?;
        let mut emb = self
            .time_embedding
            .forward_with(&t_emb.to_dtype(dtype)?, timestep_cond)?; // [B, T]
        match (&self.add_embedding, cfg.text_time, added) {
            (Some(add_embedding), Some(tt), Some(added)) => {
                let b = added.text_embeds.dim(0)?;
                let time = sinusoidal_embedding(
                    &added.time_ids.flatten_all()?,
                    tt.addition_time_embed_dim,
                    cfg.flip_sin_to_cos,
                    cfg.freq_shift,
                )?
                .reshape((b, ()))?; // [B, 6·D]
                let add = Tensor::cat(
                    &[added.text_embeds.to_dtype(dtype)?, time.to_dtype(dtype)?],
                    1,
                )?;
                emb = (emb + add_embedding.forward(&add)?)?;
            }
            (None, None, None) => {}
            (Some(_), _, None) => {
                return Err(candle_core::Error::Msg(
                    "this U-Net (SDXL text_time) needs the pooled text embedding and time ids"
                        .into(),
                ))
            }
            _ => {
                return Err(candle_core::Error::Msg(
                    "added conditioning was given to a U-Net that does not take it".into(),
                ))
            }
        }
        if let Some(text_embedding) = &self.text_embedding {
            emb = (emb + text_embedding.forward(&context.to_dtype(dtype)?)?)?;
        }
        Ok(emb)
    }

    /// The down path and the mid block from `x` (after `conv_in`): the mid block's output and
    /// every skip (`x` itself first), as diffusers' `down_block_res_samples`. T2I-Adapter
    /// features (`adapter`, one per down block, then perhaps one for the mid block) are added
    /// where diffusers adds its `down_intrablock_additional_residuals`: after a cross-attention
    /// block's last layer (before it is kept as a skip), after a plain block whole (its last
    /// skip included: diffusers adds in place), and after the mid block when the shapes agree.
    pub(crate) fn down_mid(
        &self,
        mut x: Tensor,
        emb: &Tensor,
        context: &Tensor,
        adapter: Option<&[Tensor]>,
        ip: Option<&IpTokens>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut features = adapter.unwrap_or_default().iter().peekable();
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            let cross = !block.stage.attentions.is_empty();
            let layers = block.stage.resnets.len();
            for i in 0..layers {
                x = block.stage.forward_layer(i, &x, emb, context, ip)?;
                if cross && i + 1 == layers {
                    if let Some(f) = features.next() {
                        x = (x + f.to_dtype(emb.dtype())?)?;
                    }
                }
                skips.push(x.clone());
            }
            if let Some(down) = &block.downsampler {
                x = down.forward(&x)?;
                skips.push(x.clone());
            }
            if !cross {
                if let Some(f) = features.next() {
                    x = (x + f.to_dtype(emb.dtype())?)?;
                    if let Some(last) = skips.last_mut() {
                        *last = x.clone();
                    }
                }
            }
        }
        x = self.mid_block.resnets[0].forward(&x, Some(emb))?;
        x = self.mid_block.attentions[0].forward_ip(&x, context, ip)?;
        x = self.mid_block.resnets[1].forward(&x, Some(emb))?;
        if let Some(f) = features.peek().filter(|f| f.dims() == x.dims()) {
            x = (x + f.to_dtype(emb.dtype())?)?;
        }
        Ok((x, skips))
    }
}

/// What ControlNets add to a U-Net: one residual per skip connection and one for the mid
/// block's output (diffusers' `down_block_additional_residuals`,
/// `mid_block_additional_residual`).
#[derive(Debug, Clone)]
pub struct ControlResiduals {
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

impl ControlResiduals {
    /// The sum of two ControlNets' residuals (diffusers' `MultiControlNetModel`).
    pub fn add(&self, other: &Self) -> Result<Self> {
        if self.down.len() != other.down.len() {
            return Err(candle_core::Error::Msg(
                "ControlNets with different numbers of residuals".into(),
            ));
        }
        Ok(Self {
            down: self
                .down
                .iter()
                .zip(&other.down)
                .map(|(a, b)| a + b)
                .collect::<Result<_>>()?,
            mid: (&self.mid + &other.mid)?,
        })
    }
}

/// What a U-Net evaluation may take beyond its sample, timestep and text.
#[derive(Debug, Clone, Copy, Default)]
pub struct UNetExtras<'a> {
    /// diffusers' `timestep_cond`: the guidance embedding of a U-Net with
    /// `time_cond_proj_dim`.
    pub timestep_cond: Option<&'a Tensor>,
    /// ControlNet residuals.
    pub control: Option<&'a ControlResiduals>,
    /// T2I-Adapter features (`down_intrablock_additional_residuals`).
    pub adapter: Option<&'a [Tensor]>,
    /// IP-Adapter image tokens, for the cross-attention layers that hold IP projections
    /// ([`UNet2DConditionModel::cross_attentions_mut`]).
    pub ip: Option<&'a IpTokens>,
}

/// diffusers' `UNet2DConditionModel`.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    encoder: Encoder,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    pub config: UNetConfig,
}

impl UNet2DConditionModel {
    /// Builds the U-Net; `vb` paths are the keys of `unet/diffusion_pytorch_model.safetensors`.
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        let encoder = Encoder::new(&vb, cfg)?;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let rev_ch: Vec<usize> = ch.iter().rev().copied().collect();
        let rev_layers: Vec<usize> = cfg.layers_per_block.iter().rev().copied().collect();
        let rev_heads: Vec<usize> = cfg.num_attention_heads.iter().rev().copied().collect();
        let rev_cross: Vec<usize> = cfg.cross_attention_dim.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_ch = rev_ch[0];
        for i in 0..n {
            let vb = vb.pp("up_blocks").pp(i);
            let prev_out = out_ch;
            out_ch = rev_ch[i];
            let in_ch = rev_ch[(i + 1).min(n - 1)];
            let layers = rev_layers[i] + 1;
            let mut stage = Stage {
                resnets: vec![],
                attentions: vec![],
            };
            for j in 0..layers {
                let skip = if j + 1 == layers { in_ch } else { out_ch };
                let cin = if j == 0 { prev_out } else { out_ch };
                stage.resnets.push(ResnetBlock2D::new(
                    vb.pp("resnets").pp(j),
                    resnet_cfg(cfg, cin + skip, out_ch, 1.0),
                )?);
                if cfg.up_blocks[i] == BlockKind::CrossAttn {
                    let tc = transformer_cfg(
                        cfg,
                        out_ch,
                        rev_heads[i],
                        cfg.reverse_transformer_layers_per_block[i],
                        rev_cross[i],
                    );
                    stage
                        .attentions
                        .push(Transformer2DModel::new(vb.pp("attentions").pp(j), tc)?);
                }
            }
            let upsampler = if i + 1 < n {
                Some(Upsample2D::new(vb.pp("upsamplers").pp(0), out_ch, out_ch)?)
            } else {
                None
            };
            up_blocks.push(UpBlock { stage, upsampler });
        }

        Ok(Self {
            encoder,
            up_blocks,
            conv_norm_out: crate::layers::norm::group_norm(
                cfg.norm_num_groups,
                ch[0],
                cfg.norm_eps,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv2d(
                vb.pp("conv_out"),
                ch[0],
                cfg.out_channels,
                cfg.conv_out_kernel,
                1,
                cfg.conv_out_kernel / 2,
            )?,
            config: cfg.clone(),
        })
    }

    /// Every cross-attention layer, in the order of diffusers' `attn_processors` (its attn2
    /// entries): the down blocks, the up blocks, then the mid block — the order IP-Adapter files
    /// number their projections in.
    pub fn cross_attentions_mut(&mut self) -> Vec<&mut Attention> {
        let mut out = Vec::new();
        for block in &mut self.encoder.down_blocks {
            for t in &mut block.stage.attentions {
                out.extend(t.cross_attentions_mut());
            }
        }
        for block in &mut self.up_blocks {
            for t in &mut block.stage.attentions {
                out.extend(t.cross_attentions_mut());
            }
        }
        for t in &mut self.encoder.mid_block.attentions {
            out.extend(t.cross_attentions_mut());
        }
        out
    }

    /// Predicts the model output (ε, v or x₀, per the scheduler config) for `sample`
    /// `[B, C_in, h, w]` at `timesteps` `[B]` given `context` `[B, L, cross_attention_dim]`.
    /// `added` is required exactly when the config has `text_time` conditioning.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<Tensor> {
        self.forward_with(sample, timesteps, context, added, None)
    }

    /// [`Self::forward`] with diffusers' `timestep_cond` `[B, time_cond_proj_dim]`: the
    /// guidance embedding ([`crate::layers::timestep::guidance_scale_embedding`]) of a U-Net
    /// with `time_cond_proj_dim`, added to the timestep embedding's input. Optional, as in
    /// diffusers (the model then runs as if w contributed nothing).
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&AddedCond>,
        timestep_cond: Option<&Tensor>,
    ) -> Result<Tensor> {
        let extras = UNetExtras {
            timestep_cond,
            ..UNetExtras::default()
        };
        self.forward_extra(sample, timesteps, context, added, &extras)
    }

    /// [`Self::forward_with`] with ControlNet residuals added to the skip connections and to
    /// the mid block's output, and T2I-Adapter features inside the down path, as diffusers
    /// adds them.
    pub fn forward_extra(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&AddedCond>,
        extras: &UNetExtras,
    ) -> Result<Tensor> {
        let x = self.decode(sample, timesteps, context, added, extras)?;
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&x)?)
    }

    /// [`Self::forward`] and, beside the output, what its last convolution reads:
    /// `silu(conv_norm_out(x))` `[B, block_out_channels[0], h, w]`, the decoder's features at
    /// the latent's resolution (for a training loss on what they hold, such as an auxiliary
    /// head that predicts where the scene's objects are).
    pub fn forward_and_features(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<(Tensor, Tensor)> {
        let x = self.decode(sample, timesteps, context, added, &UNetExtras::default())?;
        let features = self.conv_norm_out.forward_silu(&x)?;
        Ok((self.conv_out.forward(&features)?, features))
    }

    /// Everything before the output layers: the embedding, the down and mid blocks (with
    /// `extras`' residuals) and the up blocks.
    fn decode(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&AddedCond>,
        extras: &UNetExtras,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let emb = self.encoder.embed(
            cfg,
            sample.dtype(),
            timesteps,
            context,
            added,
            extras.timestep_cond,
        )?;
        let x = self.encoder.conv_in.forward(sample)?;
        let (mut x, mut skips) =
            self.encoder
                .down_mid(x, &emb, context, extras.adapter, extras.ip)?;
        if let Some(c) = extras.control {
            if c.down.len() != skips.len() {
                return Err(candle_core::Error::Msg(format!(
                    "{} ControlNet residuals for a U-Net with {} skip connections",
                    c.down.len(),
                    skips.len()
                )));
            }
            for (s, r) in skips.iter_mut().zip(&c.down) {
                *s = (&*s + r.to_dtype(s.dtype())?)?;
            }
            x = (x + c.mid.to_dtype(sample.dtype())?)?;
        }

        for block in &self.up_blocks {
            for i in 0..block.stage.resnets.len() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| candle_core::Error::Msg("U-Net skip stack underflow".into()))?;
                x = Tensor::cat(&[&x, &skip], 1)?;
                x = block.stage.forward_layer(i, &x, &emb, context, extras.ip)?;
            }
            if let Some(up) = &block.upsampler {
                // Upsample to the next skip's size, so odd latent sizes line up as in diffusers.
                let size = match skips.last() {
                    Some(s) => Some((s.dim(2)?, s.dim(3)?)),
                    None => None,
                };
                x = up.forward(&x, size)?;
            }
        }
        Ok(x)
    }
}
