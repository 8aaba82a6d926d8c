"""ruff (the pyproject configuration) over the whole repository."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from kvpolar import paths


def test_ruff_clean():
    if (
        shutil.which("ruff") is None
        and subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True).returncode != 0
    ):
        pytest.fail("ruff is not installed: pip install -e '.[test]' installs it")
    p = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
        cwd=paths.repo_root(),
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_ruff_format_clean():
    p = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", "."],
        cwd=paths.repo_root(),
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, "run `ruff format .`:\n" + p.stdout + p.stderr
