//! Hostile and careless requests: bodies too large, wrong content types, bad JSON, absurd
//! sizes, missing credentials, foreign origins, and a slow client, each answered with a clear
//! 4xx while other jobs go on.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let mut cfg = config();
    cfg.limits.max_body_bytes = 64 << 10;
    let s = start(cfg).await;
    let big = "a".repeat(100 << 10);
    for path in [
        "/sdapi/v1/txt2img",
        "/v1/images/generations",
        "/api/v1/jobs",
    ] {
        // Too large, the wrong content type, malformed JSON.
        let too_large = format!("{{\"prompt\": \"{big}\"}}");
        for (content_type, body, status) in [
            ("application/json", too_large.as_str(), 413),
            ("text/plain", "{}", 415),
            ("application/json", "{\"prompt\": ", 400),
        ] {
            let r = s
                .client
                .post(s.at(path))
                .header("content-type", content_type)
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), status, "{path} {content_type}");
            if status == 400 {
                let e: Value = r.json().await.unwrap();
                assert!(e.to_string().contains("invalid JSON"), "{path}: {e}");
            }
        }
        // Absurd sizes and steps.
        for body in [
            json!({"prompt": "x", "width": 1_000_000, "size": "1000000x64"}),
            json!({"prompt": "x", "steps": 100_000}),
        ] {
            let r = s.client.post(s.at(path)).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 400, "{path} {body}");
        }
    }
    // A1111's error shape for validation errors.
    let (status, e) = s.post("/sdapi/v1/txt2img", json!({"width": 12})).await;
    assert_eq!(status, 400);
    assert!(
        e["detail"].as_str().unwrap().contains("multiple of 8"),
        "{e}"
    );
    // An image that is not one.
    let (status, e) = s
        .post(
            "/api/v1/jobs",
            json!({"prompt": "x", "init_image": "data:image/png;base64,AAAA"}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(e["error"]["param"], "init_images");
    // Unknown endpoints.
    let (status, _) = s.get("/sdapi/v1/nothing").await;
    assert_eq!(status, 404);
    // After all of that the server still generates.
    let (status, r) = s
        .post(
            "/sdapi/v1/txt2img",
            json!({"prompt": "a red circle", "steps": 4}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_guard_every_api() {
    let s = start(ldm_server::ServerConfig {
        api_auth: Some("user:secret".into()),
        api_key: Some("sk-test".into()),
        ..config()
    })
    .await;
    for path in ["/", "/sdapi/v1/options", "/v1/models", "/api/v1/queue"] {
        let r = s.client.get(s.at(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        assert!(r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic"));
        type Credentials = fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder;
        let cases: [(Credentials, u16); 4] = [
            (|r| r.basic_auth("user", Some("secret")), 200),
            (|r| r.bearer_auth("sk-test"), 200),
            (|r| r.basic_auth("user", Some("wrong")), 401),
            (|r| r.bearer_auth("sk-wrong"), 401),
        ];
        for (credentials, status) in cases {
            let r = credentials(s.client.get(s.at(path))).send().await.unwrap();
            assert_eq!(r.status(), status, "{path}");
        }
    }
    let r = s.client.get(s.at("/v1/models")).send().await.unwrap();
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "invalid_api_key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_only_for_allowed_origins() {
    let open = start(config()).await;
    let r = open
        .client
        .get(open.at("/sdapi/v1/options"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let s = start(ldm_server::ServerConfig {
        cors_allow_origins: vec!["http://app.example".into()],
        ..config()
    })
    .await;
    let preflight = |origin: &'static str| {
        s.client
            .request(reqwest::Method::OPTIONS, s.at("/sdapi/v1/txt2img"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
    };
    let r = preflight("http://app.example").await.unwrap();
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://app.example"
    );
    let r = preflight("http://evil.example").await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_does_not_hold_up_others() {
    let s = start(config()).await;
    // A client that sends half a request and stalls.
    let addr = s.url.trim_start_matches("http://").to_string();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"prompt\": \"a")
        .await
        .unwrap();
    // Others are served meanwhile.
    let (status, r) = s
        .post(
            "/sdapi/v1/txt2img",
            json!({"prompt": "a red circle", "steps": 4}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    let (status, _) = s.get("/sdapi/v1/progress").await;
    assert_eq!(status, 200);
    // When it gives up, nothing is left behind.
    slow.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
    let (_, q) = s.get("/api/v1/queue").await;
    assert_eq!(q["queued"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_served() {
    let s = start(config()).await;
    let r = s.client.get(s.at("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = r.text().await.unwrap();
    for id in [
        "id=\"prompt\"",
        "id=\"generate\"",
        "id=\"cancel\"",
        "id=\"progress\"",
        "id=\"gallery\"",
        "id=\"mask-canvas\"",
        "/api/v1/jobs",
    ] {
        assert!(html.contains(id), "{id}");
    }
    let (status, m) = s.get("/api/v1/model").await;
    assert_eq!(status, 200);
    assert_eq!(m["default_size"], 64);
    assert!(m["samplers"].as_array().unwrap().len() >= 18);
}
