//! OpenAI's images API under `/v1`, as the `openai` package calls it.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_answer_like_openai() {
    let s = start(config()).await;
    let (status, r) = s
        .post(
            "/v1/images/generations",
            json!({"model": "shapes", "prompt": "a red circle on a blue background", "n": 2,
                   "size": "64x64", "response_format": "b64_json", "seed": 5, "steps": 6,
                   "quality": "standard", "user": "someone"}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert!(r["created"].as_u64().unwrap() > 1_700_000_000);
    let data = r["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(
        decode(data[0]["b64_json"].as_str().unwrap()).dimensions(),
        (64, 64)
    );
    assert_ne!(data[0]["b64_json"], data[1]["b64_json"]);
    // The same seed gives the same picture; `url` answers are data: URLs.
    let (_, again) = s
        .post(
            "/v1/images/generations",
            json!({"prompt": "a red circle on a blue background", "size": "64x64", "seed": 5,
                   "steps": 6, "response_format": "url"}),
        )
        .await;
    let url = again["data"][0]["url"].as_str().unwrap();
    assert_eq!(
        url.strip_prefix("data:image/png;base64,").unwrap(),
        data[0]["b64_json"].as_str().unwrap()
    );

    let (status, models) = s.get("/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "shapes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_have_openai_shape() {
    let s = start(config()).await;
    for (body, param) in [
        (json!({"n": 1}), "prompt"),
        (json!({"prompt": "x", "size": "big"}), "size"),
        (json!({"prompt": "x", "size": "100000x64"}), "width"),
        (json!({"prompt": "x", "n": 500}), "batch_size"),
        (
            json!({"prompt": "x", "response_format": "gif"}),
            "response_format",
        ),
    ] {
        let r = s
            .client
            .post(s.at("/v1/images/generations"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        assert_eq!(r.headers()["x-should-retry"], "false");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
        assert_eq!(e["error"]["param"], param, "{e}");
        assert!(e["error"]["message"].as_str().unwrap().len() > 5);
        assert!(e["error"].get("code").is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_take_multipart_images_and_masks() {
    let s = start(config()).await;
    let init = image::RgbImage::from_fn(64, 64, |x, _| {
        image::Rgb(if x < 32 {
            [250, 250, 250]
        } else {
            [20, 160, 20]
        })
    });
    let png = encode_png(&image::DynamicImage::ImageRgb8(init.clone()));
    // OpenAI's mask: transparent where the image is to be edited (the left half).
    let mask = image::RgbaImage::from_fn(64, 64, |x, _| {
        image::Rgba([0, 0, 0, if x < 32 { 0 } else { 255 }])
    });
    let mask_png = encode_png(&image::DynamicImage::ImageRgba8(mask));
    for field in ["image", "image[]"] {
        let form = reqwest::multipart::Form::new()
            .part(
                field,
                reqwest::multipart::Part::bytes(png.clone())
                    .file_name("in.png")
                    .mime_str("image/png")
                    .unwrap(),
            )
            .part(
                "mask",
                reqwest::multipart::Part::bytes(mask_png.clone())
                    .file_name("mask.png")
                    .mime_str("image/png")
                    .unwrap(),
            )
            .text("prompt", "a red circle on a blue background")
            .text("n", "1")
            .text("size", "64x64")
            .text("seed", "4")
            .text("steps", "8")
            .text("model", "shapes");
        let r = s
            .client
            .post(s.at("/v1/images/edits"))
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        let out = decode(v["data"][0]["b64_json"].as_str().unwrap());
        // The right half is kept.
        let kept = out.get_pixel(56, 30).0;
        assert!(
            (kept[1] as i32 - 160).abs() < 30 && kept[0] < 60,
            "{kept:?}"
        );
    }
    // No image: an OpenAI-shaped error; a truncated multipart body: an error, not a hang.
    let form = reqwest::multipart::Form::new().text("prompt", "x");
    let r = s
        .client
        .post(s.at("/v1/images/edits"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "image");
    let truncated = "--XYZ\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nhello\r\n--XYZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n\u{89}PNG";
    let r = s
        .client
        .post(s.at("/v1/images/edits"))
        .header("content-type", "multipart/form-data; boundary=XYZ")
        .body(truncated)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert!(e["error"]["message"].as_str().is_some(), "{e}");
}
