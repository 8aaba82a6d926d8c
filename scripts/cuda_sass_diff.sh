#!/usr/bin/env bash
# Does a change of cupy_kernels/polar_block.cuh (the device codec that ggml-cuda includes) change
# ggml-cuda's machine code? Compiles ggml-cuda files of a patched llama.cpp tree once with the header of
# each of two commits and compares their SASS (addresses and encodings stripped), without a GPU. Used
# when a change to the shared header is meant for the CuPy kernels only, to show that the build checked
# on the GPU still stands for ggml-cuda (docs/results-cuda.md, session 15).
#
#   scripts/cuda_sass_diff.sh TREE COMMIT_A COMMIT_B [FILE.cu ...]
#
# TREE: a patched llama.cpp source tree (e.g. $KVPOLAR_CACHE/llama-<key>/src/vendor/llama.cpp from
# `KVPOLAR_CUDA=1 python3 scripts/bootstrap.py llama --source-only`); FILE: paths under TREE (default:
# ggml/src/ggml-cuda/polar.cu and the polar/polar vector flash-attention instance). nvcc on PATH (PyPI's
# nvidia-cuda-nvcc has it), sm_${ARCH:-90}. Exit status 0 when every file's SASS is the same, 1 when one
# differs (the first lines of the diff are printed), 2 on bad arguments or a failed compile.
set -euo pipefail
if [[ $# -lt 3 ]]; then
    sed -n '2,15p' "${BASH_SOURCE[0]}" >&2
    exit 2
fi
TREE=$(cd "$1" && pwd)
A=$2
B=$3
shift 3
FILES=("$@")
[[ ${#FILES[@]} -gt 0 ]] || FILES=(ggml/src/ggml-cuda/polar.cu ggml/src/ggml-cuda/template-instances/fattn-vec-instance-polar-polar.cu)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
command -v nvcc > /dev/null || { echo "cuda_sass_diff: nvcc is not on PATH" >&2; exit 2; }
command -v cuobjdump > /dev/null || { echo "cuda_sass_diff: cuobjdump is not on PATH" >&2; exit 2; }
[[ -f "$TREE/ggml/src/ggml-cuda/polar_block.cuh" ]] || { echo "cuda_sass_diff: $TREE is not a patched llama.cpp tree (no ggml/src/ggml-cuda/polar_block.cuh)" >&2; exit 2; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
rc=0
for c in "$A" "$B"; do
    mkdir -p "$WORK/$c"
    cp -r "$TREE/ggml" "$WORK/$c/"
    git -C "$REPO" show "$c:cupy_kernels/polar_block.cuh" > "$WORK/$c/ggml/src/ggml-cuda/polar_block.cuh" ||
        { echo "cuda_sass_diff: no cupy_kernels/polar_block.cuh at $c" >&2; exit 2; }
done
for f in "${FILES[@]}"; do
    for c in "$A" "$B"; do
        T=$WORK/$c
        "$REPO/scripts/ggml_cuda_nvcc.sh" "$T" "${ARCH:-90}" -c "$T/$f" -o "$T/out.o" 2> "$T/nvcc.log" ||
            { echo "cuda_sass_diff: nvcc failed on $f at $c:" >&2; tail -20 "$T/nvcc.log" >&2; exit 2; }
        cuobjdump -sass "$T/out.o" | sed 's#/\*[0-9a-f]*\*/##g; s#/\* 0x[0-9a-f]* \*/##g' > "$T/$(basename "$f").sass"
    done
    n=$(grep -c -E '^\s+[A-Z@]' "$WORK/$A/$(basename "$f").sass" || true)
    if cmp -s "$WORK/$A/$(basename "$f").sass" "$WORK/$B/$(basename "$f").sass"; then
        echo "same SASS: $f ($n instructions) with polar_block.cuh of $A and of $B"
    else
        echo "SASS differs: $f"
        diff "$WORK/$A/$(basename "$f").sass" "$WORK/$B/$(basename "$f").sass" | head -20 || true
        # which kernels: each function's SASS compared on its own (names demangled by c++filt where there is one)
        python3 - "$WORK/$A/$(basename "$f").sass" "$WORK/$B/$(basename "$f").sass" << 'PY'
import re, shutil, subprocess, sys

def functions(path):
    out, name = {}, None
    for line in open(path):
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = []
        elif name:
            out[name].append(line)
    return out

a, b = (functions(p) for p in sys.argv[1:3])
differ = sorted(n for n in a.keys() | b.keys() if a.get(n) != b.get(n))
if shutil.which("c++filt") and differ:
    shown = subprocess.run(["c++filt"], input="\n".join(differ), capture_output=True, text=True).stdout.split("\n")
else:
    shown = differ
print(f"{len(differ)} of {len(a.keys() | b.keys())} functions differ:")
for n in shown[: len(differ)]:
    print("  " + (n if len(n) <= 160 else n[:157] + "..."))
PY
        rc=1
    fi
done
exit $rc
