#!/usr/bin/env python3
"""IP-Adapter oracle fixtures: a tiny CLIP image encoder, tiny random IP-Adapters in the original
tencent-ailab single-file layout, and the pictures diffusers 0.42.1 makes with them.

    python tools/oracle/make_ip_adapter_fixtures.py fixtures

Reads the tiny pipeline folders fixtures/tiny/{sd15,sdxl,sd21}/ and the reference image
fixtures/pipelines/inputs/gradient_circle_32x32.png, and writes fixtures/ip_adapter/:

1. image_encoder/ (a transformers folder: config.json, model.safetensors float32, and
   preprocessor_config.json): `CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=32,
   patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
   projection_dim=16, hidden_act="quick_gelu"))`, transformers' own init under
   `torch.manual_seed(700)`; then, with `torch.Generator().manual_seed(700)` in state_dict order,
   every LayerNorm weight becomes `1 + 0.2·randn` and every bias (LayerNorm and Linear, which CLIP
   initialises to 0) `0.1·randn`, so no tensor is trivial. 17 tokens (CLS + 4×4 patches).
   The preprocessor is `CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32,
   "width": 32})` with CLIP's defaults (bicubic, rescale 1/255, OPENAI_CLIP_MEAN/STD).

2. encoder_outputs.safetensors, for gradient_circle_32x32.png:
     pixel_values        1×3×32×32  what the CLIPImageProcessor gives
     hidden_state.0..2   1×17×32    outputs.hidden_states (0: pre_layrnorm(embeddings), i: layer i-1's output)
     penultimate         1×17×32    hidden_states[-2] (what IP-Adapter Plus uses)
     pooled              1×32       post_layernorm(last_hidden_state[:, 0])
     image_embeds        1×16       visual_projection(pooled) (what the base IP-Adapter uses)
     zero_penultimate    1×17×32    hidden_states[-2] for an all-zero pixel_values (Plus's negative)

3. IP-Adapters in the original layout that `load_ip_adapter` reads (`image_proj.*`,
   `ip_adapter.<2k+1>.to_k_ip.weight` / `.to_v_ip.weight` for the k-th cross-attention processor in
   `unet.attn_processors` order), built as diffusers modules (PyTorch default init under
   `torch.manual_seed(seed)` (seeds 711, 712, 713, 714), then with `torch.Generator().manual_seed(seed)`
   LayerNorm weights `1 + 0.2·randn`, LayerNorm biases `0.1·randn`; to_k_ip/to_v_ip are
   `nn.Linear(cross_attention_dim, hidden, bias=False)` default init drawn after the projection, in
   processor order, to_v_ip times V_GAIN 0.5) and written through the exact inverse of
   `UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers` (loaders/unet.py):
     sd15_base.safetensors  ImageProjection: image_proj.proj (16 → 4·32), image_proj.norm (32)
     sd15_plus.safetensors  IPAdapterPlusImageProjection (Resampler): embed_dims 32 (encoder width),
                            hidden_dims 16, output_dims 32, depth 4, heads 2, dim_head 64,
                            num_queries 4, ffn_ratio 4. The converter hard-codes depth 4 (the
                            constructor default), dim_head 64 (heads = to_q rows // 64) and
                            ffn_ratio 4, so only these fit.
     sdxl_base.safetensors  ImageProjection for the tiny SDXL: 16 → 4·80
     sd21_base.safetensors  ImageProjection for the tiny SD2.1 (v-prediction, DDIM, OpenCLIP-style
                            text encoder, cross_attention_dim 32, linear proj_in/out): 16 → 4·32,
                            the same image encoder (projection_dim 16)
   The script loads each file back with `pipe.load_ip_adapter(fixtures/ip_adapter, subfolder="",
   weight_name=..., image_encoder_folder="image_encoder")` and checks the U-Net's
   IPAdapterAttnProcessor2_0 weights and image projection hold exactly the tensors written. It also
   checks its own plain-torch reading of the original keys (ImageProjection, Resampler, one IP
   attention layer) against diffusers.

4. <adapter>_tokens.safetensors: what the pipeline feeds the U-Net for the picture below at
   num_images_per_prompt 1 with CFG: "image_embeds" (the projection's input, 2×1×16 or 2×1×17×32,
   negative first) and "ip_tokens" (`unet.encoder_hid_proj` output, 2×1×4×cross_attention_dim).

5. Pictures (32×32 PNG), prompt "a red circle", no negative prompt, seed 1
   (`torch.Generator("cpu").manual_seed(1)`), 8 steps, guidance 7.5 (SD1.5, SD2.1) or 5.0 (SDXL),
   the folder's own scheduler (SD1.5 PNDM, SDXL Euler, SD2.1 DDIM), `ip_adapter_image` = gradient_circle_32x32.png,
   `pipe.set_ip_adapter_scale(scale)`; `*_base` are the plain pipelines. Every case, with all its
   call arguments, is in cases.json (paths relative to fixtures/). The SD2.1 adapter and cases
   come after the others (own seed), so adding them left every earlier file byte-identical.

Checks (asserted): every IP picture is > 3 levels from its base (measured: sd15_base_ip 16.99,
sd15_base_ip_half 9.11, sd15_plus_ip 13.07, sdxl_base_ip 15.98, sd21_base_ip 28.38; saturated share stays at the base's
~0.2/0.17), and scale 1.0 vs 0.5 differ by > 1 level; scale 0 gives the base picture
exactly; the round trips above.

Deterministic: CPU, float32, one thread; two runs give identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: E402
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0  # noqa: E402
from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection  # noqa: E402
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: E402

diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

root = Path(sys.argv[1])
out = root / "ip_adapter"
out.mkdir(parents=True, exist_ok=True)

PROMPT = "a red circle"
SEED = 1
STEPS = 8
GUIDANCE = {"sd15": 7.5, "sdxl": 5.0, "sd21": 7.5}
CIRCLE = "pipelines/inputs/gradient_circle_32x32.png"

ENCODER = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, projection_dim=16, hidden_act="quick_gelu")
ENCODER_SEED = 700
PLUS = dict(hidden_dims=16, depth=4, dim_head=64, heads=2, num_queries=4, ffn_ratio=4)
# name: (model, kind, seed, V_GAIN)
ADAPTERS = {
    "sd15_base": ("sd15", "base", 711, 0.5),
    "sd15_plus": ("sd15", "plus", 712, 0.5),
    "sdxl_base": ("sdxl", "base", 713, 0.5),
    "sd21_base": ("sd21", "base", 714, 0.5),
}
SCHEDULER = {"sd15": "PNDMScheduler", "sdxl": "EulerDiscreteScheduler", "sd21": "DDIMScheduler"}

image = PIL.Image.open(root / CIRCLE).convert("RGB")


def jitter(module: torch.nn.Module, gen: torch.Generator, linear_bias: bool) -> None:
    """LayerNorm weights 1 + 0.2·randn, LayerNorm biases 0.1·randn, and (linear_bias) every other
    bias 0.1·randn; in named_modules order."""
    with torch.no_grad():
        for _, m in module.named_modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            elif linear_bias and isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))


# --- 1. + 2. image encoder ---------------------------------------------------------------------------
enc_dir = out / "image_encoder"
if enc_dir.exists():
    shutil.rmtree(enc_dir)
torch.manual_seed(ENCODER_SEED)
enc = CLIPVisionModelWithProjection(CLIPVisionConfig(**ENCODER)).eval()
jitter(enc, torch.Generator().manual_seed(ENCODER_SEED), linear_bias=True)
enc.save_pretrained(enc_dir, safe_serialization=True)
CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(enc_dir)
enc = CLIPVisionModelWithProjection.from_pretrained(enc_dir, dtype=torch.float32).eval()
fe = CLIPImageProcessor.from_pretrained(enc_dir)

pixel_values = fe(image, return_tensors="pt").pixel_values
# For a 32×32 image resize and crop do nothing: pixel = (x/255 - mean)/std per channel (RGB);
# transformers fuses it as (x - 255·mean)/(255·std), so compare to a float tolerance.
x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
mean = torch.tensor(fe.image_mean).view(1, 3, 1, 1)
std = torch.tensor(fe.image_std).view(1, 3, 1, 1)
manual = (x / 255.0 - mean) / std
print(f"pixel_values vs (x/255-mean)/std: max |diff| {float((pixel_values - manual).abs().max()):.3g}")
assert torch.allclose(pixel_values, manual, atol=1e-5)
# diffusers' fallback processor (load_ip_adapter without a feature_extractor) gives the same input.
assert torch.equal(CLIPImageProcessor(size=32, crop_size=32)(image, return_tensors="pt").pixel_values, pixel_values)

with torch.no_grad():
    o = enc(pixel_values, output_hidden_states=True)
    oz = enc(torch.zeros_like(pixel_values), output_hidden_states=True)
    vm = enc.vision_model
    h = vm.pre_layrnorm(vm.embeddings(pixel_values))
    hs = [h]
    for layer in vm.encoder.layers:
        h = layer(h, None)
        hs.append(h)
    pooled = vm.post_layernorm(h[:, 0])
assert len(o.hidden_states) == ENCODER["num_hidden_layers"] + 1
for a, b in zip(hs, o.hidden_states):
    assert torch.equal(a, b)
assert torch.equal(enc.visual_projection(pooled), o.image_embeds)
enc_out = {"pixel_values": pixel_values, "penultimate": o.hidden_states[-2], "pooled": pooled,
           "image_embeds": o.image_embeds, "zero_penultimate": oz.hidden_states[-2]}
enc_out.update({f"hidden_state.{i}": t for i, t in enumerate(o.hidden_states)})
save_file({k: v.detach().clone().contiguous() for k, v in enc_out.items()}, out / "encoder_outputs.safetensors")
print(f"image encoder: {sum(v.numel() for v in enc.state_dict().values())} parameters, image_embeds std "
      f"{float(o.image_embeds.std()):.3f}, penultimate std {float(o.hidden_states[-2].std()):.3f}")


# --- pipelines ----------------------------------------------------------------------------------------
def load(model: str):
    folder = root / "tiny" / model
    if model == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cross_attn_names(unet) -> list[str]:
    return [n for n in unet.attn_processors if not n.endswith("attn1.processor")]


# --- 3. adapters ----------------------------------------------------------------------------------------
def to_original(kind: str, proj: torch.nn.Module) -> dict[str, torch.Tensor]:
    """diffusers image projection state dict -> original `image_proj.*` keys (inverse of
    _convert_ip_adapter_image_proj_to_diffusers)."""
    sd = proj.state_dict()
    if kind == "base":
        return {"image_proj.proj.weight": sd["image_embeds.weight"], "image_proj.proj.bias": sd["image_embeds.bias"],
                "image_proj.norm.weight": sd["norm.weight"], "image_proj.norm.bias": sd["norm.bias"]}
    o = {f"image_proj.{k}": sd[k] for k in ("latents", "proj_in.weight", "proj_in.bias", "proj_out.weight",
                                            "proj_out.bias", "norm_out.weight", "norm_out.bias")}
    for i in range(PLUS["depth"]):
        d, p = f"layers.{i}.", f"image_proj.layers.{i}."
        o[p + "0.norm1.weight"] = sd[d + "ln0.weight"]
        o[p + "0.norm1.bias"] = sd[d + "ln0.bias"]
        o[p + "0.norm2.weight"] = sd[d + "ln1.weight"]
        o[p + "0.norm2.bias"] = sd[d + "ln1.bias"]
        o[p + "0.to_q.weight"] = sd[d + "attn.to_q.weight"]
        o[p + "0.to_kv.weight"] = torch.cat([sd[d + "attn.to_k.weight"], sd[d + "attn.to_v.weight"]], dim=0)
        o[p + "0.to_out.weight"] = sd[d + "attn.to_out.0.weight"]
        o[p + "1.0.weight"] = sd[d + "ff.0.weight"]
        o[p + "1.0.bias"] = sd[d + "ff.0.bias"]
        o[p + "1.1.weight"] = sd[d + "ff.1.net.0.proj.weight"]
        o[p + "1.3.weight"] = sd[d + "ff.1.net.2.weight"]
    assert len(o) == len(sd) - 2 * PLUS["depth"] + PLUS["depth"]  # to_k + to_v -> to_kv
    return o


def make_adapter(name: str):
    model, kind, seed, v_gain = ADAPTERS[name]
    unet = load(model).unet
    cross = unet.config.cross_attention_dim
    torch.manual_seed(seed)
    if kind == "base":
        proj = ImageProjection(image_embed_dim=ENCODER["projection_dim"], cross_attention_dim=cross,
                               num_image_text_embeds=4)
    else:
        proj = IPAdapterPlusImageProjection(embed_dims=ENCODER["hidden_size"], output_dims=cross, **PLUS)
    jitter(proj, torch.Generator().manual_seed(seed), linear_bias=False)
    sd = to_original(kind, proj)
    procs = {}
    for k, pname in enumerate(cross_attn_names(unet)):
        hidden = unet.get_submodule(pname[: -len(".processor")]).to_q.out_features
        kl = torch.nn.Linear(cross, hidden, bias=False)
        vl = torch.nn.Linear(cross, hidden, bias=False)
        with torch.no_grad():
            vl.weight.mul_(v_gain)
        sd[f"ip_adapter.{2 * k + 1}.to_k_ip.weight"] = kl.weight.detach().clone()
        sd[f"ip_adapter.{2 * k + 1}.to_v_ip.weight"] = vl.weight.detach().clone()
        procs[pname] = 2 * k + 1
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, out / f"{name}.safetensors")
    print(f"{name}: {len(sd)} tensors, {sum(v.numel() for v in sd.values())} parameters; "
          f"ip_adapter index -> processor: " + ", ".join(f"{i}: {n}" for n, i in procs.items()))
    return proj.eval(), procs


def with_adapter(name: str):
    model = ADAPTERS[name][0]
    pipe = load(model)
    pipe.register_modules(feature_extractor=CLIPImageProcessor.from_pretrained(enc_dir))
    pipe.load_ip_adapter(str(out), subfolder="", weight_name=f"{name}.safetensors", image_encoder_folder="image_encoder")
    return pipe


def check_loaded(name: str, pipe, proj, procs) -> None:
    sd = load_file(out / f"{name}.safetensors")
    unet = pipe.unet
    seen = 0
    for pname, p in unet.attn_processors.items():
        if pname.startswith("encoder_hid_proj."):  # the Resampler's own Attention modules (Plus)
            assert not isinstance(p, IPAdapterAttnProcessor2_0)
            continue
        if pname.endswith("attn1.processor"):
            assert not isinstance(p, IPAdapterAttnProcessor2_0)
            continue
        assert isinstance(p, IPAdapterAttnProcessor2_0), type(p)
        i = procs[pname]
        assert torch.equal(p.to_k_ip[0].weight, sd[f"ip_adapter.{i}.to_k_ip.weight"])
        assert torch.equal(p.to_v_ip[0].weight, sd[f"ip_adapter.{i}.to_v_ip.weight"])
        assert p.num_tokens == [4]
        seen += 1
    assert seen == len(procs) and 2 * seen == len([k for k in sd if k.startswith("ip_adapter.")])
    loaded = unet.encoder_hid_proj.image_projection_layers[0]
    assert type(loaded) is type(proj)
    a, b = loaded.state_dict(), proj.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = pipe.image_encoder.state_dict(), enc.state_dict()
    assert all(torch.equal(ea[k], eb[k]) for k in eb)
    assert unet.config.encoder_hid_dim_type == "ip_image_proj"


# --- plain-torch reading of the original keys ----------------------------------------------------------
def ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-5)


def mha(q, k, v, heads):
    b, nq, _ = q.shape
    q, k, v = (t.view(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    w = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
    return (w @ v).transpose(1, 2).reshape(b, nq, -1)


def ref_projection(kind: str, sd: dict, x: torch.Tensor) -> torch.Tensor:
    sd = {k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")}
    if kind == "base":  # x: B×projection_dim
        t = x @ sd["proj.weight"].T + sd["proj.bias"]
        return ln(t.reshape(x.shape[0], 4, -1), sd, "norm")
    # Resampler, x: B×17×embed_dims
    lat = sd["latents"].repeat(x.shape[0], 1, 1)
    x = x @ sd["proj_in.weight"].T + sd["proj_in.bias"]
    for i in range(PLUS["depth"]):
        p = f"layers.{i}."
        xn, ln_ = ln(x, sd, p + "0.norm1"), ln(lat, sd, p + "0.norm2")
        kv = torch.cat([xn, ln_], dim=1) @ sd[p + "0.to_kv.weight"].T
        k, v = kv.chunk(2, dim=-1)
        lat = mha(ln_ @ sd[p + "0.to_q.weight"].T, k, v, PLUS["heads"]) @ sd[p + "0.to_out.weight"].T + lat
        f = F.gelu(ln(lat, sd, p + "1.0") @ sd[p + "1.1.weight"].T) @ sd[p + "1.3.weight"].T
        lat = f + lat
    return ln(lat @ sd["proj_out.weight"].T + sd["proj_out.bias"], sd, "norm_out")


def check_attention(pipe, name: str, procs) -> None:
    """One cross-attention layer with IP tokens vs text attention + scale·(IP attention)."""
    sd = load_file(out / f"{name}.safetensors")
    unet = pipe.unet
    pname = next(iter(procs))
    attn = unet.get_submodule(pname[: -len(".processor")])
    g = torch.Generator().manual_seed(5)
    hs = torch.randn(2, 64, attn.to_q.in_features, generator=g)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    ip = torch.randn(2, 1, 4, unet.config.cross_attention_dim, generator=g)
    pipe.set_ip_adapter_scale(0.7)
    i = procs[pname]
    with torch.no_grad():
        got = attn(hs, encoder_hidden_states=(text, [ip]))
        q = attn.to_q(hs)
        t = mha(q, attn.to_k(text), attn.to_v(text), attn.heads)
        ipt = ip.reshape(2, 4, -1)
        im = mha(q, ipt @ sd[f"ip_adapter.{i}.to_k_ip.weight"].T, ipt @ sd[f"ip_adapter.{i}.to_v_ip.weight"].T, attn.heads)
        want = attn.to_out[0](t + 0.7 * im)
    pipe.set_ip_adapter_scale(1.0)
    d = float((got - want).abs().max())
    print(f"  {name}: {pname} (heads {attn.heads}) vs plain torch: max |diff| {d:.2g}")
    assert d < 1e-5


# --- 4. + 5. cases -------------------------------------------------------------------------------------
def case(name, model, adapter=None, scale=None):
    xl = model == "sdxl"
    return {
        "name": name,
        "model": model,
        "pipeline_folder": f"tiny/{model}",
        "pipeline": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
        "scheduler": SCHEDULER[model],
        "ip_adapter": f"ip_adapter/{adapter}.safetensors" if adapter else None,
        "ip_adapter_kind": ADAPTERS[adapter][1] if adapter else None,
        "image_encoder": "ip_adapter/image_encoder" if adapter else None,
        "ip_adapter_image": CIRCLE if adapter else None,
        "ip_adapter_scale": scale if adapter else None,
        "ip_tokens": f"ip_adapter/{adapter}_tokens.safetensors" if adapter else None,
        "prompt": PROMPT,
        "negative_prompt": None,
        "steps": STEPS,
        "guidance_scale": GUIDANCE[model],
        "seed": SEED,
        "num_images_per_prompt": 1,
        "width": 32,
        "height": 32,
        "image": f"ip_adapter/{name}.png",
    }


CASES = [
    case("sd15_base", "sd15"),
    case("sd15_base_ip", "sd15", "sd15_base", 1.0),
    case("sd15_base_ip_half", "sd15", "sd15_base", 0.5),
    case("sd15_plus_ip", "sd15", "sd15_plus", 1.0),
    case("sdxl_base", "sdxl"),
    case("sdxl_base_ip", "sdxl", "sdxl_base", 1.0),
    case("sd21_base", "sd21"),
    case("sd21_base_ip", "sd21", "sd21_base", 1.0),
]


def render(pipe, c: dict, scale=None):
    assert type(pipe.scheduler).__name__ == c["scheduler"], (type(pipe.scheduler).__name__, c["scheduler"])
    kw = dict(prompt=c["prompt"], negative_prompt=c["negative_prompt"], num_inference_steps=c["steps"],
              guidance_scale=c["guidance_scale"], width=c["width"], height=c["height"],
              num_images_per_prompt=c["num_images_per_prompt"],
              generator=torch.Generator("cpu").manual_seed(c["seed"]), output_type="pil")
    if c["ip_adapter"]:
        pipe.set_ip_adapter_scale(c["ip_adapter_scale"] if scale is None else scale)
        kw["ip_adapter_image"] = PIL.Image.open(root / c["ip_adapter_image"]).convert("RGB")
    with torch.no_grad():
        return pipe(**kw).images[0]


def levels(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


print("\nprocessor order (sd15):", list(load("sd15").unet.attn_processors))
print("processor order (sdxl):", list(load("sdxl").unet.attn_processors))
print("processor order (sd21):", list(load("sd21").unet.attn_processors))

pngs = {}
for m in ("sd15", "sdxl", "sd21"):
    c = next(c for c in CASES if c["name"] == f"{m}_base")
    render(load(m), c).save(root / c["image"])
    pngs[c["name"]] = np.asarray(PIL.Image.open(root / c["image"]))

print("\nadapters:")
for name, (model, kind, _, _) in ADAPTERS.items():
    proj, procs = make_adapter(name)
    pipe = with_adapter(name)
    check_loaded(name, pipe, proj, procs)
    check_attention(pipe, name, procs)
    sd = load_file(out / f"{name}.safetensors")
    with torch.no_grad():
        embeds = pipe.prepare_ip_adapter_image_embeds(image, None, torch.device("cpu"), 1, True)
        tokens = pipe.unet.encoder_hid_proj(embeds)
        src = enc_out["image_embeds"] if kind == "base" else enc_out["penultimate"]
        neg = torch.zeros_like(src) if kind == "base" else enc_out["zero_penultimate"]
        assert torch.equal(embeds[0], torch.stack([neg, src]))  # [negative, positive] × 1 image
        ref = ref_projection(kind, sd, embeds[0][:, 0])
    d = float((ref - tokens[0][:, 0]).abs().max())
    print(f"  {name}: image_embeds {tuple(embeds[0].shape)} -> ip_tokens {tuple(tokens[0].shape)}, "
          f"plain-torch projection max |diff| {d:.2g}")
    assert d < 1e-5
    save_file({"image_embeds": embeds[0].contiguous(), "ip_tokens": tokens[0].contiguous()},
              out / f"{name}_tokens.safetensors")
    for c in CASES:
        if c["ip_adapter"] == f"ip_adapter/{name}.safetensors":
            render(pipe, c).save(root / c["image"])
            pngs[c["name"]] = np.asarray(PIL.Image.open(root / c["image"]))
    d0 = levels(render(pipe, next(c for c in CASES if c["ip_adapter"] and c["ip_adapter"].endswith(f"/{name}.safetensors")),
                       scale=0.0), pngs[f"{model}_base"])
    print(f"  {name}: ip_adapter_scale 0 vs base: {d0}")
    assert d0 == 0.0

print("\nmean |difference| from the model's base picture, 8-bit levels (share of pixels at 0 or 255):")
for c in CASES:
    p = pngs[c["name"]]
    sat = float(((p == 0) | (p == 255)).mean())
    if c["ip_adapter"] is None:
        print(f"  {c['name']:18s}    base   ({sat:.3f})")
        continue
    d = levels(p, pngs[f"{c['model']}_base"])
    c["levels_from_base"] = round(d, 3)
    print(f"  {c['name']:18s} {d:7.2f}   ({sat:.3f})")
    assert d > 3.0, c["name"]
d = levels(pngs["sd15_base_ip_half"], pngs["sd15_base_ip"])
print(f"  sd15_base_ip_half vs sd15_base_ip: {d:.2f}")
assert d > 1.0

(out / "cases.json").write_text(json.dumps({
    "notes": "Paths relative to fixtures/. Written by tools/oracle/make_ip_adapter_fixtures.py "
             "(diffusers 0.42.1, transformers " + transformers.__version__ + ", CPU, float32). "
             "ip_adapter: original tencent-ailab single-file layout, loaded with "
             "pipe.load_ip_adapter('fixtures/ip_adapter', subfolder='', weight_name=<file>, "
             "image_encoder_folder='image_encoder'); pipe.set_ip_adapter_scale(ip_adapter_scale). "
             "ip_tokens: the projection's input ('image_embeds', negative then positive) and output "
             "('ip_tokens', 2x1x4xcross_attention_dim) for this case's image. "
             "encoder_outputs.safetensors: the image encoder on ip_adapter_image. "
             "levels_from_base: mean |PNG - <model>_base PNG| in 8-bit levels.",
    "image_encoder": {"config": ENCODER, "seed": ENCODER_SEED,
                      "preprocessor": {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32},
                                       "resample": 3, "rescale_factor": 1 / 255,
                                       "image_mean": list(fe.image_mean), "image_std": list(fe.image_std)},
                      "outputs": "ip_adapter/encoder_outputs.safetensors"},
    "adapters": {name: {"model": m, "kind": k, "seed": s, "v_gain": g, "num_tokens": 4,
                        **({"resampler": {"embed_dims": ENCODER["hidden_size"], **PLUS}} if k == "plus" else {})}
                 for name, (m, k, s, g) in ADAPTERS.items()},
    "cases": CASES,
}, indent=2) + "\n")

total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
print(f"\nfixtures/ip_adapter: {total} bytes")
assert total < 600_000
