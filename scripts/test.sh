#!/usr/bin/env bash
# Run the kvpolar test-suite.
#
#   ./scripts/test.sh [pytest args...]      e.g. ./scripts/test.sh -k codec -x
#
# 1. python3 scripts/bootstrap.py all : venv, verified data, patched llama.cpp build
#    (cold: downloads + compile; warm: a few seconds, nothing rebuilt); --sass-tools: NVRTC 13.0,
#    cuobjdump and nvdisasm, which `bootstrap.py env` exports for tests/test_sass_order.py
# 2. pytest -q with the venv's python. KVPOLAR_REQUIRE_BUILD=1 makes tests that need the build
#    or the data FAIL (not skip) when it is missing. GPU tests skip without cupy/CUDA.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "test.sh: needs Python >= 3.10 as '$PY' (set PYTHON=/path/to/python3.x)" >&2
    exit 2
fi

"$PY" scripts/bootstrap.py all --gemma --sass-tools
eval "$("$PY" scripts/bootstrap.py env)"
export KVPOLAR_REQUIRE_BUILD=1

echo "== pytest ($KVPOLAR_PYTHON) =="
exec "$KVPOLAR_PYTHON" -m pytest -q "$@"
