//! Helpers shared by the integration tests.

use std::path::Path;

/// Copies a fixture folder (recursively) so a test can edit the copy.
#[allow(dead_code)]
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// Mean |Δ| in levels and the fraction of values off by more than 2, of two pictures.
#[allow(dead_code)]
pub fn compare(ours: &image::RgbImage, theirs: &image::RgbImage) -> (f64, f64) {
    assert_eq!(ours.dimensions(), theirs.dimensions());
    let diffs: Vec<i32> = ours
        .as_raw()
        .iter()
        .zip(theirs.as_raw())
        .map(|(a, b)| (*a as i32 - *b as i32).abs())
        .collect();
    let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
    let over2 = diffs.iter().filter(|&&d| d > 2).count() as f64 / diffs.len() as f64;
    (mean, over2)
}

/// Asserts a picture is diffusers' (mean |Δ| ≤ 1 level, under 1 % of values off by more than
/// 2), printing the numbers under `name`.
#[allow(dead_code)]
pub fn assert_same_picture(name: &str, ours: &image::RgbImage, theirs: &image::RgbImage) {
    let (mean, over2) = compare(ours, theirs);
    println!(
        "{name}: mean |Δ| {mean:.3} levels, {:.2} % > 2",
        over2 * 100.0
    );
    assert!(mean <= 1.0 && over2 < 0.01, "{name}: mean {mean:.3}");
}

/// The largest absolute difference of two tensors.
#[allow(dead_code)]
pub fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .unwrap()
}
