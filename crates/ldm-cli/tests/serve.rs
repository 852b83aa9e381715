//! `ldm serve` as a process of its own, under load and faults on loopback: 200 mixed requests from 8 concurrent clients — generations on
//! all three APIs, invalid bodies, cancelled jobs and clients that hang up mid-request — each
//! answered correctly, the server alive and its resident memory back near its level after the
//! first request; then a burst beyond the queue's bound, answered 429 with Retry-After.
//! Prints requests per second and latency percentiles (run with --nocapture to see them).

use base64::Engine;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An `ldm serve` child process on a free port of 127.0.0.1, killed when dropped.
struct Server {
    url: String,
    child: Option<Child>,
    client: reqwest::Client,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Server {
    fn start(extra: &[&str]) -> Self {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut child = Command::new(env!("CARGO_BIN_EXE_ldm"))
            .args(["serve", "--port", "0", "--model"])
            .arg(root.join("models/shapes"))
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .expect(&line)
            .to_string();
        Self {
            url,
            child: Some(child),
            client: reqwest::Client::new(),
        }
    }

    /// A second handle on the same server (for a concurrent client).
    fn handle(&self) -> Self {
        Self {
            url: self.url.clone(),
            child: None,
            client: reqwest::Client::new(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    fn at(&self, path: &str) -> String {
        format!("{}{}", self.url, path)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.client.get(self.at(path)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .client
            .post(self.at(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn wait_job(&self, id: &str) -> Value {
        for _ in 0..1200 {
            let (_, job) = self.get(&format!("/api/v1/jobs/{id}")).await;
            if matches!(
                job["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return job;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("job {id} did not end");
    }
}

fn decode(b64: &str) -> image::RgbImage {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    image::load_from_memory(&bytes).unwrap().to_rgb8()
}

/// The server process's resident memory.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    A1111,
    OpenAi,
    Job,
    Invalid,
    Cancel,
    Disconnect,
}

/// The mix each client cycles through.
const MIX: [Kind; 8] = [
    Kind::A1111,
    Kind::OpenAi,
    Kind::Job,
    Kind::Invalid,
    Kind::A1111,
    Kind::Cancel,
    Kind::OpenAi,
    Kind::Disconnect,
];

async fn one(s: &Server, kind: &Kind, i: usize) -> Option<Duration> {
    let t = Instant::now();
    let prompt = [
        "a red circle on a blue background",
        "a green square",
        "a small yellow triangle on the left",
    ][i % 3];
    match kind {
        Kind::A1111 => {
            let (status, r) = s
                .post(
                    "/sdapi/v1/txt2img",
                    json!({"prompt": prompt, "steps": 6, "seed": i}),
                )
                .await;
            assert_eq!(status, 200, "{r}");
            let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
            assert_eq!(info["seed"], i);
            assert_eq!(
                decode(r["images"][0].as_str().unwrap()).dimensions(),
                (64, 64)
            );
        }
        Kind::OpenAi => {
            let (status, r) = s
                .post(
                    "/v1/images/generations",
                    json!({"prompt": prompt, "steps": 6, "seed": i, "size": "64x64"}),
                )
                .await;
            assert_eq!(status, 200, "{r}");
            decode(r["data"][0]["b64_json"].as_str().unwrap());
        }
        Kind::Job => {
            let (status, r) = s
                .post(
                    "/api/v1/jobs",
                    json!({"prompt": prompt, "steps": 6, "seed": i}),
                )
                .await;
            assert_eq!(status, 202, "{r}");
            let job = s.wait_job(r["id"].as_str().unwrap()).await;
            assert_eq!(job["status"], "succeeded");
            assert_eq!(job["seeds"], json!([i]));
        }
        Kind::Invalid => {
            let bad = [
                json!({"prompt": "x", "width": 13}),
                json!({"prompt": "x", "steps": -3}),
                json!({"prompt": "x", "sampler_name": "nope"}),
                json!({"prompt": "x", "init_images": ["%%%"]}),
            ];
            let (status, r) = s
                .post("/sdapi/v1/txt2img", bad[i % bad.len()].clone())
                .await;
            assert_eq!(status, if i % bad.len() == 3 { 200 } else { 400 }, "{r}");
            if status == 200 {
                // txt2img ignores init images, as A1111 does.
                return Some(t.elapsed());
            }
            let r = s
                .client
                .post(s.at("/v1/images/generations"))
                .body("not json")
                .header("content-type", "application/json")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400);
            return None;
        }
        Kind::Cancel => {
            let (status, r) = s
                .post(
                    "/api/v1/jobs",
                    json!({"prompt": prompt, "steps": 30, "seed": i}),
                )
                .await;
            assert_eq!(status, 202);
            let id = r["id"].as_str().unwrap();
            let (status, _) = s
                .post(&format!("/api/v1/jobs/{id}/cancel"), json!({}))
                .await;
            // Queued: cancelled at once; running: at its next step; already done: 409.
            assert!([200, 202, 409].contains(&status), "{status}");
            let job = s.wait_job(id).await;
            if status != 409 {
                assert_eq!(job["status"], "cancelled");
            }
            return None;
        }
        Kind::Disconnect => {
            let client = s.client.clone();
            let url = s.at("/sdapi/v1/txt2img");
            let body = json!({"prompt": prompt, "steps": 30, "seed": i});
            let req = tokio::spawn(async move { client.post(url).json(&body).send().await });
            tokio::time::sleep(Duration::from_millis(30)).await;
            req.abort();
            return None;
        }
    }
    Some(t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_load_from_eight_clients() {
    let s = Server::start(&["--max-queue", "256"]);
    one(&s, &Kind::A1111, 0).await;
    let rss_after_first = rss_bytes(s.pid());
    let started = Instant::now();
    let mut clients = Vec::new();
    for c in 0..8 {
        let s = s.handle();
        clients.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for r in 0..25 {
                let i = c * 25 + r;
                let kind = &MIX[(c + r) % MIX.len()];
                if let Some(d) = one(&s, kind, i).await {
                    latencies.push(d);
                }
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for c in clients {
        latencies.extend(c.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Everything ends: nothing left running or queued.
    for _ in 0..500 {
        let (_, q) = s.get("/api/v1/queue").await;
        if q["running"].is_null() && q["queued"] == json!([]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, q) = s.get("/api/v1/queue").await;
    assert!(q["running"].is_null() && q["queued"] == json!([]), "{q}");
    let (status, p) = s.get("/sdapi/v1/progress").await;
    assert_eq!((status, p["state"]["job_count"].as_u64()), (200, Some(0)));
    one(&s, &Kind::A1111, 999).await;
    latencies.sort();
    let pct = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_secs_f64();
    let rss_end = rss_bytes(s.pid());
    println!(
        "200 mixed requests from 8 clients in {elapsed:.1} s ({:.1} requests/s); generations answered: {}, p50 {:.3} s, p95 {:.3} s; resident memory after the first request {:.1} MiB, at the end {:.1} MiB",
        200.0 / elapsed,
        latencies.len(),
        pct(0.5),
        pct(0.95),
        rss_after_first as f64 / (1 << 20) as f64,
        rss_end as f64 / (1 << 20) as f64,
    );
    assert!(
        (rss_end as f64) < rss_after_first as f64 * 1.10,
        "resident memory grew from {rss_after_first} to {rss_end} bytes"
    );
    overload_is_answered_with_429().await;
}

/// Run after the mixed load (one test, so that the two servers' memory is not measured together).
async fn overload_is_answered_with_429() {
    let s = Server::start(&["--max-queue", "4"]);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let client = s.client.clone();
        let url = s.at("/sdapi/v1/txt2img");
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .json(&json!({"prompt": "a red circle", "steps": 20, "seed": i}))
                .send()
                .await
                .unwrap();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            (r.status().as_u16(), retry)
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            (200, _) => ok += 1,
            (429, Some(after)) => {
                assert!(after >= 1);
                refused += 1
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    println!("overload: 20 simultaneous requests, queue bound 4: {ok} served, {refused} refused with 429 + Retry-After");
    // The queue's four places are always served, and the running job's when the worker took
    // the first request before the others arrived.
    assert!(
        (4..=5).contains(&ok) && ok + refused == 20,
        "{ok} served, {refused} refused"
    );
}
