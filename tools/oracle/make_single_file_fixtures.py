#!/usr/bin/env python3
"""Single-file (original CompVis / Stability layout) checkpoints of the tiny pipelines.

Usage (from the repository root, with tools/oracle/requirements.txt installed, after
tools/oracle/make_fixtures.py has written fixtures/tiny/):

    python tools/oracle/make_single_file_fixtures.py fixtures
        Writes (only these files; everything else under fixtures/ is left alone):
          fixtures/single_file/sd15.safetensors          <- fixtures/tiny/sd15          (F32)
          fixtures/single_file/sd15_inpaint.safetensors  <- fixtures/tiny/sd15_inpaint  (F32)
          fixtures/single_file/sd21.safetensors          <- fixtures/tiny/sd21          (F16)
          fixtures/single_file/sdxl.safetensors          <- fixtures/tiny/sdxl          (BF16)
          fixtures/single_file/sd15.ckpt                 same state dict as sd15.safetensors,
                                                         torch.save({"state_dict": sd, "global_step": 0})
          fixtures/single_file/malicious.ckpt            a .ckpt whose pickle calls os.system
                                                         (NEVER torch.load / unpickle it)
        then re-loads every file except malicious.ckpt with diffusers'
        `<Pipeline>.from_single_file(path, config=<tiny folder>, local_files_only=True)`
        and checks that every weight equals the tiny folder's, bit for bit.

    python tools/oracle/make_single_file_fixtures.py --check fixtures
        Regenerates everything into a temporary folder, compares it byte for byte with
        fixtures/single_file/ and runs the from_single_file verification on the files on
        disk (writes nothing).

    python tools/oracle/make_single_file_fixtures.py --verify-only fixtures
        Only the from_single_file verification of the files on disk.

Key layout
----------
The state dicts follow the key mapping of diffusers' reverse converters
`scripts/convert_diffusers_to_original_stable_diffusion.py` and
`scripts/convert_diffusers_to_original_sdxl.py` (huggingface/diffusers on GitHub), but are
computed from the model configs instead of the converters' hard-coded block counts (those
assume the full-size 4-level SD / 3-level SDXL UNet with 2 layers per block and a 4-level
VAE; the tiny models have 2 UNet levels, 1 or 2 layers per block and a 3-level VAE):

  UNet  -> model.diffusion_model.{time_embed.{0,2}, label_emb.0.{0,2} (SDXL),
           input_blocks.N.{0,1}, input_blocks.N.0.op (downsample), middle_block.{0,1,2},
           output_blocks.N.{0,1,2} (upsample = .1.conv without / .2.conv with attention),
           out.{0,2}}; resnets use in_layers.{0,2} / emb_layers.1 / out_layers.{0,3} /
           skip_connection, transformer internals keep their diffusers names.
  VAE   -> first_stage_model.{encoder,decoder}.{down.i.block.j, down.i.downsample,
           up.(n-1-i).block.j, up.(n-1-i).upsample, mid.block_{1,2}, mid.attn_1.{norm,q,k,v,
           proj_out}, norm_out, conv_in, conv_out}, quant_conv, post_quant_conv; resnet
           shortcut `nin_shortcut`; attention q/k/v/proj_out weights are 1x1 convs [C,C,1,1].
  CLIP (OpenAI, SD1 / SDXL encoder 1) -> the transformers key names under
           cond_stage_model.transformer.text_model.* / conditioner.embedders.0.transformer.text_model.*
  OpenCLIP (SD2 / SDXL encoder 2) -> cond_stage_model.model.* / conditioner.embedders.1.model.*:
           token_embedding.weight, positional_embedding, transformer.resblocks.N.{ln_1, ln_2,
           attn.in_proj_{weight,bias} (= cat(q, k, v) along dim 0), attn.out_proj, mlp.c_fc,
           mlp.c_proj}, ln_final, text_projection ([hidden, proj] = Linear weight transposed).

Keys with no diffusers counterpart, added because real checkpoints carry them (a loader
must skip them): the twelve DDPM schedule buffers that ldm's DDPM.register_schedule
registers (`betas`, `alphas_cumprod`, ..., `posterior_mean_coef2`; float32 [1000], computed
from the folder's scheduler config exactly as ldm does: float64 numpy, then float32) for
SD1/SD2; `denoiser.sigmas` (float32 [1000], sgm's DiscreteDenoiser buffer) for SDXL;
CLIP `embeddings.position_ids` (int64 [1, 77]); OpenCLIP `logit_scale` (0-d, ln 100) and,
for SD2, the unused `text_projection` ([hidden, hidden], random).

Model weights are stored in the tiny folder's own dtype (unchanged bits); the extra
buffers are float32 (position_ids int64) whatever the weight dtype, as in ldm/sgm.
See fixtures/README.md, "Single-file checkpoints".
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import math
import os
import pickle
import pickletools
import re
import shutil
import struct
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

FAMILIES = {
    # name: (pipeline class name, kind)
    "sd15": ("StableDiffusionPipeline", "sd1"),
    "sd15_inpaint": ("StableDiffusionInpaintPipeline", "sd1"),
    "sd21": ("StableDiffusionPipeline", "sd2"),
    "sdxl": ("StableDiffusionXLPipeline", "sdxl"),
}

# ldm.models.diffusion.ddpm.DDPM.register_schedule, in registration order.
DDPM_BUFFERS = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
]

# Fixed value written over the random `.data/serialization_id` record of torch.save, so
# that the .ckpt files are reproducible (torch draws a new 40-digit id on every save).
SERIALIZATION_ID = b"0000000000000000000000000000000000000001"

# OpenCLIP's trained logit scale saturates at ln(100); the value is irrelevant to SD.
LOGIT_SCALE = math.log(100.0)


# ---------------------------------------------------------------------------------------
# loading the tiny folders
# ---------------------------------------------------------------------------------------


def load_component(folder: Path, sub: str) -> dict[str, torch.Tensor]:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        p = folder / sub / name
        if p.exists():
            return load_file(str(p))
    raise FileNotFoundError(f"no safetensors weights in {folder / sub}")


def load_config(folder: Path, sub: str) -> dict:
    name = "scheduler_config.json" if sub == "scheduler" else "config.json"
    return json.loads((folder / sub / name).read_text())


# ---------------------------------------------------------------------------------------
# UNet: diffusers -> ldm (openaimodel.UNetModel)
# ---------------------------------------------------------------------------------------

UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL (addition_embed_type "text_time")
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _unet_resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head not in UNET_RESNET:
        raise KeyError(f"unknown UNet resnet parameter {rest!r}")
    return f"{UNET_RESNET[head]}.{tail}"


def unet_key(key: str, cfg: dict) -> str:
    """ldm name of one diffusers UNet2DConditionModel key."""
    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError("only UNetMidBlock2DCrossAttn is mapped")
    per = cfg["layers_per_block"]
    if not isinstance(per, int):
        raise ValueError("per-block layers_per_block is not mapped")
    stride = per + 1  # ldm blocks per level: `per` resnets (+attn) and one down/upsample slot
    up_attn = ["CrossAttn" in t for t in cfg["up_block_types"]]

    head, _, param = key.rpartition(".")
    if head in UNET_TOP:
        return f"{UNET_TOP[head]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{1 + i * stride + j}.0.{_unet_resnet(rest)}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{1 + i * stride + j}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
        i = int(m[1])
        return f"input_blocks.{(i + 1) * stride}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_unet_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{i * stride + j}.0.{_unet_resnet(rest)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{i * stride + j}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
        i = int(m[1])
        # the upsampler sits in the level's last output block, after the resnet (.0) and,
        # when the level has attention, after the transformer (.1)
        return f"output_blocks.{i * stride + per}.{2 if up_attn[i] else 1}.conv.{m[2]}"
    raise KeyError(f"unmapped UNet key {key!r}")


# ---------------------------------------------------------------------------------------
# VAE: diffusers AutoencoderKL -> ldm AutoencoderKL
# ---------------------------------------------------------------------------------------

VAE_ATTN = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    # deprecated names written by old diffusers (not in the tiny folders)
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}


def _vae_resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head not in ("norm1", "conv1", "norm2", "conv2", "conv_shortcut"):
        raise KeyError(f"unknown VAE resnet parameter {rest!r}")
    return f"{'nin_shortcut' if head == 'conv_shortcut' else head}.{tail}"


def vae_key(key: str, cfg: dict) -> tuple[str, bool]:
    """(ldm name, is a Linear weight that becomes a 1x1 conv) of one diffusers VAE key."""
    n = len(cfg["up_block_types"])
    head, _, param = key.rpartition(".")
    if head in ("quant_conv", "post_quant_conv") or re.fullmatch(r"(encoder|decoder)\.conv_(in|out)", head):
        return key, False
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out", head):
        return f"{m[1]}.norm_out.{param}", False
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}", False
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", False
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        # ldm numbers the decoder levels by resolution (up.0 = full size, applied last);
        # diffusers numbers them in execution order -> reversed
        return f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}", False
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}", False
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet(m[3])}", False
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        if m[2] not in VAE_ATTN:
            raise KeyError(f"unknown VAE attention parameter {key!r}")
        new = VAE_ATTN[m[2]]
        return f"{m[1]}.mid.attn_1.{new}.{m[3]}", (new != "norm" and m[3] == "weight")
    raise KeyError(f"unmapped VAE key {key!r}")


# ---------------------------------------------------------------------------------------
# text encoders
# ---------------------------------------------------------------------------------------


def clip_hf_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel keys with the `text_model.` prefix (the released layout;
    transformers 5 writes them without it)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("text_model.") or k == "text_projection.weight":
            out[k] = v
        else:
            out["text_model." + k] = v
    return out


OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def openclip_from_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel(WithProjection) state dict -> open_clip text tower."""
    sd = clip_hf_keys(sd)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for k, v in sd.items():
        if k == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif k == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = v  # a bare Parameter in open_clip: no `.weight`
        elif k.startswith("text_model.final_layer_norm."):
            out["ln_final." + k.rsplit(".", 1)[1]] = v
        elif k == "text_projection.weight":
            # nn.Linear weight [proj, hidden]; open_clip uses `x @ text_projection` -> [hidden, proj]
            out["text_projection"] = v.t().contiguous()
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k):
            qkv[(int(m[1]), m[3])][m[2]] = v
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k):
            if m[2] not in OPENCLIP_LAYER:
                raise KeyError(f"unmapped text encoder key {k!r}")
            out[f"transformer.resblocks.{m[1]}.{OPENCLIP_LAYER[m[2]]}.{m[3]}"] = v
        else:
            raise KeyError(f"unmapped text encoder key {k!r}")
    for (layer, param), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"layer {layer}: incomplete q/k/v {param}")
        # nn.MultiheadAttention packs the input projections as one [3*hidden, hidden] matrix
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


# ---------------------------------------------------------------------------------------
# schedule buffers
# ---------------------------------------------------------------------------------------


def _ldm_betas(sched: dict) -> np.ndarray:
    n = sched["num_train_timesteps"]
    if sched.get("trained_betas") is not None:
        return np.asarray(sched["trained_betas"], dtype=np.float64)
    s, e = sched["beta_start"], sched["beta_end"]
    if sched["beta_schedule"] == "scaled_linear":  # ldm "linear"
        return (torch.linspace(s**0.5, e**0.5, n, dtype=torch.float64) ** 2).numpy()
    if sched["beta_schedule"] == "linear":  # ldm "sqrt_linear"
        return torch.linspace(s, e, n, dtype=torch.float64).numpy()
    raise ValueError(f"beta_schedule {sched['beta_schedule']!r} not mapped")


def ddpm_buffers(sched: dict) -> dict[str, torch.Tensor]:
    """ldm.models.diffusion.ddpm.DDPM.register_schedule (v_posterior = 0)."""
    betas = _ldm_betas(sched)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)

    def f32(x):
        return torch.tensor(x, dtype=torch.float32)

    vals = {
        "betas": f32(betas),
        "alphas_cumprod": f32(ac),
        "alphas_cumprod_prev": f32(ac_prev),
        "sqrt_alphas_cumprod": f32(np.sqrt(ac)),
        "sqrt_one_minus_alphas_cumprod": f32(np.sqrt(1.0 - ac)),
        "log_one_minus_alphas_cumprod": f32(np.log(1.0 - ac)),
        "sqrt_recip_alphas_cumprod": f32(np.sqrt(1.0 / ac)),
        "sqrt_recipm1_alphas_cumprod": f32(np.sqrt(1.0 / ac - 1)),
        "posterior_variance": f32(post_var),
        "posterior_log_variance_clipped": f32(np.log(np.maximum(post_var, 1e-20))),
        "posterior_mean_coef1": f32(betas * np.sqrt(ac_prev) / (1.0 - ac)),
        "posterior_mean_coef2": f32((1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)),
    }
    assert list(vals) == DDPM_BUFFERS
    return vals


def sgm_sigmas(sched: dict) -> torch.Tensor:
    """sgm DiscreteDenoiser.sigmas with LegacyDDPMDiscretization (ascending, float32)."""
    ac = np.cumprod(1.0 - _ldm_betas(sched), axis=0)
    return torch.tensor((1 - ac) / ac, dtype=torch.float32) ** 0.5


# ---------------------------------------------------------------------------------------
# building the single-file state dicts
# ---------------------------------------------------------------------------------------


def build_state_dict(folder: Path, kind: str) -> tuple[collections.OrderedDict, torch.dtype]:
    unet = load_component(folder, "unet")
    dtype = next(iter(unet.values())).dtype
    out: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()

    def put(k, v):
        assert k not in out, k
        out[k] = v.detach().contiguous().clone()  # own storage, offset 0 (matters for .ckpt)

    ucfg = load_config(folder, "unet")
    for k, v in unet.items():
        put("model.diffusion_model." + unet_key(k, ucfg), v)

    vcfg = load_config(folder, "vae")
    for k, v in load_component(folder, "vae").items():
        new, conv = vae_key(k, vcfg)
        put("first_stage_model." + new, v.reshape(*v.shape, 1, 1) if conv else v)

    sched = load_config(folder, "scheduler")
    gen = torch.Generator().manual_seed(20240611)
    pos_ids = lambda n: torch.arange(n, dtype=torch.int64)[None]  # noqa: E731

    if kind == "sd1":
        te = clip_hf_keys(load_component(folder, "text_encoder"))
        for k, v in te.items():
            put("cond_stage_model.transformer." + k, v)
        n = te["text_model.embeddings.position_embedding.weight"].shape[0]
        put("cond_stage_model.transformer.text_model.embeddings.position_ids", pos_ids(n))
    elif kind == "sd2":
        te = openclip_from_hf(load_component(folder, "text_encoder"))
        for k, v in te.items():
            put("cond_stage_model.model." + k, v)
        hidden = te["token_embedding.weight"].shape[1]
        # FrozenOpenCLIPEmbedder keeps the whole open_clip text tower; SD2 never uses these
        w = torch.randn(hidden, hidden, generator=gen, dtype=torch.float32) / math.sqrt(hidden)
        put("cond_stage_model.model.text_projection", w.to(dtype))
        put("cond_stage_model.model.logit_scale", torch.tensor(LOGIT_SCALE, dtype=dtype))
    elif kind == "sdxl":
        te = clip_hf_keys(load_component(folder, "text_encoder"))
        for k, v in te.items():
            put("conditioner.embedders.0.transformer." + k, v)
        n = te["text_model.embeddings.position_embedding.weight"].shape[0]
        put("conditioner.embedders.0.transformer.text_model.embeddings.position_ids", pos_ids(n))
        te2 = openclip_from_hf(load_component(folder, "text_encoder_2"))
        for k, v in te2.items():
            put("conditioner.embedders.1.model." + k, v)
        put("conditioner.embedders.1.model.logit_scale", torch.tensor(LOGIT_SCALE, dtype=dtype))
    else:
        raise ValueError(kind)

    if kind == "sdxl":
        put("denoiser.sigmas", sgm_sigmas(sched))
    else:
        for k, v in ddpm_buffers(sched).items():
            put(k, v)
    return out, dtype


# ---------------------------------------------------------------------------------------
# .ckpt writing
# ---------------------------------------------------------------------------------------


def _fix_serialization_id(path: Path) -> None:
    """Overwrite torch.save's random `<root>/.data/serialization_id` record in place (same
    length, stored uncompressed; CRC-32 updated in the local and central headers)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        infos = [i for i in z.infolist() if i.filename.endswith("/.data/serialization_id")]
        assert len(infos) == 1
        info = infos[0]
        assert info.compress_type == zipfile.ZIP_STORED and info.file_size == len(SERIALIZATION_ID)
    off = info.header_offset
    assert data[off : off + 4] == b"PK\x03\x04"
    name_len, extra_len = struct.unpack_from("<HH", data, off + 26)
    start = off + 30 + name_len + extra_len
    data[start : start + len(SERIALIZATION_ID)] = SERIALIZATION_ID
    crc = zlib.crc32(SERIALIZATION_ID) & 0xFFFFFFFF
    flags, local_crc = struct.unpack_from("<H", data, off + 6)[0], struct.unpack_from("<I", data, off + 14)[0]
    if flags & 0x8:
        # torch writes CRC 0 in the local header and the real CRC in a data descriptor
        # (PK\x07\x08, crc, sizes) right after the data
        dd = start + len(SERIALIZATION_ID)
        assert data[dd : dd + 4] == b"PK\x07\x08"
        struct.pack_into("<I", data, dd + 4, crc)
        assert local_crc == 0
    else:
        struct.pack_into("<I", data, off + 14, crc)
    # central directory entry of the same file
    name = info.filename.encode()
    cd = 0
    while True:
        cd = data.index(b"PK\x01\x02", cd)
        n_len = struct.unpack_from("<H", data, cd + 28)[0]
        if bytes(data[cd + 46 : cd + 46 + n_len]) == name:
            struct.pack_into("<I", data, cd + 16, crc)
            break
        cd += 4
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None


def write_ckpt(sd: collections.OrderedDict, path: Path) -> None:
    # torch.save to a *path*: the zip's root folder is the file stem ("sd15/"), as opposed
    # to "archive/" for a file object (Lightning-written checkpoints)
    torch.save({"state_dict": sd, "global_step": 0}, str(path))
    _fix_serialization_id(path)


class _Pwn:
    """Pickles as a call to os.system (`posix.system` on Linux). Never unpickle the result."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def write_malicious_ckpt(path: Path) -> None:
    sd = collections.OrderedDict()
    sd["model.diffusion_model.input_blocks.0.0.bias"] = torch.zeros(2)
    buf = io.BytesIO()  # file object -> root folder "archive/" (the other variant)
    torch.save({"state_dict": sd, "global_step": 0, "callbacks": _Pwn()}, buf)
    path.write_bytes(buf.getvalue())
    _fix_serialization_id(path)


def pickle_globals(path: Path) -> tuple[str, list[str], list[str]]:
    """(root folder, ordered unique GLOBALs of data.pkl, zip member names), read with
    pickletools (parses opcodes only; nothing is executed)."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl")]
        assert len(pkl) == 1
        root = pkl[0].split("/")[0]
        data = z.read(pkl[0])
    globs: list[str] = []
    strings: list[str] = []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            g = arg.replace(" ", ".")
        elif op.name == "STACK_GLOBAL":
            g = ".".join(strings[-2:])
        else:
            if isinstance(arg, str):
                strings.append(arg)
            continue
        if g not in globs:
            globs.append(g)
    return root, globs, names


# ---------------------------------------------------------------------------------------
# verification with diffusers.from_single_file
# ---------------------------------------------------------------------------------------


def verify(path: Path, folder: Path, pipeline_name: str) -> str:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    cls = getattr(diffusers, pipeline_name)
    pipe = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    ref = cls.from_pretrained(str(folder), local_files_only=True)
    comps = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if pipeline_name.startswith("StableDiffusionXL") else [])
    n = 0
    for c in comps:
        a, b = getattr(pipe, c).state_dict(), getattr(ref, c).state_dict()
        if set(a) != set(b):
            raise AssertionError(f"{path.name} {c}: key sets differ: {sorted(set(a) ^ set(b))[:10]}")
        for k in a:
            x, y = a[k], b[k]
            if x.shape != y.shape:
                raise AssertionError(f"{path.name} {c}.{k}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
            # compare in float64: the folder dtype (f32/f16/bf16) round-trips exactly
            if not torch.equal(x.double(), y.double()):
                raise AssertionError(f"{path.name} {c}.{k}: values differ")
            n += 1
        # the raw folder files, too (in case from_pretrained and from_single_file agreed on
        # something other than the stored bits)
        raw = load_component(folder, c)
        assert len(raw) == len(a), (c, len(raw), len(a))
        for kk, vv in raw.items():
            key = next(x for x in (kk, kk.removeprefix("text_model."), "text_model." + kk) if x in a)
            if vv.dtype != a[key].dtype and pipe.dtype == vv.dtype:
                raise AssertionError(f"{path.name} {c}.{key}: dtype {a[key].dtype} vs {vv.dtype}")
            if not torch.equal(a[key].double(), vv.double()):
                raise AssertionError(f"{path.name} {c}.{key}: differs from the folder file")
    for c in ["tokenizer", "scheduler"]:
        assert type(getattr(pipe, c)) is type(getattr(ref, c)), c
    return f"{path.name}: {pipeline_name}.from_single_file OK, {n} tensors equal to {folder.name}/"


# ---------------------------------------------------------------------------------------


def generate(out_root: Path, tiny: Path) -> dict:
    dest = out_root / "single_file"
    dest.mkdir(parents=True, exist_ok=True)
    info = {}
    for name, (_, kind) in FAMILIES.items():
        sd, dtype = build_state_dict(tiny / name, kind)
        save_file(dict(sd), str(dest / f"{name}.safetensors"), metadata={"format": "pt"})
        info[name] = (len(sd), str(dtype).removeprefix("torch."))
        if name == "sd15":
            write_ckpt(sd, dest / "sd15.ckpt")
    write_malicious_ckpt(dest / "malicious.ckpt")
    write_small_ckpt(dest)
    return info


def write_small_ckpt(dest: Path) -> None:
    """small.ckpt: a few tensors of several dtypes (a state_dict), with the same tensors in
    small.safetensors, for testing a .ckpt reader without a whole model (sd15.ckpt is written
    too, but not committed: it is 0.86 MB)."""
    g = torch.Generator().manual_seed(5)
    sd = collections.OrderedDict(
        a=torch.randn(2, 3, generator=g),
        b=torch.randn(4, generator=g).half(),
        c=torch.arange(5),
        d=torch.randn(3, 2, generator=g).bfloat16(),
    )
    write_ckpt(sd, dest / "small.ckpt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dest / "small.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fixtures", type=Path)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true")
    g.add_argument("--verify-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tiny = args.fixtures / "tiny"
    dest = args.fixtures / "single_file"

    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp), tiny)
            new = sorted(p.name for p in (Path(tmp) / "single_file").iterdir())
            old = sorted(p.name for p in dest.iterdir())
            assert new == old, (new, old)
            for n in new:
                same = (Path(tmp) / "single_file" / n).read_bytes() == (dest / n).read_bytes()
                print(f"{n}: {'identical' if same else 'DIFFERS'}")
                assert same, n
    elif not args.verify_only:
        info = generate(args.fixtures, tiny)
        for name, (count, dtype) in info.items():
            print(f"{name}.safetensors: {count} tensors, weights {dtype}")

    for name, (pipeline, _) in FAMILIES.items():
        print(verify(dest / f"{name}.safetensors", tiny / name, pipeline))
    print(verify(dest / "sd15.ckpt", tiny / "sd15", FAMILIES["sd15"][0]))
    for f in ("sd15.ckpt", "malicious.ckpt"):
        root, globs, names = pickle_globals(dest / f)
        print(f"{f}: root {root}/, globals {globs}")
    total = sum(p.stat().st_size for p in dest.iterdir())
    for p in sorted(dest.iterdir()):
        print(f"  {p.name:28s} {p.stat().st_size:>9,d} bytes")
    print(f"  total {total:,d} bytes")


if __name__ == "__main__":
    main()
