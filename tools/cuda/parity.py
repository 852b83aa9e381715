#!/usr/bin/env python3
"""Image parity of `ldm generate` on two devices, and against diffusers' own pictures.

Renders pipeline fixtures (fixtures/pipelines/cases.json: tiny SD1.5, SD2.1 and SDXL models,
txt2img, img2img and inpainting, with diffusers' PNG beside each; and a ControlNet, a
T2I-Adapter, an IP-Adapter Plus and an SDXL LoRA from their fixtures) with the same `ldm` binary on
`--device cpu` and on `--device cuda` (f32 unless --dtype), and prints for each case the mean
absolute difference in 8-bit levels and the share of values off by more than 2 — cuda against
cpu, and each against diffusers' image. The bar (issue 26): mean |Δ| ≤ 1 level in f32.

    python3 tools/cuda/parity.py --ldm target/cuda/release/ldm [--devices cpu,cuda] [--json F]

Needs numpy and Pillow. Exits 1 when any case misses the bar between the two devices.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures" / "pipelines"

# Cases and the sampler flag that names their diffusers scheduler (none: the folder's own).
CASES = {
    "sd15_pndm": [],
    "sd15_euler": ["--sampler", "euler"],
    "sd15_dpmpp_2m_karras": ["--sampler", "DPM++ 2M Karras"],
    "sd21_ddim": [],
    "sdxl_euler": [],
    "sd15_img2img_euler": ["--sampler", "euler"],
    "sd15_inpaint4_ddim": ["--sampler", "ddim"],
}


def args_for(case, out, device, dtype):
    model = ROOT / "fixtures" / "tiny" / case["model"]
    cmd = ["--device", device, "generate", case["prompt"], "--model", str(model),
           "--steps", str(case["steps"]), "--guidance", str(case["guidance_scale"]),
           "--seed", str(case["seed"]), "--width", str(case["width"]), "--height", str(case["height"]),
           "--dtype", dtype, "--out", str(out)]
    if case.get("negative_prompt") is not None:
        cmd += ["--negative", case["negative_prompt"]]
    if case.get("init_image"):
        cmd += ["--init-image", str(FIXTURES / case["init_image"])]
        if case.get("strength") is not None:
            cmd += ["--strength", str(case["strength"])]
    if case.get("mask_image"):
        cmd += ["--mask", str(FIXTURES / case["mask_image"])]
    if case.get("eta") is not None:
        cmd += ["--eta", str(case["eta"])]
    return cmd + CASES[case["name"]]


# Adapter cases (their own fixtures): (name, diffusers' picture, model, extra flags); all
# "a red circle", 8 steps, seed 1, 32×32, the model's own scheduler and guidance.
def adapter_cases():
    f = lambda p: str(ROOT / "fixtures" / p)
    circle = f("pipelines/inputs/gradient_circle_32x32.png")
    return [
        ("controlnet_sd15", "controlnet/sd15_single.png", "sd15",
         ["--controlnet", f("controlnet/sd15_a"), "--control-image", circle]),
        ("t2i_adapter_sd15", "t2i_adapter/sd15_full.png", "sd15",
         ["--t2i-adapter", f("t2i_adapter/sd15_full"), "--adapter-image", circle]),
        ("ip_adapter_plus_sd15", "ip_adapter/sd15_plus_ip.png", "sd15",
         ["--ip-adapter", f("ip_adapter/sd15_plus.safetensors"), "--image-encoder",
          f("ip_adapter/image_encoder"), "--ip-image", circle]),
        ("lora_sdxl", "lora/sdxl_peft.png", "sdxl",
         ["--lora", f("lora/sdxl_peft.safetensors") + ":0.7", "--guidance", "5"]),
    ]


def adapter_args(model, extra, out, device, dtype):
    return ["--device", device, "generate", "a red circle", "--model", str(ROOT / "fixtures" / "tiny" / model),
            "--steps", "8", "--seed", "1", "--width", "32", "--height", "32", "--dtype", dtype,
            "--out", str(out)] + extra


def levels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def compare(a, b):
    d = np.abs(a - b)
    return {"mean": float(d.mean()), "over2": float((d > 2).mean() * 100)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ldm", default=str(ROOT / "target" / "cuda" / "release" / "ldm"))
    p.add_argument("--devices", default="cpu,cuda")
    p.add_argument("--dtype", default="f32")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    first, second = args.devices.split(",")
    cases = {c["name"]: c for c in json.loads((FIXTURES / "cases.json").read_text())}
    rows, failed = [], False
    print(f"| case | {second} vs {first}: mean |Δ| | > 2 levels | {first} vs diffusers | {second} vs diffusers |")
    print("| --- | --- | --- | --- | --- |")
    runs = [(name, FIXTURES / f"{name}.png",
             lambda out, device, c=cases[name]: args_for(c, out, device, args.dtype)) for name in CASES]
    runs += [(name, ROOT / "fixtures" / png,
              lambda out, device, m=model, e=extra: adapter_args(m, e, out, device, args.dtype))
             for name, png, model, extra in adapter_cases()]
    with tempfile.TemporaryDirectory() as tmp:
        for name, png, make_args in runs:
            images = {}
            for i, device in enumerate((first, second)):
                out = Path(tmp) / f"{name}-{i}-{device}.png"
                proc = subprocess.run([args.ldm] + make_args(out, device),
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{name} on {device} failed:\n{proc.stderr}", file=sys.stderr)
                    failed = True
                    break
                images[i] = levels(out)
            if len(images) < 2:
                continue
            reference = levels(png)
            between = compare(images[0], images[1])
            row = {"case": name, "between": between,
                   "first_vs_diffusers": compare(images[0], reference),
                   "second_vs_diffusers": compare(images[1], reference)}
            rows.append(row)
            failed |= between["mean"] > 1.0
            print(f"| {name} | {between['mean']:.3f} | {between['over2']:.2f} % | "
                  f"{row['first_vs_diffusers']['mean']:.3f} | {row['second_vs_diffusers']['mean']:.3f} |",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    sys.exit(1 if failed or not rows else 0)


if __name__ == "__main__":
    main()
