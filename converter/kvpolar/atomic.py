"""Atomic file writes: a file appears complete or not at all, never half written.

Standard library only: scripts/bootstrap.py imports it before numpy is installed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text"]


@contextlib.contextmanager
def atomic_path(path: os.PathLike | str, *, mkdir: bool = False) -> Iterator[Path]:
    """Yield a temporary path in path's directory for the caller to write.

    On success the temporary file is fsync'd, given mode 0666 & ~umask (mkstemp makes 0600)
    and renamed over path (os.replace: readers see the old file or the new one). On any
    exception, KeyboardInterrupt included, it is removed and path is left as it was.
    mkdir: create missing parent directories; otherwise a missing one raises FileNotFoundError.
    """
    path = Path(path)
    parent = path.parent
    if mkdir:
        parent.mkdir(parents=True, exist_ok=True)
    elif not parent.is_dir():
        raise FileNotFoundError(f"{path}: the output directory {parent} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: expected a file path for the output, found a directory")
    fd, name = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: os.PathLike | str, data: bytes, *, mkdir: bool = False) -> None:
    """Write data to path atomically (see atomic_path)."""
    with atomic_path(path, mkdir=mkdir) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(
    path: os.PathLike | str, text: str, *, encoding: str = "utf-8", mkdir: bool = False
) -> None:
    """Write text to path atomically (see atomic_path); no newline translation."""
    atomic_write_bytes(path, text.encode(encoding), mkdir=mkdir)
