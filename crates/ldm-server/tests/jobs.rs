//! The job API: submit, poll, server-sent events with replays, cancellation, the queue and its
//! bound, forgotten jobs, and clients that go away.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

/// Reads server-sent events until one of `until` arrives: (id, event, data) triples.
async fn read_events(
    s: &Server,
    id: &str,
    last_event_id: Option<u64>,
    until: &[&str],
) -> Vec<(u64, String, Value)> {
    let mut req = s.client.get(s.at(&format!("/api/v1/jobs/{id}/events")));
    if let Some(l) = last_event_id {
        req = req.header("Last-Event-ID", l.to_string());
    }
    let mut resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut buf = String::new();
    let mut events = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(120), resp.chunk())
        .await
        .unwrap()
        .unwrap()
    {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let (mut eid, mut kind, mut data) = (0, String::new(), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    eid = v.trim().parse().unwrap();
                } else if let Some(v) = line.strip_prefix("event:") {
                    kind = v.trim().into();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim());
                }
            }
            if kind.is_empty() {
                continue; // a heartbeat comment
            }
            let done = until.contains(&kind.as_str());
            events.push((eid, kind, serde_json::from_str(&data).unwrap()));
            if done {
                return events;
            }
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_with_events_and_results() {
    let s = start(config()).await;
    let r = s
        .client
        .post(s.at("/api/v1/jobs"))
        .json(&json!({"prompt": "a red circle on a blue background", "steps": 10, "seed": 9, "preview_every": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let job: Value = r.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(job["status"], "queued");
    let events = read_events(&s, &id, None, &["completed", "failed"]).await;
    let kinds: Vec<&str> = events.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(kinds[0], "queued");
    assert!(kinds.contains(&"started"), "{kinds:?}");
    assert_eq!(
        kinds.iter().filter(|k| **k == "progress").count(),
        10,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "preview").count(),
        4,
        "{kinds:?}"
    );
    assert_eq!(*kinds.last().unwrap(), "completed");
    let ids: Vec<u64> = events.iter().map(|e| e.0).collect();
    assert!(ids.windows(2).all(|w| w[1] > w[0]), "{ids:?}");
    let last_progress = events.iter().rev().find(|e| e.1 == "progress").unwrap();
    assert_eq!(last_progress.2["step"], 10);
    assert_eq!(last_progress.2["fraction"], 1.0);

    let (status, job) = s.get(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["seeds"], json!([9]));
    assert_eq!(job["progress"]["fraction"], 1.0);
    assert_eq!(
        decode(job["images"][0].as_str().unwrap()).dimensions(),
        (64, 64)
    );
    assert!(job["infotexts"][0].as_str().unwrap().contains("Seed: 9"));

    // Reconnecting with Last-Event-ID replays only what came after it (previews are not kept).
    let started = events.iter().find(|e| e.1 == "started").unwrap().0;
    let replay = read_events(&s, &id, Some(started), &["completed"]).await;
    assert!(replay.iter().all(|e| e.0 > started));
    assert_eq!(replay.iter().filter(|e| e.1 == "progress").count(), 10);
    assert!(replay.iter().all(|e| e.1 != "preview"));
    assert_eq!(replay.last().unwrap().1, "completed");

    let (status, e) = s.get("/api/v1/jobs/nosuchjob").await;
    assert_eq!(status, 404);
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("nosuchjob"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_queued_and_running_jobs() {
    let s = start(config()).await;
    let (_, first) = s.post("/api/v1/jobs", long_job("a blue square")).await;
    let (_, second) = s
        .post(
            "/api/v1/jobs",
            json!({"prompt": "a red circle", "steps": 5}),
        )
        .await;
    let (first, second) = (
        first["id"].as_str().unwrap().to_string(),
        second["id"].as_str().unwrap().to_string(),
    );
    s.wait_running(&first).await;
    let (status, q) = s.get("/api/v1/queue").await;
    assert_eq!(status, 200);
    assert_eq!(q["running"]["id"], first.as_str());
    assert_eq!(q["queued"][0]["id"], second.as_str());
    let (_, job) = s.get(&format!("/api/v1/jobs/{second}")).await;
    assert_eq!(
        (job["status"].as_str(), job["queue_position"].as_u64()),
        (Some("queued"), Some(0))
    );

    // A queued job is cancelled at once.
    let (status, r) = s
        .post(&format!("/api/v1/jobs/{second}/cancel"), json!({}))
        .await;
    assert_eq!((status, r["status"].as_str()), (200, Some("cancelled")));
    let (_, job) = s.get(&format!("/api/v1/jobs/{second}")).await;
    assert_eq!(job["status"], "cancelled");
    // A running one at its next step, keeping nothing.
    let (status, r) = s
        .post(&format!("/api/v1/jobs/{first}/cancel"), json!({}))
        .await;
    assert_eq!((status, r["status"].as_str()), (202, Some("cancelling")));
    let job = s.wait_job(&first).await;
    assert_eq!(job["status"], "cancelled");
    assert!(job["progress"]["step"].as_u64().unwrap() < 150);
    assert_eq!(job["images"], json!([]));
    let events = read_events(&s, &first, None, &["cancelled"]).await;
    assert_eq!(events.last().unwrap().1, "cancelled");
    // Cancelling an ended job is a conflict.
    let (status, _) = s
        .post(&format!("/api/v1/jobs/{first}/cancel"), json!({}))
        .await;
    assert_eq!(status, 409);
    // The server goes on.
    let (_, third) = s
        .post(
            "/api/v1/jobs",
            json!({"prompt": "a red circle", "steps": 4}),
        )
        .await;
    let job = s.wait_job(third["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_and_old_jobs_are_gone() {
    let s = start(ldm_server::ServerConfig {
        max_queue: 1,
        keep: Duration::from_millis(300),
        ..config()
    })
    .await;
    let (_, running) = s.post("/api/v1/jobs", long_job("a blue square")).await;
    let running = running["id"].as_str().unwrap().to_string();
    s.wait_running(&running).await;
    let (status, waiting) = s
        .post("/api/v1/jobs", json!({"prompt": "x", "steps": 2}))
        .await;
    assert_eq!(status, 202);
    let r = s
        .client
        .post(s.at("/api/v1/jobs"))
        .json(&json!({"prompt": "y"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(
        r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    // The synchronous APIs share the queue and its bound.
    let r = s
        .client
        .post(s.at("/sdapi/v1/txt2img"))
        .json(&json!({"prompt": "y"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let r = s
        .client
        .post(s.at("/v1/images/generations"))
        .json(&json!({"prompt": "y"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let e: Value = r.json().await.unwrap();
    assert!(e["error"]["message"].as_str().unwrap().contains("queue"));

    s.post(&format!("/api/v1/jobs/{running}/cancel"), json!({}))
        .await;
    let waiting = waiting["id"].as_str().unwrap().to_string();
    assert_eq!(s.wait_job(&waiting).await["status"], "succeeded");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (status, e) = s.get(&format!("/api/v1/jobs/{waiting}")).await;
    assert_eq!(status, 410, "{e}");
    let r = s
        .client
        .get(s.at(&format!("/api/v1/jobs/{waiting}/events")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 410);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_its_job() {
    let s = start(config()).await;
    for path in ["/sdapi/v1/txt2img", "/v1/images/generations"] {
        let client = reqwest::Client::new();
        let url = s.at(path);
        let mut body = long_job("a green triangle");
        body["size"] = json!("128x128");
        let request = tokio::spawn(async move { client.post(url).json(&body).send().await });
        // Wait until its job runs, then drop the connection.
        let mut id = None;
        for _ in 0..500 {
            let (_, q) = s.get("/api/v1/queue").await;
            if let Some(r) = q["running"]["id"].as_str() {
                id = Some(r.to_string());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let id = id.expect("the job never ran");
        s.wait_running(&id).await;
        request.abort();
        let job = s.wait_job(&id).await;
        assert_eq!(job["status"], "cancelled", "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taesd_draws_the_previews_and_leaves_the_pictures_alone() {
    let tiny = |taesd: bool| ldm_server::ServerConfig {
        taesd: taesd.then(|| root().join("fixtures/taesd/model")),
        model_name: Some("tiny".into()),
        ..ldm_server::ServerConfig::new(root().join("fixtures/tiny/sd15"))
    };
    let mut previews = Vec::new();
    let mut pictures = Vec::new();
    for taesd in [false, true] {
        let s = start(tiny(taesd)).await;
        let (_, r) = s
            .post(
                "/api/v1/jobs",
                json!({"prompt": "a red circle", "width": 32, "height": 32, "steps": 6, "seed": 4}),
            )
            .await;
        let id = r["id"].as_str().unwrap().to_string();
        let events = read_events(&s, &id, None, &["completed"]).await;
        let preview: Vec<&Value> = events
            .iter()
            .filter(|e| e.1 == "preview")
            .map(|e| &e.2)
            .collect();
        assert_eq!(preview.len(), 5);
        let img = decode(preview[4]["png"].as_str().unwrap());
        assert_eq!(img.dimensions(), (32, 32));
        previews.push(img);
        let job = s.wait_job(&id).await;
        pictures.push(job["images"][0].as_str().unwrap().to_string());
    }
    assert_ne!(previews[0], previews[1]);
    assert_eq!(pictures[0], pictures[1]);
}
