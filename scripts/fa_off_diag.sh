#!/usr/bin/env bash
# Session 24 diagnosis of cuda_llama_check.sh step 6 (-fa off, polar K: the GPU's KLD above host attention):
# test-backend-ops' KQ cases with and without the exact sink key's SET (patch 0038), then step 6's
# llama-perplexity pair (kld_gpu_host: GPU; host with -nkvo --no-op-offload) under settings that each turn
# one part of the -fa off graph off. Runs on the GPU machine: `gpu_run.sh script scripts/fa_off_diag.sh`
# (BIN=DIR: other binaries than build/bin). Logs in $DIAG_DIR (/tmp/diag), packed into $OUT/diag.tgz.
source "$(dirname "${BASH_SOURCE[0]}")/cuda_llama_check.sh" # fail, check_cases, kld_gpu_host (functions only)
set +e -uo pipefail
BIN=${BIN:-build/bin}
OUTDIR=${DIAG_DIR:-/tmp/diag}
mkdir -p "$OUTDIR"
ppl0=("$BIN/llama-perplexity" -m /tmp/smol.gguf -f /tmp/squad.txt -c 2048 --chunks 4 -b 2048 -ngl 99)
base=${DIAG_BASE:-/tmp/gpu-run-check/gpu-f16.kld} # the checks' step-6 base; made the same way where the checks did not run
if [[ ! -s $base ]]; then
    mkdir -p "$(dirname "$base")"
    "${ppl0[@]}" -fa on --kl-divergence-base "$base" -ctk f16 -ctv f16 > "$OUTDIR/base.log" 2>&1 || fail "base run failed"
fi
for op in SET MUL_MAT; do
    log="$OUTDIR/test-backend-ops-$op.log"
    "$BIN/test-backend-ops" test -b CUDA0 -o "$op" -p polar > "$log" 2>&1
    check_cases "$log" "test-backend-ops -o $op"
done
row() { # row NAME [VAR=VALUE...] -- ARGS...: step 6's pair with the environment VAR=VALUE
    local name=$1 envs=()
    shift
    while [[ $1 != -- ]]; do envs+=("$1"); shift; done
    shift
    ppl=(env "${envs[@]}" "${ppl0[@]}")
    kld_gpu_host "$name" "$name${envs[*]:+ ${envs[*]}}" "$@"
}
row polar-off -- -fa off -ctk polar -ctv f16
row polar3-off -- -fa off -ctk polar3 -ctv f16
row polar-off-nosink LLAMA_KV_EXACT_SINK=0 -- -fa off -ctk polar -ctv f16
row polar-off-nofuse GGML_CUDA_DISABLE_FUSION=1 -- -fa off -ctk polar -ctv f16
row polar-off-ub2048 -- -fa off -ctk polar -ctv f16 -ub 2048
row f16-off -- -fa off -ctk f16 -ctv f16
row q40-off -- -fa off -ctk q4_0 -ctv f16
# which backend ran each node of one chunk's graph
GGML_SCHED_DEBUG=2 "${ppl0[@]}" -fa off -ctk polar -ctv f16 --chunks 1 --kl-divergence-base "$base" --kl-divergence \
    > "$OUTDIR/sched-debug.log" 2>&1
echo "sched debug: $(grep -c "CPU" "$OUTDIR/sched-debug.log") lines name the CPU"
gzip -f "$OUTDIR/sched-debug.log"
tar czf "${OUT:-/tmp}/diag.tgz" -C "$OUTDIR" .
exit "$status"
