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
