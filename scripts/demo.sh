#!/usr/bin/env bash
# The main job on the built-in default model (SmolLM2-135M-Instruct Q4_1):
#
#   ./scripts/demo.sh [demo.py options]      e.g. ./scripts/demo.sh --types f16 q4_0 polar
#
# 1. python3 scripts/bootstrap.py all (venv, verified data, patched llama.cpp build)
# 2. scripts/demo.py with the venv's python: one SQuAD article plus a question about it to
#    build/bin/llama-completion, once with the f16 KV cache and once with -ctk polar -ctv polar,
#    then the answers, KV cache sizes and prompt/generation speeds side by side.
#
# Environment: KVPOLAR_DEMO_TYPES (default "f16 polar"), KVPOLAR_DEMO_CTX (default 4096),
# KVPOLAR_DEMO_THREADS (default: all cores). Exits non-zero when a run fails (demo.py's --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${PYTHON:-python3}"
"$PY" scripts/bootstrap.py all
eval "$("$PY" scripts/bootstrap.py env)"
exec "$KVPOLAR_PYTHON" scripts/demo.py "$@"
