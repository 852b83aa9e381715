#!/usr/bin/env python3
"""Numerical oracle for the `ldm` Rust crates: builds the committed test fixtures.

diffusers / transformers are the reference implementation.  This script builds
seeded random-weight models in the exact Stable Diffusion architectures (at
tiny widths) and writes them, together with reference outputs, under
`fixtures/`.  Everything is deterministic (fixed seeds, CPU, float32 maths).

Usage (from the repository root, with tools/oracle/requirements.txt installed):

    python tools/oracle/make_fixtures.py fixtures
        Writes everything below under ./fixtures (existing generated
        sub-folders are replaced):
          fixtures/configs/<model>/...        real full-size configs of
                                              SD1.5, SD2.1, SDXL base, SDXL refiner
          fixtures/structure/<model>/<c>.txt  `name<TAB>shape` of every state-dict
                                              entry of the full-size components
                                              (built on the meta device)
          fixtures/tiny/vocab/                the small CLIP BPE vocabulary
          fixtures/tiny/<family>/             tiny diffusers pipeline folders
                                              (sd15, sd21, sdxl, sd15_inpaint)
                                              + reference.safetensors
          fixtures/tiny/tokenizer_cases.json  tokenizer ids for awkward strings
        and then reloads every tiny pipeline from disk and re-checks the
        references.  See fixtures/README.md for the meaning of every file/key.

    python tools/oracle/make_fixtures.py --full-size sd15 OUTDIR
        Writes a full-size SD1.5 diffusers folder with random weights and the
        real shapes (StableDiffusionPipeline.save_pretrained, safetensors, f32;
        about 4.3 GB; the tokenizer is the small fixture vocabulary).  Not meant
        to be committed.

Only CPU is used.  Runtime for the fixtures is well under a minute.
"""

from __future__ import annotations

import argparse
import collections
import html
import json
import math
import os
import shutil
import unicodedata
import zlib
from pathlib import Path

import regex
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
torch.use_deterministic_algorithms(True)

MAX_LEN = 77  # CLIP context length

# =============================================================================
# Real full-size configs (as shipped in the Hugging Face repositories).
# =============================================================================

_VAE_4 = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

REAL_CONFIGS: dict[str, dict[str, dict]] = {
    # runwayml/stable-diffusion-v1-5
    "sd15": {
        "model_index.json": {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.6.0",
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
            "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
        "unet/config.json": {
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": "0.6.0",
            "act_fn": "silu",
            "attention_head_dim": 8,
            "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": False,
            "cross_attention_dim": 768,
            "down_block_types": [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ],
            "downsample_padding": 1,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": 2,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-05,
            "norm_num_groups": 32,
            "out_channels": 4,
            "sample_size": 64,
            "up_block_types": [
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ],
        },
        "vae/config.json": {
            "_class_name": "AutoencoderKL",
            "_diffusers_version": "0.6.0",
            "act_fn": "silu",
            "block_out_channels": _VAE_4["block_out_channels"],
            "down_block_types": _VAE_4["down_block_types"],
            "in_channels": 3,
            "latent_channels": 4,
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "out_channels": 3,
            "sample_size": 512,
            "up_block_types": _VAE_4["up_block_types"],
        },
        "text_encoder/config.json": {
            "_name_or_path": "openai/clip-vit-large-patch14",
            "architectures": ["CLIPTextModel"],
            "attention_dropout": 0.0,
            "bos_token_id": 0,
            "dropout": 0.0,
            "eos_token_id": 2,
            "hidden_act": "quick_gelu",
            "hidden_size": 768,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": 3072,
            "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77,
            "model_type": "clip_text_model",
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "pad_token_id": 1,
            "projection_dim": 768,
            "torch_dtype": "float32",
            "transformers_version": "4.22.0.dev0",
            "vocab_size": 49408,
        },
        "scheduler/scheduler_config.json": {
            "_class_name": "PNDMScheduler",
            "_diffusers_version": "0.6.0",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "num_train_timesteps": 1000,
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "trained_betas": None,
            "clip_sample": False,
        },
    },
    # stabilityai/stable-diffusion-2-1
    "sd21": {
        "model_index.json": {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.8.0",
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
        "unet/config.json": {
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": "0.10.0.dev0",
            "act_fn": "silu",
            "attention_head_dim": [5, 10, 20, 20],
            "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": False,
            "cross_attention_dim": 1024,
            "down_block_types": [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ],
            "downsample_padding": 1,
            "dual_cross_attention": False,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": 2,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-05,
            "norm_num_groups": 32,
            "num_class_embeds": None,
            "only_cross_attention": False,
            "out_channels": 4,
            "sample_size": 96,
            "up_block_types": [
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ],
            "use_linear_projection": True,
            "upcast_attention": True,
        },
        "vae/config.json": {
            "_class_name": "AutoencoderKL",
            "_diffusers_version": "0.8.0",
            "_name_or_path": "hf-models/stable-diffusion-v2-768x768/vae",
            "act_fn": "silu",
            "block_out_channels": _VAE_4["block_out_channels"],
            "down_block_types": _VAE_4["down_block_types"],
            "in_channels": 3,
            "latent_channels": 4,
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "out_channels": 3,
            "sample_size": 768,
            "up_block_types": _VAE_4["up_block_types"],
        },
        "text_encoder/config.json": {
            "_name_or_path": "hf-models/stable-diffusion-v2-768x768/text_encoder",
            "architectures": ["CLIPTextModel"],
            "attention_dropout": 0.0,
            "bos_token_id": 0,
            "dropout": 0.0,
            "eos_token_id": 2,
            "hidden_act": "gelu",
            "hidden_size": 1024,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": 4096,
            "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77,
            "model_type": "clip_text_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 23,
            "pad_token_id": 1,
            "projection_dim": 512,
            "torch_dtype": "float32",
            "transformers_version": "4.25.0.dev0",
            "vocab_size": 49408,
        },
        "scheduler/scheduler_config.json": {
            "_class_name": "DDIMScheduler",
            "_diffusers_version": "0.8.0",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": False,
            "num_train_timesteps": 1000,
            "prediction_type": "v_prediction",
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "trained_betas": None,
        },
    },
}

_SDXL_UNET_COMMON = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.19.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_norm": None,
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "upcast_attention": None,
    "use_linear_projection": True,
}

_SDXL_VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.20.0.dev0",
    "_name_or_path": "../sdxl-vae/",
    "act_fn": "silu",
    "block_out_channels": _VAE_4["block_out_channels"],
    "down_block_types": _VAE_4["down_block_types"],
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": _VAE_4["up_block_types"],
}

_SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

_SDXL_TE2 = {
    "architectures": ["CLIPTextModelWithProjection"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "torch_dtype": "float16",
    "transformers_version": "4.32.0.dev0",
    "vocab_size": 49408,
}

# stabilityai/stable-diffusion-xl-base-1.0
REAL_CONFIGS["sdxl_base"] = {
    "model_index.json": {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.19.0.dev0",
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": None,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    },
    "unet/config.json": {
        **_SDXL_UNET_COMMON,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "projection_class_embeddings_input_dim": 2816,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    },
    "vae/config.json": _SDXL_VAE,
    "text_encoder/config.json": {
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": 768,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "pad_token_id": 1,
        "projection_dim": 768,
        "torch_dtype": "float16",
        "transformers_version": "4.32.0.dev0",
        "vocab_size": 49408,
    },
    "text_encoder_2/config.json": _SDXL_TE2,
    "scheduler/scheduler_config.json": _SDXL_SCHEDULER,
}

# stabilityai/stable-diffusion-xl-refiner-1.0
REAL_CONFIGS["sdxl_refiner"] = {
    "model_index.json": {
        "_class_name": "StableDiffusionXLImg2ImgPipeline",
        "_diffusers_version": "0.19.0.dev0",
        "force_zeros_for_empty_prompt": False,
        "add_watermarker": None,
        "requires_aesthetics_score": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": [None, None],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": [None, None],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    },
    "unet/config.json": {
        **_SDXL_UNET_COMMON,
        "attention_head_dim": [6, 12, 24, 24],
        "block_out_channels": [384, 768, 1536, 1536],
        "cross_attention_dim": 1280,
        "down_block_types": [
            "DownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ],
        "projection_class_embeddings_input_dim": 2560,
        "transformer_layers_per_block": 4,
        "up_block_types": [
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "UpBlock2D",
        ],
    },
    "vae/config.json": _SDXL_VAE,
    "text_encoder_2/config.json": _SDXL_TE2,
    "scheduler/scheduler_config.json": _SDXL_SCHEDULER,
}

# Parameter counts that the real SD1.5 configs must reproduce.
SD15_PARAM_COUNTS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


# =============================================================================
# Small helpers
# =============================================================================


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def seed_of(name: str) -> int:
    """A stable per-name seed (Python's hash() is salted, crc32 is not)."""
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||a||."""
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def round_weights_(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round every floating parameter/buffer to `dtype` and back to float32, in place."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(dtype).to(torch.float32))


# =============================================================================
# A small CLIP vocabulary (vocab.json + merges.txt in CLIP's exact format)
# =============================================================================

# Same pattern as OpenAI's simple_tokenizer / HF CLIPTokenizer.
CLIP_PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

CORPUS = """
a red circle on a blue background
a blue circle on a red background
a green square on a white background
a yellow triangle on a black background
a small red square next to a large blue circle
a large green circle above a small yellow square
two red circles and one blue triangle on a white background
three blue squares in a row on a gray background
a photo of a cat sitting on a red chair
a photo of a dog running on the green grass
a painting of a house by the sea at sunset
a drawing of a tree on a hill under a blue sky
an orange circle inside a purple square
a white star on a dark blue background
a black and white photo of a city street at night
a close up photo of a red apple on a wooden table
a watercolor painting of a mountain lake in the morning
a pink flower in a glass vase on a table
a portrait of a woman with long brown hair
a portrait of an old man with a white beard
a red car parked in front of a white house
a blue bird sitting on a branch of a tree
the sun is shining and the sky is blue
the quick brown fox jumps over the lazy dog
a cat and a dog are playing in the garden
there is a small boat on the river
the light is soft and the colors are warm
high quality, detailed, sharp focus, 4k, 8k
digital art, concept art, trending on artstation
oil painting, canvas, brush strokes, impressionism
photo, 35mm, f/1.8, bokeh, natural light
it's a beautiful day, isn't it? yes it is!
don't stop now, we're almost there.
i'm sure you'll like it, they've said so.
she'd know what's in the box; he's not sure.
the numbers are 0 1 2 3 4 5 6 7 8 9 and 10, 20, 100, 1000, 2024.
at 12:30 the temperature was 21.5 degrees (about 70 f).
red, green, blue; cyan, magenta, yellow - and black!
what is this? a circle... or a square?
"quoted text" and 'single quotes' and [brackets] {braces} <angles>
email me at hello@example.com or visit example.org/path?x=1&y=2
50% off: $19.99, #1 choice, 3 + 4 = 7, a * b / c
a circle, a square, a triangle, a star, a heart, a hexagon
circles and squares and triangles on colorful backgrounds
a landscape with mountains, a river, trees and a small house
a futuristic city with tall buildings and flying cars
an astronaut riding a horse on the moon
a bowl of fruit with apples, oranges and bananas
a cup of coffee on a wooden table next to a book
a snowy forest with tall pine trees and a frozen lake
a sailing ship on a stormy ocean with dark clouds and lightning
a cozy kitchen with copper pots hanging on the wall
a golden retriever puppy playing with a tennis ball
an illustration of a dragon flying over a medieval castle
a bright neon sign reading open in a rainy alley
a macro photograph of a butterfly on a purple flower
a minimalist poster with simple geometric shapes and bold colors
the children are reading books in the library after school
we walked along the beach and watched the waves for hours
please write your name and the date at the top of the page
this is the first sentence, and this is the second one.
one, two, three, four, five, six, seven, eight, nine, ten
monday tuesday wednesday thursday friday saturday sunday
january february march april may june july august
north south east west, left right, up down, inside outside
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible byte -> printable unicode char table (same order as CLIP)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


BYTE_ENCODER = bytes_to_unicode()


def clip_clean(text: str, unescape_html: bool) -> str:
    """Text cleaning of CLIP's simple_tokenizer minus ftfy: [html unescape,] NFC, whitespace, lower."""
    if unescape_html:
        text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", text)
    text = regex.sub(r"\s+", " ", text).strip()
    return text.lower()


def clip_words(text: str, unescape_html: bool = False) -> list[str]:
    """Pre-tokenised, byte-encoded words (special tokens are kept verbatim)."""
    out = []
    for tok in regex.findall(CLIP_PAT, clip_clean(text, unescape_html)):
        if tok in (BOS, EOS):
            out.append(tok)
        else:
            out.append("".join(BYTE_ENCODER[b] for b in tok.encode("utf-8")))
    return out


def _merge_word(word: tuple[str, ...], first: str, second: str) -> tuple[str, ...]:
    new, i = [], 0
    while i < len(word):
        if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
            new.append(first + second)
            i += 2
        else:
            new.append(word[i])
            i += 1
    return tuple(new)


def train_bpe(corpus: str, num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE with CLIP's end-of-word handling ("</w>" glued to the last symbol).

    Deterministic: most frequent pair wins, ties broken by the pair's string order
    (once frequent pairs run out, pairs seen once are merged too, until num_merges).
    A merge whose result is already a vocabulary entry is skipped, so that the
    vocabulary has exactly one new entry per merge (as CLIP's has).
    """
    counts = collections.Counter()
    for line in corpus.strip().splitlines():
        for w in clip_words(line):
            counts[tuple(w[:-1]) + (w[-1] + "</w>",)] += 1
    base = set(BYTE_ENCODER.values()) | {c + "</w>" for c in BYTE_ENCODER.values()}
    known = set(base)
    merges: list[tuple[str, str]] = []
    words = dict(counts)
    while len(merges) < num_merges:
        pairs = collections.Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        cands = [(c, p) for p, c in pairs.items() if (p[0] + p[1]) not in known]
        if not cands:
            break
        best_count = max(c for c, _ in cands)
        best = min(p for c, p in cands if c == best_count)
        merges.append(best)
        known.add(best[0] + best[1])
        words = {_merge_word(w, *best): c for w, c in words.items()}
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    tokens = list(BYTE_ENCODER.values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS, EOS]
    assert len(set(tokens)) == len(tokens), "duplicate vocabulary entries"
    return {t: i for i, t in enumerate(tokens)}


def write_vocab(out: Path, num_merges: int = 400) -> tuple[dict[str, int], list[tuple[str, str]]]:
    merges = train_bpe(CORPUS, num_merges)
    vocab = build_vocab(merges)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with open(out / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    return vocab, merges


class ReferenceClipTokenizer:
    """Pure-python port of OpenAI CLIP's simple_tokenizer BPE (without ftfy).

    Used only to cross-check transformers' CLIPTokenizer on the awkward strings.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad: str):
        self.vocab = vocab
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.pad_id = vocab[pad]

    def bpe(self, token: str) -> list[str]:
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, math.inf))
            if best not in self.ranks:
                break
            word = _merge_word(word, *best)
        return list(word)

    def __call__(self, text: str, unescape_html: bool = False) -> list[int]:
        ids = []
        for w in clip_words(text, unescape_html):
            if w in (BOS, EOS):
                ids.append(self.vocab[w])
            else:
                ids.extend(self.vocab[t] for t in self.bpe(w))
        ids = [self.vocab[BOS]] + ids[: MAX_LEN - 2] + [self.vocab[EOS]]
        return ids + [self.pad_id] * (MAX_LEN - len(ids))


def load_tokenizer(vocab_dir: Path, pad_token: str) -> CLIPTokenizer:
    tok = CLIPTokenizer.from_pretrained(str(vocab_dir), pad_token=pad_token, model_max_length=MAX_LEN)
    assert tok.model_max_length == MAX_LEN
    return tok


def tokenize(tok: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    return tok(
        texts, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt"
    ).input_ids.to(torch.int64)


# =============================================================================
# Random weights that make every path matter
# =============================================================================


def init_weights_(module: torch.nn.Module, seed: int, qk_gain: float = 1.5) -> None:
    """Re-initialise all parameters so that activations stay O(1) and nothing is negligible.

    * Linear / Conv weights: N(0, gain^2 / fan_in) (variance preserving); q/k projections get
      a larger gain so that attention is far from uniform (softmax logits ~ N(0, qk_gain^4)),
      which makes the outputs depend visibly on individual text tokens.
    * biases: N(0, 0.1^2); norm affine: weight 1 + N(0, 0.2^2), bias N(0, 0.2^2), so a
      swapped weight/bias or a forgotten affine shows up.
    * embeddings: token N(0, 1), positions N(0, 0.5^2).
    """
    g = torch.Generator().manual_seed(seed)

    def normal_(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        t.copy_(torch.randn(t.shape, generator=g) * std + mean)

    with torch.no_grad():
        for name, mod in sorted(module.named_modules(), key=lambda kv: kv[0]):
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                fan_in = mod.weight[0].numel()
                gain = qk_gain if leaf in ("to_q", "to_k", "q_proj", "k_proj") else 1.0
                normal_(mod.weight, gain / math.sqrt(fan_in))
                if mod.bias is not None:
                    normal_(mod.bias, 0.1)
            elif isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                if mod.weight is not None:
                    normal_(mod.weight, 0.2, 1.0)
                if mod.bias is not None:
                    normal_(mod.bias, 0.2)
            elif isinstance(mod, torch.nn.Embedding):
                normal_(mod.weight, 0.5 if "position" in leaf else 1.0)
        # Anything not covered above would keep torch's default init: refuse silently wrong setups.
        covered = set()
        for name, mod in module.named_modules():
            if isinstance(
                mod,
                (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.Embedding),
            ):
                for pn, _ in mod.named_parameters(recurse=False):
                    covered.add(f"{name}.{pn}" if name else pn)
        missing = [n for n, _ in module.named_parameters() if n not in covered]
        assert not missing, f"parameters left at default init: {missing}"


# =============================================================================
# Tiny model definitions
# =============================================================================


def tiny_clip_config(
    vocab_size: int, hidden: int, heads: int, layers: int, act: str, eos: int, projection_dim: int
) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        max_position_embeddings=MAX_LEN,
        hidden_act=act,
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=eos,
        pad_token_id=1,
        projection_dim=projection_dim,
    )


def tiny_vae(scaling_factor: float, force_upcast: bool) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


# Each family: unet kwargs, text encoder(s), tokenizer pad tokens, scheduler, storage dtype.
LATENT = 8  # latent height/width of the tiny fixtures
VAE_FACTOR = 4  # 2 ** (len(tiny vae block_out_channels) - 1)

FAMILIES = {
    "sd15": dict(
        unet=dict(
            sample_size=LATENT,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            attention_head_dim=2,
            cross_attention_dim=32,
            norm_num_groups=4,
        ),
        text=[dict(hidden=32, heads=4, layers=3, act="quick_gelu", eos="legacy", projection_dim=32)],
        pads=["<|endoftext|>"],
        scheduler=("sd15", PNDMScheduler),
        vae_scaling=0.18215,
        storage=torch.float32,
        released_te_layout=True,
    ),
    "sd15_inpaint": dict(
        unet=dict(
            sample_size=LATENT,
            in_channels=9,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            attention_head_dim=2,
            cross_attention_dim=32,
            norm_num_groups=4,
        ),
        text=[dict(hidden=32, heads=4, layers=3, act="quick_gelu", eos="legacy", projection_dim=32)],
        pads=["<|endoftext|>"],
        scheduler=("sd15", PNDMScheduler),
        vae_scaling=0.18215,
        storage=torch.float32,
        released_te_layout=True,
    ),
    "sd21": dict(
        unet=dict(
            sample_size=LATENT,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=2,
            attention_head_dim=[2, 4],
            cross_attention_dim=32,
            norm_num_groups=4,
            use_linear_projection=True,
            upcast_attention=True,
        ),
        text=[dict(hidden=32, heads=4, layers=3, act="gelu", eos="real", projection_dim=32)],
        pads=["!"],
        scheduler=("sd21", DDIMScheduler),
        vae_scaling=0.18215,
        storage=torch.float16,
        released_te_layout=False,
    ),
    "sdxl": dict(
        unet=dict(
            sample_size=LATENT,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            transformer_layers_per_block=[1, 2],
            attention_head_dim=[1, 2],
            cross_attention_dim=32 + 48,
            norm_num_groups=4,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24 + 6 * 8,
        ),
        text=[
            dict(hidden=32, heads=4, layers=3, act="quick_gelu", eos="legacy", projection_dim=32),
            dict(hidden=48, heads=4, layers=3, act="gelu", eos="legacy", projection_dim=24, with_projection=True),
        ],
        pads=["<|endoftext|>", "!"],
        scheduler=("sdxl_base", EulerDiscreteScheduler),
        vae_scaling=0.13025,
        storage=torch.bfloat16,
        released_te_layout=True,
    ),
}

PROMPTS = ["a red circle on a blue background", "a green circle on a blue background"]
TIMESTEPS = [1.0, 500.0, 999.0]


def build_family(name: str, vocab_size: int, eos_id: int):
    """Returns (unet, vae, [text encoders]) with fixture weights, float32, eval mode."""
    spec = FAMILIES[name]
    torch.manual_seed(seed_of(name))
    unet = UNet2DConditionModel(**spec["unet"]).eval()
    init_weights_(unet, seed_of(name + "/unet"))
    vae = tiny_vae(spec["vae_scaling"], force_upcast=(name == "sdxl")).eval()
    init_weights_(vae, seed_of(name + "/vae"), qk_gain=1.0)
    encoders = []
    for i, t in enumerate(spec["text"]):
        cfg = tiny_clip_config(
            vocab_size,
            t["hidden"],
            t["heads"],
            t["layers"],
            t["act"],
            eos=2 if t["eos"] == "legacy" else eos_id,
            projection_dim=t["projection_dim"],
        )
        cls = CLIPTextModelWithProjection if t.get("with_projection") else CLIPTextModel
        te = cls(cfg).eval()
        init_weights_(te, seed_of(f"{name}/text_encoder{i}"))
        encoders.append(te)
    return unet, vae, encoders


# =============================================================================
# Reference outputs
# =============================================================================


@torch.no_grad()
def text_refs(prefix: str, te, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    out = te(input_ids=ids, output_hidden_states=True)
    pooled = out.text_embeds if isinstance(te, CLIPTextModelWithProjection) else out.pooler_output
    return {
        f"{prefix}.input_ids": ids.clone(),
        f"{prefix}.last_hidden_state": out.last_hidden_state.clone(),
        f"{prefix}.penultimate_hidden_state": out.hidden_states[-2].clone(),
        f"{prefix}.pooled": pooled.clone(),
    }


@torch.no_grad()
def vae_refs(vae: AutoencoderKL, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hw = LATENT * VAE_FACTOR
    x = torch.rand(1, 3, hw, hw, generator=g) * 2 - 1
    post = vae.encode(x).latent_dist
    noise = torch.randn(post.mean.shape, generator=g)
    sample = post.mean + post.std * noise
    # Same thing through diffusers' own sampling path (it draws with randn_tensor).
    g2 = torch.Generator().manual_seed(seed)
    torch.rand(1, 3, hw, hw, generator=g2)
    assert torch.equal(post.sample(generator=g2), sample)
    z = torch.randn(1, 4, LATENT, LATENT, generator=g)
    return {
        "vae.encode.input": x,
        "vae.encode.mean": post.mean.clone(),
        "vae.encode.logvar": post.logvar.clone(),
        "vae.encode.noise": noise,
        "vae.encode.sample": sample,
        "vae.encode.kl": post.kl().clone(),
        "vae.decode.input": z,
        "vae.decode.output": vae.decode(z).sample,
    }


@torch.no_grad()
def unet_refs(
    unet: UNet2DConditionModel,
    ehs: torch.Tensor,
    seed: int,
    added: dict[str, torch.Tensor] | None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    g = torch.Generator().manual_seed(seed)
    c = unet.config.in_channels
    one = torch.randn(1, c, LATENT, LATENT, generator=g)
    if c == 9:  # inpainting: [noisy latents(4), mask(1), masked-image latents(4)]
        mask = torch.zeros(1, 1, LATENT, LATENT)
        mask[..., LATENT // 4 : 3 * LATENT // 4, LATENT // 4 : 3 * LATENT // 4] = 1.0
        one[:, 4:5] = mask
        one[:, 5:] = one[:, 5:] * (1 - mask)
    sample = one.repeat(2, 1, 1, 1)  # both batch items identical: only the prompt differs
    refs = {
        "unet.sample": sample,
        "unet.encoder_hidden_states": ehs.clone(),
        "unet.timesteps": torch.tensor(TIMESTEPS, dtype=torch.float32),
    }
    kw = {}
    if added is not None:
        kw["added_cond_kwargs"] = added
        refs["unet.text_embeds"] = added["text_embeds"].clone()
        refs["unet.time_ids"] = added["time_ids"].clone()
    outs = []
    for i, t in enumerate(TIMESTEPS):
        o = unet(sample, torch.tensor(t), encoder_hidden_states=ehs, **kw).sample
        refs[f"unet.out.{i}"] = o
        outs.append(o)
    stats = {f"one_token_t{int(t)}": rel_l2(o[0], o[1]) for t, o in zip(TIMESTEPS, outs)}
    stats["timestep_1_vs_999"] = rel_l2(outs[0], outs[2])
    stats["timestep_500_vs_999"] = rel_l2(outs[1], outs[2])
    refs["unet.relative_change_one_token"] = torch.tensor([stats["one_token_t500"]])
    if added is not None:
        t = torch.tensor(TIMESTEPS[1])
        ti = added["time_ids"].clone()
        ti[:, 0:2] *= 2  # different original size
        ti[:, 2:4] = 4  # and a crop offset
        o2 = unet(sample, t, encoder_hidden_states=ehs, added_cond_kwargs={**added, "time_ids": ti}).sample
        stats["time_ids"] = rel_l2(outs[1], o2)
        te = added["text_embeds"].flip(0)  # swap the pooled embeddings of the two prompts
        o3 = unet(sample, t, encoder_hidden_states=ehs, added_cond_kwargs={**added, "text_embeds": te}).sample
        stats["text_embeds_swap"] = rel_l2(outs[1], o3)
        refs["unet.relative_change_time_ids"] = torch.tensor([stats["time_ids"]])
        refs["unet.relative_change_text_embeds"] = torch.tensor([stats["text_embeds_swap"]])
    return refs, stats


@torch.no_grad()
def compute_references(name: str, unet, vae, encoders, tokenizers) -> tuple[dict, dict]:
    refs: dict[str, torch.Tensor] = {}
    refs.update(vae_refs(vae, seed_of(name + "/vae-ref")))
    prefixes = ["text_encoder", "text_encoder_2"]
    for prefix, te, tok in zip(prefixes, encoders, tokenizers):
        refs.update(text_refs(prefix, te, tokenize(tok, PROMPTS)))
    if name == "sdxl":
        ehs = torch.cat(
            [refs["text_encoder.penultimate_hidden_state"], refs["text_encoder_2.penultimate_hidden_state"]],
            dim=-1,
        )
        hw = float(LATENT * VAE_FACTOR)
        added = {
            "text_embeds": refs["text_encoder_2.pooled"],
            "time_ids": torch.tensor([[hw, hw, 0.0, 0.0, hw, hw]] * 2),
        }
    else:
        ehs = refs["text_encoder.last_hidden_state"]
        added = None
    u, stats = unet_refs(unet, ehs, seed_of(name + "/unet-ref"), added)
    refs.update(u)
    refs = {k: v.contiguous() for k, v in refs.items()}
    for k, v in refs.items():
        assert torch.isfinite(v.float()).all(), k
    return refs, stats


# =============================================================================
# Tiny pipelines: build, save, check
# =============================================================================


def rewrite_te_to_released_layout(path: Path) -> None:
    """transformers 5 saves CLIPTextModel without the `text_model.` prefix; released SD
    folders have it on every key.  Rewrite the file like the released layout."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    sd = load_file(str(path))
    assert not any(k.startswith("text_model.") for k in sd), "already prefixed?"
    save_file({"text_model." + k: v for k, v in sd.items()}, str(path), metadata=meta or {"format": "pt"})


def safetensors_keys(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def make_tiny(out_root: Path, vocab_dir: Path, vocab: dict[str, int]) -> dict[str, dict]:
    all_stats = {}
    for name, spec in FAMILIES.items():
        unet, vae, encoders = build_family(name, len(vocab), vocab[EOS])
        tokenizers = [load_tokenizer(vocab_dir, pad) for pad in spec["pads"]]
        for word in ("red", "green"):  # the prompts differ by exactly one single-token word
            assert len(tokenizers[0](word).input_ids) == 3, word
        if spec["storage"] != torch.float32:
            for m in [unet, vae, *encoders]:
                round_weights_(m, spec["storage"])
        refs, stats = compute_references(name, unet, vae, encoders, tokenizers)
        all_stats[name] = stats
        print(f"[{name}] params: unet {n_params(unet):,}  vae {n_params(vae):,}  "
              + "  ".join(f"te{i} {n_params(t):,}" for i, t in enumerate(encoders)))
        print(f"[{name}] relative changes: " + ", ".join(f"{k}={v:.4f}" for k, v in stats.items()))
        for k, v in stats.items():
            assert v >= 1e-2, f"{name}: {k} relative change {v} < 1e-2"
        std = {k: float(refs[k].std()) for k in ("vae.decode.output", "vae.encode.mean", "unet.out.1")}
        print(f"[{name}] output stds: " + ", ".join(f"{k}={v:.3f}" for k, v in std.items()))

        # Fresh tokenizer instances for saving: a tokenizer that has been called keeps the
        # last call's padding/truncation in its backend and would write it into tokenizer.json.
        tokenizers = [load_tokenizer(vocab_dir, pad) for pad in spec["pads"]]
        sched_real, sched_cls = spec["scheduler"]
        scheduler = sched_cls.from_config(REAL_CONFIGS[sched_real]["scheduler/scheduler_config.json"])
        if name == "sdxl":
            pipe = StableDiffusionXLPipeline(
                vae=vae,
                text_encoder=encoders[0],
                text_encoder_2=encoders[1],
                tokenizer=tokenizers[0],
                tokenizer_2=tokenizers[1],
                unet=unet,
                scheduler=scheduler,
                force_zeros_for_empty_prompt=True,
                add_watermarker=False,
            )
        else:
            cls = StableDiffusionInpaintPipeline if name == "sd15_inpaint" else StableDiffusionPipeline
            pipe = cls(
                vae=vae,
                text_encoder=encoders[0],
                tokenizer=tokenizers[0],
                unet=unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        d = out_root / name
        if d.exists():
            shutil.rmtree(d)
        pipe.to(spec["storage"])
        pipe.save_pretrained(str(d), safe_serialization=True)
        pipe.to(torch.float32)

        te_dirs = ["text_encoder", "text_encoder_2"][: len(encoders)]
        for sub, te in zip(te_dirs, encoders):
            p = d / sub / "model.safetensors"
            assert safetensors_keys(p) == set(te.state_dict().keys()), f"{p}: saved keys != state_dict keys"
        if spec["released_te_layout"]:
            rewrite_te_to_released_layout(d / "text_encoder" / "model.safetensors")
        for sub in ("tokenizer", "tokenizer_2")[: len(tokenizers)]:
            for fn in ("vocab.json", "merges.txt"):
                if not (d / sub / fn).exists():  # transformers 5 only writes tokenizer.json
                    shutil.copy(vocab_dir / fn, d / sub / fn)
        # A single metadata key: safetensors writes metadata in hash order (not reproducible).
        save_file(refs, str(d / "reference.safetensors"), metadata={"format": "pt"})
        for p in d.rglob("*"):
            if p.is_file():
                os.chmod(p, 0o644)
    return all_stats


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


@torch.no_grad()
def verify_tiny(out_root: Path) -> None:
    """Reload every tiny pipeline from disk (as float32) and recompute the references."""
    for name, spec in FAMILIES.items():
        d = out_root / name
        cls = {
            "sdxl": StableDiffusionXLPipeline,
            "sd15_inpaint": StableDiffusionInpaintPipeline,
        }.get(name, StableDiffusionPipeline)
        pipe = cls.from_pretrained(str(d), dtype=torch.float32)
        refs = load_file(str(d / "reference.safetensors"))
        # storage dtype on disk
        want = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[spec["storage"]]
        for p in sorted(d.glob("*/*.safetensors")):
            with safe_open(str(p), "pt") as f:
                dts = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
            assert dts == {want}, f"{p}: dtypes {dts}, want {want}"
        # key layout of the text encoder files
        prefixed = {
            sub: all(
                k.startswith("text_model.") or k == "text_projection.weight"
                for k in safetensors_keys(d / sub / "model.safetensors")
            )
            for sub in (["text_encoder", "text_encoder_2"] if name == "sdxl" else ["text_encoder"])
        }
        assert prefixed["text_encoder"] == spec["released_te_layout"], prefixed
        assert prefixed.get("text_encoder_2", True), prefixed
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if name == "sdxl" else [])
        tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if name == "sdxl" else [])
        for m in [pipe.unet, pipe.vae, *encoders]:
            assert all(p.dtype == torch.float32 for p in m.parameters())
            m.eval()
        new, _ = compute_references(name, pipe.unet, pipe.vae, encoders, tokenizers)
        assert set(new) == set(refs), set(new) ^ set(refs)
        worst = 0.0
        for k in refs:
            assert new[k].shape == refs[k].shape and new[k].dtype == refs[k].dtype, k
            err = max_abs(new[k], refs[k])
            if k.endswith("input_ids"):
                assert err == 0, k
            tol = 1e-5 * (1 + float(refs[k].abs().max()))
            assert err <= tol, f"{name}: {k} differs after reload by {err}"
            worst = max(worst, err)
        print(f"[{name}] reload check ok (max abs diff {worst:.2e}); keys: {len(refs)}")


# =============================================================================
# Tokenizer cases
# =============================================================================

LONG_PROMPT = (
    "a very long prompt about a red circle on a blue background, " * 8
    + "and the words after the seventy seventh token must be cut off by truncation"
)

TOKENIZER_TEXTS = [
    "a red circle on a blue background",
    "A RED Circle On A Blue BACKGROUND",
    "hello, world! (test) [x] {y} ... ?! -- ;:",
    "1234 5678 3.14159 1,000,000 2024-01-31",
    "café naïve résumé über",
    "cafe\u0301 nai\u0308ve",  # decomposed accents (NFD): NFC normalisation matters
    "emoji 🙂🚀 test 👍🏽 ❤️",
    "it's the cat's toy, isn't it? don't stop",
    "DON'T SHOUT, IT'S LOUD",
    "we're here, they've gone, i'm fine, you'll see, he'd go",
    "runs   of    spaces\tand\ttabs\nand\nnewlines\r\n end",
    "   leading and trailing spaces   ",
    "",
    "   ",
    "fish &amp; chips &lt;b&gt; &#39;quoted&#39;",
    "xylophone quixotic zebra juxtaposition",
    "<|startoftext|> special <|endoftext|> tokens",
    "co-operate e-mail self-driving state-of-the-art",
    "a.b.c hello!!!world ... !!! ???",
    "中文 日本語 한국어",
    "email me at hello@example.com or visit https://example.org/path?x=1&y=2",
    "50% off: $19.99, #1 choice, 3 + 4 = 7",
    LONG_PROMPT,
]


def make_tokenizer_cases(out_root: Path, vocab: dict, merges: list) -> list[str]:
    cases, mismatches = [], []
    for folder, pad in (("sd15/tokenizer", "<|endoftext|>"), ("sd21/tokenizer", "!")):
        tok = CLIPTokenizer.from_pretrained(str(out_root / folder))
        assert tok.pad_token == pad, (folder, tok.pad_token)
        ref = ReferenceClipTokenizer(vocab, merges, pad)
        # Built from vocab.json + merges.txt only (how released SD folders ship it: no tokenizer.json).
        plain = load_tokenizer(out_root / "vocab", pad)
        for text in TOKENIZER_TEXTS:
            ids = tokenize(tok, [text])[0].tolist()
            assert len(ids) == MAX_LEN
            assert ids == tokenize(plain, [text])[0].tolist(), text
            cases.append({"tokenizer": folder, "text": text, "ids": ids})
            for unescape in (False, True):
                r = ref(text, unescape_html=unescape)
                if r != ids:
                    mismatches.append(f"{folder} {'openai(html-unescape)' if unescape else 'reference-bpe'}: {text!r}")
    # one case per line (ids inline) keeps the file small and diffable
    body = ",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in cases)
    (out_root / "tokenizer_cases.json").write_text("[\n" + body + "\n]\n", encoding="utf-8")
    return mismatches


# =============================================================================
# Full-size configs, structure lists, full-size SD1.5
# =============================================================================

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def build_component(model: str, comp: str, meta: bool):
    cfg = dict(REAL_CONFIGS[model][f"{comp}/config.json"])
    ctx = torch.device("meta") if meta else torch.device("cpu")
    with ctx:
        if comp == "unet":
            return UNet2DConditionModel.from_config(cfg)
        if comp == "vae":
            return AutoencoderKL.from_config(cfg)
        arch = cfg["architectures"][0]
        config = CLIPTextConfig(**{k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"})
        return {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}[arch](
            config
        )


def write_configs(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    for model, files in REAL_CONFIGS.items():
        for rel, cfg in files.items():
            write_json(out / model / rel, cfg)


def write_structure(out: Path) -> dict[str, dict[str, int]]:
    if out.exists():
        shutil.rmtree(out)
    counts: dict[str, dict[str, int]] = {}
    for model, files in REAL_CONFIGS.items():
        counts[model] = {}
        for comp in COMPONENTS:
            if f"{comp}/config.json" not in files:
                continue
            m = build_component(model, comp, meta=True)
            sd = m.state_dict()
            lines = [f"{k}\t{','.join(str(d) for d in v.shape)}" for k, v in sorted(sd.items())]
            (out / model).mkdir(parents=True, exist_ok=True)
            (out / model / f"{comp}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
            counts[model][comp] = n_params(m)
            del m, sd
    for comp, want in SD15_PARAM_COUNTS.items():
        assert counts["sd15"][comp] == want, f"sd15 {comp}: {counts['sd15'][comp]:,} != {want:,}"
    return counts


def make_full_size_sd15(out: Path) -> None:
    """Full-size SD1.5 folder: real configs, default (random) torch init, f32 safetensors."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        vocab_dir = Path(tmp)
        write_vocab(vocab_dir)
        tok = load_tokenizer(vocab_dir, "<|endoftext|>")
        comps = {}
        for comp in ("unet", "vae", "text_encoder"):
            torch.manual_seed(seed_of(f"full/sd15/{comp}"))
            comps[comp] = build_component("sd15", comp, meta=False).eval()
            count = n_params(comps[comp])
            print(f"{comp}: {count:,} parameters")
            assert count == SD15_PARAM_COUNTS[comp], f"{comp}: {count:,} != {SD15_PARAM_COUNTS[comp]:,}"
        scheduler = PNDMScheduler.from_config(REAL_CONFIGS["sd15"]["scheduler/scheduler_config.json"])
        pipe = StableDiffusionPipeline(
            vae=comps["vae"],
            text_encoder=comps["text_encoder"],
            tokenizer=tok,
            unet=comps["unet"],
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(str(out), safe_serialization=True)
        for fn in ("vocab.json", "merges.txt"):
            shutil.copy(vocab_dir / fn, out / "tokenizer" / fn)
    del pipe, comps
    # The saved names/shapes must be exactly those of the structure lists (meta-device build).
    for comp in ("unet", "vae", "text_encoder"):
        shapes = {}
        for p in sorted((out / comp).glob("*.safetensors")):
            with safe_open(str(p), "pt") as f:
                for k in f.keys():
                    shapes[k] = list(f.get_slice(k).get_shape())
        want = {k: list(v.shape) for k, v in build_component("sd15", comp, meta=True).state_dict().items()}
        assert shapes == want, f"{comp}: saved tensors differ from the structure list"
        print(f"{comp}: {len(shapes)} tensors, names/shapes == structure list")
    print(f"wrote {out}")


# =============================================================================
# main
# =============================================================================


def total_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full-size", choices=["sd15"], help="write a full-size random-weight pipeline to OUT")
    ap.add_argument("out", type=Path, help="output folder (fixtures root, or the full-size folder)")
    args = ap.parse_args()

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    if args.full_size:
        make_full_size_sd15(args.out)
        return

    root: Path = args.out
    root.mkdir(parents=True, exist_ok=True)
    write_configs(root / "configs")
    counts = write_structure(root / "structure")
    for model, c in counts.items():
        print(f"[structure] {model}: " + ", ".join(f"{k} {v:,}" for k, v in c.items()))

    tiny = root / "tiny"
    tiny.mkdir(exist_ok=True)
    vocab_dir = tiny / "vocab"
    if vocab_dir.exists():
        shutil.rmtree(vocab_dir)
    vocab, merges = write_vocab(vocab_dir)
    print(f"[vocab] {len(vocab)} entries, {len(merges)} merges; tokenizer class {CLIPTokenizer.__mro__[:2]}")
    make_tiny(tiny, vocab_dir, vocab)
    mismatches = make_tokenizer_cases(tiny, vocab, merges)
    print(f"[tokenizer] cases where transformers differs from the reference ports ({len(mismatches)}):")
    for m in mismatches:
        print("   ", m)
    verify_tiny(tiny)
    print(f"total fixture size: {total_size(root):,} bytes")


if __name__ == "__main__":
    main()
