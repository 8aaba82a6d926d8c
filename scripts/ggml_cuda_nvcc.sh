#!/usr/bin/env bash
# nvcc on one source of a patched llama.cpp tree's ggml-cuda outside its CMake build, with the flags that
# scripts/cuda_sass_diff.sh, scripts/sass_order.py and scripts/gpu_run.sh (fa_polar_harness.cu) share:
#
#   scripts/ggml_cuda_nvcc.sh TREE ARCH NVCC_ARGS...
#   e.g. scripts/ggml_cuda_nvcc.sh "$T" 90 -c "$T/ggml/src/ggml-cuda/polar.cu" -o polar.o
#
# TREE: the llama.cpp folder of a patched tree (its ggml/include, ggml/src and ggml/src/ggml-cuda are the
# include paths); ARCH: the SM version (90: sm_90). nvcc on PATH (PyPI's nvidia-cuda-nvcc has it; its own
# include folders are added). Exit status: nvcc's, 2 on bad arguments.
set -euo pipefail
if [[ $# -lt 3 ]]; then
    sed -n '2,9p' "${BASH_SOURCE[0]}" >&2
    exit 2
fi
T=$1
ARCH=$2
shift 2
[[ -d "$T/ggml/src/ggml-cuda" ]] || { echo "ggml_cuda_nvcc: $T is not a llama.cpp tree (no ggml/src/ggml-cuda)" >&2; exit 2; }
[[ $ARCH =~ ^[0-9]+[a-z]?$ ]] || { echo "ggml_cuda_nvcc: ARCH must be an SM version such as 90, got '$ARCH'" >&2; exit 2; }
command -v nvcc > /dev/null || { echo "ggml_cuda_nvcc: nvcc is not on PATH (pip install nvidia-cuda-nvcc)" >&2; exit 2; }
NV=$(dirname "$(dirname "$(command -v nvcc)")")
exec nvcc -std=c++17 -arch="sm_$ARCH" -O3 -use_fast_math -extended-lambda -DGGML_USE_CUDA -DNDEBUG \
    -I"$NV/include" -I"$NV/include/cccl" -I"$T/ggml/include" -I"$T/ggml/src" -I"$T/ggml/src/ggml-cuda" "$@"
