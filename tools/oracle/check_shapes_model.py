#!/usr/bin/env python3
"""Checks that diffusers loads the model `ldm train shapes` writes, and records its images.

Usage (from the repository root, with tools/oracle/requirements.txt installed):

    python tools/oracle/check_shapes_model.py models/shapes fixtures/shapes

Loads the folder with `StableDiffusionPipeline.from_pretrained` (float32, CPU, one thread),
tokenizes the Shapes prompts with transformers' `CLIPTokenizer` from vocab.json + merges.txt,
and renders a few prompts with the folder's own scheduler (`EulerDiscreteScheduler`),
`generator=torch.Generator("cpu").manual_seed(seed)`. Writes <out>/cases.json and one PNG per
case; the Rust test `crates/ldm-pipeline/tests/shapes_model.rs` renders the same cases with
`ldm`'s pipeline and compares. Also checks that the tokenizer gives our ids.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

CASES = [
    {"name": "red_circle_blue", "prompt": "a red circle on a blue background", "seed": 1, "steps": 20, "guidance": 5.0},
    {"name": "two_objects", "prompt": "a yellow square to the left of a green triangle on a black background", "seed": 2, "steps": 20, "guidance": 5.0},
    {"name": "negative", "prompt": "a large white diamond at the top", "negative": "a small diamond", "seed": 3, "steps": 10, "guidance": 3.0},
]


def main() -> None:
    model, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    os.makedirs(out, exist_ok=True)
    tok = CLIPTokenizer.from_pretrained(os.path.join(model, "tokenizer"))
    pipe = StableDiffusionPipeline.from_pretrained(
        model, tokenizer=tok, torch_dtype=torch.float32, safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    ids = tok("a large red circle on the left on a blue background").input_ids
    cases = []
    for c in CASES:
        g = torch.Generator("cpu").manual_seed(c["seed"])
        img = pipe(
            c["prompt"], negative_prompt=c.get("negative"), num_inference_steps=c["steps"],
            guidance_scale=c["guidance"], generator=g, height=64, width=64,
        ).images[0]
        img.save(os.path.join(out, c["name"] + ".png"))
        cases.append(c)
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump({"cases": cases, "token_ids": ids}, f, indent=1)
    print("diffusers loaded", model, "and wrote", len(cases), "cases; ids", ids)


if __name__ == "__main__":
    main()
