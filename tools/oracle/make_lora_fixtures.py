#!/usr/bin/env python3
"""LoRA oracle fixtures: U-Net and text-encoder LoRA files in diffusers/PEFT and kohya naming,
and the pictures diffusers makes with them (`pipe.load_lora_weights`).

    python tools/oracle/make_lora_fixtures.py fixtures

For the tiny SD1.5, SDXL and SD2.1 pipelines (fixtures/tiny/{sd15,sdxl,sd21}; SD2.1: v-prediction,
DDIM, an OpenCLIP-style text encoder as transformers' CLIPTextModel with gelu, the same module
names as SD1.5's, so the same targets fit), with diffusers 0.42.1 and
peft on the CPU in float32, one thread: PEFT adapters with random A and B
(`init_lora_weights=False`, seeded) on the U-Net's attention, feed-forward and ResNet layers
and on every text encoder's attention and MLP layers, then

  fixtures/lora/<model>_peft.safetensors    `save_lora_weights` (diffusers/PEFT keys
                                            `unet.…lora_A.weight`, `text_encoder.…` with the
                                            attention in the old `lora_linear_layer` naming,
                                            `text_encoder_2.…`; no alphas: scale 1)
  fixtures/lora/<model>_kohya.safetensors   `convert_state_dict_to_kohya` of the same
                                            (`lora_unet_…`, `lora_te1_…`, `lora_te2_…`), with
                                            every `.alpha` set to half the rank (scale ½), and
                                            for SD1.5 and SD2.1 the text encoder renamed
                                            `lora_te_` as kohya's SD1/SD2 files name it
  fixtures/lora/<model>_<kind>.png          the pipeline's own scheduler, "a red circle", 32×32,
                                            8 steps, guidance 7.5 (SDXL 5.0), seed 1, after
                                            `load_lora_weights(file)` (SDXL: the PEFT file only,
                                            at `cross_attention_kwargs={"scale": 0.7}`, the
                                            multiplier; SD1.5 and SD2.1: both files, scale 1)
  fixtures/lora/<model>_base.png            the same without a LoRA
"""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

torch.set_num_threads(1)
root = Path(sys.argv[1])
out = root / "lora"
out.mkdir(parents=True, exist_ok=True)

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "time_emb_proj"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def load(model):
    cls = StableDiffusionXLPipeline if model == "sdxl" else StableDiffusionPipeline
    kwargs = {} if model == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(root / "tiny" / model, torch_dtype=torch.float32, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, model, **kw):
    return pipe("a red circle", height=32, width=32, num_inference_steps=8,
                guidance_scale=5.0 if model == "sdxl" else 7.5,
                generator=torch.Generator("cpu").manual_seed(1), **kw).images[0]


# SD2.1 last, so the earlier models' files stay as they were (each model reseeds anyway).
for model in ["sd15", "sdxl", "sd21"]:
    pipe = load(model)
    render(pipe, model).save(out / f"{model}_base.png")
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=UNET_TARGETS))
    encoders = ["text_encoder"] + (["text_encoder_2"] if model == "sdxl" else [])
    for name in encoders:
        # peft's own injection: transformers' add_adapter wants a newer peft than the pinned one.
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                           target_modules=TE_TARGETS), getattr(pipe, name))
    # Keep the updates moderate: B at a tenth of peft's random start.
    for net in [pipe.unet] + [getattr(pipe, n) for n in encoders]:
        with torch.no_grad():
            for pname, p in net.named_parameters():
                if "lora_B" in pname:
                    p.mul_(0.1)
    # The U-Net's layers in PEFT naming: `convert_state_dict_to_diffusers` would give its
    # attention the old `….lora.down` names, which diffusers 0.42.1 then drops without a word
    # when it loads the file. The text encoders keep the conversion (their attention in the old
    # `lora_linear_layer` names, which diffusers loads).
    layers = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet)}
    for name in encoders:
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(getattr(pipe, name)))
    type(pipe).save_lora_weights(out / f"{model}_tmp", **layers, safe_serialization=True)
    peft_file = out / f"{model}_peft.safetensors"
    (out / f"{model}_tmp" / "pytorch_lora_weights.safetensors").rename(peft_file)
    (out / f"{model}_tmp").rmdir()

    # kohya's converter takes PEFT keys; text-encoder modules get the `text_model.` prefix their
    # paths had before transformers 5 (what kohya files in the wild carry).
    peft_keys = {f"unet.{k}": v for k, v in get_peft_model_state_dict(pipe.unet).items()}
    for name in encoders:
        for k, v in get_peft_model_state_dict(getattr(pipe, name)).items():
            tower = k if k.startswith("text_model.") else f"text_model.{k}"
            peft_keys[f"{name}.{tower}"] = v
    kohya = convert_state_dict_to_kohya(peft_keys)
    for k in list(kohya):
        if k.endswith(".alpha"):
            kohya[k] = torch.tensor(2.0)  # rank 4: scale 0.5
    if model in ("sd15", "sd21"):
        kohya = {k.replace("lora_te1_", "lora_te_"): v for k, v in kohya.items()}
    save_file({k: v.contiguous() for k, v in kohya.items()}, out / f"{model}_kohya.safetensors")

    # diffusers 0.42.1 with transformers 5 loads no kohya text-encoder LoRA for SDXL (its
    # converted `text_encoder_2.text_model.…` paths match no module), so SDXL is checked with
    # the PEFT file alone, at multiplier 0.7.
    # SD2.1 loads both (its single text encoder is `lora_te_` like SD1.5's).
    for kind in ["peft", "kohya"] if model in ("sd15", "sd21") else ["peft"]:
        fresh = load(model)
        fresh.load_lora_weights(out / f"{model}_{kind}.safetensors")
        for name in encoders:
            assert any("lora" in n for n, _ in getattr(fresh, name).named_parameters()), (model, kind, name)
        kw = {"cross_attention_kwargs": {"scale": 0.7}} if model == "sdxl" else {}
        render(fresh, model, **kw).save(out / f"{model}_{kind}.png")
        d = np.abs(np.asarray(Image.open(out / f"{model}_{kind}.png"), dtype=np.float64)
                   - np.asarray(Image.open(out / f"{model}_base.png"), dtype=np.float64)).mean()
        print(f"{model}_{kind}: mean |difference| from {model}_base {d:.2f} levels")
        assert d > 3.0, (model, kind, d)
    print("wrote", model, len(kohya), "kohya tensors")
