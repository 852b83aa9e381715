//! `ldm serve`: one loaded model behind three HTTP APIs and a web page, on axum and tokio.
//!
//! - [`a1111`]: A1111's `/sdapi/v1` (what `webuiapi` and Open WebUI speak);
//! - [`openai`]: OpenAI's `/v1/images` (what the `openai` package speaks);
//! - [`api`]: ldm's own job API, `/api/v1`, with server-sent events;
//! - [`page`]: the web page at `/`.
//!
//! Every generation, whichever API asked, is a job in one bounded FIFO ([`jobs`]) run by one
//! worker thread over the one resident model ([`model`]); the synchronous endpoints queue a job
//! and wait for it, so A1111's progress and interrupt cover every request, and a client that
//! disconnects cancels its job. Requests are checked against [`params::Limits`]; HTTP Basic
//! (`--api-auth`) and Bearer (`--api-key`) credentials are accepted by every route.

pub mod a1111;
pub mod api;
pub mod common;
pub mod jobs;
pub mod model;
pub mod openai;
pub mod page;
pub mod params;

use crate::common::{AppState, Shared};
use crate::jobs::Queue;
use crate::model::Model;
use crate::params::Limits;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use base64::Engine;
use candle_core::{DType, Device};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What `ldm serve` was asked for.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub model: PathBuf,
    /// The name the APIs give the model (default: its folder's name).
    pub model_name: Option<String>,
    /// A TAESD folder whose decoder draws the live previews (else a fitted linear map).
    pub taesd: Option<PathBuf>,
    pub dtype: DType,
    /// Where the model lives and computes.
    pub device: Device,
    /// Folders of LoRA files that `<lora:NAME:W>` tags in prompts name (merged per request,
    /// the loaded weights left as they are).
    pub lora_dirs: Vec<PathBuf>,
    /// Folders of ControlNets that A1111's `alwayson_scripts.controlnet` units name.
    pub controlnet_dirs: Vec<PathBuf>,
    pub host: String,
    pub port: u16,
    /// `user:pass` for HTTP Basic, as A1111's `--api-auth`.
    pub api_auth: Option<String>,
    /// A Bearer token, as OpenAI's API keys.
    pub api_key: Option<String>,
    /// Origins allowed to call from a browser page of theirs (none: same origin only).
    pub cors_allow_origins: Vec<String>,
    pub limits: Limits,
    /// Most jobs waiting behind the running one; more get 429.
    pub max_queue: usize,
    /// How long finished jobs keep their results.
    pub keep: Duration,
}

impl ServerConfig {
    pub fn new(model: PathBuf) -> Self {
        Self {
            model,
            model_name: None,
            taesd: None,
            dtype: DType::F32,
            device: Device::Cpu,
            lora_dirs: Vec::new(),
            controlnet_dirs: Vec::new(),
            host: "127.0.0.1".into(),
            port: 7860,
            api_auth: None,
            api_key: None,
            cors_allow_origins: Vec::new(),
            limits: Limits::default(),
            max_queue: 32,
            keep: Duration::from_secs(600),
        }
    }
}

/// What can stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the model: {0}")]
    Model(#[from] ldm_pipeline::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Config(String),
}

/// Credentials a request may carry.
#[derive(Debug, Clone, Default)]
struct Auth {
    basic: Option<String>,
    key: Option<String>,
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Auth {
    fn allows(&self, header: Option<&HeaderValue>) -> bool {
        if self.basic.is_none() && self.key.is_none() {
            return true;
        }
        let Some(value) = header.and_then(|h| h.to_str().ok()) else {
            return false;
        };
        let (scheme, cred) = value.split_once(' ').unwrap_or((value, ""));
        let cred = cred.trim();
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => self.basic.as_ref().is_some_and(|b| {
                base64::engine::general_purpose::STANDARD
                    .decode(cred)
                    .is_ok_and(|d| same(&d, b.as_bytes()))
            }),
            "bearer" => self
                .key
                .as_ref()
                .is_some_and(|k| same(cred.as_bytes(), k.as_bytes())),
            _ => false,
        }
    }
}

async fn authenticate(State(auth): State<Arc<Auth>>, req: Request, next: Next) -> Response {
    if auth.allows(req.headers().get(header::AUTHORIZATION)) {
        return next.run(req).await;
    }
    let path = req.uri().path();
    let body = if path.starts_with("/v1/") {
        serde_json::json!({"error": {"message": "missing or wrong API key", "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}})
    } else if path.starts_with("/sdapi/") {
        serde_json::json!({"error": "Unauthorized", "detail": "Incorrect username or password", "body": "", "errors": ""})
    } else {
        serde_json::json!({"error": {"message": "authentication required", "param": null}})
    };
    let mut resp = (StatusCode::UNAUTHORIZED, Json(body)).into_response();
    if auth.basic.is_some() {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"ldm\""),
        );
    }
    resp
}

/// Loads the model, starts the worker thread and returns the shared state.
pub fn load(cfg: &ServerConfig) -> Result<Shared, Error> {
    if let Some(a) = &cfg.api_auth {
        if !a.contains(':') {
            return Err(Error::Config("--api-auth must be user:password".into()));
        }
    }
    if cfg.max_queue == 0 {
        return Err(Error::Config("the queue must hold at least one job".into()));
    }
    let mut model = Model::load(
        &cfg.model,
        cfg.model_name.clone(),
        cfg.taesd.as_deref(),
        cfg.dtype,
        &cfg.device,
    )?;
    model.lora_dirs = cfg.lora_dirs.clone();
    model.controlnet_dirs = cfg.controlnet_dirs.clone();
    let model = Arc::new(model);
    let queue = Arc::new(Queue::new(cfg.max_queue, cfg.keep));
    {
        let (queue, model) = (queue.clone(), model.clone());
        std::thread::Builder::new()
            .name("ldm-worker".into())
            .spawn(move || jobs::run_worker(queue, model))?;
    }
    let options = a1111::default_options(&model.title());
    Ok(Arc::new(AppState {
        queue,
        model,
        limits: cfg.limits.clone(),
        options: Mutex::new(options),
        started: Instant::now(),
    }))
}

/// Every route, with authentication, CORS and the body limit.
pub fn app(state: Shared, cfg: &ServerConfig) -> Result<Router, Error> {
    let auth = Arc::new(Auth {
        basic: cfg.api_auth.clone(),
        key: cfg.api_key.clone(),
    });
    let mut router = Router::new()
        .merge(a1111::routes())
        .merge(openai::routes())
        .merge(api::routes())
        .merge(page::routes())
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(serde_json::json!({"error": {"message": "no such endpoint", "param": null}})),
            )
        })
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(auth, authenticate))
        .layer(DefaultBodyLimit::max(cfg.limits.max_body_bytes));
    if !cfg.cors_allow_origins.is_empty() {
        let origins = cfg
            .cors_allow_origins
            .iter()
            .map(|o| {
                HeaderValue::from_str(o.trim())
                    .map_err(|_| Error::Config(format!("bad CORS origin `{o}`")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        router = router.layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
                .allow_headers([
                    header::AUTHORIZATION,
                    header::CONTENT_TYPE,
                    "last-event-id"
                        .parse()
                        .map_err(|_| Error::Config("header".into()))?,
                ]),
        );
    }
    Ok(router)
}

/// Serves until Ctrl-C; `ready` is told the bound address once the port is open.
pub async fn serve(cfg: ServerConfig, ready: impl FnOnce(SocketAddr)) -> Result<(), Error> {
    let state = load(&cfg)?;
    let router = app(state, &cfg)?;
    let listener = tokio::net::TcpListener::bind((cfg.host.as_str(), cfg.port)).await?;
    ready(listener.local_addr()?);
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_checked() {
        let open = Auth::default();
        assert!(open.allows(None));
        let auth = Auth {
            basic: Some("u:p".into()),
            key: Some("sk-1".into()),
        };
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("u:p")
        );
        assert!(auth.allows(Some(&HeaderValue::from_str(&basic).unwrap())));
        assert!(auth.allows(Some(&HeaderValue::from_static("Bearer sk-1"))));
        assert!(!auth.allows(Some(&HeaderValue::from_static("Bearer sk-2"))));
        assert!(!auth.allows(Some(&HeaderValue::from_static("Basic dTpx"))));
        assert!(!auth.allows(None));
    }
}
