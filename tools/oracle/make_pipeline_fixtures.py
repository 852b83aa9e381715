#!/usr/bin/env python3
"""End-to-end pipeline oracle fixtures for the Rust `ldm` pipelines.

Usage (from the repository root, with tools/oracle/requirements.txt installed, after
tools/oracle/make_fixtures.py has written fixtures/tiny/):

    python tools/oracle/make_pipeline_fixtures.py fixtures
        Reads the tiny pipeline folders fixtures/tiny/{sd15,sd21,sdxl,sd15_inpaint}/
        and writes (the folder is replaced, except README.md, which is hand-written, and the
        refiner cases written by make_refiner_fixtures.py, listed in refiner_cases.json):
          fixtures/pipelines/inputs/*.png            synthetic init images / masks
          fixtures/pipelines/cases.json              one entry per case (call arguments)
          fixtures/pipelines/<case>.png              pipe(...).images[0].save(...)
          fixtures/pipelines/<case>.latents.safetensors
              latents: the final (scaled) latents before VAE decode, from the same call
                       with output_type="latent"
              image:   float32 [H, W, 3] in [0, 1], same call with output_type="np"

    python tools/oracle/make_pipeline_fixtures.py --check fixtures
        Regenerates everything into a temporary folder and compares it byte for byte
        with fixtures/pipelines/ (determinism check; writes nothing).

diffusers 0.42.1 is the oracle: every case is a plain diffusers pipeline call, CPU,
float32 (the F16/BF16 tiny folders are loaded with dtype=float32), one thread,
`generator=torch.Generator("cpu").manual_seed(seed)` and
`pipe.scheduler = <Class>.from_config(<the folder's scheduler config>, **overrides)`.
Img2img / inpaint pipelines are built from the loaded text-to-image pipeline's
components (`StableDiffusionImg2ImgPipeline(**pipe.components, ...)`).  Runtime: well
under a minute.  See fixtures/pipelines/README.md for the format and the
pre/post-processing rules the pipelines follow.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)

diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

PROMPT = "a red circle on a blue background"
PROMPT_2 = "a green circle on a blue background"
NEGATIVE = "blurry, low quality, green"

# =============================================================================
# Synthetic inputs
# =============================================================================

INPUTS = {
    "inputs/gradient_circle_32x32.png": ("gradient", 32, 32),
    "inputs/gradient_circle_48x32.png": ("gradient", 48, 32),  # width 48, height 32
    "inputs/mask_rect_32x32.png": ("mask", 32, 32),
}
MASK_RECT = (10, 6, 25, 21)  # x0, y0, x1, y1 (half-open): 255 inside (= repaint), 0 outside


def make_input(kind: str, width: int, height: int) -> PIL.Image.Image:
    yy, xx = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    if kind == "mask":
        x0, y0, x1, y1 = MASK_RECT
        m = ((xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)).astype(np.uint8) * 255
        return PIL.Image.fromarray(m, mode="L")
    u, v = xx / (width - 1), yy / (height - 1)
    rgb = np.stack([40 + 200 * u, 30 + 150 * v, 220 - 160 * u * v], axis=-1)
    cx, cy, r = width * 0.55, height * 0.45, min(width, height) * 0.3
    inside = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r
    rgb[inside] = (235, 60, 40)
    return PIL.Image.fromarray(np.round(rgb).astype(np.uint8), mode="RGB")


# =============================================================================
# Cases
# =============================================================================

SD_T2I = "StableDiffusionPipeline"
SD_I2I = "StableDiffusionImg2ImgPipeline"
SD_INP = "StableDiffusionInpaintPipeline"
XL_T2I = "StableDiffusionXLPipeline"
XL_I2I = "StableDiffusionXLImg2ImgPipeline"


def case(name, model, pipeline, scheduler, steps, guidance_scale, *, prompt=PROMPT, negative_prompt=None,
         overrides=None, guidance_rescale=None, seed=0, width=32, height=32, init_image=None, strength=None,
         mask_image=None, eta=None, extra=None, notes=""):
    return {
        "name": name,
        "model": model,
        "pipeline": pipeline,
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "scheduler": scheduler,
        "scheduler_overrides": dict(overrides or {}),
        "steps": steps,
        "guidance_scale": guidance_scale,
        "guidance_rescale": guidance_rescale,
        "seed": seed,
        "width": width,
        "height": height,
        "init_image": init_image,
        "strength": strength,
        "mask_image": mask_image,
        "eta": eta,
        "extra": dict(extra or {}),
        "notes": notes,
    }


IMG32 = "inputs/gradient_circle_32x32.png"
IMG48 = "inputs/gradient_circle_48x32.png"
MASK32 = "inputs/mask_rect_32x32.png"
KARRAS = {"use_karras_sigmas": True}

CASES = [
    # ---- SD1.5 text-to-image (epsilon) ----------------------------------------------
    case("sd15_pndm", "sd15", SD_T2I, "PNDMScheduler", 10, 7.5,
         notes="The folder's own scheduler (PLMS, skip_prk_steps): 11 UNet calls for 10 steps."),
    case("sd15_euler", "sd15", SD_T2I, "EulerDiscreteScheduler", 8, 7.5,
         notes="Euler from the PNDM config: timestep_spacing 'leading' (the saved tiny config has it explicitly)."),
    case("sd15_euler_ancestral", "sd15", SD_T2I, "EulerAncestralDiscreteScheduler", 8, 7.5, seed=1,
         notes="Ancestral: the initial latents and then one randn per step come from the same generator."),
    case("sd15_dpmpp_2m_karras", "sd15", SD_T2I, "DPMSolverMultistepScheduler", 8, 7.5, overrides=KARRAS,
         notes="DPM++ 2M (class defaults: dpmsolver++, order 2, lower_order_final) with Karras sigmas."),
    case("sd15_ddim", "sd15", SD_T2I, "DDIMScheduler", 8, 7.5, eta=0.0),
    case("sd15_ddim_eta1", "sd15", SD_T2I, "DDIMScheduler", 8, 7.5, eta=1.0, seed=2,
         notes="DDIM eta=1: one randn per step from the pipeline generator (after the initial latents)."),
    case("sd15_negative", "sd15", SD_T2I, "EulerDiscreteScheduler", 8, 7.5, negative_prompt=NEGATIVE,
         notes="Negative prompt replaces the empty unconditional prompt."),
    case("sd15_cfg1", "sd15", SD_T2I, "EulerDiscreteScheduler", 8, 1.0,
         notes="guidance_scale 1.0: do_classifier_free_guidance is False (needs > 1), so the UNet runs once per "
               "step on the conditional batch only (batch 1) and no negative embedding is computed."),
    case("sd15_empty_prompt", "sd15", SD_T2I, "EulerDiscreteScheduler", 8, 7.5, prompt="",
         notes="Empty prompt: conditional and unconditional embeddings are identical (both encode '')."),
    case("sd15_euler_48x32", "sd15", SD_T2I, "EulerDiscreteScheduler", 8, 7.5, width=48, height=32,
         notes="Non-square: latents [1,4,8,12] (H/4, W/4), image 32 rows x 48 columns."),
    case("sd15_ddim_rescale", "sd15", SD_T2I, "DDIMScheduler", 8, 7.5, eta=0.0, guidance_rescale=0.7,
         notes="guidance_rescale 0.7 (rescale_noise_cfg, unbiased std over C,H,W)."),
    # ---- SD2.1 text-to-image (v-prediction) -----------------------------------------
    case("sd21_ddim", "sd21", SD_T2I, "DDIMScheduler", 8, 7.5, eta=0.0,
         notes="The folder's own scheduler (DDIM, v_prediction, leading)."),
    case("sd21_euler_32x48", "sd21", SD_T2I, "EulerDiscreteScheduler", 8, 7.5, width=32, height=48,
         notes="Euler with v_prediction (inherited from the DDIM config), portrait: latents [1,4,12,8]."),
    case("sd21_ddim_zsnr_trailing", "sd21", SD_T2I, "DDIMScheduler", 8, 7.5, eta=0.0, guidance_rescale=0.7,
         overrides={"timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
         notes="Zero-terminal-SNR betas + trailing spacing (first timestep 999) + guidance_rescale 0.7."),
    # ---- SDXL text-to-image ---------------------------------------------------------
    case("sdxl_euler", "sdxl", XL_T2I, "EulerDiscreteScheduler", 8, 5.0,
         notes="negative_prompt None + force_zeros_for_empty_prompt=True: the unconditional prompt embeddings "
               "AND pooled embeddings are all zeros (not the encoding of ''). time_ids [32,32,0,0,32,32] for both halves."),
    case("sdxl_dpmpp_2m_48x32", "sdxl", XL_T2I, "DPMSolverMultistepScheduler", 8, 5.0, width=48, height=32,
         notes="Non-square SDXL: default time_ids are (height, width) order: [32,48,0,0,32,48]. Zero negative."),
    case("sdxl_empty_prompt_empty_negative", "sdxl", XL_T2I, "EulerDiscreteScheduler", 8, 5.0,
         prompt="", negative_prompt="",
         notes="force_zeros_for_empty_prompt only triggers when negative_prompt is None: with negative_prompt='' "
               "the negative IS encoded ('' through both encoders), so cond == uncond here and no zeros are used."),
    case("sdxl_empty_prompt_null_negative", "sdxl", XL_T2I, "EulerDiscreteScheduler", 8, 5.0,
         prompt="", negative_prompt=None,
         notes="Empty prompt with negative_prompt None: uncond = zeros (force_zeros_for_empty_prompt), cond = encoding of ''."),
    case("sdxl_micro_conditioning", "sdxl", XL_T2I, "EulerDiscreteScheduler", 8, 5.0, negative_prompt=NEGATIVE,
         extra={"original_size": [64, 64], "crops_coords_top_left": [4, 4], "target_size": [32, 32]},
         notes="Explicit size conditioning: time_ids [64,64,4,4,32,32], also used for the negative half "
               "(negative_original_size/negative_target_size not given). Encoded negative prompt."),
    # ---- img2img ----------------------------------------------------------------------
    case("sd15_img2img_ddim", "sd15", SD_I2I, "DDIMScheduler", 10, 7.5, eta=0.0, strength=0.6, init_image=IMG32,
         notes="int(10*0.6)=6 steps: the last 6 of the 10 DDIM timesteps. Generator order: VAE posterior sample, "
               "then the noise for add_noise at the first used timestep."),
    case("sd15_img2img_euler", "sd15", SD_I2I, "EulerDiscreteScheduler", 8, 7.5, strength=0.75, init_image=IMG32,
         notes="int(8*0.75)=6 steps; Euler add_noise: init + sigma*noise (no init_noise_sigma scaling)."),
    # PNDM's list [t0, t1, t1, t2, ...] sliced at N - int(N*strength) as if it had one entry a step.
    case("sd15_img2img_pndm", "sd15", SD_I2I, "PNDMScheduler", 8, 7.5, strength=0.6, init_image=IMG32,
         notes="The folder's own PNDM: timesteps[4:] of [876, 751, 751, 626, 501, ...] = [501, 376, 251, 126, 1], "
               "5 UNet calls; PNDM's counter restarts on the slice (averaged first step 501 -> 376, then 251, "
               "126 and 1 step from their own labels)."),
    case("sd15_img2img_pndm_s09", "sd15", SD_I2I, "PNDMScheduler", 8, 7.5, strength=0.9, init_image=IMG32,
         notes="int(8*0.9)=7: timesteps[1:] starts on the doubled 751, 8 UNet calls."),
    case("sd15_img2img_pndm_s02", "sd15", SD_I2I, "PNDMScheduler", 8, 7.5, strength=0.2, init_image=IMG32, seed=3,
         notes="int(8*0.2)=1: timesteps[7:] = [126, 1], two UNet calls (the averaged first step only); the "
               "result is left at timestep 1."),
    case("sd15_img2img_pndm_linspace", "sd15", SD_I2I, "PNDMScheduler", 7, 7.5, strength=0.5, init_image=IMG32,
         overrides={"timestep_spacing": "linspace"},
         notes="linspace spacing at 7 steps: steps land at t - 1000//7, off the next timestep."),
    case("sd21_img2img_pndm", "sd21", SD_I2I, "PNDMScheduler", 8, 7.5, strength=0.6, init_image=IMG32,
         notes="PNDM from the v-prediction DDIM config, img2img slice as above."),
    case("sdxl_img2img_euler", "sdxl", XL_I2I, "EulerDiscreteScheduler", 10, 5.0, strength=0.6,
         init_image=IMG48, width=48, height=32,
         notes="int(10*0.6)=6 steps. requires_aesthetics_score=False (constructor default), so the aesthetic "
               "scores (call defaults aesthetic_score=6.0, negative_aesthetic_score=2.5) are NOT used; time_ids "
               "[32,48,0,0,32,48] (original/target default to the image size, (height, width)). Zero negative."),
    # ---- inpainting -------------------------------------------------------------------
    case("sd15_inpaint9_ddim", "sd15_inpaint", SD_INP, "DDIMScheduler", 8, 7.5, eta=0.0, strength=1.0,
         init_image=IMG32, mask_image=MASK32,
         notes="9-channel UNet: input = cat([scaled latents (4), mask (1), masked-image latents (4)], dim=1). "
               "strength 1.0: pure noise start, the init image is not encoded for the start latents."),
    case("sd15_inpaint4_ddim", "sd15", SD_INP, "DDIMScheduler", 8, 7.5, eta=0.0, strength=1.0,
         init_image=IMG32, mask_image=MASK32,
         notes="Ordinary 4-channel SD1.5 UNet in StableDiffusionInpaintPipeline: latent blending after every step."),
    case("sd15_inpaint4_euler_s075", "sd15", SD_INP, "EulerDiscreteScheduler", 8, 7.5, strength=0.75,
         init_image=IMG32, mask_image=MASK32,
         notes="4-channel blending with strength 0.75: start = add_noise(image latents, noise, t_first) (6 steps)."),
    # The blend follows every scheduler call, the mid-step ones of two-call schedulers included.
    case("sd15_inpaint4_pndm", "sd15", SD_INP, "PNDMScheduler", 8, 7.5, strength=1.0,
         init_image=IMG32, mask_image=MASK32,
         notes="PNDM: the averaged first step's predictor is blended (noised to t1) before its second call."),
    case("sd15_inpaint4_pndm_s06", "sd15", SD_INP, "PNDMScheduler", 8, 7.5, strength=0.6,
         init_image=IMG32, mask_image=MASK32,
         notes="PNDM's img2img slice of its timesteps with blending."),
    case("sd15_inpaint4_heun_s06", "sd15", SD_INP, "HeunDiscreteScheduler", 8, 7.5, strength=0.6,
         init_image=IMG32, mask_image=MASK32,
         notes="Heun: the Euler predictor is blended (noised to the step's next sigma) before the second call."),
    case("sd15_inpaint4_dpm2_s06", "sd15", SD_INP, "KDPM2DiscreteScheduler", 8, 7.5, strength=0.6,
         init_image=IMG32, mask_image=MASK32,
         notes="DPM2: the midpoint sample is blended with the known region noised to the step's next sigma "
               "(add_noise reads sigmas[step_index], which points past the midpoint)."),
    case("sd15_inpaint4_dpm2a_s06", "sd15", SD_INP, "KDPM2AncestralDiscreteScheduler", 8, 7.5, strength=0.6,
         init_image=IMG32, mask_image=MASK32, seed=2,
         notes="DPM2 ancestral, as DPM2, with the ancestral noise from the generator."),
]

PIPELINE_CLASSES = {
    SD_T2I: StableDiffusionPipeline,
    SD_I2I: StableDiffusionImg2ImgPipeline,
    SD_INP: StableDiffusionInpaintPipeline,
    XL_T2I: StableDiffusionXLPipeline,
    XL_I2I: StableDiffusionXLImg2ImgPipeline,
}

# Constructor kwargs used when a pipeline is built from another pipeline's components
# (recorded in cases.json as "pipeline_init").
SD_INIT = {"requires_safety_checker": False}  # safety_checker / feature_extractor are None in the components
XL_INIT = {"add_watermarker": False, "force_zeros_for_empty_prompt": True}
XL_I2I_INIT = {**XL_INIT, "requires_aesthetics_score": False}

# =============================================================================
# Running
# =============================================================================


class Pipelines:
    """Loads each tiny folder once (as float32) and builds derived pipelines from its components."""

    def __init__(self, tiny: Path):
        self.tiny = tiny
        self.base: dict[str, object] = {}
        self.base_sched_config: dict[str, dict] = {}
        self.derived: dict[tuple[str, str], object] = {}
        self.unet_log: list[dict] = []

    def _load(self, model: str):
        if model in self.base:
            return self.base[model]
        folder = str(self.tiny / model)
        if model == "sdxl":
            pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32, add_watermarker=False)
            assert pipe.watermark is None
        elif model == "sd15_inpaint":
            pipe = StableDiffusionInpaintPipeline.from_pretrained(folder, dtype=torch.float32)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        for m in pipe.components.values():
            if isinstance(m, torch.nn.Module):
                m.eval()
                assert all(p.dtype == torch.float32 for p in m.parameters())
        pipe.unet.register_forward_pre_hook(self._unet_hook, with_kwargs=True)
        self.base[model] = pipe
        self.base_sched_config[model] = dict(pipe.scheduler.config)
        return pipe

    def _unet_hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        rec = {"t": float(t), "batch": int(sample.shape[0]), "channels": int(sample.shape[1]), "sample": sample}
        added = kwargs.get("added_cond_kwargs")
        if added and "time_ids" in added:
            rec["time_ids"] = added["time_ids"].tolist()
            rec["text_embeds"] = added["text_embeds"]
        rec["encoder_hidden_states"] = kwargs.get("encoder_hidden_states")
        self.unet_log.append(rec)

    def get(self, model: str, pipeline: str):
        """Returns (pipe, constructor kwargs used or None)."""
        base = self._load(model)
        if type(base).__name__ == pipeline:
            return base, None
        key = (model, pipeline)
        init = {SD_I2I: SD_INIT, SD_INP: SD_INIT, XL_I2I: XL_I2I_INIT}[pipeline]
        if key not in self.derived:
            pipe = PIPELINE_CLASSES[pipeline](**base.components, **init)
            pipe.set_progress_bar_config(disable=True)
            self.derived[key] = pipe
        return self.derived[key], init


def call_kwargs(c: dict, images: dict[str, PIL.Image.Image]) -> dict:
    kw = {
        "prompt": c["prompt"],
        "negative_prompt": c["negative_prompt"],
        "num_inference_steps": c["steps"],
        "guidance_scale": c["guidance_scale"],
    }
    if c["pipeline"] in (SD_T2I, XL_T2I, SD_INP):  # the img2img pipelines take the size from the image
        kw["width"], kw["height"] = c["width"], c["height"]
    if c["guidance_rescale"] is not None:
        kw["guidance_rescale"] = c["guidance_rescale"]
    if c["init_image"] is not None:
        kw["image"] = images[c["init_image"]]
    if c["mask_image"] is not None:
        kw["mask_image"] = images[c["mask_image"]]
    if c["strength"] is not None:
        kw["strength"] = c["strength"]
    if c["eta"] is not None:
        kw["eta"] = c["eta"]
    for k, v in c["extra"].items():
        kw[k] = tuple(v) if isinstance(v, list) else v
    return kw


def run_case(pipes: Pipelines, c: dict, images: dict, output_type: str):
    pipe, init = pipes.get(c["model"], c["pipeline"])
    cls = getattr(diffusers, c["scheduler"])
    pipe.scheduler = cls.from_config(pipes.base_sched_config[c["model"]], **c["scheduler_overrides"])
    generator = torch.Generator("cpu").manual_seed(c["seed"])
    pipes.unet_log = []
    with torch.no_grad():
        out = pipe(**call_kwargs(c, images), generator=generator, output_type=output_type)
    return pipe, init, out.images


def describe(pipe, log: list[dict], latents: torch.Tensor) -> dict:
    """Facts about the run that the Rust side may want to check (not inputs)."""
    info = {
        "unet_calls": len(log),
        "unet_batch": log[0]["batch"],
        "unet_in_channels": log[0]["channels"],
        "unet_timesteps": [r["t"] for r in log],
        "latents_shape": list(latents.shape),
        "vae_scaling_factor": float(pipe.vae.config.scaling_factor),
    }
    if "time_ids" in log[0]:
        info["time_ids"] = log[0]["time_ids"]  # [uncond, cond] rows when CFG is on
        te = log[0]["text_embeds"]
        ehs = log[0]["encoder_hidden_states"]
        if te.shape[0] == 2:
            info["uncond_is_zeros"] = bool((te[0] == 0).all() and (ehs[0] == 0).all())
            info["uncond_equals_cond"] = bool(torch.equal(te[0], te[1]) and torch.equal(ehs[0], ehs[1]))
    elif log[0]["batch"] == 2:
        ehs = log[0]["encoder_hidden_states"]
        info["uncond_equals_cond"] = bool(torch.equal(ehs[0], ehs[1]))
    info["scheduler_config"] = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
    return info


def check_inpaint(pipe, c: dict, images: dict, log: list[dict], latents: torch.Tensor) -> str:
    """Checks the inpainting path (9-channel input layout / 4-channel blending) and returns a description."""
    sf = pipe.vae.config.scaling_factor
    mask_t = pipe.mask_processor.preprocess(images[c["mask_image"]], height=c["height"], width=c["width"])
    init_t = pipe.image_processor.preprocess(images[c["init_image"]], height=c["height"], width=c["width"])
    lat_mask = torch.nn.functional.interpolate(mask_t, size=tuple(latents.shape[-2:]))
    g = torch.Generator("cpu").manual_seed(c["seed"])
    if log[0]["channels"] == 9:
        # strength 1.0: draw 1 = initial noise, draw 2 = posterior sample of the masked image
        assert c["strength"] == 1.0
        noise = torch.randn(latents.shape, generator=g)
        masked = init_t * (mask_t < 0.5)
        with torch.no_grad():
            mil = sf * pipe.vae.encode(masked).latent_dist.sample(g)
        s = log[0]["sample"]
        assert torch.equal(s[:, 4:5], lat_mask.expand(s.shape[0], -1, -1, -1)), "channel 4 is not the mask"
        assert torch.equal(s[:, 5:9], mil.expand(s.shape[0], -1, -1, -1)), "channels 5..8 are not masked-image latents"
        # first UNet input, channels 0..3 = scale_model_input(noise * init_noise_sigma) = noise for DDIM
        assert c["scheduler"] == "DDIMScheduler" and pipe.scheduler.init_noise_sigma == 1.0
        assert torch.equal(s[:, :4], noise.expand(s.shape[0], -1, -1, -1)), "channels 0..3 are not the latents"
        return "9-channel"
    # 4-channel: draw 1 = posterior sample of the (unmasked) init image, draw 2 = noise;
    # the final step blends with the un-noised image latents.
    with torch.no_grad():
        image_latents = sf * pipe.vae.encode(init_t).latent_dist.sample(g)
    keep = (lat_mask == 0).expand_as(latents)
    assert torch.equal(latents[keep], image_latents[keep]), "4-channel path: unmasked latents != image latents"
    assert not torch.equal(latents[~keep], image_latents[~keep])
    return "4-channel blend"


def generate(root: Path, out: Path) -> None:
    tiny = root / "tiny"
    (out / "inputs").mkdir(parents=True, exist_ok=True)
    images = {}
    for rel, (kind, w, h) in INPUTS.items():
        make_input(kind, w, h).save(out / rel)
        with PIL.Image.open(out / rel) as im:
            im.load()
            images[rel] = im.copy()
        assert images[rel].size == (w, h) and images[rel].mode == ("L" if kind == "mask" else "RGB")

    pipes = Pipelines(tiny)
    records = []
    assert len({c["name"] for c in CASES}) == len(CASES)
    for c in CASES:
        # 1. PIL (the default output type)
        pipe, init, imgs = run_case(pipes, c, images, "pil")
        log = pipes.unet_log
        img = imgs[0]
        assert img.size == (c["width"], c["height"]), (c["name"], img.size)
        img.save(out / f"{c['name']}.png")
        # 2. latents
        _, _, lat = run_case(pipes, c, images, "latent")
        assert lat.dtype == torch.float32
        latents = lat.contiguous()  # (img2img/inpaint latents come back in a channels-last stride layout)
        assert pipes.unet_log and [r["t"] for r in pipes.unet_log] == [r["t"] for r in log]
        # 3. float image
        _, _, arr = run_case(pipes, c, images, "np")
        image = np.ascontiguousarray(arr[0].astype(np.float32))
        assert image.shape == (c["height"], c["width"], 3)

        # The three runs are the same computation: the PNG is round(image * 255), and decoding the
        # latents gives the float image.
        with PIL.Image.open(out / f"{c['name']}.png") as im:
            png = np.asarray(im.convert("RGB"))
        assert np.array_equal(png, (image * 255).round().astype(np.uint8)), c["name"]
        with torch.no_grad():
            # decode the tensor exactly as returned: the memory layout changes conv rounding (~1e-6)
            dec = pipe.vae.decode(lat / pipe.vae.config.scaling_factor, return_dict=False)[0]
        dec = (dec * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)[0].numpy()
        assert np.array_equal(dec, image), c["name"]

        save_file({"latents": latents, "image": torch.from_numpy(image)},
                  str(out / f"{c['name']}.latents.safetensors"), metadata={"format": "pt"})

        rec = dict(c)
        rec["pipeline_init"] = init
        rec["run"] = describe(pipe, log, latents)
        if c["pipeline"] == SD_INP:
            rec["run"]["inpaint_path"] = check_inpaint(pipe, c, images, log, latents)
        clamped = float(((image <= 0) | (image >= 1)).mean())
        rec["run"]["image_mean"] = round(float(image.mean()), 4)
        rec["run"]["image_std"] = round(float(image.std()), 4)
        rec["run"]["fraction_clamped"] = round(clamped, 4)
        rec["run"]["png_sha256"] = hashlib.sha256((out / f"{c['name']}.png").read_bytes()).hexdigest()
        records.append(rec)
        r = rec["run"]
        print(f"{c['name']:36s} unet calls {r['unet_calls']:2d} x batch {r['unet_batch']}  latents {r['latents_shape']}"
              f"  image mean {r['image_mean']:.3f} std {r['image_std']:.3f} clamped {clamped:.3f}"
              + (f"  [{r['inpaint_path']}]" if "inpaint_path" in r else "")
              + (f"  time_ids {r['time_ids']}" if "time_ids" in r else ""), flush=True)

    body = ",\n".join("  " + json.dumps(r, ensure_ascii=False) for r in records)
    (out / "cases.json").write_text("[\n" + body + "\n]\n", encoding="utf-8")
    for p in out.rglob("*"):
        if p.is_file():
            os.chmod(p, 0o644)


def kept_files(d: Path) -> set[str]:
    """Files in pipelines/ that this script does not write: README.md (hand-written) and the
    refiner cases of tools/oracle/make_refiner_fixtures.py (listed in refiner_cases.json)."""
    kept = {"README.md"}
    rc = d / "refiner_cases.json"
    if rc.exists():
        kept.add(rc.name)
        for c in json.loads(rc.read_text(encoding="utf-8")):
            kept |= {f"{c['name']}.png", f"{c['name']}.latents.safetensors"}
    return kept


def files_of(d: Path) -> dict[str, bytes]:
    kept = kept_files(d)
    return {
        str(p.relative_to(d)): p.read_bytes()
        for p in sorted(d.rglob("*"))
        if p.is_file() and str(p.relative_to(d)) not in kept
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="regenerate into a temp folder and compare with the files on disk")
    ap.add_argument("root", type=Path, help="fixtures root (contains tiny/; pipelines/ is written there)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    dest = args.root / "pipelines"
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            generate(args.root, Path(tmp))
            new, old = files_of(Path(tmp)), files_of(dest)
        bad = sorted(k for k in set(new) | set(old) if new.get(k) != old.get(k))
        for k in bad:
            print("differs:", k)
        print("check:", "OK" if not bad else f"{len(bad)} file(s) differ", f"({len(new)} files)")
        sys.exit(1 if bad else 0)

    kept = {}
    if dest.exists():
        kept = {n: (dest / n).read_bytes() for n in sorted(kept_files(dest)) if (dest / n).exists()}
        shutil.rmtree(dest)
    generate(args.root, dest)
    for n, data in kept.items():
        (dest / n).write_bytes(data)
    total = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"wrote {dest} ({len(list(dest.rglob('*.png')))} PNGs, {total:,} bytes)")


if __name__ == "__main__":
    main()
