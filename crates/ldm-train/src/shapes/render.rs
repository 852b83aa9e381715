//! Drawing a [`Scene`]: solid background, each object's coverage of a pixel estimated from 4×4
//! subsamples at `(i + (k + ½)/4, j + (l + ½)/4)`, colour blended by coverage and rounded.

use super::{Scene, PALETTE};

/// Subsamples per pixel side.
const SUPER: usize = 4;

/// The scene as `size × size` RGB bytes, row-major.
pub fn render(scene: &Scene) -> Vec<u8> {
    let s = scene.size;
    let bg = PALETTE[scene.background].1;
    let mut out = Vec::with_capacity(s * s * 3);
    for j in 0..s {
        for i in 0..s {
            let mut acc = [0f64; 3];
            for l in 0..SUPER {
                for k in 0..SUPER {
                    let px = i as f64 + (k as f64 + 0.5) / SUPER as f64;
                    let py = j as f64 + (l as f64 + 0.5) / SUPER as f64;
                    let colour = scene
                        .objects
                        .iter()
                        .find(|o| o.shape.contains(o.cx, o.cy, o.side(s), px, py))
                        .map_or(bg, |o| PALETTE[o.colour].1);
                    for c in 0..3 {
                        acc[c] += colour[c] as f64;
                    }
                }
            }
            let n = (SUPER * SUPER) as f64;
            out.extend(acc.iter().map(|v| (v / n).round() as u8));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;

    #[test]
    fn only_palette_colours_and_blends_of_them() {
        let scene = Scene::generate(1, 3, 64);
        let img = render(&scene);
        assert_eq!(img.len(), 64 * 64 * 3);
        let bg = PALETTE[scene.background].1;
        // Corners far from any object are the background.
        let o = &scene.objects[0];
        let corner = if o.cx > 32.0 { 0 } else { 63 };
        assert_eq!(&img[corner * 3..corner * 3 + 3], &bg);
        // The object's centre is its colour.
        let (x, y) = (o.cx as usize, o.cy as usize);
        let centre = if o.shape == Shape::Triangle { y + 3 } else { y };
        let p = (centre * 64 + x) * 3;
        assert_eq!(&img[p..p + 3], &PALETTE[o.colour].1);
    }
}
