//! The `ldm` binary end to end: `info` on a fixture model, and clear errors (non-zero exit, no
//! panic) on bad input.

use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn ldm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn info_describes_each_family() {
    for (model, family, prediction) in [
        ("sd15", "SD1", "epsilon"),
        ("sd21", "SD2", "v_prediction"),
        ("sdxl", "SDXL", "epsilon"),
        ("sd15_inpaint", "SD1 inpainting", "epsilon"),
    ] {
        let path = fixtures().join("tiny").join(model);
        let (ok, stdout, stderr) = ldm(&["info", path.to_str().unwrap()]);
        assert!(ok, "{model}: {stderr}");
        assert!(
            stdout.contains(&format!("family:           {family}\n")),
            "{model}: {stdout}"
        );
        assert!(stdout.contains(prediction), "{model}: {stdout}");
        assert!(
            stdout.contains("unet:")
                && stdout.contains("vae:")
                && stdout.contains("latent scaling")
        );
    }
}

#[test]
fn bad_paths_fail_cleanly() {
    let tmp = std::env::temp_dir();
    for path in ["/no/such/model", tmp.to_str().unwrap()] {
        let (ok, _, stderr) = ldm(&["info", path]);
        assert!(!ok, "{path} should fail");
        assert!(stderr.starts_with("error:"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn info_check_builds_every_network() {
    let path = fixtures().join("tiny/sdxl");
    let (ok, stdout, stderr) = ldm(&["info", path.to_str().unwrap(), "--check"]);
    assert!(ok, "{stderr}");
    for c in ["unet", "vae", "text_encoder", "text_encoder_2"] {
        assert!(stdout.contains(&format!("check {c}: ok\n")), "{stdout}");
    }
}
