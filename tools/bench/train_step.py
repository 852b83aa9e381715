#!/usr/bin/env python3
"""One training step of the Shapes models in ldm and in PyTorch, side by side in one run.

Times a whole optimiser step — forward, backward, gradient clipping, AdamW and (for the U-Net)
the EMA update — of the same model, batch and thread count:

- the text encoder + U-Net of the embedded model's recipe (v-prediction, zero terminal SNR,
  min-SNR-γ 5 with a 0.1 floor, caption dropout, EMA 0.998), and
- the autoencoder (L1 + KL on random crops, or whole images with `--vae-crop 0`).

ldm is timed by its own trainer (`ldm train unet|vae`, which prints the median wall time of a
step); PyTorch runs the same configs (the `config.json` files ldm wrote) built by diffusers and
transformers with fresh weights, the same losses and AdamW (weight decay 0.01), and is timed the
same way (median of the steps after a warm-up). Also ldm with `--mixed-precision bf16` (bf16
products, f32 weights and optimiser) against PyTorch under bf16 autocast, which is what a
PyTorch user would reach for on a CPU with AVX512-BF16.

    python3 tools/bench/train_step.py [--steps 40] [--threads 2] [--markdown out.md]
        [--vae-args "--vae-channels 32,64,128 --latent-channels 8"] [--device cuda]

With --device cuda both train on the GPU (`ldm --device cuda train …`; PyTorch's modules and
batches on the GPU, its bf16 autocast on the GPU, each timed step ended by a synchronisation).

Prints samples per second of each and the ratio ldm / PyTorch (above 1: ldm is faster).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def torch_median(step, steps, warmup):
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def unet_step_fn(torch, folder, batch, autocast, dev="cpu"):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig.from_json_file(folder / "text_encoder" / "config.json"))
    unet = UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text()))
    text.to(dev).train()
    unet.to(dev).train()
    sched = DDPMScheduler.from_config(
        json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
    abar = sched.alphas_cumprod.float().to(dev)
    params = [p for p in list(text.parameters()) + list(unet.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01, eps=1e-8)
    ema = [p.detach().clone() for p in params]
    cfg = unet.config
    side = cfg.sample_size
    ctx_len = text.config.max_position_embeddings
    vocab = text.config.vocab_size

    def step():
        ids = torch.randint(0, vocab, (batch, ctx_len), device=dev)
        x0 = torch.randn(batch, cfg.in_channels, side, side, device=dev)
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,), device=dev)
        a = abar[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
        noisy = a * x0 + s * noise
        target = a * noise - s * x0
        snr = abar[t] / (1 - abar[t])
        w = torch.clamp(torch.minimum(snr, torch.tensor(5.0, device=dev)) / (snr + 1), min=0.1)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
            ctx = text(ids).last_hidden_state
            pred = unet(noisy, t, ctx).sample
        loss = (((pred.float() - target) ** 2).mean(dim=(1, 2, 3)) * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - 0.998)

    return step


def vae_step_fn(torch, folder, batch, crop, autocast, dev="cpu"):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(json.loads((folder / "vae" / "config.json").read_text()))
    vae.to(dev).train()
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01, eps=1e-8)
    side = crop or vae.config.sample_size

    def step():
        x = torch.rand(batch, 3, side, side, device=dev) * 2 - 1
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
        rec = (recon.float() - x).abs().mean()
        kl = posterior.kl().float().mean() * (1e-6 / (3 * side * side))
        loss = rec + kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return step


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ldm", default=str(ROOT / "target/release/ldm"))
    p.add_argument("--steps", type=int, default=40, help="timed steps of each")
    p.add_argument("--warmup", type=int, default=3, help="PyTorch steps before timing")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--unet-batch", type=int, default=16)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-crop", type=int, default=32, help="0: whole images")
    p.add_argument("--vae-args", default="", help="extra `ldm train vae` flags (architecture)")
    p.add_argument("--parts", default="unet,vae")
    p.add_argument("--no-bf16", action="store_true", help="skip PyTorch's bf16 autocast runs")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--markdown", default=None, help="also write the table here")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "unet" in parts:
            out = tmp / "unet"
            shutil.copytree(ROOT / "models" / "shapes" / "vae", out / "vae")
            b = args.unet_batch
            cmd = [args.ldm, "--device", args.device, "train", "unet", "--out", str(out), "--steps", str(args.steps + 2),
                   "--batch", str(b), "--pool", "256", "--lr", "5e-4", "--prediction", "v_prediction",
                   "--timesteps", "lognormal:0.5,1.2", "--zero-terminal-snr", "--min-snr-gamma", "5",
                   "--snr-weight-floor", "0.1", "--ema-decay", "0.998", "--shards", str(args.threads),
                   "--checkpoint-every", "1000000"]
            t_ldm = subprocess_median(cmd, env)
            t_ldm_bf = None if args.no_bf16 else subprocess_median(bf16_run(cmd, out), env)
            t_pt = torch_median(unet_step_fn(torch, out, b, False, args.device), args.steps, args.warmup)
            t_bf = None if args.no_bf16 else torch_median(
                unet_step_fn(torch, out, b, True, args.device), args.steps, args.warmup)
            rows.append(("text encoder + U-Net", b, t_ldm, t_pt, t_ldm_bf, t_bf))
        if "vae" in parts:
            out = tmp / "vae"
            b = args.vae_batch
            cmd = [args.ldm, "--device", args.device, "train", "vae", "--out", str(out), "--steps", str(args.steps + 2),
                   "--batch", str(b), "--crop", str(args.vae_crop), "--held-out", "16",
                   "--shards", str(args.threads), "--checkpoint-every", "1000000"] + args.vae_args.split()
            t_ldm = subprocess_median(cmd, env)
            t_ldm_bf = None if args.no_bf16 else subprocess_median(bf16_run(cmd, out), env)
            crop = args.vae_crop or None
            t_pt = torch_median(vae_step_fn(torch, out, b, crop, False, args.device), args.steps, args.warmup)
            t_bf = None if args.no_bf16 else torch_median(
                vae_step_fn(torch, out, b, crop, True, args.device), args.steps, args.warmup)
            side = args.vae_crop or "whole"
            rows.append((f"autoencoder ({side} px)", b, t_ldm, t_pt, t_ldm_bf, t_bf))

    lines = [
        f"Training step on {args.device} ({cpu_description()}), {args.threads} threads, median of "
        f"{args.steps} steps (torch {torch.__version__}); samples/s, ratio = ldm / PyTorch",
        "",
        "| model | batch | ldm f32 | PyTorch f32 | ratio | ldm bf16 products | PyTorch bf16 autocast "
        "| ratio (bf16) | ldm bf16 / PyTorch f32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, b, t_ldm, t_pt, t_ldm_bf, t_bf in rows:
        if t_bf and t_ldm_bf:
            bf = (f"{b / t_ldm_bf:.1f} | {b / t_bf:.1f} | {t_bf / t_ldm_bf:.2f}× "
                  f"| {t_pt / t_ldm_bf:.2f}×")
        else:
            bf = "— | — | — | —"
        lines.append(f"| {name} | {b} | {b / t_ldm:.1f} | {b / t_pt:.1f} | {t_pt / t_ldm:.2f}× | {bf} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


def bf16_run(cmd, out):
    """The same `ldm train` command with bf16 products, in a fresh output folder (a second run
    in the same one would resume the first)."""
    cmd = list(cmd)
    i = cmd.index("--out")
    fresh = Path(str(out) + "-bf16")
    if fresh.exists():
        shutil.rmtree(fresh)
    if (Path(out) / "vae").is_dir() and "unet" in cmd:
        shutil.copytree(Path(out) / "vae", fresh / "vae")
    cmd[i + 1] = str(fresh)
    return cmd + ["--mixed-precision", "bf16"]


def cpu_description():
    """The CPU's name, family/model and the features the ratios depend on (the same build is
    faster or slower than PyTorch on different CPUs, and bf16 products pay on some only)."""
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        return "CPU unknown"
    flags = set(info.get("flags", "").split())
    has = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (f"{info.get('model name', '?')}, family {info.get('cpu family', '?')} model "
            f"{info.get('model', '?')}, {' '.join(has) or 'no AVX2'}")


def subprocess_median(cmd, env):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    m = re.search(r"median step ([0-9.]+) s", out)
    if not m:
        raise SystemExit(f"no median step in the output of {' '.join(cmd)}:\n{out}")
    return float(m.group(1))


if __name__ == "__main__":
    main()
