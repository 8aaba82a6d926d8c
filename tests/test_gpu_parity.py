"""numpy == GPU: the CuPy encoder (cupy_kernels.codec) writes the bytes of
kvpolar.codec.quantize_blocks and the decoder the floats of dequantize_blocks, for both formats
and float32/float16/bfloat16 input.

Skipped without CuPy and a CUDA device (the gpu marker, tests/conftest.py).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

import blocks
from cupy_kernels import codec as gpu_codec
from kvpolar import codec
from kvpolar.format import FORMATS, QK, get_format

pytestmark = pytest.mark.gpu
FMTS = sorted(FORMATS)


@pytest.fixture(scope="module")
def torch(cuda_torch):
    return cuda_torch


_rows = blocks.rows
KINDS = list(blocks.KINDS)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("kind", KINDS)
def test_encode_f32_bytes(torch, fmt, kind):
    rng = np.random.default_rng(zlib.crc32(f"{fmt}/{kind}".encode()))
    x = _rows(kind, 1000, rng)
    want = codec.quantize_blocks(x, fmt)
    got = gpu_codec.encode(torch.from_numpy(x).cuda(), fmt).reshape(len(x), -1).cpu().numpy()
    assert np.array_equal(got, want), blocks.first_diff(fmt, got, want)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["gaussian", "scaled", "heavy", "zero", "nonfinite", "huge"])
def test_encode_half_inputs(torch, fmt, dtype, kind):
    """float16/bfloat16 input is converted to float32 exactly, then encoded."""
    rng = np.random.default_rng(7)
    tdt = getattr(torch, dtype)
    xt = torch.from_numpy(_rows(kind, 700, rng)).to(tdt)
    want = codec.quantize_blocks(xt.float().numpy(), fmt)
    got = gpu_codec.encode(xt.cuda(), fmt).reshape(len(xt), -1).cpu().numpy()
    assert np.array_equal(got, want), blocks.first_diff(fmt, got, want)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("path", ["warp", "cta"])
@pytest.mark.parametrize("kind", KINDS)
def test_encode_paths_bytes(torch, fmt, path, kind):
    """Both encoder paths (one warp per block; one CTA of 16 warps per block, ggml-cuda's decode-step
    shape) write the reference bytes, also where `auto` would pick the other one."""
    rng = np.random.default_rng(zlib.crc32(f"{fmt}/{kind}/{path}".encode()))
    x = _rows(kind, 300, rng)
    want = codec.quantize_blocks(x, fmt)
    got = gpu_codec.encode(torch.from_numpy(x).cuda(), fmt, path).reshape(len(x), -1).cpu().numpy()
    assert np.array_equal(got, want), blocks.first_diff(fmt, got, want)


@pytest.mark.parametrize("fmt", FMTS)
def test_encode_large_random(torch, fmt):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((20000, QK)) * np.exp(rng.standard_normal((20000, 1)))).astype(np.float32)
    want = codec.quantize_blocks(x, fmt)
    got = gpu_codec.encode(torch.from_numpy(x).cuda(), fmt).reshape(len(x), -1).cpu().numpy()
    assert np.array_equal(got, want), blocks.first_diff(fmt, got, want)


@pytest.mark.parametrize("fmt", FMTS)
def test_encode_into_strided_ragged(torch, fmt):
    """encode_into a [B, H, T_max, nb, ts] cache from a transposed view at per-sequence positions."""
    rng = np.random.default_rng(3)
    B, H, T, D, T_max = 3, 2, 5, 128, 16
    src = torch.from_numpy(rng.standard_normal((B, T, H, D)).astype(np.float32)).cuda()
    x = src.transpose(1, 2)  # [B, H, T, D], not contiguous
    ts = get_format(fmt).type_size
    cache = torch.zeros((B, H, T_max, D // QK, ts), dtype=torch.uint8, device="cuda")
    pos = torch.tensor([0, 3, 11], dtype=torch.int32, device="cuda")
    gpu_codec.encode_into(x, cache, fmt, pos)
    c = cache.cpu().numpy()
    xn = x.cpu().numpy()
    for b, p in enumerate(pos.tolist()):
        want = codec.quantize_blocks(xn[b].reshape(-1, QK), fmt).reshape(H, T, D // QK, ts)
        assert np.array_equal(c[b, :, p : p + T], want)
        assert not c[b, :, :p].any() and not c[b, :, p + T :].any()


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("source", ["encoded", "randbytes"])
def test_decode_floats(torch, fmt, source):
    rng = np.random.default_rng(5)
    ts = get_format(fmt).type_size
    if source == "encoded":
        b = codec.quantize_blocks(_rows("scaled", 3000, rng), fmt)
    else:
        b = rng.integers(0, 256, (3000, ts), dtype=np.uint8)
        d = b[:, :2].copy().view(np.float16)
        d[~np.isfinite(d)] = np.float16(1.5)  # Inf/NaN scales are rejected by readers
        b[:, :2] = d.view(np.uint8)
    want = codec.dequantize_blocks(b, fmt)
    got = gpu_codec.decode(torch.from_numpy(b).cuda(), fmt).cpu().numpy()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    got16 = gpu_codec.decode(torch.from_numpy(b).cuda(), fmt, torch.float16).cpu().numpy()
    assert np.array_equal(got16, want.astype(np.float16))


def test_bad_inputs(torch):
    with pytest.raises(ValueError, match="multiple of 64"):
        gpu_codec.encode(torch.zeros((3, 96), device="cuda"))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        gpu_codec.encode(torch.zeros((3, 64), dtype=torch.float64, device="cuda"))
    with pytest.raises(ValueError, match="'polar' or 'polar3'"):
        gpu_codec.encode(torch.zeros((3, 64), device="cuda"), "q4_0")
    with pytest.raises(ValueError, match="CUDA"):
        gpu_codec.encode(torch.zeros((3, 64)))
    with pytest.raises(ValueError, match="path must be one of"):
        gpu_codec.encode(torch.zeros((3, 64), device="cuda"), "polar", "fast")
