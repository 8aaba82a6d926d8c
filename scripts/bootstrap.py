#!/usr/bin/env python3
"""Reproducible set-up for kvpolar: venv, data, patched llama.cpp build (package scripts/kvsetup).

Standard library only (this runs before any virtual environment exists), Python >= 3.10.

    python3 scripts/bootstrap.py venv              # $CACHE/venv-<hash>, pip install -e '.[test]'
    python3 scripts/bootstrap.py data [--qwen] [--haystack]
    python3 scripts/bootstrap.py llama             # patched llama.cpp -> <repo>/build, smoke run
    python3 scripts/bootstrap.py all [--qwen] [--haystack]
    python3 scripts/bootstrap.py patches export    # write the patched tree back into patches/
    eval "$(python3 scripts/bootstrap.py env)"     # LLAMA_CPP_LIB_PATH, KVPOLAR_BUILD, ...

The set-up imports `kvsetup` (scripts/kvsetup) and the standard-library modules
`kvpolar.paths` / `kvpolar.atomic` (converter/kvpolar) before anything is installed, so this
launcher runs `python -m kvsetup` with the repository's two source roots, converter/ and
scripts/, on PYTHONPATH: the same roots pyproject.toml and pytest declare.
"""

import os
import platform
import sys
from pathlib import Path

if sys.version_info < (3, 10):  # noqa: UP036 - this script may be run by any python3
    sys.exit("bootstrap.py needs Python >= 3.10 (found " + platform.python_version() + ")")

ROOT = Path(__file__).resolve().parent.parent
roots = [str(ROOT / "converter"), str(ROOT / "scripts")]
env = dict(os.environ)
env["PYTHONPATH"] = os.pathsep.join(roots + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
os.execve(sys.executable, [sys.executable, "-m", "kvsetup", *sys.argv[1:]], env)
