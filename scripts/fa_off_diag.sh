#!/usr/bin/env bash
# Diagnosis of cuda_llama_check.sh step 6 (-fa off, polar K: the GPU's KLD apart from host attention):
# test-backend-ops' KQ cases with and without the exact sink key's SET (patch 0038), then step 6's
# llama-perplexity pair (kld_gpu_host: GPU; host with -nkvo --no-op-offload) under settings that each turn
# one part of the -fa off graph off (session 24), and (session 26) the K types of upstream beside polar and
# polar3 at four ubatch sizes: how far GPU and host are apart where no polar code runs. Runs on the GPU
# machine: `gpu_run.sh script scripts/fa_off_diag.sh` (BIN=DIR: other binaries than build/bin). Logs in
# $DIAG_DIR (/tmp/diag), packed into $OUT/diag.tgz.
#
#   scripts/fa_off_diag.sh --table DIR   # the ubatch sweep's table from the logs in DIR (no binaries)
source "$(dirname "${BASH_SOURCE[0]}")/cuda_llama_check.sh" # fail, check_cases, kld_gpu_host (functions only)
set +e -uo pipefail
SWEEP_TYPES=(f16 q8_0 q4_0 polar polar3)
SWEEP_UBS=(256 512 1024 2048)
gap_table() { # gap_table DIR: per K type and -ub, the two mean KLDs, their gap and the gap in % of the host's
    local t ub g h
    echo "| K (V f16), -fa off | -ub | GPU | host | gap | gap / host |"
    echo "|---|---|---|---|---|---|"
    for t in "${SWEEP_TYPES[@]}"; do
        for ub in "${SWEEP_UBS[@]}"; do
            g=$(mean_kld "$1/kld-$t-ub$ub-gpu.log" 2>/dev/null)
            h=$(mean_kld "$1/kld-$t-ub$ub-host.log" 2>/dev/null)
            [[ -n $g && -n $h ]] || { echo "| $t | $ub | ${g:--} | ${h:--} | missing | |"; continue; }
            awk -v t="$t" -v u="$ub" -v g="$g" -v h="$h" \
                'BEGIN{d=g-h; if (d<0) d=-d; printf "| %s | %s | %s | %s | %.6f | %.1f %% |\n", t, u, g, h, d, 100*d/h}'
        done
    done
}
if [[ ${1:-} == --table ]]; then
    [[ -d ${2:-} ]] || { echo "fa_off_diag --table: expected a folder of kld-*.log files, got '${2:-}'" >&2; exit 2; }
    gap_table "$2"
    exit 0
fi
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
# (session 24's plain rows, polar, polar3, f16 and q4_0 K at the default -ub 512 and polar at 2048, are the
# sweep's rows of those names below)
row polar-off-nosink LLAMA_KV_EXACT_SINK=0 -- -fa off -ctk polar -ctv f16
row polar-off-nofuse GGML_CUDA_DISABLE_FUSION=1 -- -fa off -ctk polar -ctv f16
# session 26: each of polar's graph options off, flash attention with one ubatch a chunk, and the sweep
row nocenter LLAMA_KV_CENTER=0 -- -fa off -ctk polar -ctv f16
row nobal LLAMA_KV_BALANCE=0 -- -fa off -ctk polar -ctv f16
row norot LLAMA_ATTN_ROT_DISABLE=1 -- -fa off -ctk polar -ctv f16
row nosink-ub2048 LLAMA_KV_EXACT_SINK=0 -- -fa off -ctk polar -ctv f16 -ub 2048
row faon-ub2048 -- -fa on -ctk polar -ctv f16 -ub 2048
for ub in "${SWEEP_UBS[@]}"; do
    for t in "${SWEEP_TYPES[@]}"; do
        row "$t-ub$ub" -- -fa off -ctk "$t" -ctv f16 -ub "$ub"
    done
done
gap_table "$OUTDIR"
# which backend ran each node of one chunk's graph
GGML_SCHED_DEBUG=2 "${ppl0[@]}" -fa off -ctk polar -ctv f16 --chunks 1 --kl-divergence-base "$base" --kl-divergence \
    > "$OUTDIR/sched-debug.log" 2>&1
echo "sched debug: $(grep -c "CPU" "$OUTDIR/sched-debug.log") lines name the CPU"
gzip -f "$OUTDIR/sched-debug.log"
tar czf "${OUT:-/tmp}/diag.tgz" -C "$OUTDIR" .
exit "$status"
