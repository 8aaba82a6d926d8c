"""scripts/gpu_run.sh (the steps of a llama.cpp GPU run) parses, and answers a missing or unknown
step with its usage and exit status 2 instead of running anything."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_run.sh"


def test_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.parametrize("args", [[], ["nonsense"]])
def test_usage(args, tmp_path):
    r = subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 2, r
    assert "prepare" in r.stderr and "bench" in r.stderr, r.stderr


@pytest.mark.parametrize("passes", ["0", "two", "-1"])
def test_ab_passes_checked_first(passes, tmp_path):
    """A bad AB_PASSES is refused, naming it, before anything waits for models or a build."""
    r = subprocess.run(
        ["bash", str(SCRIPT), "ab", "targets"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin", "AB_PASSES": passes, "HOME": str(tmp_path)},
    )
    assert r.returncode == 2, r
    assert f"AB_PASSES must be a positive integer, got '{passes}'" in r.stderr, r.stderr


@pytest.mark.parametrize("args", [["script"], ["script", "no/such/diagnosis.sh"]])
def test_script_needs_a_file(args, tmp_path):
    """`script FILE` refuses a missing file, naming what it got, before waiting for models or a build."""
    r = subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert r.returncode == 2, r
    got = args[1] if len(args) > 1 else ""
    assert f"gpu_run script: expected a script file, got '{got}'" in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("xbin", "gpu_run xbin: no xbin.part.a: carry .gpurun/x1 and .gpurun/x2 (one call each; "),
        ("xprepare", "gpu_run xprepare: no {G}/a: run prepare first (it remakes .gpurun)"),
        (
            "build",
            "gpu_run build: no gguf wheel for the CuPy tests: carry .gpurun/a from this version's prepare",
        ),
    ],
)
def test_cross_build_steps_need_their_folders(step, message, tmp_path):
    """xprepare needs prepare's folders, xbin the carried halves of the binaries, build (with the CuPy tests)
    the gguf wheel: each says so first."""
    g = tmp_path / "gpurun"
    g.mkdir()
    r = subprocess.run(
        ["bash", str(SCRIPT), step],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "OUT": str(tmp_path),
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "GPU_RUN_DIR": str(g),
            "GPU_RUN_PARTS": str(tmp_path / "parts"),
        },
    )
    assert r.returncode == 2, r
    assert message.format(G=g) in r.stderr, r.stderr


@pytest.mark.parametrize("where", ["a", "whl", None])
def test_parts_names_the_gguf_wheel(where, tmp_path):
    """The model and CuPy steps install the gguf wheel from whichever folder was carried (`parts` names it).
    With only .gpurun/a carried, the lookup must not end the script: in session 28 it did, with ls's status 2
    under pipefail, and `build` stopped after its harness."""
    g = tmp_path / "gpurun"
    g.mkdir()
    if where:
        (g / where).mkdir()
        (g / where / "gguf-0.19.0-py3-none-any.whl").write_bytes(b"")
    parts = tmp_path / "parts"
    r = subprocess.run(
        ["bash", str(SCRIPT), "parts"],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "OUT": str(tmp_path / "out"),
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "GPU_RUN_DIR": str(g),
            "GPU_RUN_PARTS": str(parts),
        },
    )
    assert r.returncode == 0, r
    want = {"a": parts / "gguf-0.19.0-py3-none-any.whl", "whl": g / "whl" / "gguf-0.19.0-py3-none-any.whl"}
    if where:
        assert f"gguf wheel: {want[where]}\n" in r.stdout, r.stdout
    else:
        assert "gguf wheel: none (carry .gpurun/a or .gpurun/whl)" in r.stdout, r.stdout
