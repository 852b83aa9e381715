//! Outpainting by padding: the image is extended by edge replication and a mask marks the new
//! border for inpainting to fill (A1111's "Poor man's outpainting" with `fill` = edge).

use crate::{Error, Result};
use candle_core::{Device, Tensor};

/// Pixels to add on each side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Padding {
    pub left: usize,
    pub top: usize,
    pub right: usize,
    pub bottom: usize,
}

impl std::str::FromStr for Padding {
    type Err = Error;
    /// `L,T,R,B` in pixels, or one number for all four sides.
    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<usize> = s
            .split(',')
            .map(|p| p.trim().parse::<usize>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::InvalidRequest(format!("outpaint padding `{s}`: {e}")))?;
        match parts.as_slice() {
            [a] => Ok(Self {
                left: *a,
                top: *a,
                right: *a,
                bottom: *a,
            }),
            [l, t, r, b] => Ok(Self {
                left: *l,
                top: *t,
                right: *r,
                bottom: *b,
            }),
            _ => Err(Error::InvalidRequest(format!(
                "outpaint padding `{s}`: give one number or four (left,top,right,bottom)"
            ))),
        }
    }
}

/// Pads `image` (`[1, 3, H, W]`) by edge replication; returns the padded image and its mask
/// (`[1, 1, H', W']`, 1 on the new border).
pub fn pad_for_outpainting(image: &Tensor, pad: Padding) -> Result<(Tensor, Tensor)> {
    let (_, _, h, w) = image.dims4()?;
    let (nh, nw) = (h + pad.top + pad.bottom, w + pad.left + pad.right);
    let rows: Vec<u32> = (0..nh)
        .map(|i| i.saturating_sub(pad.top).min(h - 1) as u32)
        .collect();
    let cols: Vec<u32> = (0..nw)
        .map(|j| j.saturating_sub(pad.left).min(w - 1) as u32)
        .collect();
    let device: &Device = image.device();
    let padded = image
        .index_select(&Tensor::new(rows.as_slice(), device)?, 2)?
        .index_select(&Tensor::new(cols.as_slice(), device)?, 3)?;
    let mask: Vec<f32> = (0..nh)
        .flat_map(|i| {
            (0..nw).map(move |j| {
                let inside = i >= pad.top && i < pad.top + h && j >= pad.left && j < pad.left + w;
                if inside {
                    0.0
                } else {
                    1.0
                }
            })
        })
        .collect();
    Ok((padded, Tensor::from_vec(mask, (1, 1, nh, nw), device)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_with_edges_and_masks_the_border() {
        let img = Tensor::arange(0f32, 4.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 2, 2))
            .unwrap();
        let img = Tensor::cat(&[&img, &img, &img], 1).unwrap();
        let (p, m) = pad_for_outpainting(&img, "1,0,0,1".parse().unwrap()).unwrap();
        assert_eq!(p.dims(), &[1, 3, 3, 3]);
        assert_eq!(
            p.get(0).unwrap().get(0).unwrap().to_vec2::<f32>().unwrap(),
            [[0.0, 0.0, 1.0], [2.0, 2.0, 3.0], [2.0, 2.0, 3.0]]
        );
        assert_eq!(
            m.get(0).unwrap().get(0).unwrap().to_vec2::<f32>().unwrap(),
            [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
        );
        assert!("1,2".parse::<Padding>().is_err());
    }
}
