#!/usr/bin/env python3
"""DoRA oracle fixtures: weight-decomposed LoRA (Liu et al. 2024) in the two forms files carry.

    python tools/oracle/make_dora_fixtures.py fixtures

1. PEFT/diffusers form, which diffusers 0.42.1 loads for the U-Net: peft's
   `LoraConfig(use_dora=True, init_lora_weights=False)` on the tiny SD1.5 U-Net's attention,
   feed-forward and ResNet layers (linear and 3×3 convolutions), each magnitude then scaled by a
   random factor in [0.6, 1.4] (peft starts it at ‖W + ΔW‖, where DoRA equals plain LoRA), saved
   with `save_lora_weights` (keys `unet.….lora_A.weight`, `….lora_magnitude_vector`: shape
   [out] for a linear layer, [1, out, 1, 1] for a convolution), and the picture diffusers makes
   with `load_lora_weights(file)`:
     fixtures/dora/sd15_peft_dora.safetensors, sd15_peft_dora.png
   (peft's merge: W' = m / ‖W + ΔW‖ · (W + ΔW), the norm per output row.)

2. kohya/LyCORIS form (`lora_unet_….dora_scale`, which diffusers drops): one file with
   magnitudes on the output axis ([out, 1] and [out, 1, 1, 1], what LyCORIS writes since 2025)
   and on the input axis ([1, in] and [1, in, 1, 1], older files), α at half the rank, and the
   merged updates W' − W at multipliers 1 and 0.6, computed here in LyCORIS's and A1111's
   semantics: V = W + (α/r)·up·down, W' = m / (‖V‖ + ε) · V with the norm over every axis but
   the magnitude's, and at multiplier s the weight W + s·(W' − W):
     fixtures/dora/sd15_kohya_dora.safetensors, expected_kohya_1.0.safetensors,
     expected_kohya_0.6.safetensors
"""

import sys
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

torch.set_num_threads(1)
root = Path(sys.argv[1])
out = root / "dora"
out.mkdir(parents=True, exist_ok=True)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]


def load():
    pipe = StableDiffusionPipeline.from_pretrained(root / "tiny" / "sd15", torch_dtype=torch.float32,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe):
    return pipe("a red circle", height=32, width=32, num_inference_steps=8, guidance_scale=7.5,
                generator=torch.Generator("cpu").manual_seed(1)).images[0]


# 1. PEFT form.
pipe = load()
torch.manual_seed(0)
pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, use_dora=True,
                                 target_modules=UNET_TARGETS))
g = torch.Generator().manual_seed(5)
with torch.no_grad():
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name:
            p.mul_(0.1)
        elif "lora_magnitude_vector" in name:
            p.mul_(0.6 + 0.8 * torch.rand(p.shape, generator=g))
layers = get_peft_model_state_dict(pipe.unet)
assert any("lora_magnitude_vector" in k for k in layers), list(layers)[:5]
StableDiffusionPipeline.save_lora_weights(out / "tmp", unet_lora_layers=layers, safe_serialization=True)
(out / "tmp" / "pytorch_lora_weights.safetensors").rename(out / "sd15_peft_dora.safetensors")
(out / "tmp").rmdir()
fresh = load()
fresh.load_lora_weights(out / "sd15_peft_dora.safetensors")
render(fresh).save(out / "sd15_peft_dora.png")
print("peft:", len(layers), "tensors")

# 2. kohya/LyCORIS form.
sd = load().unet.state_dict()
g = torch.Generator().manual_seed(7)


def rnd(*shape, s=0.3):
    return torch.randn(*shape, generator=g) * s


A = "down_blocks.0.attentions.0.transformer_blocks.0."
file, cases = {}, []
r, alpha = 4, 2.0
for module, axis in [(A + "attn1.to_q", "out"), (A + "attn2.to_k", "in"), (A + "ff.net.2", "out"),
                     ("down_blocks.0.resnets.0.conv1", "out"), ("mid_block.resnets.0.conv2", "in")]:
    w = sd[module + ".weight"]
    o, i = w.shape[:2]
    kernel = list(w.shape[2:])
    down, up = rnd(r, i, *kernel), rnd(o, r, *[1] * len(kernel))
    delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * (alpha / r)
    v = w + delta
    if axis == "out":
        norm = v.flatten(1).norm(dim=1).reshape(o, *[1] * (w.dim() - 1))
    else:
        norm = v.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, i, *[1] * len(kernel))
    m = norm * (0.6 + 0.8 * torch.rand(norm.shape, generator=g))
    key = "lora_unet_" + module.replace(".", "_")
    file[key + ".lora_down.weight"] = down.contiguous()
    file[key + ".lora_up.weight"] = up.contiguous()
    file[key + ".alpha"] = torch.tensor(alpha)
    file[key + ".dora_scale"] = m.contiguous()
    merged = m / (norm + torch.finfo(torch.float32).eps) * v
    cases.append((module + ".weight", w, merged))
save_file(file, out / "sd15_kohya_dora.safetensors")
for s in [1.0, 0.6]:
    save_file({k: (s * (merged - w)).contiguous() for k, w, merged in cases},
              out / f"expected_kohya_{s}.safetensors")
print("kohya:", len(file), "tensors")
