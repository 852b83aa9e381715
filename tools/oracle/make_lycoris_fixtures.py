#!/usr/bin/env python3
"""LyCORIS oracle fixtures: a kohya-named file with one layer of each adapter kind on the tiny
SD1.5 U-Net, the weight updates LyCORIS/ComfyUI semantics give them (computed here with
torch.einsum and torch.kron, independently of ldm), and the picture of the pipeline with the
updates merged (diffusers cannot load these files).

    python tools/oracle/make_lycoris_fixtures.py fixtures

Writes fixtures/lycoris/{sd15_lycoris.safetensors, expected.safetensors, sd15_merged.png}.
The picture: the tiny SD1.5 pipeline, its own scheduler, "a red circle", 32×32, 8 steps,
guidance 7.5, seed 1, with every update added at multiplier 1.
"""

import sys
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

torch.set_num_threads(1)
root = Path(sys.argv[1])
out = root / "lycoris"
out.mkdir(parents=True, exist_ok=True)
pipe = StableDiffusionPipeline.from_pretrained(root / "tiny" / "sd15", torch_dtype=torch.float32,
                                               safety_checker=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
sd = pipe.unet.state_dict()
g = torch.Generator("cpu").manual_seed(11)


def rnd(*shape, s=0.3):
    return torch.randn(*shape, generator=g) * s


def tucker(t, b, a):
    return torch.einsum("i j k l, j r, i p -> p r k l", t, b, a)


A = "down_blocks.0.attentions.0.transformer_blocks.0.attn1."
file, expected = {}, {}


def put(module, tensors, alpha=None):
    key = "lora_unet_" + module.replace(".", "_")
    for k, v in tensors.items():
        file[f"{key}.{k}"] = v.contiguous()
    if alpha is not None:
        file[f"{key}.alpha"] = torch.tensor(float(alpha))


# LoHa on a linear layer: (w1a w1b) ⊙ (w2a w2b), α/rank.
w = sd[A + "to_q.weight"]
o, i = w.shape
r = 2
t = {"hada_w1_a": rnd(o, r), "hada_w1_b": rnd(r, i), "hada_w2_a": rnd(o, r), "hada_w2_b": rnd(r, i)}
put(A + "to_q", t, alpha=1.0)
expected[A + "to_q.weight"] = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (1.0 / r)

# LoHa, Tucker form, on a 3x3 convolution.
m = "down_blocks.0.resnets.0.conv1"
o, i, k, _ = sd[m + ".weight"].shape
t = {"hada_t1": rnd(r, r, k, k), "hada_w1_a": rnd(r, o), "hada_w1_b": rnd(r, i),
     "hada_t2": rnd(r, r, k, k), "hada_w2_a": rnd(r, o), "hada_w2_b": rnd(r, i)}
put(m, t, alpha=4.0)
expected[m + ".weight"] = (tucker(t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
                           * tucker(t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])) * (4.0 / r)

# LoHa without Tucker on a 3x3 convolution (w1b flattened).
m = "mid_block.resnets.0.conv1"
o, i, k, _ = sd[m + ".weight"].shape
t = {"hada_w1_a": rnd(o, r), "hada_w1_b": rnd(r, i * k * k), "hada_w2_a": rnd(o, r), "hada_w2_b": rnd(r, i * k * k)}
put(m, t, alpha=1.0)
expected[m + ".weight"] = ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(o, i, k, k) * 0.5

# LoKr: w1 full, w2 factored, α/rank(w2).
w = sd[A + "to_k.weight"]
o, i = w.shape
o1, i1 = 2, 2
o2, i2 = o // o1, i // i1
t = {"lokr_w1": rnd(o1, i1), "lokr_w2_a": rnd(o2, r), "lokr_w2_b": rnd(r, i2)}
put(A + "to_k", t, alpha=1.0)
expected[A + "to_k.weight"] = torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * (1.0 / r)

# LoKr with both factors full: scale 1 whatever α says.
t = {"lokr_w1": rnd(o1, i1), "lokr_w2": rnd(o2, i2)}
put(A + "to_v", t, alpha=7.0)
expected[A + "to_v.weight"] = torch.kron(t["lokr_w1"], t["lokr_w2"])

# LoKr on a convolution with a Tucker second factor.
m = "down_blocks.0.resnets.0.conv2"
o, i, k, _ = sd[m + ".weight"].shape
o2, i2 = o // o1, i // i1
t = {"lokr_w1_a": rnd(o1, 1), "lokr_w1_b": rnd(1, i1), "lokr_t2": rnd(r, r, k, k),
     "lokr_w2_a": rnd(r, o2), "lokr_w2_b": rnd(r, i2)}
put(m, t, alpha=1.0)
w2 = tucker(t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"]).contiguous()
w1 = (t["lokr_w1_a"] @ t["lokr_w1_b"]).unsqueeze(2).unsqueeze(2).contiguous()
expected[m + ".weight"] = torch.kron(w1, w2) * (1.0 / r)

# LoCon with lora_mid (Tucker) on a 3x3 convolution.
m = "up_blocks.1.resnets.0.conv1"
o, i, k, _ = sd[m + ".weight"].shape
t = {"lora_down.weight": rnd(r, i, 1, 1), "lora_mid.weight": rnd(r, r, k, k), "lora_up.weight": rnd(o, r, 1, 1)}
put(m, t, alpha=1.0)
# ComfyUI: mm(down^T, mid^T) reshaped [in, r, k, k], transposed to [r, in, k, k]; then up @ it.
down = torch.mm(t["lora_down.weight"].transpose(0, 1).flatten(1),
                t["lora_mid.weight"].transpose(0, 1).flatten(1)).reshape(i, r, k, k).transpose(0, 1)
expected[m + ".weight"] = (t["lora_up.weight"].flatten(1) @ down.flatten(1)).reshape(o, i, k, k) * (1.0 / r)

# A full update of a weight and its bias.
m = "down_blocks.0.attentions.0.proj_in"
t = {"diff": rnd(*sd[m + ".weight"].shape), "diff_b": rnd(*sd[m + ".bias"].shape)}
put(m, t)
expected[m + ".weight"] = t["diff"]
expected[m + ".bias"] = t["diff_b"]

save_file(file, out / "sd15_lycoris.safetensors")
save_file({k: v.contiguous() for k, v in expected.items()}, out / "expected.safetensors")

with torch.no_grad():
    for k, d in expected.items():
        sd[k] += d
pipe.unet.load_state_dict(sd)
image = pipe("a red circle", height=32, width=32, num_inference_steps=8, guidance_scale=7.5,
             generator=torch.Generator("cpu").manual_seed(1)).images[0]
image.save(out / "sd15_merged.png")
print("wrote", out, len(file), "tensors")
