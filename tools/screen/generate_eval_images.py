#!/usr/bin/env python3
"""Renders the public Shapes prompt lists with diffusers, for `ldm eval shapes --images OUT`.

    python3 tools/screen/generate_eval_images.py MODEL OUT GUIDANCE [SEEDS]

The folder's own scheduler, 20 steps, 64×64, SEEDS (default 2) images a prompt, image j of line i
drawn from `torch.Generator().manual_seed(1000 * j + i)`, 50 prompts a batch; writes OUT/*.png
and OUT/captions.jsonl. DEVICE=cuda runs the pipeline on a GPU.
"""

import json
import os
import sys

import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def main():
    model, out, guidance = sys.argv[1], sys.argv[2], float(sys.argv[3])
    seeds = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    tok = CLIPTokenizer.from_pretrained(os.path.join(model, "tokenizer"))
    pipe = StableDiffusionPipeline.from_pretrained(model, tokenizer=tok, safety_checker=None,
                                                   requires_safety_checker=False,
                                                   torch_dtype=torch.float32)
    pipe.to(os.environ.get("DEVICE", "cpu"))
    pipe.set_progress_bar_config(disable=True)
    os.makedirs(out, exist_ok=True)
    lines, k = [], 0
    for name in ["one-object", "two-objects"]:
        path = os.path.join(ROOT, "eval", f"shapes-{name}.txt")
        prompts = [p.strip() for p in open(path) if p.strip()]
        for first in range(0, len(prompts), 50):
            chunk = prompts[first:first + 50]
            gens = [torch.Generator().manual_seed(1000 * j + first + i)
                    for i in range(len(chunk)) for j in range(seeds)]
            images = pipe(chunk, height=64, width=64, num_inference_steps=20,
                          guidance_scale=guidance, num_images_per_prompt=seeds,
                          generator=gens).images
            for n, im in enumerate(images):
                file = f"{k:05d}.png"
                k += 1
                im.save(os.path.join(out, file))
                lines.append(json.dumps({"caption": chunk[n // seeds], "file": file}))
    with open(os.path.join(out, "captions.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
