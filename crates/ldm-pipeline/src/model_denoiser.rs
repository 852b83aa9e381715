//! The adapter from a U-Net to the samplers' [`Denoiser`]: scale the VE sample to the network's
//! input, call it at the plan's timestep on the unconditional and conditional halves of one
//! batch, apply classifier-free guidance to the outputs, and precondition to a denoised estimate.

use candle_core::{DType, Result, Tensor};
use ldm_models::unet::{AddedCond, UNet2DConditionModel, UNetExtras};
use ldm_sampling::denoiser::scale_input;
use ldm_sampling::guidance::guide;
use ldm_sampling::scheduler_config::Plan;
use ldm_sampling::Denoiser;

/// Conditioning for one batch: with guidance, the unconditional rows come first.
pub struct Conditioning {
    /// `[B or 2B, 77, D]`.
    pub context: Tensor,
    /// SDXL's pooled embedding and time ids, batched like `context`.
    pub added: Option<AddedCond>,
    /// The guidance embedding of a U-Net with `time_cond_proj_dim` (conditional rows only).
    pub timestep_cond: Option<Tensor>,
}

/// A U-Net with its conditioning and guidance, seen as a denoiser.
pub struct UNetDenoiser<'a> {
    pub unet: &'a UNet2DConditionModel,
    pub plan: &'a Plan,
    pub cond: Conditioning,
    /// Classifier-free guidance scale; at ≤ 1 only the conditional half exists.
    pub guidance_scale: f64,
    pub guidance_rescale: f64,
    pub dtype: DType,
    /// 9-channel inpainting models: mask and masked-image latents appended to the input.
    pub extra_channels: Option<Tensor>,
    /// ControlNets, whose residuals the U-Net adds.
    pub control: Option<crate::control::ControlRun<'a>>,
    /// T2I-Adapter features, which the U-Net adds in its down path.
    pub adapter: Option<crate::control::AdapterRun>,
    /// IP-Adapter image tokens, batched like the text.
    pub ip: Option<ldm_models::layers::attention::IpTokens>,
}

impl UNetDenoiser<'_> {
    fn guided(&self) -> bool {
        self.guidance_scale > 1.0
    }
}

impl Denoiser for UNetDenoiser<'_> {
    fn denoise(&self, x: &Tensor, sigma: f64) -> Result<Tensor> {
        let t = self.plan.timestep(sigma);
        let mut input = scale_input(x, sigma)?; // [B, C, h, w]
        let control = match &self.control {
            Some(run) => {
                let ts = Tensor::full(t as f32, input.dim(0)?, input.device())?;
                run.residuals(&input.to_dtype(self.dtype)?, &ts, &self.cond, self.guided())?
            }
            None => None,
        };
        let adapter = self.adapter.as_ref().and_then(|a| a.next());
        if let Some(extra) = &self.extra_channels {
            input = Tensor::cat(&[&input, extra], 1)?;
        }
        let input = if self.guided() {
            Tensor::cat(&[&input, &input], 0)?
        } else {
            input
        };
        let batch = input.dim(0)?;
        let timesteps = Tensor::full(t as f32, batch, input.device())?;
        let out = self
            .unet
            .forward_extra(
                &input.to_dtype(self.dtype)?,
                &timesteps,
                &self.cond.context,
                self.cond.added.as_ref(),
                &UNetExtras {
                    timestep_cond: self.cond.timestep_cond.as_ref(),
                    control: control.as_ref(),
                    adapter,
                    ip: self.ip.as_ref(),
                },
            )?
            .to_dtype(DType::F32)?;
        let out = if self.guided() {
            let half = batch / 2;
            guide(
                &out.narrow(0, 0, half)?,
                &out.narrow(0, half, half)?,
                self.guidance_scale,
                self.guidance_rescale,
            )?
        } else {
            out
        };
        let x0 = self.plan.prediction.to_denoised(x, &out, sigma)?;
        self.plan.finish_denoised(x, x0, sigma)
    }
}
