#!/usr/bin/env bash
# Builds `ldm` with CUDA on a machine that has no GPU and no CUDA toolkit: the CUDA compiler,
# headers and libraries come from PyPI's nvidia-* wheels (docs/cuda.md explains each step).
#
#   tools/cuda/build.sh                 # target/cuda/release/ldm for CUDA 13.0, sm_90 (H100/H200)
#   CUDA_VERSION=12.8 CUDA_COMPUTE_CAP=89 tools/cuda/build.sh
#   LDM_CUDA_NO_EMBED=1 tools/cuda/build.sh   # leave the embedded models out (a smaller binary)
#
# The toolkit's version must not be newer than the driver on the machine that runs the binary
# (`nvidia-smi` prints the newest CUDA its driver takes): the kernels ship as PTX, which a
# driver older than the compiler refuses. The binary links the CUDA libraries by their major
# version (libcublas.so.13, …); where it runs, they come from the same wheels or a toolkit on
# LD_LIBRARY_PATH (tools/cuda/env.sh prints the path from a Python that has them).
set -euo pipefail
cd "$(dirname "$0")/../.."

version=${CUDA_VERSION:-13.0}
cap=${CUDA_COMPUTE_CAP:-90}
sdk=${LDM_CUDA_SDK:-$PWD/target/cuda-sdk/$version}
major=${version%%.*}

# The wheels of one CUDA release. cuBLAS and cuRAND number their own releases.
case "$version" in
  13.0) cublas=13.0.2.14; curand=10.4.0.35 ;;
  12.8) cublas=12.8.4.1; curand=10.3.9.90 ;;
  *) echo "tools/cuda/build.sh: add the cuBLAS and cuRAND versions of CUDA $version" >&2; exit 2 ;;
esac
if [ ! -x "$sdk/py/nvidia/cu$major/bin/nvcc" ] && [ ! -x "$sdk/py/nvidia/cuda_nvcc/bin/nvcc" ]; then
  echo "installing the CUDA $version wheels into $sdk/py" >&2
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$sdk/py" \
    "nvidia-cuda-nvcc==$version.*" "nvidia-nvvm==$version.*" "nvidia-cuda-crt==$version.*" "nvidia-cuda-cccl==$version.*" \
    "nvidia-cuda-runtime==$version.*" "nvidia-cuda-nvrtc==$version.*" \
    "nvidia-cublas==$cublas" "nvidia-curand==$curand"
fi
# CUDA 13 wheels share one tree (nvidia/cu13); CUDA 12's put each package in its own.
if [ -d "$sdk/py/nvidia/cu$major" ]; then
  root="$sdk/py/nvidia/cu$major"
else
  root="$sdk/root"
  mkdir -p "$root/bin" "$root/include" "$root/lib"
  for d in "$sdk"/py/nvidia/*/; do
    for sub in bin include lib; do
      [ -d "$d$sub" ] && cp -rsf "$d$sub/." "$root/$sub/"
    done
  done
fi

# The linker wants unversioned names (-lcublas) and a libcuda.so: the driver library is not
# in any wheel, so a stub that defines every driver entry point cuda.h declares stands in for
# it at link time (NVIDIA's toolkits ship such a stub in lib/stubs). The real driver's
# libcuda.so.1 is what loads at run time. Like NVIDIA's, every stub entry point answers
# CUDA_ERROR_STUB_LIBRARY (34), so with lib/stubs on LD_LIBRARY_PATH the binary also starts on
# a machine without a driver: `--device cpu` computes, `--device cuda` says there is no GPU.
stubs="$root/lib/stubs"
mkdir -p "$stubs"
for lib in "$root"/lib/lib*.so.*; do
  base=$(basename "$lib")
  ln -sf "$lib" "$root/lib/${base%%.so.*}.so"
done
if [ ! -f "$stubs/libcuda.so.1" ]; then
  {
    echo 'int cuGetErrorString(int e, const char **s) { *s = "no NVIDIA driver (the CUDA driver stub answered)"; return 0; }'
    echo 'int cuGetErrorName(int e, const char **s) { *s = "CUDA_ERROR_STUB_LIBRARY"; return 0; }'
    grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$root/include/cuda.h" | sort -u |
      grep -vxE 'cuGetErrorString|cuGetErrorName' | awk '{ printf "int %s(void) { return 34; }\n", $1 }'
  } > "$stubs/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so.1" "$stubs/cuda_stub.c"
  ln -sf libcuda.so.1 "$stubs/libcuda.so"
fi

export CUDA_ROOT="$root" CUDA_PATH="$root" CUDA_HOME="$root"
export PATH="$root/bin:$PATH"
export CUDA_COMPUTE_CAP="$cap"
export LIBRARY_PATH="$root/lib:$stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
nvcc --version | tail -2 >&2

features=ldm-cli/cuda
if [ -n "${LDM_CUDA_NO_EMBED:-}" ]; then
  cargo build --release --target-dir target/cuda -p ldm-cli --no-default-features --features "$features"
else
  cargo build --release --target-dir target/cuda -p ldm-cli --features "$features"
fi
echo "target/cuda/release/ldm (CUDA $version, sm_$cap)"
