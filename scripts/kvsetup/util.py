"""Errors, logging, checksums, stamps, locks and subprocess helpers of the set-up."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from kvpolar import paths
from kvpolar.atomic import atomic_write_text
from kvpolar.paths import cache_dir


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
    """The checkout (kvpolar.paths.repo_root: $KVPOLAR_REPO, else the tree holding converter/)."""
    return paths.repo_root()


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
def file_lock(name: str) -> Iterator[None]:
    """Inter-process lock under $CACHE/.locks (several checkouts may share one cache)."""
    lock_dir = cache_dir() / ".locks"
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


def _try_lock(name: str):
    """Non-blocking variant of file_lock: returns an open locked file, or None if busy."""
    import fcntl

    lock_dir = cache_dir() / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    f = open(lock_dir / f"{name}.lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


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
        mkdir=True,
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


def sh_quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def compiler(kind: str = "c") -> str | None:
    """The C (kind 'c') or C++ ('c++') compiler the build will use: $CC/$CXX, else the first on PATH."""
    env, names = ("CC", ("cc", "gcc", "clang")) if kind == "c" else ("CXX", ("c++", "g++", "clang++"))
    return os.environ.get(env) or next((p for p in map(shutil.which, names) if p), None)


def signal_name(num: int) -> str:
    """'SIGILL' for 4; 'signal N' for a number that names no signal."""
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"
