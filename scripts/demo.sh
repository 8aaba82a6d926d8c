#!/usr/bin/env bash
# The main job on the built-in default model (SmolLM2-135M-Instruct Q4_1):
#
#   ./scripts/demo.sh
#
# 1. python3 scripts/bootstrap.py all (venv, verified data, patched llama.cpp build)
# 2. build/bin/llama-cli, one greedy single-turn answer to a fixed prompt, once per KV cache
#    type: f16, then polar (-ctk polar -ctv polar) when this build's llama-cli lists `polar`
#    among its cache types (it does once the polar patches are in patches/llama.cpp/).
#    Flash attention is on for every run (a quantized V cache requires it).
# 3. A side-by-side table of the KV cache size llama.cpp reports for each type.
#
# Environment: KVPOLAR_DEMO_TYPES="f16 q4_0 polar" overrides the list of cache types,
# KVPOLAR_DEMO_CTX (default 4096) the context size, KVPOLAR_DEMO_THREADS the threads.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${PYTHON:-python3}"
"$PY" scripts/bootstrap.py all
eval "$("$PY" scripts/bootstrap.py env)"

CLI="$KVPOLAR_BUILD/bin/llama-cli"
MODEL="$KVPOLAR_CACHE/data/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT="Explain in two sentences why the sky is blue."
CTX="${KVPOLAR_DEMO_CTX:-4096}"
THREADS="${KVPOLAR_DEMO_THREADS:-$(nproc 2>/dev/null || echo 2)}"
LOGDIR="$(mktemp -d "${TMPDIR:-/tmp}/kvpolar-demo.XXXXXX")"

# Cache types this llama-cli accepts (the "allowed values" under --cache-type-k; the list wraps).
cli_help="$("$CLI" --help 2>&1 || true)"
allowed="$(printf '%s\n' "$cli_help" | grep -m1 -A4 -- '--cache-type-k' | sed -n '/allowed values:/,/(default/p' \
    | sed 's/.*allowed values: *//; s/(default.*//' | tr -d ' \n')"
if [[ -n "${KVPOLAR_DEMO_TYPES:-}" ]]; then
    types=(${KVPOLAR_DEMO_TYPES})
else
    types=(f16)
    if [[ ",${allowed}," == *",polar,"* ]]; then
        types+=(polar)
    fi
fi

echo
echo "== kvpolar demo: $(basename "$MODEL"), ctx $CTX, $THREADS threads, greedy, 32 tokens =="
echo "   prompt: $PROMPT"
if [[ " ${types[*]} " != *" polar "* ]]; then
    echo "   note: this build's llama-cli has no 'polar' cache type yet (allowed: $allowed);"
    echo "         running f16 only. It appears once patches/llama.cpp/ adds it."
fi

declare -A total ksz vsz answer
for t in "${types[@]}"; do
    log="$LOGDIR/llama-cli-$t.log"
    out="$LOGDIR/llama-cli-$t.out"
    echo
    echo "-- llama-cli -ctk $t -ctv $t -fa on"
    set +e
    "$CLI" -m "$MODEL" -p "$PROMPT" -n 32 --temp 0 --seed 1 -st --simple-io \
        -c "$CTX" -t "$THREADS" -fa on -ctk "$t" -ctv "$t" -fit off --no-warmup \
        --color off --no-show-timings -v </dev/null >"$out" 2>"$log"
    rc=$?
    set -e
    if [[ $rc -ne 0 ]]; then
        echo "   llama-cli failed (exit $rc); last lines of $log:"
        tail -n 15 "$log" | sed 's/^/   | /'
        total[$t]="failed"; ksz[$t]="-"; vsz[$t]="-"; answer[$t]="(exit $rc)"
        continue
    fi
    # The answer: the lines after the echoed prompt ("> ...") up to "Exiting...".
    text="$(awk '/^> /{on=1; next} /^Exiting\.\.\./{on=0} on' "$out" | sed '/^[[:space:]]*$/d')"
    echo "$text" | sed 's/^/   /'
    # e.g. "llama_kv_cache: size =   45.00 MiB (  2048 cells,  30 layers,  1/1 seqs), K (f16):   22.50 MiB, V (f16):   22.50 MiB"
    line="$(grep -E 'llama_kv_cache: +size *=' "$log" | tail -n1 || true)"
    total[$t]="$(sed -nE 's/.*size *= *([0-9.]+ [KMG]iB).*/\1/p' <<<"$line")"
    ksz[$t]="$(sed -nE 's/.*K \(([^)]*)\): *([0-9.]+ [KMG]iB).*/\2 (\1)/p' <<<"$line")"
    vsz[$t]="$(sed -nE 's/.*V \(([^)]*)\): *([0-9.]+ [KMG]iB).*/\2 (\1)/p' <<<"$line")"
    answer[$t]="$(head -c 60 <<<"${text//$'\n'/ }")"
done

echo
echo "== KV cache size reported by llama.cpp (llama_kv_cache: size = ...), ctx $CTX =="
to_mib() {  # "45.00 MiB" -> 45.00 (KiB/GiB converted)
    awk '{v=$1; if ($2=="KiB") v/=1024; if ($2=="GiB") v*=1024; printf "%.4f", v}' <<<"$1"
}
base=""
[[ "${total[f16]:-}" == *iB ]] && base="$(to_mib "${total[f16]}")"
printf '%-8s %-12s %-8s %-20s %-20s %s\n' "type" "total" "vs f16" "K" "V" "answer (start)"
for t in "${types[@]}"; do
    ratio="-"
    if [[ -n "$base" && "${total[$t]:-}" == *iB ]]; then
        ratio="$(awk -v a="$(to_mib "${total[$t]}")" -v b="$base" 'BEGIN{printf "%.3fx", a/b}')"
    fi
    printf '%-8s %-12s %-8s %-20s %-20s %s\n' "$t" "${total[$t]:-?}" "$ratio" "${ksz[$t]:-?}" "${vsz[$t]:-?}" "${answer[$t]:-}"
done
echo
echo "full llama-cli logs: $LOGDIR"
