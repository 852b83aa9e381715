#!/usr/bin/env python3
"""SDXL refiner oracle fixtures for the Rust `ldm` pipelines.

Usage (from the repository root, with tools/oracle/requirements.txt installed, after
tools/oracle/make_fixtures.py has written fixtures/tiny/ and
tools/oracle/make_pipeline_fixtures.py has written fixtures/pipelines/inputs/):

    python tools/oracle/make_refiner_fixtures.py fixtures
        Writes (only these files; everything else under fixtures/ is left alone):
          fixtures/tiny/sdxl_refiner/                 tiny random-weight SDXL refiner pipeline folder
                                                      (StableDiffusionXLImg2ImgPipeline.save_pretrained,
                                                      f32 safetensors; the folder is replaced)
          fixtures/pipelines/refiner_cases.json       one entry per refiner case
          fixtures/pipelines/<case>.png               pipe(...).images[0].save(...)
          fixtures/pipelines/<case>.latents.safetensors
              latents:      final (scaled) latents before VAE decode (output_type="latent")
              image:        float32 [H, W, 3] in [0, 1] (output_type="np")
              base_latents: (ensemble case only) what the base pipeline handed to the refiner
        for the cases `sdxl_refiner_img2img` and `sdxl_base_refiner_ensemble`.

    python tools/oracle/make_refiner_fixtures.py --check fixtures
        Regenerates all of the above into a temporary folder and compares it byte for
        byte with the files on disk (determinism check; writes nothing).

The refiner folder mirrors stabilityai/stable-diffusion-xl-refiner-1.0 at tiny width:
no text_encoder/tokenizer (null in model_index.json), `text_encoder_2` a
CLIPTextModelWithProjection, `requires_aesthetics_score = true`,
`force_zeros_for_empty_prompt = false`, a UNet with `addition_embed_type = "text_time"`
and 5 time ids (`projection_class_embeddings_input_dim = te2 projection_dim + 5 *
addition_time_embed_dim`, `cross_attention_dim` = te2 hidden size), the VAE weights of
fixtures/tiny/sdxl/vae (the real refiner shares the base's VAE), and the real
refiner's scheduler_config.json copied byte for byte.

Every case is a plain diffusers 0.42.1 pipeline call, CPU, float32, one torch thread,
deterministic algorithms.  See fixtures/pipelines/README.md ("Refiner cases") for the
format and what the refiner does differently from the base pipeline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# make_fixtures / make_pipeline_fixtures set the offline environment, the logging and the
# deterministic torch settings on import; their helpers are reused so that the refiner is
# built exactly like the other tiny families.
import make_fixtures as mf  # noqa: E402
import make_pipeline_fixtures as mp  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModelWithProjection  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

# =============================================================================
# The tiny refiner
# =============================================================================

REFINER = "sdxl_refiner"  # folder name under fixtures/tiny/

# Own text encoder (same vocabulary / tokenizer as tiny/sdxl's tokenizer_2), narrower than
# tiny/sdxl's text_encoder_2 (48) to keep the f32 folder small.
TE2 = dict(hidden=32, heads=4, layers=3, act="gelu", projection_dim=16)
TIME_EMBED_DIM = 8  # addition_time_embed_dim (as tiny/sdxl)
NUM_TIME_IDS = 5  # original_size (2) + crops_coords_top_left (2) + aesthetic_score (1)

# The real refiner: down [Down, CrossAttnDown, CrossAttnDown, Down], up [Up, CrossAttnUp,
# CrossAttnUp, Up], `transformer_layers_per_block` a plain int (4), attention_head_dim a
# per-level list (= number of heads), the mid block UNetMidBlock2DCrossAttn.  At two levels
# this keeps its deepest level plain (DownBlock2D last / UpBlock2D first, directly around
# the cross-attention mid block) -- the opposite of tiny/sdxl, whose first level is plain.
REFINER_UNET = dict(
    sample_size=mf.LATENT,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    transformer_layers_per_block=2,
    attention_head_dim=[2, 4],
    cross_attention_dim=TE2["hidden"],
    norm_num_groups=4,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=TE2["projection_dim"] + NUM_TIME_IDS * TIME_EMBED_DIM,
)

REAL_SCHEDULER_CONFIG = Path("configs/sdxl_refiner/scheduler/scheduler_config.json")  # relative to the fixtures root


def load_sdxl_base(tiny: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny / "sdxl"), dtype=torch.float32, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    return pipe


def load_refiner(folder: Path) -> StableDiffusionXLImg2ImgPipeline:
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(folder), dtype=torch.float32, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
            assert all(p.dtype == torch.float32 for p in m.parameters())
    return pipe


@torch.no_grad()
def path_stats(unet, te2, tok) -> dict[str, float]:
    """Relative output changes of the refiner UNet: every conditioning path must matter (>= 1e-2)."""
    ids = mf.tokenize(tok, mf.PROMPTS)
    out = te2(input_ids=ids, output_hidden_states=True)
    ehs, pooled = out.hidden_states[-2], out.text_embeds
    hw = float(mf.LATENT * mf.VAE_FACTOR)
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[hw, hw, 0.0, 0.0, 6.0]] * 2)}
    _, stats = mf.unet_refs(unet, ehs, mf.seed_of(REFINER + "/unet-ref"), added)
    # the aesthetic score alone (6.0 -> 2.5)
    g = torch.Generator().manual_seed(mf.seed_of(REFINER + "/unet-ref"))
    sample = torch.randn(1, 4, mf.LATENT, mf.LATENT, generator=g).repeat(2, 1, 1, 1)
    t = torch.tensor(500.0)
    o1 = unet(sample, t, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
    ti = added["time_ids"].clone()
    ti[:, 4] = 2.5
    o2 = unet(sample, t, encoder_hidden_states=ehs, added_cond_kwargs={**added, "time_ids": ti}).sample
    stats["aesthetic_score"] = mf.rel_l2(o1, o2)
    return stats


def build_refiner(root: Path, tiny_out: Path) -> None:
    """Builds the tiny refiner folder at tiny_out (replaced)."""
    tiny = root / "tiny"
    vocab_dir = tiny / "vocab"
    with open(vocab_dir / "vocab.json", encoding="utf-8") as f:
        vocab = json.load(f)
    base = load_sdxl_base(tiny)
    # The VAE shared with the base (bf16 on disk there: exact in f32), rebuilt from its config so
    # that the saved config carries no `_name_or_path` (it would record the path the script ran from).
    vae = AutoencoderKL.from_config({k: v for k, v in base.vae.config.items() if k != "_name_or_path"}).eval()
    vae.load_state_dict(base.vae.state_dict())

    torch.manual_seed(mf.seed_of(REFINER))
    unet = UNet2DConditionModel(**REFINER_UNET).eval()
    mf.init_weights_(unet, mf.seed_of(REFINER + "/unet"))
    cfg = mf.tiny_clip_config(
        len(vocab), TE2["hidden"], TE2["heads"], TE2["layers"], TE2["act"], eos=2, projection_dim=TE2["projection_dim"]
    )
    te2 = CLIPTextModelWithProjection(cfg).eval()
    mf.init_weights_(te2, mf.seed_of(REFINER + "/text_encoder_2"))
    assert unet.add_embedding.linear_1.in_features == te2.config.projection_dim + NUM_TIME_IDS * TIME_EMBED_DIM
    assert unet.config.cross_attention_dim == te2.config.hidden_size

    stats = path_stats(unet, te2, mf.load_tokenizer(vocab_dir, "!"))
    print(f"[{REFINER}] params: unet {mf.n_params(unet):,}  vae {mf.n_params(vae):,}  te2 {mf.n_params(te2):,}")
    print(f"[{REFINER}] relative changes: " + ", ".join(f"{k}={v:.4f}" for k, v in stats.items()))
    for k, v in stats.items():
        assert v >= 1e-2, f"{REFINER}: {k} relative change {v} < 1e-2"

    real_sched = json.loads((root / REAL_SCHEDULER_CONFIG).read_text(encoding="utf-8"))
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=te2,
        tokenizer=None,
        tokenizer_2=mf.load_tokenizer(vocab_dir, "!"),  # fresh (never called) instance, pad "!" as tiny/sdxl
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(real_sched),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    if tiny_out.exists():
        shutil.rmtree(tiny_out)
    pipe.save_pretrained(str(tiny_out), safe_serialization=True)
    # The real refiner's scheduler config, byte for byte (old file: most defaults absent).
    shutil.copyfile(root / REAL_SCHEDULER_CONFIG, tiny_out / "scheduler" / "scheduler_config.json")
    for fn in ("vocab.json", "merges.txt"):  # transformers 5 only writes tokenizer.json
        if not (tiny_out / "tokenizer_2" / fn).exists():
            shutil.copy(vocab_dir / fn, tiny_out / "tokenizer_2" / fn)
    for p in tiny_out.rglob("*"):
        if p.is_file():
            os.chmod(p, 0o644)

    # ---- checks on what was written -------------------------------------------------
    mi = json.loads((tiny_out / "model_index.json").read_text(encoding="utf-8"))
    assert mi["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert mi["text_encoder"] == [None, None] and mi["tokenizer"] == [None, None], mi
    assert mi["requires_aesthetics_score"] is True and mi["force_zeros_for_empty_prompt"] is False, mi
    assert not (tiny_out / "text_encoder").exists() and not (tiny_out / "tokenizer").exists()
    for p in sorted(tiny_out.glob("*/config.json")):
        assert "_name_or_path" not in json.loads(p.read_text(encoding="utf-8")), p
    assert (tiny_out / "vae" / "config.json").read_bytes() == (tiny / "sdxl" / "vae" / "config.json").read_bytes()
    for p in sorted(tiny_out.glob("*/*.safetensors")):
        with safe_open(str(p), "pt") as f:
            dts = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
        assert dts == {"F32"}, f"{p}: dtypes {dts}"
    with safe_open(str(tiny_out / "text_encoder_2" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in keys)
    # same tokenizer files as tiny/sdxl/tokenizer_2 (same vocabulary, same pad token)
    for p in sorted((tiny / "sdxl" / "tokenizer_2").iterdir()):
        assert (tiny_out / "tokenizer_2" / p.name).read_bytes() == p.read_bytes(), f"tokenizer_2/{p.name} differs"
    # reload: the same weights, the same config
    rp = load_refiner(tiny_out)
    assert rp.text_encoder is None and rp.tokenizer is None
    assert rp.config.requires_aesthetics_score and not rp.config.force_zeros_for_empty_prompt
    for a, b in ((rp.unet, unet), (rp.text_encoder_2, te2), (rp.vae, base.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), type(a).__name__
    eff = {k: v for k, v in rp.scheduler.config.items() if not k.startswith("_")}
    want = {k: v for k, v in EulerDiscreteScheduler.from_config(real_sched).config.items() if not k.startswith("_")}
    assert eff == want
    print(f"[{REFINER}] wrote {tiny_out}; reload check ok")


# =============================================================================
# Cases
# =============================================================================

XL_T2I, XL_I2I = mp.XL_T2I, mp.XL_I2I
IMG48 = mp.IMG48
LOAD_KWARGS = {"add_watermarker": False}  # from_pretrained kwargs (watermarking off; not installed anyway)


def case(name, steps, guidance_scale, *, width, height, init_image=None, strength=None, denoising_start=None,
         base=None, notes=""):
    return {
        "name": name,
        "model": REFINER,
        "pipeline": XL_I2I,
        "prompt": mp.PROMPT,
        "negative_prompt": None,
        "scheduler": "EulerDiscreteScheduler",
        "scheduler_overrides": {},
        "steps": steps,
        "guidance_scale": guidance_scale,
        "guidance_rescale": None,
        "seed": 0,
        "width": width,
        "height": height,
        "init_image": init_image,
        "strength": strength,
        "mask_image": None,
        "eta": None,
        "extra": {},
        "denoising_start": denoising_start,
        "denoising_end": None,
        "aesthetic_score": 6.0,
        "negative_aesthetic_score": 2.5,
        "base": base,
        "notes": notes,
    }


CASES = [
    case("sdxl_refiner_img2img", 10, 5.0, width=48, height=32, init_image=IMG48, strength=0.3,
         notes="Refiner alone on a PIL image: int(10*0.3)=3 steps (timesteps 201, 101, 1). Generator draws: "
               "1 = VAE posterior sample of the init image, 2 = noise for add_noise at t=201. 5 time ids "
               "[h, w, 0, 0, aesthetic]: cond [32,48,0,0,6.0], uncond [32,48,0,0,2.5]. "
               "force_zeros_for_empty_prompt=False: negative None -> '' encoded by text_encoder_2."),
    case("sdxl_base_refiner_ensemble", 10, 5.0, width=32, height=32, denoising_start=0.8,
         base={
             "model": "sdxl",
             "pipeline": XL_T2I,
             "prompt": mp.PROMPT,
             "negative_prompt": None,
             "scheduler": "EulerDiscreteScheduler",
             "scheduler_overrides": {},
             "steps": 10,
             "guidance_scale": 5.0,
             "width": 32,
             "height": 32,
             "denoising_end": 0.8,
             "output_type": "latent",
         },
         notes="Ensemble of expert denoisers. g = torch.Generator('cpu').manual_seed(0); "
               "lat = base(..., denoising_end=0.8, output_type='latent', generator=g).images (timesteps 901..201, "
               "8 steps; draw 1 = initial noise); then refiner(..., image=lat, denoising_start=0.8, generator=g) "
               "with the SAME generator object (timesteps 101, 1: 2 steps). The refiner neither encodes (4-channel "
               "input is taken as latents) nor adds noise (denoising_start set), so it draws nothing from g. "
               "Base uncond = zeros (force_zeros_for_empty_prompt=True), refiner uncond = encoding of ''."),
]

# =============================================================================
# Running
# =============================================================================


class UnetLog:
    def __init__(self, unet):
        self.calls: list[dict] = []
        unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        rec = {"t": float(t), "batch": int(sample.shape[0]), "channels": int(sample.shape[1]),
               "sample": sample.clone(), "encoder_hidden_states": kwargs.get("encoder_hidden_states")}
        added = kwargs.get("added_cond_kwargs")
        if added and "time_ids" in added:
            rec["time_ids"] = added["time_ids"].tolist()
            rec["text_embeds"] = added["text_embeds"]
        self.calls.append(rec)


def run_case(base, refiner, logs, c: dict, images: dict, output_type: str):
    """One full case; returns (refiner output images, base latents or None, generator states)."""
    refiner.scheduler = EulerDiscreteScheduler.from_config(refiner.scheduler.config)  # fresh scheduler per run
    g = torch.Generator("cpu").manual_seed(c["seed"])
    states = {"start": g.get_state().clone()}
    for lg in logs.values():
        lg.calls = []
    base_latents = None
    with torch.no_grad():
        if c["base"] is not None:
            b = c["base"]
            base.scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config)
            base_latents = base(
                prompt=b["prompt"], negative_prompt=b["negative_prompt"], num_inference_steps=b["steps"],
                guidance_scale=b["guidance_scale"], width=b["width"], height=b["height"],
                denoising_end=b["denoising_end"], output_type=b["output_type"], generator=g,
            ).images
            states["after_base"] = g.get_state().clone()
            image = base_latents
        else:
            image = images[c["init_image"]]
        kw = dict(prompt=c["prompt"], negative_prompt=c["negative_prompt"], num_inference_steps=c["steps"],
                  guidance_scale=c["guidance_scale"], image=image, aesthetic_score=c["aesthetic_score"],
                  negative_aesthetic_score=c["negative_aesthetic_score"])
        if c["strength"] is not None:
            kw["strength"] = c["strength"]
        if c["denoising_start"] is not None:
            kw["denoising_start"] = c["denoising_start"]
        out = refiner(**kw, generator=g, output_type=output_type).images
        states["end"] = g.get_state().clone()
    return out, base_latents, states


def sigma_of(scheduler, t: float) -> float:
    return float(scheduler.sigmas[(scheduler.timesteps == t).nonzero().item()])


def describe_calls(pipe, calls: list[dict]) -> dict:
    info = {
        "unet_calls": len(calls),
        "unet_batch": calls[0]["batch"],
        "unet_in_channels": calls[0]["channels"],
        "unet_timesteps": [r["t"] for r in calls],
        "time_ids": calls[0]["time_ids"],  # [uncond, cond]
        "cross_attention_dim": int(calls[0]["encoder_hidden_states"].shape[-1]),
        "text_embeds_dim": int(calls[0]["text_embeds"].shape[-1]),
    }
    te, ehs = calls[0]["text_embeds"], calls[0]["encoder_hidden_states"]
    info["uncond_is_zeros"] = bool((te[0] == 0).all() and (ehs[0] == 0).all())
    info["uncond_equals_cond"] = bool(torch.equal(te[0], te[1]) and torch.equal(ehs[0], ehs[1]))
    info["scheduler_config"] = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
    return info


@torch.no_grad()
def check_start(refiner, c: dict, images: dict, calls: list[dict], base_latents, states) -> dict:
    """Asserts the start latents / generator use documented in the README; returns facts for `run`."""
    sched = EulerDiscreteScheduler.from_config(refiner.scheduler.config)
    sched.set_timesteps(c["steps"])
    t0 = calls[0]["t"]
    s0 = sigma_of(sched, t0)
    first = calls[0]["sample"]
    facts = {"first_sigma": s0}
    if c["base"] is None:
        # draw 1 = posterior sample of the init image, draw 2 = noise; start = init + sigma * noise
        g = torch.Generator("cpu").manual_seed(c["seed"])
        x = refiner.image_processor.preprocess(images[c["init_image"]])
        init = refiner.vae.config.scaling_factor * refiner.vae.encode(x).latent_dist.sample(g)
        noise = torch.randn(init.shape, generator=g)
        assert torch.equal(states["end"], g.get_state()), "img2img: the generator made other draws"
        start = sched.add_noise(init, noise, torch.tensor([t0]))
        want = start / ((s0**2 + 1) ** 0.5)
        err = float((first[1] - want[0]).abs().max())
        assert err <= 1e-6 * float(want.abs().max()), f"img2img start latents differ by {err}"
        facts["generator_draws"] = ["vae_posterior_sample", "noise"]
    else:
        # base: exactly one draw (initial noise); refiner: none, and its start latents are the base's output
        g = torch.Generator("cpu").manual_seed(c["seed"])
        torch.randn(base_latents.shape, generator=g)
        assert torch.equal(states["after_base"], g.get_state()), "base made more than one draw"
        assert torch.equal(states["end"], states["after_base"]), "refiner drew from the generator"
        want = base_latents / ((s0**2 + 1) ** 0.5)
        assert torch.equal(first[0], want[0]) and torch.equal(first[1], want[0]), "refiner start != base latents"
        facts["generator_draws"] = ["base: initial_noise", "refiner: none"]
    return facts


def to_json(obj):
    return json.loads(json.dumps(obj))


def generate(root: Path, tiny_dir: Path, out: Path) -> None:
    """Renders the refiner cases from the refiner folder tiny_dir into out (a pipelines folder)."""
    images = {}
    for c in CASES:
        if c["init_image"] and c["init_image"] not in images:
            with PIL.Image.open(root / "pipelines" / c["init_image"]) as im:
                im.load()
                images[c["init_image"]] = im.copy()
    base = load_sdxl_base(root / "tiny")
    refiner = load_refiner(tiny_dir)
    logs = {"base": UnetLog(base.unet), "refiner": UnetLog(refiner.unet)}

    records = []
    for c in CASES:
        imgs, base_lat1, st = run_case(base, refiner, logs, c, images, "pil")
        calls = {k: list(v.calls) for k, v in logs.items()}
        img = imgs[0]
        assert img.size == (c["width"], c["height"]), (c["name"], img.size)
        img.save(out / f"{c['name']}.png")
        facts = check_start(refiner, c, images, calls["refiner"], base_lat1, st)

        lat, base_lat2, _ = run_case(base, refiner, logs, c, images, "latent")
        assert lat.dtype == torch.float32
        latents = lat.contiguous()
        assert [r["t"] for r in logs["refiner"].calls] == [r["t"] for r in calls["refiner"]]
        arr, base_lat3, _ = run_case(base, refiner, logs, c, images, "np")
        image = np.ascontiguousarray(arr[0].astype(np.float32))
        assert image.shape == (c["height"], c["width"], 3)

        with PIL.Image.open(out / f"{c['name']}.png") as im:
            png = np.asarray(im.convert("RGB"))
        assert np.array_equal(png, (image * 255).round().astype(np.uint8)), c["name"]
        with torch.no_grad():
            dec = refiner.vae.decode(lat / refiner.vae.config.scaling_factor, return_dict=False)[0]
        dec = (dec * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)[0].numpy()
        assert np.array_equal(dec, image), c["name"]

        tensors = {"latents": latents, "image": torch.from_numpy(image)}
        if c["base"] is not None:
            assert torch.equal(base_lat1, base_lat2) and torch.equal(base_lat1, base_lat3)
            tensors["base_latents"] = base_lat1.contiguous()
        save_file(tensors, str(out / f"{c['name']}.latents.safetensors"), metadata={"format": "pt"})

        rec = dict(c)
        rec["pipeline_init"] = None  # loaded by from_pretrained(tiny/<model>, **load_kwargs)
        rec["load_kwargs"] = LOAD_KWARGS
        run = describe_calls(refiner, calls["refiner"])
        run["latents_shape"] = list(latents.shape)
        run["vae_scaling_factor"] = float(refiner.vae.config.scaling_factor)
        run["requires_aesthetics_score"] = bool(refiner.config.requires_aesthetics_score)
        run["force_zeros_for_empty_prompt"] = bool(refiner.config.force_zeros_for_empty_prompt)
        run.update(facts)
        if c["base"] is not None:
            rec["base"] = dict(c["base"])
            rec["base"]["pipeline_init"] = None
            rec["base"]["load_kwargs"] = LOAD_KWARGS
            brun = describe_calls(base, calls["base"])
            brun["latents_shape"] = list(base_lat1.shape)
            # sigma level of the latents handed to the refiner (= the refiner's first sigma)
            brun["output_sigma"] = float(base.scheduler.sigmas[base.scheduler.step_index])
            rec["base"]["run"] = brun
        clamped = float(((image <= 0) | (image >= 1)).mean())
        run["image_mean"] = round(float(image.mean()), 4)
        run["image_std"] = round(float(image.std()), 4)
        run["fraction_clamped"] = round(clamped, 4)
        run["png_sha256"] = hashlib.sha256((out / f"{c['name']}.png").read_bytes()).hexdigest()
        rec["run"] = run
        records.append(to_json(rec))
        bt = f"  base timesteps {rec['base']['run']['unet_timesteps']}" if c["base"] else ""
        print(f"{c['name']:28s} unet {run['unet_calls']} x {run['unet_batch']} timesteps {run['unet_timesteps']}"
              f"{bt}  time_ids {run['time_ids']}  image mean {run['image_mean']:.3f} std {run['image_std']:.3f}"
              f" clamped {clamped:.3f}", flush=True)

    body = ",\n".join("  " + json.dumps(r, ensure_ascii=False) for r in records)
    (out / "refiner_cases.json").write_text("[\n" + body + "\n]\n", encoding="utf-8")
    for name in output_names():
        os.chmod(out / name, 0o644)


def output_names() -> list[str]:
    """The files this script owns in fixtures/pipelines/."""
    names = ["refiner_cases.json"]
    for c in CASES:
        names += [f"{c['name']}.png", f"{c['name']}.latents.safetensors"]
    return names


def tree_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temp folder and compare with the files on disk")
    ap.add_argument("root", type=Path, help="fixtures root (contains tiny/ and pipelines/)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    root: Path = args.root
    tiny_dest, pipe_dest = root / "tiny" / REFINER, root / "pipelines"
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            t_tiny, t_pipes = Path(tmp) / REFINER, Path(tmp) / "pipelines"
            t_pipes.mkdir()
            build_refiner(root, t_tiny)
            generate(root, t_tiny, t_pipes)
            new = {f"tiny/{REFINER}/{k}": v for k, v in tree_bytes(t_tiny).items()}
            new.update({f"pipelines/{k}": v for k, v in tree_bytes(t_pipes).items()})
        old = {f"tiny/{REFINER}/{k}": v for k, v in tree_bytes(tiny_dest).items()} if tiny_dest.exists() else {}
        old.update({f"pipelines/{n}": (pipe_dest / n).read_bytes() for n in output_names() if (pipe_dest / n).exists()})
        bad = sorted(k for k in set(new) | set(old) if new.get(k) != old.get(k))
        for k in bad:
            print("differs:", k)
        print("check:", "OK" if not bad else f"{len(bad)} file(s) differ", f"({len(new)} files)")
        sys.exit(1 if bad else 0)

    build_refiner(root, tiny_dest)
    generate(root, tiny_dest, pipe_dest)
    size = sum(len(b) for b in tree_bytes(tiny_dest).values())
    size += sum((pipe_dest / n).stat().st_size for n in output_names())
    print(f"wrote {tiny_dest} and {len(output_names())} files in {pipe_dest} ({size:,} bytes in all)")


if __name__ == "__main__":
    main()
