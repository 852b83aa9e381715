//! A1111's `/sdapi/v1` on the embedded model: what `webuiapi` and Open WebUI read.

mod common;

use candle_core::{DType, Device};
use common::*;
use ldm_server::ServerConfig;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txt2img_matches_the_library_and_reports_like_a1111() {
    let s = start(config()).await;
    let body = json!({
        "prompt": "a red circle on a blue background", "negative_prompt": "",
        "seed": 7, "steps": 12, "cfg_scale": 7.5, "width": 64, "height": 64,
        "batch_size": 2, "n_iter": 1, "sampler_name": "Euler", "scheduler": "automatic",
        // Fields webuiapi sends that mean nothing here are ignored.
        "styles": [], "send_images": true, "save_images": false, "alwayson_scripts": {},
        "restore_faces": false, "tiling": false, "subseed": -1, "enable_hr": false,
    });
    let (status, r) = s.post("/sdapi/v1/txt2img", body).await;
    assert_eq!(status, 200, "{r}");
    let images = r["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["seed"], 7);
    assert_eq!(info["all_seeds"], json!([7, 8]));
    assert_eq!(info["width"], 64);
    assert_eq!(info["sampler_name"], "Euler");
    assert_eq!(info["steps"], 12);
    assert_eq!(info["infotexts"].as_array().unwrap().len(), 2);
    assert_eq!(
        r["parameters"]["prompt"],
        "a red circle on a blue background"
    );

    // The same picture as the library makes for seed 8, and the infotext in the PNG.
    let c = ldm_pipeline::Components::load(&root().join("models/shapes"), DType::F32, &Device::Cpu)
        .unwrap();
    let req = ldm_pipeline::Request {
        prompt: "a red circle on a blue background".into(),
        width: 64,
        height: 64,
        steps: 12,
        guidance_scale: 7.5,
        guidance_rescale: c.default_guidance_rescale(),
        sampler: Some(ldm_sampling::names::SamplerName::Euler),
        seed: 8,
        ..Default::default()
    };
    let lib = ldm_pipeline::generate(&c, &req, &mut ldm_sampling::NoHook).unwrap();
    assert_eq!(decode(images[1].as_str().unwrap()), lib.images[0]);
    let png = png_bytes(images[1].as_str().unwrap());
    let text = ldm_pipeline::image_io::png_parameters(std::io::Cursor::new(png))
        .unwrap()
        .unwrap();
    assert!(
        text.starts_with("a red circle on a blue background\nSteps: 12, Sampler: Euler"),
        "{text}"
    );
    assert!(text.contains("Seed: 8"), "{text}");

    // png-info reads it back.
    let (status, info) = s
        .post("/sdapi/v1/png-info", json!({"image": images[1]}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(info["parameters"]["Seed"], "8");
    assert_eq!(
        info["parameters"]["Prompt"],
        "a red circle on a blue background"
    );
    assert_eq!(info["info"], text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn img2img_and_inpainting_take_data_urls_and_masks() {
    let s = start(config()).await;
    let (_, r) = s
        .post(
            "/sdapi/v1/txt2img",
            json!({"prompt": "a green square on a white background", "seed": 1, "steps": 8}),
        )
        .await;
    let init = decode(r["images"][0].as_str().unwrap());
    let init_url = data_url(&image::DynamicImage::ImageRgb8(init.clone()));
    // img2img at a low strength stays close to the init image.
    let (status, r) = s
        .post(
            "/sdapi/v1/img2img",
            json!({"prompt": "a green square on a white background", "init_images": [init_url],
                   "denoising_strength": 0.3, "seed": 2, "steps": 10}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    let out = decode(r["images"][0].as_str().unwrap());
    let diff = |a: &image::RgbImage, b: &image::RgbImage, keep: &dyn Fn(u32, u32) -> bool| {
        let mut sum = 0f64;
        let mut n = 0f64;
        for (x, y, p) in a.enumerate_pixels() {
            if keep(x, y) {
                let q = b.get_pixel(x, y);
                sum += (0..3)
                    .map(|c| (p.0[c] as f64 - q.0[c] as f64).abs())
                    .sum::<f64>()
                    / 3.0;
                n += 1.0;
            }
        }
        sum / n
    };
    assert!(diff(&out, &init, &|_, _| true) < 40.0);
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["denoising_strength"], 0.3);

    // Inpainting the left half (white = repaint) at full strength keeps the right half; the
    // inverted mask repaints the right half instead.
    let mask =
        image::GrayImage::from_fn(64, 64, |x, _| image::Luma([if x < 32 { 255 } else { 0 }]));
    let mask_url = data_url(&image::DynamicImage::ImageLuma8(mask));
    for invert in [0, 1] {
        let (status, r) = s
            .post(
                "/sdapi/v1/img2img",
                json!({"prompt": "a red circle on a blue background", "init_images": [init_url.clone()],
                       "mask": mask_url, "denoising_strength": 1.0, "mask_blur": 0,
                       "inpainting_mask_invert": invert, "inpainting_fill": 1, "seed": 3, "steps": 10}),
            )
            .await;
        assert_eq!(status, 200, "{r}");
        let out = decode(r["images"][0].as_str().unwrap());
        let kept: &dyn Fn(u32, u32) -> bool = if invert == 0 {
            &|x, _| x >= 40
        } else {
            &|x, _| x < 24
        };
        let changed: &dyn Fn(u32, u32) -> bool = if invert == 0 {
            &|x, _| x < 24
        } else {
            &|x, _| x >= 40
        };
        let (k, c) = (diff(&out, &init, kept), diff(&out, &init, changed));
        assert!(
            k < 12.0 && c > k + 10.0,
            "invert {invert}: kept part differs by {k:.1}, repainted by {c:.1}"
        );
    }
    // img2img without an init image is refused.
    let (status, r) = s.post("/sdapi/v1/img2img", json!({"prompt": "x"})).await;
    assert_eq!(status, 422);
    assert!(r["detail"].as_str().unwrap().contains("init_images"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_interrupt_and_skip() {
    let s = start(config()).await;
    // Idle: exactly what webuiapi's util_wait_for_ready waits for.
    let (_, p) = s.get("/sdapi/v1/progress").await;
    assert_eq!(p["progress"], 0.0);
    assert_eq!(p["state"]["job_count"], 0);

    // A running txt2img (in a task of its own) shows progress and a preview; interrupt returns
    // the image as far as it got.
    let s2 = Server {
        url: s.url.clone(),
        state: s.state.clone(),
        client: s.client.clone(),
    };
    let running = tokio::spawn(async move {
        s2.post("/sdapi/v1/txt2img", long_job("a blue triangle"))
            .await
    });
    let mut seen = Value::Null;
    for _ in 0..500 {
        let (_, p) = s.get("/sdapi/v1/progress").await;
        if p["state"]["sampling_step"].as_u64().unwrap_or(0) >= 2 && !p["current_image"].is_null() {
            seen = p;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(seen["progress"].as_f64().unwrap() > 0.0, "{seen}");
    assert_eq!(seen["state"]["sampling_steps"], 150);
    assert_eq!(seen["state"]["job_count"], 1);
    assert!(seen["eta_relative"].as_f64().unwrap() > 0.0);
    decode(seen["current_image"].as_str().unwrap());
    let (status, v) = s.post("/sdapi/v1/interrupt", json!({})).await;
    assert_eq!((status, v), (200, Value::Null));
    let (status, r) = running.await.unwrap();
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["images"].as_array().unwrap().len(), 1);
    assert_eq!(
        decode(r["images"][0].as_str().unwrap()).dimensions(),
        (128, 128)
    );

    // Skip ends the current image and goes on with the next.
    let s3 = Server {
        url: s.url.clone(),
        state: s.state.clone(),
        client: s.client.clone(),
    };
    let mut body = long_job("a yellow circle");
    body["steps"] = json!(40);
    body["batch_size"] = json!(2);
    let running = tokio::spawn(async move { s3.post("/sdapi/v1/txt2img", body).await });
    for _ in 0..500 {
        let (_, p) = s.get("/sdapi/v1/progress").await;
        if p["state"]["sampling_step"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    s.post("/sdapi/v1/skip", json!({})).await;
    let (status, r) = running.await.unwrap();
    assert_eq!(status, 200, "{r}");
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    assert_eq!(r["images"].as_array().unwrap().len(), 2);
    assert_eq!(info["all_seeds"], json!([3, 4]));
    let (_, p) = s.get("/sdapi/v1/progress").await;
    assert_eq!(
        (p["progress"].as_f64(), p["state"]["job_count"].as_u64()),
        (Some(0.0), Some(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_models_and_lists() {
    let s = start(config()).await;
    let (status, models) = s.get("/sdapi/v1/sd-models").await;
    assert_eq!(status, 200);
    let title = models[0]["title"].as_str().unwrap().to_string();
    assert!(title.starts_with("shapes ["), "{title}");
    assert_eq!(models[0]["model_name"], "shapes");
    let (_, mut options) = s.get("/sdapi/v1/options").await;
    assert_eq!(options["sd_model_checkpoint"], title.as_str());
    // Open WebUI posts the whole dictionary back with its change.
    options["CLIP_stop_at_last_layers"] = json!(2);
    let (status, v) = s.post("/sdapi/v1/options", options).await;
    assert_eq!((status, v), (200, Value::Null));
    let (_, options) = s.get("/sdapi/v1/options").await;
    assert_eq!(options["CLIP_stop_at_last_layers"], 2);
    let (status, v) = s
        .post("/sdapi/v1/options", json!({"sd_model_checkpoint": title}))
        .await;
    assert_eq!((status, v), (200, Value::Null));
    let (status, e) = s
        .post(
            "/sdapi/v1/options",
            json!({"sd_model_checkpoint": "sdxl [0123456789]"}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(e["detail"].as_str().unwrap().contains("not found"), "{e}");
    assert!(e.get("error").is_some() && e.get("body").is_some() && e.get("errors").is_some());

    let (_, samplers) = s.get("/sdapi/v1/samplers").await;
    let names: Vec<&str> = samplers
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    for n in [
        "Euler a",
        "Euler",
        "DPM++ 2M",
        "DPM++ 2M SDE",
        "DDIM",
        "UniPC",
        "LCM",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    let (_, schedulers) = s.get("/sdapi/v1/schedulers").await;
    assert_eq!(schedulers[0]["name"], "automatic");
    assert_eq!(schedulers[1]["default_rho"], 7.0);
    assert_eq!(s.get("/sdapi/v1/upscalers").await, (200, json!([])));
    assert_eq!(
        s.get("/sdapi/v1/scripts").await,
        (200, json!({"txt2img": [], "img2img": []}))
    );
    let (status, mem) = s.get("/sdapi/v1/memory").await;
    assert_eq!(status, 200);
    assert!(mem["ram"]["total"].as_u64().unwrap() > 0);
    assert_eq!(
        s.post("/sdapi/v1/refresh-checkpoints", json!({})).await,
        (200, Value::Null)
    );
    for empty in [
        "sd-vae",
        "loras",
        "hypernetworks",
        "face-restorers",
        "prompt-styles",
    ] {
        assert_eq!(
            s.get(&format!("/sdapi/v1/{empty}")).await,
            (200, json!([])),
            "{empty}"
        );
    }
    assert_eq!(
        s.get("/sdapi/v1/embeddings").await,
        (200, json!({"loaded": {}, "skipped": {}}))
    );
    assert_eq!(s.get("/sdapi/v1/cmd-flags").await, (200, json!({})));
    let r = s.client.get(s.at("/favicon.ico")).send().await.unwrap();
    assert_eq!(r.status(), 204);

    // Every sampler the list names generates (a few steps each), "X Karras" names included.
    for name in names
        .iter()
        .chain(["DPM++ 2M Karras", "Euler a Exponential"].iter())
    {
        let (status, r) = s
            .post(
                "/sdapi/v1/txt2img",
                json!({"prompt": "a red circle", "sampler_name": name, "steps": 4, "seed": 1}),
            )
            .await;
        assert_eq!(status, 200, "{name}: {r}");
    }
    let (status, e) = s
        .post("/sdapi/v1/txt2img", json!({"sampler_name": "Euler z"}))
        .await;
    assert_eq!(status, 400);
    assert!(
        e["detail"].as_str().unwrap().contains("unknown sampler"),
        "{e}"
    );
}

/// `<lora:NAME:W>` in an A1111 prompt: the file is found in `--lora-dir`, merged for that
/// request, and the picture is diffusers' with the LoRA loaded (`fixtures/lora`); a request
/// without the tag gets the untouched base model's picture, exactly; `/sdapi/v1/loras` lists
/// the files, and the PNG records the hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_loras_are_merged_per_request_and_the_base_restored() {
    let f = root().join("fixtures");
    let s = start(ServerConfig {
        lora_dirs: vec![f.join("lora")],
        port: 0,
        ..ServerConfig::new(f.join("tiny/sd15"))
    })
    .await;
    let (status, list) = s.get("/sdapi/v1/loras").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"sd15_peft") && names.contains(&"sd15_kohya"),
        "{names:?}"
    );
    let body = |prompt: &str| {
        json!({"prompt": prompt, "seed": 1, "steps": 8, "cfg_scale": 7.5,
               "width": 32, "height": 32})
    };
    let expect = |name: &str| {
        image::open(f.join("lora").join(format!("{name}.png")))
            .unwrap()
            .to_rgb8()
    };
    for (prompt, picture) in [
        ("a red circle <lora:sd15_peft:1>", "sd15_peft"),
        ("a red circle", "sd15_base"),
        ("a red circle <lora:sd15_kohya>", "sd15_kohya"),
        ("a red circle <lora:sd15_peft:1>", "sd15_peft"),
    ] {
        let (status, r) = s.post("/sdapi/v1/txt2img", body(prompt)).await;
        assert_eq!(status, 200, "{prompt}: {r}");
        let ours = decode(r["images"][0].as_str().unwrap());
        let d = mean_level_diff(&ours, &expect(picture));
        assert!(d <= 1.0, "{prompt}: mean |Δ| {d} from {picture}");
        let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
        let text = info["infotexts"][0].as_str().unwrap();
        assert!(text.starts_with(prompt), "{text}");
        assert_eq!(
            text.contains("Lora hashes: \""),
            prompt.contains("<lora:"),
            "{text}"
        );
    }
    let (status, r) = s
        .post(
            "/sdapi/v1/txt2img",
            body("a red circle <lora:nothing_here:1>"),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    assert!(
        info["infotexts"][0]
            .as_str()
            .unwrap()
            .contains("Lora not found: \"nothing_here\""),
        "{info}"
    );
}

/// sd-webui-controlnet's API: `alwayson_scripts.controlnet.args` units name a ControlNet in
/// `--controlnet-dir` and send a preprocessed image; the picture is diffusers' ControlNet
/// pipeline's (`fixtures/controlnet`), "ControlNet is more important" is its guess mode, a
/// request without units gets the plain model's picture, and preprocessors are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controlnet_units_from_a1111_clients() {
    let f = root().join("fixtures");
    let s = start(ServerConfig {
        controlnet_dirs: vec![f.join("controlnet")],
        port: 0,
        ..ServerConfig::new(f.join("tiny/sd15"))
    })
    .await;
    let (status, list) = s.get("/controlnet/model_list").await;
    assert_eq!(status, 200);
    let names = list["model_list"].as_array().unwrap();
    assert!(names.contains(&json!("sd15_a")) && names.contains(&json!("sd15_a_original")));
    let circle =
        data_url(&image::open(f.join("pipelines/inputs/gradient_circle_32x32.png")).unwrap());
    let body = |units: Value| {
        json!({"prompt": "a red circle", "seed": 1, "steps": 8, "cfg_scale": 7.5,
               "width": 32, "height": 32, "alwayson_scripts": {"controlnet": {"args": units}}})
    };
    let unit = |model: &str, mode: i64| {
        json!({"enabled": true, "module": "none", "model": format!("{model} [0123abcd]"),
               "image": circle, "weight": 1.0, "guidance_start": 0.0, "guidance_end": 1.0,
               "control_mode": mode, "resize_mode": "Crop and Resize", "pixel_perfect": false})
    };
    for (units, picture) in [
        (json!([unit("sd15_a", 0)]), "sd15_single"),
        (json!([]), "sd15_base"),
        (json!([unit("sd15_a_original", 0)]), "sd15_single"),
        (json!([unit("sd15_a", 2)]), "sd15_guess"),
    ] {
        let (status, r) = s.post("/sdapi/v1/txt2img", body(units.clone())).await;
        assert_eq!(status, 200, "{units}: {r}");
        let ours = decode(r["images"][0].as_str().unwrap());
        let theirs = image::open(f.join(format!("controlnet/{picture}.png")))
            .unwrap()
            .to_rgb8();
        let d = mean_level_diff(&ours, &theirs);
        assert!(d <= 1.0, "{picture}: mean |Δ| {d}");
    }
    let mut canny = unit("sd15_a", 0);
    canny["module"] = json!("canny");
    let (status, r) = s.post("/sdapi/v1/txt2img", body(json!([canny]))).await;
    assert_eq!(status, 400, "{r}");
    assert!(r.to_string().contains("preprocessor"), "{r}");
    let (status, r) = s
        .post("/sdapi/v1/txt2img", body(json!([unit("no_such_net", 0)])))
        .await;
    assert_eq!(status, 400, "{r}");
    assert!(r.to_string().contains("no ControlNet `no_such_net`"), "{r}");
}

/// T2I-Adapters among the ControlNet models, as sd-webui-controlnet lists them: a unit naming
/// one gives diffusers' adapter picture (`fixtures/t2i_adapter`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t2i_adapters_as_controlnet_units() {
    let f = root().join("fixtures");
    let s = start(ServerConfig {
        controlnet_dirs: vec![f.join("t2i_adapter")],
        port: 0,
        ..ServerConfig::new(f.join("tiny/sd15"))
    })
    .await;
    let circle =
        data_url(&image::open(f.join("pipelines/inputs/gradient_circle_32x32.png")).unwrap());
    for (weight, picture) in [(1.0, "sd15_full"), (0.6, "sd15_full_half")] {
        let body = json!({"prompt": "a red circle", "seed": 1, "steps": 8, "cfg_scale": 7.5,
            "width": 32, "height": 32, "alwayson_scripts": {"ControlNet": {"args": [
                {"module": "none", "model": "sd15_full", "image": circle, "weight": weight}]}}});
        let (status, r) = s.post("/sdapi/v1/txt2img", body).await;
        assert_eq!(status, 200, "{r}");
        let ours = decode(r["images"][0].as_str().unwrap());
        let theirs = image::open(f.join(format!("t2i_adapter/{picture}.png")))
            .unwrap()
            .to_rgb8();
        let d = mean_level_diff(&ours, &theirs);
        assert!(d <= 1.0, "{picture}: mean |Δ| {d}");
    }
}
