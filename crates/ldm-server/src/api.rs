//! ldm's own job API under `/api/v1`: submit a job and get its id at once (202), follow it by
//! polling or by server-sent events (`queued`, `started`, `progress` every step, `preview`
//! images, `image`, `completed` / `failed` / `cancelled`; heartbeats; `Last-Event-ID`
//! replays), cancel it, and see the queue.

use crate::common::{b64, random_seed, read_json, ApiError, Flavour, Shared};
use crate::jobs::{Event, Lookup, Status};
use crate::params::GenerationBody;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::time::Duration;

const F: Flavour = Flavour::Jobs;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/api/v1/jobs", post(submit))
        .route("/api/v1/jobs/{id}", get(job))
        .route("/api/v1/jobs/{id}/events", get(events))
        .route("/api/v1/jobs/{id}/cancel", post(cancel))
        .route("/api/v1/queue", get(queue))
        .route("/api/v1/model", get(model))
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(F, StatusCode::NOT_FOUND, format!("no job `{id}`"))
}

fn gone(id: &str) -> ApiError {
    ApiError::new(
        F,
        StatusCode::GONE,
        format!("job `{id}` finished long ago and its results were dropped"),
    )
}

async fn submit(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: GenerationBody = read_json(F, &headers, body)?;
    let params = body
        .validate(&state.model.defaults, &state.limits, random_seed())
        .map_err(|e| ApiError::invalid(F, e))?;
    let (id, position) = state
        .queue
        .submit(params)
        .map_err(|f| ApiError::full(F, f))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"id": id, "status": "queued", "queue_position": position})),
    )
        .into_response())
}

async fn job(State(state): State<Shared>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let found = state.queue.with_job(&id, |job, position| {
        let p = &job.params;
        json!({
            "id": job.id,
            "status": job.status,
            "queue_position": if job.status == Status::Queued { json!(position) } else { Value::Null },
            "created": job.created,
            "progress": {
                "phase": job.progress.phase,
                "step": job.progress.step,
                "steps": job.progress.steps,
                "image": job.progress.image,
                "images": job.progress.images,
                "fraction": if job.status == Status::Succeeded { 1.0 } else { job.progress.fraction() },
                "eta_seconds": job.progress.eta_seconds,
            },
            "images": job.images.iter().map(|i| b64(&i.png)).collect::<Vec<_>>(),
            "seeds": job.images.iter().map(|i| i.seed).collect::<Vec<_>>(),
            "infotexts": job.images.iter().map(|i| i.infotext.clone()).collect::<Vec<_>>(),
            "error": job.error,
            "parameters": {
                "prompt": p.prompt, "negative_prompt": p.negative_prompt,
                "width": p.width, "height": p.height, "steps": p.steps,
                "cfg_scale": p.cfg_scale, "seed": p.seed,
                "sampler_name": p.sampler.map(|s| s.display_name()),
                "scheduler": p.schedule.name(),
                "batch_size": p.batch_size, "n_iter": p.n_iter,
                "img2img": p.init_image.is_some(), "inpainting": p.mask.is_some(),
                "denoising_strength": p.denoising_strength,
            },
        })
    });
    match found {
        Lookup::Found(v) => Ok(Json(v)),
        Lookup::Gone => Err(gone(&id)),
        Lookup::Missing => Err(not_found(&id)),
    }
}

fn to_sse(ev: &Event) -> SseEvent {
    SseEvent::default()
        .id(ev.id.to_string())
        .event(ev.kind)
        .data(ev.data.to_string())
}

fn is_final(kind: &str) -> bool {
    matches!(kind, "completed" | "failed" | "cancelled")
}

async fn events(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let (past, rx, done) = match state.queue.subscribe(&id, after) {
        Lookup::Found(s) => s,
        Lookup::Gone => return Err(gone(&id)),
        Lookup::Missing => return Err(not_found(&id)),
    };
    let last = past.last().map_or(after, |e| e.id);
    let ended = done || past.iter().any(|e| is_final(e.kind));
    let replay = stream::iter(past.iter().map(|e| Ok(to_sse(e))).collect::<Vec<_>>());
    let live = stream::unfold((rx, last, ended), |(mut rx, last, ended)| async move {
        if ended {
            return None;
        }
        loop {
            match rx.recv().await {
                Ok(ev) if ev.id <= last => continue,
                Ok(ev) => {
                    let end = is_final(ev.kind);
                    return Some((Ok(to_sse(&ev)), (rx, ev.id, end)));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Ok(Sse::new(replay.chain(live)).keep_alive(
        KeepAlive::new()
            .interval(Duration::from_secs(10))
            .text("heartbeat"),
    ))
}

async fn cancel(State(state): State<Shared>, Path(id): Path<String>) -> Result<Response, ApiError> {
    match state.queue.cancel(&id) {
        Lookup::Found(Status::Queued) => {
            Ok(Json(json!({"id": id, "status": "cancelled"})).into_response())
        }
        Lookup::Found(Status::Running) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({"id": id, "status": "cancelling"})),
        )
            .into_response()),
        Lookup::Found(s) => Err(ApiError::new(
            F,
            StatusCode::CONFLICT,
            format!(
                "job `{id}` has already ended ({})",
                json!(s).as_str().unwrap_or("")
            ),
        )),
        Lookup::Gone => Err(gone(&id)),
        Lookup::Missing => Err(not_found(&id)),
    }
}

async fn queue(State(state): State<Shared>) -> Json<Value> {
    let (running, waiting) = state.queue.overview();
    let running = running.and_then(|id| {
        match state.queue.with_job(&id, |job, _| {
            json!({"id": job.id, "prompt": job.params.prompt, "progress": {
                "step": job.progress.step, "steps": job.progress.steps,
                "image": job.progress.image, "images": job.progress.images,
                "fraction": job.progress.fraction(), "eta_seconds": job.progress.eta_seconds,
            }})
        }) {
            Lookup::Found(v) => Some(v),
            _ => None,
        }
    });
    let queued: Vec<Value> = waiting
        .iter()
        .enumerate()
        .filter_map(
            |(i, id)| match state.queue.with_job(id, |job, _| job.params.prompt.clone()) {
                Lookup::Found(prompt) => Some(json!({"id": id, "position": i, "prompt": prompt})),
                _ => None,
            },
        )
        .collect();
    Json(json!({"running": running, "queued": queued, "max_queued": state.queue.max_queued}))
}

/// What the web page needs to fill its form: the model's defaults and the samplers.
async fn model(State(state): State<Shared>) -> Json<Value> {
    let m = &state.model;
    Json(json!({
        "name": m.name,
        "title": m.title(),
        "default_size": m.defaults.size,
        "default_steps": m.defaults.steps,
        "default_cfg_scale": m.defaults.cfg_scale,
        "default_sampler": ldm_sampling::names::SamplerName::for_config(&m.components.scheduler).ok().map(|s| s.display_name()),
        "samplers": ldm_sampling::names::SamplerName::all().map(|(_, s)| s.display_name()).collect::<Vec<_>>(),
        "limits": {"max_side": state.limits.max_side, "max_steps": state.limits.max_steps,
                   "max_images": state.limits.max_images},
    }))
}
