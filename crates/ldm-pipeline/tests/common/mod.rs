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
