//! Drawing a [`Scene`]: solid background, each object's coverage of a pixel estimated from 4×4
//! subsamples at `(i + (k + ½)/4, j + (l + ½)/4)`, colour blended by coverage and rounded.

use super::{Object, Scene, PALETTE};

/// Subsamples per pixel side.
const SUPER: usize = 4;

/// The scene as `size × size` RGB bytes, row-major.
pub fn render(scene: &Scene) -> Vec<u8> {
    let bg = PALETTE[scene.background].1;
    let mut out = Vec::with_capacity(scene.size * scene.size * 3);
    for_each_pixel(scene, |hits| {
        let mut acc = [0f64; 3];
        for hit in hits {
            let colour = hit.map_or(bg, |o| PALETTE[o.colour].1);
            for c in 0..3 {
                acc[c] += colour[c] as f64;
            }
        }
        let n = (SUPER * SUPER) as f64;
        out.extend(acc.iter().map(|v| (v / n).round() as u8));
    });
    out
}

/// The fraction of each pixel the scene's objects cover, `size × size` in `[0, 1]`, row-major,
/// from the same subsamples as [`render`].
pub fn coverage(scene: &Scene) -> Vec<f32> {
    let mut out = Vec::with_capacity(scene.size * scene.size);
    for_each_pixel(scene, |hits| {
        let inside = hits.iter().filter(|h| h.is_some()).count();
        out.push(inside as f32 / (SUPER * SUPER) as f32);
    });
    out
}

/// [`coverage`] of each object alone: one `size × size` map per object, in the scene's order
/// (a subsample counts for the first object that contains it, as it is drawn).
pub fn coverage_each(scene: &Scene) -> Vec<Vec<f32>> {
    let n = scene.size * scene.size;
    let mut out = vec![Vec::with_capacity(n); scene.objects.len()];
    for_each_pixel(scene, |hits| {
        for (k, map) in out.iter_mut().enumerate() {
            let mine = hits
                .iter()
                .filter(|h| h.is_some_and(|o| std::ptr::eq(o, &scene.objects[k])))
                .count();
            map.push(mine as f32 / (SUPER * SUPER) as f32);
        }
    });
    out
}

/// Calls `f` for each pixel in row-major order with what each of its subsamples hits: the
/// first object that contains it, or `None` (the background).
fn for_each_pixel(scene: &Scene, mut f: impl FnMut(&[Option<&Object>])) {
    let s = scene.size;
    let mut hits = Vec::with_capacity(SUPER * SUPER);
    for j in 0..s {
        for i in 0..s {
            hits.clear();
            for l in 0..SUPER {
                for k in 0..SUPER {
                    let px = i as f64 + (k as f64 + 0.5) / SUPER as f64;
                    let py = j as f64 + (l as f64 + 0.5) / SUPER as f64;
                    hits.push(
                        scene
                            .objects
                            .iter()
                            .find(|o| o.shape.contains(o.cx, o.cy, o.side(s), px, py)),
                    );
                }
            }
            f(&hits);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;

    /// The objects' own coverages add up to the scene's.
    #[test]
    fn each_objects_coverage_adds_up_to_the_scenes() {
        for i in 0..40 {
            let scene = Scene::generate(2, i, 64);
            let each = coverage_each(&scene);
            assert_eq!(each.len(), scene.objects.len());
            let all = coverage(&scene);
            for (p, c) in all.iter().enumerate() {
                let sum: f32 = each.iter().map(|m| m[p]).sum();
                assert!((sum - c).abs() < 1e-6);
            }
            assert!(each.iter().all(|m| m.iter().sum::<f32>() > 10.0));
        }
    }

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
        // Coverage: 0 on the background corner, 1 at the centre, and the pixels whose colour
        // is a blend are exactly those partly covered.
        let cov = coverage(&scene);
        assert_eq!(cov.len(), 64 * 64);
        assert_eq!(cov[corner], 0.0);
        assert_eq!(cov[centre * 64 + x], 1.0);
        for (n, &c) in cov.iter().enumerate() {
            let pixel = &img[n * 3..n * 3 + 3];
            assert_eq!(
                c == 0.0,
                pixel == bg,
                "pixel {n}: coverage {c}, colour {pixel:?}"
            );
        }
    }
}
