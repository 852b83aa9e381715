#!/usr/bin/env python3
"""The README's grid of the embedded model's pictures: prompts down, seeds across.

    python3 tools/shapes_grid.py [--ldm target/release/ldm] [--model shapes] [--seeds 4]
        [--scale 2] [--out docs/images/shapes-grid.png]

Each picture is `ldm generate PROMPT --model MODEL --seed S` at the model's own defaults;
the grid is written atomically (needs Pillow).
"""

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a red circle on a blue background",
    "a large yellow square on the left on a black background",
    "a small green triangle at the top",
    "a white diamond above a purple circle",
    "a blue square to the right of an orange triangle on a white background",
]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ldm", default=str(ROOT / "target/release/ldm"))
    p.add_argument("--model", default="shapes")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--scale", type=int, default=2)
    p.add_argument("--gap", type=int, default=4)
    p.add_argument("--out", default=str(ROOT / "docs/images/shapes-grid.png"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for i, prompt in enumerate(PROMPTS):
            row = []
            for seed in range(1, args.seeds + 1):
                png = Path(tmp) / f"{i}-{seed}.png"
                subprocess.run([args.ldm, "generate", prompt, "--model", args.model, "--seed", str(seed),
                                "--out", str(png)], check=True, capture_output=True)
                img = Image.open(png).convert("RGB")
                row.append(img.resize((img.width * args.scale, img.height * args.scale), Image.NEAREST))
            rows.append(row)
        w, h = rows[0][0].size
        g = args.gap
        grid = Image.new("RGB", (args.seeds * (w + g) - g, len(rows) * (h + g) - g), (255, 255, 255))
        for r, row in enumerate(rows):
            for c, img in enumerate(row):
                grid.paste(img, (c * (w + g), r * (h + g)))
        out = Path(args.out)
        tmp_out = out.with_suffix(".tmp.png")
        grid.save(tmp_out)
        os.replace(tmp_out, out)
        print(f"{out}: {len(rows)} prompts × {args.seeds} seeds")


if __name__ == "__main__":
    main()
