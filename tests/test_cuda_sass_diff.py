"""scripts/cuda_sass_diff.sh refuses what it cannot compare, naming what it expected (the compile itself
needs nvcc and a patched tree: run by hand, docs/results-cuda.md session 15)."""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "cuda_sass_diff.sh"


def _run(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env)


def test_usage_without_arguments():
    p = _run()
    assert p.returncode == 2 and "TREE COMMIT_A COMMIT_B" in p.stderr


def test_tree_must_be_a_patched_llama_cpp(tmp_path):
    p = _run(str(tmp_path), "HEAD", "HEAD", env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert p.returncode == 2
    # without nvcc it says so first; with it, it names the missing header
    assert "nvcc is not on PATH" in p.stderr or "not a patched llama.cpp tree" in p.stderr
    (tmp_path / "nvcc").write_text("#!/bin/sh\n")
    (tmp_path / "cuobjdump").write_text("#!/bin/sh\n")
    (tmp_path / "nvcc").chmod(0o755)
    (tmp_path / "cuobjdump").chmod(0o755)
    p = _run(str(tmp_path), "HEAD", "HEAD", env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert p.returncode == 2 and "not a patched llama.cpp tree" in p.stderr
