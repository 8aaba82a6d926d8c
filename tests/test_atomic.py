"""kvpolar.atomic: a file appears complete or not at all."""

from __future__ import annotations

import os

import pytest

from kvpolar.atomic import atomic_path, atomic_write_bytes, atomic_write_text


def test_write_text_and_bytes(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "héllo\n")
    atomic_write_bytes(tmp_path / "b.bin", b"\0\1")
    assert (tmp_path / "a.txt").read_bytes() == "héllo\n".encode()
    assert (tmp_path / "b.bin").read_bytes() == b"\0\1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin"]


def test_failed_write_leaves_no_file_and_no_temp(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), atomic_path(tmp_path / "out.txt") as tmp:
        assert tmp.parent == tmp_path
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_existing_file(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(out) as tmp:
        tmp.write_text("new, half written")
        raise KeyboardInterrupt
    assert out.read_text() == "old"
    assert list(tmp_path.iterdir()) == [out]
    atomic_write_text(out, "new")
    assert out.read_text() == "new" and list(tmp_path.iterdir()) == [out]


def test_missing_directory_and_mode(tmp_path):
    with pytest.raises(FileNotFoundError, match="output directory"):
        atomic_write_text(tmp_path / "sub" / "a.txt", "x")
    with pytest.raises(IsADirectoryError):
        atomic_write_text(tmp_path, "x")
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "sub" / "a.txt", "x", mkdir=True)
    finally:
        os.umask(old)
    assert (tmp_path / "sub" / "a.txt").stat().st_mode & 0o777 == 0o644
