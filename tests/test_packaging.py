"""The wheel holds the product only, and its CLI works outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kvpolar import paths

SUBCOMMANDS = ("inspect", "encode", "decode", "dump", "calibrate", "recommend")


def pip(command: str, *args: str) -> None:
    """`pip COMMAND --no-deps -q ARGS` with this interpreter; fails the test with pip's output."""
    cmd = [sys.executable, "-m", "pip", command, "--no-deps", "--disable-pip-version-check", "-q", *args]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the package sources (pip would write build/ and *.egg-info
    into the checkout, and <repo>/build is the llama.cpp build)."""
    root = paths.repo_root()
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("*.egg-info", "__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(root / name, src / name)
    for name in ("converter", "cupy_kernels"):
        shutil.copytree(root / name, src / name, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    pip("wheel", "-w", str(out), str(src))
    (whl,) = out.glob("kvpolar-*.whl")
    return whl


def test_wheel_holds_the_product_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if "/" in n and ".dist-info" not in n}
    assert tops == {"kvpolar", "cupy_kernels"}
    assert not [n for n in names if n.startswith(("study/", "kvsetup/", "scripts/", "tests/"))]
    for need in (
        "kvpolar/csrc/ggml-polar-format.h",
        "cupy_kernels/polar_block.cuh",
        "cupy_kernels/polar_encode.cu",
        "cupy_kernels/torch_cache.py",
        "kvpolar/format.py",
    ):
        assert need in names


def test_cli_works_from_the_installed_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    pip("install", "--target", str(site), str(wheel))
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("KVPOLAR_REPO", None)
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import kvpolar, cupy_kernels.loader as l; print(kvpolar.__file__); print(l.kernel_dir())",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(site)) for line in where.stdout.split()), where.stdout
    for argv in (["--help"], *([c, "--help"] for c in SUBCOMMANDS)):
        r = subprocess.run(
            [sys.executable, "-m", "kvpolar", *argv], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert r.returncode == 0, f"kvpolar {' '.join(argv)}: {r.stderr}"
        assert "usage" in r.stdout.lower()
