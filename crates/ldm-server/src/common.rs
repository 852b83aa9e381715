//! What the three APIs share: the server's state, errors in each API's own shape, reading a
//! JSON body strictly (content type, size, syntax), and running a job synchronously — queued
//! like any other, waited for, and cancelled if the client goes away first.

use crate::jobs::{Lookup, Queue, QueueFull, Status};
use crate::model::Model;
use crate::params::{Invalid, Limits};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Everything a handler may use.
pub struct AppState {
    pub queue: Arc<Queue>,
    pub model: Arc<Model>,
    pub limits: Limits,
    /// A1111's options dictionary (kept as sent, per server).
    pub options: Mutex<Value>,
    pub started: Instant,
}

pub type Shared = Arc<AppState>;

/// Which API's error shape to answer in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// `{"error", "detail", "body", "errors"}`.
    A1111,
    /// `{"error": {"message", "type", "param", "code"}}`.
    OpenAi,
    /// The job API: `{"error": {"message", "param"}}`.
    Jobs,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    pub flavour: Flavour,
    pub status: StatusCode,
    pub message: String,
    pub param: Option<&'static str>,
    pub retry_after: Option<u64>,
    /// A failure of the generation itself (OpenAI clients must not retry it).
    pub generation: bool,
}

impl ApiError {
    pub fn new(flavour: Flavour, status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            flavour,
            status,
            message: message.into(),
            param: None,
            retry_after: None,
            generation: false,
        }
    }

    pub fn invalid(flavour: Flavour, e: Invalid) -> Self {
        Self {
            param: e.param,
            ..Self::new(flavour, StatusCode::BAD_REQUEST, e.message)
        }
    }

    pub fn full(flavour: Flavour, f: QueueFull) -> Self {
        Self {
            retry_after: Some(f.retry_after),
            ..Self::new(
                flavour,
                StatusCode::TOO_MANY_REQUESTS,
                "the queue is full; try again later",
            )
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.flavour {
            Flavour::A1111 => json!({
                "error": self.status.canonical_reason().unwrap_or("Error").replace(' ', ""),
                "detail": self.message,
                "body": "",
                "errors": "",
            }),
            Flavour::OpenAi => json!({"error": {
                "message": self.message,
                "type": if self.status.is_server_error() { "server_error" } else { "invalid_request_error" },
                "param": self.param,
                "code": Value::Null,
            }}),
            Flavour::Jobs => json!({"error": {"message": self.message, "param": self.param}}),
        };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if self.generation
            || self.flavour == Flavour::OpenAi
                && self.status.is_client_error()
                && self.status != StatusCode::TOO_MANY_REQUESTS
        {
            resp.headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
        }
        resp
    }
}

/// Reads a JSON body: 415 unless the content type is JSON (or absent), 413 above the size
/// limit, 400 for bad JSON.
pub fn read_json<T: DeserializeOwned>(
    flavour: Flavour,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
        if !ct.starts_with("application/json") && !ct.contains("+json") {
            return Err(ApiError::new(
                flavour,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("expected a JSON body (Content-Type: application/json), got `{ct}`"),
            ));
        }
    }
    let bytes = body.map_err(|e| ApiError::new(flavour, e.status(), e.body_text()))?;
    let bytes: &[u8] = if bytes.is_empty() { b"{}" } else { &bytes };
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            flavour,
            StatusCode::BAD_REQUEST,
            format!("invalid JSON body: {e}"),
        )
    })
}

pub fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// A random seed (A1111's `-1`), from the clock and a counter.
pub fn random_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let z = t ^ COUNTER.fetch_add(crate::params::GOLDEN_GAMMA, Ordering::Relaxed);
    crate::params::mix64(z) % 4_294_967_295
}

/// Cancels its job when dropped while armed: a synchronous request whose client disconnects
/// is dropped by the server before it finishes.
pub struct CancelOnDrop {
    pub queue: Arc<Queue>,
    pub id: String,
    pub armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.queue.cancel(&self.id);
        }
    }
}

/// What a finished job left.
pub struct Finished {
    pub status: Status,
    pub images: Vec<crate::jobs::Image>,
    pub error: Option<String>,
}

/// Waits for a job to end.
pub async fn wait(queue: &Queue, id: &str) -> Option<Finished> {
    loop {
        let (_, mut rx, done) = match queue.subscribe(id, u64::MAX) {
            Lookup::Found(s) => s,
            _ => return None,
        };
        if !done {
            loop {
                match rx.recv().await {
                    Ok(ev) if matches!(ev.kind, "completed" | "failed" | "cancelled") => break,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        }
        if let Lookup::Found(Some(f)) = queue.with_job(id, |job, _| {
            job.status.is_final().then(|| Finished {
                status: job.status,
                images: job.images.clone(),
                error: job.error.clone(),
            })
        }) {
            return Some(f);
        }
    }
}

/// Queues `params` and waits for the result, cancelling the job if the request is dropped.
pub async fn run_sync(
    state: &AppState,
    flavour: Flavour,
    params: crate::params::GenParams,
) -> Result<Finished, ApiError> {
    let (id, _) = state
        .queue
        .submit(params)
        .map_err(|f| ApiError::full(flavour, f))?;
    let mut guard = CancelOnDrop {
        queue: state.queue.clone(),
        id: id.clone(),
        armed: true,
    };
    let finished = wait(&state.queue, &id).await;
    guard.armed = false;
    let finished = finished.ok_or_else(|| {
        ApiError::new(
            flavour,
            StatusCode::INTERNAL_SERVER_ERROR,
            "the job was lost",
        )
    })?;
    if finished.status == Status::Failed {
        return Err(ApiError {
            generation: true,
            ..ApiError::new(
                flavour,
                StatusCode::INTERNAL_SERVER_ERROR,
                finished
                    .error
                    .clone()
                    .unwrap_or_else(|| "generation failed".into()),
            )
        });
    }
    Ok(finished)
}
