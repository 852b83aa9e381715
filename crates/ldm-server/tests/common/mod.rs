//! A server on the embedded Shapes model (`models/shapes`, 64 px) on 127.0.0.1, started in the
//! test's own process on a free port.

#![allow(dead_code)]

use base64::Engine;
use ldm_server::common::Shared;
use ldm_server::ServerConfig;
use serde_json::Value;
use std::path::PathBuf;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn config() -> ServerConfig {
    ServerConfig {
        model_name: Some("shapes".into()),
        port: 0,
        ..ServerConfig::new(root().join("models/shapes"))
    }
}

pub struct Server {
    pub url: String,
    pub state: Shared,
    pub client: reqwest::Client,
}

impl Server {
    pub fn at(&self, path: &str) -> String {
        format!("{}{}", self.url, path)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.client.get(self.at(path)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
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

    /// Polls a job until it has ended.
    pub async fn wait_job(&self, id: &str) -> Value {
        for _ in 0..600 {
            let (_, job) = self.get(&format!("/api/v1/jobs/{id}")).await;
            if matches!(
                job["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return job;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("job {id} did not end");
    }

    /// Polls a job until it runs and has made at least one step.
    pub async fn wait_running(&self, id: &str) {
        for _ in 0..600 {
            let (_, job) = self.get(&format!("/api/v1/jobs/{id}")).await;
            if job["status"] == "running" && job["progress"]["step"].as_u64().unwrap_or(0) >= 1 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("job {id} did not start");
    }
}

pub async fn start(cfg: ServerConfig) -> Server {
    let state = ldm_server::load(&cfg).unwrap();
    let app = ldm_server::app(state.clone(), &cfg).unwrap();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Server {
        url: format!("http://{addr}"),
        state,
        client: reqwest::Client::new(),
    }
}

pub fn png_bytes(b64: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

pub fn decode(b64: &str) -> image::RgbImage {
    image::load_from_memory(&png_bytes(b64)).unwrap().to_rgb8()
}

pub fn encode_png(img: &image::DynamicImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

pub fn data_url(img: &image::DynamicImage) -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(encode_png(img))
    )
}

/// A long job (to be stopped by the test): 128 px, many steps.
pub fn long_job(prompt: &str) -> Value {
    serde_json::json!({"prompt": prompt, "width": 128, "height": 128, "steps": 150, "seed": 3})
}

/// Mean |Δ| in 8-bit levels of two pictures of one size.
#[allow(dead_code)]
pub fn mean_level_diff(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as f64 - y as f64).abs())
        .sum::<f64>()
        / a.as_raw().len() as f64
}
