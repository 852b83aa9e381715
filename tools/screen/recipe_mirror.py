#!/usr/bin/env python3
"""A PyTorch mirror of `ldm train unet`'s Shapes recipe, for screening recipe ideas quickly.

Not the recipe (that is Rust: `ldm train shapes`); a stand-in that runs the same step about 2.3×
faster on our 2-core CPU, so that ideas can be compared at a few thousand steps before one is
built into the Rust trainer. It mirrors: v-prediction on SD's scaled-linear schedule rescaled to
zero terminal SNR, timesteps with ln σ ~ N(mean, 1.2), min-SNR-γ weighting as a v-space weight
with a 0.1 floor, caption dropout 0.1, AdamW (weight decay 0.01) with 100 warm-up steps and a
cosine decay to a tenth, gradient clipping at 1, EMA with a warm-up of its decay. It starts from a trained model folder for
its autoencoder, tokenizer, scheduler and configs (`--base`, e.g. `models/shapes`), takes
scenes from `ldm data shapes --out DATA`, and writes a diffusers folder `ldm` and diffusers load.

    ldm data shapes --count 12800 --size 64 --out /tmp/sw
    python3 tools/screen/recipe_mirror.py --base models/shapes --data /tmp/sw --out /tmp/A \\
        --steps 1500 [--unet '{"addition_embed_type": null}'] [--lr 1e-3] [--min-snr 0]
    python3 tools/screen/generate_eval_images.py /tmp/A /tmp/A_g75 7.5
    ldm eval shapes --images /tmp/A_g75

On a lent GPU, `--device cuda` (with `DEVICE=cuda` for generate_eval_images.py) runs the same
recipe; `--deadline SECONDS` stops early and saves what it has, so that a screen fits a lease.
On an H200 one process took 0.07 s a step (Python-bound, batch 16 or 64 alike), eight at once
0.084 s each.
"""

import argparse
import json
import math
import os
import shutil
import time

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def encode_pool(base, data, pool, tok, dev):
    vae = AutoencoderKL.from_pretrained(os.path.join(base, "vae"), torch_dtype=torch.float32).to(dev)
    lines = [json.loads(l) for l in open(os.path.join(data, "captions.jsonl"))][:pool]
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(lines), 256):
            x = np.stack([np.array(Image.open(os.path.join(data, c["file"])).convert("RGB"))
                          for c in lines[i:i + 256]])
            x = torch.tensor(x).permute(0, 3, 1, 2).float().to(dev) / 127.5 - 1
            d = vae.encode(x).latent_dist
            means.append(d.mean)
            stds.append(d.std)
    ids = tok([c["caption"] for c in lines], padding="max_length",
              max_length=tok.model_max_length, return_tensors="pt").input_ids.to(dev)
    return torch.cat(means), torch.cat(stds), ids, vae.config.scaling_factor


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--pool", type=int, default=12800)
    ap.add_argument("--mean", type=float, default=0.5, help="mean of ln σ")
    ap.add_argument("--min-snr", type=float, default=5.0, help="γ; 0 for the unweighted v loss")
    ap.add_argument("--floor", type=float, default=0.1, help="floor under the min-SNR weight")
    ap.add_argument("--unet", default="{}", help="JSON overriding unet/config.json")
    ap.add_argument("--text", default="{}", help="JSON overriding text_encoder/config.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (screening on a lent GPU)")
    ap.add_argument("--deadline", type=float, default=0,
                    help="seconds of training after which to stop and save early (0: none)")
    ap.add_argument("--save-at", default="",
                    help="comma-separated steps at which to also write the EMA weights to OUT-STEP")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    tok = CLIPTokenizer.from_pretrained(os.path.join(a.base, "tokenizer"))
    dev = torch.device(a.device)
    means, stds, all_ids, scaling = encode_pool(a.base, a.data, a.pool, tok, dev)
    empty = tok([""], padding="max_length", max_length=tok.model_max_length,
                return_tensors="pt").input_ids[0].to(dev)
    ucfg = json.load(open(os.path.join(a.base, "unet", "config.json")))
    ucfg.update(json.loads(a.unet))
    tcfg = json.load(open(os.path.join(a.base, "text_encoder", "config.json")))
    tcfg.update(json.loads(a.text))
    unet = UNet2DConditionModel.from_config(ucfg).to(dev)
    text = CLIPTextModel(CLIPTextConfig(**tcfg)).to(dev)
    params = list(text.parameters()) + list(unet.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01, fused=dev.type == "cuda")
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", rescale_betas_zero_snr=True)
    abar = sched.alphas_cumprod.double().to(dev)
    log_sigma = torch.log(((1 - abar) / abar).sqrt())
    save_at = {int(x) for x in a.save_at.split(",") if x}
    g = torch.Generator(dev).manual_seed(a.seed)
    start, losses = time.time(), []
    for step in range(a.steps):
        pick = torch.randint(0, len(means), (a.batch,), generator=g, device=dev)
        x0 = (means[pick] + stds[pick] * torch.randn(means[pick].shape, generator=g, device=dev)) * scaling
        ids = all_ids[pick].clone()
        ids[torch.rand(a.batch, generator=g, device=dev) < 0.1] = empty
        sigma = torch.exp(a.mean + 1.2 * torch.randn(a.batch, generator=g, dtype=torch.float64,
                                                  device=dev))
        t = (log_sigma[None, :] - sigma.log()[:, None]).abs().argmin(1)
        ab = abar[t].float().view(-1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=g, device=dev)
        noisy = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        v = ab.sqrt() * noise - (1 - ab).sqrt() * x0
        if a.min_snr > 0:
            snr = abar[t] / (1 - abar[t])
            w = (snr.clamp(max=a.min_snr) / (snr + 1)).clamp(min=a.floor)
            w = torch.nan_to_num(w, nan=a.floor).float()
        else:
            w = torch.ones(a.batch, device=dev)
        pred = unet(noisy, t, text(ids).last_hidden_state).sample
        loss = (((pred - v) ** 2).mean((1, 2, 3)) * w).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if step < 100:
            lr = a.lr * (step + 1) / 100
        else:
            p = (step - 100) / max(1, a.steps - 100)
            lr = a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        decay = min(a.ema, (1 + step) / (10 + step))  # the Rust EMA's warm-up
        with torch.no_grad():
            torch._foreach_mul_(ema, decay)
            torch._foreach_add_(ema, [p.detach() for p in params], alpha=1 - decay)
        losses.append(loss.detach())
        if (step + 1) % 100 == 0:
            mean = torch.stack(losses[-100:]).mean().item()
            print(f"{step + 1} loss {mean:.4f} "
                  f"{(time.time() - start) / (step + 1):.3f} s/step", flush=True)
            if a.deadline and time.time() - start > a.deadline:
                print(f"deadline: stopping after {step + 1} steps", flush=True)
                break
        if step + 1 in save_at and step + 1 < a.steps:
            save(a, unet, text, params, ema, f"{a.out}-{step + 1}")
    save(a, unet, text, params, ema, a.out)


def save(a, unet, text, params, ema, out):
    """Writes a diffusers folder with the EMA weights, leaving the training weights as they were."""
    with torch.no_grad():
        live = [p.detach().clone() for p in params]
        for e, p in zip(ema, params):
            p.copy_(e)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    for d in ["vae", "tokenizer", "scheduler"]:
        shutil.copytree(os.path.join(a.base, d), os.path.join(out, d))
    shutil.copy(os.path.join(a.base, "model_index.json"), out)
    unet.save_pretrained(os.path.join(out, "unet"))
    text.save_pretrained(os.path.join(out, "text_encoder"))
    with torch.no_grad():
        for v, p in zip(live, params):
            p.copy_(v)


if __name__ == "__main__":
    main()
