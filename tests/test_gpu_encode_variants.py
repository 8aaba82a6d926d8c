"""numpy == GPU for each kernel of the encoder's warp path (cupy_kernels.codec.ENCODE_VARIANTS:
"base" and polar_encode.cu under POLAR_ENC_RS_G, one of which is the default for float32/float16
input): each writes the bytes of kvpolar.codec.quantize_blocks for both formats, float32 and
float16 input, on the parity tests' blocks (tests/blocks.py), and the bytes of "base" elsewhere.
The same for each kernel of the latency path (path "cta", cupy_kernels.codec.CTA_VARIANTS).

Skipped without CuPy and a CUDA device (the gpu marker, tests/conftest.py). The CPU twin of the
variants' grouped search is checked by tests/test_encoder_search.py.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np
import pytest

import blocks
from cupy_kernels import codec as gpu_codec
from kvpolar import codec
from kvpolar.format import FORMATS, QK, get_format

pytestmark = pytest.mark.gpu
FMTS = sorted(FORMATS)
VARIANTS = list(gpu_codec.ENCODE_VARIANTS)
OTHERS = [None, *(v for v in VARIANTS if v != "base")]  # None: the default choice
RS = next(v for v in VARIANTS if gpu_codec.ENCODE_VARIANTS[v].defines)  # a kernel of its own
N = 300  # blocks per kind


@pytest.fixture(scope="module")
def torch(cuda_torch):
    return cuda_torch


@functools.cache
def _case(fmt: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, numpy's bytes) of one format and kind, computed once for all variants."""
    x = blocks.rows(kind, N, np.random.default_rng(zlib.crc32(f"variants/{fmt}/{kind}".encode())))
    return x, codec.quantize_blocks(x, fmt)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("kind", blocks.KINDS)
def test_variant_f32_bytes(torch, variant, fmt, kind):
    x, want = _case(fmt, kind)
    got = gpu_codec.encode(torch.from_numpy(x).cuda(), fmt, variant=variant).reshape(len(x), -1).cpu().numpy()
    assert np.array_equal(got, want), blocks.first_diff(fmt, got, want)


@functools.cache
def _case16(fmt: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """float16 blocks (as float16 numpy) and numpy's bytes of their float32 values."""
    x = blocks.rows(kind, N, np.random.default_rng(zlib.crc32(f"variants16/{kind}".encode())))
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    return h, codec.quantize_blocks(h.astype(np.float32), fmt)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("kind", ["gaussian", "scaled", "zero", "nonfinite", "huge", "fp16grid"])
def test_variant_f16_bytes(torch, variant, fmt, kind):
    """float16 input is converted to float32 exactly, then encoded."""
    h, want = _case16(fmt, kind)
    xt = torch.from_numpy(h)
    got = gpu_codec.encode(xt.cuda(), fmt, variant=variant).reshape(len(xt), -1).cpu().numpy()
    assert np.array_equal(got, want), blocks.first_diff(fmt, got, want)


@pytest.mark.parametrize("variant", OTHERS)
@pytest.mark.parametrize("fmt", FMTS)
def test_variant_large_random_equals_base(torch, variant, fmt):
    """Many blocks (200000, random scales): the base kernel's bytes."""
    rng = np.random.default_rng(13)
    x = (rng.standard_normal((200000, QK)) * np.exp(rng.standard_normal((200000, 1)))).astype(np.float32)
    xt = torch.from_numpy(x).cuda()
    assert torch.equal(gpu_codec.encode(xt, fmt, variant=variant), gpu_codec.encode(xt, fmt, variant="base"))


def test_default_variant_is_a_rs_kernel():
    assert gpu_codec.ENCODE_VARIANTS[gpu_codec.DEFAULT_VARIANT].defines is not None


@pytest.mark.parametrize("variant", OTHERS)
def test_variant_encode_into_strided_ragged(torch, variant):
    rng = np.random.default_rng(3)
    B, H, T, D, T_max = 3, 2, 5, 128, 16
    x = torch.from_numpy(rng.standard_normal((B, T, H, D)).astype(np.float32)).cuda().transpose(1, 2)
    ts = get_format("polar").type_size
    pos = torch.tensor([0, 3, 11], dtype=torch.int32, device="cuda")
    want = torch.zeros((B, H, T_max, D // QK, ts), dtype=torch.uint8, device="cuda")
    got = torch.zeros_like(want)
    gpu_codec.encode_into(x, want, "polar", pos, variant="base")
    gpu_codec.encode_into(x, got, "polar", pos, variant=variant)
    assert torch.equal(got, want)


def test_variant_bad_inputs(torch):
    x = torch.zeros((3, 64), device="cuda")
    with pytest.raises(ValueError, match="variant must be None or one of"):
        gpu_codec.encode(x, "polar", variant="fastest")
    with pytest.raises(ValueError, match="not path 'cta'"):
        gpu_codec.encode(x, "polar", "cta", variant=RS)
    with pytest.raises(ValueError, match="float32 or float16"):
        gpu_codec.encode(x.to(torch.bfloat16), "polar", variant=RS)
    with pytest.raises(ValueError, match="cta_variant must be one of"):
        gpu_codec.encode(x, "polar", "cta", cta_variant="fast")


@pytest.mark.parametrize("cta_variant", list(gpu_codec.CTA_VARIANTS))
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("kind", blocks.KINDS)
def test_cta_variant_f32_bytes(torch, cta_variant, fmt, kind):
    x, want = _case(fmt, kind)
    got = gpu_codec.encode(torch.from_numpy(x).cuda(), fmt, "cta", cta_variant=cta_variant)
    got = got.reshape(len(x), -1).cpu().numpy()
    assert np.array_equal(got, want), blocks.first_diff(fmt, got, want)


@pytest.mark.parametrize("cta_variant", list(gpu_codec.CTA_VARIANTS))
@pytest.mark.parametrize("fmt", FMTS)
def test_cta_variant_f16_bytes(torch, cta_variant, fmt):
    h, want = _case16(fmt, "gaussian")
    got = gpu_codec.encode(torch.from_numpy(h).cuda(), fmt, "cta", cta_variant=cta_variant)
    assert np.array_equal(got.reshape(len(h), -1).cpu().numpy(), want), fmt
