#!/usr/bin/env bash
# The whole GPU measurement of `ldm` against PyTorch, as one command for a lent GPU machine
# (which has the NVIDIA driver, CUDA 13 libraries as PyTorch's nvidia-* wheels, and PyTorch,
# but no Rust toolchain, no diffusers and no network). Prepare it here, then run it there:
#
#   here:  tools/cuda/pack.sh          # builds (tools/cuda/build.sh) and fills .gpu/
#   there: tools/cuda/gpu_check.sh     # with .gpu carried; results in $OUT (or ./gpu-out)
#
# Steps, each written to the output folder as it finishes (a later one failing keeps the rest;
# seven files, under the eight a call brings back; every log goes to steps.log):
#   1. nvidia-smi, and the binary's view of the device;
#   2. image parity: the tiny SD1.5 / SD2.1 / SDXL pipeline fixtures on cpu and on cuda in f32
#      (mean |Δ| ≤ 1 level), and each against diffusers' pictures;
#   3. inference side by side with PyTorch + SDPA on the same GPU: random SD1.5 at 512² and
#      SDXL at 1024², f16 — U-Net step, VAE decode, whole 20-step image; peak GPU memory;
#   4. one Shapes training step (text encoder + U-Net, batch 16; the autoencoder) against
#      the PyTorch mirror.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"
budget_start=$(date +%s)
log() { echo "[$(( $(date +%s) - budget_start )) s] $*" | tee -a "$out/steps.log"; }

ldm=/tmp/ldm-cuda
xz -dc .gpu/ldm.xz > "$ldm" && chmod +x "$ldm" || { log "no .gpu/ldm.xz: run tools/cuda/pack.sh first"; exit 2; }
if ls .gpu/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The CUDA libraries the binary links (libcublas.so.13, …) from PyTorch's nvidia-* wheels.
libs=$(python3 - <<'EOF'
import glob, os
dirs = set()
try:
    import nvidia
    for root in nvidia.__path__:
        for lib in glob.glob(os.path.join(root, "**", "lib*.so*"), recursive=True):
            dirs.add(os.path.dirname(lib))
except ImportError:
    pass
print(":".join(sorted(dirs)))
EOF
)
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-16}

log "1. device"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
ldd "$ldm" | grep -E "cuda|cublas|curand|nvrtc" >> "$out/nvidia-smi.txt"
"$ldm" --device cuda generate "a red circle on a blue background" --model models/shapes \
  --out "$out/shapes-cuda.png" >> "$out/steps.log" 2>&1 || log "generate on cuda failed"

log "2. parity"
timeout 100 python3 tools/cuda/parity.py --ldm "$ldm" > "$out/parity.md" 2>> "$out/steps.log"
log "parity exit $?"

log "3. inference: sd15 512, f16"
timeout 130 python3 tools/bench/side_by_side.py --device cuda --ldm "$ldm" --arch sd15 --sizes 512 \
  --dtypes f16 --parts unet,vae_decode,generate --runs 5 --markdown "$out/sd15.md" \
  >> "$out/steps.log" 2>&1; log "sd15 exit $?"
log "3. inference: sdxl 1024, f16"
timeout 180 python3 tools/bench/side_by_side.py --device cuda --ldm "$ldm" --arch sdxl --sizes 1024 \
  --dtypes f16 --parts unet,vae_decode,generate --runs 3 --markdown "$out/sdxl.md" \
  >> "$out/steps.log" 2>&1; log "sdxl exit $?"

log "4. training step"
timeout 100 python3 tools/bench/train_step.py --device cuda --ldm "$ldm" --steps 20 --threads 16 \
  --markdown "$out/train.md" >> "$out/steps.log" 2>&1; log "train exit $?"
log "done"
