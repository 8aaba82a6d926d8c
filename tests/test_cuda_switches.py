"""kvpolar's environment switches in the patched ggml-cuda (patches 0023, 0025, 0026, 0029): every one is read
through `ggml_cuda_polar_env_int` (polar.cuh), which takes the whole value as an integer in its range and
aborts with the variable's name otherwise, so a mistyped value is an error and not a silent 0 (as
`atoi` would make it); and every one is documented where a user looks for it (README.md, docs/).

Reads the patched source tree next to the build (scripts/bootstrap.py), as ggml-cuda is not built on
a machine without CUDA."""

from __future__ import annotations

import re

import pytest

from conftest import _missing

SWITCH = r"(?:GGML_CUDA_POLAR_\w+|GGML_CUDA_NO_POLAR|GGML_CUDA_MMVQ_PDL_LC)"


@pytest.fixture(scope="module")
def cuda_sources(build_dir) -> dict[str, str]:
    tree = build_dir.resolve().parent / "src" / "vendor" / "llama.cpp" / "ggml" / "src" / "ggml-cuda"
    files = sorted(tree.glob("*.cu")) + sorted(tree.glob("*.cuh")) if tree.is_dir() else []
    if not files:
        _missing(f"no patched ggml-cuda sources under {tree}")
    return {p.name: p.read_text(encoding="utf-8", errors="replace") for p in files}


def test_switches_parsed_whole(cuda_sources):
    raw = [
        f"{name}: {m.group(0)}"
        for name, text in cuda_sources.items()
        for m in re.finditer(rf'getenv\(\s*"{SWITCH}"\s*\)', text)
    ]
    why = "read without ggml_cuda_polar_env_int (a mistyped value would pass silently):"
    assert not raw, "\n".join([why, *raw])
    assert "ggml_cuda_polar_env_int" in cuda_sources["polar.cuh"], "the parser moved out of polar.cuh"


def test_switches_documented(cuda_sources, repo_root):
    names = {
        m.group(1)
        for text in cuda_sources.values()
        for m in re.finditer(rf'ggml_cuda_polar_env_int\(\s*"({SWITCH})"', text)
    }
    assert len(names) >= 10, f"expected kvpolar's switches in ggml-cuda, found {sorted(names)}"
    docs = (repo_root / "README.md").read_text(encoding="utf-8") + "".join(
        p.read_text(encoding="utf-8") for p in sorted((repo_root / "docs").glob("*.md"))
    )
    undocumented = sorted(n for n in names if not re.search(rf"\b{n}\b", docs))
    assert not undocumented, f"switches not in README.md or docs/*.md: {undocumented}"
