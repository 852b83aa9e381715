#!/usr/bin/env python3
"""ControlNet oracle fixtures: tiny ControlNets, the pictures diffusers 0.42.1 makes with them, and
two (SD1.5, SD2.1) in the original lllyasviel single-file layout.

    python tools/oracle/make_controlnet_fixtures.py fixtures

Reads the tiny pipeline folders fixtures/tiny/{sd15,sd21,sdxl}/ and
fixtures/pipelines/inputs/gradient_circle_32x32.png, and writes fixtures/controlnet/:

1. ControlNets (diffusers folders: config.json + diffusion_pytorch_model.safetensors, float32),
   each `ControlNetModel.from_unet(<tiny U-Net>, conditioning_embedding_out_channels=(8, 16, 32))`:
     sd15_a/, sd15_b/ (another seed, for multi-ControlNet), sd21_a/, sdxl_a/
   The conditioning embedding has len(channels) − 1 = 2 stride-2 convolutions, a downsampling by 4:
   the tiny autoencoders have three blocks (vae_scale_factor 4), so a 32×32 control image must
   become the 8×8 latent grid (four entries would give 4×4 and fail to add to conv_in's output).
   The parts ControlNet starts at zero get random values: every tensor of the zero convolutions
   `controlnet_down_blocks.*` and `controlnet_mid_block.*` becomes `randn(generator) · 0.25`, and
   `controlnet_cond_embedding.conv_out.*` (where the control image comes in) `randn(generator) · 1.0`
   (so the control image alone moves the picture by ~7 levels); every other tensor (the copied U-Net encoder, time
   embedding, SDXL add embedding, and the conditioning embedding's own random init) gets
   `+ ENCODER_NOISE · randn(generator)`, so the ControlNet is not a copy of the U-Net encoder.
   The generator is `torch.Generator().manual_seed(seed)`, tensors in state_dict order;
   `torch.manual_seed(seed)` before `from_unet` fixes the conditioning embedding's init.

2. Pictures (32×32 PNG), prompt "a red circle", no negative prompt, seed 1
   (`torch.Generator("cpu").manual_seed(1)`), 8 steps, guidance 7.5 (SD1.5/2.1) or 5.0 (SDXL), the
   folder's own scheduler (SD1.5 PNDM: 9 timesteps for 8 steps; SD2.1 DDIM v-prediction; SDXL
   Euler), with StableDiffusionControlNetPipeline / StableDiffusionXLControlNetPipeline built
   from the tiny pipeline's components plus the ControlNet(s) (a list gives MultiControlNetModel),
   and the plain pipelines for the `*_base` pictures. Every case, with all its call arguments, is in
   cases.json (paths relative to fixtures/). Second control image: square_outline_32x32.png
   (white 2-pixel square outline on black).

3. sd15_a_original.safetensors: sd15_a in the original ControlNet checkpoint layout
   (`control_model.time_embed.0.weight`, `control_model.input_blocks.1.0.in_layers.0.weight`,
   `control_model.zero_convs.N.0.*`, `control_model.input_hint_block.{0,2,4,6,8,14}.*`,
   `control_model.middle_block_out.0.*`, ...), the exact inverse of diffusers'
   `convert_controlnet_checkpoint` (loaders/single_file_utils.py). That converter fixes the
   conditioning embedding's last convolution at `input_hint_block.14` (every real checkpoint has
   four channel entries: conv_in 0, six convolutions 2..12, conv_out 14, SiLUs at the odd
   indices), and numbers the other convolutions from 2 in steps of 2; with our three entries that
   is 0, 2, 4, 6, 8 and 14. The script checks the round trip:
   `ControlNetModel.from_single_file(file, config="fixtures/controlnet/sd15_a", local_files_only=True)`
   and `convert_controlnet_checkpoint` must both give sd15_a's state dict exactly.

4. sd21_a_original.safetensors: sd21_a the same way, in the original SD2 ControlNet layout. SD2
   uses linear projections in its transformers (use_linear_in_transformer / diffusers'
   use_linear_projection), so `...proj_in.weight` / `...proj_out.weight` are 2-D Linear weights in
   both layouts, and diffusers' converter copies them unchanged: the key mapping is the one of 3.
   (The tiny SD2.1 U-Net's second down block is a DownBlock2D, so only input_blocks.1/2 and the
   middle block have transformers.) Same round-trip check, with config="fixtures/controlnet/sd21_a".

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
from safetensors.torch import load_file, save_file  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint  # noqa: E402

diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

root = Path(sys.argv[1])
out = root / "controlnet"
out.mkdir(parents=True, exist_ok=True)

COND_CHANNELS = (8, 16, 32)
ZERO_SCALE = 0.25  # zero convolutions (controlnet_down_blocks, controlnet_mid_block)
HINT_SCALE = 1.0  # controlnet_cond_embedding.conv_out (the control image's way in)
ENCODER_NOISE = 0.02  # added to every other tensor
SEEDS = {"sd15_a": 101, "sd15_b": 102, "sd21_a": 201, "sdxl_a": 301}
ZERO_PREFIXES = ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")

PROMPT = "a red circle"
SEED = 1
STEPS = 8
GUIDANCE = {"sd15": 7.5, "sd21": 7.5, "sdxl": 5.0}
CIRCLE = "pipelines/inputs/gradient_circle_32x32.png"
SQUARE = "controlnet/square_outline_32x32.png"


# --- second control image --------------------------------------------------------------------
sq = np.zeros((32, 32, 3), dtype=np.uint8)
sq[8:24, 8:24] = 255
sq[10:22, 10:22] = 0
PIL.Image.fromarray(sq, mode="RGB").save(root / SQUARE)


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


# --- 1. ControlNets ------------------------------------------------------------------------------
def make_controlnet(name: str, model: str) -> ControlNetModel:
    seed = SEEDS[name]
    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(PIPES[model].unet, conditioning_embedding_out_channels=COND_CHANNELS)
    g = torch.Generator().manual_seed(seed)
    sd = cn.state_dict()
    zeroed = 0
    with torch.no_grad():
        for k, v in sd.items():
            noise = torch.randn(v.shape, generator=g, dtype=torch.float32)
            if k.startswith(ZERO_PREFIXES):
                assert torch.count_nonzero(v) == 0, k
                v.copy_(noise * (HINT_SCALE if k.startswith(ZERO_PREFIXES[2]) else ZERO_SCALE))
                zeroed += 1
            else:
                v.add_(noise * ENCODER_NOISE)
    folder = out / name
    if folder.exists():
        shutil.rmtree(folder)
    cn.save_pretrained(folder, safe_serialization=True)
    cn = ControlNetModel.from_pretrained(folder, dtype=torch.float32).eval()
    print(f"{name}: {len(sd)} tensors, {zeroed} zero-initialised ones made random, "
          f"{sum(v.numel() for v in sd.values())} parameters")
    return cn


CN = {"sd15_a": make_controlnet("sd15_a", "sd15"), "sd15_b": make_controlnet("sd15_b", "sd15"),
      "sd21_a": make_controlnet("sd21_a", "sd21"), "sdxl_a": make_controlnet("sdxl_a", "sdxl")}


# --- 2. pictures ---------------------------------------------------------------------------------
def case(name, model, controlnets=(), images=(), scales=None, start=0.0, end=1.0, guess_mode=False):
    return {
        "name": name,
        "model": model,
        "pipeline_folder": f"tiny/{model}",
        "pipeline": ("StableDiffusionXL" if model == "sdxl" else "StableDiffusion")
        + ("ControlNetPipeline" if controlnets else "Pipeline"),
        "scheduler": type(PIPES[model].scheduler).__name__,
        "controlnets": [f"controlnet/{c}" for c in controlnets],
        "control_images": list(images),
        "controlnet_conditioning_scale": scales,
        "control_guidance_start": start if controlnets else None,
        "control_guidance_end": end if controlnets else None,
        "guess_mode": guess_mode,
        "prompt": PROMPT,
        "negative_prompt": None,
        "steps": STEPS,
        "guidance_scale": GUIDANCE[model],
        "seed": SEED,
        "width": 32,
        "height": 32,
        "image": f"controlnet/{name}.png",
    }


CASES = [
    case("sd15_base", "sd15"),
    case("sd15_single", "sd15", ["sd15_a"], [CIRCLE], 1.0),
    case("sd15_window", "sd15", ["sd15_a"], [CIRCLE], 0.5, start=0.25, end=0.75),
    case("sd15_guess", "sd15", ["sd15_a"], [CIRCLE], 1.0, guess_mode=True),
    case("sd15_multi", "sd15", ["sd15_a", "sd15_b"], [CIRCLE, SQUARE], [1.0, 0.7]),
    case("sd21_base", "sd21"),
    case("sd21_single", "sd21", ["sd21_a"], [CIRCLE], 1.0),
    case("sdxl_base", "sdxl"),
    case("sdxl_single", "sdxl", ["sdxl_a"], [CIRCLE], 1.0),
]


def build(model: str, controlnets):
    base = PIPES[model]
    if not controlnets:
        return base
    nets = [CN[c] for c in controlnets]
    cn = nets[0] if len(nets) == 1 else nets
    if model == "sdxl":
        pipe = StableDiffusionXLControlNetPipeline(**{k: v for k, v in base.components.items()},
                                                   controlnet=cn, add_watermarker=False,
                                                   force_zeros_for_empty_prompt=True)
    else:
        pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=cn, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(c: dict, output_type: str, controlnets=None):
    names = [p.split("/")[-1] for p in c["controlnets"]] if controlnets is None else controlnets
    pipe = build(c["model"], names)
    kw = dict(prompt=c["prompt"], negative_prompt=c["negative_prompt"], num_inference_steps=c["steps"],
              guidance_scale=c["guidance_scale"], width=c["width"], height=c["height"],
              generator=torch.Generator("cpu").manual_seed(c["seed"]), output_type=output_type)
    if names:
        imgs = [PIL.Image.open(root / p).convert("RGB") for p in c["control_images"]]
        kw.update(image=imgs[0] if len(imgs) == 1 else imgs,
                  controlnet_conditioning_scale=c["controlnet_conditioning_scale"],
                  control_guidance_start=c["control_guidance_start"],
                  control_guidance_end=c["control_guidance_end"], guess_mode=c["guess_mode"])
    with torch.no_grad():
        return pipe(**kw).images


def levels(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


pngs = {}
for c in CASES:
    img = run(c, "pil")[0]
    img.save(root / c["image"])
    pngs[c["name"]] = np.asarray(PIL.Image.open(root / c["image"]))

print("\nmean |difference| from the model's base picture, 8-bit levels (share of pixels at 0 or 255):")
for c in CASES:
    if not c["controlnets"]:
        continue
    p = pngs[c["name"]]
    d = levels(p, pngs[f"{c['model']}_base"])
    c["levels_from_base"] = round(d, 3)
    print(f"  {c['name']:12s} {d:7.2f}   ({float(((p == 0) | (p == 255)).mean()):.3f})")
    assert d > 3.0, c["name"]

d = levels(pngs["sd15_multi"], pngs["sd15_single"])
print(f"  sd15_multi vs sd15_single (the second ControlNet's share): {d:.2f}")
assert d > 3.0

# Each randomised part matters: the single-ControlNet picture with that part back at zero.
print("\nsd15_single with one part back at zero (levels from sd15_single):")
single = next(c for c in CASES if c["name"] == "sd15_single")
full = CN["sd15_a"].state_dict()
for prefix in ZERO_PREFIXES:
    ablated = ControlNetModel.from_pretrained(out / "sd15_a", dtype=torch.float32).eval()
    with torch.no_grad():
        for k, v in ablated.state_dict().items():
            if k.startswith(prefix):
                v.zero_()
    CN["_ablated"] = ablated
    d = levels(run(single, "pil", ["_ablated"])[0], pngs["sd15_single"])
    print(f"  {prefix:40s} {d:7.2f}")
    assert d > 1.0, prefix
del CN["_ablated"]

(out / "cases.json").write_text(json.dumps({
    "notes": "Paths relative to fixtures/. Written by tools/oracle/make_controlnet_fixtures.py "
             "(diffusers 0.42.1, CPU, float32). controlnet_conditioning_scale is a list for "
             "multi-ControlNet; control_guidance_start/end apply to every ControlNet. "
             "levels_from_base: mean |PNG - <model>_base PNG| in 8-bit levels.",
    "conditioning_embedding_out_channels": list(COND_CHANNELS),
    "cases": CASES,
}, indent=2) + "\n")


# --- 3. original single-file layout -----------------------------------------------------------------
RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
          ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def to_original(sd: dict, config: dict) -> dict:
    """diffusers ControlNetModel keys -> original `control_model.*` keys (inverse of diffusers'
    convert_controlnet_checkpoint for a model without class / add embeddings)."""
    rename: dict[str, str] = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "controlnet_cond_embedding.conv_in": "input_hint_block.0",
        "controlnet_cond_embedding.conv_out": "input_hint_block.14",
        "controlnet_mid_block": "middle_block_out.0",
    }
    for j in range(2 * (len(config["conditioning_embedding_out_channels"]) - 1)):
        rename[f"controlnet_cond_embedding.blocks.{j}"] = f"input_hint_block.{2 * (j + 1)}"
    i = 1
    for b, kind in enumerate(config["down_block_types"]):
        for l in range(config["layers_per_block"]):
            for new, old in RESNET:
                rename[f"down_blocks.{b}.resnets.{l}.{new}"] = f"input_blocks.{i}.0.{old}"
            rename[f"down_blocks.{b}.attentions.{l}"] = f"input_blocks.{i}.1"
            i += 1
        if b < len(config["down_block_types"]) - 1:
            rename[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
            i += 1
    for k in range(i):
        rename[f"controlnet_down_blocks.{k}"] = f"zero_convs.{k}.0"
    for r in range(2):
        for new, old in RESNET:
            rename[f"mid_block.resnets.{r}.{new}"] = f"middle_block.{2 * r}.{old}"
    rename["mid_block.attentions.0"] = "middle_block.1"

    result = {}
    for key, v in sd.items():
        # longest matching prefix (module path) wins
        best = max((p for p in rename if key.startswith(p + ".")), key=len, default=None)
        assert best is not None, f"unmapped key {key}"
        new = "control_model." + rename[best] + key[len(best):]
        assert new not in result, new
        result[new] = v.contiguous()
    return result


def write_original(name: str) -> None:
    """Writes <name>_original.safetensors and checks the round trip back to <name>'s state dict."""
    folder = out / name
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["addition_embed_type"] is None and cfg["class_embed_type"] is None
    sd_ref = load_file(folder / "diffusion_pytorch_model.safetensors")
    original = to_original(sd_ref, cfg)
    if cfg["use_linear_projection"]:
        # SD2 layout (use_linear_in_transformer): proj_in / proj_out are nn.Linear there too, 2-D
        # weights, and diffusers' converter copies them unchanged (no 1x1-conv squeeze / unsqueeze).
        projs = [k for k in original if k.endswith((".proj_in.weight", ".proj_out.weight"))]
        assert projs and all(original[k].dim() == 2 for k in projs), projs
    orig_path = out / f"{name}_original.safetensors"
    save_file(original, orig_path)

    def compare(what: str, got: dict):
        assert set(got) == set(sd_ref), (what, sorted(set(got) ^ set(sd_ref))[:10])
        worst = max(float((got[k].float() - sd_ref[k]).abs().max()) for k in sd_ref)
        shapes = all(got[k].shape == sd_ref[k].shape for k in sd_ref)
        print(f"  {what}: {len(got)} tensors, shapes equal {shapes}, max |diff| {worst}")
        assert shapes and worst == 0.0

    print(f"\n{orig_path.name}: {len(original)} tensors; round trip:")
    compare("convert_controlnet_checkpoint", convert_controlnet_checkpoint(load_file(orig_path), cfg))
    reloaded = ControlNetModel.from_single_file(str(orig_path), config=str(folder), local_files_only=True)
    compare("ControlNetModel.from_single_file", reloaded.state_dict())


write_original("sd15_a")
write_original("sd21_a")

total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
print(f"\nfixtures/controlnet: {total} bytes")
