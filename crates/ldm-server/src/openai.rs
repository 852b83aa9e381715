//! The OpenAI images API under `/v1`, as the `openai` package and chat front-ends call it:
//! generations (JSON), edits (multipart: `image` or `image[]`, an optional `mask` whose
//! transparent pixels are repainted) and the model list. Errors carry OpenAI's shape, and
//! failed generations `x-should-retry: false` so the client does not retry them.

use crate::common::{b64, random_seed, read_json, run_sync, ApiError, Flavour, Shared};
use crate::params::{decode_image_bytes, invalid, mask_from, GenerationBody};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Multipart, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

const F: Flavour = Flavour::OpenAi;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/images/generations", post(generations))
        .route("/v1/images/edits", post(edits))
        .route("/v1/models", get(models))
}

/// The fields both endpoints take (OpenAI's, plus `seed`, `steps`, `negative_prompt`,
/// `guidance_scale`, `strength`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ImagesRequest {
    prompt: Option<String>,
    n: Option<i64>,
    size: Option<String>,
    response_format: Option<String>,
    seed: Option<i64>,
    steps: Option<i64>,
    negative_prompt: Option<String>,
    guidance_scale: Option<f64>,
    strength: Option<f64>,
}

impl ImagesRequest {
    fn body(&self) -> Result<GenerationBody, ApiError> {
        let prompt = self
            .prompt
            .clone()
            .filter(|p| !p.trim().is_empty())
            .ok_or_else(|| ApiError::invalid(F, invalid("prompt", "prompt is required")))?;
        let (width, height) = match self.size.as_deref() {
            None | Some("auto") | Some("") => (None, None),
            Some(s) => {
                let parsed = s.split_once(['x', 'X']).and_then(|(w, h)| {
                    Some((w.trim().parse::<i64>().ok()?, h.trim().parse::<i64>().ok()?))
                });
                match parsed {
                    Some((w, h)) => (Some(w), Some(h)),
                    None => {
                        return Err(ApiError::invalid(
                            F,
                            invalid("size", format!("size must be WIDTHxHEIGHT, got `{s}`")),
                        ))
                    }
                }
            }
        };
        if let Some(f) = self.response_format.as_deref() {
            if f != "b64_json" && f != "url" {
                return Err(ApiError::invalid(
                    F,
                    invalid("response_format", "response_format must be b64_json or url"),
                ));
            }
        }
        Ok(GenerationBody {
            prompt: Some(prompt),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps,
            cfg_scale: self.guidance_scale,
            width,
            height,
            seed: self.seed,
            batch_size: Some(self.n.unwrap_or(1)),
            denoising_strength: self.strength,
            ..GenerationBody::default()
        })
    }

    /// `url` answers carry a `data:` URL: the server keeps no files to link to.
    fn answer(&self, images: Vec<crate::jobs::Image>, prompt: &str) -> Json<Value> {
        let url = self.response_format.as_deref() == Some("url");
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let data: Vec<Value> = images
            .iter()
            .map(|i| {
                if url {
                    json!({"url": format!("data:image/png;base64,{}", b64(&i.png)), "revised_prompt": prompt})
                } else {
                    json!({"b64_json": b64(&i.png), "revised_prompt": prompt})
                }
            })
            .collect();
        Json(json!({"created": created, "data": data}))
    }
}

async fn generations(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: ImagesRequest = read_json(F, &headers, body)?;
    let params = req
        .body()?
        .validate(&state.model.defaults, &state.limits, random_seed())
        .map_err(|e| ApiError::invalid(F, e))?;
    let prompt = params.prompt.clone();
    let finished = run_sync(&state, F, params).await?;
    Ok(req.answer(finished.images, &prompt))
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    ApiError::new(
        F,
        e.status(),
        format!("malformed multipart body: {}", e.body_text()),
    )
}

async fn edits(
    State(state): State<Shared>,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    let mut multipart =
        multipart.map_err(|e| ApiError::new(F, StatusCode::BAD_REQUEST, e.body_text()))?;
    let mut req = ImagesRequest::default();
    let mut image = None;
    let mut mask = None;
    while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or("").to_string();
        match name.as_str() {
            "image" | "image[]" => {
                let bytes = field.bytes().await.map_err(multipart_error)?;
                if image.is_none() {
                    image = Some(
                        decode_image_bytes(&bytes, "image", &state.limits)
                            .map_err(|e| ApiError::invalid(F, e))?,
                    );
                }
            }
            "mask" => {
                let bytes = field.bytes().await.map_err(multipart_error)?;
                mask = Some(
                    decode_image_bytes(&bytes, "mask", &state.limits)
                        .map_err(|e| ApiError::invalid(F, e))?,
                );
            }
            _ => {
                let text = field.text().await.map_err(multipart_error)?;
                let number = |param: &'static str| {
                    text.trim().parse::<f64>().map_err(|_| {
                        ApiError::invalid(F, invalid(param, format!("{param} must be a number")))
                    })
                };
                match name.as_str() {
                    "prompt" => req.prompt = Some(text),
                    "negative_prompt" => req.negative_prompt = Some(text),
                    "size" => req.size = Some(text),
                    "response_format" => req.response_format = Some(text),
                    "n" => req.n = Some(number("n")? as i64),
                    "seed" => req.seed = Some(number("seed")? as i64),
                    "steps" => req.steps = Some(number("steps")? as i64),
                    "guidance_scale" => req.guidance_scale = Some(number("guidance_scale")?),
                    "strength" => req.strength = Some(number("strength")?),
                    _ => {} // model, user, quality…: ignored
                }
            }
        }
    }
    let image =
        image.ok_or_else(|| ApiError::invalid(F, invalid("image", "an image is required")))?;
    let mut body = req.body()?;
    // The mask: the `mask` file, or the image's own transparency; none makes it img2img.
    let mask = match mask {
        Some(m) => Some(mask_from(m, false, 0.0)),
        None if image.color().has_alpha() && image.to_rgba8().pixels().any(|p| p.0[3] < 255) => {
            Some(mask_from(image.clone(), false, 0.0))
        }
        None => None,
    };
    if body.width.is_none() {
        let (w, h) = (image.width() as i64 / 8 * 8, image.height() as i64 / 8 * 8);
        body.width = Some(w);
        body.height = Some(h);
    }
    if mask.is_some() && body.denoising_strength.is_none() {
        body.denoising_strength = Some(1.0);
    }
    let mut params = body
        .validate(&state.model.defaults, &state.limits, random_seed())
        .map_err(|e| ApiError::invalid(F, e))?;
    params.init_image = Some(image.to_rgb8());
    params.mask = mask;
    let prompt = params.prompt.clone();
    let finished = run_sync(&state, F, params).await?;
    Ok(req.answer(finished.images, &prompt))
}

async fn models(State(state): State<Shared>) -> Json<Value> {
    let created = state
        .model
        .path
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Json(json!({
        "object": "list",
        "data": [{"id": state.model.name, "object": "model", "created": created, "owned_by": "ldm"}],
    }))
}
