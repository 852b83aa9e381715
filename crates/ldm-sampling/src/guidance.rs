//! Classifier-free guidance (Ho & Salimans 2022, eq. 6) and its rescale (Lin et al. 2024,
//! "Common Diffusion Noise Schedules and Sample Steps Are Flawed", §3.4), applied to the
//! network's outputs of the unconditional and conditional batch halves, as diffusers does.

use candle_core::{Result, Tensor, D};

/// `u + g (c − u)`, then optionally rescaled towards the conditional output's standard
/// deviation: `φ · cfg·std(c)/std(cfg) + (1 − φ) · cfg` per batch item (unbiased std).
pub fn guide(uncond: &Tensor, cond: &Tensor, scale: f64, rescale: f64) -> Result<Tensor> {
    let cfg = (uncond + ((cond - uncond)? * scale)?)?;
    if rescale <= 0.0 {
        return Ok(cfg);
    }
    let std = |t: &Tensor| -> Result<Tensor> {
        let flat = t.flatten_from(1)?;
        let n = flat.dim(1)? as f64;
        let mean = flat.mean_keepdim(D::Minus1)?;
        let var = (flat.broadcast_sub(&mean)?.sqr()?.sum_keepdim(D::Minus1)? / (n - 1.0))?;
        var.sqrt()
    };
    let (std_cond, std_cfg) = (std(cond)?, std(&cfg)?);
    let shape = cfg.shape().clone();
    let flat = cfg.flatten_from(1)?;
    let rescaled = flat.broadcast_mul(&(std_cond / std_cfg)?)?;
    let mixed = ((rescaled * rescale)? + (flat * (1.0 - rescale))?)?;
    mixed.reshape(shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn guidance_and_rescale() -> Result<()> {
        let u = Tensor::new(&[[0f32, 1.0, 2.0, 3.0]], &Device::Cpu)?;
        let c = Tensor::new(&[[1f32, 1.0, 3.0, 5.0]], &Device::Cpu)?;
        assert_eq!(
            guide(&u, &c, 2.0, 0.0)?.to_vec2::<f32>()?,
            [[2.0, 1.0, 4.0, 7.0]]
        );
        // Full rescale gives the conditional output's std.
        let r = guide(&u, &c, 2.0, 1.0)?;
        let std = |t: &Tensor| {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let m = v.iter().sum::<f32>() / 4.0;
            (v.iter().map(|x| (x - m).powi(2)).sum::<f32>() / 3.0).sqrt()
        };
        assert!((std(&r) - std(&c)).abs() < 1e-5);
        Ok(())
    }
}
