#!/usr/bin/env python3
"""Sampler / RNG oracle fixtures for the Rust `ldm` sampler tests.

Usage:

    python tools/oracle/make_sampler_fixtures.py fixtures

Writes (relative to the given fixtures directory):

    samplers/cases.json               case list + metadata (see samplers/README.md)
    samplers/<case>.safetensors       per-case tensors (noise, timesteps, x.k, ...)
    samplers/step_noise.safetensors   the per-step randn draws of the step generator(s)
    samplers/alphas_cumprod.safetensors  the distinct alphas_cumprod tables used
    samplers/README.md
    rng/torch_rng.safetensors         torch CPU generator outputs (randn / rand)
    rng/philox.safetensors            A1111 "NV" Philox4x32-10 randn outputs
    rng/README.md

Everything runs on the CPU in float32 and is deterministic (run it twice and
compare hashes; `--check` does exactly that against files already on disk).

diffusers is the numerical oracle: each case runs a diffusers scheduler in the
standard pipeline loop on an analytic stand-in "model" (see STANDIN_SOURCE),
recording every step.  Pinned environment: tools/oracle/requirements.txt
(torch 2.15.0, diffusers 0.42.1, torchsde 0.2.6 + scipy for DPMSolverSDE /
beta sigmas).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import hashlib
import inspect
import json
import math
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict

import numpy as np
import torch

torch.set_num_threads(1)

import diffusers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

LATENT_SHAPE = [1, 4, 8, 8]
NOISE_SEED = 1234
INIT_LATENTS_SEED = 99
STEP_GEN_SEED = 42
STRENGTH = 0.6

CONFIG_BASES = {
    "sd15": "configs/sd15/scheduler/scheduler_config.json",
    "sd21": "configs/sd21/scheduler/scheduler_config.json",
    "sdxl": "configs/sdxl_base/scheduler/scheduler_config.json",
}


# --------------------------------------------------------------------------------------
# The stand-in model.  Its exact text is copied into samplers/README.md.
# --------------------------------------------------------------------------------------
def standin(x, t):
    s = float(t) / 1000.0
    return 0.6 * x * (1.0 - 0.5 * s) + 0.3 * torch.sin(3.0 * x + s) + 0.1 * s


STANDIN_SOURCE = inspect.getsource(standin)


# --------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------
def case(name, cls, base="sd15", steps=10, overrides=None, eta=None, gen=None, strength=None, notes=""):
    return dict(
        name=name,
        cls=cls,
        base=base,
        steps=steps,
        overrides=dict(overrides or {}),
        eta=eta,
        gen=gen,
        strength=strength,
        notes=notes,
    )


G = STEP_GEN_SEED
DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
DPMPP_2M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
DPMPP_3M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}
SDE_SEED = {"noise_sampler_seed": 42}

CASES = [
    # ---- every class with SD1.5's config (epsilon) ------------------------------------
    case("ddpm", "DDPMScheduler", gen=G, notes="DDPM ancestral; draws one randn per step while t > 0 (all 10 steps here)."),
    case("ddim", "DDIMScheduler", eta=0.0, notes="DDIM eta=0 (deterministic)."),
    case("ddim_eta1", "DDIMScheduler", eta=1.0, gen=G, notes="DDIM eta=1: one randn per step."),
    case("pndm", "PNDMScheduler", notes="PLMS (skip_prk_steps=True from the SD config): 11 step calls for 10 steps (the 2nd timestep is repeated)."),
    case("lms", "LMSDiscreteScheduler", notes="LMS order 4 (step() default order=4)."),
    case("euler", "EulerDiscreteScheduler", notes="Euler, timestep_spacing linspace (class default; the SD1.5 json has none)."),
    case("euler_a", "EulerAncestralDiscreteScheduler", gen=G, notes="Euler ancestral: one randn per step, including the last (sigma_up=0 there)."),
    case("heun", "HeunDiscreteScheduler", notes="Heun: 2N-1 step calls; the last call is a plain Euler step to sigma=0."),
    case("dpm2", "KDPM2DiscreteScheduler", notes="DPM2: 2N-1 step calls (first-order / midpoint interleaved); last call is Euler to 0."),
    case("dpm2_a", "KDPM2AncestralDiscreteScheduler", gen=G, notes="DPM2 ancestral: randn drawn on every second-order call (N-1 draws)."),
    case("dpmpp_2m", "DPMSolverMultistepScheduler", overrides=DPMPP_2M, notes="DPM++ 2M."),
    case("dpmpp_2m_sde", "DPMSolverMultistepScheduler", overrides=DPMPP_2M_SDE, gen=G, notes="DPM++ 2M SDE (midpoint): one randn per step incl. the last."),
    case("dpmpp_3m_sde", "DPMSolverMultistepScheduler", overrides=DPMPP_3M_SDE, gen=G, notes="DPM++ 3M SDE: orders 1,2,3,3,3,3,3,3,2,1 (lower_order_final)."),
    case("dpm_singlestep", "DPMSolverSinglestepScheduler",
         notes="DPM-Solver++ singlestep order 2 (diffusers' 'DPM++ 2S' without ancestral noise): order list 1,2,1,2,1,2,1,2,1,1; "
               "an order-2 step restarts from the sample saved at the preceding order-1 step. Not A1111's 'DPM++ 2S a'."),
    case("dpmpp_sde", "DPMSolverSDEScheduler", overrides=SDE_SEED,
         notes="DPM++ SDE (k-diffusion sample_dpmpp_sde, r=1/2): noise from a torchsde BrownianInterval seeded by "
               "config noise_sampler_seed=42, NOT from a torch generator; the increments actually used are stored as brownian.k."),
    case("unipc", "UniPCMultistepScheduler", notes="UniPC bh2, order 2, predictor + corrector."),
    case("deis", "DEISMultistepScheduler", notes="DEIS logrho order 2; final sigma is sigma_min (not 0)."),
    case("lcm", "LCMScheduler", steps=4, gen=G, notes="LCM 4 steps: randn drawn on every step but the last."),
    case("tcd", "TCDScheduler", steps=4, gen=G, notes="TCD 4 steps, step() eta left at its default 0.3 (= the 'eta 0.3' case): randn on every step but the last."),
    case("tcd_eta0", "TCDScheduler", steps=4, eta=0.0, notes="TCD eta=0 (deterministic, no draws)."),
    # ---- sigma spacing variants -------------------------------------------------------
    case("euler_karras", "EulerDiscreteScheduler", overrides={"use_karras_sigmas": True}),
    case("dpmpp_2m_karras", "DPMSolverMultistepScheduler", overrides={**DPMPP_2M, "use_karras_sigmas": True}),
    case("heun_karras", "HeunDiscreteScheduler", overrides={"use_karras_sigmas": True}),
    case("dpm2_karras", "KDPM2DiscreteScheduler", overrides={"use_karras_sigmas": True},
         notes="KDPM2 rounds the karras timesteps (np.round) but not the interpolated ones."),
    case("lms_karras", "LMSDiscreteScheduler", overrides={"use_karras_sigmas": True}),
    case("dpmpp_2m_sde_karras", "DPMSolverMultistepScheduler", overrides={**DPMPP_2M_SDE, "use_karras_sigmas": True}, gen=G),
    case("euler_exponential", "EulerDiscreteScheduler", overrides={"use_exponential_sigmas": True}),
    case("dpmpp_2m_exponential", "DPMSolverMultistepScheduler", overrides={**DPMPP_2M, "use_exponential_sigmas": True}),
    case("euler_beta", "EulerDiscreteScheduler", overrides={"use_beta_sigmas": True}, notes="beta sigmas use scipy.stats.beta.ppf(alpha=beta=0.6)."),
    case("dpmpp_2m_beta", "DPMSolverMultistepScheduler", overrides={**DPMPP_2M, "use_beta_sigmas": True}),
    # ---- timestep spacing (linspace is Euler's default, leading is DDIM's default) -----
    case("euler_leading", "EulerDiscreteScheduler", overrides={"timestep_spacing": "leading"}),
    case("euler_trailing", "EulerDiscreteScheduler", overrides={"timestep_spacing": "trailing"}),
    case("ddim_linspace", "DDIMScheduler", eta=0.0, overrides={"timestep_spacing": "linspace"},
         notes="DDIM's prev_timestep is always t - 1000//N regardless of spacing."),
    case("ddim_trailing", "DDIMScheduler", eta=0.0, overrides={"timestep_spacing": "trailing"}),
    # ---- zero terminal SNR + v-prediction ---------------------------------------------
    case("ddim_zsnr_trailing_v", "DDIMScheduler", base="sd21", eta=0.0,
         overrides={"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
         notes="SD2.1 config (v_prediction) + rescale_betas_zero_snr + trailing."),
    case("euler_zsnr_trailing_v", "EulerDiscreteScheduler", base="sd21",
         overrides={"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
         notes="Euler sets alphas_cumprod[-1] = 2**-24 under zero-SNR, so sigma_max ~ 4096."),
    case("dpmpp_2m_zsnr_trailing_v", "DPMSolverMultistepScheduler", base="sd21",
         overrides={**DPMPP_2M, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
         notes="DPM++ 2M also sets alphas_cumprod[-1] = 2**-24 under zero-SNR."),
    case("unipc_zsnr_trailing_v", "UniPCMultistepScheduler", base="sd21",
         overrides={"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
         notes="UniPC also sets alphas_cumprod[-1] = 2**-24 under zero-SNR."),
    # ---- beta schedules ----------------------------------------------------------------
    case("ddim_linear", "DDIMScheduler", eta=0.0, overrides={"beta_schedule": "linear"}),
    case("ddim_cosine", "DDIMScheduler", eta=0.0, overrides={"beta_schedule": "squaredcos_cap_v2"}),
    case("euler_linear", "EulerDiscreteScheduler", overrides={"beta_schedule": "linear"}),
    case("euler_cosine", "EulerDiscreteScheduler", overrides={"beta_schedule": "squaredcos_cap_v2"}),
    # ---- prediction_type sample --------------------------------------------------------
    case("ddim_sample", "DDIMScheduler", eta=0.0, overrides={"prediction_type": "sample"}),
    # ---- SD2.1 config (v_prediction) subset --------------------------------------------
    case("ddim_sd21", "DDIMScheduler", base="sd21", eta=0.0),
    case("pndm_sd21", "PNDMScheduler", base="sd21"),
    case("euler_sd21", "EulerDiscreteScheduler", base="sd21"),
    case("euler_a_sd21", "EulerAncestralDiscreteScheduler", base="sd21", gen=G),
    case("heun_sd21", "HeunDiscreteScheduler", base="sd21"),
    case("dpm2_a_sd21", "KDPM2AncestralDiscreteScheduler", base="sd21", gen=G),
    case("dpmpp_2m_sd21", "DPMSolverMultistepScheduler", base="sd21", overrides=DPMPP_2M),
    case("dpmpp_2m_sde_karras_sd21", "DPMSolverMultistepScheduler", base="sd21",
         overrides={**DPMPP_2M_SDE, "use_karras_sigmas": True}, gen=G),
    case("unipc_sd21", "UniPCMultistepScheduler", base="sd21"),
    # ---- SDXL base config (epsilon, timestep_spacing leading, steps_offset 1) ---------
    case("ddim_sdxl", "DDIMScheduler", base="sdxl", eta=0.0),
    case("euler_sdxl", "EulerDiscreteScheduler", base="sdxl",
         notes="leading spacing => init_noise_sigma = sqrt(sigma_max^2 + 1)."),
    case("dpmpp_2m_sdxl", "DPMSolverMultistepScheduler", base="sdxl", overrides=DPMPP_2M),
    case("dpmpp_2m_karras_sdxl", "DPMSolverMultistepScheduler", base="sdxl", overrides={**DPMPP_2M, "use_karras_sigmas": True}),
    case("unipc_sdxl", "UniPCMultistepScheduler", base="sdxl"),
    # ---- img2img, strength 0.6 ---------------------------------------------------------
    case("ddim_img2img", "DDIMScheduler", eta=0.0, strength=STRENGTH),
    case("euler_img2img", "EulerDiscreteScheduler", strength=STRENGTH),
    case("euler_a_img2img", "EulerAncestralDiscreteScheduler", gen=G, strength=STRENGTH),
    case("heun_img2img", "HeunDiscreteScheduler", strength=STRENGTH, notes="order 2: begin index = t_start*2."),
    case("dpmpp_2m_img2img", "DPMSolverMultistepScheduler", overrides=DPMPP_2M, strength=STRENGTH),
    case("unipc_img2img", "UniPCMultistepScheduler", strength=STRENGTH),
    case("lcm_img2img", "LCMScheduler", steps=4, gen=G, strength=STRENGTH,
         notes="Uses the StableDiffusionImg2ImgPipeline.get_timesteps truncation as for every img2img case "
               "(LatentConsistencyModelImg2ImgPipeline instead passes strength into set_timesteps)."),
]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def jsonable(v):
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if math.isnan(v):
            return "nan"
        return v
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (np.floating,)):
        return jsonable(float(v))
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, torch.Tensor):
        return jsonable(v.tolist())
    if v is None or isinstance(v, (bool, int, str)):
        return v
    return repr(v)


def f32(t):
    return t.detach().to(torch.float32).contiguous().clone()


def load_configs(root):
    cfgs = {}
    for k, rel in CONFIG_BASES.items():
        with open(os.path.join(root, rel)) as fh:
            cfgs[k] = json.load(fh)
    return cfgs


class DrawRecorder:
    """Wraps `randn_tensor` in a scheduler module and BrownianTreeNoiseSampler.__call__ to record draws."""

    def __init__(self, module):
        self.module = module
        self.draws = []  # (call_index, tensor)
        self.brownian = []  # (call_index, sigma, sigma_next, tensor)
        self.call = 0

    def __enter__(self):
        self.orig = getattr(self.module, "randn_tensor", None)
        if self.orig is not None:
            orig = self.orig

            def rec(*a, **kw):
                out = orig(*a, **kw)
                self.draws.append((self.call, out.detach().clone()))
                return out

            self.module.randn_tensor = rec
        from diffusers.schedulers import scheduling_dpmsolver_sde as sde_mod

        self.sde_cls = sde_mod.BrownianTreeNoiseSampler
        self.sde_orig = self.sde_cls.__call__
        sde_orig = self.sde_orig

        def brec(this, sigma, sigma_next):
            out = sde_orig(this, sigma, sigma_next)
            self.brownian.append((self.call, float(sigma), float(sigma_next), out.detach().clone()))
            return out

        self.sde_cls.__call__ = brec
        return self

    def __exit__(self, *exc):
        if self.orig is not None:
            self.module.randn_tensor = self.orig
        self.sde_cls.__call__ = self.sde_orig
        return False


def override_supported(cls, overrides):
    params = inspect.signature(cls.__init__).parameters
    bad = [k for k in overrides if k not in params]
    return bad


def run_case(spec, cfgs):
    cls = getattr(diffusers, spec["cls"])
    bad = override_supported(cls, spec["overrides"])
    if bad:
        raise NotImplementedError(f"{spec['cls']} has no config option(s) {bad} in diffusers {diffusers.__version__}")
    torch.manual_seed(0)  # nothing should use the global RNG; make sure it would be deterministic anyway
    sched = cls.from_config(copy.deepcopy(cfgs[spec["base"]]), **spec["overrides"])
    steps = spec["steps"]
    sched.set_timesteps(steps)

    tensors = OrderedDict()
    noise = torch.randn(LATENT_SHAPE, generator=gen(NOISE_SEED))
    tensors["noise"] = noise.clone()
    tensors["timesteps"] = f32(sched.timesteps)
    if hasattr(sched, "sigmas") and isinstance(getattr(sched, "sigmas"), torch.Tensor):
        tensors["sigmas"] = f32(sched.sigmas)
    if hasattr(sched, "sigmas_interpol") and isinstance(getattr(sched, "sigmas_interpol"), torch.Tensor):
        tensors["sigmas_interpol"] = f32(sched.sigmas_interpol)
    init_sigma = sched.init_noise_sigma
    tensors["init_noise_sigma"] = torch.tensor([float(init_sigma)], dtype=torch.float32)

    meta = OrderedDict()
    meta["timesteps_dtype"] = str(sched.timesteps.dtype).replace("torch.", "")
    if spec["strength"] is not None:
        strength = spec["strength"]
        init_timestep = min(int(steps * strength), steps)
        t_start = max(steps - init_timestep, 0)
        begin = t_start * sched.order
        timesteps = sched.timesteps[begin:]
        has_begin = hasattr(sched, "set_begin_index")
        if has_begin:
            sched.set_begin_index(begin)
        init_latents = torch.randn(LATENT_SHAPE, generator=gen(INIT_LATENTS_SEED)) * 0.5
        tensors["init_latents"] = init_latents.clone()
        x = sched.add_noise(init_latents, noise, timesteps[:1])
        meta["t_start"] = t_start
        meta["begin_index"] = begin
        meta["set_begin_index_called"] = has_begin
        meta["add_noise_timestep"] = float(timesteps[0])
    else:
        timesteps = sched.timesteps
        x = noise * init_sigma
    tensors["x.0"] = f32(x)

    step_kwargs = {}
    if spec["eta"] is not None:
        step_kwargs["eta"] = spec["eta"]
    g = None
    if spec["gen"] is not None:
        g = gen(spec["gen"])
        step_kwargs["generator"] = g

    module = sys.modules[cls.__module__]
    identity_scale = True
    inputs = OrderedDict()
    with DrawRecorder(module) as rec:
        for k, t in enumerate(timesteps, start=1):
            rec.call = k
            inp = sched.scale_model_input(x, t)
            out = standin(inp, t)
            x = sched.step(out, t, x, **step_kwargs).prev_sample
            tensors[f"t.{k}"] = torch.tensor([float(t)], dtype=torch.float64)
            inputs[k] = f32(inp)
            tensors[f"x.{k}"] = f32(x)
            if not torch.equal(inp, tensors[f"x.{k - 1}"]):
                identity_scale = False
    calls = len(timesteps)
    # model_input.k is stored only where scale_model_input is not the identity (else it is exactly x.{k-1}).
    if not identity_scale:
        for k, inp in inputs.items():
            tensors[f"model_input.{k}"] = inp

    # What was drawn from the step generator: must be exactly the sequence torch.randn(shape, generator=g) ...
    draw_of_call = [None] * calls
    draws = []
    if rec.draws:
        if spec["gen"] is None:
            raise RuntimeError(f"{spec['name']}: randn_tensor drawn without a generator")
        ref = gen(spec["gen"])
        for j, (k, d) in enumerate(rec.draws):
            r = torch.randn(list(d.shape), generator=ref, dtype=d.dtype)
            if not torch.equal(r, d):
                raise RuntimeError(f"{spec['name']}: draw {j} is not the next torch.randn of the generator")
            if draw_of_call[k - 1] is not None:
                raise RuntimeError(f"{spec['name']}: call {k} drew twice")
            draw_of_call[k - 1] = j
            draws.append(d)
    brownian = []
    for (k, s0, s1, w) in rec.brownian:
        tensors[f"brownian.{k}"] = f32(w)
        brownian.append({"call": k, "sigma": s0, "sigma_next": s1})

    meta["calls"] = calls
    meta["scale_model_input_identity"] = identity_scale
    meta["noise_draw_of_call"] = draw_of_call
    meta["num_draws"] = len(draws)
    if brownian:
        meta["brownian_calls"] = brownian
    return sched, tensors, meta, draws


def alphas_cumprod_key(sched):
    cfg = sched.config
    key = cfg.get("beta_schedule", "?")
    if cfg.get("rescale_betas_zero_snr", False):
        key += "_zsnr"
        if float(sched.alphas_cumprod[-1]) == 2.0**-24:
            key += "_last2e-24"
    key += f"_{cfg.get('beta_start')}_{cfg.get('beta_end')}"
    return key


# --------------------------------------------------------------------------------------
# torch CPU RNG: a pure-Python model used to *verify* the algorithm description in
# rng/README.md bit-exactly (mt19937 + torch's uniform/normal transforms).
# --------------------------------------------------------------------------------------
_libm = ctypes.CDLL("libm.so.6")
for _fn in ("logf", "sinf", "cosf", "sqrtf"):
    getattr(_libm, _fn).restype = ctypes.c_float
    getattr(_libm, _fn).argtypes = [ctypes.c_float]
for _fn in ("log1p", "log", "sin", "cos", "sqrt"):
    getattr(_libm, _fn).restype = ctypes.c_double
    getattr(_libm, _fn).argtypes = [ctypes.c_double]

_f32 = np.float32


class TorchCpuRngModel:
    """mt19937 exactly as at::mt19937 + CPUGeneratorImpl (random(), random64(), double-normal cache)."""

    def __init__(self, seed):
        s = seed & 0xFFFFFFFF
        st = [s]
        for j in range(1, 624):
            st.append((1812433253 * (st[-1] ^ (st[-1] >> 30)) + j) & 0xFFFFFFFF)
        self.st, self.idx, self.next_double = st, 624, None

    def _twist(self):
        st = self.st
        for i in range(624):
            y = (st[i] & 0x80000000) | (st[(i + 1) % 624] & 0x7FFFFFFF)
            v = st[(i + 397) % 624] ^ (y >> 1)
            if y & 1:
                v ^= 0x9908B0DF
            st[i] = v
        self.idx = 0

    def random(self):
        if self.idx >= 624:
            self._twist()
        y = self.st[self.idx]
        self.idx += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        y ^= y >> 18
        return y & 0xFFFFFFFF

    def random64(self):
        hi = self.random()
        lo = self.random()
        return (hi << 32) | lo

    def uniform_f32(self):
        return _f32((self.random() & 0xFFFFFF) * (1.0 / (1 << 24)))

    def uniform_f64(self):
        return (self.random64() & ((1 << 53) - 1)) * (1.0 / (1 << 53))

    def normal_f64(self):  # at::normal_distribution<double>, with the generator's cached second value
        if self.next_double is not None:
            v, self.next_double = self.next_double, None
            return v
        u1 = self.uniform_f64()
        u2 = self.uniform_f64()
        r = _libm.sqrt(-2.0 * _libm.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self.next_double = r * _libm.sin(theta)
        return r * _libm.cos(theta)


def _fma32(a, b, c):
    return _f32(np.float64(a) * np.float64(b) + np.float64(c))


def _bits(x):
    return int(np.array([x], dtype=np.float32).view(np.uint32)[0])


def _from_bits(b):
    return _f32(np.array([b & 0xFFFFFFFF], dtype=np.uint32).view(np.float32)[0])


def _log256_ps(x):
    """avx_mathfun.h log256_ps for one lane, with GCC's FMA contraction (as in the AVX2 kernel)."""
    x = _f32(max(x, _from_bits(0x00800000)))
    b = _bits(x)
    e = _f32(_f32((b >> 23) - 0x7F) + _f32(1.0))
    x = _from_bits((b & ~0x7F800000) | _bits(0.5))
    if x < _f32(0.707106781186547524):
        tmp = x
        e = _f32(e - _f32(1.0))
    else:
        tmp = _f32(0.0)
    x = _f32(x - _f32(1.0))
    x = _f32(x + tmp)
    z = _f32(x * x)
    y = _f32(7.0376836292e-2)
    for p in (-1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
              -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1):
        y = _fma32(y, x, _f32(p))
    y = _f32(y * x)
    y = _fma32(y, z, _f32(e * _f32(-2.12194440e-4)))
    y = _fma32(z, _f32(-0.5), y)
    x = _f32(x + y)
    return _fma32(e, _f32(0.693359375), x)


def _sincos256_ps(x):
    """avx_mathfun.h sincos256_ps for one lane (x >= 0 here), with GCC's FMA contraction."""
    sign_sin = x < 0
    x = _f32(abs(x))
    j = int(_f32(x * _f32(1.27323954473516)))
    j = (j + 1) & ~1
    y = _f32(j)
    sign_sin ^= (j & 4) != 0
    poly = (j & 2) == 0
    x = _fma32(y, _f32(-0.78515625), x)
    x = _fma32(y, _f32(-2.4187564849853515625e-4), x)
    x = _fma32(y, _f32(-3.77489497744594108e-8), x)
    sign_cos = ((~(j - 2)) & 4) != 0
    z = _f32(x * x)
    yc = _fma32(_f32(2.443315711809948e-005), z, _f32(-1.388731625493765e-003))
    yc = _fma32(yc, z, _f32(4.166664568298827e-002))
    yc = _f32(yc * z)
    yc = _fma32(yc, z, -_f32(z * _f32(0.5)))
    yc = _f32(yc + _f32(1.0))
    ys = _fma32(_f32(-1.9515295891e-4), z, _f32(8.3321608736e-3))
    ys = _fma32(ys, z, _f32(-1.6666654611e-1))
    ys = _f32(ys * z)
    ys = _fma32(ys, x, x)
    s, c = (ys, yc) if poly else (yc, ys)
    return (_f32(-s) if sign_sin else s), (_f32(-c) if sign_cos else c)


def model_randn_f32(seed, n, avx2=True, g=None):
    g = g or TorchCpuRngModel(seed)
    if n < 16:
        return np.array([_f32(g.normal_f64()) for _ in range(n)], dtype=np.float32)
    d = np.array([g.uniform_f32() for _ in range(n)], dtype=np.float32)

    def fill16(off):
        for j in range(8):
            u1 = _f32(_f32(1.0) - d[off + j])
            u2 = d[off + j + 8]
            if avx2:
                radius = _f32(np.sqrt(_f32(_f32(-2.0) * _log256_ps(u1))))
                s, c = _sincos256_ps(_f32(_f32(2.0 * math.pi) * u2))
            else:
                radius = _f32(_libm.sqrtf(_f32(_f32(-2.0) * _f32(_libm.logf(u1)))))
                theta = _f32(2.0 * math.pi * float(u2))
                s, c = _f32(_libm.sinf(theta)), _f32(_libm.cosf(theta))
            d[off + j] = _f32(radius * c)
            d[off + j + 8] = _f32(radius * s)

    for i in range(0, n - 15, 16):
        fill16(i)
    if n % 16:
        for i in range(16):
            d[n - 16 + i] = g.uniform_f32()
        fill16(n - 16)
    return d


def model_randn_f64(seed, n):
    g = TorchCpuRngModel(seed)
    if n < 16:
        return np.array([g.normal_f64() for _ in range(n)], dtype=np.float64)
    d = np.array([g.uniform_f64() for _ in range(n)], dtype=np.float64)

    def fill16(off):
        for j in range(8):
            u1 = 1.0 - d[off + j]
            u2 = d[off + j + 8]
            radius = _libm.sqrt(-2.0 * _libm.log(u1))
            theta = 2.0 * math.pi * u2
            d[off + j] = radius * _libm.cos(theta)
            d[off + j + 8] = radius * _libm.sin(theta)

    for i in range(0, n - 15, 16):
        fill16(i)
    if n % 16:
        for i in range(16):
            d[n - 16 + i] = g.uniform_f64()
        fill16(n - 16)
    return d


def model_rand_f32(seed, n, g=None):
    g = g or TorchCpuRngModel(seed)
    return np.array([g.uniform_f32() for _ in range(n)], dtype=np.float32)


# --------------------------------------------------------------------------------------
# A1111 "NV" RNG (modules/rng_philox.py of AUTOMATIC1111/stable-diffusion-webui),
# re-implemented here with the same numpy dtypes so the float semantics are identical.
# --------------------------------------------------------------------------------------
PHILOX_M = [0xD2511F53, 0xCD9E8D57]
PHILOX_W = [0x9E3779B9, 0xBB67AE85]
TWO_POW32_INV = np.array([2.3283064e-10], dtype=np.float32)
TWO_POW32_INV_2PI = np.array([2.3283064e-10 * 6.2831855], dtype=np.float32)


def _u64_to_2xu32(x):
    """(N,) uint64 -> (2, N) uint32: row 0 = low words, row 1 = high words (little-endian view)."""
    return x.view(np.uint32).reshape(-1, 2).transpose(1, 0)


def _philox4_round(counter, key):
    v1 = _u64_to_2xu32(counter[0].astype(np.uint64) * PHILOX_M[0])
    v2 = _u64_to_2xu32(counter[2].astype(np.uint64) * PHILOX_M[1])
    counter[0] = v2[1] ^ counter[1] ^ key[0]
    counter[1] = v2[0]
    counter[2] = v1[1] ^ counter[3] ^ key[1]
    counter[3] = v1[0]


def _philox4_32(counter, key, rounds=10):
    for _ in range(rounds - 1):
        _philox4_round(counter, key)
        key[0] = key[0] + PHILOX_W[0]
        key[1] = key[1] + PHILOX_W[1]
    _philox4_round(counter, key)
    return counter


def _philox_box_muller(x, y):
    u = x * TWO_POW32_INV + TWO_POW32_INV / 2
    v = y * TWO_POW32_INV_2PI + TWO_POW32_INV_2PI / 2
    s = np.sqrt(-2.0 * np.log(u))
    r1 = s * np.sin(v)
    return r1.astype(np.float32)


class PhiloxGenerator:
    def __init__(self, seed):
        self.seed = seed
        self.offset = 0

    def randn(self, shape):
        n = int(np.prod(shape))
        counter = np.zeros((4, n), dtype=np.uint32)
        counter[0] = self.offset
        counter[2] = np.arange(n, dtype=np.uint32)
        self.offset += 1
        key = np.empty(n, dtype=np.uint64)
        key.fill(self.seed)
        key = _u64_to_2xu32(key)
        g = _philox4_32(counter, key)
        return _philox_box_muller(g[0], g[1]).reshape(shape)


# --------------------------------------------------------------------------------------
# RNG fixtures
# --------------------------------------------------------------------------------------
RNG_SEEDS = [0, 1, 42, 123456789, 2**32 + 5, 2**63 - 1]
RNG_SHAPES = [[1], [3], [15], [16], [17], [31], [64], [1, 4, 8, 8], [2, 4, 9, 7], [1000]]
RNG64_SEEDS = [0, 42]
RNG64_SHAPES = [[3], [15], [16], [17], [1, 4, 8, 8]]
NOSIMD_SEEDS = [0, 42]
NOSIMD_SHAPES = [[16], [17], [31], [64], [1, 4, 8, 8], [1000]]
PHILOX_SEEDS = [0, 1, 42, 123456789, 2**32 + 5]
PHILOX_SHAPES = [[3, 4], [1], [17], [1, 4, 8, 8], [2, 4, 9, 7]]


def shape_key(shape):
    return "x".join(str(s) for s in shape)


def torch_rng_tensors():
    t = OrderedDict()
    for seed in RNG_SEEDS:
        for shape in RNG_SHAPES:
            t[f"randn.{seed}.{shape_key(shape)}"] = torch.randn(shape, generator=gen(seed))
    for seed in RNG_SEEDS:
        for shape in RNG_SHAPES:
            t[f"rand.{seed}.{shape_key(shape)}"] = torch.rand(shape, generator=gen(seed))
    for seed in RNG64_SEEDS:
        for shape in RNG64_SHAPES:
            t[f"randn64.{seed}.{shape_key(shape)}"] = torch.randn(shape, generator=gen(seed), dtype=torch.float64)
    g = gen(7)
    t["seq.0"] = torch.randn([1, 4, 8, 8], generator=g)
    t["seq.1"] = torch.randn([5], generator=g)
    t["seq.2"] = torch.rand([3], generator=g)
    t["seq.3"] = torch.randn([17], generator=g)
    # The small-size randn path caches its second Box-Muller value in the generator:
    g = gen(7)
    t["seq_cache.0"] = torch.randn([3], generator=g)  # 2 pairs drawn, 1 value cached
    t["seq_cache.1"] = torch.rand([2], generator=g)  # uniforms do not touch the cache
    t["seq_cache.2"] = torch.randn([2], generator=g)  # first value = the cached one
    t["seq_cache.3"] = torch.randn([16], generator=g)  # vectorised path: ignores (and keeps) the cache
    t["seq_cache.4"] = torch.randn([1], generator=g)  # ... so this is still the cached value
    return t


NOSIMD_SNIPPET = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import save_file
    seeds = %r; shapes = %r
    out = {}
    for seed in seeds:
        for shape in shapes:
            out["randn_nosimd.%%d.%%s" %% (seed, "x".join(map(str, shape)))] = torch.randn(
                shape, generator=torch.Generator("cpu").manual_seed(seed))
    out["_capability"] = torch.tensor([0])
    print(torch.backends.cpu.get_cpu_capability())
    save_file(out, sys.argv[1])
    """
)


def nosimd_rng_tensors(tmp_path):
    env = dict(os.environ)
    env["ATEN_CPU_CAPABILITY"] = "default"
    code = NOSIMD_SNIPPET % (NOSIMD_SEEDS, NOSIMD_SHAPES)
    r = subprocess.run([sys.executable, "-c", code, tmp_path], env=env, capture_output=True, text=True, check=True)
    cap = r.stdout.strip().splitlines()[-1]
    from safetensors.torch import load_file

    t = load_file(tmp_path)
    os.remove(tmp_path)
    t.pop("_capability")
    return OrderedDict(sorted(t.items())), cap


def verify_rng_model(t):
    """Check the pure-Python model of torch's CPU generator against every stored tensor."""
    n_ok = 0
    avx2 = True
    for k, v in t.items():
        parts = k.split(".")
        if parts[0] in ("randn", "rand", "randn64", "randn_nosimd"):
            seed = int(parts[1])
            n = int(np.prod([int(s) for s in parts[2].split("x")]))
            if parts[0] == "randn":
                m = model_randn_f32(seed, n, avx2=avx2)
            elif parts[0] == "randn_nosimd":
                m = model_randn_f32(seed, n, avx2=False)
            elif parts[0] == "rand":
                m = model_rand_f32(seed, n)
            else:
                m = model_randn_f64(seed, n)
            ref = v.reshape(-1).numpy()
            if not np.array_equal(m.view(np.uint8), ref.view(np.uint8)):
                raise RuntimeError(f"torch RNG model mismatch for {k}")
            n_ok += 1
    # sequences
    g = TorchCpuRngModel(7)
    seq = [model_randn_f32(7, 256, g=g), model_randn_f32(7, 5, g=g), model_rand_f32(7, 3, g=g), model_randn_f32(7, 17, g=g)]
    g = TorchCpuRngModel(7)
    seqc = [model_randn_f32(7, 3, g=g), model_rand_f32(7, 2, g=g), model_randn_f32(7, 2, g=g),
            model_randn_f32(7, 16, g=g), model_randn_f32(7, 1, g=g)]
    for name, lst in (("seq", seq), ("seq_cache", seqc)):
        for i, m in enumerate(lst):
            if not np.array_equal(m, t[f"{name}.{i}"].reshape(-1).numpy()):
                raise RuntimeError(f"torch RNG model mismatch for {name}.{i}")
            n_ok += 1
    return n_ok


def philox_tensors():
    t = OrderedDict()
    # Self-check against the expected output in the docstring of A1111's rng_philox.py.
    expected = np.array(
        [[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
         [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
         [-1.07454231, -0.36314407, -1.67105067, 2.26550497]], dtype=np.float32)
    got = PhiloxGenerator(0).randn((3, 4))
    # The docstring's numbers are ~2.7e-7 off the committed code (they match an exact-2*pi float64 variant);
    # the committed code (float32 constants) is what is reproduced here.
    if not np.allclose(got, expected, rtol=0, atol=5e-7):
        raise RuntimeError(f"philox self-check failed: {got}")
    for seed in PHILOX_SEEDS:
        for shape in PHILOX_SHAPES:
            t[f"philox.{seed}.{shape_key(shape)}"] = torch.from_numpy(PhiloxGenerator(seed).randn(tuple(shape)).copy())
    for seed in (0, 42):
        g = PhiloxGenerator(seed)
        for i in range(3):
            t[f"philox_seq.{seed}.{i}"] = torch.from_numpy(g.randn((1, 4, 8, 8)).copy())
    return t


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
def save(tensors, path, metadata=None):
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o644)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read())
    return h.hexdigest()


def build(root, out_root, log=print):
    cfgs = load_configs(root)
    sdir = os.path.join(out_root, "samplers")
    rdir = os.path.join(out_root, "rng")
    os.makedirs(sdir, exist_ok=True)
    os.makedirs(rdir, exist_ok=True)

    cases_json = []
    skipped = []
    step_noise = OrderedDict()
    alphas = OrderedDict()
    for spec in CASES:
        try:
            sched, tensors, meta, draws = run_case(spec, cfgs)
        except NotImplementedError as e:
            skipped.append({"name": spec["name"], "class": spec["cls"], "overrides": spec["overrides"], "reason": str(e)})
            log(f"SKIP {spec['name']}: {e}")
            continue
        if spec["gen"] is not None:
            for j, d in enumerate(draws):
                key = f"seed{spec['gen']}.{j}"
                if key in step_noise:
                    assert torch.equal(step_noise[key], d)
                else:
                    step_noise[key] = d.clone()
        akey = alphas_cumprod_key(sched)
        ac = f32(sched.alphas_cumprod)
        if akey in alphas:
            assert torch.equal(alphas[akey], ac), akey
        else:
            alphas[akey] = ac
        entry = OrderedDict()
        entry["name"] = spec["name"]
        entry["class"] = spec["cls"]
        entry["base_config"] = spec["base"]
        entry["overrides"] = jsonable(spec["overrides"])
        # the effective config as diffusers holds it after set_timesteps (diffusers' own bookkeeping key
        # "_use_default_values" dropped; keys the class does not know, e.g. skip_prk_steps for Euler, kept).
        entry["config"] = jsonable({k: v for k, v in sched.config.items() if k != "_use_default_values"})
        entry["steps"] = spec["steps"]
        entry["eta"] = spec["eta"]
        entry["generator_seed"] = spec["gen"]
        entry["strength"] = spec["strength"]
        entry["calls"] = meta.pop("calls")
        entry["order"] = sched.order
        entry["init_noise_sigma"] = float(tensors["init_noise_sigma"][0])
        entry["alphas_cumprod_key"] = akey
        for k, v in meta.items():
            entry[k] = jsonable(v)
        entry["notes"] = spec["notes"]
        cases_json.append(entry)
        save(tensors, os.path.join(sdir, f"{spec['name']}.safetensors"), metadata={"case": spec["name"]})
        log(f"case {spec['name']}: {entry['calls']} calls, {entry['num_draws']} draws")

    save(step_noise, os.path.join(sdir, "step_noise.safetensors"))
    save(alphas, os.path.join(sdir, "alphas_cumprod.safetensors"))
    head = OrderedDict(
        diffusers_version=diffusers.__version__, torch_version=torch.__version__, latent_shape=LATENT_SHAPE,
        noise_seed=NOISE_SEED, init_latents_seed=INIT_LATENTS_SEED, strength=STRENGTH, skipped=skipped)
    with open(os.path.join(sdir, "cases.json"), "w") as fh:
        # one case per line: compact but still diffable
        fh.write("{\n")
        for k, v in head.items():
            fh.write(f"{json.dumps(k)}: {json.dumps(v, separators=(',', ':'))},\n")
        fh.write('"cases": [\n')
        fh.write(",\n".join(json.dumps(c, separators=(",", ":")) for c in cases_json))
        fh.write("\n]\n}\n")
    json.load(open(os.path.join(sdir, "cases.json")))  # must parse

    # RNG
    rt = torch_rng_tensors()
    nosimd, nosimd_cap = nosimd_rng_tensors(os.path.join(rdir, ".nosimd.tmp.safetensors"))
    rt.update(nosimd)
    n_checked = verify_rng_model(rt)
    cap = torch.backends.cpu.get_cpu_capability()
    # a single metadata key: safetensors does not keep the order of several (byte-determinism)
    save(rt, os.path.join(rdir, "torch_rng.safetensors"),
         metadata={"info": json.dumps({"cpu_capability": cap, "nosimd_capability": nosimd_cap,
                                       "torch": torch.__version__}, sort_keys=True)})
    save(philox_tensors(), os.path.join(rdir, "philox.safetensors"))
    log(f"torch rng: capability {cap}, python model verified on {n_checked} tensors")
    return cases_json, skipped, cap


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fixtures", help="fixtures directory (reads configs/, writes samplers/ and rng/)")
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temp dir and compare byte-for-byte with what is on disk")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    log = (lambda *a: None) if args.quiet else print
    if args.check:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            build(args.fixtures, tmp, log=lambda *a: None)
            bad = 0
            for sub in ("samplers", "rng"):
                for fn in sorted(os.listdir(os.path.join(tmp, sub))):
                    a = os.path.join(tmp, sub, fn)
                    b = os.path.join(args.fixtures, sub, fn)
                    if not os.path.exists(b) or sha256(a) != sha256(b):
                        print(f"DIFFERS: {sub}/{fn}")
                        bad += 1
            print("check:", "OK" if bad == 0 else f"{bad} file(s) differ")
            sys.exit(1 if bad else 0)
    build(args.fixtures, args.fixtures, log=log)


if __name__ == "__main__":
    main()
