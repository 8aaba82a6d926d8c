"""Centering offsets: the layout map to llama.cpp and the GGUF copy (torch-free parts)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from kvpolar import calibrate, gguf_io
from kvpolar.gguf_scan import GGUFFormatError


def testhf_to_llama_dims_inverts_the_llama_permutation():
    # llama.cpp's converter: w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2) on Q/K rows
    d = 8
    hf = np.arange(d)
    llama = hf.reshape(2, d // 2).swapaxes(0, 1).reshape(-1)  # llama dim j holds HF dim llama[j]
    np.testing.assert_array_equal(calibrate.hf_to_llama_dims(d), llama)


def test_write_with_offsets_adds_tensors_atomically(tmp_path):
    src = tmp_path / "m.gguf"
    gguf_io.write_tensors(src, {"blk.0.attn_k.weight": np.ones((4, 64), np.float32)}, fmt=None, arch="llama")
    k = np.arange(64, dtype=np.float32)
    dst = tmp_path / "out.gguf"
    calibrate.write_with_offsets(src, dst, {0: (k, -k)}, progress=False)
    t = gguf_io.read_tensors(dst)
    np.testing.assert_array_equal(t["blk.0.attn_k.center"], k)
    np.testing.assert_array_equal(t["blk.0.attn_v.center"], -k)
    np.testing.assert_array_equal(t["blk.0.attn_k.weight"], np.ones((4, 64), np.float32))
    with pytest.raises(ValueError, match=r"already has blk\.0\.attn_k\.center"):
        calibrate.write_with_offsets(dst, tmp_path / "again.gguf", {0: (k, k)}, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "out.gguf"]  # no temp left behind
    with pytest.raises(ValueError, match="must be a new path"):
        calibrate.write_with_offsets(src, src, {0: (k, k)}, progress=False)


def test_read_offsets_and_llama_to_hf_dims(tmp_path):
    d = 64
    k_hf = np.arange(2 * d, dtype=np.float32)  # 2 heads
    perm = calibrate.hf_to_llama_dims(d)
    k_llama = k_hf.reshape(2, d)[:, perm].reshape(-1)
    src = tmp_path / "m.gguf"
    gguf_io.write_tensors(src, {"blk.0.attn_k.weight": np.ones((4, 64), np.float32)}, fmt=None, arch="llama")
    dst = tmp_path / "c.gguf"
    calibrate.write_with_offsets(src, dst, {0: (k_llama, -k_llama), 3: (k_llama, k_llama)}, progress=False)
    arch, off = calibrate.read_offsets(dst)
    assert arch == "llama" and sorted(off) == [0, 3]
    np.testing.assert_array_equal(off[0][1], -k_llama)
    np.testing.assert_array_equal(calibrate.llama_to_hf_dims(off[0][0], d, "llama"), k_hf)
    np.testing.assert_array_equal(calibrate.llama_to_hf_dims(k_llama, d, "qwen2"), k_llama)
    assert calibrate.read_offsets(src)[1] == {}


def test_copy_keeps_metadata_and_tensors_byte_for_byte(tmp_path):
    src, dst = tmp_path / "m.gguf", tmp_path / "c.gguf"
    meta = {"tokenizer.ggml.tokens": ["a", "bb"], "llama.block_count": np.uint32(1), "x.scores": [0.5, 1.5]}
    q = gguf_io.encode_tensor("blk.0.attn_k.weight", np.ones((4, 128), np.float32), "polar")
    gguf_io.write_tensors(src, {"blk.0.attn_k.weight": q}, None, meta, arch="llama")
    k = np.ones(64, np.float32)
    calibrate.write_with_offsets(src, dst, {0: (k, -k)}, progress=False)
    a, b = gguf_io.read_gguf(src, decode=False), gguf_io.read_gguf(dst, decode=False)
    assert b.arch == "llama" and b.metadata == a.metadata
    assert list(b.tensors) == ["blk.0.attn_k.weight", "blk.0.attn_k.center", "blk.0.attn_v.center"]
    np.testing.assert_array_equal(b.tensors["blk.0.attn_k.weight"].data, q.data)


def test_corrupt_model_raises_the_bounded_readers_error(tmp_path, monkeypatch):
    """Every GGUF read goes through kvpolar.gguf_scan, never gguf-py's unbounded reader."""
    src = tmp_path / "m.gguf"
    gguf_io.write_tensors(src, {"blk.0.attn_k.weight": np.ones((4, 64), np.float32)}, fmt=None, arch="llama")
    k = np.zeros(64, np.float32)
    monkeypatch.setattr(gguf, "GGUFReader", None)
    assert calibrate.gguf_arch(src) == "llama" and calibrate.read_offsets(src) == ("llama", {})
    calibrate.write_with_offsets(src, tmp_path / "ok.gguf", {0: (k, k)}, progress=False)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(src.read_bytes()[:-10])
    for fn in (calibrate.gguf_arch, calibrate.read_offsets):
        with pytest.raises(GGUFFormatError, match="truncated GGUF file"):
            fn(bad)
    with pytest.raises(GGUFFormatError, match="truncated GGUF file"):
        calibrate.write_with_offsets(bad, tmp_path / "out.gguf", {0: (k, k)}, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "m.gguf", "ok.gguf"]
