//! What a client asks for, checked against the server's limits: the request body the three
//! APIs share (A1111's field names, with the job API's and OpenAI's spellings as aliases),
//! turned into validated [`GenParams`]. Unknown fields are ignored, as A1111 ignores the ~45
//! fields `webuiapi` sends.

use base64::Engine;
use image::{GrayImage, RgbImage};
use ldm_sampling::names::{SamplerName, SigmaSchedule};
use serde::Deserialize;

/// Bounds on what one request may ask for.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest width or height in pixels.
    pub max_side: usize,
    pub max_steps: usize,
    /// Most images one request may make (batch size × iterations, or OpenAI's `n`).
    pub max_images: usize,
    /// Longest prompt in characters.
    pub max_prompt_chars: usize,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_side: 2048,
            max_steps: 150,
            max_images: 16,
            max_prompt_chars: 4000,
            max_body_bytes: 32 << 20,
        }
    }
}

/// A generation request as any of the APIs sends it (every field optional).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct GenerationBody {
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    #[serde(alias = "sampler")]
    pub sampler_name: Option<String>,
    pub scheduler: Option<String>,
    pub steps: Option<i64>,
    #[serde(alias = "guidance_scale", alias = "guidance")]
    pub cfg_scale: Option<f64>,
    pub width: Option<i64>,
    pub height: Option<i64>,
    pub seed: Option<i64>,
    pub batch_size: Option<i64>,
    pub n_iter: Option<i64>,
    /// img2img: A1111 sends a list; the job API and the web page may send one image.
    pub init_images: Option<Vec<String>>,
    pub init_image: Option<String>,
    pub mask: Option<String>,
    #[serde(alias = "strength")]
    pub denoising_strength: Option<f64>,
    pub mask_blur: Option<f64>,
    pub inpainting_fill: Option<i64>,
    pub inpainting_mask_invert: Option<i64>,
    /// A preview every this many steps (the job API's events; 0: none).
    pub preview_every: Option<i64>,
    /// A1111's extension arguments; `controlnet.args` (sd-webui-controlnet's units) is read.
    pub alwayson_scripts: Option<serde_json::Value>,
}

/// One ControlNet unit of a request (sd-webui-controlnet's API).
#[derive(Debug, Clone)]
pub struct ControlUnit {
    /// The model's name as listed (`/controlnet/model_list`), without its ` [hash]`.
    pub model: String,
    pub image: RgbImage,
    pub weight: f64,
    pub start: f64,
    pub end: f64,
    /// "ControlNet is more important": diffusers' guess mode.
    pub guess: bool,
}

/// The enabled units of `alwayson_scripts.controlnet.args`.
fn control_units(
    scripts: Option<&serde_json::Value>,
    limits: &Limits,
) -> Result<Vec<ControlUnit>, Invalid> {
    // A1111 finds scripts by lower-cased title (webuiapi sends "ControlNet").
    let Some(args) = scripts
        .and_then(|s| s.as_object())
        .and_then(|m| m.iter().find(|(k, _)| k.eq_ignore_ascii_case("controlnet")))
        .and_then(|(_, c)| c.get("args"))
        .and_then(|a| a.as_array())
    else {
        return Ok(Vec::new());
    };
    let bad = |m: String| invalid("alwayson_scripts", m);
    let mut units = Vec::new();
    for (i, u) in args.iter().enumerate() {
        if !u.get("enabled").and_then(|e| e.as_bool()).unwrap_or(true) {
            continue;
        }
        let module = u.get("module").and_then(|m| m.as_str()).unwrap_or("none");
        if !matches!(module, "none" | "") {
            return Err(bad(format!(
                "ControlNet unit {i}: the preprocessor `{module}` is not available here; send the \
                 preprocessed control image with module \"none\""
            )));
        }
        let model = u
            .get("model")
            .and_then(|m| m.as_str())
            .map(|m| m.split(" [").next().unwrap_or(m).trim().to_string())
            .filter(|m| !m.is_empty() && m != "None")
            .ok_or_else(|| bad(format!("ControlNet unit {i}: no model")))?;
        let image = u
            .get("image")
            .or_else(|| u.get("input_image"))
            .and_then(|v| {
                v.as_str()
                    .or_else(|| v.get("image").and_then(|x| x.as_str()))
            })
            .ok_or_else(|| bad(format!("ControlNet unit {i}: no image")))?;
        let image = decode_image(image, "alwayson_scripts", limits)?.to_rgb8();
        let num = |k: &str, d: f64| u.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
        let guess = match u.get("control_mode") {
            None => false,
            Some(m) if m.as_i64() == Some(0) || m.as_str() == Some("Balanced") => false,
            Some(m) if m.as_i64() == Some(2) || m.as_str() == Some("ControlNet is more important") => true,
            Some(m) => {
                return Err(bad(format!(
                    "ControlNet unit {i}: control_mode {m} is not available (Balanced or ControlNet is more important)"
                )))
            }
        };
        let (weight, start, end) = (
            num("weight", 1.0),
            num("guidance_start", 0.0),
            num("guidance_end", 1.0),
        );
        if !weight.is_finite()
            || !(0.0..=1.0).contains(&start)
            || !(0.0..=1.0).contains(&end)
            || start >= end
        {
            return Err(bad(format!(
                "ControlNet unit {i}: weight {weight} must be finite and 0 ≤ guidance_start {start} < guidance_end {end} ≤ 1"
            )));
        }
        units.push(ControlUnit {
            model,
            image,
            weight,
            start,
            end,
            guess,
        });
    }
    Ok(units)
}

/// A validated generation: what the worker runs.
#[derive(Debug, Clone)]
pub struct GenParams {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub cfg_scale: f64,
    /// `None`: the model's own scheduler.
    pub sampler: Option<SamplerName>,
    pub schedule: SigmaSchedule,
    /// The first image's seed; image k has `seed + k` (A1111's `all_seeds`).
    pub seed: u64,
    pub batch_size: usize,
    pub n_iter: usize,
    pub init_image: Option<RgbImage>,
    /// White = repaint, after blur and inversion.
    pub mask: Option<GrayImage>,
    pub denoising_strength: f64,
    pub preview_every: usize,
    /// ControlNet units (A1111's `alwayson_scripts.controlnet`).
    pub control: Vec<ControlUnit>,
}

impl GenParams {
    /// Images this request makes.
    pub fn images(&self) -> usize {
        self.batch_size * self.n_iter
    }
}

/// A request the server refuses, with the field at fault.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Invalid {
    pub message: String,
    pub param: Option<&'static str>,
}

pub fn invalid(param: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        message: message.into(),
        param: Some(param),
    }
}

/// The model's defaults for fields a request leaves out.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub size: usize,
    pub steps: usize,
    pub cfg_scale: f64,
}

fn positive(
    v: Option<i64>,
    param: &'static str,
    default: usize,
    max: usize,
) -> Result<usize, Invalid> {
    match v {
        None => Ok(default),
        Some(v) if v < 1 => Err(invalid(
            param,
            format!("{param} must be at least 1, got {v}"),
        )),
        Some(v) if v as u64 > max as u64 => Err(invalid(
            param,
            format!("{param} must be at most {max}, got {v}"),
        )),
        Some(v) => Ok(v as usize),
    }
}

fn side(
    v: Option<i64>,
    param: &'static str,
    default: usize,
    limits: &Limits,
) -> Result<usize, Invalid> {
    let s = positive(v, param, default, limits.max_side)?;
    if s % 8 != 0 || s < 8 {
        return Err(invalid(
            param,
            format!("{param} must be a multiple of 8 (at least 8), got {s}"),
        ));
    }
    Ok(s)
}

/// Decodes an image sent as base64, bare or as a `data:` URL; refuses images above the size
/// limit before decoding their pixels.
pub fn decode_image(
    data: &str,
    param: &'static str,
    limits: &Limits,
) -> Result<image::DynamicImage, Invalid> {
    decode_image_bytes(&decode_base64(data, param)?, param, limits)
}

/// The bytes of base64 sent bare or as a `data:` URL.
pub fn decode_base64(data: &str, param: &'static str) -> Result<Vec<u8>, Invalid> {
    let b64 = match data.strip_prefix("data:") {
        Some(rest) => rest
            .split_once(',')
            .map(|(_, b)| b)
            .ok_or_else(|| invalid(param, format!("{param}: a data: URL without a comma")))?,
        None => data,
    };
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim().as_bytes())
        .map_err(|e| invalid(param, format!("{param} is not valid base64: {e}")))
}

/// splitmix64's output function: a well-mixed 64-bit value from any input.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// splitmix64's increment.
pub const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// Decodes image file bytes (PNG, JPEG or WebP) within the size limit.
pub fn decode_image_bytes(
    bytes: &[u8],
    param: &'static str,
    limits: &Limits,
) -> Result<image::DynamicImage, Invalid> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| invalid(param, format!("{param}: {e}")))?;
    let mut l = image::Limits::default();
    l.max_image_width = Some(4 * limits.max_side as u32);
    l.max_image_height = Some(4 * limits.max_side as u32);
    l.max_alloc = Some(512 << 20);
    reader.limits(l);
    reader
        .decode()
        .map_err(|e| invalid(param, format!("{param} is not a readable image: {e}")))
}

/// Box blur of radius `r` applied `passes` times (about a Gaussian of σ ≈ r·√(passes/3)), as
/// A1111's `mask_blur` softens the mask's edge before it is binarised.
fn blur_mask(mask: GrayImage, sigma: f64) -> GrayImage {
    if sigma < 0.5 {
        return mask;
    }
    image::imageops::blur(&mask, sigma as f32)
}

impl GenerationBody {
    /// Checks every field against the limits and fills in the model's defaults. `random_seed`
    /// is used for a missing or negative seed (A1111's `-1`).
    pub fn validate(
        &self,
        d: &Defaults,
        limits: &Limits,
        random_seed: u64,
    ) -> Result<GenParams, Invalid> {
        let prompt = self.prompt.clone().unwrap_or_default();
        for (text, param) in [
            (Some(&prompt), "prompt"),
            (self.negative_prompt.as_ref(), "negative_prompt"),
        ] {
            if let Some(t) = text {
                if t.chars().count() > limits.max_prompt_chars {
                    return Err(invalid(
                        param,
                        format!(
                            "{param} is longer than {} characters",
                            limits.max_prompt_chars
                        ),
                    ));
                }
            }
        }
        let width = side(self.width, "width", d.size, limits)?;
        let height = side(self.height, "height", d.size, limits)?;
        let steps = positive(self.steps, "steps", d.steps, limits.max_steps)?;
        let cfg_scale = self.cfg_scale.unwrap_or(d.cfg_scale);
        if !cfg_scale.is_finite() || !(0.0..=100.0).contains(&cfg_scale) {
            return Err(invalid("cfg_scale", "cfg_scale must be between 0 and 100"));
        }
        let batch_size = positive(self.batch_size, "batch_size", 1, limits.max_images)?;
        let n_iter = positive(self.n_iter, "n_iter", 1, limits.max_images)?;
        if batch_size * n_iter > limits.max_images {
            return Err(invalid(
                "batch_size",
                format!(
                    "batch_size × n_iter = {} images; at most {} a request",
                    batch_size * n_iter,
                    limits.max_images
                ),
            ));
        }
        let (sampler, implied) = match self.sampler_name.as_deref().map(str::trim) {
            None | Some("") => (None, None),
            Some(name) => {
                let (s, sched) =
                    SamplerName::parse(name).map_err(|e| invalid("sampler_name", e.to_string()))?;
                (Some(s), sched)
            }
        };
        let schedule = match (self.scheduler.as_deref().map(str::trim), implied) {
            (Some(s), implied) if !s.is_empty() => {
                let parsed =
                    SigmaSchedule::parse(s).map_err(|e| invalid("scheduler", e.to_string()))?;
                match (parsed, implied) {
                    // "DPM++ 2M Karras" with scheduler "automatic": the name's schedule wins.
                    (SigmaSchedule::Default, Some(i)) => i,
                    (p, _) => p,
                }
            }
            (_, Some(i)) => i,
            _ => SigmaSchedule::Default,
        };
        if matches!(schedule, SigmaSchedule::Custom(_)) {
            return Err(invalid(
                "scheduler",
                "custom sigmas are not accepted over HTTP",
            ));
        }
        let seed = match self.seed {
            Some(s) if s >= 0 => s as u64,
            _ => random_seed,
        };
        let init = self
            .init_images
            .as_ref()
            .and_then(|v| v.first())
            .or(self.init_image.as_ref());
        let init_image = match init {
            Some(data) => Some(decode_image(data, "init_images", limits)?.to_rgb8()),
            None => None,
        };
        let mask = match (&self.mask, &init_image) {
            (Some(_), None) => return Err(invalid("mask", "a mask needs an init image")),
            (Some(m), Some(_)) if !m.is_empty() => Some(mask_from(
                decode_image(m, "mask", limits)?,
                self.inpainting_mask_invert.unwrap_or(0) != 0,
                self.mask_blur.unwrap_or(4.0),
            )),
            _ => None,
        };
        let denoising_strength = self.denoising_strength.unwrap_or(0.75);
        if !(0.0..=1.0).contains(&denoising_strength) {
            return Err(invalid(
                "denoising_strength",
                "denoising_strength must be between 0 and 1",
            ));
        }
        let init_image = match (init_image, &mask, self.inpainting_fill.unwrap_or(1)) {
            (Some(img), Some(m), fill) => Some(fill_masked(img, m, fill, seed)?),
            (img, _, _) => img,
        };
        let preview_every = match self.preview_every {
            Some(n) if n < 0 => {
                return Err(invalid("preview_every", "preview_every must be 0 or more"))
            }
            Some(n) => n as usize,
            None => 1,
        };
        Ok(GenParams {
            prompt,
            negative_prompt: self.negative_prompt.clone().filter(|n| !n.is_empty()),
            width,
            height,
            steps,
            cfg_scale,
            sampler,
            schedule,
            seed,
            batch_size,
            n_iter,
            init_image,
            mask,
            denoising_strength,
            preview_every,
            control: control_units(self.alwayson_scripts.as_ref(), limits)?,
        })
    }
}

/// A mask image as white = repaint: from its alpha where it has transparency (transparent =
/// repaint, OpenAI's convention), else from its brightness; inverted and blurred on request.
pub fn mask_from(img: image::DynamicImage, invert: bool, blur: f64) -> GrayImage {
    let mut mask = if img.color().has_alpha() && img.to_rgba8().pixels().any(|p| p.0[3] < 255) {
        let rgba = img.to_rgba8();
        GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
            image::Luma([255 - rgba.get_pixel(x, y).0[3]])
        })
    } else {
        img.to_luma8()
    };
    if invert {
        image::imageops::invert(&mut mask);
    }
    blur_mask(mask, blur)
}

/// A1111's `inpainting_fill` done on the pixels before encoding: 0 "fill" paints the masked
/// part with the mean colour of the rest, 1 "original" keeps it, 2 "latent noise" fills it
/// with seeded noise, 3 "latent nothing" with mid-grey (zero in [-1, 1]).
fn fill_masked(
    mut img: RgbImage,
    mask: &GrayImage,
    fill: i64,
    seed: u64,
) -> Result<RgbImage, Invalid> {
    if !(0..=3).contains(&fill) {
        return Err(invalid(
            "inpainting_fill",
            "inpainting_fill must be 0, 1, 2 or 3",
        ));
    }
    if fill == 1 {
        return Ok(img);
    }
    let mask = image::imageops::resize(
        mask,
        img.width(),
        img.height(),
        image::imageops::FilterType::Triangle,
    );
    let masked = |x: u32, y: u32| mask.get_pixel(x, y).0[0] >= 128;
    let mut sum = [0u64; 3];
    let mut n = 0u64;
    for (x, y, p) in img.enumerate_pixels() {
        if !masked(x, y) {
            for (acc, v) in sum.iter_mut().zip(p.0) {
                *acc += v as u64;
            }
            n += 1;
        }
    }
    let mean = sum.map(|s| s.checked_div(n).map_or(127, |m| m as u8));
    let mut state = seed ^ GOLDEN_GAMMA;
    let mut next = || {
        // splitmix64
        state = state.wrapping_add(GOLDEN_GAMMA);
        (mix64(state) >> 56) as u8
    };
    let (w, h) = img.dimensions();
    for y in 0..h {
        for x in 0..w {
            if masked(x, y) {
                let v = match fill {
                    0 => mean,
                    2 => [next(), next(), next()],
                    _ => [127, 127, 127],
                };
                img.put_pixel(x, y, image::Rgb(v));
            }
        }
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Defaults {
        Defaults {
            size: 64,
            steps: 20,
            cfg_scale: 7.5,
        }
    }

    fn body(json: &str) -> GenerationBody {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn fills_defaults_and_ignores_unknown_fields() {
        let p =
            body(r#"{"prompt": "a red circle", "styles": [], "send_images": true, "seed": -1}"#)
                .validate(&defaults(), &Limits::default(), 42)
                .unwrap();
        assert_eq!((p.width, p.height, p.steps, p.seed), (64, 64, 20, 42));
        assert_eq!(p.cfg_scale, 7.5);
        assert!(p.sampler.is_none());
    }

    #[test]
    fn a1111_sampler_names_split_into_sampler_and_schedule() {
        let p = body(r#"{"sampler_name": "DPM++ 2M Karras", "scheduler": "automatic"}"#)
            .validate(&defaults(), &Limits::default(), 0)
            .unwrap();
        assert_eq!(p.sampler, Some(SamplerName::DpmPp2M));
        assert_eq!(p.schedule, SigmaSchedule::Karras);
        let p = body(r#"{"sampler_name": "Euler a", "scheduler": "Karras"}"#)
            .validate(&defaults(), &Limits::default(), 0)
            .unwrap();
        assert_eq!(
            (p.sampler, p.schedule),
            (Some(SamplerName::EulerA), SigmaSchedule::Karras)
        );
    }

    #[test]
    fn refuses_what_is_out_of_bounds() {
        let l = Limits::default();
        for (json, param) in [
            (r#"{"width": 100000}"#, "width"),
            (r#"{"width": 60}"#, "width"),
            (r#"{"steps": 0}"#, "steps"),
            (r#"{"steps": 100000}"#, "steps"),
            (r#"{"batch_size": 8, "n_iter": 8}"#, "batch_size"),
            (r#"{"sampler_name": "nope"}"#, "sampler_name"),
            (r#"{"cfg_scale": 1e9}"#, "cfg_scale"),
            (r#"{"init_images": ["not base64!"]}"#, "init_images"),
            (r#"{"init_images": ["aGVsbG8="]}"#, "init_images"),
            (r#"{"mask": "aGVsbG8="}"#, "mask"),
        ] {
            let e = body(json).validate(&defaults(), &l, 0).unwrap_err();
            assert_eq!(e.param, Some(param), "{json}: {e}");
        }
        let long = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(5000));
        assert!(body(&long).validate(&defaults(), &l, 0).is_err());
    }

    #[test]
    fn masks_from_alpha_or_brightness() {
        let mut rgba = image::RgbaImage::from_pixel(4, 4, image::Rgba([0, 0, 0, 255]));
        rgba.put_pixel(1, 1, image::Rgba([0, 0, 0, 0]));
        let m = mask_from(image::DynamicImage::ImageRgba8(rgba), false, 0.0);
        assert_eq!(m.get_pixel(1, 1).0[0], 255);
        assert_eq!(m.get_pixel(0, 0).0[0], 0);
        let gray =
            image::GrayImage::from_fn(4, 4, |x, _| image::Luma([if x < 2 { 255 } else { 0 }]));
        let m = mask_from(image::DynamicImage::ImageLuma8(gray), true, 0.0);
        assert_eq!((m.get_pixel(0, 0).0[0], m.get_pixel(3, 0).0[0]), (0, 255));
    }

    #[test]
    fn fill_modes_change_only_the_masked_part() {
        let img = RgbImage::from_fn(8, 8, |x, _| {
            image::Rgb([if x < 4 { 200 } else { 10 }, 50, 50])
        });
        let mask = GrayImage::from_fn(8, 8, |x, _| image::Luma([if x >= 4 { 255 } else { 0 }]));
        let filled = fill_masked(img.clone(), &mask, 0, 1).unwrap();
        assert_eq!(filled.get_pixel(6, 3).0, [200, 50, 50]);
        assert_eq!(filled.get_pixel(1, 3).0, [200, 50, 50]);
        let nothing = fill_masked(img.clone(), &mask, 3, 1).unwrap();
        assert_eq!(nothing.get_pixel(6, 3).0, [127, 127, 127]);
        assert_eq!(fill_masked(img.clone(), &mask, 1, 1).unwrap(), img);
        assert!(fill_masked(img, &mask, 7, 1).is_err());
    }
}
