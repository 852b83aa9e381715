"""ldm and PyTorch diffusers side by side, in one run, on the same shapes and thread count.

Usage:
    python tools/bench/side_by_side.py [--arch sd15] [--sizes 512] [--parts text,unet,vae]
                                       [--dtypes f32,bf16] [--threads 2] [--runs 3]
                                       [--device cpu|cuda] [--ldm target/release/ldm]
                                       [--markdown FILE]

For each architecture it first runs `ldm bench` (random weights made in process, JSON lines),
then builds the same diffusers/transformers modules from the same released configs
(fixtures/configs) with random weights and times them with torch.set_num_threads(--threads):
- unet: one UNet2DConditionModel forward at batch 2 (a guided step), text context of 77 tokens;
- vae_decode: AutoencoderKL.decode of one latent (untiled, as the pipeline does at these sizes);
- text: the text encoder(s) on the prompt and on the negative prompt, 77 tokens each;
- generate: StableDiffusion(XL)Pipeline, 20 steps (--steps), guidance 7.5, with the scheduler
  the config names (PNDM for SD1.5: 21 U-Net evaluations; Euler for SDXL), as ldm does.
f32 runs plain; bf16 runs under torch.autocast("cpu", torch.bfloat16). Medians of --runs timed
runs after one warm-up. FLOPs come from torch.utils.flop_counter.FlopCounterMode (ldm counts its
own). The ratio is PyTorch's time over ldm's: above 1, ldm is faster.

With --device cuda both run on the GPU: `ldm --device cuda bench`, and the PyTorch modules moved
to the GPU in the row's dtype (f16/bf16 weights, as `torch_dtype=` loads them; diffusers' default
attention is SDPA), each timed run ended by a synchronisation. Peak GPU memory: PyTorch's
max_memory_allocated, and for both the largest `memory.used` nvidia-smi saw while the side ran
(over its idle reading: the CUDA context and caching allocators included).
"""
import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"sd15": ROOT / "fixtures/configs/sd15", "sdxl": ROOT / "fixtures/configs/sdxl_base"}
NATIVE = {"sd15": 512, "sdxl": 1024}
TOKENIZER = ROOT / "fixtures/tiny/sd15/tokenizer"
PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"


class GpuMemory:
    """The largest `memory.used` (MiB) nvidia-smi reports while the block runs, over the
    reading before it."""

    def __enter__(self):
        self.base = self.read()
        self.peak = self.base
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()
        return self

    def poll(self):
        while not self.done.wait(0.05):
            self.peak = max(self.peak, self.read())

    @staticmethod
    def read():
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                              "-i", "0"], capture_output=True, text=True).stdout
        try:
            return int(out.split()[0])
        except (IndexError, ValueError):
            return 0

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.read())

    @property
    def used_mib(self):
        return self.peak - self.base


def run_ldm(args, arch, sizes, parts, dtypes):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ldm.jsonl"
        cmd = [args.ldm, "--device", args.device, "bench", "--arch", arch, "--parts", ",".join(parts),
               "--sizes", ",".join(map(str, sizes)), "--dtypes", ",".join(dtypes),
               "--runs", str(args.runs), "--steps", str(args.steps), "--json", str(out)]
        env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
        print("$", " ".join(cmd), flush=True)
        if args.device == "cuda":
            with GpuMemory() as mem:
                proc = subprocess.run(cmd, env=env, text=True, capture_output=True)
            print(f"ldm: peak GPU memory {mem.used_mib} MiB over idle (nvidia-smi)", flush=True)
            args.ldm_gpu_mib[arch] = mem.used_mib
        else:
            proc = subprocess.run(cmd, env=env, text=True, capture_output=True)
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            print(f"ldm bench failed ({proc.returncode}); its rows are left empty", flush=True)
        rows = {}
        if out.exists():
            for line in out.read_text().splitlines():
                r = json.loads(line)
                rows[(r["part"], r["size"], r["dtype"])] = r
        return rows


def build_torch(arch):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    root = CONFIGS[arch]
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet")).eval()
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae")).eval()
    encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder")).eval()]
    if (root / "text_encoder_2").exists():
        encoders.append(
            CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(root / "text_encoder_2")).eval())
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    # Some released configs name float16 (`torch_dtype`); both sides compute in f32 (bf16 rows
    # use autocast).
    unet, vae = unet.float(), vae.float()
    encoders = [e.float() for e in encoders]
    return unet, vae, encoders, tokenizer


def flops_of(fn):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


TORCH_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def to_device(args, modules, dtype):
    """On the GPU the modules hold the row's dtype (as `torch_dtype=` loads them); on the CPU
    they stay f32 and bf16 rows use autocast."""
    import torch

    if args.device != "cuda":
        return modules
    unet, vae, encoders, tokenizer = modules
    td = getattr(torch, TORCH_DTYPES[dtype])
    return (unet.to("cuda", td), vae.to("cuda", td), [e.to("cuda", td) for e in encoders], tokenizer)


def time_torch(args, arch, modules, part, size, dtype):
    import torch

    unet, vae, encoders, tokenizer = modules
    dev = "cuda" if args.device == "cuda" else "cpu"
    wd = unet.dtype  # the weights' dtype: inputs follow it
    g = torch.Generator().manual_seed(0)
    ids = [tokenizer(t, padding="max_length", max_length=77, truncation=True,
                     return_tensors="pt").input_ids.to(dev) for t in (PROMPT, NEGATIVE)]
    if part == "unet":
        h = size // 8
        x = torch.randn(2, 4, h, h, generator=g).to(dev, wd)
        t = torch.tensor([500.0, 500.0]).to(dev)
        ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(dev, wd)
        kw = {}
        if unet.config.addition_embed_type == "text_time":
            kw["added_cond_kwargs"] = {
                "text_embeds": torch.randn(2, 1280, generator=g).to(dev, wd),
                "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32).to(dev, wd),
            }
        fn = lambda: unet(x, t, encoder_hidden_states=ctx, **kw).sample
    elif part == "vae_decode":
        z = torch.randn(1, 4, size // 8, size // 8, generator=g).to(dev, wd)
        fn = lambda: vae.decode(z).sample
    elif part == "text":
        def fn():
            for i in ids:
                for e in encoders:
                    e(i, output_hidden_states=True)
    elif part == "generate":
        fn = generate_fn(args, arch, modules, size)
    else:
        raise ValueError(part)

    def call():
        with torch.no_grad():
            if dtype == "bf16" and dev == "cpu":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = fn()
            else:
                out = fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        return out

    runs, warmup = (1, 0) if part == "generate" else (args.runs, 1)
    for _ in range(warmup):
        call()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    flops = None
    if part != "generate":
        with torch.no_grad():
            flops = flops_of(fn)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else None
    return {"runs_ms": times, "median_ms": statistics.median(times), "flops": flops, "peak_mib": peak}


def generate_fn(args, arch, modules, size):
    import diffusers
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    unet, vae, encoders, tokenizer = modules
    # The scheduler the released config names (PNDM for SD1.5, Euler for SDXL), as both
    # diffusers' from_pretrained and `ldm bench` use: PNDM evaluates the U-Net steps + 1 times.
    config = json.loads((CONFIGS[arch] / "scheduler" / "scheduler_config.json").read_text())
    sched = getattr(diffusers, config["_class_name"]).from_config(config)
    if arch == "sd15":
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, unet=unet,
                                       scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=sched)
    if args.device == "cuda":
        pipe = pipe.to("cuda")
    pipe.set_progress_bar_config(disable=True)
    return lambda: pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, guidance_scale=7.5,
                        width=size, height=size, output_type="np")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sd15")
    p.add_argument("--sizes", default=None)
    p.add_argument("--parts", default="text,unet,vae_decode")
    p.add_argument("--dtypes", default="f32,bf16")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--ldm", default=str(ROOT / "target/release/ldm"))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--markdown", default=None, help="also write the table here")
    args = p.parse_args()
    args.ldm_gpu_mib = {}

    import torch
    import diffusers

    torch.set_num_threads(args.threads)
    parts = [x if x != "vae" else "vae_decode" for x in args.parts.split(",")]
    dtypes = args.dtypes.split(",")
    gpu = f"; GPU: {torch.cuda.get_device_name(0)}" if args.device == "cuda" else ""
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores{gpu}; "
        f"threads: {args.threads}; torch {torch.__version__}, diffusers {diffusers.__version__}",
        "",
        "| arch | bench | size | dtype | ldm ms | PyTorch ms | ratio (PyTorch/ldm) | ldm GFLOP | PyTorch GFLOP | ldm GFLOP/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arch in args.arch.split(","):
        sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [NATIVE[arch]]
        ours = run_ldm(args, arch, sizes, parts, dtypes)
        modules = build_torch(arch)
        for dtype in dtypes:
            modules = to_device(args, modules, dtype)
            mem = GpuMemory() if args.device == "cuda" else None
            if mem:
                mem.__enter__()
            for size in sizes:
                for part in parts:
                    theirs = time_torch(args, arch, modules, part, size, dtype)
                    if theirs["peak_mib"] is not None:
                        print(f"PyTorch {arch} {part} {size} {dtype}: max_memory_allocated "
                              f"{theirs['peak_mib']:.0f} MiB", flush=True)
                    mine = ours.get((part, size, dtype))
                    mine_ms = mine["median_ms"] if mine else None
                    ratio = f"{theirs['median_ms'] / mine_ms:.2f}" if mine_ms else "—"
                    fmt = lambda v, d=1: f"{v:.{d}f}" if v is not None else "—"
                    row = (f"| {arch} | {part} | {size} | {dtype} | {fmt(mine_ms)} | {fmt(theirs['median_ms'])} | "
                           f"{ratio} | {fmt(mine['gflop'] if mine else None)} | "
                           f"{fmt(theirs['flops'] / 1e9 if theirs['flops'] else None)} | "
                           f"{fmt(mine['gflops_per_s'] if mine else None)} |")
                    print(row, flush=True)
                    lines.append(row)
            if mem:
                mem.__exit__(None, None, None)
                lines.append(f"PyTorch {arch} {dtype}: peak GPU memory {mem.used_mib} MiB over idle (nvidia-smi)")
        if arch in args.ldm_gpu_mib:
            lines.append(f"ldm {arch} (all its rows): peak GPU memory {args.ldm_gpu_mib[arch]} MiB over idle (nvidia-smi)")
        del modules
        gc.collect()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    lines.append("")
    lines.append(f"PyTorch process peak RSS: {peak:.2f} GiB")
    print("\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
