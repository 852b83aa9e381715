//! Training, data and evaluation end to end through the `ldm` binary: a miniature model trained
//! for a few steps and used like any model, a run killed with SIGKILL and resumed, the embedded
//! default, and clear errors on bad input.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn ldm_in(cache: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(args)
        .env("LDM_CACHE", cache)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ldm(args: &[&str]) -> (bool, String, String) {
    ldm_in(&std::env::temp_dir().join("ldm-test-cache"), args)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn png_size(path: &Path) -> (u32, u32) {
    let img = image::open(path).unwrap();
    (img.width(), img.height())
}

fn eval_prompts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../eval")
}

#[test]
fn a_miniature_model_trains_generates_and_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("mini");
    let (ok, out, err) = ldm(&[
        "train",
        "shapes",
        "--miniature",
        "--vae-steps",
        "3",
        "--unet-steps",
        "3",
        "--snapshot-every",
        "2",
        "--out",
        s(&model),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("held-out PSNR") && out.contains("text encoder + U-Net: 3 steps"),
        "{out}"
    );
    // The snapshot at step 2 is a whole model of its own (adherence against training time is
    // measured on these), kept beside the checkpoints, with no half-written folder left.
    let snapshots = model.join("unet-train").join("snapshots");
    let names: Vec<String> = std::fs::read_dir(&snapshots)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["step-0000002"]);
    let snapshot = snapshots.join("step-0000002");
    let (ok, out, err) = ldm(&["info", s(&snapshot), "--check"]);
    assert!(ok && out.contains("check unet: ok"), "{out}{err}");
    let unet =
        |dir: &Path| std::fs::read(dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    assert_ne!(
        unet(&snapshot),
        unet(&model),
        "step 2's weights, not the final ones"
    );
    for f in [
        "model_index.json",
        "vae/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "scheduler/scheduler_config.json",
        "vae-train/losses.csv",
        "unet-train/state.json",
    ] {
        assert!(model.join(f).is_file(), "missing {f}");
    }
    // The trained folder is an ordinary SD1 model.
    let (ok, out, err) = ldm(&["info", s(&model), "--check"]);
    assert!(ok, "{err}");
    assert!(out.contains("family:           SD1"), "{out}");
    let png = dir.path().join("mini.png");
    let (ok, _, err) = ldm(&[
        "generate",
        "a red circle",
        "--model",
        s(&model),
        "--steps",
        "2",
        "--out",
        s(&png),
    ]);
    assert!(ok, "{err}");
    assert_eq!(png_size(&png), (64, 64), "the model's own size by default");
    // The evaluator runs on it (a miniature model scores whatever it scores).
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(
        &prompts,
        "a red circle on a blue background\na square above a circle\n",
    )
    .unwrap();
    let saved = dir.path().join("saved");
    let (ok, out, err) = ldm(&[
        "eval",
        "shapes",
        "--model",
        s(&model),
        "--prompts",
        s(&prompts),
        "--seeds",
        "2",
        "--steps",
        "2",
        "--save",
        s(&saved),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("exact match") && out.contains("relation"),
        "{out}"
    );
    // The kept images: four PNGs listed with their seeds and readings, which read back as the
    // same table.
    let list = std::fs::read_to_string(saved.join("captions.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = list
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{list}");
    for (l, seed) in lines.iter().zip([0, 0, 1, 1]) {
        assert_eq!(l["seed"], seed, "{l}");
        assert!(l["exact"].is_boolean() && l["objects_read"].is_u64() && l["missed"].is_array());
        assert_eq!(png_size(&saved.join(l["file"].as_str().unwrap())), (64, 64));
    }
    let (ok, reread, err) = ldm(&["eval", "shapes", "--images", s(&saved)]);
    assert!(ok, "{err}");
    let table = |t: &str| {
        t.lines()
            .skip_while(|l| !l.contains("one object"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(table(&reread), table(&out));
    // A sampler named with its schedule, and eta, are those `ldm generate` takes: the kept image
    // is the one `ldm generate` makes with the same flags and seed.
    let named = dir.path().join("named");
    let sampling = [
        "--sampler",
        "Euler a Karras",
        "--eta",
        "0.5",
        "--steps",
        "3",
    ];
    let mut args = vec![
        "eval",
        "shapes",
        "--model",
        s(&model),
        "--prompts",
        s(&prompts),
        "--seeds",
        "1",
        "--seed",
        "7",
        "--save",
        s(&named),
    ];
    args.extend(sampling);
    let (ok, _, err) = ldm(&args);
    assert!(ok, "{err}");
    let list = std::fs::read_to_string(named.join("captions.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(list.lines().next().unwrap()).unwrap();
    assert_eq!(first["seed"], 7, "{list}");
    let pixels = |p: &Path| image::open(p).unwrap().to_rgb8().into_raw();
    let generated = dir.path().join("named.png");
    let mut args = vec![
        "generate",
        first["caption"].as_str().unwrap(),
        "--model",
        s(&model),
        "--seed",
        "7",
        "--out",
        s(&generated),
    ];
    args.extend(sampling);
    let (ok, _, err) = ldm(&args);
    assert!(ok, "{err}");
    let kept = pixels(&named.join(first["file"].as_str().unwrap()));
    assert_eq!(kept, pixels(&generated));
    let (ok, _, err) = ldm(&[
        "generate",
        first["caption"].as_str().unwrap(),
        "--model",
        s(&model),
        "--seed",
        "7",
        "--steps",
        "3",
        "--sampler",
        "Euler a",
        "--out",
        s(&generated),
    ]);
    assert!(ok, "{err}");
    assert_ne!(
        kept,
        pixels(&generated),
        "the schedule and eta made a difference"
    );
    // The autoencoder's round trip, read back (a model folder or its vae folder).
    for dir in [model.clone(), model.join("vae")] {
        let (ok, out, err) = ldm(&["eval", "shapes", "--autoencoder", s(&dir), "--scenes", "20"]);
        assert!(ok, "{err}");
        assert!(
            out.contains("read back as everything drawn")
                && out.contains("read back as the captions state")
                && out.contains("PSNR"),
            "{out}"
        );
    }
    // Its reconstructions kept: one PNG a scene, listed with the scene's index.
    let kept = dir.path().join("round-trips");
    let (ok, _, err) = ldm(&[
        "eval",
        "shapes",
        "--autoencoder",
        s(&model),
        "--scenes",
        "5",
        "--save",
        s(&kept),
    ]);
    assert!(ok, "{err}");
    let list = std::fs::read_to_string(kept.join("captions.jsonl")).unwrap();
    assert_eq!(list.lines().count(), 5, "{list}");
    assert!(
        list.lines().last().unwrap().contains("\"seed\":4"),
        "{list}"
    );
    assert_eq!(png_size(&kept.join("0004.png")), (64, 64));
    let (ok, _, err) = ldm(&[
        "eval",
        "shapes",
        "--autoencoder",
        s(&dir.path().join("nope")),
    ]);
    assert!(!ok && err.contains("nope"), "{err}");
    let (ok, _, err) = ldm(&[
        "eval",
        "shapes",
        "--autoencoder",
        s(&model),
        "--scenes",
        "0",
    ]);
    assert!(!ok && err.contains("--scenes"), "{err}");
    // f16 conversion halves the weights and still loads.
    let half = dir.path().join("half");
    let (ok, _, err) = ldm(&["convert", s(&model), "--dtype", "f16", "--out", s(&half)]);
    assert!(ok, "{err}");
    assert!(!half.join("unet-train").exists());
    let (a, b) = (
        std::fs::metadata(model.join("unet/diffusion_pytorch_model.safetensors"))
            .unwrap()
            .len(),
        std::fs::metadata(half.join("unet/diffusion_pytorch_model.safetensors"))
            .unwrap()
            .len(),
    );
    assert!(b < a * 6 / 10, "{a} → {b}");
    let (ok, _, err) = ldm(&["info", s(&half), "--check"]);
    assert!(ok, "{err}");
}

/// A run killed with SIGKILL and started again continues from its last checkpoint and writes
/// exactly the loss curve of a run that was never interrupted.
#[test]
fn a_killed_run_resumes_on_the_same_curve() {
    let dir = tempfile::tempdir().unwrap();
    let args = |out: &Path| -> Vec<String> {
        [
            "train",
            "vae",
            "--miniature",
            "--steps",
            "40",
            "--checkpoint-every",
            "5",
            "--held-out",
            "8",
            "--out",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([out.to_str().unwrap().to_string()])
        .collect()
    };
    let whole = dir.path().join("whole");
    let (ok, _, err) = ldm(&args(&whole).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");

    let killed = dir.path().join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(args(&killed))
        .spawn()
        .unwrap();
    let state = killed.join("vae-train/state.json");
    let start = Instant::now();
    while !state.exists() && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    let at = saved["step"].as_u64().unwrap();
    assert!(at < 40, "the run finished before it could be killed");
    let (ok, _, err) = ldm(&args(&killed).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let a = std::fs::read_to_string(whole.join("vae-train/losses.csv")).unwrap();
    let b = std::fs::read_to_string(killed.join("vae-train/losses.csv")).unwrap();
    assert_eq!(a.lines().count(), 41);
    if let Some((x, y)) = a.lines().zip(b.lines()).find(|(x, y)| x != y) {
        panic!("killed at step {at}; curves part at\n{x}\n{y}");
    }
    let wa = std::fs::read(whole.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let wb = std::fs::read(killed.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    assert!(wa == wb, "final weights differ");
    // The read-back log: a row per checkpoint, the resumed run's the same.
    let a = std::fs::read_to_string(whole.join("vae-train/readback.csv")).unwrap();
    let b = std::fs::read_to_string(killed.join("vae-train/readback.csv")).unwrap();
    assert_eq!(a.lines().count(), 9, "{a}");
    assert!(a.starts_with("step,psnr,one_exact,two_exact"), "{a}");
    assert_eq!(a, b);
}

/// `--mixed-precision bf16` (bf16 products, f32 weights and AdamW) trains both models on a loss
/// curve close to f32's but not equal to it (the products really are rounded), and the U-Net
/// run writes a model that generates.
#[test]
fn bf16_products_train_close_to_the_f32_curve() {
    let dir = tempfile::tempdir().unwrap();
    let curve = |part: &str, precision: &str| -> Vec<f64> {
        let out = dir.path().join(format!("{part}-{precision}"));
        if part == "unet" {
            // The U-Net trains on an autoencoder's latents: the f32 run's.
            copy_dir(&dir.path().join("vae-no/vae"), &out.join("vae"));
        }
        let mut args = vec!["train", part, "--miniature", "--steps", "8", "--batch", "4"];
        args.extend(["--mixed-precision", precision, "--out", s(&out)]);
        if part == "vae" {
            args.extend(["--held-out", "4"]);
        } else {
            args.extend(["--pool", "16"]);
        }
        let (ok, _, err) = ldm(&args);
        assert!(ok, "{part} {precision}: {err}");
        std::fs::read_to_string(out.join(format!("{part}-train/losses.csv")))
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
            .collect()
    };
    for part in ["vae", "unet"] {
        let (f32s, bf16s) = (curve(part, "no"), curve(part, "bf16"));
        assert_eq!(f32s.len(), 8);
        let rel: Vec<f64> = f32s
            .iter()
            .zip(&bf16s)
            .map(|(a, b)| (a - b).abs() / a.abs())
            .collect();
        assert!(
            rel.iter().all(|&r| r < 0.05),
            "{part}: {f32s:?} vs {bf16s:?}"
        );
        assert!(rel.iter().any(|&r| r > 0.0), "{part}: bf16 changed nothing");
    }
    let png = dir.path().join("mini.png");
    let model = dir.path().join("unet-bf16");
    let (ok, _, err) = ldm(&[
        "generate",
        "a red circle",
        "--model",
        s(&model),
        "--steps",
        "2",
        "--out",
        s(&png),
    ]);
    assert!(ok, "{err}");
    assert!(png.exists());
}

/// `--attention-grounding W` adds W × the grounding loss (each object word's attention off its
/// object, in [0, 1]) to the U-Net's: the first step, on the same weights and batch, costs more
/// by a share of W, and the run writes a model that generates.
#[test]
fn attention_grounding_adds_its_term_to_the_loss() {
    auxiliary_loss_adds_its_term("--attention-grounding", (0.025, 1.0));
}

/// `--layout-head W` adds W × the mask head's cross-entropy (about ln 2 a cell from a fresh
/// head) in the same way; the head is trained and checkpointed with the model (a run resumed
/// from its checkpoint ends where an unbroken one does) and not written into the U-Net.
#[test]
fn layout_head_adds_its_term_to_the_loss() {
    let dir = auxiliary_loss_adds_its_term("--layout-head", (0.3, 1.5));
    let unet =
        |d: &Path| std::fs::read(d.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let whole = dir.path().join("unet-2");
    let parts = dir.path().join("parts");
    copy_dir(&whole.join("vae"), &parts.join("vae"));
    for steps in ["2", "3"] {
        let (ok, _, err) = ldm(&[
            "train",
            "unet",
            "--miniature",
            "--steps",
            steps,
            "--batch",
            "4",
            "--pool",
            "16",
            "--caption-dropout",
            "0",
            "--layout-head",
            "2",
            "--checkpoint-every",
            "1",
            "--out",
            s(&parts),
        ]);
        assert!(ok, "{err}");
    }
    assert!(
        unet(&parts) == unet(&whole),
        "the resumed run ends elsewhere"
    );
    let (ok, _, err) = ldm(&["train", "unet", "--noisy-share", "2", "--out", s(&parts)]);
    assert!(
        !ok && err.contains("--noisy-share must lie in [0, 1]"),
        "{err}"
    );
    let (ok, out, err) = ldm(&["info", s(&whole), "--check"]);
    assert!(ok && out.contains("check unet: ok"), "{out}{err}");
}

/// Trains a miniature U-Net 3 steps with `flag` 0 and 2 (into `unet-0` and `unet-2` of the
/// returned folder) and checks the first step's loss rose by 2 × a term per unit weight
/// within `range`, that the term changed the training, that the model generates, and that a
/// negative weight is refused.
fn auxiliary_loss_adds_its_term(flag: &str, range: (f64, f64)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let vae = dir.path().join("vae");
    let (ok, _, err) = ldm(&[
        "train",
        "vae",
        "--miniature",
        "--steps",
        "2",
        "--held-out",
        "4",
        "--out",
        s(&vae),
    ]);
    assert!(ok, "{err}");
    let first_losses = |weight: &str| -> Vec<f64> {
        let out = dir.path().join(format!("unet-{weight}"));
        copy_dir(&vae.join("vae"), &out.join("vae"));
        let (ok, _, err) = ldm(&[
            "train",
            "unet",
            "--miniature",
            "--steps",
            "3",
            "--batch",
            "4",
            "--pool",
            "16",
            "--caption-dropout",
            "0",
            flag,
            weight,
            "--out",
            s(&out),
        ]);
        assert!(ok, "{weight}: {err}");
        std::fs::read_to_string(out.join("unet-train/losses.csv"))
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
            .collect()
    };
    let (plain, added) = (first_losses("0"), first_losses("2"));
    let extra = (added[0] - plain[0]) / 2.0;
    assert!(
        extra > range.0 && extra <= range.1,
        "{flag}: {plain:?} against {added:?}"
    );
    assert!(
        added[2] != plain[2] + 2.0 * extra,
        "the term changes the training, not only the loss"
    );
    let png = dir.path().join("added.png");
    let model = dir.path().join("unet-2");
    let (ok, _, err) = ldm(&[
        "generate",
        "a red circle",
        "--model",
        s(&model),
        "--steps",
        "2",
        "--out",
        s(&png),
    ]);
    assert!(ok && png.exists(), "{err}");
    let negative = format!("{flag}=-1");
    let (ok, _, err) = ldm(&["train", "unet", &negative, "--out", s(&model)]);
    assert!(!ok && err.contains(&format!("{flag} must be")), "{err}");
    dir
}

/// The autoencoder's batch split over threads trains the same model as one thread: the shards'
/// losses are their parts of the batch means, so the gradient is the whole batch's.
#[test]
fn autoencoder_shards_train_the_same_curve() {
    let dir = tempfile::tempdir().unwrap();
    let curve = |shards: &str, disc: bool| -> Vec<f64> {
        let out = dir.path().join(format!("s{shards}-{disc}"));
        let mut args = vec![
            "train",
            "vae",
            "--miniature",
            "--steps",
            "6",
            "--batch",
            "5",
            "--held-out",
            "4",
            "--shards",
            shards,
            "--out",
            s(&out),
        ];
        if disc {
            args.extend(["--disc-start", "3"]);
        }
        let (ok, _, err) = ldm(&args);
        assert!(ok, "{err}");
        std::fs::read_to_string(out.join("vae-train/losses.csv"))
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
            .collect()
    };
    for disc in [false, true] {
        let (one, two) = (curve("1", disc), curve("3", disc));
        assert_eq!(one.len(), 6);
        for (a, b) in one.iter().zip(&two) {
            assert!(
                (a - b).abs() <= 1e-4 * a.abs(),
                "disc {disc}: {one:?} vs {two:?}"
            );
        }
    }
}

#[test]
fn the_embedded_model_generates_without_a_model_argument() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("circle.png");
    let cache = dir.path().join("cache");
    let (ok, _, err) = ldm_in(
        &cache,
        &[
            "generate",
            "a red circle on a blue background",
            "--steps",
            "8",
            "--out",
            s(&png),
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(png_size(&png), (64, 64));
    // Unpacked once into the cache, whole.
    let unpacked: Vec<_> = std::fs::read_dir(&cache).unwrap().flatten().collect();
    assert_eq!(unpacked.len(), 1);
    assert!(unpacked[0].path().join("unet/config.json").is_file());
    let (ok, _, err) = ldm_in(
        &cache,
        &[
            "generate",
            "a blue square",
            "--steps",
            "2",
            "--out",
            s(&png),
        ],
    );
    assert!(ok, "{err}");
}

/// `--model shapes-fast` is the embedded 4-step student (LCM, one pass a step), unpacked beside
/// the teacher; `--model shapes` is the teacher; a folder of that name in the working
/// directory wins over the embedded name.
#[test]
fn the_embedded_student_is_addressed_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let params_of = |model: &str, cwd: &Path| -> String {
        let png = dir.path().join(format!("{model}.png"));
        let out = Command::new(env!("CARGO_BIN_EXE_ldm"))
            .args([
                "generate",
                "a red circle",
                "--model",
                model,
                "--out",
                s(&png),
            ])
            .env("LDM_CACHE", &cache)
            .current_dir(cwd)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ldm(&["info", s(&png)]).1
    };
    let fast = params_of("shapes-fast", dir.path());
    assert!(fast.contains("Steps: 4, Sampler: lcm"), "{fast}");
    let teacher = params_of("shapes", dir.path());
    assert!(teacher.contains("Steps: 20, Sampler: euler"), "{teacher}");
    let (ok, info, err) = ldm_in(&cache, &["info", "shapes-fast"]);
    assert!(ok, "{err}");
    assert!(
        info.contains("guidance:         embedded (256-wide"),
        "{info}"
    );
    // A folder named shapes-fast here (a copy of the teacher) is what --model means.
    let here = dir.path().join("here");
    let teacher_dir = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("shapes-") && !name.starts_with("shapes-fast-")
        })
        .unwrap();
    copy_dir(&teacher_dir, &here.join("shapes-fast"));
    let local = params_of("shapes-fast", &here);
    assert!(local.contains("Steps: 20, Sampler: euler"), "{local}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn data_and_prompt_lists() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("data");
    let (ok, _, err) = ldm(&[
        "data",
        "shapes",
        "--count",
        "3",
        "--size",
        "128",
        "--out",
        s(&out),
    ]);
    assert!(ok, "{err}");
    let lines = std::fs::read_to_string(out.join("captions.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 3);
    assert!(lines.contains("\"caption\""));
    assert_eq!(png_size(&out.join("00000002.png")), (128, 128));
    // The evaluator reads the world's own pictures back as true (images made elsewhere are
    // evaluated the same way), and --images excludes generating.
    let (ok, report, err) = ldm(&["eval", "shapes", "--images", s(&out)]);
    assert!(ok, "{err}");
    let exact = report
        .lines()
        .find(|l| l.starts_with("exact match"))
        .unwrap();
    assert!(
        exact
            .split_whitespace()
            .skip(2)
            .all(|r| r == "100.0%" || r == "—"),
        "{report}"
    );
    let (ok, _, err) = ldm(&["eval", "shapes", "--images", s(&out), "--model", s(&out)]);
    assert!(!ok && err.contains("cannot be used with"), "{err}");
    // The committed evaluation lists parse as captions of the right kinds.
    for (file, objects) in [("shapes-one-object.txt", 1), ("shapes-two-objects.txt", 2)] {
        let text = std::fs::read_to_string(eval_prompts().join(file)).unwrap();
        assert_eq!(text.lines().count(), 100);
        for l in text.lines() {
            let st = ldm_train::shapes::read::parse_caption(l).unwrap();
            assert_eq!(st.objects.len(), objects, "{l}");
        }
    }
}

/// The autoencoder trains with the LPIPS term (the reduced-width fixture weights) and reports
/// the held-out distance.
#[test]
fn the_autoencoder_trains_with_lpips() {
    let dir = tempfile::tempdir().unwrap();
    let weights =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lpips/weights.safetensors");
    let (ok, out, err) = ldm(&[
        "train",
        "vae",
        "--miniature",
        "--steps",
        "2",
        "--batch",
        "2",
        "--lpips",
        s(&weights),
        "--out",
        s(dir.path()),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("LPIPS") && out.contains("held-out PSNR"),
        "{out}"
    );
    assert!(dir.path().join("vae/config.json").exists());
}

/// `ldm train vae --finetune-decoder`: the encoder's tensors and the scaling factor come out
/// byte for byte as they went in, the decoder's move; a source that is not an autoencoder, or
/// an architecture flag beside it, is refused.
#[test]
fn a_decoder_fine_tune_keeps_the_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let start = dir.path().join("start");
    let (ok, _, err) = ldm(&[
        "train",
        "vae",
        "--miniature",
        "--steps",
        "2",
        "--batch",
        "2",
        "--out",
        s(&start),
    ]);
    assert!(ok, "{err}");
    let tuned = dir.path().join("tuned");
    let (ok, out, err) = ldm(&[
        "train",
        "vae",
        "--miniature",
        "--finetune-decoder",
        s(&start),
        "--steps",
        "2",
        "--batch",
        "2",
        "--crop",
        "0",
        "--lr",
        "1e-2",
        "--out",
        s(&tuned),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("held-out PSNR"), "{out}");
    let weights =
        |d: &Path| safetensors_tensors(&d.join("vae/diffusion_pytorch_model.safetensors"));
    let (a, b) = (weights(&start), weights(&tuned));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let decoder_side = |k: &str| k.starts_with("decoder.") || k.starts_with("post_quant_conv.");
    for (k, v) in &a {
        if decoder_side(k) {
            continue;
        }
        assert!(v == &b[k], "the encoder's {k} changed");
    }
    assert!(
        a.iter().any(|(k, v)| decoder_side(k) && v != &b[k]),
        "the decoder did not train"
    );
    let scaling = |d: &Path| -> serde_json::Value {
        serde_json::from_slice::<serde_json::Value>(
            &std::fs::read(d.join("vae/config.json")).unwrap(),
        )
        .unwrap()["scaling_factor"]
            .clone()
    };
    assert_eq!(scaling(&start), scaling(&tuned));
    for (extra, says) in [
        (
            vec!["--finetune-decoder", s(dir.path())],
            "not an autoencoder folder",
        ),
        (
            vec!["--finetune-decoder", s(&start), "--latent-channels", "8"],
            "cannot be used with",
        ),
    ] {
        let fresh = dir.path().join("fresh");
        let mut args = vec![
            "train",
            "vae",
            "--miniature",
            "--steps",
            "1",
            "--out",
            s(&fresh),
        ];
        args.extend(extra);
        let (ok, _, err) = ldm(&args);
        assert!(!ok && err.contains(says), "{args:?}: {err}");
        assert!(!fresh.join("vae").exists());
    }
}

#[test]
fn bad_training_input_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "data".into(),
                "shapes".into(),
                "--count".into(),
                "1".into(),
                "--size".into(),
                "32".into(),
                "--out".into(),
                s(dir.path()).into(),
            ],
            "--size must be one of",
        ),
        (
            vec![
                "train".into(),
                "unet".into(),
                "--out".into(),
                s(&dir.path().join("none")).into(),
            ],
            "vae",
        ),
        (
            vec![
                "train".into(),
                "vae".into(),
                "--crop".into(),
                "7".into(),
                "--out".into(),
                s(dir.path()).into(),
            ],
            "--crop must be a multiple of 8",
        ),
        (
            vec![
                "train".into(),
                "vae".into(),
                "--lpips".into(),
                s(&dir.path().join("no-lpips.safetensors")).into(),
                "--out".into(),
                s(dir.path()).into(),
            ],
            "no-lpips.safetensors",
        ),
        (
            vec![
                "train".into(),
                "vae".into(),
                "--lpips".into(),
                "x.safetensors".into(),
                "--crop".into(),
                "8".into(),
                "--out".into(),
                s(dir.path()).into(),
            ],
            "at least 16 pixels",
        ),
        (
            vec![
                "train".into(),
                "unet".into(),
                "--zero-terminal-snr".into(),
                "--out".into(),
                s(dir.path()).into(),
            ],
            "--zero-terminal-snr needs",
        ),
        (
            vec![
                "train".into(),
                "unet".into(),
                "--snr-weight-floor".into(),
                "0".into(),
                "--out".into(),
                s(dir.path()).into(),
            ],
            "must be positive",
        ),
        (
            vec![
                "train".into(),
                "vae".into(),
                "--steps".into(),
                "0".into(),
                "--out".into(),
                s(dir.path()).into(),
            ],
            "at least 1",
        ),
        (
            vec![
                "eval".into(),
                "shapes".into(),
                "--prompts".into(),
                s(&dir.path().join("missing.txt")).into(),
            ],
            "missing.txt",
        ),
    ];
    for (args, expected) in cases {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, _, err) = ldm(&argv);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let not_caption = dir.path().join("p.txt");
    std::fs::write(&not_caption, "a photo of a cat\n").unwrap();
    let (ok, _, err) = ldm(&[
        "eval",
        "shapes",
        "--prompts",
        s(&not_caption),
        "--seeds",
        "1",
    ]);
    assert!(!ok && err.contains("not a Shapes World caption"), "{err}");
}

/// Guidance distillation end to end on a miniature teacher: the student is a diffusers folder
/// whose U-Net has the guidance embedding, it generates with one pass a step, a second run
/// resumes its finished checkpoint, and bad input is refused before anything is written.
#[test]
fn guidance_distillation_makes_a_one_pass_student() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = dir.path().join("teacher");
    let (ok, _, err) = ldm(&[
        "train",
        "shapes",
        "--miniature",
        "--vae-steps",
        "2",
        "--unet-steps",
        "2",
        "--out",
        s(&teacher),
    ]);
    assert!(ok, "{err}");
    let student = dir.path().join("student");
    let distil_to = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "distill",
            "guidance",
            "--teacher",
            s(&teacher),
            "--out",
            s(out),
            "--steps",
            "3",
            "--batch",
            "3",
            "--pool",
            "8",
            "--embedding-dim",
            "16",
        ];
        args.extend(extra);
        ldm(&args)
    };
    let distil = |extra: &[&str]| distil_to(&student, extra);
    let (ok, out, err) = distil(&[]);
    assert!(ok, "{err}");
    assert!(out.contains("guidance-distilled student: 3 steps"), "{out}");
    // Without a terminal the progress bar becomes lines on stderr.
    assert!(err.contains("3/3 ["), "{err}");
    let (ok, out, err) = ldm(&["info", s(&student), "--check"]);
    assert!(ok, "{err}");
    assert!(out.contains("guidance:         embedded (16-wide"), "{out}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(student.join("unet/config.json")).unwrap()).unwrap();
    assert_eq!(config["time_cond_proj_dim"], 16);
    let png = dir.path().join("student.png");
    let (ok, _, err) = ldm(&[
        "generate",
        "a red circle",
        "--model",
        s(&student),
        "--steps",
        "2",
        "--guidance",
        "5",
        "--out",
        s(&png),
    ]);
    assert!(ok, "{err}");
    assert_eq!(png_size(&png), (64, 64));
    // Finished: the same command again resumes at step 3 and writes the same student.
    let before = std::fs::read(student.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let (ok, _, err) = distil(&[]);
    assert!(ok, "{err}");
    let after = std::fs::read(student.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    assert!(
        before == after,
        "a resumed finished run changed the student"
    );
    // `--mixed-precision bf16` distils on products with bf16 operands: a loss curve near the
    // f32 run's, not equal to it.
    let losses = |dir: &Path| -> Vec<f64> {
        std::fs::read_to_string(dir.join("distill-train/losses.csv"))
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
            .collect()
    };
    let bf16 = dir.path().join("student-bf16");
    let (ok, _, err) = distil_to(&bf16, &["--mixed-precision", "bf16"]);
    assert!(ok, "{err}");
    let (a, b) = (losses(&student), losses(&bf16));
    assert_eq!((a.len(), b.len()), (3, 3));
    let rel: Vec<f64> = a
        .iter()
        .zip(&b)
        .map(|(a, b)| (a - b).abs() / a.abs())
        .collect();
    assert!(rel.iter().all(|&r| r < 0.05), "{a:?} vs {b:?}");
    assert!(rel.iter().any(|&r| r > 0.0), "bf16 changed nothing");
    // A variant of the recipe distils to a finite loss curve other than the default's.
    let another_curve = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let (ok, _, err) = distil_to(&out, extra);
        assert!(ok, "{extra:?}: {err}");
        let v = losses(&out);
        assert_eq!(v.len(), 3, "{extra:?}");
        assert!(
            v.iter().zip(&a).all(|(v, a)| v.is_finite() && v != a),
            "{extra:?}: {v:?} vs {a:?}"
        );
    };
    // `--loss plain` (the paper's mean) weighs the same examples otherwise.
    another_curve("student-plain", &["--loss", "plain"]);
    // `--own-states 0` trains on the forward process's states only (the default takes three
    // quarters of each batch from the student's own sampling): other examples.
    another_curve("student-forward-only", &["--own-states", "0"]);

    // Bad input: a clear error, nothing written.
    let fresh = dir.path().join("fresh");
    let refuse = |args: &[&str], says: &str| {
        let (ok, _, err) = ldm(args);
        assert!(!ok && err.contains(says), "{args:?}: {err}");
        assert!(!fresh.exists(), "{args:?} wrote {}", fresh.display());
    };
    let distil_to_fresh = |teacher: &Path, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "distill",
            "guidance",
            "--teacher",
            s(teacher),
            "--out",
            s(&fresh),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        v.extend(extra.iter().map(|a| a.to_string()));
        v
    };
    fn as_strs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    refuse(
        &as_strs(&distil_to_fresh(&dir.path().join("nope"), &[])),
        "not a diffusion model folder",
    );
    refuse(
        &as_strs(&distil_to_fresh(&student, &[])),
        "already has a guidance embedding",
    );
    refuse(
        &as_strs(&distil_to_fresh(&teacher, &["--scales", "5,2"])),
        "guidance scales",
    );
    refuse(
        &as_strs(&distil_to_fresh(&teacher, &["--loss", "huber"])),
        "invalid value 'huber'",
    );
    refuse(
        &as_strs(&distil_to_fresh(&teacher, &["--own-states", "1.5"])),
        "own-state share 1.5",
    );
    // Into a folder that holds another model: refused, the folder untouched.
    let (ok, _, err) = ldm(&[
        "distill",
        "guidance",
        "--teacher",
        s(&teacher),
        "--out",
        s(&teacher),
        "--steps",
        "1",
    ]);
    assert!(!ok && err.contains("not empty"), "{err}");

    // Progressive distillation of the guided student (its scale drawn per example): 4 → 2 → 1
    // steps, each student a folder sampled on the trailing grid.
    let halved = dir.path().join("halved");
    let progressive = |out: &Path, steps: &str, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "distill",
            "progressive",
            "--teacher",
            s(&student),
            "--out",
            s(out),
            "--steps",
            steps,
            "--teacher-steps",
            "4",
            "--train-steps",
            "2",
            "--batch",
            "2",
            "--pool",
            "4",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        v.extend(extra.iter().map(|a| a.to_string()));
        v
    };
    let (ok, out, err) = ldm(&as_strs(&progressive(&halved, "1", &[])));
    assert!(ok, "{err}");
    assert!(
        out.contains("2-step student") && out.contains("1-step student"),
        "{out}"
    );
    let sched =
        std::fs::read_to_string(halved.join("steps-1/scheduler/scheduler_config.json")).unwrap();
    assert!(sched.contains("\"trailing\""), "{sched}");
    // The student's own step count is its default.
    let png = dir.path().join("one-step.png");
    let (ok, _, err) = ldm(&[
        "generate",
        "a red circle",
        "--model",
        s(&halved.join("steps-1")),
        "--out",
        s(&png),
    ]);
    assert!(ok, "{err}");
    let (_, params, _) = ldm(&["info", s(&png)]);
    assert!(params.contains("Steps: 1,"), "{params}");
    let bad: Vec<String> = [
        "distill",
        "progressive",
        "--teacher",
        s(&teacher),
        "--out",
        s(&fresh),
        "--steps",
        "3",
        "--teacher-steps",
        "8",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    refuse(&as_strs(&bad), "power of two");
    // `--own-states 1`: every example a state of the student's own 2-step sampling, so another
    // loss curve for the same halving; a share above 1 refused.
    let halved_own = dir.path().join("halved-own");
    let (ok, _, err) = ldm(&as_strs(&progressive(
        &halved_own,
        "2",
        &["--own-states", "1"],
    )));
    assert!(ok, "{err}");
    let (plain, own) = (
        losses(&halved.join("steps-2")),
        losses(&halved_own.join("steps-2")),
    );
    assert_eq!(own.len(), 2);
    assert!(
        own.iter().all(|v| v.is_finite()) && own != plain,
        "{own:?} vs {plain:?}"
    );
    refuse(
        &as_strs(&progressive(&fresh, "2", &["--own-states", "2"])),
        "own-state share 2",
    );

    // Latent consistency distillation: an LCMScheduler folder that samples at its own
    // default steps with one pass a step.
    let lcm = dir.path().join("lcm");
    // `ldm distill lcm` for a few steps: `lora_args` as LCM-LoRA takes them, `lcm_args` with
    // the full student's small guidance embedding and its default steps too.
    let lora_args = |teacher: &Path, out: &Path, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "distill",
            "lcm",
            "--teacher",
            s(teacher),
            "--out",
            s(out),
            "--steps",
            "3",
            "--batch",
            "3",
            "--pool",
            "8",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        v.extend(extra.iter().map(|a| a.to_string()));
        v
    };
    let lcm_args = |teacher: &Path, out: &Path, extra: &[&str]| -> Vec<String> {
        let full = ["--embedding-dim", "16", "--default-steps", "2"];
        lora_args(teacher, out, &[&full[..], extra].concat())
    };
    let (ok, out, err) = ldm(&as_strs(&lcm_args(&teacher, &lcm, &[])));
    assert!(ok, "{err}");
    assert!(out.contains("latent consistency student: 3 steps"), "{out}");
    let sched: serde_json::Value = serde_json::from_slice(
        &std::fs::read(lcm.join("scheduler/scheduler_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(sched["_class_name"], "LCMScheduler");
    assert_eq!(sched["original_inference_steps"], 50);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lcm.join("model_index.json")).unwrap()).unwrap();
    assert_eq!(index["_ldm_defaults"]["num_inference_steps"], 2);
    let png = dir.path().join("lcm.png");
    let (ok, _, err) = ldm(&[
        "generate",
        "a red circle",
        "--model",
        s(&lcm),
        "--out",
        s(&png),
    ]);
    assert!(ok, "{err}");
    let (_, params, _) = ldm(&["info", s(&png)]);
    assert!(params.contains("Steps: 2, Sampler: lcm"), "{params}");
    // Its trajectory against the teacher's: the latent PSNR is reported beside adherence.
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(
        &prompts,
        "a red circle on a blue background\na small green square on a black background\n",
    )
    .unwrap();
    let (ok, out, err) = ldm(&[
        "eval",
        "shapes",
        "--model",
        s(&lcm),
        "--prompts",
        s(&prompts),
        "--seeds",
        "1",
        "--teacher",
        s(&teacher),
        "--teacher-steps",
        "3",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("latent PSNR against the teacher (3 steps): "),
        "{out}"
    );
    // Started from the guidance-distilled student (`--init`): another first loss than the
    // teacher's start gives.
    let lcm_init = dir.path().join("lcm-init");
    let (ok, _, err) = ldm(&as_strs(&lcm_args(
        &teacher,
        &lcm_init,
        &["--init", s(&student)],
    )));
    assert!(ok, "{err}");
    let first_loss = |d: &Path| -> String {
        let log = std::fs::read_to_string(d.join("distill-train/losses.csv")).unwrap();
        log.lines()
            .nth(1)
            .unwrap()
            .split(',')
            .nth(1)
            .unwrap()
            .to_string()
    };
    assert_ne!(first_loss(&lcm_init), first_loss(&lcm));
    // `--own-states 1`: every example a state of the target network's own 2-step sampling
    // (sampled before the first step), so another first loss, and a finite curve.
    let lcm_own = dir.path().join("lcm-own");
    let (ok, _, err) = ldm(&as_strs(&lcm_args(
        &teacher,
        &lcm_own,
        &["--own-states", "1"],
    )));
    assert!(ok, "{err}");
    assert_ne!(first_loss(&lcm_own), first_loss(&lcm));
    assert!(losses(&lcm_own).iter().all(|v| v.is_finite()));
    // `--huber-c 10`: nearly the squared error over 20, so another first loss.
    let lcm_l2 = dir.path().join("lcm-l2");
    let (ok, _, err) = ldm(&as_strs(&lcm_args(&teacher, &lcm_l2, &["--huber-c", "10"])));
    assert!(ok, "{err}");
    assert_ne!(first_loss(&lcm_l2), first_loss(&lcm));
    // A distilled teacher, a start that is not the teacher's student, a checkpoint of another
    // command, bad options: refused.
    refuse(
        &as_strs(&lcm_args(&student, &fresh, &[])),
        "already has a guidance embedding",
    );
    refuse(
        &as_strs(&lcm_args(&teacher, &fresh, &["--init", s(&teacher)])),
        "its U-Net is not the teacher's",
    );
    refuse(
        &as_strs(&lcm_args(&teacher, &fresh, &["--skeleton", "7"])),
        "skeleton",
    );
    refuse(
        &as_strs(&lcm_args(&teacher, &fresh, &["--own-states", "2"])),
        "own-state share 2",
    );
    refuse(
        &as_strs(&lcm_args(&teacher, &fresh, &["--huber-c", "0"])),
        "Huber c 0",
    );
    // Options LCM-LoRA has no use for are refused, not silently ignored.
    for extra in [
        ["--own-states", "0.5"],
        ["--embedding-dim", "64"],
        ["--default-steps", "2"],
    ] {
        let args = lora_args(&teacher, &fresh, &[&["--lora", "2"][..], &extra].concat());
        refuse(&as_strs(&args), "cannot be used with");
    }
    let (ok, _, err) = ldm(&as_strs(&lcm_args(&teacher, &student, &[])));
    assert!(!ok && err.contains("a checkpoint of `guidance`"), "{err}");

    // LCM-LoRA: a LoRA file in diffusers' naming that `ldm generate --lora` merges into the
    // teacher and samples with LCM.
    let lcm_lora = dir.path().join("lcm-lora");
    let (ok, out, err) = ldm(&as_strs(&lora_args(&teacher, &lcm_lora, &["--lora", "2"])));
    assert!(ok, "{err}");
    assert!(out.contains("LCM-LoRA: 3 steps"), "{out}");
    let file = lcm_lora.join("pytorch_lora_weights.safetensors");
    let names = safetensors_names(&file);
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("unet.") && n.ends_with("attn1.to_q.lora_A.weight")),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n.ends_with("conv1.lora_B.weight")),
        "{names:?}"
    );
    // With a target decay the EMA of the factors is the target and what is written: the same
    // names, other values than the online factors of the same run.
    let ema_run = dir.path().join("lcm-lora-ema");
    let args = lora_args(
        &teacher,
        &ema_run,
        &["--lora", "2", "--target-decay", "0.5"],
    );
    let (ok, _, err) = ldm(&as_strs(&args));
    assert!(ok, "{err}");
    let (online, ema) = (
        safetensors_tensors(&file),
        safetensors_tensors(&ema_run.join("pytorch_lora_weights.safetensors")),
    );
    assert_eq!(
        online.keys().collect::<Vec<_>>(),
        ema.keys().collect::<Vec<_>>()
    );
    assert!(
        online.iter().any(|(k, v)| v != &ema[k]),
        "the EMA is the online factors"
    );
    let png = dir.path().join("lcm-lora.png");
    let (ok, _, err) = ldm(&[
        "generate",
        "a red circle",
        "--model",
        s(&teacher),
        "--lora",
        &format!("{}:0.8", s(&file)),
        "--sampler",
        "lcm",
        "--steps",
        "2",
        "--guidance",
        "1",
        "--out",
        s(&png),
    ]);
    assert!(ok, "{err}");
    refuse(
        &as_strs(&lora_args(&teacher, &fresh, &["--lora", "0"])),
        "rank of 0",
    );
    refuse(
        &as_strs(&lora_args(&teacher, &fresh, &["--lora", "100000"])),
        "above the width",
    );
    // A LoRA file that is not one, or names layers the model lacks: refused.
    let (ok, _, err) = ldm(&[
        "generate",
        "a red circle",
        "--model",
        s(&teacher),
        "--lora",
        s(&teacher.join("unet/diffusion_pytorch_model.safetensors")),
    ]);
    assert!(!ok && err.contains("in no LoRA naming"), "{err}");
}

/// Each tensor's raw bytes, by name.
fn safetensors_tensors(path: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let o = &v["data_offsets"];
            let (a, b) = (
                o[0].as_u64().unwrap() as usize,
                o[1].as_u64().unwrap() as usize,
            );
            (k.clone(), data[a..b].to_vec())
        })
        .collect()
}

fn safetensors_names(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect()
}
