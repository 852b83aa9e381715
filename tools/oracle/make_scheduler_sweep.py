#!/usr/bin/env python3
"""The scheduler sweep: every diffusers scheduler class an `ldm` sampler name maps to, built with
`Class.from_config(config, **overrides)` from each of a set of real-world scheduler configs, at
every step count from 1 to 50 (and 75, 100, 150, 999), with the Karras / exponential / beta sigma
options where the class has them. For each case it records diffusers' timesteps, sigmas and the
sample after every scheduler call on the analytic stand-in model — or the error diffusers raises.

Usage:

    python tools/oracle/make_scheduler_sweep.py fixtures        # writes fixtures/scheduler_sweep/
    python tools/oracle/make_scheduler_sweep.py fixtures --check

Output (compact: a [1, 1, 2, 2] latent, the sample after the first two, the middle and the last two
calls, sigmas at some step counts, a result an earlier config gave stored by reference, one
gzip'd JSON file per config):

    scheduler_sweep/index.json           configs, sampler names, schedules, step counts, seeds
    scheduler_sweep/<config>.json.gz     {"cases": [...]} (see the README)

`crates/ldm-sampling/tests/scheduler_sweep.rs` compares every case. Pinned environment:
tools/oracle/requirements.txt (torch 2.15.0, diffusers 0.42.1, torchsde, scipy).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import hashlib
import io
import json
import os
import sys
from collections import OrderedDict

import numpy as np
import torch

torch.set_num_threads(1)

import diffusers  # noqa: E402

LATENT_SHAPE = [1, 1, 2, 2]  # fewer than 16 values: torch's scalar normal path on every CPU
NOISE_SEED = 1234
STEP_GEN_SEED = 42
SDE_NOISE_SEED = 42
STEP_COUNTS = list(range(1, 51)) + [75, 100, 150, 999]
# Converted sigma options, and DPM++ SDE (whose Brownian increments are stored), are swept at
# fewer long counts.
SHORT_STEP_COUNTS = list(range(1, 51)) + [100]
# Sigmas are stored at these counts (timesteps and the trajectory at every count).
SIGMA_STEP_COUNTS = set(range(1, 21)) | {25, 30, 40, 50, 75, 100, 150, 999}

SCALED = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def read(root, rel):
    with open(os.path.join(root, rel)) as fh:
        return json.load(fh)


def configs(root):
    """The configs, as released (written from the public files; see the README)."""
    sd15 = read(root, "configs/sd15/scheduler/scheduler_config.json")
    sd15_noclip = {k: v for k, v in sd15.items() if k != "clip_sample"}
    sd21_base = {
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    }
    sd21 = read(root, "configs/sd21/scheduler/scheduler_config.json")
    sdxl = read(root, "configs/sdxl_base/scheduler/scheduler_config.json")
    turbo = {
        "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.24.0.dev0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
        "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
        "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "timestep_spacing": "trailing", "trained_betas": None, "use_karras_sigmas": False,
    }
    sdxl_turbo = dict(turbo)
    lcm = {
        "_class_name": "LCMScheduler", "_diffusers_version": "0.22.0.dev0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
        "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000,
        "original_inference_steps": 50, "prediction_type": "epsilon", "rescale_betas_zero_snr": False,
        "sample_max_value": 1.0, "set_alpha_to_one": True, "steps_offset": 1, "thresholding": False,
        "timestep_scaling": 10.0, "timestep_spacing": "leading", "trained_betas": None,
    }
    # The embedded Shapes model's: v-prediction, zero terminal SNR, trailing.
    zsnr = read(os.path.join(root, ".."), "models/shapes/scheduler/scheduler_config.json")
    minimal = {"_class_name": "EulerDiscreteScheduler", **SCALED}
    return OrderedDict(
        sd15=sd15, sd15_noclip=sd15_noclip, sd21_base=sd21_base, sd21_v=sd21, sdxl=sdxl,
        sd_turbo=turbo, sdxl_turbo=sdxl_turbo, lcm=lcm, zsnr_trailing=zsnr, minimal=minimal,
    )


# ldm's sampler names: the diffusers class each maps to, the overrides the name implies, whether
# it draws from the step generator, and whether the class has its own sigma options.
SAMPLERS = OrderedDict(
    ddpm=("DDPMScheduler", {}, True, False),
    ddim=("DDIMScheduler", {}, False, False),
    pndm=("PNDMScheduler", {"skip_prk_steps": True}, False, False),
    lms=("LMSDiscreteScheduler", {}, False, True),
    euler=("EulerDiscreteScheduler", {}, False, True),
    euler_a=("EulerAncestralDiscreteScheduler", {}, True, False),
    heun=("HeunDiscreteScheduler", {}, False, True),
    dpm2=("KDPM2DiscreteScheduler", {}, False, True),
    dpm2_a=("KDPM2AncestralDiscreteScheduler", {}, True, True),
    dpmpp_2m=("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, False, True),
    dpmpp_2m_sde=("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, True, True),
    dpmpp_3m_sde=("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, True, True),
    dpmpp_sde=("DPMSolverSDEScheduler", {"noise_sampler_seed": SDE_NOISE_SEED}, False, True),
    unipc=("UniPCMultistepScheduler", {}, False, True),
    deis=("DEISMultistepScheduler", {}, False, False),
    lcm=("LCMScheduler", {}, True, False),
    tcd=("TCDScheduler", {}, True, False),
)
OPTIONS = OrderedDict(
    karras={"use_karras_sigmas": True},
    exponential={"use_exponential_sigmas": True},
    beta={"use_beta_sigmas": True},
)
NOT_SWEPT = {
    "dpmpp_2s_a": "k-diffusion's sample_dpmpp_2s_ancestral; diffusers has no such scheduler "
                  "(its DPMSolverSinglestepScheduler has no ancestral noise)",
}


def standin(x, t):
    s = float(t) / 1000.0
    return 0.6 * x * (1.0 - 0.5 * s) + 0.3 * torch.sin(3.0 * x + s) + 0.1 * s


def f32list(t, digits=8):
    """Float32 values to `digits` significant digits (the tests compare to 1e-5 relative)."""
    return [float(f"{float(np.float32(v)):.{digits}g}") for v in t.detach().to(torch.float64).reshape(-1).tolist()]


def kept_calls(n):
    """The calls whose sample is stored: the first two, the middle one and the last two."""
    return {1, 2, (n + 1) // 2, n - 1, n} & set(range(1, n + 1))


# Where diffusers' own float32 arithmetic limits what can be matched, the sweep measures it: the
# case is run again with every floating tensor of the scheduler (and the sample) in float64, the
# same noise draws cast up, and `f32_gap` records the largest relative difference of the kept
# samples. The Rust test allows twice that on top of its tolerance. Measured for the samplers and
# configs where it was seen to matter (DPM++ SDE's Brownian tree cannot be replayed in float64).
GAP_SAMPLERS = {"ddpm", "euler_a", "dpm2_a", "dpmpp_2m_sde", "dpmpp_3m_sde", "deis"}


def needs_gap(name, cfg):
    return name != "dpmpp_sde" and (name in GAP_SAMPLERS or bool(cfg.get("rescale_betas_zero_snr")))


def rel_gap(a, b):
    b = b.reshape(-1)
    return float((a.double() - b).norm() / max(float(b.norm()), 0.05))


def run(name, cfg, option, steps, dtype=torch.float32):
    cls_name, overrides, draws, _ = SAMPLERS[name]
    cls = getattr(diffusers, cls_name)
    overrides = {**overrides, **OPTIONS.get(option, {})}
    sched = cls.from_config(copy.deepcopy(cfg), **overrides)
    sched.set_timesteps(steps)
    if dtype != torch.float32:
        return run_cast(name, sched, draws, dtype)
    out = OrderedDict()
    out["timesteps"] = [float(f"{v:.9g}") for v in sched.timesteps.to(torch.float64).tolist()]
    sig = getattr(sched, "sigmas", None)
    keep_sigmas = isinstance(sig, torch.Tensor) and steps in SIGMA_STEP_COUNTS
    out["sigmas"] = f32list(sig, 9) if keep_sigmas else None
    out["init_noise_sigma"] = float(sched.init_noise_sigma)
    x = torch.randn(LATENT_SHAPE, generator=torch.Generator("cpu").manual_seed(NOISE_SEED)) * sched.init_noise_sigma
    kwargs = {}
    if draws:
        kwargs["generator"] = torch.Generator("cpu").manual_seed(STEP_GEN_SEED)
    if name == "ddim":
        kwargs["eta"] = 0.0
    brownian = []
    if name == "dpmpp_sde":
        from diffusers.schedulers import scheduling_dpmsolver_sde as sde_mod

        orig = sde_mod.BrownianTreeNoiseSampler.__call__

        def rec(this, s0, s1):
            w = orig(this, s0, s1)
            brownian.append(f32list(w, 7))
            return w

        sde_mod.BrownianTreeNoiseSampler.__call__ = rec
    try:
        n = len(sched.timesteps)
        keep = kept_calls(n)
        traj = []
        for k, t in enumerate(sched.timesteps, start=1):
            inp = sched.scale_model_input(x, t)
            x = sched.step(standin(inp, t), t, x, **kwargs).prev_sample
            if k in keep:
                traj.append([k] + f32list(x, 7))
        if not torch.isfinite(x).all():
            raise FloatingPointError("diffusers' sample is not finite")
    finally:
        if name == "dpmpp_sde":
            sde_mod.BrownianTreeNoiseSampler.__call__ = orig
    out["calls"] = len(sched.timesteps)
    out["trajectory"] = traj
    if brownian:
        out["brownian"] = brownian
    if needs_gap(name, cfg):
        exact = run(name, cfg, option, steps, torch.float64)
        gap = max(rel_gap(torch.tensor(e[1:]), exact[e[0]]) for e in traj)
        out["f32_gap"] = float(f"{gap:.2g}")
    return out


def run_cast(name, sched, draws, dtype):
    """The case in `dtype`: the scheduler's floating tensors (not its timesteps) and the sample
    cast up, the generator's float32 draws cast up; returns the sample after each call."""
    for k, v in list(vars(sched).items()):
        if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "timesteps":
            setattr(sched, k, v.to(dtype))
    module = sys.modules[type(sched).__module__]
    orig = getattr(module, "randn_tensor", None)
    if orig is not None:
        module.randn_tensor = lambda shape, generator=None, device=None, dtype=None, **kw: orig(
            shape, generator=generator, device=device, dtype=torch.float32).to(dtype)
    try:
        x = (torch.randn(LATENT_SHAPE, generator=torch.Generator("cpu").manual_seed(NOISE_SEED)) * sched.init_noise_sigma).to(dtype)
        kwargs = {"generator": torch.Generator("cpu").manual_seed(STEP_GEN_SEED)} if draws else {}
        if name == "ddim":
            kwargs["eta"] = 0.0
        out = {}
        for k, t in enumerate(sched.timesteps, start=1):
            x = sched.step(standin(sched.scale_model_input(x, t), t), t, x, **kwargs).prev_sample
            out[k] = x.clone()
        return out
    finally:
        if orig is not None:
            module.randn_tensor = orig


def compact(result):
    """Fewer digits where the tests need no more: timesteps to 7 significant digits (compared to
    1e-4 + 1e-5·t), Brownian increments to 6 (DPM++ SDE is compared to 5e-5)."""
    out = OrderedDict(result)
    out["timesteps"] = [float(f"{v:.7g}") for v in result["timesteps"]]
    if "brownian" in result:
        out["brownian"] = [[float(f"{v:.6g}") for v in w] for w in result["brownian"]]
    return out


def sweep_config(item):
    """Every case of one config, in order: (sampler, schedule, steps, result or error)."""
    cname, cfg = item
    torch.set_num_threads(1)
    out = []
    for name, (_, _, _, has_options) in SAMPLERS.items():
        options = ["default"] + (list(OPTIONS) if has_options else [])
        for option in options:
            short = option != "default" or name == "dpmpp_sde"
            for steps in (SHORT_STEP_COUNTS if short else STEP_COUNTS):
                try:
                    result = compact(run(name, cfg, option, steps))
                except Exception as e:  # diffusers refuses the case: ldm must refuse it too
                    result = {"error": f"{type(e).__name__}: {e}"}
                out.append((name, option, steps, result))
    print(f"{cname}: {len(out)} cases", file=sys.stderr, flush=True)
    return out


def build(root, only=None, jobs=1):
    cfgs = configs(root)
    if only:
        cfgs = OrderedDict((k, v) for k, v in cfgs.items() if k in only)
    if jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.map(sweep_config, list(cfgs.items()), chunksize=1)
    else:
        results = [sweep_config(item) for item in cfgs.items()]
    files = OrderedDict()
    counts = OrderedDict(cases=0, errors=0)
    seen = {}
    for cname, cases_of in zip(cfgs, results):
        cases = []
        for name, option, steps, result in cases_of:
            case = OrderedDict(sampler=name, schedule=option, steps=steps)
            counts["errors"] += "error" in result
            # A result an earlier config already gave is stored once, by reference.
            key = json.dumps([name, option, steps, result], sort_keys=True)
            if key in seen:
                case["same_as"] = seen[key]
            else:
                seen[key] = cname
                case.update(result)
            counts["cases"] += 1
            cases.append(case)
        files[cname] = cases
    index = OrderedDict(
        diffusers_version=diffusers.__version__, torch_version=torch.__version__,
        latent_shape=LATENT_SHAPE, noise_seed=NOISE_SEED, step_generator_seed=STEP_GEN_SEED,
        sigma_step_counts=sorted(SIGMA_STEP_COUNTS), counts=counts,
        configs=cfgs,
        samplers={k: {"class": v[0], "overrides": v[1], "generator": v[2], "sigma_options": v[3]}
                  for k, v in SAMPLERS.items()},
        not_swept=NOT_SWEPT,
    )
    return index, files


def gz_bytes(obj):
    raw = json.dumps(obj, separators=(",", ":")).encode()
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as fh:
        fh.write(raw)
    return buf.getvalue()


def outputs(root, only=None, jobs=1):
    index, files = build(root, only, jobs)
    out = {"index.json": (json.dumps(index, indent=1) + "\n").encode()}
    for cname, cases in files.items():
        out[f"{cname}.json.gz"] = gz_bytes({"cases": cases})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fixtures")
    ap.add_argument("--check", action="store_true", help="compare with the files on disk")
    ap.add_argument("--only", nargs="*", help="just these configs (for a quick look; --out elsewhere)")
    ap.add_argument("--out", help="output folder (default: FIXTURES/scheduler_sweep)")
    ap.add_argument("--jobs", type=int, default=1, help="configs swept in parallel (same output)")
    args = ap.parse_args()
    d = args.out or os.path.join(args.fixtures, "scheduler_sweep")
    out = outputs(args.fixtures, args.only, args.jobs)
    if args.check:
        bad = [n for n, b in out.items()
               if not os.path.exists(os.path.join(d, n))
               or hashlib.sha256(open(os.path.join(d, n), "rb").read()).digest() != hashlib.sha256(b).digest()]
        print("check:", "OK" if not bad else f"differ: {bad}")
        sys.exit(1 if bad else 0)
    os.makedirs(d, exist_ok=True)
    for n, b in out.items():
        with open(os.path.join(d, n), "wb") as fh:
            fh.write(b)
    print(f"wrote {len(out)} files to {d}", file=sys.stderr)


if __name__ == "__main__":
    main()
