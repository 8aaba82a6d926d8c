"""Split-K decode attention over a compressed KV cache: a cached `plan` and its `run`.

    p = plan(B, Hq, Hkv, Tq, D, max_len, kfmt, vfmt, q_dtype)   # once per shape (cached)
    out = run(p, q, k_cache, v_cache, lens)                     # every step
    out = attention(q, k_cache, v_cache, lens, kfmt, vfmt)      # both

`plan` picks the kernel variant (polar_attn_mma on tensor cores, or the float32 polar_attn_simt
for the LUT modes and where the mma variant's shared memory does not fit), its #defines and
shared-memory bytes, and the number of key splits for the GPU; it compiles the variant and
returns a `Plan` (a small frozen dataclass). `run` checks the tensors against the plan, launches
the partial kernel on the grid (splits, row groups, B * Hkv) and polar_attn_combine to merge the
splits (with one split the mma kernel writes the output itself: no partials, no combine). The kernels
and their contract: polar_attn_common.cuh.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from kvpolar.format import QK

from . import codec, formats, loader

HEAD_DIMS = (64, 128, 256)
V_F16 = "f16"  # vfmt of a float16 V cache [B, Hkv, T_max, D]
F16_KERNEL_ID = 3  # its VFMT (F16_KERNEL_ID of polar_attn_common.cuh)
KMODES = {"gather": 0, "lut": 1, "anglelut": 2}
IMPLS = ("mma", "simt")
PRECS = ("auto", "fp32", "fp16")
LEAN_LEVELS = (0, 1, 2)
SMLEAN_LEVELS = (0, 1, 2)
KERNELS = {"mma": "polar_attn_mma", "simt": "polar_attn_simt"}  # kernel = file name without .cu
SMEM_LIMIT = 227 * 1024  # per-block opt-in maximum on sm_90


@dataclasses.dataclass(frozen=True)
class AttnConfig:
    """Compile-time shape of the attention kernel.

    impl "mma": tensor-core kernel (polar_attn_mma.cu; gather mode only): each warp streams warp
    tiles of `wtile` keys through its own cp.async ring of `stages` stages; `tpt`/`repl` unused.
    impl "simt": the float32 FMA kernel (polar_attn_simt.cu; every kmode).
    prec (mma only): "fp32" = fp16 hi + lo splits of the codebook, q and P*d (3 products, float32
    accumulation: float32-level error, 1.9e-6 of max|out| in the tests); "fp16" = one fp16 product
    (up to 1.4e-3 of max|out| on float32 q in the tests, 4.1e-4 on float16 q where the output
    rounding dominates; docs/results-gpu.md); "auto" = "fp32" for float32 q, "fp16" for
    float16/bfloat16 q.

    Tuning options of the mma kernel (defaults: the kernel as it was; `scripts/bench_gpu.py tune-mma`
    measures them; polar_attn_mma.cu's header says what each does in the code):
    swizzle: conflict-free shared-memory reads of the staged K and quantized V code words (row
    order of the K phase, key order of the V phase and P's slots permuted; D >= 128). Without it
    the 68-byte key rows cost ~29% extra shared-load wavefronts at D=128 (4-way conflicts on the
    K code words, 2-way on V's; Nsight Compute on the H200).
    lean: 1 = full warp tiles staged with plain cp.async (no per-chunk zero-fill bookkeeping, ~20% of
    the issued instructions); 2 = also one dp4a per codebook address (code x 128 + lane offset)
    instead of a byte extract + multiply-add.
    kvsplit: K and V in separate cp.async rings of `stages` slots each (same bytes), K of tile i +
    stages issued after K phase i, V after V phase i; allows stages=1: half the stage memory (8 warps
    x 32 keys: 70 KiB a CTA, 3 CTAs/SM instead of 2).
    pdw: the softmax writes P x d_j (the V block scales of its key) rounded to fp16 once, where it
    wrote the float P, so that the V phase builds each B fragment register with one byte permute of
    a loaded word instead of, per 8 keys and V block, 2 scale loads + conversions + multiplies +
    fp16 conversions + shifts (the same fp16 values: the same results). The P area grows by
    WN = ceil(V blocks / 2) (x 2 for prec "fp32") words per entry, i.e. not at D <= 128 with
    prec "fp16"; with kvsplit and quantized V the V wait moves before the softmax.
    smlean: softmax cuts (same results): 1 = with fp16 operands and <= 4 rows the K phase's unused
    B columns repeat q (no shuffle adding hi and lo score halves), and P = exp2(s - m) with m = 0 for
    an empty row instead of a -inf test per score; 2 = also no rescaling of the accumulators when no
    row's running max grew in the tile (a warp-uniform branch).
    ptrs: staging from running per-lane pointers (advanced by a tile stride per tile) with constant
    chunk offsets, instead of each tile's key, bounds and addresses recomputed from its index (full
    tiles as lean 1 stages them, whatever lean is).
    vunroll: the V phase's loop over the 8-key steps of a warp tile fully unrolled (was by 2): the
    staged-row and P addresses become per-lane bases plus constants (no address arithmetic per key
    step).
    qstage: the CTA's q rows copied into shared memory with 16-byte cp.async before the tables and the
    first stages, and the q max and fragments read from there (instead of dependent rounds of 2-byte
    global loads queued behind the CTA's copies: ~11 us of the ~12 us prologue at B=16 on the H200,
    `bench_gpu.py anatomy`); the same q values, so the same results. On in the three default configs
    since session 19 (H200, B=16, 32768 keys: polar K+V 181.6 -> 176.0 us, fp16 V 327.5 -> 319.0,
    polar3 256.0 -> 247.5; docs/results-gpu.md). Its RB x HD x 2 or 4 bytes of q rows change no
    shape's fallback (head sizes 64-256, 1-8 rows: tests/test_gpu_attention.py).
    ctas: the CTAs a SM the kernel asks ptxas to fit (`__launch_bounds__(threads, ctas)`, which caps its
    registers at 65536 / (ctas x threads)); 0 = the kernel's own rule (3 or more where kvsplit's shared memory
    allows 3 CTAs a SM, else no minimum); 1 = no minimum.
    maxrreg: the register budget of the compile (NVRTC --maxrregcount, loader.define_options); 0 = the
    compiler's own. Session 43: on NVRTC 13.0 (the GPU machine's) the polar K+V default takes 164 registers
    and 1725 loop instructions a 64-key tile by itself, 183 and 1548 with 255 (scripts/sass_order.py --nvrtc);
    session 44, on the H200: 12-24 % slower on polar K+V all the same, so no default takes it.
    pshfl: the P d words (pdw) reach the V phase by warp shuffles, not through the warp's P slots in shared
    memory: 16 shuffles a 64-key tile instead of 8 64-bit stores and 16 loads (polar_attn_mma.cu's header);
    taken where pdw, swizzle, vunroll and a quantized V meet at 4 padded rows and 32-key blocks (else the
    kernel as without it). The same words into the same products: the same results. Session 45: 32 fewer
    shared-memory wavefronts and 65 fewer instructions a tile (NVRTC 13.0.88); on an H100 a lone CTA's loop
    3.6-3.9 % faster, the memory-bound full load unchanged, so LOOP_BOUND_CONFIG takes it
    (docs/results-gpu.md).
    cta_times: instrumentation, not a tuning option: each CTA's thread 0 writes %globaltimer at six
    points (CTA_MARKS) and its SM into a device array that `cta_times(plan)` returns (`scripts/bench_gpu.py
    anatomy`); the results are the same."""

    kmode: str = "gather"  # "gather" (a), "lut" (b), "anglelut" (angle-LUT formats, paper B)
    nwarps: int = 4
    tpt: int = 1  # simt: keys per thread in the K phase; a tile holds 32 * nwarps * tpt keys
    stages: int = 3  # cp.async pipeline depth
    repl: int = 16  # simt: codebook copies in shared memory (bank-conflict-free gathers)
    impl: str = "mma"  # "mma" | "simt"
    wtile: int = 32  # mma: keys per warp tile (multiple of 16)
    prec: str = "auto"  # mma: "auto" | "fp32" | "fp16"
    swizzle: bool = False  # mma: conflict-free staged-row reads (SWZ)
    lean: int = 0  # mma: 0 | 1 (plain cp.async for full tiles) | 2 (+ dp4a codebook addresses) (LEAN)
    kvsplit: bool = False  # mma: separate K and V rings, stages >= 1 (KVSPLIT)
    pdw: bool = False  # mma: fp16 P x d written by the softmax, V B fragments by byte permutes (PDW)
    smlean: int = 0  # mma: 0 | 1 (repeated q columns, exp2 without -inf tests) | 2 (+ rescale skip) (SMLEAN)
    ptrs: bool = False  # mma: staging from running per-lane pointers (PTRS)
    vunroll: bool = False  # mma: V phase key steps fully unrolled (VUNROLL)
    qstage: bool = False  # mma: q rows copied into shared memory first (QSTAGE; on in the defaults)
    pshfl: bool = False  # mma: P d by warp shuffles, not shared memory (PSHFL)
    cta_times: bool = False  # mma: instrumentation, per-CTA %globaltimer stamps (CTA_TIMES; cta_times())
    ctas: int = 0  # mma: CTAs a SM asked of ptxas (MMA_CTAS): 0 = the kernel's rule
    maxrreg: int = 0  # mma: --maxrregcount of the compile (MAXRREG): 0 = the compiler's own budget

    @property
    def tile(self) -> int:
        if self.impl == "mma":
            return self.wtile * self.nwarps
        return 32 * self.nwarps * self.tpt


SIMT_CONFIG = AttnConfig(nwarps=4, tpt=2, stages=2, repl=16, impl="simt")  # quantized V
SIMT_CONFIG_F16V = AttnConfig(nwarps=4, tpt=1, stages=2, repl=8, impl="simt")  # float16 V: 3 CTAs/SM
# Picked by `scripts/bench_gpu.py tune` on an H100 at B=16, T=32768, 32/8 heads, D=128
# (docs/results-gpu.md): 445 us vs 580 us for the first shape (4 warps, 1 key/thread, 3 stages).
DEFAULT_CONFIG = AttnConfig(  # quantized V
    impl="mma",
    nwarps=8,
    wtile=64,
    stages=1,
    swizzle=True,
    lean=2,
    kvsplit=True,
    pdw=True,
    smlean=1,
    vunroll=True,
    ptrs=True,
    qstage=True,
)
# `bench_gpu.py tune-mma` on the H200 (B=16, 32/8 heads, D=128): session 6 (tune-mma-h200-session6.json)
# polar K+V 263.5 -> 203.6 us at 32768 keys (swizzle + lean 2), 1003.9 -> 751.3 us at 131072;
# session 7 (tune-mma-h200-session7.json): 204.0 -> 181.0 us at 32768 and 785.5 -> 639.6 us at 131072
# (85 % of the copy rate) with 64-key tiles in split rings, pdw, smlean 1, vunroll, ptrs;
# polar K + fp16 V 336.3 -> 326.9 us at 32768 with separate K/V rings of one stage (equal at 131072;
# the session-7 options do not change it: 327.0 us)
F16V_CONFIG = AttnConfig(impl="mma", nwarps=8, wtile=32, stages=1, kvsplit=True, qstage=True)  # float16 V
# polar3 V: session 6's shape (8 warps x 32 keys x 2 stages) with the session-7 instruction cuts (pdw,
# smlean 1, vunroll, ptrs), since session 31. The session-7 default itself (tuned on polar V) took polar3
# K+V from 253.2 to 302.0 us (H200, B=16, 32768 keys): its kvsplit shared memory makes the kernel ask ptxas
# for 3 CTAs a SM, so 80 registers and spills. Without kvsplit ptxas takes 128 registers (2 CTAs
# a SM). `bench_gpu.py tune-mma --fmts polar3/polar3 polar/polar3 --phases ctas new` (H100, session 31,
# docs/results-gpu.md): polar3 K+V 245.1 -> 208.5 us at 32768 keys and 930.6 -> 766.5 at 131072; polar K +
# polar3 V 217.5 -> 201.9 and 826.4 -> 743.8
# = polar's default with 32-key warp tiles in one ring of 2 stages (no kvsplit)
POLAR3V_CONFIG = dataclasses.replace(DEFAULT_CONFIG, wtile=32, stages=2, kvsplit=False)
# polar3 V at head size 64 (SmolLM2's): polar's default with 2 CTAs a SM asked of ptxas (MMA_CTAS=2, 128
# registers). `bench_gpu.py tune-mma --graph --fmts polar/polar polar3/polar3 polar/polar3 --phases ctas
# --tune-shape {1,16} 32768 9 3 64` (H100, session 33, each call replayed from a CUDA graph, two runs;
# docs/gpu/h100-llama/session33/cupy): against POLAR3V_CONFIG (64 registers there), polar3 K+V 1.35x at
# B=1 and 32768 keys, 1.36x at 131072, 1.10x at B=16 and 32768, 1.12x at 131072; polar K + polar3 V 1.35x
# at B=1, 1.04-1.06x and 1.12x at B=16. At head sizes 128 and 256 POLAR3V_CONFIG stays: the fastest at B=16,
# D=128 and at B=1, D=256; at B=1, D=128 polar's default with ctas=1 measured 1.09x at 32768 keys, equal at
# 131072 (taken for calls with few work items since session 34: FEW_UNITS_CONFIG below). polar V keeps
# DEFAULT_CONFIG at 64: ctas=2 there gained 1.19x at B=1 and 131072 keys but lost 1.6 % at B=16.
POLAR3V_D64_CONFIG = dataclasses.replace(DEFAULT_CONFIG, ctas=2)
# Calls with few (sequence, KV head, row group) work items (`work_units`: B x Hkv in a decode step):
# polar's default with 1 CTA a SM asked of ptxas (MMA_CTAS=1, no 128-register cap), for polar3 V at head
# sizes 64 and 128 up to POLAR3V_FEW_UNITS items, for polar V at head size 64 up to POLARV_D64_FEW_UNITS.
# `bench_gpu.py tune-mma --graph --phases ctas --fmts polar3/polar3 polar/polar3 polar/polar --tune-shape B
# 32768 Hq Hkv D` (H100, 132 SMs, session 34, each call replayed from a CUDA graph;
# docs/gpu/h100-llama/session34/tune-ctas), against the defaults above, at 32768 / 131072 keys:
# polar3 V, D=128: 2 items 1.36-1.42x / 1.23-1.25x, 4 items 1.20-1.26x / 1.07-1.10x, 8 items (B=4 x 2 heads,
# B=1 x 8 heads) 1.07-1.13x / 1.00-1.05x; 16 items 1.00-1.06x / 0.98-1.03x (not taken); D=64: 3 items
# 1.20-1.25x / 1.12-1.15x, 6 items 1.11-1.13x / 0.97-1.01x, 12 items 1.03-1.04x / 0.94-0.96x (not taken),
# 48 items 0.84-0.89x. polar V, D=64: 3, 6 and 12 items 1.01-1.17x, 48 items 0.99-1.00x; at D=128 polar V
# measured 0.99-1.01x at every size (not taken). At D=256 polar's default with ctas=1 lost to polar3 V's
# default (session 33, B=1), so the rule stops at 128.
FEW_UNITS_CONFIG = dataclasses.replace(DEFAULT_CONFIG, ctas=1)
POLAR3V_FEW_UNITS = 8
POLARV_D64_FEW_UNITS = 12
# polar V at head size 128 on a GPU whose memory feeds each SM more than LOOP_BOUND_BYTES bytes a cycle
# (loader.memory_bytes_per_sm_cycle; an H200: ~18.8, an H100 SXM: 12.8): 12 warps in the one CTA a SM. On
# the H200 polar K+V's loop, not the memory, binds the default (session 44, `bench_gpu.py scaling`: a CTA's
# loop 1.04x faster alone than under the full batch-16 load, 1.26x on the H100), and 12 warps hide more of
# its latency (`tune-mma --phases depth`: 166.6 against 172.5 us at B=16 and 32768 keys, 678.8 against
# 790.1 at 131072); on the H100, where the memory binds, 12 warps lost (204.6 against 200.4 us, session
# 40). With pshfl (P d by shuffles, the same bits): on an H100 a lone CTA's loop (the H200's regime) 3.8-3.9 %
# faster than 12 warps without it, the memory-bound full load equal (session 45; not yet timed on an
# H200). docs/results-gpu.md.
LOOP_BOUND_BYTES = 15.0
LOOP_BOUND_CONFIG = dataclasses.replace(DEFAULT_CONFIG, nwarps=12, pshfl=True)
# where DEFAULT_CONFIG's shared memory does not fit (D=256 with float16 V)
SMALL_MMA_CONFIG = AttnConfig(impl="mma", nwarps=4, wtile=16, stages=2)


def work_units(B: int, Hq: int, Hkv: int, Tq: int) -> int:
    """The independent work items of a call, before key splits: (sequence, KV head, group of up to 8 query
    rows), as `plan` launches them."""
    return B * Hkv * -(-(Hq // Hkv * Tq) // 8)


def default_config(
    vfmt: str,
    kmode: str = "gather",
    D: int | None = None,
    units: int | None = None,
    loop_bound: bool = False,
) -> AttnConfig:
    """The kernel shape `plan` takes for V format `vfmt` (and K mode `kmode`) at head size D (None: the
    shape of head sizes above 64) for a call of `units` work items (`work_units`; None: many), on a GPU
    whose memory outruns the polar K+V loop (`loop_bound`, see `loop_bound_device`) or not."""
    if kmode != "gather":  # the LUT modes exist in the simt kernel only
        base = SIMT_CONFIG_F16V if vfmt == V_F16 else SIMT_CONFIG
        return dataclasses.replace(base, kmode=kmode)
    if vfmt == V_F16:
        return F16V_CONFIG
    few = units is not None and D is not None and D <= 128
    if vfmt == "polar3":
        if few and units <= POLAR3V_FEW_UNITS:
            return FEW_UNITS_CONFIG
        return POLAR3V_D64_CONFIG if D is not None and D <= 64 else POLAR3V_CONFIG
    if vfmt == "polar" and few and D <= 64 and units <= POLARV_D64_FEW_UNITS:
        return FEW_UNITS_CONFIG
    if vfmt == "polar" and loop_bound and D == 128:
        return LOOP_BOUND_CONFIG
    return DEFAULT_CONFIG


def loop_bound_device(device: int) -> bool:
    """Whether CUDA device `device` feeds each SM more than LOOP_BOUND_BYTES bytes a cycle (False where
    its attributes cannot be read)."""
    rate = loader.memory_bytes_per_sm_cycle(device)
    return rate is not None and rate > LOOP_BOUND_BYTES


def call_config(
    vfmt: str, B: int, Hq: int, Hkv: int, Tq: int, D: int, kmode: str = "gather", device: int = 0
) -> AttnConfig:
    """The kernel shape `plan` takes by default for a call of this shape (q [B, Hq, Tq, D], Hkv KV heads) on
    CUDA device `device`: `default_config` for its `work_units`."""
    return default_config(vfmt, kmode, D, work_units(B, Hq, Hkv, Tq), loop_bound_device(device))


CTA_TIMES_MAX = 8192  # CTAs that AttnConfig.cta_times stamps (polar_attn_mma.cu's CTA_TIMES)

# ----------------------------------------------------------------------------------------------
# Variants: #defines and shared memory


def _a16(x: int) -> int:
    return (x + 15) // 16 * 16


def _q_type(dtype) -> int:
    """QT / OT of the kernels: 0 float32, 1 float16, 2 bfloat16."""
    name = str(dtype).replace("torch.", "")
    qt = {"float32": 0, "float16": 1, "bfloat16": 2}.get(name)
    if qt is None:
        raise ValueError(f"q must be float32, float16 or bfloat16, got {dtype}")
    return qt


def _format(arg: str, name: str) -> formats.CacheFormat:
    try:
        return formats.get(name)
    except ValueError as e:
        raise ValueError(f"{arg}: {e}" + (f", or {V_F16!r} for float16 V" if arg == "vfmt" else "")) from None


def _prec_id(cfg: AttnConfig, qt: int) -> int:
    if cfg.prec == "auto":
        return int(qt == 0)
    return int(cfg.prec == "fp32")


def attn_defines(D: int, kfmt: str, vfmt: str, rb: int, qt: int, cfg: AttnConfig) -> dict[str, int]:
    """The #defines of the kernel variant (polar_attn_common.cuh and the kernel file of cfg.impl)."""
    kf = formats.get(kfmt)
    vf = None if vfmt == V_F16 else formats.get(vfmt)
    kmode = KMODES[cfg.kmode]
    d = {
        "HD": D,
        "KFMT": kf.kernel_id,
        "VFMT": F16_KERNEL_ID if vf is None else vf.kernel_id,
        "KTS": kf.type_size,
        "VTS": 0 if vf is None else vf.type_size,
        "KNC": kf.ncodes,
        "VNC": 0 if vf is None else vf.ncodes,
        "RB": rb,
        "NWARPS": cfg.nwarps,
        "QT": qt,
        "STAGES": cfg.stages,
        "SHARE_TAB": int(kf is vf and kmode == 0),
    }
    if cfg.impl == "mma":
        d.update(
            TW=cfg.wtile,
            PREC=_prec_id(cfg, qt),
            SWZ=int(cfg.swizzle),
            LEAN=cfg.lean,
            KVSPLIT=int(cfg.kvsplit),
            PDW=int(cfg.pdw),
            SMLEAN=cfg.smlean,
            PTRS=int(cfg.ptrs),
            VUNROLL=int(cfg.vunroll),
        )
        if cfg.qstage:  # (only then: the defines of a variant without it, and so its cache key, stay)
            d["QSTAGE"] = 1
        if cfg.cta_times:  # (only then: the defines of every other variant, and so its cache key, stay)
            d["CTA_TIMES"] = CTA_TIMES_MAX
        if cfg.ctas:  # (likewise)
            d["MMA_CTAS"] = cfg.ctas
        if cfg.maxrreg:  # (likewise; loader.define_options turns it into --maxrregcount)
            d["MAXRREG"] = cfg.maxrreg
        if cfg.pshfl and pshfl_applies(d):  # (likewise; elsewhere the kernel is the one without it)
            d["PSHFL"] = 1
    else:
        d.update(KMODE=kmode, TPT=cfg.tpt, REPL=cfg.repl)
    return d


def pshfl_applies(d: dict[str, int]) -> bool:
    """Whether the P d words can go by shuffles (the kernel's PSHFL, which static_asserts the same): PDW,
    the swizzled key orders on 4-byte aligned K rows (KSWZ), quantized V, at most 4 rows (RBP 4), the V
    phase unrolled and whole 32-key blocks in a warp tile."""
    krow = d["HD"] // QK * d["KTS"]
    return bool(
        d["PDW"]
        and d["SWZ"]
        and krow % 4 == 0
        and d["VFMT"] != F16_KERNEL_ID
        and d["RB"] <= 4
        and d["VUNROLL"]
        and d["TW"] % 32 == 0
    )


def smem_bytes(impl: str, d: dict[str, int]) -> int:
    """Dynamic shared memory of a variant: the MSMEM_TOTAL macros of polar_attn_mma.cu (impl
    "mma") or SMEM_TOTAL of polar_attn_simt.cu."""
    HD, RB, nthreads = d["HD"], d["RB"], d["NWARPS"] * 32
    nb = HD // QK
    vquant = d["VFMT"] != F16_KERNEL_ID
    krow = nb * d["KTS"]
    vrow = nb * d["VTS"] if vquant else HD * 2
    if impl == "mma":
        rbp = 4 if RB <= 4 else 8
        vrows = vrow if vquant else vrow + 32
        ktab = d["KNC"] * 128
        vtab = d["VNC"] * 128 if (vquant and not d["SHARE_TAB"]) else 0
        wst = _a16(d["TW"] * krow) + _a16(d["TW"] * vrows)  # WST = WKST + WVST
        # STAGES slots of (K, V) per warp, or with KVSPLIT a K ring and a V ring of STAGES slots
        # each: the same bytes (SWZ and LEAN do not change the layout)
        stage = d["NWARPS"] * d["STAGES"] * wst
        red = d["NWARPS"] * rbp * HD * 4
        # P [TW][RBP] floats a warp; PDW: WN u32 words per entry (fp16 P x d of each V block, hi then lo)
        wn = 1
        if d.get("PDW"):
            nbw = nb if vquant else 1
            wn = (nbw + 1) // 2 * (2 if d["PREC"] else 1)
        # the warp's P slots; PSHFL: none, only the epilogue's RB floats of l
        ws = rbp * 4 if d.get("PSHFL") else d["NWARPS"] * d["TW"] * rbp * 4 * wn
        return (
            _a16(ktab)
            + _a16(vtab)
            + _a16(max(stage, red))
            + _a16(ws)
            + _a16(d["NWARPS"] * rbp * 8)
            + _a16(RB * HD * (4 if d["QT"] == 0 else 2) if d.get("QSTAGE") else 0)  # QSTAGE: the q rows
        )
    tt = nthreads * d["TPT"]
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
def select_variant(D: int, kfmt: str, vfmt: str, rb: int, qt: int, cfg: AttnConfig, fallback: bool):
    """(config, defines, shared-memory bytes) of a call shape. With `fallback` (no explicit
    config), an mma variant whose shared memory does not fit (e.g. D=256 with float16 V) falls
    back to SMALL_MMA_CONFIG, then to the simt kernel."""
    d = attn_defines(D, kfmt, vfmt, rb, qt, cfg)
    smem = smem_bytes(cfg.impl, d)
    if smem > SMEM_LIMIT and cfg.impl == "mma" and fallback:
        for fb in (SMALL_MMA_CONFIG, SIMT_CONFIG_F16V if vfmt == V_F16 else SIMT_CONFIG):
            cfg = fb
            d = attn_defines(D, kfmt, vfmt, rb, qt, cfg)
            smem = smem_bytes(cfg.impl, d)
            if smem <= SMEM_LIMIT:
                break
    return cfg, d, smem


@functools.cache
def _kernels(impl: str, defines: tuple[tuple[str, int], ...], smem: int):
    """(partial kernel, combine kernel) of a variant, compiled."""
    name = KERNELS[impl]
    part = loader.module(f"{name}.cu", defines).get_function(name)
    part.max_dynamic_shared_size_bytes = smem
    comb = loader.module("polar_attn_combine.cu", (("HD", dict(defines)["HD"]),))
    return part, comb.get_function("polar_attn_combine")


# ----------------------------------------------------------------------------------------------
# Splits


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


# ----------------------------------------------------------------------------------------------
# plan / run


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `run` launches for one call shape (from `plan`)."""

    B: int
    Hq: int
    Hkv: int
    Tq: int
    D: int
    kfmt: str
    vfmt: str
    qt: int  # q dtype: 0 float32, 1 float16, 2 bfloat16
    config: AttnConfig  # the variant (after the mma -> simt fallbacks)
    defines: tuple[tuple[str, int], ...]
    smem: int  # dynamic shared memory bytes of the partial kernel
    rb: int  # query rows per CTA
    n_groups: int  # row groups: grid.y
    splits: int  # key splits: grid.x
    chunk: int  # keys per split (a multiple of the tile)
    regs: int  # registers a thread of the compiled partial kernel (0 where CuPy does not say)

    @property
    def kernel(self) -> str:
        return KERNELS[self.config.impl]

    @property
    def prec(self) -> int:
        """PREC of the mma kernel (1: fp16 hi + lo operands), 0 for simt."""
        return dict(self.defines).get("PREC", 0)


@functools.lru_cache(maxsize=4096)
def plan(
    B: int,
    Hq: int,
    Hkv: int,
    Tq: int,
    D: int,
    max_len: int,
    kfmt: str = "polar",
    vfmt: str = "polar",
    q_dtype="float32",
    config: AttnConfig | None = None,
    splits: int | None = None,
    device: int = 0,
) -> Plan:
    """The plan of decode attention for q [B, Hq, Tq, D] of `q_dtype` (torch dtype or its name)
    over caches of kfmt/vfmt holding at most `max_len` valid keys, on CUDA device `device`.

    config: the kernel shape (default: `default_config(vfmt, D=D, units=work_units(B, Hq, Hkv, Tq),
    loop_bound=loop_bound_device(device))`, with the fallbacks of `select_variant`);
    splits: the number of key splits (default: chosen for the GPU's SM count). Compiles the
    variant. Cached per arguments; raises ValueError naming the allowed values."""
    units = work_units(B, Hq, Hkv, Tq) if Hkv > 0 and Hq % Hkv == 0 else None  # (else refused below)
    cfg = config or default_config(vfmt, D=D, units=units, loop_bound=loop_bound_device(device))
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim must be one of {HEAD_DIMS}, got {D}")
    kf = _format("kfmt", kfmt)
    if vfmt != V_F16:
        _format("vfmt", vfmt)
    if cfg.kmode not in KMODES:
        raise ValueError(f"kmode must be one of {tuple(KMODES)}, got {cfg.kmode!r}")
    if cfg.kmode == "anglelut" and not kf.angle_lut:
        raise ValueError(f"kmode 'anglelut' reads angle-LUT formats only (paper B keys), got kfmt {kfmt!r}")
    if cfg.impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {cfg.impl!r}")
    if cfg.prec not in PRECS:
        raise ValueError(f"prec must be one of {PRECS}, got {cfg.prec!r}")
    if cfg.impl == "mma" and cfg.kmode != "gather":  # the LUT modes are simt-only
        cfg = dataclasses.replace(cfg, impl="simt")
    if cfg.impl == "mma" and (cfg.wtile % 16 or cfg.wtile <= 0 or cfg.stages < (1 if cfg.kvsplit else 2)):
        raise ValueError(
            f"mma: wtile must be a positive multiple of 16 and stages >= 2 (>= 1 with kvsplit), got {cfg}"
        )
    if cfg.impl == "mma" and cfg.lean not in LEAN_LEVELS:
        raise ValueError(f"mma: lean must be one of {LEAN_LEVELS}, got {cfg.lean!r}")
    if cfg.impl == "mma" and cfg.smlean not in SMLEAN_LEVELS:
        raise ValueError(f"mma: smlean must be one of {SMLEAN_LEVELS}, got {cfg.smlean!r}")
    if cfg.impl == "mma" and not (
        isinstance(cfg.maxrreg, int) and (cfg.maxrreg == 0 or 32 <= cfg.maxrreg <= 255)
    ):
        raise ValueError(
            f"mma: maxrreg must be 0 (the compiler's budget) or 32..255 registers, got {cfg.maxrreg!r}"
        )
    if cfg.impl == "mma" and not (isinstance(cfg.ctas, int) and 0 <= cfg.ctas <= 8):
        raise ValueError(f"mma: ctas must be 0 (the kernel's rule) or 1..8 CTAs a SM, got {cfg.ctas!r}")
    if Hkv <= 0 or Hq % Hkv:
        raise ValueError(f"Hq ({Hq}) must be a multiple of the cache's KV heads ({Hkv})")
    qt = _q_type(q_dtype)
    R = Hq // Hkv * Tq
    rb = min(R, 8)
    cfg, d, smem = select_variant(D, kfmt, vfmt, rb, qt, cfg, config is None)
    if smem > SMEM_LIMIT:
        raise ValueError(
            f"kernel variant {d} needs {smem} bytes of shared memory (> {SMEM_LIMIT}); "
            "use kmode='gather' or fewer rows / a smaller tile"
        )
    defines = tuple(d.items())
    part, _ = _kernels(cfg.impl, defines, smem)
    try:
        regs = int(getattr(part, "num_regs", 0) or 0)
    except Exception:  # pragma: no cover - depends on the cupy version
        regs = 0
    n_groups = -(-R // rb)  # units = B * Hkv * n_groups: the grid's z and y before the splits
    if splits is None:
        if cfg.impl == "mma":
            per_sm = _per_sm(smem, cfg.nwarps * 32, regs)
            splits = choose_splits_mma(units, max_len, cfg.tile, per_sm, loader.sm_count(device))
        else:
            splits = choose_splits(units, max_len, cfg.tile, smem, loader.sm_count(device))
    chunk = -(-max(max_len, 1) // splits)
    chunk = -(-chunk // cfg.tile) * cfg.tile
    splits = max(1, -(-max(max_len, 1) // chunk))
    p = Plan(B, Hq, Hkv, Tq, D, kfmt, vfmt, qt, cfg, defines, smem, rb, n_groups, splits, chunk, regs)
    # one split: run's kernel for an out of q's type (direct_defines), compiled now, not in a graph capture
    if writes_out(p):
        _kernels(cfg.impl, direct_defines(defines, qt), smem)
    return p


_last_defines: dict[Plan, tuple[tuple[str, int], ...]] = {}  # the variant of a stamped plan's last launch


def direct_defines(defines: tuple[tuple[str, int], ...], ot: int) -> tuple[tuple[str, int], ...]:
    """The defines of an mma variant (`defines`) writing the output itself in type ot (one split; OUT_TYPE of
    polar_attn_mma.cu: 0 float32, 1 float16, 2 bfloat16)."""
    return (*defines, ("OUT_TYPE", ot))


def writes_out(p: Plan, out=None) -> bool:
    """Whether `run(p, ..., out=out)` has the partial kernel write the output itself (the mma kernel with one
    split, out None or contiguous) instead of partials merged by polar_attn_combine."""
    return p.config.impl == "mma" and p.splits == 1 and (out is None or out.is_contiguous())


def check_cache(name: str, c, B: int, H: int, D: int, fmt: str) -> None:
    """ValueError unless c is a contiguous CUDA cache of format fmt: uint8 [B, H, T_max, D/64,
    type_size] (float16 [B, H, T_max, D] for "f16") with T_max a multiple of 8."""
    torch = loader.torch()
    loader.check_cuda(name, c)
    if fmt == V_F16:
        ok = c.dtype == torch.float16 and c.dim() == 4 and tuple(c.shape[:2]) == (B, H) and c.shape[3] == D
        want = f"float16 [{B}, {H}, T_max, {D}]"
    else:
        ts = formats.type_size(fmt)
        ok = (
            c.dtype == torch.uint8
            and c.dim() == 5
            and tuple(c.shape[:2]) == (B, H)
            and tuple(c.shape[3:]) == (D // QK, ts)
        )
        want = f"uint8 [{B}, {H}, T_max, {D // QK}, {ts}]"
    if not ok:
        raise ValueError(f"{name} ({fmt}) must be {want}, got {c.dtype} {tuple(c.shape)}")
    if not c.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if c.shape[2] % 8:
        raise ValueError(f"{name}: T_max must be a multiple of 8 (16-byte aligned rows), got {c.shape[2]}")


def run(p: Plan, q, k_cache, v_cache, lens, scale: float | None = None, out=None):
    """Launch plan p: decode attention of q [B, Hq, Tq, D] (the plan's shape and dtype, last dim
    contiguous) over k_cache / v_cache (see `attention`), keys 0 .. lens[b] - 1 (at most the
    plan's max_len). Returns [B, Hq, Tq, D] in q's dtype (or writes `out`)."""
    torch = loader.torch()
    loader.check_cuda("q", q)
    B, Hq, Hkv, Tq, D = p.B, p.Hq, p.Hkv, p.Tq, p.D
    if tuple(q.shape) != (B, Hq, Tq, D) or _q_type(q.dtype) != p.qt:
        want = f"[{B}, {Hq}, {Tq}, {D}] {('float32', 'float16', 'bfloat16')[p.qt]}"
        raise ValueError(f"q must be the plan's {want}, got {tuple(q.shape)} {q.dtype}")
    check_cache("k_cache", k_cache, B, Hkv, D, p.kfmt)
    check_cache("v_cache", v_cache, B, Hkv, D, p.vfmt)
    if k_cache.shape[2] != v_cache.shape[2]:
        raise ValueError(f"k_cache and v_cache hold {k_cache.shape[2]} and {v_cache.shape[2]} tokens")
    loader.check_cuda("lens", lens)
    if lens.dtype != torch.int32 or tuple(lens.shape) != (B,):
        raise ValueError(f"lens must be an int32 tensor [{B}], got {lens.dtype} {tuple(lens.shape)}")
    if q.stride(3) != 1:
        raise ValueError("q's last dimension must be contiguous")
    if out is None:
        out = torch.empty((B, Hq, Tq, D), dtype=q.dtype, device=q.device)
    elif (
        tuple(out.shape) != (B, Hq, Tq, D)
        or out.stride(3) != 1
        or out.dtype not in (torch.float32, torch.float16, torch.bfloat16)
    ):
        raise ValueError(
            f"out must be float32, float16 or bfloat16 [{B}, {Hq}, {Tq}, {D}] with a contiguous last dim, "
            f"got {out.dtype} {tuple(out.shape)} strides {tuple(out.stride())}"
        )
    R = Hq // Hkv * Tq
    # one split of the mma kernel: its CTAs write the final rows into a contiguous out (no partials, combine)
    direct = writes_out(p, out)
    defines = direct_defines(p.defines, _q_type(out.dtype)) if direct else p.defines
    part, comb = _kernels(p.config.impl, defines, p.smem)
    if p.config.cta_times:  # (where cta_times finds this launch's stamps)
        _last_defines[p] = defines
    if direct:
        o_part = m_part = l_part = out
    else:
        o_part = torch.empty((B * Hkv * R * p.splits * D,), dtype=torch.float32, device=q.device)
        m_part = torch.empty((B * Hkv * R * p.splits,), dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
    scale = D**-0.5 if scale is None else float(scale)
    dev = str(q.device)
    if p.config.impl == "mma":
        ktab = codec.mma_table(p.kfmt, p.prec, dev)
        vtab = codec.mma_table(p.vfmt, p.prec, dev) if p.vfmt != V_F16 else ktab
    else:
        ktab = codec.codebook_table(p.kfmt, dev)
        vtab = codec.codebook_table(p.vfmt, dev) if p.vfmt != V_F16 else ktab
    ptr = loader.ptr
    args = (
        ptr(q),
        np.int64(q.stride(0)),
        np.int64(q.stride(1)),
        np.int64(q.stride(2)),
        ptr(k_cache),
        ptr(v_cache),
        ptr(ktab),
        ptr(vtab),
        ptr(lens),
        np.int32(Hkv),
        np.int32(Hq // Hkv),
        np.int32(Tq),
        np.int32(k_cache.shape[2]),
        np.int32(p.chunk),
        np.float32(scale * math.log2(math.e)),
        ptr(o_part),
        ptr(m_part),
        ptr(l_part),
    )
    loader.launch(part, (p.splits, p.n_groups, B * Hkv), (p.config.nwarps * 32,), args, shared_mem=p.smem)
    if direct:
        return out
    cargs = (
        ptr(o_part),
        ptr(m_part),
        ptr(l_part),
        ptr(out),
        np.int64(out.stride(0)),
        np.int64(out.stride(1)),
        np.int64(out.stride(2)),
        np.int32(Hq),
        np.int32(Hkv),
        np.int32(Tq),
        np.int32(p.splits),
        np.int32(_q_type(out.dtype)),
    )
    loader.launch(comb, (B * Hq * Tq,), (D,), cargs)
    return out


CTA_MARKS = ("entry", "issued", "q_done", "tables", "loop_done", "written")


def cta_times(p: Plan, reset: bool = False):
    """The per-CTA stamps of the last launch of plan p (its config has cta_times): a numpy uint64
    array [n_ctas, 7] = %globaltimer (ns) at CTA_MARKS, then the SM; the CTAs in launch order
    (x + splits (y + n_groups z)); a CTA with no keys has zeros past its entry. reset=True zeroes the
    array instead (before a launch)."""
    if p.config.impl != "mma" or not p.config.cta_times:
        raise ValueError(f"cta_times needs an mma plan with config.cta_times=True, got {p.config}")
    cp = loader.cupy()
    n = p.splits * p.n_groups * p.B * p.Hkv
    if n > CTA_TIMES_MAX:
        raise ValueError(f"cta_times keeps at most {CTA_TIMES_MAX} CTAs, the plan has {n}")

    def stamps(defines):
        g = loader.module(f"{p.kernel}.cu", defines).get_global("polar_attn_cta_times")
        return cp.ndarray((CTA_TIMES_MAX, len(CTA_MARKS) + 1), dtype=cp.uint64, memptr=g)

    if reset:  # both modules run may launch: the partials' and (one split) the direct write's in q's type
        for defines in (p.defines, direct_defines(p.defines, p.qt)) if writes_out(p) else (p.defines,):
            stamps(defines).fill(0)
        return None
    return cp.asnumpy(stamps(_last_defines.get(p, p.defines))[:n])


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
    """Decode attention of q [B, Hq, Tq, D] over a compressed cache (`plan` + `run`).

    k_cache: uint8 [B, Hkv, T_max, D/64, type_size(kfmt)], kfmt "polar", "polar3" or a
             registered format (cupy_kernels.formats).
    v_cache: the same for vfmt, or float16 [B, Hkv, T_max, D] for vfmt == "f16".
    lens:    int32 CUDA tensor [B]; keys 0..lens[b]-1 are valid and query row tq sits at
             position lens[b] - Tq + tq (causal inside the last Tq keys).
    Hq must be a multiple of Hkv (GQA); D in 64, 128, 256; T_max a multiple of 8.
    Returns [B, Hq, Tq, D] in q's dtype (or writes `out`). softmax scale defaults to D**-0.5.
    max_len: an upper bound of lens (avoids a device-to-host copy); defaults to T_max.
    """
    torch = loader.torch()
    loader.check_cuda("q", q)
    if q.dim() != 4:
        raise ValueError(f"q must be [B, Hq, Tq, D], got {tuple(q.shape)}")
    B, Hq, Tq, D = q.shape
    Hkv = k_cache.shape[1] if k_cache.dim() >= 2 else -1
    T_max = k_cache.shape[2] if k_cache.dim() >= 3 else 0
    ml = T_max if max_len is None else min(max_len, T_max)
    dev = q.device.index if q.device.index is not None else torch.cuda.current_device()
    p = plan(B, Hq, Hkv, Tq, D, ml, kfmt, vfmt, q.dtype, config, splits, dev)
    return run(p, q, k_cache, v_cache, lens, scale, out)
