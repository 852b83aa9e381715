//! The web page at `/`: plain HTML, CSS and a little JavaScript compiled into the binary (no
//! build step). It drives the job API: submit, follow the events (progress bar, previews),
//! cancel, and keep a gallery of this visit's results with their parameters.

use crate::common::Shared;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

const INDEX: &str = include_str!("page/index.html");

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/", get(index))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
}

async fn index() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INDEX,
    )
}
