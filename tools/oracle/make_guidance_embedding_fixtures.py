#!/usr/bin/env python3
"""U-Nets with a guidance embedding (`time_cond_proj_dim`): what guidance-distilled and
latent-consistency models (LCM, and `ldm distill guidance|lcm` students) are. The embedding of
w = guidance_scale − 1 (`get_guidance_scale_embedding`) goes through the time embedding's
`cond_proj`, and the pipeline makes one pass a step instead of classifier-free guidance's two.

Usage (after tools/oracle/make_fixtures.py has written fixtures/tiny/):

    python tools/oracle/make_guidance_embedding_fixtures.py fixtures

Writes fixtures/tiny/sd15_lcm/: the tiny SD1 U-Net's config with `time_cond_proj_dim: 32` and
fresh seeded weights, an `LCMScheduler` config, a `LatentConsistencyModelPipeline` model index
(the text encoder, tokenizer and autoencoder are the tiny SD1's: the test assembles the folder),
and reference.safetensors: guidance embeddings at several w and widths, the U-Net's outputs
with and without the embedding, and `LatentConsistencyModelPipeline` images (cases.json,
<case>.png, <case>.latents.safetensors), against which `ldm generate` is compared
(crates/ldm-pipeline/tests/guidance_embedding.rs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import make_fixtures as mf  # noqa: E402
import make_pipeline_fixtures as mp  # noqa: E402

COND_DIM = 32
EMBEDDING_W = [0.0, 0.5, 1.5, 7.0, 14.0]
EMBEDDING_DIMS = [32, 31, 256]
# (name, steps, guidance_scale, seed)
CASES = [("lcm_4_g8", 4, 8.0, 3), ("lcm_2_g1.5", 2, 1.5, 5), ("lcm_1_g4", 1, 4.0, 7)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fixtures")
    args = ap.parse_args()
    root = Path(args.fixtures)
    src = root / "tiny" / "sd15"
    out = root / "tiny" / "sd15_lcm"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    cfg = json.loads((src / "unet" / "config.json").read_text())
    cfg["time_cond_proj_dim"] = COND_DIM
    unet = UNet2DConditionModel.from_config(cfg)
    mf.init_weights_(unet, mf.seed_of("sd15_lcm.unet"))
    unet.eval()
    unet.save_pretrained(out / "unet", safe_serialization=True)
    sched_cfg = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    sched = LCMScheduler.from_config(sched_cfg, original_inference_steps=50)
    sched.save_config(out / "scheduler")
    index = json.loads((src / "model_index.json").read_text())
    index["_class_name"] = "LatentConsistencyModelPipeline"
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    refs = {}
    for dim in EMBEDDING_DIMS:
        w = torch.tensor(EMBEDDING_W, dtype=torch.float32)
        refs[f"embedding.{dim}"] = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
            None, w, embedding_dim=dim).contiguous()
    refs["embedding.w"] = torch.tensor(EMBEDDING_W, dtype=torch.float64)

    g = torch.Generator().manual_seed(11)
    sample = torch.randn(2, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"], generator=g)
    context = torch.randn(2, 77, cfg["cross_attention_dim"], generator=g)
    w = torch.tensor([2.0, 7.0])
    cond = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=COND_DIM)
    timesteps = [999.0, 500.0, 21.0]
    refs.update({"unet.sample": sample, "unet.encoder_hidden_states": context, "unet.w": w.double(),
                 "unet.timesteps": torch.tensor(timesteps)})
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            refs[f"unet.out.{i}"] = unet(sample, t, context, timestep_cond=cond).sample.contiguous()
        refs["unet.out_uncond"] = unet(sample, timesteps[0], context).sample.contiguous()

    # The pipeline, on the tiny SD1's other components.
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sd15_lcm"
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns("reference.safetensors"))
        for part in ["unet", "scheduler"]:
            shutil.rmtree(folder / part)
            shutil.copytree(out / part, folder / part)
        shutil.copy(out / "model_index.json", folder / "model_index.json")
        pipe = LatentConsistencyModelPipeline.from_pretrained(
            folder, dtype=torch.float32, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        for name, steps, scale, seed in CASES:
            images = {}
            for kind in ["pil", "latent"]:
                generator = torch.Generator("cpu").manual_seed(seed)
                with torch.no_grad():
                    images[kind] = pipe(prompt=mp.PROMPT, num_inference_steps=steps, guidance_scale=scale,
                                        width=32, height=32, generator=generator, output_type=kind).images
            images["pil"][0].save(out / f"{name}.png")
            save_file({"latents": images["latent"].contiguous()}, str(out / f"{name}.latents.safetensors"))
            records.append({"name": name, "prompt": mp.PROMPT, "steps": steps, "guidance_scale": scale,
                            "seed": seed, "width": 32, "height": 32})
            print(name, flush=True)
    save_file(refs, str(out / "reference.safetensors"))
    (out / "cases.json").write_text(json.dumps(records, indent=1) + "\n")
    for p in out.rglob("*"):
        os.chmod(p, 0o644 if p.is_file() else 0o755)


if __name__ == "__main__":
    main()
