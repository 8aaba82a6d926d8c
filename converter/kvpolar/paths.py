"""Where kvpolar's cache, data files and the patched llama.cpp build live.

Standard library only (imported by tests and tools before anything heavy). The layout is the
one the set-up (`scripts/bootstrap.py`, package `scripts/kvsetup`) creates, from these functions:

    $KVPOLAR_CACHE (default ~/.cache/kvpolar)/data/<file>     verified data files
    $KVPOLAR_CACHE/llama-<key>/{src,build}                    patched sources and their build
    <repo>/build -> $KVPOLAR_CACHE/llama-<key>/build
    <repo>/build/bin/{llama-cli,...,libllama.so,libggml*.so}

Overrides: KVPOLAR_CACHE (cache root), KVPOLAR_REPO (checkout root), KVPOLAR_BUILD (build dir).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = [
    "GEMMA3_GGUF",
    "HAYSTACK_TXT",
    "QWEN_GGUF",
    "SMOLLM2_GGUF",
    "SQUAD_TXT",
    "BuildNotFoundError",
    "DataNotFoundError",
    "bin_path",
    "build_dir",
    "build_info",
    "cache_dir",
    "data_dir",
    "data_file",
    "lib_path",
    "repo_root",
]

# File names under $KVPOLAR_CACHE/data (see scripts/bootstrap.py for their sources and pins).
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SQUAD_TXT = "squad.txt"
QWEN_GGUF = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
HAYSTACK_TXT = "pg_essays.txt"

_FETCH_FLAG = {QWEN_GGUF: " --qwen", GEMMA3_GGUF: " --gemma", HAYSTACK_TXT: " --haystack"}


class BuildNotFoundError(FileNotFoundError):
    """The patched llama.cpp build (or a file in it) is missing."""


class DataNotFoundError(FileNotFoundError):
    """A data file under $KVPOLAR_CACHE/data is missing."""


def cache_dir() -> Path:
    """$KVPOLAR_CACHE, else ~/.cache/kvpolar (not created here)."""
    env = os.environ.get("KVPOLAR_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "kvpolar").resolve()


def data_dir() -> Path:
    """$KVPOLAR_CACHE/data: the verified data files (not created here)."""
    return cache_dir() / "data"


def repo_root() -> Path:
    """The checkout holding pyproject.toml (this file is <repo>/converter/kvpolar/paths.py)."""
    env = os.environ.get("KVPOLAR_REPO")
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parents[2]


def _build_missing(where: Path, what: str = "patched llama.cpp build") -> BuildNotFoundError:
    return BuildNotFoundError(
        f"{what} not found at {where}; run ./scripts/test.sh or python3 scripts/bootstrap.py llama"
    )


def build_dir() -> Path:
    """<repo>/build (or $KVPOLAR_BUILD), checked to hold build/bin."""
    env = os.environ.get("KVPOLAR_BUILD")
    build = Path(env).expanduser() if env else repo_root() / "build"
    if not (build / "bin").is_dir():
        raise _build_missing(build)
    return build


def build_info() -> dict:
    """Contents of build/kvpolar-build.json (key, pin, patches, src path)."""
    import json

    path = build_dir() / "kvpolar-build.json"
    if not path.is_file():
        raise _build_missing(path, "build description kvpolar-build.json")
    return json.loads(path.read_text())


def bin_path(name: str) -> Path:
    """A binary of the build, e.g. bin_path('llama-cli')."""
    path = build_dir() / "bin" / name
    if not path.exists():
        raise _build_missing(path, f"{name} of the patched llama.cpp build")
    return path


def lib_path(name: str) -> Path:
    """A shared library of the build: 'ggml', 'ggml-base', 'ggml-cpu', 'llama', 'mtmd'.

    Also accepts 'libggml', 'libggml.so'.
    """
    base = name
    if base.startswith("lib"):
        base = base[3:]
    for ext in (".so", ".dylib", ".dll"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    ext = ".dylib" if sys.platform == "darwin" else ".dll" if sys.platform == "win32" else ".so"
    bindir = build_dir() / "bin"
    for cand in (bindir / f"lib{base}{ext}", build_dir() / "lib" / f"lib{base}{ext}"):
        if cand.exists():
            return cand
    raise _build_missing(bindir / f"lib{base}{ext}", f"lib{base}{ext} of the patched llama.cpp build")


def data_file(name: str) -> Path:
    """A verified data file under $KVPOLAR_CACHE/data, e.g. data_file(SMOLLM2_GGUF)."""
    path = data_dir() / name
    if not path.is_file():
        flag = _FETCH_FLAG.get(name, "")
        raise DataNotFoundError(
            f"data file {name} not found at {path}; run ./scripts/test.sh or "
            f"python3 scripts/bootstrap.py data{flag}"
        )
    return path
