#!/usr/bin/env python3
"""LCM-LoRA distillation at full SD1.5 size: `ldm distill lcm --lora RANK` beside the same
training step in PyTorch, in one run.

No SD1.5 weights can be downloaded, so the teacher is the real SD1.5 architecture
(`fixtures/configs/sd15`: U-Net, text encoder, autoencoder, PNDM/DDPM betas) with seeded random
weights, written once as a diffusers folder (about 4.3 GB in f32) with the Shapes tokenizer
(77 tokens). Both sides then take the same LCM-LoRA step, batch 1 at --size (512: 64 × 64
latents), for `--steps` timed steps after one untimed:

- ldm: `ldm distill lcm --teacher DIR --lora RANK --batch 1` (its own trainer; it prints the
  median wall time of a step). Its peak memory is the child's maximum resident set.
- PyTorch: the logic of diffusers' `examples/consistency_distillation/
  train_lcm_distill_lora_sd_wds.py` — a frozen teacher U-Net and a PEFT LoRA (r = α = RANK) on
  to_q/k/v/out.0, proj_in/out, ff, conv1/2, conv_shortcut, the samplers' convs and
  time_emb_proj of a second copy; per step: the teacher's conditional and unconditional passes,
  the guided one-step DDIM solver (k = 20), the LoRA U-Net's target pass without gradients, its
  student pass, pseudo-Huber loss (c = 0.001), backward, clipping, AdamW. Latents and prompt
  embeddings are drawn fresh (ldm encodes its scenes once, before the timed steps).

    python3 tools/bench/lcm_lora_full.py [--rank 64] [--steps 3] [--threads 2] [--size 512]
                                         [--folder DIR]

Prints seconds per step and peak memory of each, and the ratio.
"""

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
           "ff.net.2", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv",
           "upsamplers.0.conv", "time_emb_proj"]


def make_folder(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = ROOT / "fixtures/configs/sd15"
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(json.loads((cfg / "unet/config.json").read_text())) \
        .save_pretrained(folder / "unet")
    AutoencoderKL.from_config(json.loads((cfg / "vae/config.json").read_text())) \
        .save_pretrained(folder / "vae")
    CLIPTextModel(CLIPTextConfig.from_json_file(cfg / "text_encoder/config.json")) \
        .save_pretrained(folder / "text_encoder")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    shutil.copy(cfg / "scheduler/scheduler_config.json", folder / "scheduler")
    shutil.copytree(ROOT / "models/shapes/tokenizer", folder / "tokenizer")
    tok = json.loads((folder / "tokenizer/tokenizer_config.json").read_text())
    tok["model_max_length"] = 77
    (folder / "tokenizer/tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    index = json.loads((cfg / "model_index.json").read_text())
    index["safety_checker"] = [None, None]
    index["feature_extractor"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def set_size(folder: Path, size: int) -> None:
    """The image side both sides train at: the U-Net's sample_size (which only sets the default
    resolution; the architecture is unchanged), read by ldm as the scenes' size."""
    path = folder / "unet/config.json"
    config = json.loads(path.read_text())
    config["sample_size"] = size // 8
    path.write_text(json.dumps(config, indent=2))


def torch_side(folder: Path, rank: int, steps: int, threads: int, size: int) -> None:
    """Runs in its own process; prints `median SECONDS peak_kib KIB`."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    teacher = UNet2DConditionModel.from_pretrained(folder / "unet")
    teacher.requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    sched = DDPMScheduler.from_pretrained(folder / "scheduler")
    abar = sched.alphas_cumprod.float()
    skeleton = torch.arange(1, 51) * 20 - 1

    def boundary(t):
        t = t.float() * 10
        return (0.25 / (t**2 + 0.25)).view(-1, 1, 1, 1), (t / (t**2 + 0.25).sqrt()).view(-1, 1, 1, 1)

    def step():
        x0 = torch.randn(1, 4, size // 8, size // 8)
        ctx = torch.randn(1, 77, 768)
        empty = torch.randn(1, 77, 768)
        i = torch.randint(0, 50, (1,))
        t = skeleton[i]
        t_prev = (t - 20).clamp(min=0)
        a, s = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
        ap, sp = abar[t_prev].sqrt().view(-1, 1, 1, 1), (1 - abar[t_prev]).sqrt().view(-1, 1, 1, 1)
        z = a * x0 + s * torch.randn_like(x0)
        w = (torch.rand(1) * 10 + 5).view(-1, 1, 1, 1)
        with torch.no_grad():
            eps_c = teacher(z, t, ctx).sample
            eps_u = teacher(z, t, empty).sample
            x_c, x_u = (z - s * eps_c) / a, (z - s * eps_u) / a
            x = x_c + w * (x_c - x_u)
            e = eps_c + w * (eps_c - eps_u)
            z_prev = ap * x + sp * e
            eps_t = unet(z_prev, t_prev, ctx).sample
            skip, out = boundary(t_prev)
            target = skip * z_prev + out * (z_prev - sp * eps_t) / ap
        eps = unet(z, t, ctx).sample
        skip, out = boundary(t)
        pred = skip * z + out * (z - s * eps) / a
        loss = torch.mean(torch.sqrt((pred - target) ** 2 + 1e-6) - 1e-3)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"median {statistics.median(times)} peak_kib {peak}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ldm", default=str(ROOT / "target/release/ldm"))
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed steps of each")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--size", type=int, default=512, help="image side (latents: side / 8)")
    p.add_argument("--folder", default=None, help="where the random SD1.5 folder is (made if absent)")
    p.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="lcm-full-")
    folder = Path(args.folder) if args.folder else Path(tmp) / "sd15-random"
    if args.torch_only:
        torch_side(folder, args.rank, args.steps, args.threads, args.size)
        return
    try:
        if not (folder / "model_index.json").exists():
            t0 = time.perf_counter()
            make_folder(folder)
            print(f"random SD1.5 folder written in {time.perf_counter() - t0:.0f} s: {folder}")
        set_size(folder, args.size)
        env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
        out = Path(tmp) / "ldm-out"
        cmd = [args.ldm, "distill", "lcm", "--teacher", str(folder), "--out", str(out),
               "--lora", str(args.rank), "--steps", str(args.steps + 1), "--batch", "1",
               "--pool", "2", "--checkpoint-every", "1000", "--shards", "1"]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        ldm_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if r.returncode != 0:
            sys.exit(f"ldm failed (exit {r.returncode}, peak {ldm_peak / 2**20:.1f} GiB; "
                     f"-9 is the kernel's out-of-memory kill):\n{r.stderr[-3000:]}")
        m = re.search(r"median step ([0-9.]+) s", r.stdout)
        ldm_s = float(m.group(1))
        print(f"ldm: {ldm_s:.2f} s a step, peak {ldm_peak / 2**20:.1f} GiB "
              f"(whole command {time.perf_counter() - t0:.0f} s)", flush=True)
        r = subprocess.run([sys.executable, __file__, "--torch-only", "--folder", str(folder),
                            "--rank", str(args.rank), "--steps", str(args.steps),
                            "--threads", str(args.threads), "--size", str(args.size)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"PyTorch failed:\n{r.stderr[-3000:]}")
        m = re.search(r"median ([0-9.]+) peak_kib ([0-9]+)", r.stdout)
        torch_s, torch_peak = float(m.group(1)), int(m.group(2))
        print(f"PyTorch: {torch_s:.2f} s a step, peak {torch_peak / 2**20:.1f} GiB")
        print(f"\n| LCM-LoRA r={args.rank}, SD1.5, batch 1, {args.size} px | s/step | peak memory |")
        print("| --- | --- | --- |")
        print(f"| ldm | {ldm_s:.2f} | {ldm_peak / 2**20:.1f} GiB |")
        print(f"| PyTorch (diffusers' script logic) | {torch_s:.2f} | {torch_peak / 2**20:.1f} GiB |")
        print(f"| ratio (PyTorch / ldm time) | {torch_s / ldm_s:.2f}× | |")
    finally:
        if not args.folder:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
