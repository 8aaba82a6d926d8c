"""GPU encoder and decoder of the polar formats (polar_encode.cu), and the codebook tables the
attention kernels read, on the device.

The encoder writes the bytes of `kvpolar.codec.quantize_blocks` and the decoder the floats of
`dequantize_blocks` (tests/test_gpu_parity.py). Tensors are torch CUDA tensors; the kernels run
on torch's current stream.

    encode(x, fmt)                      (..., k*64) float32/float16/bfloat16 -> (..., k, type_size) uint8
    encode(x, fmt, variant="base")      the same bytes from another warp-path kernel (ENCODE_VARIANTS)
    encode(x, fmt, "cta", cta_variant="handoff")  ... from another latency-path kernel (CTA_VARIANTS)
    encode_into(x, cache, fmt, pos)     x [B, H, T, D] written into cache [B, H, T_max, D/64, ts] at pos
    decode(blocks, fmt, dtype)          (..., type_size) uint8 -> (..., 64) float32/float16
    dequantize_cache(cache, fmt, ...)   [B, H, T_max, D/64, ts] -> [B, H, length, D]
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from kvpolar.format import QK, get_format

from . import formats, loader

ENCODE_FORMATS = ("polar", "polar3")
_IN_DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def _module():
    return loader.module("polar_encode.cu", (), exact=True)


# Kernels of the warp path (polar_encode.cu, issue 11 item 4): name -> the #defines of its module
# (None: "base", one candidate at a time, in the default module; else a module holding only
# polar_encode_rs_<fmt>_<f32|f16>). All write the bytes of "base" on the same grid
# (tests/test_gpu_encode_variants.py; scripts/bench_gpu.py encode --variants). The slide, ilp and
# persistent-grid variants lost on the H200 and were removed (docs/gpu/encode-variants-h200-session8.json).
#   rs<G>     scale candidates G at a time, one reduce-scatter block sum per group
#   *_lb<N>   __launch_bounds__(256, N): registers capped for N CTAs of 8 warps per SM
#   *_w       the window tables written once a warp instead of once a block
#   *_n       no branch around each candidate for a zero scale (session 16; to be measured)
@dataclasses.dataclass(frozen=True)
class EncodeVariant:
    defines: tuple[tuple[str, int], ...] | None


ENCODE_VARIANTS: dict[str, EncodeVariant] = {
    "base": EncodeVariant(None),
    "rs8": EncodeVariant((("POLAR_ENC_RS_G", 8),)),
    "rs8_lb5": EncodeVariant((("POLAR_ENC_RS_G", 8), ("POLAR_ENC_MINB", 5))),
    "rs8_lb5_w": EncodeVariant((("POLAR_ENC_RS_G", 8), ("POLAR_ENC_MINB", 5), ("POLAR_ENC_WIN_ONCE", 1))),
    "rs8_lb5_wn": EncodeVariant(
        (("POLAR_ENC_RS_G", 8), ("POLAR_ENC_MINB", 5), ("POLAR_ENC_WIN_ONCE", 1), ("POLAR_ENC_NOSKIP", 1))
    ),
    "rs8_lb5_wnr": EncodeVariant(
        (
            ("POLAR_ENC_RS_G", 8),
            ("POLAR_ENC_MINB", 5),
            ("POLAR_ENC_WIN_ONCE", 1),
            ("POLAR_ENC_NOSKIP", 1),
            ("POLAR_ENC_RCP", 1),
        )
    ),
}
VARIANT_DTYPES = ("f32", "f16")  # input types of the variant modules
# The warp path's kernel for float32/float16 input unless a variant is asked for (bfloat16: base).
# H200, session 16, before the ring tables became const in every kernel: rs8_lb5 366, with const rings 381,
# and the windows once a warp (rs8_lb5_w) 386 M blocks/s (polar from float16), same bytes
# (docs/gpu/encode-variants-h200-session16.json). Session 17: no branch per scale candidate (rs8_lb5_wn)
# 398, and the scales' reciprocals by rcp.rn (rs8_lb5_wnr) 400 (polar3 418), same bytes
# (docs/gpu/encode-variants-h200-session17b.json).
DEFAULT_VARIANT = "rs8_lb5_wnr"


# Kernels of the latency path (path "cta", one CTA of 16 warps a block: ggml-cuda's shape): name -> the
# #defines of its module. "winner" (the default module): each warp reduces its scale candidate's step-6 sums
# beside its error, and the warp whose candidate wins refines it; "handoff" is the code before it (warp 0
# takes the winner's codes from shared memory, then sums them: POLAR_ENC_CTA_WINNER=0), kept for
# scripts/bench_gpu.py encode-latency. Same bytes (tests/test_gpu_encode_variants.py).
CTA_VARIANTS: dict[str, tuple[tuple[str, int], ...]] = {
    "winner": (),
    "handoff": (("POLAR_ENC_CTA_WINNER", 0),),
}


def _variant_kernel(variant: str, fmt: str, suffix: str):
    """The warp-path kernel of a variant name (checked by the caller: encode_into)."""
    defines = ENCODE_VARIANTS[variant].defines
    if defines is None:
        return _module().get_function(f"polar_encode_{fmt}_{suffix}")
    if suffix not in VARIANT_DTYPES:
        raise ValueError(f"encoder variant {variant!r} takes float32 or float16 input, got {suffix}")
    return loader.module("polar_encode.cu", defines, exact=True).get_function(
        f"polar_encode_rs_{fmt}_{suffix}"
    )


def _in_suffix(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in _IN_DTYPES:
        raise ValueError(f"input dtype must be float32, float16 or bfloat16, got {name}")
    return _IN_DTYPES[name]


def _enc_fmt(fmt: str) -> str:
    if fmt not in ENCODE_FORMATS:
        raise ValueError(f"the GPU encoder writes 'polar' or 'polar3', got {fmt!r}")
    return fmt


# Up to this many blocks per SM, a call takes the latency path (one CTA of 16 warps per block, the
# scale candidates in parallel, as ggml-cuda's SET_ROWS for a decode step); more take one warp per
# block (throughput). Both write the same bytes.
CTA_PATH_BLOCKS_PER_SM = 4
ENCODE_PATHS = ("auto", "warp", "cta")


def encode_into(
    x,
    cache,
    fmt: str = "polar",
    pos=0,
    path: str = "auto",
    variant: str | None = None,
    cta_variant: str = "winner",
) -> None:
    """Encode x [B, H, T, D] (float32/16/bf16, last dim contiguous) into
    cache [B, H, T_max, D/64, type_size] uint8 (contiguous) at token positions pos + t.

    pos: an int, or an int32 CUDA tensor [B] (per-sequence positions, a ragged batch).
    path: "auto" (by the number of blocks, CTA_PATH_BLOCKS_PER_SM), "warp" or "cta"; same bytes.
    variant: None (the warp path runs DEFAULT_VARIANT for float32/float16 input, "base" for
    bfloat16), or a kernel of the warp path by name (ENCODE_VARIANTS; a variant other than "base"
    takes float32/float16 input and path "auto" or "warp", and runs whatever the number of
    blocks); same bytes.
    cta_variant: the latency path's kernel by name (CTA_VARIANTS) where the call takes that path; same bytes.
    """
    torch = loader.torch()
    fmt = _enc_fmt(fmt)
    if cta_variant not in CTA_VARIANTS:
        raise ValueError(f"cta_variant must be one of {tuple(CTA_VARIANTS)}, got {cta_variant!r}")
    if path not in ENCODE_PATHS:
        raise ValueError(f"path must be one of {ENCODE_PATHS}, got {path!r}")
    if variant is not None and variant not in ENCODE_VARIANTS:
        raise ValueError(f"variant must be None or one of {tuple(ENCODE_VARIANTS)}, got {variant!r}")
    if variant is not None and variant != "base":
        if path == "cta":
            raise ValueError(f"encoder variant {variant!r} is a warp-path kernel, not path 'cta'")
        path = "warp"
    loader.check_cuda("x", x)
    loader.check_cuda("cache", cache)
    if x.dim() != 4 or x.shape[-1] % QK:
        raise ValueError(f"x must be [B, H, T, D] with D a multiple of {QK}, got {tuple(x.shape)}")
    B, H, T, D = x.shape
    ts = get_format(fmt).type_size
    if (
        cache.dtype != torch.uint8
        or cache.dim() != 5
        or tuple(cache.shape[:2]) != (B, H)
        or tuple(cache.shape[3:]) != (D // QK, ts)
    ):
        want = f"uint8 [{B}, {H}, T_max, {D // QK}, {ts}]"
        raise ValueError(f"cache must be {want} for {fmt}, got {cache.dtype} {tuple(cache.shape)}")
    if not cache.is_contiguous():
        raise ValueError("cache must be contiguous")
    if x.stride(-1) != 1:
        x = x.contiguous()
    T_max = cache.shape[2]
    if isinstance(pos, int):
        if pos < 0 or pos + T > T_max:
            raise ValueError(f"positions {pos}..{pos + T - 1} outside the cache of {T_max} tokens")
        pos_t, pos0 = None, pos
    else:
        if pos.dtype != torch.int32 or tuple(pos.shape) != (B,):
            raise ValueError(
                f"pos must be an int or an int32 tensor [{B}], got {pos.dtype} {tuple(pos.shape)}"
            )
        pos_t, pos0 = pos, 0
    n = B * H * T * (D // QK)
    if n == 0:
        return
    if path == "auto":
        sms = loader.sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
        path = "cta" if n <= CTA_PATH_BLOCKS_PER_SM * sms else "warp"
    if path == "cta":
        kern = loader.module("polar_encode.cu", CTA_VARIANTS[cta_variant], exact=True).get_function(
            f"polar_encode_cta_{fmt}_{_in_suffix(x.dtype)}"
        )
        warps = 16
        grid = min(n, 65535 * 4)
    else:
        suffix = _in_suffix(x.dtype)
        if variant is None:
            variant = DEFAULT_VARIANT if suffix in VARIANT_DTYPES else "base"
        kern = _variant_kernel(variant, fmt, suffix)
        warps = 8
        grid = min((n + warps - 1) // warps, 65535 * 4)
    ob, oh, ot = (cache.stride(0), cache.stride(1), cache.stride(2))
    args = (
        loader.ptr(x),
        loader.ptr(cache),
        np.uint64(pos_t.data_ptr() if pos_t is not None else 0),
        np.int64(n),
        np.int32(H),
        np.int32(T),
        np.int32(D // QK),
        np.int64(x.stride(0)),
        np.int64(x.stride(1)),
        np.int64(x.stride(2)),
        np.int64(ob),
        np.int64(oh),
        np.int64(ot),
        np.int32(pos0),
    )
    loader.launch(kern, (grid,), (32 * warps,), args)


def encode(
    x, fmt: str = "polar", path: str = "auto", variant: str | None = None, cta_variant: str = "winner"
):
    """(..., k*64) float32/float16/bfloat16 CUDA tensor -> (..., k, type_size) uint8 blocks.

    path, variant, cta_variant: as in encode_into."""
    torch = loader.torch()
    loader.check_cuda("x", x)
    if x.dim() == 0 or x.shape[-1] % QK:
        raise ValueError(f"the last dimension must be a multiple of {QK}, got shape {tuple(x.shape)}")
    _in_suffix(x.dtype)
    lead = x.shape[:-1]
    D = x.shape[-1]
    x2 = x.reshape(1, 1, -1, D)
    ts = get_format(_enc_fmt(fmt)).type_size
    out = torch.empty((1, 1, x2.shape[2], D // QK, ts), dtype=torch.uint8, device=x.device)
    encode_into(x2, out, fmt, 0, path, variant, cta_variant)
    return out.reshape(*lead, D // QK, out.shape[-1])


def decode(blocks, fmt: str = "polar", dtype=None):
    """(..., type_size) uint8 CUDA tensor -> (..., 64) float32 (or float16) values."""
    torch = loader.torch()
    loader.check_cuda("blocks", blocks)
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"decode writes float32 or float16, got {dtype}")
    fmt = _enc_fmt(fmt)
    ts = get_format(fmt).type_size
    if blocks.dtype != torch.uint8 or blocks.dim() == 0 or blocks.shape[-1] != ts:
        raise ValueError(
            f"blocks must be uint8 (..., {ts}) for {fmt}, got {blocks.dtype} {tuple(blocks.shape)}"
        )
    b = blocks.contiguous()
    n = b.numel() // ts
    out = torch.empty((*blocks.shape[:-1], QK), dtype=dtype, device=blocks.device)
    if n:
        suffix = "f32" if dtype == torch.float32 else "f16"
        kern = _module().get_function(f"polar_decode_{fmt}_{suffix}")
        npairs = n * (QK // 2)
        grid = min((npairs + 255) // 256, 65535 * 8)
        loader.launch(kern, (grid,), (256,), (loader.ptr(b), loader.ptr(out), np.int64(npairs)))
    return out


def dequantize_cache(cache, fmt: str, dtype=None, length: int | None = None):
    """cache [B, H, T_max, D/64, ts] -> [B, H, length, D] float32/float16 values."""
    length = cache.shape[2] if length is None else length
    c = cache[:, :, :length]
    y = decode(c, fmt, dtype)
    return y.reshape(*c.shape[:3], -1)


# ----------------------------------------------------------------------------------------------
# Codebook tables of the attention kernels (per format object and device, built once)


@functools.cache
def _codebook_table(fmt: formats.CacheFormat, device: str):
    torch = loader.torch()
    return torch.from_numpy(np.stack([fmt.cx, fmt.cy], 1).copy()).to(device)


def codebook_table(fmt: str, device: str):
    """float32 [ncodes, 2] (CX, CY) of a cache format on `device`: the table of polar_attn_simt."""
    return _codebook_table(formats.get(fmt), device)


@functools.cache
def _mma_table(fmt: formats.CacheFormat, prec: int, device: str):
    torch = loader.torch()
    v = np.stack([fmt.cx, fmt.cy], 1).astype(np.float32)  # [NC, 2]
    hi = v.astype(np.float16)
    lo = (v - hi.astype(np.float32)).astype(np.float16)
    ent = np.concatenate([hi, lo], 1) if prec else hi  # [NC, 4] or [NC, 2] halves
    copies = 16 if prec else 32
    tab = np.repeat(ent[:, None, :], copies, 1).copy()  # [NC, copies, halves]
    assert tab.nbytes == v.shape[0] * 128
    return torch.from_numpy(tab.reshape(-1).view(np.int16).copy()).to(device)


def mma_table(fmt: str, prec: int, device: str):
    """The codebook in the shared-memory layout of polar_attn_mma: entry of code k, copy l at byte
    k * 128 + l * size; prec 1: 16 copies of (hi half2, lo half2), prec 0: 32 copies of hi half2
    (hi = fp16(v), lo = fp16(v - hi), round to nearest even, as the kernel's f2h)."""
    return _mma_table(formats.get(fmt), prec, device)
