#!/usr/bin/env python3
"""T2I-Adapter oracle fixtures: tiny random T2IAdapters, their feature maps, and the pictures
diffusers 0.42.1 makes with them.

    python tools/oracle/make_t2i_adapter_fixtures.py fixtures

Reads the tiny pipeline folders fixtures/tiny/{sd15,sd21,sdxl}/ and the control image
fixtures/pipelines/inputs/gradient_circle_32x32.png, and writes fixtures/t2i_adapter/:

1. Adapters (diffusers folders: config.json + diffusion_pytorch_model.safetensors, float32), each
   `T2IAdapter(in_channels=3, channels=[8, 16], num_res_blocks=2, downscale_factor=D, adapter_type=T)`
   with PyTorch's default init under `torch.manual_seed(seed)`, then every tensor multiplied by GAIN:
     sd15_full/   full_adapter     D=4  features 8@8×8, 16@4×4           (total_downscale_factor 8)
     sd15_light/  light_adapter    D=4  features 8@8×8, 16@4×4, 16@2×2   (total_downscale_factor 16)
     sd21_full/   full_adapter     D=4  features 8@8×8, 16@4×4           (total_downscale_factor 8)
     sdxl_full/   full_adapter_xl  D=8  features 8@4×4, 16@4×4           (total_downscale_factor 16)
   The tiny U-Nets have block_out_channels [8, 16] and vae_scale_factor 4 (32×32 image, 8×8
   latent). SD1.5/2.1: down blocks CrossAttnDownBlock2D (8 ch, residual added at 8×8 before its
   downsampler) then DownBlock2D (16 ch, last, no downsampler: 4×4), so PixelUnshuffle(4).
   SDXL: DownBlock2D (8 ch, residual added *after* its downsampler: 4×4) then CrossAttnDownBlock2D
   (16 ch, 4×4), so PixelUnshuffle(8); FullAdapterXL's blocks 0 and 1 do not downsample.
   The LightAdapter always makes len(channels) + 1 features; its third (16@2×2) is left unused by
   the U-Net (only two down blocks, and the mid-block add needs the mid block's shape, 16@4×4).
   No tiny adapter can reach the mid-block add (FullAdapterXL's third block always halves).

2. <adapter>_features.safetensors: "input" (the preprocessed control image, 1×3×32×32 in [0, 1])
   and "feature.<i>" (the adapter's raw outputs for it, before adapter_conditioning_scale).

3. Pictures (32×32 PNG), prompt "a red circle", no negative prompt, seed 1
   (`torch.Generator("cpu").manual_seed(1)`), 8 steps, guidance 7.5 (SD1.5/2.1) or 5.0 (SDXL), the
   folder's own scheduler (SD1.5 PNDM: 9 timesteps for 8 steps; SD2.1 DDIM v-prediction; SDXL
   Euler), StableDiffusionAdapterPipeline / StableDiffusionXLAdapterPipeline built from the tiny
   pipeline's components plus the adapter, and the plain pipelines for the `*_base` pictures.
   StableDiffusionAdapterPipeline has no adapter_conditioning_factor argument (only the XL
   pipeline has one), so the factor case is sdxl_full_half; sd15_full_half only lowers the scale.
   Every case, with all its call arguments, is in cases.json (paths relative to fixtures/).

Checks (asserted): every adapter picture is > 3 levels from its base; adapter_conditioning_scale
0 (and for SDXL adapter_conditioning_factor 0) gives the base picture exactly; and, in one U-Net
call per model, a plain DownBlock2D's residual also reaches its saved skip (`sample +=` is in
place and `sample` is the same tensor as the block's last `res_samples` entry).

Deterministic: CPU, float32, one thread; two runs give identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
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
    StableDiffusionAdapterPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLAdapterPipeline,
    StableDiffusionXLPipeline,
    T2IAdapter,
)
from diffusers.models.unets.unet_2d_blocks import DownBlock2D  # noqa: E402
from diffusers.pipelines.t2i_adapter.pipeline_stable_diffusion_adapter import _preprocess_adapter_image  # noqa: E402

diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

root = Path(sys.argv[1])
out = root / "t2i_adapter"
out.mkdir(parents=True, exist_ok=True)

# name: (model, adapter_type, downscale_factor, seed, gain)
ADAPTERS = {
    "sd15_full": ("sd15", "full_adapter", 4, 401, 1.5),
    "sd15_light": ("sd15", "light_adapter", 4, 402, 1.5),
    "sd21_full": ("sd21", "full_adapter", 4, 501, 1.5),
    "sdxl_full": ("sdxl", "full_adapter_xl", 8, 601, 1.0),
}
CHANNELS = [8, 16]
NUM_RES_BLOCKS = 2

PROMPT = "a red circle"
SEED = 1
STEPS = 8
GUIDANCE = {"sd15": 7.5, "sd21": 7.5, "sdxl": 5.0}
CIRCLE = "pipelines/inputs/gradient_circle_32x32.png"


# --- pipelines ---------------------------------------------------------------------------------
def load(model: str):
    folder = root / "tiny" / model
    if model == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


PIPES = {m: load(m) for m in ("sd15", "sd21", "sdxl")}
control = PIL.Image.open(root / CIRCLE).convert("RGB")


# --- 1. + 2. adapters and their features ----------------------------------------------------------
def make_adapter(name: str) -> T2IAdapter:
    model, adapter_type, factor, seed, gain = ADAPTERS[name]
    torch.manual_seed(seed)
    ad = T2IAdapter(in_channels=3, channels=CHANNELS, num_res_blocks=NUM_RES_BLOCKS,
                    downscale_factor=factor, adapter_type=adapter_type)
    with torch.no_grad():
        for v in ad.state_dict().values():
            v.mul_(gain)
    folder = out / name
    if folder.exists():
        shutil.rmtree(folder)
    ad.save_pretrained(folder, safe_serialization=True)
    ad = T2IAdapter.from_pretrained(folder, dtype=torch.float32).eval()

    x = _preprocess_adapter_image(control, 32, 32)
    with torch.no_grad():
        feats = ad(x)
    save_file({"input": x.contiguous(), **{f"feature.{i}": f.contiguous() for i, f in enumerate(feats)}},
              out / f"{name}_features.safetensors")
    sd = ad.state_dict()
    print(f"{name}: {adapter_type}, downscale_factor {factor}, total_downscale_factor "
          f"{ad.total_downscale_factor}, {len(sd)} tensors, {sum(v.numel() for v in sd.values())} parameters; "
          f"features {[tuple(f.shape[1:]) for f in feats]}, std {[round(float(f.std()), 3) for f in feats]}")
    return ad


AD = {name: make_adapter(name) for name in ADAPTERS}


# --- 3. pictures -----------------------------------------------------------------------------------
def case(name, model, adapter=None, scale=1.0, factor=1.0):
    xl = model == "sdxl"
    return {
        "name": name,
        "model": model,
        "pipeline_folder": f"tiny/{model}",
        "pipeline": ("StableDiffusionXL" if xl else "StableDiffusion") + ("AdapterPipeline" if adapter else "Pipeline"),
        "scheduler": type(PIPES[model].scheduler).__name__,
        "adapter": f"t2i_adapter/{adapter}" if adapter else None,
        "adapter_type": ADAPTERS[adapter][1] if adapter else None,
        "adapter_features": f"t2i_adapter/{adapter}_features.safetensors" if adapter else None,
        "control_image": CIRCLE if adapter else None,
        "adapter_conditioning_scale": scale if adapter else None,
        # Only StableDiffusionXLAdapterPipeline takes adapter_conditioning_factor.
        "adapter_conditioning_factor": factor if (adapter and xl) else None,
        "prompt": PROMPT,
        "negative_prompt": None,
        "steps": STEPS,
        "guidance_scale": GUIDANCE[model],
        "seed": SEED,
        "width": 32,
        "height": 32,
        "image": f"t2i_adapter/{name}.png",
    }


CASES = [
    case("sd15_base", "sd15"),
    case("sd15_full", "sd15", "sd15_full", 1.0),
    case("sd15_full_half", "sd15", "sd15_full", 0.6),
    case("sd15_light", "sd15", "sd15_light", 1.0),
    case("sd21_base", "sd21"),
    case("sd21_full", "sd21", "sd21_full", 1.0),
    case("sdxl_base", "sdxl"),
    case("sdxl_full", "sdxl", "sdxl_full", 1.0, 1.0),
    case("sdxl_full_half", "sdxl", "sdxl_full", 0.6, 0.5),
]


def build(model: str, adapter: str | None):
    base = PIPES[model]
    if adapter is None:
        return base
    c = base.components
    if model == "sdxl":
        pipe = StableDiffusionXLAdapterPipeline(
            vae=c["vae"], text_encoder=c["text_encoder"], text_encoder_2=c["text_encoder_2"],
            tokenizer=c["tokenizer"], tokenizer_2=c["tokenizer_2"], unet=c["unet"], adapter=AD[adapter],
            scheduler=c["scheduler"], force_zeros_for_empty_prompt=True)
    else:
        pipe = StableDiffusionAdapterPipeline(
            vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=c["unet"],
            adapter=AD[adapter], scheduler=c["scheduler"], safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(c: dict, scale=None, factor=None):
    adapter = c["adapter"].split("/")[-1] if c["adapter"] else None
    pipe = build(c["model"], adapter)
    kw = dict(prompt=c["prompt"], negative_prompt=c["negative_prompt"], num_inference_steps=c["steps"],
              guidance_scale=c["guidance_scale"], width=c["width"], height=c["height"],
              generator=torch.Generator("cpu").manual_seed(c["seed"]), output_type="pil")
    if adapter:
        kw.update(image=PIL.Image.open(root / c["control_image"]).convert("RGB"),
                  adapter_conditioning_scale=c["adapter_conditioning_scale"] if scale is None else scale)
        if c["model"] == "sdxl":
            kw["adapter_conditioning_factor"] = c["adapter_conditioning_factor"] if factor is None else factor
    with torch.no_grad():
        return pipe(**kw).images[0]


def levels(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


pngs = {}
for c in CASES:
    run(c).save(root / c["image"])
    pngs[c["name"]] = np.asarray(PIL.Image.open(root / c["image"]))

print("\nmean |difference| from the model's base picture, 8-bit levels (share of pixels at 0 or 255):")
for c in CASES:
    p = pngs[c["name"]]
    if c["adapter"] is None:
        print(f"  {c['name']:15s}    base   ({float(((p == 0) | (p == 255)).mean()):.3f})")
        continue
    d = levels(p, pngs[f"{c['model']}_base"])
    c["levels_from_base"] = round(d, 3)
    print(f"  {c['name']:15s} {d:7.2f}   ({float(((p == 0) | (p == 255)).mean()):.3f})")
    assert d > 3.0, c["name"]
for a, b in (("sd15_full_half", "sd15_full"), ("sdxl_full_half", "sdxl_full"), ("sd15_light", "sd15_full")):
    d = levels(pngs[a], pngs[b])
    print(f"  {a} vs {b}: {d:.2f}")
    assert d > 1.0

# The adapter pipelines are the plain pipelines when the adapter contributes nothing.
print("\nadapter switched off (levels from base, must be 0):")
for c in CASES:
    if c["name"] in ("sd15_full", "sd21_full", "sdxl_full"):
        d = levels(run(c, scale=0.0), pngs[f"{c['model']}_base"])
        print(f"  {c['name']} adapter_conditioning_scale 0: {d}")
        assert d == 0.0
        if c["model"] == "sdxl":
            d = levels(run(c, factor=0.0), pngs["sdxl_base"])
            print(f"  {c['name']} adapter_conditioning_factor 0: {d}")
            assert d == 0.0


# --- skip aliasing in UNet2DConditionModel.forward ------------------------------------------------
def check_skips(model: str, adapter: str):
    """One U-Net call with the adapter's features: the skips that reach the up blocks must be the
    down blocks' own outputs with the residual added to the last one of each plain DownBlock2D
    (CrossAttnDownBlock2D adds it inside, before saving, so its hook output already has it)."""
    unet = PIPES[model].unet
    g = torch.Generator().manual_seed(7)
    x = _preprocess_adapter_image(control, 32, 32)
    with torch.no_grad():
        feats = AD[adapter](x)
    down_out, up_in = [], []
    hooks = [b.register_forward_hook(lambda m, i, o: down_out.append((m, [t.clone() for t in o[1]])))
             for b in unet.down_blocks]
    hooks += [b.register_forward_pre_hook(lambda m, a, kw: up_in.append(kw["res_hidden_states_tuple"]),
                                          with_kwargs=True) for b in unet.up_blocks]
    kw = {}
    if model == "sdxl":
        cfg = unet.config
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim,
                                       generator=g),
            "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])}
    with torch.no_grad():
        unet(torch.randn(1, 4, 8, 8, generator=g), 500,
             encoder_hidden_states=torch.randn(1, 77, unet.config.cross_attention_dim, generator=g),
             down_intrablock_additional_residuals=[f.clone() for f in feats], **kw)
    for h in hooks:
        h.remove()
    expected, k = [], 0
    for block, res in down_out:
        if isinstance(block, DownBlock2D):
            res[-1] = res[-1] + feats[k]
        expected += res
        k += 1
    got = [t for tup in reversed(up_in) for t in tup][1:]  # [0] is conv_in's output
    assert len(got) == len(expected)
    for e, t in zip(expected, got):
        assert torch.equal(e, t), model
    print(f"  {model}: {len(got)} skips as expected; plain DownBlock2D's last skip includes its residual")


print("\nskip check:")
check_skips("sd15", "sd15_full")
check_skips("sdxl", "sdxl_full")

(out / "cases.json").write_text(json.dumps({
    "notes": "Paths relative to fixtures/. Written by tools/oracle/make_t2i_adapter_fixtures.py "
             "(diffusers 0.42.1, CPU, float32). adapter_conditioning_factor is null for "
             "StableDiffusionAdapterPipeline, which has no such argument. adapter_features: the "
             "preprocessed control image ('input', 1x3x32x32 in [0,1]) and the adapter's raw outputs "
             "('feature.<i>', before adapter_conditioning_scale). "
             "levels_from_base: mean |PNG - <model>_base PNG| in 8-bit levels.",
    "adapters": {name: {"model": m, "adapter_type": t, "channels": CHANNELS, "num_res_blocks": NUM_RES_BLOCKS,
                        "downscale_factor": f, "seed": s, "gain": gain}
                 for name, (m, t, f, s, gain) in ADAPTERS.items()},
    "cases": CASES,
}, indent=2) + "\n")

total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
print(f"\nfixtures/t2i_adapter: {total} bytes")
assert total < 600_000
