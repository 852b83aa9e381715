//! The loss curve as a PNG beside `losses.csv`: raw losses as grey dots, an exponential moving
//! average as a blue line, log-scaled loss axis with a faint line at every power of ten.

use crate::Result;
use std::path::Path;

const W: usize = 640;
const H: usize = 360;
const MARGIN: usize = 24;

struct Canvas(Vec<u8>);

impl Canvas {
    fn put(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            let i = (y as usize * W + x as usize) * 3;
            self.0[i..i + 3].copy_from_slice(&c);
        }
    }
    /// Bresenham's line.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.put(x, y, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }
}

/// Writes the plot of `(step, loss)` points to `path` (nothing to draw: nothing written).
pub fn plot_losses(points: &[(usize, f64)], path: &Path) -> Result<()> {
    let pts: Vec<(f64, f64)> = points
        .iter()
        .filter(|(_, loss)| loss.is_finite() && *loss > 0.0)
        .map(|&(step, loss)| (step as f64, loss.log10()))
        .collect();
    if pts.len() < 2 {
        return Ok(());
    }
    let (x0, x1) = (pts[0].0, pts[pts.len() - 1].0.max(pts[0].0 + 1.0));
    let lo = pts
        .iter()
        .map(|p| p.1)
        .fold(f64::INFINITY, f64::min)
        .floor();
    let hi = pts
        .iter()
        .map(|p| p.1)
        .fold(f64::NEG_INFINITY, f64::max)
        .ceil()
        .max(lo + 1.0);
    let to_px = |(x, y): (f64, f64)| -> (i64, i64) {
        let px = MARGIN as f64 + (x - x0) / (x1 - x0) * (W - 2 * MARGIN) as f64;
        let py = (H - MARGIN) as f64 - (y - lo) / (hi - lo) * (H - 2 * MARGIN) as f64;
        (px.round() as i64, py.round() as i64)
    };
    let mut c = Canvas(vec![255; W * H * 3]);
    let mut decade = lo;
    while decade <= hi {
        let (_, y) = to_px((x0, decade));
        c.line(
            (MARGIN as i64, y),
            ((W - MARGIN) as i64, y),
            [225, 225, 225],
        );
        decade += 1.0;
    }
    let (l, b) = (MARGIN as i64, (H - MARGIN) as i64);
    c.line((l, MARGIN as i64), (l, b), [0, 0, 0]);
    c.line((l, b), ((W - MARGIN) as i64, b), [0, 0, 0]);
    for &p in &pts {
        let (x, y) = to_px(p);
        c.put(x, y, [170, 170, 170]);
    }
    let alpha = (10.0 / pts.len() as f64).clamp(0.01, 0.3);
    let mut smooth = pts[0].1;
    let mut prev = to_px(pts[0]);
    for &(x, y) in &pts[1..] {
        smooth = (1.0 - alpha) * smooth + alpha * y;
        let next = to_px((x, smooth));
        c.line(prev, next, [40, 90, 220]);
        prev = next;
    }
    crate::io::write_png_wh(path, &c.0, W, H)
}
