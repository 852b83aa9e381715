//! A1111's web API under `/sdapi/v1`, as the `webuiapi` client and Open WebUI's
//! "Automatic1111" engine use it: txt2img and img2img (thin wrappers over the job queue),
//! progress with a live preview, interrupt and skip, options, and the model, sampler and
//! scheduler lists.

use crate::common::{b64, random_seed, read_json, run_sync, ApiError, Flavour, Shared};
use crate::jobs::Lookup;
use crate::params::GenerationBody;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use ldm_sampling::names::SamplerName;
use serde::Deserialize;
use serde_json::{json, Map, Value};

const F: Flavour = Flavour::A1111;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/sdapi/v1/txt2img", post(txt2img))
        .route("/sdapi/v1/img2img", post(img2img))
        .route("/sdapi/v1/progress", get(progress))
        .route("/sdapi/v1/interrupt", post(interrupt))
        .route("/sdapi/v1/skip", post(skip))
        .route("/sdapi/v1/options", get(get_options).post(set_options))
        .route("/sdapi/v1/sd-models", get(sd_models))
        .route("/sdapi/v1/samplers", get(samplers))
        .route("/sdapi/v1/schedulers", get(schedulers))
        .route("/sdapi/v1/upscalers", get(empty_list))
        .route("/sdapi/v1/sd-vae", get(empty_list))
        .route("/sdapi/v1/loras", get(loras))
        .route("/controlnet/model_list", get(controlnet_models))
        .route("/controlnet/module_list", get(controlnet_modules))
        .route("/controlnet/version", get(controlnet_version))
        .route("/sdapi/v1/hypernetworks", get(empty_list))
        .route("/sdapi/v1/face-restorers", get(empty_list))
        .route("/sdapi/v1/prompt-styles", get(empty_list))
        .route("/sdapi/v1/embeddings", get(embeddings))
        .route("/sdapi/v1/scripts", get(scripts))
        .route("/sdapi/v1/cmd-flags", get(cmd_flags))
        .route("/sdapi/v1/memory", get(memory))
        .route("/sdapi/v1/png-info", post(png_info))
        .route("/sdapi/v1/refresh-checkpoints", post(null))
}

async fn generate(state: Shared, body: Value, img2img: bool) -> Result<Json<Value>, ApiError> {
    let mut parsed: GenerationBody = serde_json::from_value(body.clone()).map_err(|e| {
        ApiError::new(
            F,
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("invalid field: {e}"),
        )
    })?;
    if img2img {
        if parsed.init_images.as_ref().is_none_or(|v| v.is_empty()) {
            return Err(ApiError {
                param: Some("init_images"),
                ..ApiError::new(
                    F,
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "img2img needs init_images",
                )
            });
        }
    } else {
        parsed.init_images = None;
        parsed.init_image = None;
        parsed.mask = None;
    }
    let params = parsed
        .validate(&state.model.defaults, &state.limits, random_seed())
        .map_err(|e| ApiError::invalid(F, e))?;
    // Unknown ControlNets are refused here, before the job is queued (the worker checks again).
    state
        .model
        .controlnets_for(&params.control)
        .map_err(|m| ApiError::invalid(F, crate::params::invalid("alwayson_scripts", m)))?;
    let sampler = state.model.sampler_of(&params).display_name();
    let p = params.clone();
    let finished = run_sync(&state, F, params).await?;
    let seeds: Vec<u64> = finished.images.iter().map(|i| i.seed).collect();
    let infotexts: Vec<&str> = finished
        .images
        .iter()
        .map(|i| i.infotext.as_str())
        .collect();
    let n = finished.images.len();
    let info = json!({
        "prompt": p.prompt,
        "all_prompts": vec![&p.prompt; n],
        "negative_prompt": p.negative_prompt.clone().unwrap_or_default(),
        "all_negative_prompts": vec![p.negative_prompt.clone().unwrap_or_default(); n],
        "seed": p.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": vec![-1; n],
        "subseed_strength": 0,
        "width": p.width,
        "height": p.height,
        "sampler_name": sampler,
        "scheduler": p.schedule.name(),
        "cfg_scale": p.cfg_scale,
        "steps": p.steps,
        "batch_size": p.batch_size,
        "restore_faces": false,
        "sd_model_name": state.model.name,
        "sd_model_hash": state.model.hash,
        "sd_vae_name": Value::Null,
        "sd_vae_hash": Value::Null,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": if img2img { json!(p.denoising_strength) } else { Value::Null },
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": job_timestamp(),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": false,
        "version": concat!("ldm ", env!("CARGO_PKG_VERSION")),
    });
    let images: Vec<String> = finished.images.iter().map(|i| b64(&i.png)).collect();
    let mut parameters = body;
    if let Some(obj) = parameters.as_object_mut() {
        // A1111 echoes the request without the (large) input images.
        obj.remove("init_images");
        obj.remove("mask");
    }
    Ok(Json(json!({
        "images": images,
        "parameters": parameters,
        "info": info.to_string(),
    })))
}

fn job_timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Civil date from days since 1970 (Howard Hinnant's algorithm), UTC.
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

async fn txt2img(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body: Value = read_json(F, &headers, body)?;
    generate(state, body, false).await
}

async fn img2img(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body: Value = read_json(F, &headers, body)?;
    generate(state, body, true).await
}

#[derive(Deserialize)]
struct ProgressQuery {
    #[serde(default)]
    skip_current_image: bool,
}

async fn progress(State(state): State<Shared>, Query(q): Query<ProgressQuery>) -> Json<Value> {
    let (running, waiting) = state.queue.overview();
    let idle = json!({
        "progress": 0.0,
        "eta_relative": 0.0,
        "state": {
            "skipped": false, "interrupted": false, "stopping_generation": false,
            "job": "", "job_count": 0, "job_timestamp": "0", "job_no": 0,
            "sampling_step": 0, "sampling_steps": 0,
        },
        "current_image": Value::Null,
        "textinfo": Value::Null,
        "current_task": Value::Null,
    });
    let Some(id) = running else {
        return Json(idle);
    };
    let found = state.queue.with_job(&id, |job, _| {
        let p = &job.progress;
        let fraction = (0.01 + p.fraction()).min(1.0);
        let preview = (!q.skip_current_image)
            .then(|| job.preview.as_ref().map(|png| b64(png)))
            .flatten();
        json!({
            "progress": fraction,
            "eta_relative": p.eta_seconds.unwrap_or(0.0),
            "state": {
                "skipped": job.flags.skip.load(std::sync::atomic::Ordering::Relaxed),
                "interrupted": job.flags.interrupt.load(std::sync::atomic::Ordering::Relaxed),
                "stopping_generation": false,
                "job": format!("task({})", job.id),
                "job_count": p.images.max(1) + waiting.len(),
                "job_timestamp": job.created.to_string(),
                "job_no": p.image,
                "sampling_step": p.step,
                "sampling_steps": p.steps,
            },
            "current_image": preview,
            "textinfo": Value::Null,
            "current_task": format!("task({})", job.id),
        })
    });
    match found {
        Lookup::Found(v) => Json(v),
        _ => Json(idle),
    }
}

async fn interrupt(State(state): State<Shared>) -> Json<Value> {
    state.queue.signal_running(|f| &f.interrupt);
    Json(Value::Null)
}

async fn skip(State(state): State<Shared>) -> Json<Value> {
    state.queue.signal_running(|f| &f.skip);
    Json(Value::Null)
}

/// The options A1111 clients read, with the loaded model as the checkpoint.
pub fn default_options(title: &str) -> Value {
    json!({
        "sd_model_checkpoint": title,
        "sd_checkpoint_hash": Value::Null,
        "sd_vae": "Automatic",
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
        "samples_save": false,
        "save_images_add_number": true,
        "live_previews_enable": true,
        "show_progress_every_n_steps": 1,
        "live_preview_content": "Prompt",
        "eta_noise_seed_delta": 0,
        "sd_checkpoints_limit": 1,
    })
}

async fn get_options(State(state): State<Shared>) -> Json<Value> {
    let options = state
        .options
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Json(options)
}

async fn set_options(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body: Map<String, Value> = read_json(F, &headers, body)?;
    if let Some(ckpt) = body.get("sd_model_checkpoint") {
        let m = &state.model;
        let known = ckpt
            .as_str()
            .is_some_and(|c| c == m.title() || c == m.name || c == m.hash);
        if !known {
            return Err(ApiError::new(
                F,
                StatusCode::BAD_REQUEST,
                format!(
                    "model {ckpt} not found; this server has one model, `{}`",
                    m.title()
                ),
            ));
        }
    }
    let mut options = state.options.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(obj) = options.as_object_mut() {
        for (k, v) in body {
            let v = if k == "sd_model_checkpoint" {
                json!(state.model.title())
            } else {
                v
            };
            obj.insert(k, v);
        }
    }
    Ok(Json(Value::Null))
}

async fn sd_models(State(state): State<Shared>) -> Json<Value> {
    let m = &state.model;
    Json(json!([{
        "title": m.title(),
        "model_name": m.name,
        "hash": m.hash,
        "sha256": Value::Null,
        "filename": m.path.display().to_string(),
        "config": Value::Null,
    }]))
}

async fn samplers() -> Json<Value> {
    let list: Vec<Value> = SamplerName::all()
        .map(|(name, s)| {
            json!({
                "name": s.display_name(),
                "aliases": [name],
                "options": {},
            })
        })
        .collect();
    Json(Value::Array(list))
}

async fn schedulers() -> Json<Value> {
    let list = [
        ("automatic", "Automatic", -1.0),
        ("karras", "Karras", 7.0),
        ("exponential", "Exponential", -1.0),
        ("sgm_uniform", "SGM Uniform", -1.0),
        ("simple", "Simple", -1.0),
        ("normal", "Normal", -1.0),
        ("beta", "Beta", -1.0),
    ];
    Json(Value::Array(
        list.iter()
            .map(|(name, label, rho)| {
                json!({"name": name, "label": label, "aliases": Value::Null,
                       "default_rho": rho, "need_inner_model": false})
            })
            .collect(),
    ))
}

async fn empty_list() -> Json<Value> {
    Json(json!([]))
}

async fn null() -> Json<Value> {
    Json(Value::Null)
}

async fn embeddings() -> Json<Value> {
    Json(json!({"loaded": {}, "skipped": {}}))
}

async fn scripts() -> Json<Value> {
    Json(json!({"txt2img": [], "img2img": []}))
}

async fn cmd_flags() -> Json<Value> {
    Json(json!({}))
}

/// Bytes from a `/proc` line such as `MemTotal:  16318404 kB`.
fn proc_kb(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// The LoRA files `<lora:NAME>` can name, as A1111 lists them.
async fn loras(State(state): State<Shared>) -> Json<Value> {
    let list: Vec<Value> = ldm_pipeline::extra_networks::list_loras(&state.model.lora_dirs)
        .into_iter()
        .map(|(name, alias, path)| {
            json!({"name": name, "alias": alias, "path": path.display().to_string(),
                   "metadata": {}})
        })
        .collect();
    Json(Value::Array(list))
}

/// sd-webui-controlnet's model list: the ControlNets `--controlnet-dir` holds.
async fn controlnet_models(State(state): State<Shared>) -> Json<Value> {
    let names: Vec<String> = crate::model::list_controlnets(&state.model.controlnet_dirs)
        .into_iter()
        .map(|net| net.name)
        .collect();
    Json(json!({ "model_list": names }))
}

/// Only "none": control images arrive preprocessed.
async fn controlnet_modules() -> Json<Value> {
    Json(json!({ "module_list": ["none"], "module_detail": {} }))
}

async fn controlnet_version() -> Json<Value> {
    Json(json!({ "version": 2 }))
}

async fn memory(State(state): State<Shared>) -> Json<Value> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let total = proc_kb(&meminfo, "MemTotal:").unwrap_or(0);
    let free = proc_kb(&meminfo, "MemAvailable:").unwrap_or(0);
    Json(json!({
        "ram": {"free": free, "used": total.saturating_sub(free), "total": total,
                "process_resident": proc_kb(&status, "VmRSS:")},
        "cuda": cuda_memory(&state.model.components.device),
    }))
}

/// A1111's `cuda` entry: candle keeps no allocator statistics, so a GPU is named, not measured.
fn cuda_memory(device: &candle_core::Device) -> Value {
    if device.is_cuda() {
        json!({"device": ldm_pipeline::device::describe(device),
               "error": "CUDA memory statistics are not collected"})
    } else {
        json!({"error": "no CUDA device in use"})
    }
}

/// Splits an infotext's settings line (`Steps: 20, Sampler: Euler a, …`, values with commas
/// quoted) into pairs.
pub fn parse_settings(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once(':') else {
            break;
        };
        let after = after.trim_start();
        let (value, tail) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (&q[..end], q[end + 1..].trim_start_matches(',')),
                None => (q, ""),
            }
        } else {
            match after.find(", ") {
                Some(i) => (&after[..i], &after[i + 1..]),
                None => (after, ""),
            }
        };
        out.push((key.trim().to_string(), value.trim().to_string()));
        rest = tail.trim_start();
    }
    out
}

async fn png_info(
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    #[derive(Deserialize)]
    struct Req {
        image: String,
    }
    let r: Req = read_json(F, &headers, body)?;
    let bytes =
        crate::params::decode_base64(&r.image, "image").map_err(|e| ApiError::invalid(F, e))?;
    let text =
        ldm_pipeline::image_io::png_parameters(std::io::Cursor::new(&bytes)).map_err(|e| {
            ApiError::new(
                F,
                StatusCode::BAD_REQUEST,
                format!("image is not a readable PNG: {e}"),
            )
        })?;
    let Some(text) = text else {
        return Ok(Json(json!({"info": "", "items": {}, "parameters": {}})));
    };
    let mut params = Map::new();
    let mut lines: Vec<&str> = text.lines().collect();
    let settings = if lines.last().is_some_and(|l| l.contains("Steps: ")) {
        lines.pop().unwrap_or("")
    } else {
        ""
    };
    let mut prompt = Vec::new();
    let mut negative = Vec::new();
    for l in lines {
        match l.strip_prefix("Negative prompt: ") {
            Some(n) => negative.push(n),
            None if !negative.is_empty() => negative.push(l),
            None => prompt.push(l),
        }
    }
    params.insert("Prompt".into(), json!(prompt.join("\n")));
    params.insert("Negative prompt".into(), json!(negative.join("\n")));
    for (k, v) in parse_settings(settings) {
        params.insert(k, json!(v));
    }
    Ok(Json(json!({
        "info": text,
        "items": {"parameters": text},
        "parameters": params,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_lines_split_like_a1111() {
        let p =
            parse_settings(r#"Steps: 20, Sampler: Euler a, Lora hashes: "a: 1, b: 2", Seed: 5"#);
        assert_eq!(
            p,
            vec![
                ("Steps".into(), "20".into()),
                ("Sampler".into(), "Euler a".into()),
                ("Lora hashes".into(), "a: 1, b: 2".into()),
                ("Seed".into(), "5".into()),
            ]
        );
    }

    #[test]
    fn timestamps_are_civil_dates() {
        let t = job_timestamp();
        assert_eq!(t.len(), 14);
        assert!(t.starts_with("20"));
    }
}
