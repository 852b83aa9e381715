//! Classifier-free guidance (Ho & Salimans 2022, eq. 6) and its rescale (Lin et al. 2024,
//! "Common Diffusion Noise Schedules and Sample Steps Are Flawed", §3.4), applied to the
//! network's outputs of the unconditional and conditional batch halves, as diffusers does.

use candle_core::{Result, Tensor, D};

/// `u + g (c − u)`, then optionally rescaled towards the conditional output's standard
/// deviation: `φ · cfg·std(c)/std(cfg) + (1 − φ) · cfg` per batch item (unbiased std).
pub fn guide(uncond: &Tensor, cond: &Tensor, scale: f64, rescale: f64) -> Result<Tensor> {
    let cfg = (uncond + ((cond - uncond)? * scale)?)?;
    rescale_towards(cfg, cond, rescale)
}

/// [`guide`] with a scale per batch item (`scales.len()` = the batch): what guidance
/// distillation's targets are, each example at its own scale.
pub fn guide_each(uncond: &Tensor, cond: &Tensor, scales: &[f64], rescale: f64) -> Result<Tensor> {
    let mut shape = vec![1usize; cond.rank()];
    shape[0] = scales.len();
    let g: Vec<f32> = scales.iter().map(|&g| g as f32).collect();
    let g = Tensor::from_vec(g, shape, cond.device())?.to_dtype(cond.dtype())?;
    let cfg = (uncond + (cond - uncond)?.broadcast_mul(&g)?)?;
    rescale_towards(cfg, cond, rescale)
}

/// `φ · cfg·std(c)/std(cfg) + (1 − φ) · cfg` per batch item; `cfg` itself at φ ≤ 0.
fn rescale_towards(cfg: Tensor, cond: &Tensor, rescale: f64) -> Result<Tensor> {
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

    /// A scale per item is the same as guiding each item alone.
    #[test]
    fn per_item_scales_guide_each_item_alone() -> Result<()> {
        let dev = Device::Cpu;
        let u = Tensor::new(&[[0f32, 1.0, 2.0, 3.0], [1.0, -1.0, 0.5, 2.0]], &dev)?;
        let c = Tensor::new(&[[1f32, 1.0, 3.0, 5.0], [0.0, 2.0, 1.0, -1.0]], &dev)?;
        for phi in [0.0, 0.7] {
            let both = guide_each(&u, &c, &[2.0, 7.5], phi)?;
            for (i, g) in [2.0, 7.5].into_iter().enumerate() {
                let alone = guide(&u.narrow(0, i, 1)?, &c.narrow(0, i, 1)?, g, phi)?;
                let diff = (both.narrow(0, i, 1)? - alone)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                assert!(diff < 1e-6, "item {i}, φ {phi}: {diff}");
            }
        }
        Ok(())
    }
}
