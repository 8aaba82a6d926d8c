"""CuPy kernels of the polar formats: encoder, decoder and split-K decode attention.

The CUDA sources are real files, `cupy_kernels/polar_common.cuh`, `polar_encode.cu` and
`polar_attention.cu`, compiled by NVRTC into a `cupy.RawModule` once per variant
(functools.cache) with the variant's compile-time constants prepended as #defines, which come
from `kvpolar.format` (and `kvpolar.paperb_kernel_ref` for the paper-B preset); the generated
`converter/csrc/ggml-polar-format.h` is on the include path.

Where the sources are found (first hit wins):
  1. $KVPOLAR_KERNELS (a folder holding the .cu/.cuh files);
  2. <kvpolar package>/cupy_kernels/ (a non-editable install: see docs/results-gpu.md,
     "Installing the kernel sources", for the pyproject lines that ship them);
  3. <repo>/cupy_kernels/ next to converter/ (the checkout, `pip install -e .`).

Tensors are torch CUDA tensors (the consumers are torch code: the transformers cache and the
benchmarks); kernels run on torch's current stream. Public functions check shapes and dtypes
and raise ValueError naming what is allowed.

    encode(x, fmt)                      (..., k*64) float32/float16/bfloat16 -> (..., k, type_size) uint8
    encode_into(x, cache, fmt, pos)     x [B, H, T, D] written into cache [B, H, T_max, D/64, ts] at pos
    decode(blocks, fmt, dtype)          (..., type_size) uint8 -> (..., 64) float32/float16
    attention(q, k_cache, v_cache, lens, kfmt, vfmt, ...)   [B, Hq, Tq, D] decode attention
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import os
from pathlib import Path

import numpy as np

import kvpolar
from kvpolar import codec
from kvpolar.format import QK, get_format, tables

log = logging.getLogger("kvpolar.gpu")

KERNEL_FILES = ("polar_common.cuh", "polar_encode.cu", "polar_attention.cu")
CACHE_FORMATS = ("polar", "polar3", "paperb")  # block formats the attention kernel reads
V_FORMATS = (*CACHE_FORMATS, "f16")
FMT_ID = {"polar": 0, "polar3": 1, "paperb": 2, "f16": 3}
KMODES = {"gather": 0, "lut": 1, "anglelut": 2}
HEAD_DIMS = (64, 128, 256)
SMEM_LIMIT = 227 * 1024  # per-block opt-in maximum on sm_90


# ----------------------------------------------------------------------------------------------
# Sources and modules


def _paperb():
    """The paper-B preset's byte format lives with the research code (scripts/study)."""
    try:
        from study import paperb_kernel_ref
    except ImportError as e:
        raise ValueError("the 'paperb' format is a research preset: run from the checkout with scripts/ on the path") from e
    return paperb_kernel_ref


def kernel_dir() -> Path:
    """Folder holding the CUDA sources (see the module docstring for the search order)."""
    return Path(__file__).resolve().parent


def header_dir() -> Path:
    return Path(kvpolar.__file__).resolve().parent / "csrc"


def _sources_digest() -> str:
    h = hashlib.sha256()
    for p in [*(kernel_dir() / f for f in KERNEL_FILES), header_dir() / "ggml-polar-format.h"]:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _cupy():
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError("kvpolar.gpu needs CuPy (pip install cupy-cuda12x or cupy-cuda13x)") from e
    return cupy


def build_source(name: str, defines: dict[str, int | float]) -> str:
    """The NVRTC source of a kernel file: a digest line (cupy's cache key), #defines, the file."""
    lines = [f"// kvpolar {name} sources {_sources_digest()}"]
    lines += [f"#define {k} {v}" for k, v in defines.items()]
    return "\n".join(lines) + "\n" + (kernel_dir() / name).read_text()


@functools.cache
def _module(name: str, defines: tuple[tuple[str, int | float], ...], exact: bool):
    """cupy.RawModule of one kernel file and variant (compiled once per process)."""
    cupy = _cupy()
    opts = ["--std=c++17", f"-I{kernel_dir()}", f"-I{header_dir()}"]
    if exact:  # the encoder: IEEE float32 as FORMAT.md requires
        opts += ["--fmad=false", "--prec-div=true", "--prec-sqrt=true", "--ftz=false"]
    src = build_source(name, dict(defines))
    log.debug("compiling %s %s", name, defines)
    return cupy.RawModule(code=src, options=tuple(opts))


def codec_module():
    return _module("polar_encode.cu", (), True)


# ----------------------------------------------------------------------------------------------
# torch interop


def _torch():
    import torch

    return torch


class _Launcher:
    """Launches cupy kernels on torch's current stream with raw pointers."""

    def __init__(self) -> None:
        self._streams: dict[int, object] = {}

    def stream(self):
        cupy = _cupy()
        ptr = _torch().cuda.current_stream().cuda_stream
        s = self._streams.get(ptr)
        if s is None:
            s = self._streams[ptr] = cupy.cuda.ExternalStream(ptr)
        return s

    def __call__(self, kern, grid, block, args, shared_mem: int = 0) -> None:
        with self.stream():
            kern(grid, block, args, shared_mem=shared_mem)


launch = _Launcher()


def _ptr(t) -> np.uint64:
    return np.uint64(t.data_ptr())


def _check_cuda(name: str, t) -> None:
    torch = _torch()
    if not isinstance(t, torch.Tensor) or not t.is_cuda:
        raise ValueError(
            f"{name} must be a CUDA torch.Tensor, got {type(t).__name__}"
            + (f" on {t.device}" if isinstance(t, torch.Tensor) else "")
        )


def type_size(fmt: str) -> int:
    if fmt == "paperb":
        return _paperb().TYPE_SIZE
    return get_format(fmt).type_size


def codebook(fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """(CX, CY) float32 of a cache format."""
    if fmt == "paperb":
        return _paperb().tables()
    t = tables(fmt)
    return t.cx, t.cy


@functools.cache
def _codebook_dev(fmt: str, device: str):
    torch = _torch()
    cx, cy = codebook(fmt)
    return torch.from_numpy(np.stack([cx, cy], 1).copy()).to(device)


@functools.cache
def _mma_table_dev(fmt: str, prec: int, device: str):
    """The codebook in the shared-memory layout of polar_attn_mma: entry of code k, copy l at byte
    k * 128 + l * size; prec 1: 16 copies of (hi half2, lo half2), prec 0: 32 copies of hi half2
    (hi = fp16(v), lo = fp16(v - hi), round to nearest even, as the kernel's f2h)."""
    torch = _torch()
    cx, cy = codebook(fmt)
    v = np.stack([cx, cy], 1).astype(np.float32)  # [NC, 2]
    hi = v.astype(np.float16)
    lo = (v - hi.astype(np.float32)).astype(np.float16)
    ent = np.concatenate([hi, lo], 1) if prec else hi  # [NC, 4] or [NC, 2] halves
    copies = 16 if prec else 32
    tab = np.repeat(ent[:, None, :], copies, 1).copy()  # [NC, copies, halves]
    assert tab.nbytes == v.shape[0] * 128
    return torch.from_numpy(tab.reshape(-1).view(np.int16).copy()).to(device)


_IN_DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def _in_suffix(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in _IN_DTYPES:
        raise ValueError(f"input dtype must be float32, float16 or bfloat16, got {name}")
    return _IN_DTYPES[name]


def _enc_fmt(fmt: str) -> str:
    if fmt not in ("polar", "polar3"):
        raise ValueError(f"the GPU encoder writes 'polar' or 'polar3', got {fmt!r}")
    return fmt


# ----------------------------------------------------------------------------------------------
# Encoder / decoder


def encode_into(x, cache, fmt: str = "polar", pos=0) -> None:
    """Encode x [B, H, T, D] (float32/16/bf16, last dim contiguous) into
    cache [B, H, T_max, D/64, type_size] uint8 (contiguous) at token positions pos + t.

    pos: an int, or an int32 CUDA tensor [B] (per-sequence positions, a ragged batch).
    """
    torch = _torch()
    fmt = _enc_fmt(fmt)
    _check_cuda("x", x)
    _check_cuda("cache", cache)
    if x.dim() != 4 or x.shape[-1] % QK:
        raise ValueError(f"x must be [B, H, T, D] with D a multiple of {QK}, got {tuple(x.shape)}")
    B, H, T, D = x.shape
    ts = type_size(fmt)
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
    kern = codec_module().get_function(f"polar_encode_{fmt}_{_in_suffix(x.dtype)}")
    warps = 8
    grid = min((n + warps - 1) // warps, 65535 * 4)
    ob, oh, ot = (cache.stride(0), cache.stride(1), cache.stride(2))
    args = (
        _ptr(x),
        _ptr(cache),
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
    launch(kern, (grid,), (32 * warps,), args)


def encode(x, fmt: str = "polar"):
    """(..., k*64) float32/float16/bfloat16 CUDA tensor -> (..., k, type_size) uint8 blocks."""
    torch = _torch()
    _check_cuda("x", x)
    if x.dim() == 0 or x.shape[-1] % QK:
        raise ValueError(f"the last dimension must be a multiple of {QK}, got shape {tuple(x.shape)}")
    _in_suffix(x.dtype)
    lead = x.shape[:-1]
    D = x.shape[-1]
    x2 = x.reshape(1, 1, -1, D)
    out = torch.empty(
        (1, 1, x2.shape[2], D // QK, type_size(_enc_fmt(fmt))), dtype=torch.uint8, device=x.device
    )
    encode_into(x2, out, fmt, 0)
    return out.reshape(*lead, D // QK, out.shape[-1])


def decode(blocks, fmt: str = "polar", dtype=None):
    """(..., type_size) uint8 CUDA tensor -> (..., 64) float32 (or float16) values."""
    torch = _torch()
    _check_cuda("blocks", blocks)
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"decode writes float32 or float16, got {dtype}")
    fmt = _enc_fmt(fmt)
    ts = type_size(fmt)
    if blocks.dtype != torch.uint8 or blocks.dim() == 0 or blocks.shape[-1] != ts:
        raise ValueError(
            f"blocks must be uint8 (..., {ts}) for {fmt}, got {blocks.dtype} {tuple(blocks.shape)}"
        )
    b = blocks.contiguous()
    n = b.numel() // ts
    out = torch.empty((*blocks.shape[:-1], QK), dtype=dtype, device=blocks.device)
    if n:
        kern = codec_module().get_function(f"polar_decode_{fmt}_{'f32' if dtype == torch.float32 else 'f16'}")
        npairs = n * (QK // 2)
        grid = min((npairs + 255) // 256, 65535 * 8)
        launch(kern, (grid,), (256,), (_ptr(b), _ptr(out), np.int64(npairs)))
    return out


def dequantize_cache(cache, fmt: str, dtype=None, length: int | None = None):
    """cache [B, H, T_max, D/64, ts] -> [B, H, length, D] float32/float16 values."""
    length = cache.shape[2] if length is None else length
    c = cache[:, :, :length]
    y = decode(c, fmt, dtype)
    return y.reshape(*c.shape[:3], -1)


# ----------------------------------------------------------------------------------------------
# Attention


@dataclasses.dataclass(frozen=True)
class AttnConfig:
    """Compile-time shape of the attention kernel (see polar_attention.cu).

    impl "mma": tensor-core kernel (polar_attn_mma; gather mode only): each warp streams warp
    tiles of `wtile` keys through its own cp.async ring of `stages` stages; `tpt`/`repl` unused.
    impl "simt": the float32 FMA kernel (polar_attn_partial; every kmode).
    prec (mma only): "fp32" = fp16 hi + lo splits of the codebook, q and P*d (3 products, float32
    accumulation: float32-level error, 1.9e-6 of max|out| in the tests); "fp16" = one fp16 product
    (up to 1.4e-3 of max|out| on float32 q in the tests, 4.1e-4 on float16 q where the output
    rounding dominates; docs/results-gpu.md); "auto" = "fp32" for float32 q, "fp16" for
    float16/bfloat16 q."""

    kmode: str = "gather"  # "gather" (a), "lut" (b), "anglelut" (paper B keys only)
    nwarps: int = 4
    tpt: int = 1  # simt: keys per thread in the K phase; a tile holds 32 * nwarps * tpt keys
    stages: int = 3  # cp.async pipeline depth
    repl: int = 16  # simt: codebook copies in shared memory (bank-conflict-free gathers)
    impl: str = "mma"  # "mma" | "simt"
    wtile: int = 32  # mma: keys per warp tile (multiple of 16)
    prec: str = "auto"  # mma: "auto" | "fp32" | "fp16"

    @property
    def tile(self) -> int:
        if self.impl == "mma":
            return self.wtile * self.nwarps
        return 32 * self.nwarps * self.tpt


IMPLS = ("mma", "simt")
PRECS = ("auto", "fp32", "fp16")
SIMT_CONFIG = AttnConfig(nwarps=4, tpt=2, stages=2, repl=16, impl="simt")  # quantized V
SIMT_CONFIG_F16V = AttnConfig(nwarps=4, tpt=1, stages=2, repl=8, impl="simt")  # float16 V: 3 CTAs/SM
# Picked by `scripts/bench_gpu.py tune` on an H100 at B=16, T=32768, 32/8 heads, D=128
# (docs/results-gpu.md): 445 us vs 580 us for the first shape (4 warps, 1 key/thread, 3 stages).
DEFAULT_CONFIG = AttnConfig(impl="mma", nwarps=8, wtile=32, stages=2)  # quantized and float16 V
SMALL_MMA_CONFIG = AttnConfig(
    impl="mma", nwarps=4, wtile=16, stages=2
)  # where the default's smem does not fit


def default_config(vfmt: str, kmode: str = "gather") -> AttnConfig:
    if kmode != "gather":  # the LUT modes exist in the simt kernel only
        base = SIMT_CONFIG_F16V if vfmt == "f16" else SIMT_CONFIG
        return dataclasses.replace(base, kmode=kmode)
    return DEFAULT_CONFIG


def _a16(x: int) -> int:
    return (x + 15) // 16 * 16


def _prec_id(cfg: AttnConfig, qt: int) -> int:
    if cfg.prec == "auto":
        return int(qt == 0)
    return int(cfg.prec == "fp32")


def attn_defines(D: int, kfmt: str, vfmt: str, rb: int, qt: int, cfg: AttnConfig) -> dict[str, int]:
    kts = type_size(kfmt)
    vts = type_size(vfmt) if vfmt != "f16" else 0
    knc = 256 if kfmt in ("polar", "paperb") else get_format(kfmt).ncodes
    vnc = 0 if vfmt == "f16" else (256 if vfmt in ("polar", "paperb") else get_format(vfmt).ncodes)
    kmode = KMODES[cfg.kmode]
    return {
        "HD": D,
        "KFMT": FMT_ID[kfmt],
        "VFMT": FMT_ID[vfmt],
        "KTS": kts,
        "VTS": vts,
        "KNC": knc,
        "VNC": vnc,
        "KMODE": kmode,
        "RB": rb,
        "NWARPS": cfg.nwarps,
        "TPT": cfg.tpt,
        "STAGES": cfg.stages,
        "REPL": cfg.repl,
        "SHARE_TAB": int(kfmt == vfmt and kmode == 0),
        "QT": qt,
        "IMPL": IMPLS.index(cfg.impl) ^ 1,  # 1 = mma, 0 = simt
        "PREC": _prec_id(cfg, qt) if cfg.impl == "mma" else 0,
        "TW": cfg.wtile,
    }


def attn_smem_bytes(d: dict[str, int]) -> int:
    """Dynamic shared memory of a variant; mirrors the SMEM_TOTAL macros of polar_attention.cu."""
    HD, RB, nthreads = d["HD"], d["RB"], d["NWARPS"] * 32
    nb = HD // 64
    if d.get("IMPL") == 1:  # polar_attn_mma: the MSMEM_TOTAL macros
        rbp = 4 if RB <= 4 else 8
        vquant = d["VFMT"] != 3
        krow = nb * d["KTS"]
        vrow = nb * d["VTS"] if vquant else HD * 2
        vrows = vrow if vquant else vrow + 32
        ktab = d["KNC"] * 128
        vtab = d["VNC"] * 128 if (vquant and not d["SHARE_TAB"]) else 0
        wst = _a16(d["TW"] * krow) + _a16(d["TW"] * vrows)
        stage = d["NWARPS"] * d["STAGES"] * wst
        red = d["NWARPS"] * rbp * HD * 4
        return (
            _a16(ktab)
            + _a16(vtab)
            + _a16(max(stage, red))
            + _a16(d["NWARPS"] * d["TW"] * rbp * 4)
            + _a16(d["NWARPS"] * rbp * 8)
        )
    tt = nthreads * d["TPT"]
    vquant = d["VFMT"] != 3
    krow = nb * d["KTS"]
    vrow = nb * d["VTS"] if vquant else HD * 2
    nbv = nb if vquant else 1
    if d["KMODE"] == 0:
        ktab = d["KNC"] * d["REPL"] * 8
    elif d["KMODE"] == 1:
        ktab = (HD // 2) * d["KNC"] * RB * 4
    else:
        ktab = (HD // 2) * 16 * RB * 4
    vtab = d["VNC"] * d["REPL"] * 8 if (vquant and not d["SHARE_TAB"]) else 0
    qs = _a16((HD // 2) * RB * 8)
    stage = d["STAGES"] * (_a16(tt * krow) + _a16(tt * vrow))
    red = nthreads * 8 * RB * 4
    ws = _a16(tt * nbv * RB * 4)
    maxred = _a16(d["NWARPS"] * RB * 4 * 2)
    return _a16(ktab) + _a16(vtab) + qs + _a16(max(stage, red)) + ws + maxred


@functools.cache
@functools.cache
def _select_variant(D: int, kfmt: str, vfmt: str, rb: int, qt: int, cfg: AttnConfig, fallback: bool):
    """(config, defines, shared-memory bytes) of a call shape, computed once per shape. With
    `fallback` (no explicit config), an mma variant whose shared memory does not fit (e.g. D=256
    with float16 V) falls back to SMALL_MMA_CONFIG, then to the simt kernel."""
    d = attn_defines(D, kfmt, vfmt, rb, qt, cfg)
    smem = attn_smem_bytes(d)
    if smem > SMEM_LIMIT and cfg.impl == "mma" and fallback:
        for fb in (SMALL_MMA_CONFIG, SIMT_CONFIG_F16V if vfmt == "f16" else SIMT_CONFIG):
            cfg = fb
            d = attn_defines(D, kfmt, vfmt, rb, qt, cfg)
            smem = attn_smem_bytes(d)
            if smem <= SMEM_LIMIT:
                break
    return cfg, d, smem


def _attn_kernels(defines: tuple[tuple[str, int], ...], smem: int):
    mod = _module("polar_attention.cu", defines, False)
    part = mod.get_function("polar_attn_mma" if dict(defines).get("IMPL") == 1 else "polar_attn_partial")
    part.max_dynamic_shared_size_bytes = smem
    return part, mod.get_function("polar_attn_combine")


@functools.cache
def _sm_count(device_index: int) -> int:
    return _torch().cuda.get_device_properties(device_index).multi_processor_count


def choose_splits(n_ctas: int, max_len: int, tile: int, smem: int, sm_count: int, waves: int = 8) -> int:
    """Splits of the key range so that the grid covers the GPU in about `waves` waves (simt kernel)."""
    per_sm = max(1, min(SMEM_LIMIT // (smem + 1024), 16))
    slots = per_sm * sm_count
    max_splits = max(1, -(-max_len // (4 * tile)))  # at least 4 tiles a CTA (its table setup costs ~1)
    want = max(1, round(waves * slots / max(n_ctas, 1)))
    return int(min(want, max_splits))


@functools.cache
def choose_splits_mma(
    n_ctas: int, max_len: int, tile: int, per_sm: int, sm_count: int, overhead: float = 2.5
) -> int:
    """Splits for polar_attn_mma: minimize waves(s) * (tiles / s + overhead), waves(s) =
    ceil(n_ctas * s / slots). `overhead` = a CTA's fixed cost (table copy, first-stage latency, warp
    merge) in CTA tiles: fitted on an H100 (B=16, 32/8 heads, D=128, 8 warps x 32 keys; 2/4/8/16
    splits: 256/264/283/319 us = waves x (work / s + ~9 us), ~2.3 tiles; docs/results-gpu.md)."""
    slots = max(1, per_sm * sm_count)
    ntiles = max(1, -(-max_len // tile))
    best, best_t = 1, None
    for s in range(1, ntiles + 1):
        t = -(-n_ctas * s // slots) * (ntiles / s + overhead)
        if best_t is None or t < best_t - 1e-9:
            best, best_t = s, t
    return best


def _per_sm(smem: int, nthreads: int, regs: int) -> int:
    per_sm = max(1, min(SMEM_LIMIT // (smem + 1024), 2048 // nthreads, 16))
    if regs:
        per_sm = max(1, min(per_sm, 65536 // (regs * nthreads)))
    return per_sm


def _qt(dtype) -> int:
    torch = _torch()
    if dtype == torch.float32:
        return 0
    if dtype == torch.float16:
        return 1
    if dtype == torch.bfloat16:
        return 2
    raise ValueError(f"q must be float32, float16 or bfloat16, got {dtype}")


def check_cache(name: str, c, B: int, H: int, D: int, fmt: str) -> None:
    torch = _torch()
    _check_cuda(name, c)
    if fmt == "f16":
        ok = c.dtype == torch.float16 and c.dim() == 4 and tuple(c.shape[:2]) == (B, H) and c.shape[3] == D
        want = f"float16 [{B}, {H}, T_max, {D}]"
    else:
        ok = (
            c.dtype == torch.uint8
            and c.dim() == 5
            and tuple(c.shape[:2]) == (B, H)
            and tuple(c.shape[3:]) == (D // QK, type_size(fmt))
        )
        want = f"uint8 [{B}, {H}, T_max, {D // QK}, {type_size(fmt)}]"
    if not ok:
        raise ValueError(f"{name} ({fmt}) must be {want}, got {c.dtype} {tuple(c.shape)}")
    if not c.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if c.shape[2] % 8:
        raise ValueError(f"{name}: T_max must be a multiple of 8 (16-byte aligned rows), got {c.shape[2]}")


def attention(
    q,
    k_cache,
    v_cache,
    lens,
    kfmt: str = "polar",
    vfmt: str = "polar",
    scale: float | None = None,
    config: AttnConfig | None = None,
    splits: int | None = None,
    out=None,
    max_len: int | None = None,
):
    """Decode attention of q [B, Hq, Tq, D] over a compressed cache.

    k_cache: uint8 [B, Hkv, T_max, D/64, type_size(kfmt)], kfmt in polar/polar3/paperb.
    v_cache: the same for vfmt, or float16 [B, Hkv, T_max, D] for vfmt == "f16".
    lens:    int32 CUDA tensor [B]; keys 0..lens[b]-1 are valid and query row tq sits at
             position lens[b] - Tq + tq (causal inside the last Tq keys).
    Hq must be a multiple of Hkv (GQA); D in 64, 128, 256; T_max a multiple of 8.
    Returns [B, Hq, Tq, D] in q's dtype (or writes `out`). softmax scale defaults to D**-0.5.
    max_len: an upper bound of lens (avoids a device-to-host copy); defaults to T_max.
    """
    torch = _torch()
    cfg = config or default_config(vfmt)
    _check_cuda("q", q)
    if q.dim() != 4:
        raise ValueError(f"q must be [B, Hq, Tq, D], got {tuple(q.shape)}")
    B, Hq, Tq, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim must be one of {HEAD_DIMS}, got {D}")
    if kfmt not in CACHE_FORMATS:
        raise ValueError(f"kfmt must be one of {CACHE_FORMATS}, got {kfmt!r}")
    if vfmt not in V_FORMATS:
        raise ValueError(f"vfmt must be one of {V_FORMATS}, got {vfmt!r}")
    if cfg.kmode not in KMODES:
        raise ValueError(f"kmode must be one of {tuple(KMODES)}, got {cfg.kmode!r}")
    if cfg.kmode == "anglelut" and kfmt != "paperb":
        raise ValueError("kmode 'anglelut' reads paper-B keys only")
    if cfg.impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {cfg.impl!r}")
    if cfg.prec not in PRECS:
        raise ValueError(f"prec must be one of {PRECS}, got {cfg.prec!r}")
    if cfg.impl == "mma" and cfg.kmode != "gather":  # the LUT modes are simt-only
        cfg = dataclasses.replace(cfg, impl="simt")
    if cfg.impl == "mma" and (cfg.wtile % 16 or cfg.wtile <= 0 or cfg.stages < 2):
        raise ValueError(f"mma: wtile must be a positive multiple of 16 and stages >= 2, got {cfg}")
    Hkv = k_cache.shape[1] if k_cache.dim() >= 2 else -1
    if Hkv <= 0 or Hq % Hkv:
        raise ValueError(f"Hq ({Hq}) must be a multiple of the cache's KV heads ({Hkv})")
    check_cache("k_cache", k_cache, B, Hkv, D, kfmt)
    check_cache("v_cache", v_cache, B, Hkv, D, vfmt)
    if k_cache.shape[2] != v_cache.shape[2]:
        raise ValueError(f"k_cache and v_cache hold {k_cache.shape[2]} and {v_cache.shape[2]} tokens")
    _check_cuda("lens", lens)
    if lens.dtype != torch.int32 or tuple(lens.shape) != (B,):
        raise ValueError(f"lens must be an int32 tensor [{B}], got {lens.dtype} {tuple(lens.shape)}")
    T_max = k_cache.shape[2]
    G = Hq // Hkv
    R = G * Tq
    rb = min(R, 8)
    if q.stride(3) != 1:
        raise ValueError("q's last dimension must be contiguous")
    cfg, d, smem = _select_variant(D, kfmt, vfmt, rb, _qt(q.dtype), cfg, config is None)
    if smem > SMEM_LIMIT:
        raise ValueError(
            f"kernel variant {d} needs {smem} bytes of shared memory (> {SMEM_LIMIT}); "
            "use kmode='gather' or fewer rows / a smaller tile"
        )
    part, comb = _attn_kernels(tuple(d.items()), smem)
    n_groups = -(-R // rb)
    ml = T_max if max_len is None else min(max_len, T_max)
    dev = q.device.index if q.device.index is not None else torch.cuda.current_device()
    if splits is None:
        if cfg.impl == "mma":
            try:
                regs = int(getattr(part, "num_regs", 0) or 0)
            except Exception:  # pragma: no cover - depends on the cupy version
                regs = 0
            per_sm = _per_sm(smem, cfg.nwarps * 32, regs)
            splits = choose_splits_mma(B * Hkv * n_groups, ml, cfg.tile, per_sm, _sm_count(dev))
        else:
            splits = choose_splits(B * Hkv * n_groups, ml, cfg.tile, smem, _sm_count(dev))
    chunk = -(-max(ml, 1) // splits)
    chunk = -(-chunk // cfg.tile) * cfg.tile
    splits = max(1, -(-max(ml, 1) // chunk))
    o_part = torch.empty((B * Hkv * R * splits * D,), dtype=torch.float32, device=q.device)
    m_part = torch.empty((B * Hkv * R * splits,), dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    scale = D**-0.5 if scale is None else float(scale)
    if d["IMPL"] == 1:
        ktab = _mma_table_dev(kfmt, d["PREC"], str(q.device))
        vtab = _mma_table_dev(vfmt, d["PREC"], str(q.device)) if vfmt != "f16" else ktab
    else:
        ktab = _codebook_dev(kfmt, str(q.device))
        vtab = _codebook_dev(vfmt, str(q.device)) if vfmt != "f16" else ktab
    args = (
        _ptr(q),
        np.int64(q.stride(0)),
        np.int64(q.stride(1)),
        np.int64(q.stride(2)),
        _ptr(k_cache),
        _ptr(v_cache),
        _ptr(ktab),
        _ptr(vtab),
        _ptr(lens),
        np.int32(Hkv),
        np.int32(G),
        np.int32(Tq),
        np.int32(T_max),
        np.int32(chunk),
        np.float32(scale * math.log2(math.e)),
        _ptr(o_part),
        _ptr(m_part),
        _ptr(l_part),
    )
    launch(part, (splits, n_groups, B * Hkv), (cfg.nwarps * 32,), args, shared_mem=smem)
    if out is None:
        out = torch.empty((B, Hq, Tq, D), dtype=q.dtype, device=q.device)
    elif tuple(out.shape) != (B, Hq, Tq, D) or out.stride(3) != 1:
        raise ValueError(
            f"out must be [{B}, {Hq}, {Tq}, {D}] with a contiguous last dim, got {tuple(out.shape)}"
        )
    cargs = (
        _ptr(o_part),
        _ptr(m_part),
        _ptr(l_part),
        _ptr(out),
        np.int64(out.stride(0)),
        np.int64(out.stride(1)),
        np.int64(out.stride(2)),
        np.int32(Hq),
        np.int32(Hkv),
        np.int32(Tq),
        np.int32(splits),
        np.int32(_qt(out.dtype)),
    )
    launch(comb, (B * Hq * Tq,), (D,), cargs)
    return out


# ----------------------------------------------------------------------------------------------
# References (torch, float32) used by the tests and benchmarks


def dequantize_any(cache, fmt: str, length: int | None = None):
    """[B, H, T_max, D/64, ts] blocks (any cache format) or float16 [B, H, T_max, D] ->
    float32 [B, H, length, D], decoded on the CPU by the numpy references (kvpolar.codec,
    kvpolar.paperb_kernel_ref): independent of the kernels' tables, so a wrong table shows."""
    torch = _torch()
    length = cache.shape[2] if length is None else length
    if fmt == "f16":
        return cache[:, :, :length].float()
    c = cache[:, :, :length]
    raw = c.reshape(-1, type_size(fmt)).cpu().numpy()
    y = _paperb().dequantize_blocks(raw) if fmt == "paperb" else codec.dequantize_blocks(raw, fmt)
    return torch.from_numpy(y).to(cache.device).reshape(*c.shape[:3], -1)


def attention_reference(q, k, v, lens, scale: float | None = None):
    """float32 reference: q [B, Hq, Tq, D], k/v float [B, Hkv, T, D], lens [B] (causal tail)."""
    torch = _torch()
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros((B, Hq, Tq, D), dtype=torch.float32, device=q.device)
    for b in range(B):
        n = int(lens[b])
        if n == 0:
            continue
        kb = k[b, :, :n].float().repeat_interleave(Hq // Hkv, 0)
        vb = v[b, :, :n].float().repeat_interleave(Hq // Hkv, 0)
        s = torch.einsum("htd,hkd->htk", q[b].float(), kb) * scale
        pos = n - Tq + torch.arange(Tq, device=q.device)
        mask = torch.arange(n, device=q.device)[None, :] > pos[:, None]
        s = s.masked_fill(mask[None], float("-inf"))
        out[b] = torch.einsum("htk,hkd->htd", torch.softmax(s, -1), vb)
    return out
