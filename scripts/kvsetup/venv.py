"""The project venv: $CACHE/venv-<hash> with `pip install -e '.[test]'`; pip download."""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kvpolar.atomic import atomic_write_text
from kvpolar.paths import cache_dir

from .pins import CPU_TORCH_EXTRAS, VENV_MARKER
from .util import BootstrapError, RegistryError, file_lock, log, repo_root, run, sha256_file


def venv_key(root: Path | None = None) -> str:
    """Hash of pyproject.toml + the CPU torch extras + interpreter version + checkout path.

    The checkout path is part of the key because the venv holds an editable install of this
    checkout: two worktrees must not share one venv (tests would import the other tree).
    """
    root = root or repo_root()
    h = hashlib.sha256()
    h.update((root / "pyproject.toml").read_bytes())
    h.update("\0".join(CPU_TORCH_EXTRAS).encode())
    h.update(f"\0{sys.implementation.name}-{sys.version_info[0]}.{sys.version_info[1]}\0".encode())
    h.update(str(root.resolve()).encode())
    return h.hexdigest()[:12]


def venv_dir() -> Path:
    return cache_dir() / f"venv-{venv_key()}"


def venv_python(venv: Path | None = None) -> Path:
    return (venv or venv_dir()) / "bin" / "python"


def venv_ready(venv: Path) -> bool:
    return (venv / VENV_MARKER).is_file() and venv_python(venv).exists()


def cmd_venv(args: argparse.Namespace | None = None) -> Path:
    venv = venv_dir()
    root = repo_root()
    with file_lock(venv.name):
        if venv_ready(venv):
            log(f"venv ok: {venv}")
            return venv_python(venv)
        t0 = time.time()
        if venv.exists():
            log(f"removing incomplete venv {venv}")
            shutil.rmtree(venv)
        log(f"creating venv {venv} (python {platform.python_version()})")
        try:
            run([sys.executable, "-m", "venv", venv], what="python -m venv")
        except BootstrapError as e:
            raise BootstrapError(
                f"{e}\nCould not create a virtual environment with {sys.executable}. On Debian/Ubuntu "
                "install the venv module: apt-get install python3-venv"
            ) from None
        py = venv_python(venv)
        try:
            log("pip install -e '.[test]' (numpy, gguf, tqdm, pytest, scipy, safetensors)")
            pip_install(py, ["-e", f"{root}[test]"], what="pip install -e '.[test]'")
            install_cpu_torch(py)
        except BootstrapError:
            shutil.rmtree(venv, ignore_errors=True)
            raise
        atomic_write_text(
            venv / VENV_MARKER,
            json.dumps({"pyproject_sha256": sha256_file(root / "pyproject.toml"), "repo": str(root)}) + "\n",
            mkdir=True,
        )
        log(f"venv ready in {time.time() - t0:.0f}s")
        return py


def install_cpu_torch(py: Path) -> None:
    """torch from a wheel on this machine (pip's find-links, no index) and CPU_TORCH_EXTRAS (pins.py says
    why); nothing installed, and a line saying so, where there is no such wheel. A failure after the wheel
    is found (its dependencies or the extras from the index) raises."""
    probe = subprocess.run(
        [py, "-m", "pip", "install", "--disable-pip-version-check", "--no-index", "--no-deps", "torch"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        log("no torch wheel on this machine (pip --no-index): the torch CPU tests will skip")
        return
    version = subprocess.run(
        [py, "-c", "import importlib.metadata as m; print(m.version('torch'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    log(f"torch {version} from this machine's wheel; its dependencies and {' '.join(CPU_TORCH_EXTRAS)}")
    pip_install(
        py, [f"torch=={version}", *CPU_TORCH_EXTRAS], what="pip install torch's dependencies, transformers"
    )


REGISTRY_HINT = (
    "Is the package index reachable? pip uses its own configuration (pip config list; "
    "PIP_INDEX_URL). Only PyPI is needed."
)


def _pip_failure(e: BootstrapError, spec: str) -> BootstrapError:
    text = str(e)
    unreachable = re.search(
        r"(Max retries exceeded|ConnectionError|NewConnectionError|Temporary failure in name resolution|"
        r"Network is unreachable|timed out|ProxyError|SSLError|Could not fetch URL)",
        text,
    )
    notfound = re.search(r"(No matching distribution|Could not find a version)", text)
    if unreachable:
        return RegistryError(f"package registry unreachable while fetching {spec}.\n{REGISTRY_HINT}\n{text}")
    if notfound and "from versions: none" in text:
        return RegistryError(
            f"could not fetch {spec}: the package registry is unreachable or does not list it "
            f"(pip found no versions at all).\n{REGISTRY_HINT}\n{text}"
        )
    if notfound:
        return RegistryError(f"{spec} not found on the package index.\n{REGISTRY_HINT}\n{text}")
    return e


def pip_install(py: Path, pip_args: Sequence[str], what: str, env: dict | None = None) -> None:
    cmd = [py, "-m", "pip", "install", "--disable-pip-version-check", *pip_args]
    try:
        run(cmd, what=what, env=env)
    except BootstrapError as e:
        raise _pip_failure(e, " ".join(pip_args)) from None


def pip_python() -> Path:
    """A Python with pip, for `pip download`: the venv if ready, else this interpreter."""
    venv = venv_dir()
    if venv_ready(venv):
        return venv_python(venv)
    probe = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True)
    if probe.returncode == 0:
        return Path(sys.executable)
    return cmd_venv()


def pip_download(spec: str, dest: Path, *, sdist: bool = False) -> Path:
    """`pip download --no-deps` one distribution into `dest`; return the downloaded file."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.iterdir())
    cmd = [
        pip_python(),
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--no-deps",
        "--no-cache-dir",
        "-d",
        dest,
    ]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd.append(spec)
    try:
        run(cmd, what=f"pip download {spec}")
    except BootstrapError as e:
        raise _pip_failure(e, spec) from None
    new = [p for p in dest.iterdir() if p not in before]
    name = re.split(r"[=<>!~ ]", spec, maxsplit=1)[0].replace("-", "_").lower()
    cands = [p for p in (new or list(dest.iterdir())) if p.name.lower().replace("-", "_").startswith(name)]
    if len(cands) != 1:
        found = sorted(map(str, cands))
        raise BootstrapError(f"pip download {spec}: expected one file in {dest}, found {found}")
    return cands[0]
