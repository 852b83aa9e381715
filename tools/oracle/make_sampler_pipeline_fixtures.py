#!/usr/bin/env python3
"""End to end, every sampler name: the tiny SD1, SD2 (v-prediction, trailing spacing) and SDXL
pipelines run by diffusers with each ldm sampler name's scheduler class
(`Class.from_config(pipe.scheduler.config, **overrides)`) at 7, 9 and 13 steps — counts that do
not divide 1000 — against which `ldm generate --sampler NAME` is compared
(crates/ldm-pipeline/tests/sampler_parity.rs).

Usage (after tools/oracle/make_fixtures.py has written fixtures/tiny/):

    python tools/oracle/make_sampler_pipeline_fixtures.py fixtures

Writes fixtures/pipelines_samplers/{cases.json, <case>.png, <case>.latents.safetensors}.
Shares its pipeline loading and call conventions with make_pipeline_fixtures.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import make_pipeline_fixtures as mp  # noqa: E402
from make_scheduler_sweep import SAMPLERS  # noqa: E402

STEPS = [7, 9, 13]
MODELS = {
    # model folder: (pipeline, overrides of the folder's own scheduler config)
    "sd15": (mp.SD_T2I, {}),
    "sd21": (mp.SD_T2I, {"timestep_spacing": "trailing"}),
    "sdxl": (mp.XL_T2I, {}),
}
NOT_RUN = {
    "dpmpp_sde": "diffusers' DPMSolverSDEScheduler draws its noise from a torchsde Brownian tree "
                 "seeded apart from the pipeline's generator; ldm draws it from the generator",
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fixtures")
    args = ap.parse_args()
    root = Path(args.fixtures)
    out = root / "pipelines_samplers"
    out.mkdir(parents=True, exist_ok=True)
    pipes = mp.Pipelines(root / "tiny")
    records = []
    for model, (pipeline, config_overrides) in MODELS.items():
        for name, (cls, overrides, _, _) in SAMPLERS.items():
            if name in NOT_RUN:
                continue
            for steps in STEPS:
                c = mp.case(f"{model}_{name}_{steps}", model, pipeline, cls, steps, 7.5,
                            overrides={**config_overrides, **overrides}, seed=steps)
                c["ldm_sampler"] = name
                c["config_overrides"] = config_overrides
                _, _, imgs = mp.run_case(pipes, c, {}, "pil")
                imgs[0].save(out / f"{c['name']}.png")
                _, _, lat = mp.run_case(pipes, c, {}, "latent")
                save_file({"latents": lat.contiguous()}, str(out / f"{c['name']}.latents.safetensors"))
                records.append(c)
                print(c["name"], flush=True)
    body = ",\n".join("  " + json.dumps(r) for r in records)
    (out / "cases.json").write_text(
        '{"not_run": ' + json.dumps(NOT_RUN) + ',\n"cases": [\n' + body + "\n]}\n", encoding="utf-8")
    for p in out.rglob("*"):
        os.chmod(p, 0o644)


if __name__ == "__main__":
    main()
