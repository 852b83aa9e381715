//! diffusers' `Transformer2DModel` (continuous input) and `BasicTransformerBlock`: the spatial
//! transformer of latent diffusion (Rombach et al. 2022, §3.3) — self-attention, cross-attention
//! to the text, and a GeGLU feed-forward (Shazeer 2020), each pre-normed and residual.

use crate::layers::attention::{Attention, IpTokens};
use crate::layers::conv2d;
use crate::layers::linear::{linear, Linear};
use crate::layers::norm::GroupNorm;
use crate::layers::ops::LayerNorm;
use crate::layers::Conv2d;
use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};

/// Shapes of one spatial transformer.
#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub depth: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
}

/// `net.0` (GEGLU projection) → `net.2` (output linear).
#[derive(Debug, Clone)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: linear(dim, 2 * inner, vb.pp("net").pp(0).pp("proj"))?,
            out: linear(inner, dim, vb.pp("net").pp(2))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out
            .forward(&crate::layers::ops::geglu(&self.proj.forward(x)?)?)
    }
}

/// Self-attention, cross-attention, feed-forward.
#[derive(Debug, Clone)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(vb: VarBuilder, dim: usize, heads: usize, context_dim: usize) -> Result<Self> {
        let dim_head = dim / heads;
        let ln = |name: &str| crate::layers::ops::layer_norm(dim, 1e-5, vb.pp(name));
        Ok(Self {
            norm1: ln("norm1")?,
            attn1: Attention::new(vb.pp("attn1"), dim, None, heads, dim_head, false)?,
            norm2: ln("norm2")?,
            attn2: Attention::new(
                vb.pp("attn2"),
                dim,
                Some(context_dim),
                heads,
                dim_head,
                false,
            )?,
            norm3: ln("norm3")?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor, ip: Option<&IpTokens>) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self
            .attn2
            .forward_ip(&self.norm2.forward(&x)?, Some(context), ip)?
            + &x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

/// Projection in and out of the transformer: 1×1 convolution (SD1) or linear (SD2, SDXL).
#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn new(vb: VarBuilder, use_linear: bool, i: usize, o: usize) -> Result<Self> {
        Ok(if use_linear {
            Projection::Linear(linear(i, o, vb)?)
        } else {
            Projection::Conv(conv2d(vb, i, o, 1, 1, 0)?)
        })
    }
}

/// GroupNorm → projection in → transformer blocks → projection out, plus the input.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    pub fn new(vb: VarBuilder, c: TransformerConfig) -> Result<Self> {
        let inner = c.channels; // heads × (channels / heads)
        let blocks = (0..c.depth)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp("transformer_blocks").pp(i),
                    inner,
                    c.heads,
                    c.context_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: crate::layers::norm::group_norm(c.groups, c.channels, 1e-6, vb.pp("norm"))?,
            proj_in: Projection::new(vb.pp("proj_in"), c.use_linear_projection, c.channels, inner)?,
            blocks,
            proj_out: Projection::new(
                vb.pp("proj_out"),
                c.use_linear_projection,
                inner,
                c.channels,
            )?,
        })
    }

    /// The cross-attention layers, in order.
    pub(crate) fn cross_attentions_mut(&mut self) -> impl Iterator<Item = &mut Attention> {
        self.blocks.iter_mut().map(|b| &mut b.attn2)
    }

    /// `x`: `[B, C, H, W]`, `context`: `[B, L, context_dim]` → `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.forward_ip(x, context, None)
    }

    /// [`Self::forward`], the cross-attention also attending to IP-Adapter image tokens.
    pub fn forward_ip(
        &self,
        x: &Tensor,
        context: &Tensor,
        ip: Option<&IpTokens>,
    ) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let to_tokens = |t: Tensor| -> Result<Tensor> {
            let ch = t.dim(1)?;
            t.permute((0, 2, 3, 1))?.reshape((b, h * w, ch)) // [B, HW, C]
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context, ip)?;
        }
        let to_image = |t: Tensor| -> Result<Tensor> {
            let ch = t.dim(2)?;
            t.reshape((b, h, w, ch))?
                .permute((0, 3, 1, 2))?
                .contiguous() // [B, C, H, W]
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(tokens)?)?,
            Projection::Linear(lin) => to_image(lin.forward(&tokens)?)?,
        };
        debug_assert_eq!(out.dim(1)?, c);
        out + x
    }
}
