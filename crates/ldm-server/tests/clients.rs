//! Real clients against a real server on 127.0.0.1: `webuiapi` and the `openai` package
//! (tools/clients/test_clients.py, from a virtual environment `.ci/run` makes), and the web page
//! in headless Chromium (tools/browser/page_test.mjs with playwright-core). `.ci/run` installs
//! them and sets LDM_REQUIRE_CLIENTS=1, so in CI a missing tool fails the test; elsewhere the
//! test says what is missing and how to install it.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::Command;

/// The tool, or `None` (after saying why) when it is not installed outside CI.
fn tool(path: PathBuf, install: &str) -> Option<PathBuf> {
    if path.exists() {
        return Some(path);
    }
    let message = format!("{} is missing: {install}", path.display());
    if std::env::var("LDM_REQUIRE_CLIENTS").is_ok_and(|v| v == "1") {
        panic!("{message}");
    }
    eprintln!("NOT RUN: {message}");
    None
}

async fn run(mut cmd: Command) -> (bool, String) {
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webuiapi_and_openai_work_unchanged() {
    let Some(python) = tool(
        root().join("target/ci-venv/bin/python"),
        "python3 -m venv target/ci-venv && target/ci-venv/bin/pip install -r tools/clients/requirements.txt",
    ) else {
        return;
    };
    let s = start(ldm_server::ServerConfig {
        api_auth: Some("user:secret".into()),
        api_key: Some("sk-test".into()),
        ..config()
    })
    .await;
    // A second server, on the tiny SD1.5 with the ControlNet fixtures, for ControlNetUnit.
    let cn = start(ldm_server::ServerConfig {
        controlnet_dirs: vec![root().join("fixtures/controlnet")],
        port: 0,
        ..ldm_server::ServerConfig::new(root().join("fixtures/tiny/sd15"))
    })
    .await;
    let mut cmd = Command::new(python);
    cmd.arg(root().join("tools/clients/test_clients.py"))
        .arg(&s.url)
        .arg(&cn.url)
        .arg(root().join("fixtures"));
    let (ok, text) = run(cmd).await;
    println!("{text}");
    assert!(ok, "the client script failed:\n{text}");
    assert!(text.contains("all client checks passed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_page_works_in_chromium() {
    let (Some(_), Some(_)) = (
        tool(
            PathBuf::from("/usr/bin/chromium"),
            "apt-get install chromium",
        ),
        tool(
            root().join("tools/browser/node_modules/playwright-core"),
            "(cd tools/browser && npm ci)",
        ),
    ) else {
        return;
    };
    let s = start(config()).await;
    let shots = root().join("target/browser-screenshots");
    let mut cmd = Command::new("node");
    cmd.arg(root().join("tools/browser/page_test.mjs"))
        .arg(&s.url)
        .arg(&shots);
    let (ok, text) = run(cmd).await;
    println!("{text}");
    assert!(ok, "the browser test failed:\n{text}");
    for shot in [
        "generated.png",
        "progress.png",
        "cancelled.png",
        "mask.png",
        "inpainted.png",
    ] {
        assert!(shots.join(shot).exists(), "{shot}");
    }
}
