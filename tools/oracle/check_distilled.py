#!/usr/bin/env python3
"""Checks that diffusers loads what `ldm distill` writes and renders what `ldm generate` renders.

Usage (from the repository root, with tools/oracle/requirements.txt installed and ldm built):

    python tools/oracle/check_distilled.py --ldm target/release/ldm \
        --model OUT/lcm                                   # a distilled folder
    python tools/oracle/check_distilled.py --ldm target/release/ldm \
        --model TEACHER --lora OUT/lcm-lora/pytorch_lora_weights.safetensors --lcm

Each case renders one prompt and seed in diffusers (`StableDiffusionPipeline.from_pretrained`,
float32, CPU; the folder's own scheduler, or `LCMScheduler` built from the teacher's config for
`--lcm`; `load_lora_weights` for `--lora`; `torch.Generator("cpu").manual_seed(seed)`) and with
`ldm generate` at the same steps, guidance and guidance rescale, and prints the mean and largest
per-pixel difference in 8-bit levels. Steps and guidance default to what the folder's
`_ldm_defaults` says (20 and 7.5 without). Exits non-zero if a mean difference exceeds --tolerance
(1 level).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline
from PIL import Image
from transformers import CLIPTokenizer

PROMPTS = [
    ("a red circle on a blue background", 1),
    ("a yellow square to the left of a green triangle on a black background", 2),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ldm", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--lora")
    ap.add_argument("--lcm", action="store_true", help="sample with LCMScheduler")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--guidance", type=float)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--tolerance", type=float, default=1.0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    with open(os.path.join(a.model, "model_index.json")) as f:
        defaults = json.load(f).get("_ldm_defaults", {})
    steps = a.steps or defaults.get("num_inference_steps", 20)
    guidance = a.guidance if a.guidance is not None else defaults.get("guidance_scale", 7.5)
    with open(os.path.join(a.model, "scheduler", "scheduler_config.json")) as f:
        rescale = 0.7 if json.load(f).get("rescale_betas_zero_snr") else 0.0

    tok = CLIPTokenizer.from_pretrained(os.path.join(a.model, "tokenizer"))
    pipe = StableDiffusionPipeline.from_pretrained(
        a.model, tokenizer=tok, torch_dtype=torch.float32, safety_checker=None,
        requires_safety_checker=False,
    )
    if a.lcm:
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    if a.lora:
        pipe.load_lora_weights(a.lora)
    pipe.set_progress_bar_config(disable=True)
    print(f"{a.model}: {type(pipe.scheduler).__name__}, {steps} steps, guidance {guidance}, "
          f"rescale {rescale}, time_cond_proj_dim {pipe.unet.config.time_cond_proj_dim}"
          + (f", LoRA {a.lora}" if a.lora else ""))
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for prompt, seed in PROMPTS:
            g = torch.Generator("cpu").manual_seed(seed)
            theirs = pipe(
                prompt, num_inference_steps=steps, guidance_scale=guidance,
                guidance_rescale=rescale, generator=g, height=a.size, width=a.size,
            ).images[0]
            out = os.path.join(tmp, f"{seed}.png")
            cmd = [a.ldm, "generate", prompt, "--model", a.model, "--steps", str(steps),
                   "--guidance", str(guidance), "--guidance-rescale", str(rescale),
                   "--seed", str(seed), "--width", str(a.size), "--height", str(a.size),
                   "--out", out]
            if a.lora:
                cmd += ["--lora", a.lora]
            if a.lcm:
                cmd += ["--sampler", "lcm"]
            subprocess.run(cmd, check=True, capture_output=True)
            ours = np.asarray(Image.open(out).convert("RGB"), dtype=np.float64)
            diff = np.abs(ours - np.asarray(theirs, dtype=np.float64))
            worst = max(worst, diff.mean())
            print(f"  seed {seed} `{prompt}`: mean |Δ| {diff.mean():.4f} levels, max {diff.max():.0f}")
    ok = worst <= a.tolerance
    print("PASS" if ok else "FAIL", f"(worst mean {worst:.4f} ≤ {a.tolerance})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
