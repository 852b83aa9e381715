#!/usr/bin/env bash
# Fills .gpu/ with what tools/cuda/gpu_check.sh needs on a GPU machine that cannot fetch
# anything: the CUDA build of `ldm` without its embedded models (they travel as models/ in the
# working tree), stripped and xz-compressed to fit the 64 MiB a device call carries, and the
# diffusers wheel (the machine has PyTorch and transformers, not diffusers).
set -euo pipefail
cd "$(dirname "$0")/../.."
LDM_CUDA_NO_EMBED=1 tools/cuda/build.sh
mkdir -p .gpu
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
strip -o .gpu/ldm target/cuda/release/ldm
xz -T0 -9e -f .gpu/ldm
rm -f .gpu/*.whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform any -d .gpu diffusers==0.42.1
ls -la .gpu
# A device call carries the tracked tree and .gpu together, 64 MiB at most.
total=$(( $(git ls-files -z | xargs -0 cat | wc -c) + $(cat .gpu/* | wc -c) ))
echo "tree + .gpu: $((total / 1048576)) MiB of the 64 MiB a device call carries"
[ "$total" -le $((64 * 1048576)) ] || { echo "too large to carry" >&2; exit 1; }
echo "carry .gpu: run(command='tools/cuda/gpu_check.sh', carry=['.gpu'], timeout_s=600)"
