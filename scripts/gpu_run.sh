#!/usr/bin/env bash
# How the llama.cpp-on-GPU numbers in docs/results-cuda.md are produced on a machine that has an
# NVIDIA GPU but no network (the H200 machine): the patched CUDA source tree, the models and the
# wheels it lacks travel with the repo as ignored folders, and four steps run there.
#
#   here:   scripts/gpu_run.sh prepare      # source tree (KVPOLAR_CUDA=1, archs $KVPOLAR_CUDA_ARCHS,
#                                           # default 90) -> .gpurun/a/src.txz; SmolLM2 (in three parts),
#                                           # a Qwen2.5-1.5B skeleton, SQuAD, the gguf wheel -> .gpurun/{a,b,c,whl};
#                                           # KVPOLAR_EXPERIMENTS="x.diff ..." applies patches/experiments/x.diff
#   here:   scripts/gpu_run.sh xprepare     # (after prepare) the CUDA build made here with PyPI's CUDA 13.0
#                                           # toolchain, the GPU machine's (pinned below), ~25 min on 2 cores
#                                           # -> .gpurun/x1, x2 (halves): carried, they save the machine the build
#   there:  (every step first keeps the parts of whichever of .gpurun/a, b, c, x1, x2 it carries in /tmp/gpurun-parts;
#           the steps that run models need all three, so carry a, b and c in three calls, e.g. build, parts, verify)
#           scripts/gpu_run.sh xbin         # (`parts` carrying .gpurun/x1, then this carrying x2) xprepare's
#                                           # binaries as build/bin, with the machine's libcudart/libcublas;
#                                           # fails, naming what is missing, where they do not load or run
#                                           # (then `build` there as before)
#           scripts/gpu_run.sh parts        # only that: keep the carried parts, list what the machine holds
#                                           # and the gguf wheel the model and CuPy steps will install
#           scripts/gpu_run.sh build        # unpack under the build key, start the CUDA build (background),
#                                           # run scripts/fa_polar_harness.cu, the CuPy GPU tests and the CuPy
#                                           # benchmarks (encode-latency, encode-variants, compare, anatomy;
#                                           # GPU_RUN_CUPY_BENCHES: a subset) meanwhile (the logs: build-logs.tgz)
#           scripts/gpu_run.sh ops          # wait for the build, then cuda_llama_check.sh's steps 1-2 (every polar
#                                           # test-backend-ops case, the support query; no models): a short lease
#           scripts/gpu_run.sh checks       # models, wait for the build, start cuda_llama_check.sh (background;
#                                           # steps 3-7 only where `ops` passed on this machine before)
#           scripts/gpu_run.sh profile      # models, wait for the build, then (no checks) each decode-step
#                                           # kernel under ncu, and tg64 with and without CUDA graphs
#           scripts/gpu_run.sh collect      # wait for the checks, pack their summary and the failing logs
#           scripts/gpu_run.sh verify       # models, wait for the build, then a short check of a tree: the polar
#                                           # FLASH_ATTN_EXT and LAYER_CHAINS cases, greedy decode fused = unfused
#           scripts/gpu_run.sh ab [SET]     # models, wait for the build, ab_llama_gpu.py --set SET (default sched)
#                                           # on both models (AB_PASSES=N: N passes, packed in one ab.tgz)
#           scripts/gpu_run.sh script FILE  # models, wait for the build, then `bash FILE` (a diagnosis kept in
#                                           # scripts/, e.g. fa_off_diag.sh; what it writes under $OUT comes back)
#           scripts/gpu_run.sh harness ARGS # only scripts/fa_polar_harness.cu on the prepared tree (no llama
#                                           # build), e.g. `harness --pb-sweep`
#           scripts/gpu_run.sh variants     # the harness for each set of flags in $HARNESS_VARIANTS (first checked)
#           scripts/gpu_run.sh kernel-profile # the harness's --profile launches under ncu (--set full, SASS-level
#                                           # stall samples): the tensor-core kernel at 256 and 32768 keys (Qwen2.5), 16384 (SmolLM2)
#           scripts/gpu_run.sh chain-profile [qwen|smol] # one launch of the layer's write kernel in a decode under ncu
#           scripts/gpu_run.sh encode-profile # the CuPy encoder's throughput kernel under ncu (no llama build)
#           scripts/gpu_run.sh trace        # models, wait for the build, then a timeline of the decode steps
#                                           # (trace_decode_gpu.py, CUPTI): f16, q4_0, polar at the tg depths
#                                           # (TRACE_HOST=1: the host's side of each step, runtime calls only)
#           scripts/gpu_run.sh bench ab     # (after the checks if they run, else the build) ab_llama_gpu --set kernel, perf_ops_gpu
#           scripts/gpu_run.sh bench tables # bench_llama_gpu.py on both models
#           scripts/gpu_run.sh cupy tests [PYTEST ARGS] | bench ARGS | decode ARGS   # the CuPy kernels alone (no
#                                           # llama.cpp build; carry .gpurun/whl): pytest (default: the GPU test
#                                           # files, more than 330 s on an H100 in session 43: give the call 600 s,
#                                           # or name files), scripts/bench_gpu.py ARGS, scripts/gpu_decode_bench.py ARGS
#           scripts/gpu_run.sh cupy issue11 [SECONDS] # issue 11's kernel measurements, most important first,
#                                           # within SECONDS (default 540): bench_gpu.py compare, scaling, tune-mma's
#                                           # depth and ctas phases on polar K+V, anatomy, encode -> issue11-*.txt,
#                                           # their JSONs in issue11-json.tgz (a device run returns 8 files)
#
# Results go to $OUT (default ./gpu-run-out). The model is split over three folders (a, b and c) of about
# 36 MB so that each call's upload, the repository's tracked files included, stays well under 64 MiB; a
# call that carries .gpurun/a runs `build`, the next two carry b and c (with .gpurun/whl where a step needs
# the wheel). The steps leave the build and the checks running in the background
# (setsid), so they must run on the same machine one after another. Exit status: non-zero when a
# step failed (bench: when a benchmark script failed).
set -euo pipefail
case ${1:-} in
prepare | xprepare | xbin | build | parts | ops | checks | profile | collect | verify | ab | script | harness | variants | kernel-profile | chain-profile | encode-profile | trace | bench | cupy) ;;
*)
    awk 'NR > 1 && !/^#/ { exit } NR > 1' "${BASH_SOURCE[0]}" >&2 # the header comment above
    exit 2
    ;;
esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."
G=${GPU_RUN_DIR:-.gpurun} # (GPU_RUN_DIR: another folder, for the tests)
P=${GPU_RUN_PARTS:-/tmp/gpurun-parts} # the carried parts, kept on the machine from call to call (each call carries one folder)
# this machine's run state, from call to call: the build's log, the models' and ops' markers, the checks' log and
# folders (GPU_RUN_STATE: another folder, and GPU_RUN_CHECK: a stand-in for cuda_llama_check.sh, for the tests)
S=${GPU_RUN_STATE:-/tmp}
CHECK=${GPU_RUN_CHECK:-scripts/cuda_llama_check.sh}
OUT=${OUT:-$PWD/gpu-run-out}
mkdir -p "$OUT"
# what the CuPy tests and benchmarks import there: the gguf wheel (site_wheels), kvpolar, cupy_kernels, scripts/
SITEPATH=/tmp/site:$PWD/converter:$PWD:$PWD/scripts
if [[ $1 != prepare && $1 != xprepare ]]; then # (the case above has checked $1)
    mkdir -p "$P"
    for d in a b c x1 x2; do
        if [[ -d $G/$d ]]; then
            find "$G/$d" -maxdepth 1 -type f ! -name src.txz -exec cp {} "$P"/ \;
        fi
    done
    # the experiment diffs of the build (prepare), which the benchmark JSONs record (llama_bench.build_info)
    if [[ -f $P/experiments.txt ]]; then
        export KVPOLAR_EXPERIMENTS_FILE=$P/experiments.txt
    fi
fi
export KVPOLAR_CUDA=1 KVPOLAR_CUDA_ARCHS=${KVPOLAR_CUDA_ARCHS:-90}
if [[ -f /tmp/xbin/libdirs ]]; then # xbin's binaries: the folders of the machine's CUDA libraries
    export LD_LIBRARY_PATH=/tmp/xbin:$(cat /tmp/xbin/libdirs)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
# xprepare's toolchain: the CUDA 13.0 of the GPU machine's image (nvcc 13.0, driver 580), from PyPI
XTOOLCHAIN=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14)
DATA=${KVPOLAR_CACHE:-$HOME/.cache/kvpolar}/data
SMOL=SmolLM2-135M-Instruct.Q4_1.gguf

gguf_wheel() { # the gguf wheel: prepare puts it in .gpurun/a (kept in $P by every step after the call that
    # carried a) and in .gpurun/whl; prints its path, or nothing. (Not `ls A B | head`: under pipefail a
    # missing folder made `w=$(gguf_wheel)` end the script with ls's status 2, after session 28's harness.)
    local w
    for w in "$P"/gguf-*.whl "$G"/whl/gguf-*.whl; do
        if [[ -f $w ]]; then
            echo "$w"
            return 0
        fi
    done
}

site_wheels() { # the gguf wheel into /tmp/site, for the model tools, the CuPy tests and benchmarks
    local w
    w=$(gguf_wheel)
    [[ -n $w ]] || { echo "gpu_run: no gguf wheel: carry .gpurun/a or .gpurun/whl (gpu_run.sh prepare makes both)" >&2; return 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$w"
}

cupy_bench() { # cupy_bench NAME TIMEOUT ARGS...: scripts/bench_gpu.py ARGS -> $OUT/NAME.json and NAME.txt
    local name=$1 t=$2   # (GPU_RUN_CUPY_BENCHES="NAME ...": only those run, the others say so in NAME.txt)
    shift 2
    if [[ -n ${GPU_RUN_CUPY_BENCHES:-} && " $GPU_RUN_CUPY_BENCHES " != *" $name "* ]]; then
        echo "$name: not run (GPU_RUN_CUPY_BENCHES=$GPU_RUN_CUPY_BENCHES)" > "$OUT/$name.txt"
        return 0
    fi
    PYTHONPATH=$SITEPATH timeout "$t" python3 scripts/bench_gpu.py "$@" \
        --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1
}

models_and_build() { # the models in /tmp (once a machine: the next step finds them), then wait for the background build
    if [[ ! -f "$S/models.ok" ]]; then
        local f missing=""
        for f in smol.part.a smol.part.b smol.part.c smol.sha256 qwen.skel.xz squad.txt.xz; do
            [[ -f $P/$f ]] || missing+=" $f"
        done
        [[ -z $missing ]] || { echo "gpu_run: not on this machine yet:$missing; carry .gpurun/a, b and c (one call each) first" >&2; exit 1; }
        site_wheels
        cat "$P"/smol.part.a "$P"/smol.part.b "$P"/smol.part.c > /tmp/smol.gguf
        [[ "$(sha256sum /tmp/smol.gguf | cut -d' ' -f1)" == "$(cat "$P/smol.sha256")" ]] || { echo "model sha256 differs" >&2; exit 1; }
        unxz_to "$P/qwen.skel.xz" /tmp/qwen.skel
        unxz_to "$P/squad.txt.xz" /tmp/squad.txt
        PYTHONPATH=/tmp/site:$PWD/converter python3 scripts/synth_gguf.py build /tmp/qwen.skel /tmp/qwen.gguf
        touch "$S/models.ok"
    fi
    wait_build
}

wait_build() { # wait for the background build that `build` started on this machine
    [[ -f "$S/gpu-run-build.log" ]] || { echo "gpu_run: no build on this machine: run build first (it carries .gpurun/a)" >&2; exit 1; }
    until grep -q "llama.cpp built in" "$S/gpu-run-build.log"; do
        if grep -q -E "subcommand failed|error:" "$S/gpu-run-build.log"; then
            tail -20 "$S/gpu-run-build.log"; exit 1
        fi
        sleep 5
    done
    tail -3 "$S/gpu-run-build.log" | tee "$OUT/build-tail.txt"
}

wait_checks() { # wait for the checks that `checks` started on this machine; their summary to $OUT
    until grep -q "^check rc=" "$S/gpu-run-check.log" 2>/dev/null; do sleep 5; done
    cp "$S/gpu-run-check.log" "$OUT/check-summary.txt"
}

ncu_pages() { # ncu_pages NAME: /tmp/NAME.ncu-rep's details page and SASS-level source page to $OUT/NAME-*
    ncu -i "/tmp/$1.ncu-rep" --page details > "$OUT/$1-details.txt"
    ncu -i "/tmp/$1.ncu-rep" --page source --csv --print-source sass > "/tmp/$1-sass.csv" 2>&1 || true
    gzip -c "/tmp/$1-sass.csv" > "$OUT/$1-sass.csv.gz"
}

unxz_to() { # unxz_to FILE.xz OUT (Python's lzma: the machine may lack the xz tool)
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2"
}

unpack_src() { # unpack_src DIR: the prepared source tree into DIR (Python's tarfile reads xz without the xz tool)
    mkdir -p "$1" && python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="fully_trusted")' "$G/a/src.txz" "$1"
}

harness_tree() { # the prepared source tree under its build key (unpacked once); prints its llama.cpp folder
    local key dir
    key=$(python3 scripts/bootstrap.py key)
    dir=${KVPOLAR_CACHE:-$HOME/.cache/kvpolar}/llama-$key
    [[ -d "$dir/src" ]] || unpack_src "$dir"
    echo "$dir/src/vendor/llama.cpp"
}

harness_bin() { # harness_bin OUT [nvcc flags...]: scripts/fa_polar_harness.cu against the prepared tree
    local out=$1 T
    shift
    T=$(harness_tree)
    scripts/ggml_cuda_nvcc.sh "$T" "${KVPOLAR_CUDA_ARCHS%%[;,]*}" "$@" -o "$out" scripts/fa_polar_harness.cu
}

case ${1:-} in
prepare)
    rm -rf "$G" && mkdir -p "$G/a" "$G/b" "$G/c" "$G/whl"
    python3 scripts/bootstrap.py venv # (synth_gguf.py below runs in it; a fresh machine has none)
    python3 scripts/bootstrap.py data --qwen
    python3 scripts/bootstrap.py llama --source-only
    key=$(python3 scripts/bootstrap.py key)
    src=${KVPOLAR_CACHE:-$HOME/.cache/kvpolar}/llama-$key
    # the build key is the series' (bootstrap.py key), blind to experiment diffs: experiments.txt names them
    # (sha256 and file) for the build's logs, "none" without
    echo none > "$G/a/experiments.txt"
    if [[ -n "${KVPOLAR_EXPERIMENTS:-}" ]]; then # measured experiments on top of the series, by name
        tmp=$(mktemp -d) && cp -a "$src/src" "$tmp/"
        : > "$G/a/experiments.txt"
        for d in $KVPOLAR_EXPERIMENTS; do
            git -C "$tmp/src/vendor/llama.cpp" apply "$PWD/patches/experiments/$d" && echo "applied $d"
            (cd patches/experiments && sha256sum "$d") >> "$G/a/experiments.txt"
        done
        src=$tmp
    fi
    tar cf - -C "$src" --exclude=.git --exclude='*.gguf' \
        --exclude=src/vendor/llama.cpp/docs --exclude=src/vendor/llama.cpp/media \
        --exclude=src/vendor/llama.cpp/models --exclude=src/vendor/llama.cpp/benches --exclude=src/docs \
        --exclude=src/examples $(for b in opencl vulkan sycl hexagon metal et webgpu openvino cann virtgpu zdnn; do
            echo "--exclude=src/vendor/llama.cpp/ggml/src/ggml-$b"; done) src | xz -9 -T2 > "$G/a/src.txz"
    # (the backends a CUDA build does not configure are left out, and xz packs 2 MB tighter than gzip: every
    # call's upload, the repository's tracked files included, must stay under 64 MiB)
    sha256sum "$DATA/$SMOL" | cut -d' ' -f1 > "$G/b/smol.sha256"
    xz -9 -c "$DATA/squad.txt" > "$G/b/squad.txt.xz"
    eval "$(python3 scripts/bootstrap.py env)"
    PYTHONPATH=converter "$KVPOLAR_PYTHON" scripts/synth_gguf.py skeleton "$DATA/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf" "$G/qwen.skel"
    xz -9 -c "$G/qwen.skel" > "$G/b/qwen.skel.xz" && rm "$G/qwen.skel"
    # SmolLM2 in three parts, so that a (with the source), b (with the small files) and c weigh the same
    sm=$(stat -c %s "$DATA/$SMOL")
    third=$(( (sm + $(du -cb "$G"/b/* | tail -1 | cut -f1) + $(stat -c %s "$G/a/src.txz")) / 3 ))
    na=$(( third - $(stat -c %s "$G/a/src.txz") ))
    nb=$(( third - $(du -cb "$G"/b/* | tail -1 | cut -f1) ))
    dd if="$DATA/$SMOL" of="$G/a/smol.part.a" bs=1M iflag=count_bytes count="$na" status=none
    dd if="$DATA/$SMOL" of="$G/b/smol.part.b" bs=1M iflag=skip_bytes,count_bytes skip="$na" count="$nb" status=none
    dd if="$DATA/$SMOL" of="$G/c/smol.part.c" bs=1M iflag=skip_bytes skip=$(( na + nb )) status=none
    cat "$G"/a/smol.part.a "$G"/b/smol.part.b "$G"/c/smol.part.c | cmp - "$DATA/$SMOL"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d "$G/whl" gguf==0.19.0 ||
        { echo "gpu_run prepare: pip download gguf==0.19.0 (the wheel the GPU machine installs) failed" >&2; exit 1; }
    cp "$G"/whl/gguf-*.whl "$G/a/" # (also in a: `build`, which carries a, runs the CuPy tests that need it)
    du -sh "$G"/*
    echo "gpu_run prepare: done (build key $key)"
    ;;
parts)
    ls -la "$P"
    w=$(gguf_wheel)
    echo "gguf wheel: ${w:-none (carry .gpurun/a or .gpurun/whl)}"
    ;;
build)
    # the CuPy part needs the gguf wheel: refused here, before the build starts, rather than after the harness
    if [[ -z "${GPU_RUN_NO_CUPY:-}" && -z $(gguf_wheel) ]]; then
        echo "gpu_run build: no gguf wheel for the CuPy tests: carry .gpurun/a from this version's prepare (it holds the wheel) or .gpurun/whl, or set GPU_RUN_NO_CUPY=1" >&2
        exit 2
    fi
    key=$(python3 scripts/bootstrap.py key)
    dir=${KVPOLAR_CACHE:-$HOME/.cache/kvpolar}/llama-$key
    unpack_src "$dir"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    { echo "build key $key (the series'); experiment diffs on it:"
      cat "$G/a/experiments.txt" 2> /dev/null || echo "(not recorded: .gpurun prepared before experiments.txt)"; } |
        tee "$OUT/experiments.txt"
    setsid nohup python3 scripts/bootstrap.py llama --no-python --no-smoke > "$S/gpu-run-build.log" 2>&1 < /dev/null &
    rc=0
    # the polar flash-attention kernels alone (scripts/fa_polar_harness.cu): checks and timings, ~1 min
    { harness_bin /tmp/fa_polar_harness && /tmp/fa_polar_harness && echo "harness rc=0" || echo "harness rc=1"; } \
        > /tmp/fa-polar-harness.txt 2>&1
    cp /tmp/fa-polar-harness.txt "$OUT/" && cat "$OUT/fa-polar-harness.txt"
    grep -q "^harness rc=0" /tmp/fa-polar-harness.txt || rc=1
    # while the build runs: the CuPy kernels' GPU tests (bytes against numpy, the encoder variants,
    # the transformers cache; and that the CUPTI tracer compiles), under the machine's own torch/cupy
    # (GPU_RUN_NO_CUPY=1 skips them: a tree whose change is only in ggml-cuda, on a short device budget)
    if [[ -z "${GPU_RUN_NO_CUPY:-}" ]]; then
        site_wheels
        PYTHONPATH=$SITEPATH timeout 300 python3 -m pytest -q -p no:cacheprovider \
            tests/test_gpu_parity.py tests/test_gpu_encode_variants.py tests/test_torch_cache.py tests/test_trace_decode.py \
            > "$OUT/cupy-tests.txt" 2>&1 || rc=1
        tail -3 "$OUT/cupy-tests.txt"
        # the encoder's latency-path kernels (a decode step's few blocks: ggml-cuda's shape), bytes checked
        cupy_bench encode-latency 180 encode-latency || rc=1
        tail -22 "$OUT/encode-latency.txt"
        # the warp path's throughput variants against "base", bytes checked (issue 11, item 4)
        cupy_bench encode-variants 300 encode --variants all || rc=1
        grep -E "M blocks/s|not run" "$OUT/encode-variants.txt" | tail -24
        # issue 11's attention table on the current kernels (B=16, 32/8 heads, D=128; SDPA fp16 in the same run)
        cupy_bench compare 300 compare --contexts 32768 131072 || rc=1
        tail -12 "$OUT/compare.txt"
        # where the default kernel's time goes (per-CTA stamps), with and without q through shared memory
        cupy_bench anatomy 300 anatomy --contexts 4096 32768 131072 || rc=1
        grep -E "stamped|^fit|not run" "$OUT/anatomy.txt"
    fi
    # the text logs in one archive: a call brings back at most 8 files (session 19 lost the harness log)
    (cd "$OUT" && tar czf build-logs.tgz -- *.txt && rm -f -- *.txt)
    ls "$OUT"
    cat "$S/gpu-run-build.log" | tail -5
    exit $rc
    ;;
harness)
    shift
    harness_bin /tmp/fa_polar_harness
    /tmp/fa_polar_harness "$@" | tee "$OUT/fa-polar-harness-$(echo "$*" | tr -c 'a-z0-9\n' '-').txt"
    ;;
variants)
    # the harness built once per set of compile flags in $HARNESS_VARIANTS (';'-separated, e.g.
    # "-DPOLAR_FA_MMA_PREFETCH=0;-DPOLAR_FA_MMA_PREFETCH=2"): the first variant checked and timed, the
    # others timed (--time-only); each compiled in parallel with the others
    IFS=';' read -r -a vs <<< "${HARNESS_VARIANTS:-}"
    harness_tree > /dev/null # unpacked once, before the parallel builds
    for i in "${!vs[@]}"; do
        # shellcheck disable=SC2086
        harness_bin /tmp/fa_polar_harness_v$i ${vs[$i]} &
    done
    wait
    rc=0
    for i in "${!vs[@]}"; do
        f="$OUT/fa-polar-harness-variant-$i.txt"
        echo "variant $i: ${vs[$i]}" > "$f"
        if [[ $i == 0 ]]; then /tmp/fa_polar_harness_v$i >> "$f" 2>&1 || rc=1; else /tmp/fa_polar_harness_v$i --time-only >> "$f" 2>&1 || rc=1; fi
        grep -E "^variant|failing|FAIL" "$f"
    done
    exit $rc
    ;;
kernel-profile)
    harness_bin /tmp/fa_polar_harness -lineinfo
    ncu --set full --import-source yes -k regex:flash_attn_ext -f -o /tmp/kernel-profile /tmp/fa_polar_harness --profile > "$OUT/kernel-profile-run.txt" 2>&1
    ncu_pages kernel-profile
    tail -5 "$OUT/kernel-profile-run.txt"
    ;;
ops)
    # the kernels first, without the models (steps 1-2 of cuda_llama_check.sh: every polar case of
    # test-backend-ops and the support query), in the foreground: what a short lease checks in the call
    # after `build` (one call for both would outlast a call's 10 minutes)
    wait_build
    rc=0
    rm -f "$S/gpu-run-ops.ok"
    CHECK_OPS_ONLY=1 bash "$CHECK" build/bin - "$S/gpu-run-ops" > "$OUT/ops-summary.txt" 2>&1 || rc=1
    # the build key it passed on: checks then runs steps 3-7 only, on a build of the same key
    [[ $rc -ne 0 ]] || python3 scripts/bootstrap.py key > "$S/gpu-run-ops.ok"
    cat "$OUT/ops-summary.txt"
    grep -o -E "$S"'/gpu-run-ops/[^ ):]+' "$OUT/ops-summary.txt" | sort -u | xargs -r tar czf "$OUT/ops-failing.tgz" 2>/dev/null || true
    exit $rc
    ;;
checks)
    models_and_build
    # after `ops` passed on this machine on a build of the same key: steps 3-7 only (CHECK_MODEL_ONLY=1), so
    # that the checks and the next call fit a lease's 10-minute calls
    only=0
    if [[ -f "$S/gpu-run-ops.ok" && "$(cat "$S/gpu-run-ops.ok")" == "$(python3 scripts/bootstrap.py key)" ]]; then
        only=1
        echo "gpu_run checks: ops passed on this build (key $(cat "$S/gpu-run-ops.ok")), so steps 3-7 only"
    fi
    setsid nohup bash -c "CHECK_MODEL_ONLY=$only TEXT=/tmp/squad.txt bash '$CHECK' build/bin /tmp/smol.gguf '$S/gpu-run-check'; echo \"check rc=\$?\"" \
        > "$S/gpu-run-check.log" 2>&1 < /dev/null &
    ;;
xprepare)
    [[ -d $G/a ]] || { echo "gpu_run xprepare: no $G/a: run prepare first (it remakes .gpurun)" >&2; exit 2; }
    [[ -z "${KVPOLAR_EXPERIMENTS:-}" ]] || { echo "gpu_run xprepare: builds the series only, not KVPOLAR_EXPERIMENTS" >&2; exit 2; }
    TK=${KVPOLAR_CACHE:-$HOME/.cache/kvpolar}/cuda-13.0-pip
    T=$TK/nvidia/cu13
    if [[ ! -x $T/bin/nvcc ]] || ! "$T/bin/nvcc" --version | grep -q "release 13.0"; then
        rm -rf "$TK" && python3 -m pip install -q --no-deps --target "$TK" "${XTOOLCHAIN[@]}"
    fi
    for l in cudart cublas cublasLt; do ln -sfn "lib$l.so.13" "$T/lib/lib$l.so"; done # what the linker asks for
    [[ -e $T/lib64 ]] || ln -s lib "$T/lib64"                                        # where nvcc 13.0 looks
    # no libcuda here (the driver's): GGML_CUDA_NO_VMM; the binaries find their libraries beside them, and
    # the toolchain's libcudart/libcublas for the set-up's smoke run here (on the CPU: no GPU here)
    LD_LIBRARY_PATH=$T/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} PATH=$T/bin:$PATH KVPOLAR_CMAKE_ARGS="-DCUDAToolkit_ROOT=$T -DGGML_CUDA_NO_VMM=ON \
        -DCMAKE_EXE_LINKER_FLAGS=-Wl,-rpath-link,$T/lib -DCMAKE_BUILD_RPATH=\$ORIGIN" \
        python3 scripts/bootstrap.py llama --no-python
    # in two halves (.gpurun/x1, x2: about 24 MB each), so that each call's upload, the tracked files
    # (17 MB) included, stays well under 64 MiB: 47 MB in one would come to 62 MiB
    rm -rf "$G/x1" "$G/x2" && mkdir -p "$G/x1" "$G/x2"
    # the set-up's tools (kvsetup.pins.BUILD_TARGETS) and every library beside them
    read -r -a tools <<< "$(python3 -c 'import sys; sys.path.insert(0, "scripts"); from kvsetup.pins import BUILD_TARGETS; print(*BUILD_TARGETS)')"
    (cd build/bin && tar cf - ./*.so* "${tools[@]}") | xz -6 -T2 > "$G/bin.tar.xz"
    sha256sum "$G/bin.tar.xz" | cut -d' ' -f1 > "$G/x2/xbin.sha256"
    half=$(( ($(stat -c %s "$G/bin.tar.xz") + 1) / 2 ))
    head -c "$half" "$G/bin.tar.xz" > "$G/x1/xbin.part.a"
    tail -c +$((half + 1)) "$G/bin.tar.xz" > "$G/x2/xbin.part.b"
    rm "$G/bin.tar.xz"
    ls -la "$G/x1" "$G/x2"
    echo "gpu_run xprepare: the tracked files a call uploads too: $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes"
    echo "gpu_run xprepare: build/ now points at this CUDA build; ./scripts/test.sh points it back"
    ;;
xbin)
    for f in xbin.part.a xbin.part.b xbin.sha256; do
        [[ -f $P/$f ]] || { echo "gpu_run xbin: no $f: carry .gpurun/x1 and .gpurun/x2 (one call each; gpu_run.sh xprepare makes them)" >&2; exit 2; }
    done
    cat "$P/xbin.part.a" "$P/xbin.part.b" > /tmp/xbin.tar.xz
    [[ "$(sha256sum /tmp/xbin.tar.xz | cut -d' ' -f1)" == "$(cat "$P/xbin.sha256")" ]] || { echo "gpu_run xbin: the binaries' sha256 differs" >&2; exit 1; }
    rm -rf /tmp/xbin && mkdir -p /tmp/xbin
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="fully_trusted")' /tmp/xbin.tar.xz /tmp/xbin
    find / \( -path /proc -o -path /sys -o -path /dev -o -path /tmp/xbin \) -prune -o \
        \( -name libcudart.so.13 -o -name libcublas.so.13 -o -name libcublasLt.so.13 \) -printf '%h\n' 2>/dev/null |
        grep -v '^/tmp/xbin$' | sort -u | tr '\n' ':' > /tmp/xbin/libdirs.try
    missing=$(LD_LIBRARY_PATH=/tmp/xbin:$(cat /tmp/xbin/libdirs.try) ldd /tmp/xbin/libggml-cuda.so | grep "not found" || true)
    if [[ -n $missing ]]; then
        echo "gpu_run xbin: xprepare's binaries do not load here (build there instead): $missing" >&2
        exit 1
    fi
    # /tmp/xbin/libdirs (what later steps put on LD_LIBRARY_PATH) is written last, when every check passed: a
    # failed xbin must not put its libraries in front of a `build` made there afterwards
    export LD_LIBRARY_PATH=/tmp/xbin:$(cat /tmp/xbin/libdirs.try)
    # build -> a folder whose bin is /tmp/xbin: a link, as the set-up leaves it (a later `build` relinks it)
    rm -rf build /tmp/xbuild && mkdir -p /tmp/xbuild && ln -s /tmp/xbin /tmp/xbuild/bin && ln -s /tmp/xbuild build
    build/bin/test-backend-ops support -b CUDA0 -o SET -p polar > /tmp/xbin-support.log 2>&1 || true
    if ! sed 's/\x1b\[[0-9;]*m//g' /tmp/xbin-support.log | grep -q -E '^  SET\(.*polar.*\): SUPPORTED$'; then
        tail -5 /tmp/xbin-support.log >&2
        echo "gpu_run xbin: xprepare's test-backend-ops did not open CUDA0 (build there instead)" >&2
        exit 1
    fi
    # this machine's CPU flags (xprepare probed its own): the CPU backend's polar paths run here
    if ! build/bin/test-backend-ops test -b CPU -o SET -p polar > /tmp/xbin-cpu.log 2>&1; then
        tail -5 /tmp/xbin-cpu.log >&2
        echo "gpu_run xbin: xprepare's CPU backend does not run here (its CPU flags?); build there instead" >&2
        exit 1
    fi
    mv /tmp/xbin/libdirs.try /tmp/xbin/libdirs
    # the steps that wait for the build (models_and_build) find it done
    echo "llama.cpp built in 0 min (xprepare's binaries, $(ls /tmp/xbin | wc -l) files)" | tee "$S/gpu-run-build.log"
    ;;
script)
    [[ -f ${2:-} ]] || { echo "gpu_run script: expected a script file, got '${2:-}'" >&2; exit 2; }
    models_and_build
    OUT=$OUT bash "$2"
    ;;
collect)
    wait_checks
    # the logs of the failing steps (session 12: all of them did not come back, too large)
    grep -o -E "$S"'/gpu-run-check/[^ ):]+' "$S/gpu-run-check.log" | sort -u | xargs -r tar czf "$OUT/checks-failing.tgz" 2>/dev/null || true
    grep -q "^check rc=0" "$OUT/check-summary.txt"
    ;;
verify)
    # a short check of a tree (session 13): every polar FLASH_ATTN_EXT case and the layer chains in
    # test-backend-ops; Qwen2.5's decode with the layer's query chain fused (its rotated query overlaps its
    # input elsewhere) against the same run unfused (GGML_CUDA_POLAR_NO_FUSE_LAYER=1) and with the ROPEs
    # outside the layer's launch (session 14) and with the V output rotation outside the attention's combine
    # (patch 0027): the greedy text must be the same; results packed after each step
    models_and_build
    B=/tmp/verify-out && mkdir -p $B
    rc=0
    pack() { tar czf "$OUT/verify.tgz" -C $B .; }
    build/bin/test-backend-ops test -b CUDA0 -o FLASH_ATTN_EXT -p polar > $B/fa-polar.log 2>&1 || rc=1
    build/bin/test-backend-ops test -b CUDA0 -o LAYER_CHAINS -p polar > $B/layer-chains.log 2>&1 || rc=1
    tail -n 2 $B/fa-polar.log $B/layer-chains.log
    pack
    if [[ -n "${VERIFY_NO_GREEDY:-}" ]]; then
        exit $rc
    fi
    : > $B/greedy-summary.txt
    # fuse 1: the defaults; 0: no layer launch (each chain its own kernel, the ROPEs too); 2: the layer
    # launch without the ROPEs inside it (GGML_CUDA_POLAR_NO_FUSE_ROPE=1, patch 0026); 3: the V output
    # rotation as its own kernel (GGML_CUDA_POLAR_NO_FUSE_ROT_OUT=1, patch 0027)
    fuse_env=("GGML_CUDA_POLAR_NO_FUSE_LAYER=1" "" "GGML_CUDA_POLAR_NO_FUSE_ROPE=1" "GGML_CUDA_POLAR_NO_FUSE_ROT_OUT=1")
    for m in qwen smol; do
        ok=1
        for fuse in 0 1 2 3; do
            env ${fuse_env[$fuse]} build/bin/llama-completion -m /tmp/$m.gguf -c 2048 -ngl 99 -fa on \
                -ctk polar -ctv polar -p "The history of the Amazon rainforest" -n 64 --temp 0 -no-cnv --no-display-prompt \
                > $B/greedy-$m-fuse$fuse.txt 2> $B/greedy-$m-fuse$fuse.log || { ok=0; echo "greedy $m: run failed (fuse $fuse)" >> $B/greedy-summary.txt; }
        done
        if [[ $ok == 1 ]] && cmp -s $B/greedy-$m-fuse0.txt $B/greedy-$m-fuse1.txt && cmp -s $B/greedy-$m-fuse2.txt $B/greedy-$m-fuse1.txt &&
            cmp -s $B/greedy-$m-fuse3.txt $B/greedy-$m-fuse1.txt; then
            echo "greedy $m: fused (layer, ROPEs, output rotation) = layer only = rotation outside = unfused" >> $B/greedy-summary.txt
        else
            echo "greedy $m: fused differs or a run failed" >> $B/greedy-summary.txt
            rc=1
        fi
    done
    cat $B/greedy-summary.txt
    pack
    grep -h -E "FAIL" $B/*.log | head -20 || true # (no FAIL line: grep fails, which pipefail and set -e would turn into the exit status)
    exit $rc
    ;;
cupy)
    # the CuPy kernels alone, under the machine's own torch/cupy: what a kernel change needs (session 31 ran these
    # by hand); the output goes to $OUT/cupy-<what>.txt (and what ARGS write there, e.g. --json "$OUT/x.json")
    what=${2:-}
    case $what in
    tests | bench | decode | issue11) ;;
    *)
        echo "gpu_run cupy: expected tests, bench, decode or issue11, got '$what'" >&2
        exit 2
        ;;
    esac
    shift 2
    if [[ $what == issue11 && ! ${1:-540} =~ ^[0-9]+$ ]]; then
        echo "gpu_run cupy issue11: expected SECONDS (an integer), got '$1'" >&2
        exit 2
    fi
    site_wheels
    export PYTHONPATH=$SITEPATH
    rc=0
    case $what in
    tests)
        [[ $# -gt 0 ]] || set -- tests/test_gpu_attention.py tests/test_gpu_parity.py tests/test_gpu_encode_variants.py \
            tests/test_torch_cache.py tests/test_gpu_decode_bench.py
        python3 -m pytest -q -p no:cacheprovider "$@" > "$OUT/cupy-tests.txt" 2>&1 || rc=1
        ;;
    bench) python3 scripts/bench_gpu.py "$@" > "$OUT/cupy-bench.txt" 2>&1 || rc=1 ;;
    decode) python3 scripts/gpu_decode_bench.py "$@" > "$OUT/cupy-decode.txt" 2>&1 || rc=1 ;;
    issue11)
        budget=${1:-540}
        t0=$SECONDS
        i11() { # NAME LIMIT ARGS...: bench_gpu.py ARGS for at most LIMIT s of what is left (skipped under 20 s)
            local name=$1 lim=$2 left=$((budget - (SECONDS - t0)))
            shift 2
            ((lim <= left)) || lim=$left
            if ((lim < 20)); then
                echo "gpu_run cupy issue11: $name skipped, $left s of $budget left" | tee "$OUT/issue11-$name.txt"
                rc=1
                return 0
            fi
            timeout "$lim" python3 scripts/bench_gpu.py "$@" --json "$OUT/issue11-$name.json" \
                > "$OUT/issue11-$name.txt" 2>&1 || rc=1
        }
        i11 compare 100 compare --contexts 32768 131072
        # what binds the loop there: a CTA alone against the full load (session 41: on an H100 the memory)
        # (this GPU's default against: the default where the memory binds, 8 warps without pshfl; session 44's
        # rule, 12 warps without pshfl; 16 warps)
        i11 scaling 110 scaling --batches 2 4 8 16 --contexts 32768 131072 --fmts polar/polar polar/f16 \
            --config-sets default nwarps=8,pshfl=0 pshfl=0 nwarps=16
        i11 tune 170 tune-mma --fmts polar/polar --phases depth ctas
        i11 anatomy $((budget - (SECONDS - t0) - 40)) anatomy --contexts 32768
        i11 encode 40 encode
        if compgen -G "$OUT/issue11-*.json" > /dev/null; then
            (cd "$OUT" && tar czf issue11-json.tgz issue11-*.json && rm -f issue11-*.json)
        fi
        tail -n 8 "$OUT"/issue11-*.txt
        exit $rc
        ;;
    esac
    tail -30 "$OUT/cupy-$what.txt"
    exit $rc
    ;;
ab)
    # llama-bench tg64/pp512 A/B on both models (ab_llama_gpu.py --set ${2:-sched}), packed after each model;
    # AB_PASSES=N: N passes in one call, pass1 .. passN/ in the one ab.tgz (a call fetches at most 8 files)
    n=${AB_PASSES:-1}
    [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "gpu_run: AB_PASSES must be a positive integer, got '$n'" >&2; exit 2; }
    models_and_build
    B=/tmp/ab-out && rm -rf $B && mkdir -p $B
    rc=0
    for ((p = 1; p <= n; p++)); do
        D=$B
        [[ $n -eq 1 ]] || D=$B/pass$p
        mkdir -p $D
        python3 scripts/ab_llama_gpu.py --bin build/bin --model /tmp/qwen.gguf --depths 0 32768 --reps 3 --out $D --name ab-${2:-sched}-qwen --set ${2:-sched} || rc=1
        tar czf "$OUT/ab.tgz" -C $B .
        python3 scripts/ab_llama_gpu.py --bin build/bin --model /tmp/smol.gguf --depths 16384 --reps 3 --out $D --name ab-${2:-sched}-smollm2 --set ${2:-sched} || rc=1
        tar czf "$OUT/ab.tgz" -C $B .
    done
    exit $rc
    ;;
profile)
    # each decode-step kernel under ncu (profile_decode_gpu.py; docs/results-cuda.md, session 11): both
    # models at depth 0, Qwen2.5's shape also at 32768 keys; then tg64 with and without CUDA graphs
    models_and_build
    B=/tmp/profile-out && mkdir -p $B
    rc=0
    for m in qwen smol; do
        python3 scripts/profile_decode_gpu.py --bin build/bin --model /tmp/$m.gguf --kv f16/f16 q4_0/q4_0 polar/polar \
            --out $B --name profile-decode-$m || rc=1
    done
    python3 scripts/profile_decode_gpu.py --bin build/bin --model /tmp/qwen.gguf --kv f16/f16 polar/polar --depth 32768 \
        --out $B --name profile-decode-qwen-d32768 || rc=1
    python3 scripts/ab_llama_gpu.py --bin build/bin --model /tmp/qwen.gguf --depths 0 32768 --reps 3 --out $B --name ab-graphs-qwen --set graphs || rc=1
    tar czf "$OUT/profile.tgz" -C $B .
    exit $rc
    ;;
encode-profile)
    # the CuPy encoder's throughput kernel (the warp path's default, codec.DEFAULT_VARIANT) under ncu (--set
    # full, SASS-level stall samples): one launch on 64 Mi float16 values, the input bench_gpu.py encode
    # times (issue 11, item 4); no llama.cpp build needed
    site_wheels
    PYTHONPATH=$SITEPATH ncu --set full -k regex:polar_encode_rs_polar_f16 --launch-count 1 \
        -f -o /tmp/encode-profile python3 -c "import torch; from cupy_kernels import codec
x = torch.randn((1 << 19, 128), device='cuda').half(); codec.encode(x, 'polar'); torch.cuda.synchronize()" \
        > "$OUT/encode-profile-run.txt" 2>&1
    ncu_pages encode-profile
    tail -3 "$OUT/encode-profile-run.txt"
    ;;
trace)
    # the decode steps on a timeline (trace_decode_gpu.py: a CUPTI tracer, kernels overlapping as in the real
    # run, the host's time between steps): both models at depth 0 and at issue 10's depths; $TRACE_ENV
    # (NAME=VALUE ...) for every run, e.g. TRACE_ENV=GGML_CUDA_PDL=0, and $TRACE_TAG appended to the names;
    # TRACE_HOST=1: the runtime calls only (trace_decode_gpu.py run --host), the host's side of each step
    models_and_build
    B=/tmp/trace-out && mkdir -p $B
    rc=0
    for md in qwen:0 qwen:32768 smol:0 smol:16384; do
        m=${md%%:*} d=${md##*:}
        # shellcheck disable=SC2086
        python3 scripts/trace_decode_gpu.py run --bin build/bin --model /tmp/$m.gguf --kv f16/f16 q4_0/q4_0 polar/polar \
            --depth "$d" --out $B --name "trace-decode-$m-d$d${TRACE_TAG:-}" ${TRACE_HOST:+--host} --env ${TRACE_ENV:-} || rc=1
        tar czf "$OUT/trace.tgz" -C $B .
    done
    exit $rc
    ;;
chain-profile)
    # one launch of the layer's write kernel (k_polar_layer_chains) inside a decode of Qwen2.5 (default) or
    # SmolLM2 (`chain-profile smol`: the model whose tg is at parity with f16, session 20) under ncu
    # (--set full, SASS-level stall samples): what its latency is made of (session 14)
    m=${2:-qwen}
    [[ $m == qwen || $m == smol ]] || { echo "chain-profile: the model is qwen or smol, got '$m'" >&2; exit 2; }
    models_and_build
    # (the finest warp sampling, every 32 cycles: the default interval left ~50 samples in one launch)
    ncu --set full --warp-sampling-interval 0 -k regex:k_polar_layer_chains --launch-skip 300 --launch-count 1 -f -o /tmp/chain-profile \
        build/bin/llama-bench -m /tmp/$m.gguf -ngl 99 -fa 1 -ctk polar -ctv polar -p 0 -n 32 -r 1 > "$OUT/chain-profile-run.txt" 2>&1
    ncu_pages chain-profile
    tail -3 "$OUT/chain-profile-run.txt"
    ;;
bench)
    # bench ab: tg64 with patch 0022's tensor-core kernel vs the vector kernel (both models), and the
    # decode-step ops (test-backend-ops perf); bench tables: the llama-bench tables of both models.
    # Results are packed into $OUT/bench-<what>.tgz (a call brings back at most 8 files).
    # after the checks where they were started on this machine (one GPU job at a time), else after the build
    if [[ -f "$S/gpu-run-check.log" ]]; then
        wait_checks
    else
        models_and_build
    fi
    B=/tmp/bench-out && mkdir -p $B
    rc=0
    case ${2:-ab} in
    ab)
        python3 scripts/ab_llama_gpu.py --bin build/bin --model /tmp/smol.gguf --depths 0 16384 --reps 3 --out $B --name ab-kernel-smollm2 --set kernel || rc=1
        python3 scripts/ab_llama_gpu.py --bin build/bin --model /tmp/qwen.gguf --depths 16384 32768 --reps 3 --out $B --name ab-kernel-qwen --set kernel || rc=1
        python3 scripts/perf_ops_gpu.py --bin build/bin --out $B --name ops-decode || rc=1
        ;;
    tables)
        python3 scripts/bench_llama_gpu.py --bin build/bin --model /tmp/smol.gguf --name smollm2 --depths 0 16384 32768 --reps 3 --out $B || rc=1
        python3 scripts/bench_llama_gpu.py --bin build/bin --model /tmp/qwen.gguf --name qwen2.5-1.5b-synthetic --depths 0 16384 32768 --reps 3 --out $B || rc=1
        ;;
    esac
    tar czf "$OUT/bench-${2:-ab}.tgz" -C $B .
    [[ ! -f "$OUT/check-summary.txt" ]] || grep -q "^check rc=0" "$OUT/check-summary.txt" || rc=1
    exit $rc
    ;;
esac
