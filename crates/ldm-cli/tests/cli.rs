//! The `ldm` binary end to end: `info` on a fixture model, and clear errors (non-zero exit, no
//! panic) on bad input.

use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// Mean |Δ| in 8-bit levels of two pictures of one size.
fn mean_level_diff(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as f64 - y as f64).abs())
        .sum::<f64>()
        / a.as_raw().len() as f64
}

/// `ldm generate "a red circle"` as the adapter fixtures were rendered (8 steps, seed 1, 32×32,
/// the model's own sampler and guidance) with `flags`, into `out`; asserts the picture is
/// diffusers' `expected` (a fixture's path) within a level on average, and returns the
/// parameters the PNG records.
fn generate_like_the_fixture(flags: &[&str], out: &std::path::Path, expected: &str) -> String {
    let mut args = vec!["generate", "a red circle"];
    args.extend_from_slice(flags);
    args.extend([
        "--steps", "8", "--seed", "1", "--width", "32", "--height", "32",
    ]);
    args.extend(["--out", out.to_str().unwrap()]);
    let (ok, _, stderr) = ldm(&args);
    assert!(ok, "{flags:?}: {stderr}");
    let ours = image::open(out).unwrap().to_rgb8();
    let theirs = image::open(fixtures().join(expected)).unwrap().to_rgb8();
    let diff = mean_level_diff(&ours, &theirs);
    assert!(diff <= 1.0, "{flags:?}: mean |Δ| {diff} from {expected}");
    let (ok, params, stderr) = ldm(&["info", out.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    params
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

/// The embedded (zero-terminal-SNR) model rescales its guidance by 0.7 unless told otherwise,
/// and the PNG says so.
#[test]
fn generate_rescales_guidance_on_zero_snr_models_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("img.png");
    let info = |extra: &[&str]| {
        let mut args = vec!["generate", "a red circle", "--steps", "2", "--out"];
        args.push(out.to_str().unwrap());
        args.extend_from_slice(extra);
        let (ok, _, stderr) = ldm(&args);
        assert!(ok, "{stderr}");
        let (ok, stdout, stderr) = ldm(&["info", out.to_str().unwrap()]);
        assert!(ok, "{stderr}");
        stdout
    };
    let text = info(&[]);
    assert!(text.contains(", CFG Rescale phi: 0.7"), "{text}");
    let text = info(&["--guidance-rescale", "0"]);
    assert!(!text.contains("CFG Rescale"), "{text}");
}

#[test]
fn generate_writes_a_png_with_its_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("img.png");
    let model = fixtures().join("tiny/sd15");
    let (ok, stdout, stderr) = ldm(&[
        "generate",
        "a red circle",
        "--model",
        model.to_str().unwrap(),
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "4",
        "--seed",
        "7",
        "--sampler",
        "DPM++ 2M Karras",
        "--negative",
        "green",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("img.png"));
    let (ok, stdout, stderr) = ldm(&["info", out.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.starts_with("a red circle\nNegative prompt: green\nSteps: 4, Sampler: dpmpp_2m, Schedule type: karras"), "{stdout}");
    assert!(
        stdout.contains("Seed: 7, Size: 32x32, Model hash: "),
        "{stdout}"
    );
    // SD1.5's schedule keeps diffusers' default: no guidance rescale.
    assert!(!stdout.contains("CFG Rescale"), "{stdout}");
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

/// `Sampler:` and `Schedule type:` in the PNG's parameters are arguments `ldm generate` takes.
#[test]
fn recorded_sampler_and_schedule_are_accepted_back() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny/sd15");
    let field = |text: &str, key: &str| -> String {
        let rest = &text[text.find(key).unwrap_or_else(|| panic!("{key} in {text}")) + key.len()..];
        let value = if let Some(quoted) = rest.strip_prefix('"') {
            &quoted[..quoted.find('"').unwrap()]
        } else {
            &rest[..rest.find(',').unwrap_or(rest.len())]
        };
        value.trim().to_string()
    };
    for (sampler, schedule) in [
        ("Euler a", "sgm_uniform"),
        ("DPM++ 2M Karras", "karras"),
        ("euler", "simple"),
        ("heun", "custom:14.6146,3.5,0.6,0"),
    ] {
        let out = dir.path().join("a.png");
        let gen = |sampler: &str, schedule: &str| {
            ldm(&[
                "generate",
                "a red circle",
                "--model",
                model.to_str().unwrap(),
                "--width",
                "32",
                "--height",
                "32",
                "--steps",
                "3",
                "--sampler",
                sampler,
                "--schedule",
                schedule,
                "--out",
                out.to_str().unwrap(),
            ])
        };
        let (ok, _, stderr) = gen(sampler, schedule);
        assert!(ok, "{sampler} {schedule}: {stderr}");
        let (ok, text, stderr) = ldm(&["info", out.to_str().unwrap()]);
        assert!(ok, "{stderr}");
        let (s, t) = (field(&text, "Sampler: "), field(&text, "Schedule type: "));
        let (ok, _, stderr) = gen(&s, &t);
        assert!(ok, "{s} / {t} read back from {text}: {stderr}");
        let (_, again, _) = ldm(&["info", out.to_str().unwrap()]);
        assert_eq!(again, text, "the same parameters after a second run");
    }
}

#[test]
fn generate_rejects_bad_input_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny/sd15");
    let inpaint = fixtures().join("tiny/sd15_inpaint");
    let m = model.to_str().unwrap();
    let out = dir.path().join("x.png");
    let o = out.to_str().unwrap();
    let missing_dir = dir.path().join("nope/x.png");
    let not_image = fixtures().join("tiny/sd15/model_index.json");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--model", m, "--width", "30", "--height", "32"],
            "multiples of 8",
        ),
        (
            vec![
                "--model", m, "--width", "8192", "--height", "8192", "--batch", "64",
            ],
            "GiB",
        ),
        (
            vec!["--model", m, "--sampler", "dpmpp_9m"],
            "valid samplers",
        ),
        (vec!["--model", m, "--schedule", "wavy"], "valid schedules"),
        (vec!["--model", m, "--steps", "0"], "steps"),
        (
            vec!["--model", m, "--count", "0"],
            "--count must be at least 1",
        ),
        (vec!["--model", m, "--batch", "0"], "batch size"),
        (
            vec![
                "--model",
                m,
                "--width",
                "32",
                "--height",
                "32",
                "--init-image",
                "/no/such.png",
            ],
            "no/such.png",
        ),
        (
            vec![
                "--model",
                m,
                "--width",
                "32",
                "--height",
                "32",
                "--init-image",
                not_image.to_str().unwrap(),
            ],
            "model_index.json",
        ),
        (vec!["--model", m, "--mask", "/no/mask.png"], "--init-image"),
        (
            vec![
                "--model",
                inpaint.to_str().unwrap(),
                "--width",
                "32",
                "--height",
                "32",
            ],
            "inpainting model",
        ),
        (vec!["--model", "/no/such/model"], "no such file"),
        (vec!["--model", m, "--dtype", "bf17"], "unknown dtype"),
    ];
    for (args, expect) in cases {
        let mut full = vec!["generate", "a prompt", "--out", o];
        full.extend(args.iter().copied());
        let (ok, _, stderr) = ldm(&full);
        assert!(!ok, "{args:?} should fail");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(!out.exists(), "{args:?} wrote a file");
    }
    let (ok, _, stderr) = ldm(&[
        "generate",
        "p",
        "--model",
        m,
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "2",
        "--out",
        missing_dir.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("does not exist"), "{stderr}");
}

#[test]
fn a_closed_pipe_is_not_a_panic() {
    use std::io::Read;
    let path = fixtures().join("tiny/sdxl");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(["info", path.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away, as `| head -0` would
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(status.success(), "{status:?}");
}

#[test]
fn single_files_need_a_matching_config() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let sd15 = fixtures().join("single_file/sd15.safetensors");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "p",
            "--model",
            sd15.to_str().unwrap(),
            "--width",
            "32",
            "--height",
            "32",
            "--steps",
            "2",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        ldm(&args)
    };
    let (ok, _, stderr) = run(&[]);
    assert!(!ok && stderr.contains("--config"), "{stderr}");
    let sdxl_dir = fixtures().join("tiny/sdxl");
    let (ok, _, stderr) = run(&["--config", sdxl_dir.to_str().unwrap()]);
    assert!(
        !ok && stderr.contains("Sd1") && stderr.contains("SDXL"),
        "{stderr}"
    );
    let not_sd = fixtures().join("tiny/sd15/unet/diffusion_pytorch_model.safetensors");
    let sd15_dir = fixtures().join("tiny/sd15");
    let (ok, _, stderr) = ldm(&[
        "generate",
        "p",
        "--model",
        not_sd.to_str().unwrap(),
        "--config",
        sd15_dir.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("original layout"), "{stderr}");
    let (ok, _, stderr) = run(&["--config", sd15_dir.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(out.exists());
}

#[test]
fn refiner_outpaint_and_vae_flags_work_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let f = |p: &str| fixtures().join(p).to_str().unwrap().to_string();
    let out = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let runs: Vec<Vec<String>> = vec![
        vec![
            f("tiny/sdxl"),
            "--refiner".into(),
            f("tiny/sdxl_refiner"),
            "--width".into(),
            "32".into(),
            "--out".into(),
            out("r.png"),
        ],
        vec![
            f("tiny/sd15"),
            "--init-image".into(),
            f("pipelines/inputs/gradient_circle_32x32.png"),
            "--outpaint".into(),
            "8,0,8,0".into(),
            "--width".into(),
            "48".into(),
            "--out".into(),
            out("o.png"),
        ],
        vec![
            f("tiny/sd15"),
            "--vae".into(),
            f("single_file/sd15.safetensors"),
            "--width".into(),
            "32".into(),
            "--out".into(),
            out("v.png"),
        ],
    ];
    for extra in runs {
        let mut args: Vec<String> = [
            "generate",
            "a red circle",
            "--height",
            "32",
            "--steps",
            "4",
            "--model",
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.clone());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, _, stderr) = ldm(&refs);
        assert!(ok, "{extra:?}: {stderr}");
    }
    let size = |n: &str| image::image_dimensions(dir.path().join(n)).unwrap();
    assert_eq!(size("r.png"), (32, 32));
    assert_eq!(size("o.png"), (48, 32));
    let (ok, stdout, _) = ldm(&["info", &out("v.png")]);
    assert!(ok && stdout.contains("VAE: sd15.safetensors"), "{stdout}");
}

/// A1111's `<lora:NAME:W>` in the prompt: found by file stem in `--lora-dir`, merged into the
/// U-Net and text encoder (the picture diffusers made with the file), recorded with its hash;
/// a name no file has is reported and skipped. `--taesd` decodes with the tiny autoencoder.
#[test]
fn prompt_lora_tags_and_taesd() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny/sd15");
    let loras = fixtures().join("lora");
    let run = |prompt: &str, out: &str, extra: &[&str]| {
        let path = dir.path().join(out);
        let mut args = vec![
            "generate",
            prompt,
            "--model",
            model.to_str().unwrap(),
            "--lora-dir",
            loras.to_str().unwrap(),
            "--steps",
            "8",
            "--seed",
            "1",
            "--width",
            "32",
            "--height",
            "32",
            "--out",
            path.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (ok, _, stderr) = ldm(&args);
        assert!(ok, "{stderr}");
        let img = image::open(&path).unwrap().to_rgb8();
        let params = ldm_pipeline::image_io::read_parameters(&path)
            .unwrap()
            .unwrap();
        (img, params, stderr)
    };
    let expect = |name: &str| image::open(loras.join(name)).unwrap().to_rgb8();
    // diffusers' picture within a level on average (float sums differ by the odd rounding).
    let close = |a: &image::RgbImage, b: &image::RgbImage| {
        let d = mean_level_diff(a, b);
        assert!(d <= 1.0, "mean |Δ| {d:.3}");
    };
    let (img, params, _) = run("a red circle <lora:sd15_peft:1>", "a.png", &[]);
    close(&img, &expect("sd15_peft.png"));
    assert!(
        params.starts_with("a red circle <lora:sd15_peft:1>\n"),
        "{params}"
    );
    assert!(params.contains("Lora hashes: \"sd15_peft: "), "{params}");
    let (img, params, stderr) = run("a red circle <lora:nothing:0.5>", "b.png", &[]);
    close(&img, &expect("sd15_base.png"));
    assert!(stderr.contains("<lora:nothing>: no such LoRA"), "{stderr}");
    assert!(params.contains("Lora not found: \"nothing\""), "{params}");
    // An embedding from --embeddings, named in the prompt by its file stem.
    let emb = fixtures().join("embeddings/sd15");
    let (img, params, _) = run(
        "a red circle, shapestyle",
        "d.png",
        &["--embeddings", emb.to_str().unwrap()],
    );
    close(
        &img,
        &image::open(fixtures().join("embeddings/sd15_ti.png"))
            .unwrap()
            .to_rgb8(),
    );
    assert!(params.contains("TI hashes: \"shapestyle: "), "{params}");
    let taesd = fixtures().join("taesd/model");
    let (img, params, _) = run(
        "a red circle",
        "c.png",
        &["--taesd", taesd.to_str().unwrap()],
    );
    close(
        &img,
        &image::open(fixtures().join("taesd/sd15_taesd.png"))
            .unwrap()
            .to_rgb8(),
    );
    assert!(params.contains("(TAESD)"), "{params}");
}

/// `--device` on every computing command: `cpu` and `auto` compute (on this CPU-only build,
/// on the CPU, giving the same picture), and `cuda` is refused with the way to a CUDA build —
/// never a silent CPU run, never a panic.
#[test]
fn device_flag_on_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny").join("sd15");
    let model = model.to_str().unwrap();
    let mut pictures = Vec::new();
    for device in ["cpu", "auto"] {
        let out = dir.path().join(format!("{device}.png"));
        let (ok, _, stderr) = ldm(&[
            "generate",
            "a red circle",
            "--model",
            model,
            "--steps",
            "2",
            "--width",
            "32",
            "--height",
            "32",
            "--device",
            device,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{device}: {stderr}");
        pictures.push(std::fs::read(&out).unwrap());
    }
    assert_eq!(pictures[0], pictures[1]);
    let out = dir.path().join("x");
    let out = out.to_str().unwrap();
    for args in [
        vec!["--device", "cuda", "generate", "x", "--model", model],
        vec!["generate", "x", "--model", model, "--device", "cuda:1"],
        vec!["--device", "cuda", "train", "unet", "--out", out],
        vec![
            "--device",
            "cuda",
            "distill",
            "guidance",
            "--teacher",
            model,
            "--out",
            out,
        ],
        vec!["--device", "cuda", "eval", "shapes", "--autoencoder"],
        vec!["--device", "cuda", "bench", "--parts", "text"],
        vec!["--device", "cuda", "serve", "--model", model],
    ] {
        let (ok, _, stderr) = ldm(&args);
        assert!(!ok, "{args:?}");
        assert!(
            stderr.contains("built without CUDA") && stderr.contains("tools/cuda/build.sh"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    let (ok, _, stderr) = ldm(&["--device", "tpu", "generate", "x"]);
    assert!(
        !ok && stderr.contains("cpu, cuda, cuda:N or auto"),
        "{stderr}"
    );
}

/// `--controlnet` with `--control-image` reproduces diffusers' ControlNet picture (the folder
/// and the original single file alike), records the unit in the PNG's parameters, and refuses
/// mismatched flags clearly.
#[test]
fn controlnet_flags_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixtures();
    let model = f.join("tiny/sd15");
    let image = f.join("pipelines/inputs/gradient_circle_32x32.png");
    for (k, net) in [
        "controlnet/sd15_a",
        "controlnet/sd15_a_original.safetensors",
    ]
    .iter()
    .enumerate()
    {
        let out = dir.path().join(format!("{k}.png"));
        let params = generate_like_the_fixture(
            &[
                "--model",
                model.to_str().unwrap(),
                "--controlnet",
                f.join(net).to_str().unwrap(),
                "--control-image",
                image.to_str().unwrap(),
            ],
            &out,
            "controlnet/sd15_single.png",
        );
        assert!(
            params.contains("ControlNet 0: \"Module: none, Model: sd15_a"),
            "{params}"
        );
    }
    let net = f.join("controlnet/sd15_a");
    for (extra, what) in [
        (
            vec!["--controlnet", net.to_str().unwrap()],
            "--control-image",
        ),
        (
            vec![
                "--controlnet",
                net.to_str().unwrap(),
                "--control-image",
                image.to_str().unwrap(),
                "--control-scale",
                "1",
                "--control-scale",
                "2",
            ],
            "--control-scale",
        ),
        (vec!["--guess-mode"], "--guess-mode needs"),
        (
            vec![
                "--controlnet",
                f.join("controlnet/sdxl_a").to_str().unwrap(),
                "--control-image",
                image.to_str().unwrap(),
            ],
            "another architecture",
        ),
    ] {
        let mut args = vec!["generate", "x", "--model", model.to_str().unwrap()];
        args.extend(extra);
        let (ok, _, stderr) = ldm(&args);
        assert!(!ok && stderr.contains(what), "{what}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// `--t2i-adapter` with `--adapter-image` reproduces diffusers' adapter picture, is recorded in
/// the PNG, and mismatched flags are refused clearly.
#[test]
fn t2i_adapter_flags_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixtures();
    let model = f.join("tiny/sd15");
    let image = f.join("pipelines/inputs/gradient_circle_32x32.png");
    let adapter = f.join("t2i_adapter/sd15_full");
    let out = dir.path().join("a.png");
    let params = generate_like_the_fixture(
        &[
            "--model",
            model.to_str().unwrap(),
            "--t2i-adapter",
            adapter.to_str().unwrap(),
            "--adapter-image",
            image.to_str().unwrap(),
            "--adapter-scale",
            "0.6",
        ],
        &out,
        "t2i_adapter/sd15_full_half.png",
    );
    assert!(
        params.contains("T2I-Adapter 0: \"Model: sd15_full, Weight: 0.6"),
        "{params}"
    );
    for (extra, what) in [
        (
            vec!["--t2i-adapter", adapter.to_str().unwrap()],
            "--adapter-image",
        ),
        (vec!["--adapter-factor", "2"], "--adapter-factor"),
    ] {
        let mut args = vec!["generate", "x", "--model", model.to_str().unwrap()];
        args.extend(extra);
        let (ok, _, stderr) = ldm(&args);
        assert!(!ok && stderr.contains(what), "{what}: {stderr}");
    }
}

/// `--ip-adapter` with `--image-encoder` and `--ip-image` reproduces diffusers' IP-Adapter
/// picture, is recorded in the PNG, and an incomplete set of flags is refused.
#[test]
fn ip_adapter_flags_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixtures();
    let model = f.join("tiny/sd15");
    let out = dir.path().join("ip.png");
    let params = generate_like_the_fixture(
        &[
            "--model",
            model.to_str().unwrap(),
            "--ip-adapter",
            f.join("ip_adapter/sd15_plus.safetensors").to_str().unwrap(),
            "--image-encoder",
            f.join("ip_adapter/image_encoder").to_str().unwrap(),
            "--ip-image",
            f.join("pipelines/inputs/gradient_circle_32x32.png")
                .to_str()
                .unwrap(),
        ],
        &out,
        "ip_adapter/sd15_plus_ip.png",
    );
    assert!(
        params.contains("IP-Adapter: \"Model: sd15_plus, Weight: 1"),
        "{params}"
    );
    let (ok, _, stderr) = ldm(&[
        "generate",
        "x",
        "--model",
        model.to_str().unwrap(),
        "--ip-adapter",
        f.join("ip_adapter/sd15_plus.safetensors").to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("all three"), "{stderr}");
}
