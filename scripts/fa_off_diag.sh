#!/usr/bin/env bash
# Session 24 diagnosis of cuda_llama_check.sh step 6 (-fa off, polar K: the GPU's KLD above host attention):
# test-backend-ops' KQ cases with and without the exact sink key's SET (patch 0038), then the same
# llama-perplexity pair as step 6 (GPU; host with -nkvo --no-op-offload) under settings that each turn one
# part of the -fa off graph off. Runs on the GPU machine: `gpu_run.sh script scripts/fa_off_diag.sh`.
set -uo pipefail
BIN=${BIN:-build/bin} # the binaries: a CUDA build of the tree (gpu_run.sh build), or BIN=DIR
B=$BIN/llama-perplexity
ppl=("$B" -m /tmp/smol.gguf -f /tmp/squad.txt -c 2048 --chunks 4 -b 2048 -ngl 99 --kl-divergence-base /tmp/gpu-run-check/gpu-f16.kld --kl-divergence)
O=/tmp/diag
mkdir -p "$O"
base=/tmp/gpu-run-check/gpu-f16.kld
if [[ ! -s $base ]]; then # a machine without the checks' base: the same base run as cuda_llama_check.sh step 6
    mkdir -p /tmp/gpu-run-check
    "$B" -m /tmp/smol.gguf -f /tmp/squad.txt -c 2048 --chunks 4 -b 2048 -ngl 99 -fa on --kl-divergence-base "$base" \
        -ctk f16 -ctv f16 > "$O/base.log" 2>&1 || { echo "base run failed"; tail -5 "$O/base.log"; }
fi
kld() { sed -nE 's/^Mean +KLD: +([0-9.]+).*/\1/p' "$1"; }
row() { # row NAME ENV... -- ARGS...
    local name=$1; shift
    local envs=()
    while [[ $1 != -- ]]; do envs+=("$1"); shift; done; shift
    env "${envs[@]}" "${ppl[@]}" "$@" > "$O/$name-gpu.log" 2>&1
    env "${envs[@]}" "${ppl[@]}" "$@" -nkvo --no-op-offload > "$O/$name-host.log" 2>&1
    echo "$name: gpu $(kld "$O/$name-gpu.log") host $(kld "$O/$name-host.log")"
}
# test-backend-ops first: KQ with the sink's SET (patch 0038's case) and the plain KQ
"$BIN"/test-backend-ops test -b CUDA0 -o SET -p polar > "$O/tbo-set.log" 2>&1
"$BIN"/test-backend-ops test -b CUDA0 -o MUL_MAT -p polar > "$O/tbo-mul-mat.log" 2>&1
for f in "$O"/tbo-*.log; do
    plain=$(sed 's/\x1b\[[0-9;]*m//g' "$f")
    echo "$(basename "$f"): $(grep -c -E '^ +(SET|MUL_MAT)\(.*polar.*OK$' <<<"$plain") polar cases OK," \
        "$(grep -c -E 'polar.*FAIL$' <<<"$plain") failing"
done
row polar-off           X=1 -- -fa off -ctk polar -ctv f16
row polar3-off          X=1 -- -fa off -ctk polar3 -ctv f16
row polar-off-nosink    LLAMA_KV_EXACT_SINK=0 -- -fa off -ctk polar -ctv f16
row polar-off-nofuse    GGML_CUDA_DISABLE_FUSION=1 -- -fa off -ctk polar -ctv f16
row polar-off-ub2048    X=1 -- -fa off -ctk polar -ctv f16 -ub 2048
row f16-off             X=1 -- -fa off -ctk f16 -ctv f16
row q40-off             X=1 -- -fa off -ctk q4_0 -ctv f16
GGML_SCHED_DEBUG=2 "${ppl[@]}" -fa off -ctk polar -ctv f16 --chunks 1 > "$O/sched-debug.log" 2>&1
grep -c "CPU" "$O/sched-debug.log"
grep -E "^## SPLIT|split #" "$O/sched-debug.log" | head -20
tar czf "${OUT:-/tmp}/diag.tgz" -C "$O" --exclude sched-debug.log . 2>/dev/null
gzip -c "$O/sched-debug.log" > "${OUT:-/tmp}/sched-debug.log.gz"
