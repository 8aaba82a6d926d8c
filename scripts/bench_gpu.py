#!/usr/bin/env python3
"""GPU benchmarks of the polar kernels (CUDA events, warm-ups, median of --reps, L2 flushed
before every timed repetition).

    python scripts/bench_gpu.py attn   [--json out.json]   decode attention vs SDPA fp16
    python scripts/bench_gpu.py tune   [--json out.json]   kernel shapes at the headline size
    python scripts/bench_gpu.py kmode  [--json out.json]   (a) gather+FMA vs (b) LUT
    python scripts/bench_gpu.py encode [--json out.json]   encoder throughput
    python scripts/bench_gpu.py encode --variants all      + the encoder's throughput variants, bytes checked
    python scripts/bench_gpu.py encode-latency             the latency path's kernels (a decode step)
    python scripts/bench_gpu.py copy                       device-to-device copy rate
    python scripts/bench_gpu.py compare --contexts 32768 131072   simt (before) vs tensor-core kernel
    python scripts/bench_gpu.py anatomy --contexts 4096 ... 131072  where polar K+V's time goes (L2 flush
                                                           by a write or a read, per-CTA timestamps, clocks)
    python scripts/bench_gpu.py scaling --batches 1 2 4 8 16 --contexts 65536
                                                           what binds the loop: a CTA alone against all of
                                                           them (the headroom that faster memory would use)
    python scripts/bench_gpu.py project --from scaling.json --copy-gbps 4221 --sdpa-us 485.6
                                                           (no GPU) what a scaling run says about a GPU
                                                           with faster memory: the loop's bound, the ratio
    python scripts/bench_gpu.py tune-mma [--json out.json]   tensor-core kernel options and shapes
    python scripts/bench_gpu.py tune-mma --fmts polar3/polar3 polar/polar3 --phases ctas new  (polar3 V)
    python scripts/bench_gpu.py profile --contexts 32768    untimed default kernels, for ncu
    python scripts/bench_gpu.py all --json out.json        everything above

Attention variants: polar K + polar V, polar K + fp16 V, polar3 K+V, the paper-B preset
(paperb K+V, angle LUT), against torch SDPA on fp16 K/V (flash / memory-efficient backends;
the GQA query heads of one KV head are folded into the query length) and against
"dequantize the cache to fp16, then SDPA". Effective bandwidth = compressed cache bytes read
per call / time.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import sys
import time
from pathlib import Path

from bench_gpu_lib import (
    Shape,
    Timer,
    _torch,
    attn_fn,
    cache_bytes,
    clock_samples,
    config_set,
    device_info,
    failed,
    graph_fn,
    print_rows,
    rand_blocks,
    register_paperb,
    sdpa_fns,
)
from kvpolar.atomic import atomic_write_text

log = logging.getLogger("bench_gpu")


def shape_default(vfmt: str, sh: Shape, kmode: str = "gather"):
    """The kernel shape `plan` takes by default for a decode step (one query row a head) of shape sh."""
    from cupy_kernels import attention

    return attention.call_config(vfmt, sh.B, sh.Hq, sh.Hkv, 1, sh.D, kmode)


def bench_attn(args, timer, shapes, variants) -> list[dict]:
    torch = _torch()
    from cupy_kernels import attention, codec

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for sh in shapes:
        B, T, Hq, Hkv, D = sh.B, sh.T, sh.Hq, sh.Hkv, sh.D
        q = torch.randn((B, Hq, 1, D), generator=gen, device="cuda", dtype=torch.float16)
        lens = torch.full((B,), T, dtype=torch.int32, device="cuda")
        base = None
        # fp16 SDPA baseline
        k16 = rand_blocks("f16", B, Hkv, T, D, gen)
        v16 = rand_blocks("f16", B, Hkv, T, D, gen)
        best = None
        for name, fn in sdpa_fns(q, k16, v16).items():
            try:
                r = timer(fn)
            except RuntimeError as e:
                failed(args, f"{sh.label} {name}", e)
                continue
            nbytes = 2 * cache_bytes("f16", B, Hkv, T, D)
            rows.append(
                {
                    "shape": sh.label,
                    **dataclasses.asdict(sh),
                    "variant": name,
                    **r,
                    "bytes": nbytes,
                    "GBps": nbytes / r["ms"] / 1e6,
                }
            )
            best = r["ms"] if best is None else min(best, r["ms"])
        base = best
        del k16, v16
        for kfmt, vfmt, kmode in variants:
            kc = rand_blocks(kfmt, B, Hkv, T, D, gen)
            vc = rand_blocks(vfmt, B, Hkv, T, D, gen)
            fallback = args.best.get(
                ("polar", "f16" if vfmt == "f16" else "polar"),
                (shape_default(vfmt, sh), 0),
            )
            base_cfg = args.best.get((kfmt, vfmt), fallback)[0]
            cfg = (
                dataclasses.replace(base_cfg, kmode=kmode)
                if kmode == "gather"
                else attention.default_config(vfmt, kmode)
            )
            name = f"{kfmt}+{vfmt}" + (f" ({kmode})" if kmode != "gather" else "")
            try:
                r = timer(attn_fn(q, kc, vc, lens, kfmt, vfmt, config=cfg, max_len=T))
            except Exception as e:
                failed(args, f"{sh.label} {name}", e)
                continue
            nbytes = cache_bytes(kfmt, B, Hkv, T, D) + cache_bytes(vfmt, B, Hkv, T, D)
            row = {
                "shape": sh.label,
                **dataclasses.asdict(sh),
                "variant": name,
                "config": dataclasses.asdict(cfg),
                **r,
                "bytes": nbytes,
                "GBps": nbytes / r["ms"] / 1e6,
                "pct_copy_rate": 100 * nbytes / (r["ms"] * 1e-3) / args.copy_rate,
                "speedup_vs_sdpa": (base / r["ms"]) if base else None,
            }
            rows.append(row)
            if kfmt == vfmt == "polar" and kmode == "gather" and args.dequant:

                def deq_sdpa(kc=kc, vc=vc, q=q):
                    kd = codec.dequantize_cache(kc, "polar", torch.float16)
                    vd = codec.dequantize_cache(vc, "polar", torch.float16)
                    return sdpa_fns(q, kd, vd)["sdpa_fold"]()

                try:
                    r = timer(deq_sdpa)
                    rows.append(
                        {
                            "shape": sh.label,
                            **dataclasses.asdict(sh),
                            "variant": "dequant+sdpa",
                            **r,
                            "bytes": nbytes,
                            "GBps": nbytes / r["ms"] / 1e6,
                            "speedup_vs_sdpa": (base / r["ms"]) if base else None,
                        }
                    )
                except RuntimeError as e:
                    failed(args, f"{sh.label} dequant+sdpa", e)
            del kc, vc
            torch.cuda.empty_cache()
        torch.cuda.empty_cache()
        print_rows([r for r in rows if r["shape"] == sh.label])
    return rows


def cmd_attn(args, timer) -> list[dict]:
    shapes = []
    for Hq, Hkv, D in ((32, 8, 128), (9, 3, 64)):
        for B in args.batches:
            for T in args.contexts:
                shapes.append(Shape(B, T, Hq, Hkv, D))
    variants = [
        ("polar", "polar", "gather"),
        ("polar", "f16", "gather"),
        ("polar3", "polar3", "gather"),
        ("paperb", "paperb", "anglelut"),
        ("paperb", "f16", "anglelut"),
    ]
    register_paperb()
    return bench_attn(args, timer, shapes, variants)


def cmd_kmode(args, timer) -> list[dict]:
    """(a) codebook gather + FMA vs (b) per-query LUT, where the LUT fits in shared memory."""
    torch = _torch()

    register_paperb()

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(1)
    cases = [  # (shape, kfmt, vfmt, kmodes)
        (Shape(16, 32768, 9, 3, 64), "polar", "polar", ("gather", "lut")),
        (Shape(16, 32768, 32, 32, 128), "polar", "polar", ("gather", "lut")),
        (Shape(16, 32768, 32, 8, 128), "polar3", "polar3", ("gather", "lut")),
        (Shape(16, 32768, 9, 3, 64), "polar3", "polar3", ("gather", "lut")),
        (Shape(16, 32768, 32, 8, 128), "paperb", "paperb", ("gather", "anglelut")),
        (Shape(16, 32768, 32, 8, 128), "paperb", "f16", ("gather", "anglelut")),
    ]
    for sh, kfmt, vfmt, modes in cases:
        q = torch.randn((sh.B, sh.Hq, 1, sh.D), generator=gen, device="cuda", dtype=torch.float16)
        lens = torch.full((sh.B,), sh.T, dtype=torch.int32, device="cuda")
        kc = rand_blocks(kfmt, sh.B, sh.Hkv, sh.T, sh.D, gen)
        vc = rand_blocks(vfmt, sh.B, sh.Hkv, sh.T, sh.D, gen)
        nbytes = cache_bytes(kfmt, sh.B, sh.Hkv, sh.T, sh.D) + cache_bytes(vfmt, sh.B, sh.Hkv, sh.T, sh.D)
        for mode in modes:
            cfg = shape_default(vfmt, sh, mode)
            try:
                r = timer(attn_fn(q, kc, vc, lens, kfmt, vfmt, config=cfg, max_len=sh.T))
            except Exception as e:
                failed(args, f"{sh.label} {kfmt} {mode}", e)
                rows.append({"shape": sh.label, "variant": f"{kfmt}+{vfmt} ({mode})", "error": str(e)[:200]})
                continue
            rows.append(
                {
                    "shape": sh.label,
                    **dataclasses.asdict(sh),
                    "variant": f"{kfmt}+{vfmt} ({mode})",
                    **r,
                    "bytes": nbytes,
                    "GBps": nbytes / r["ms"] / 1e6,
                }
            )
            print_rows(rows[-1:])
        del kc, vc
        torch.cuda.empty_cache()
    return rows


def cmd_tune(args, timer) -> list[dict]:
    """Kernel shapes (warps, keys per thread, stages, table copies, splits) at the headline sizes."""
    torch = _torch()
    from cupy_kernels import attention

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(2)
    for sh, kfmt, vfmt in (
        (Shape(16, 32768, 32, 8, 128), "polar", "polar"),
        (Shape(16, 32768, 32, 8, 128), "polar", "f16"),
        (Shape(16, 131072, 32, 8, 128), "polar", "polar"),
    ):
        q = torch.randn((sh.B, sh.Hq, 1, sh.D), generator=gen, device="cuda", dtype=torch.float16)
        lens = torch.full((sh.B,), sh.T, dtype=torch.int32, device="cuda")
        kc = rand_blocks(kfmt, sh.B, sh.Hkv, sh.T, sh.D, gen)
        vc = rand_blocks(vfmt, sh.B, sh.Hkv, sh.T, sh.D, gen)
        nbytes = cache_bytes(kfmt, sh.B, sh.Hkv, sh.T, sh.D) + cache_bytes(vfmt, sh.B, sh.Hkv, sh.T, sh.D)
        for nw, tpt, st, repl in args.tune_grid:
            cfg = attention.AttnConfig(nwarps=nw, tpt=tpt, stages=st, repl=repl, impl="simt")
            for splits in (None, *args.tune_splits):
                try:
                    r = timer(attn_fn(q, kc, vc, lens, kfmt, vfmt, config=cfg, splits=splits, max_len=sh.T))
                except Exception as e:
                    failed(args, f"tune {cfg}", e)
                    continue
                rows.append(
                    {
                        "shape": sh.label,
                        **dataclasses.asdict(sh),
                        "variant": f"{kfmt}+{vfmt}",
                        "config": dataclasses.asdict(cfg),
                        "splits": splits,
                        **r,
                        "bytes": nbytes,
                        "GBps": nbytes / r["ms"] / 1e6,
                        "pct_copy_rate": 100 * nbytes / (r["ms"] * 1e-3) / args.copy_rate,
                    }
                )
                key = (kfmt, vfmt)
                if sh.T == 32768 and splits is None and (key not in args.best or r["ms"] < args.best[key][1]):
                    args.best[key] = (cfg, r["ms"])
                print(
                    f"{sh.label} {kfmt}+{vfmt} nw{nw} tpt{tpt} st{st} repl{repl} splits={splits}: "
                    f"{r['ms'] * 1e3:.1f} us {rows[-1]['GBps']:.0f} GB/s",
                    flush=True,
                )
        del kc, vc
        torch.cuda.empty_cache()
    return rows


# tune-mma: the tensor-core kernel's tuning options (cupy_kernels.attention.AttnConfig swizzle, lean,
# kvsplit) and shapes, at B=16, 32/8 heads, D=128, fp16 q (prec "auto": fp16 operands)
MMA_TUNE_SHAPE = Shape(16, 32768, 32, 8, 128)
MMA_TUNE_LONG = 131072  # the default and the MMA_TUNE_BEST fastest of each format again at this context
MMA_TUNE_BEST = 3
MMA_TUNE_FMTS = (("polar", "polar"), ("polar", "f16"))
MMA_OPTION_SETS = {  # name: AttnConfig kwargs, at the default shape; kvsplit sets at stages 1 and 2
    "base": {},
    "swz": dict(swizzle=True),
    "lean1": dict(lean=1),
    "lean2": dict(lean=2),
    "swz+lean2": dict(swizzle=True, lean=2),
    "kvs": dict(kvsplit=True),
    "swz+lean2+kvs": dict(swizzle=True, lean=2, kvsplit=True),
}
# the instruction cuts of issue 11 (AttnConfig pdw, smlean, ptrs, vunroll; not yet defaults), on each
# format's default config; MMA_NEW_SHAPES: with them on other polar K+V shapes (3 CTAs/SM with
# kvsplit and one stage; 64-key tiles)
MMA_NEW_OPTION_SETS = {
    "vun": dict(vunroll=True),
    "pdw": dict(pdw=True),
    "sml1": dict(smlean=1),
    "sml2": dict(smlean=2),
    "vun+sml1": dict(vunroll=True, smlean=1),
    "vun+sml2": dict(vunroll=True, smlean=2),
    "pdw+sml1+vun": dict(pdw=True, smlean=1, vunroll=True),
    "pdw+sml2+vun": dict(pdw=True, smlean=2, vunroll=True),
    "sml1+vun+ptrs": dict(smlean=1, vunroll=True, ptrs=True),
    "pdw+sml1+vun+ptrs": dict(pdw=True, smlean=1, vunroll=True, ptrs=True),
}
MMA_NEW_SHAPES = (
    dict(nwarps=8, wtile=32, stages=1, kvsplit=True, smlean=1, vunroll=True),
    dict(nwarps=8, wtile=32, stages=1, kvsplit=True, pdw=True, smlean=1, vunroll=True),
    dict(nwarps=8, wtile=64, stages=1, kvsplit=True, pdw=True, smlean=1, vunroll=True, ptrs=True),
    dict(nwarps=16, wtile=32, stages=2, smlean=1, vunroll=True),
)
# polar3 V (until session 31 POLAR3V_CONFIG was session 6's shape: polar's later default took polar3 K+V from
# 253 to 302 us in session 7): phase "ctas" times polar's default on polar3 V with the CTAs a SM asked of
# ptxas (AttnConfig.ctas; its own rule asks for 3 there: 80 registers, and ptxas spills), and session 6's
# shape with polar's later options (one of them the default since session 31)
MMA_TUNE_POLAR3_FMTS = (("polar3", "polar3"), ("polar", "polar3"))
# session 6's polar3 V shape (AttnConfig kwargs), the default until session 31
POLAR3V_S6 = dict(impl="mma", nwarps=8, wtile=32, stages=2, swizzle=True, lean=2, qstage=True)
MMA_CTAS_SETS = (  # (base: "polar" = DEFAULT_CONFIG, "s6" = POLAR3V_S6; AttnConfig kwargs)
    ("polar", {}),
    ("polar", dict(ctas=1)),
    ("polar", dict(ctas=2)),
    ("polar", dict(ctas=2, vunroll=False)),
    ("polar", dict(ctas=2, wtile=32)),
    ("polar", dict(ctas=3, wtile=32)),
    ("s6", {}),
    ("s6", dict(smlean=1, pdw=True, ptrs=True)),
    ("s6", dict(smlean=1, pdw=True, ptrs=True, vunroll=True)),
    ("s6", dict(kvsplit=True, stages=1, ctas=2)),
)
# phase "depth": deeper cp.async rings on polar's default. On the GPU machines' NVRTC the default takes 164
# registers (session 37, H100), so one CTA a SM, and its 70 KiB of stages leave shared memory unused: more
# bytes in flight a warp cost no occupancy there (AttnConfig kwargs; tune_mma_grid drops what does not fit)
MMA_DEPTH_SETS = (
    dict(stages=2),  # K and V rings of 2 slots each (64-key tiles: 136 KiB of stages)
    dict(stages=2, kvsplit=False),  # one ring of 2 (K, V) slots: the same bytes, the order before kvsplit
    dict(wtile=32, stages=3),  # 32-key tiles, rings of 3 and 4 slots
    dict(wtile=32, stages=4),
    dict(stages=2, ctas=1),  # no register cap asked (the kernel's rule asks none here either)
    # more warps in the one CTA a SM: 12 (10) x 32 threads x 164 registers fit the SM's 65536, so 50 % (25 %)
    # more warps to hide latency and more tiles in flight (session 38). Timed: on an H100 12 lost (session
    # 40); on the H200 12 took 166.6 against the default's 172.5 us (session 44), the default there since
    # (attention.LOOP_BOUND_CONFIG), 10 took 188.2
    dict(nwarps=12),
    dict(nwarps=10),
    # 16 warps (127 registers under the cap 16 x 32 threads puts on them). On an H100 (session 44, `scaling`)
    # a lone CTA's loop 1.07-1.22x faster than the default's (12 warps 1.05-1.20x), and both lost under the
    # full load there; not yet timed on an H200
    dict(nwarps=16),
    # 12 warps with the register budget their 384 threads leave (65536 / 384 = 170): NVRTC 13.0.88 gives 150
    # registers and 1707 loop instructions a tile (143 and 1732 without); not yet timed
    dict(nwarps=12, maxrreg=168),
    # P d by warp shuffles (AttnConfig.pshfl, session 45: 32 fewer shared-memory wavefronts a 64-key tile,
    # 16 shuffles more); on an H100 a lone CTA 3.6-3.9 % faster, the full load equal; 12 warps with it are
    # the loop-bound default (attention.LOOP_BOUND_CONFIG), not yet timed on an H200
    dict(pshfl=True),
    dict(nwarps=12, pshfl=True),
    # the compile's register budget (AttnConfig.maxrreg, session 43): with 255 NVRTC 13.0 gives the default
    # 183 registers and 1548 loop instructions a tile (164 and 1725 without), and the 2-slot rings 206 (128
    # without). On the H200 (session 44) the first took 186.4 us, the second 167.7 (the default 172.5)
    dict(maxrreg=255),
    dict(stages=2, maxrreg=255),
)
MMA_SWEEP_OPTIONS = dict(swizzle=True, lean=2)  # the options of the shape sweep
MMA_SWEEP_MIN_WARPS = 16  # sweep only shapes with the occupancy of the default polar K+V or more
MMA_TUNE_REGS = 80  # registers a thread the occupancy filter assumes (NVRTC 13.2, sm_90: 77-80)


def mma_label(cfg) -> str:
    """8w32k2s+swz+lean2+kvs+pdw+sml1+vun+ptrs: warps x keys per warp tile x stages, then the options."""
    opts = (
        ("+swz" if cfg.swizzle else "")
        + (f"+lean{cfg.lean}" if cfg.lean else "")
        + ("+kvs" if cfg.kvsplit else "")
        + ("+pdw" if cfg.pdw else "")
        + (f"+sml{cfg.smlean}" if cfg.smlean else "")
        + ("+vun" if cfg.vunroll else "")
        + ("+ptrs" if cfg.ptrs else "")
        + ("+qst" if cfg.qstage else "")
        + ("+psh" if cfg.pshfl else "")
        + (f"+c{cfg.ctas}" if cfg.ctas else "")
        + (f"+r{cfg.maxrreg}" if cfg.maxrreg else "")
    )
    return f"{cfg.nwarps}w{cfg.wtile}k{cfg.stages}s{opts}"


def mma_occupancy(cfg, kfmt: str, vfmt: str, regs: int = MMA_TUNE_REGS) -> tuple[int, int]:
    """(dynamic shared memory bytes, theoretical warps per SM) of kfmt K + vfmt V with config cfg
    at MMA_TUNE_SHAPE (4 query rows per KV head, fp16 q); needs no GPU."""
    from cupy_kernels import attention

    sh = MMA_TUNE_SHAPE
    d = attention.attn_defines(sh.D, kfmt, vfmt, min(sh.Hq // sh.Hkv, 8), 1, cfg)
    smem = attention.smem_bytes("mma", d)
    return smem, attention._per_sm(smem, cfg.nwarps * 32, regs) * cfg.nwarps


MMA_TUNE_PHASES = ("options", "shapes", "new")  # tune-mma's default; "ctas" and "depth" on request


def tune_mma_grid(fmts=MMA_TUNE_FMTS, phases=MMA_TUNE_PHASES) -> list[tuple[str, str, str, object]]:
    """(phase, kfmt, vfmt, config) of every tune-mma timing at MMA_TUNE_SHAPE, without a GPU, for the format
    pairs fmts and the phases named (the default: those of MMA_TUNE_FMTS below).

    "options": each of MMA_OPTION_SETS on the kernel without options (8 warps x 32 keys x 2 stages);
    the defaults since session 6 are among them;
    "shapes": nwarps {4, 8, 16} x wtile {16, 32, 64} x (stages 2 or 3, or kvsplit with stages 1)
    with MMA_SWEEP_OPTIONS, where the shared memory fits and the theoretical occupancy is at least
    MMA_SWEEP_MIN_WARPS warps per SM (36 configs: 18 options + 13 polar V + 5 fp16 V shapes);
    "new": each of MMA_NEW_OPTION_SETS on each format's default, and MMA_NEW_SHAPES (polar K+V,
    with MMA_SWEEP_OPTIONS) (24 configs on the session-6 defaults; option sets a default already has
    drop out);
    "ctas": MMA_CTAS_SETS on each pair (polar3 V: MMA_TUNE_POLAR3_FMTS, `tune-mma --fmts polar3/polar3
    polar/polar3 --phases ctas new`: 20 + 2 configs since polar3 V's default has the "new" options);
    "depth": polar's default and MMA_DEPTH_SETS on it, on each pair."""
    from cupy_kernels import attention

    grid, seen = [], set()

    def add(phase, kfmt, vfmt, cfg):
        smem, warps = mma_occupancy(cfg, kfmt, vfmt)
        if smem <= attention.SMEM_LIMIT and (phase != "shapes" or warps >= MMA_SWEEP_MIN_WARPS):
            if (kfmt, vfmt, cfg) not in seen:
                seen.add((kfmt, vfmt, cfg))
                grid.append((phase, kfmt, vfmt, cfg))

    for kfmt, vfmt in fmts if "options" in phases else ():
        # the options on the kernel without them (8 warps x 32 keys x 2 stages, the pre-session-6 default)
        base = dataclasses.replace(
            attention.default_config(vfmt), swizzle=False, lean=0, kvsplit=False, stages=2
        )
        for kw in MMA_OPTION_SETS.values():
            for st in (1, 2) if kw.get("kvsplit") else (base.stages,):
                add("options", kfmt, vfmt, dataclasses.replace(base, stages=st, **kw))
    for kfmt, vfmt in fmts if "shapes" in phases else ():
        base = attention.default_config(vfmt)
        for nw, tw, (kvs, st) in itertools.product(
            (4, 8, 16), (16, 32, 64), ((False, 2), (False, 3), (True, 1))
        ):
            cfg = dataclasses.replace(base, nwarps=nw, wtile=tw, stages=st, kvsplit=kvs, **MMA_SWEEP_OPTIONS)
            add("shapes", kfmt, vfmt, cfg)
    for kfmt, vfmt in fmts if "ctas" in phases else ():
        for base, kw in MMA_CTAS_SETS:
            cfg = attention.DEFAULT_CONFIG if base == "polar" else attention.AttnConfig(**POLAR3V_S6)
            add("ctas", kfmt, vfmt, dataclasses.replace(cfg, **kw))
    for kfmt, vfmt in fmts if "depth" in phases else ():
        for kw in ({}, *MMA_DEPTH_SETS):
            add("depth", kfmt, vfmt, dataclasses.replace(attention.DEFAULT_CONFIG, **kw))
    for kfmt, vfmt in fmts if "new" in phases else ():
        base = attention.default_config(vfmt)
        for kw in MMA_NEW_OPTION_SETS.values():
            add("new", kfmt, vfmt, dataclasses.replace(base, **kw))
    if "new" in phases and ("polar", "polar") in fmts:
        for kw in MMA_NEW_SHAPES:
            cfg = dataclasses.replace(attention.DEFAULT_CONFIG, **MMA_SWEEP_OPTIONS, **kw)
            add("new", "polar", "polar", cfg)
    return grid


def tune_call(args, fn):
    """tune-mma's call as timed: fn itself, or with --graph its replay from a CUDA graph (the kernels
    alone: an eager call of a small shape is bound by the host's Python, not by the kernel)."""
    return graph_fn(fn) if args.graph else fn


def cmd_tune_mma(args, timer) -> list[dict]:
    """The tensor-core kernel's options and shapes (tune_mma_grid) against its default, same run,
    same data: B=16, 32/8 heads, D=128, fp16 q, splits chosen by the plan; every config at 32768
    keys, then the default and the MMA_TUNE_BEST fastest of each format at MMA_TUNE_LONG; fp16 SDPA
    at both contexts for the speed-up. One line per timing. ~36 NVRTC compiles (~1-2 s each).
    --graph: every call (SDPA's too) replayed from a CUDA graph."""
    torch = _torch()
    from cupy_kernels import attention

    t_start = time.time()
    grid = tune_mma_grid(args.fmts, args.phases)
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(6)
    fastest: dict[tuple[str, str], list] = {}  # (kfmt, vfmt) -> [(ms, config)] at MMA_TUNE_SHAPE.T
    shape = Shape(*args.tune_shape) if args.tune_shape else MMA_TUNE_SHAPE
    for T in (shape.T, MMA_TUNE_LONG):
        sh = dataclasses.replace(shape, T=T)
        q = torch.randn((sh.B, sh.Hq, 1, sh.D), generator=gen, device="cuda", dtype=torch.float16)
        lens = torch.full((sh.B,), T, dtype=torch.int32, device="cuda")
        dev = q.device.index or 0
        k16 = rand_blocks("f16", sh.B, sh.Hkv, T, sh.D, gen)
        v16 = rand_blocks("f16", sh.B, sh.Hkv, T, sh.D, gen)
        r = timer(tune_call(args, sdpa_fns(q, k16, v16)["sdpa_fold"]))
        sdpa_ms = r["ms"]
        nbytes = 2 * cache_bytes("f16", sh.B, sh.Hkv, T, sh.D)
        rows.append(
            {
                "shape": sh.label,
                **dataclasses.asdict(sh),
                "variant": "sdpa fp16 graph" if args.graph else "sdpa fp16",
                "graph": args.graph,
                **r,
                "bytes": nbytes,
                "GBps": nbytes / r["ms"] / 1e6,
            }
        )
        print_rows(rows[-1:])
        del k16, v16
        torch.cuda.empty_cache()
        for kfmt, vfmt in args.fmts:
            if T == shape.T:
                todo = [(ph, cfg) for ph, kf, vf, cfg in grid if (kf, vf) == (kfmt, vfmt)]
            else:
                best = [cfg for _, cfg in sorted(fastest.get((kfmt, vfmt), []), key=lambda x: x[0])]
                default = shape_default(vfmt, sh)
                todo = [("long", cfg) for cfg in dict.fromkeys([default, *best[:MMA_TUNE_BEST]])]
            kc = rand_blocks(kfmt, sh.B, sh.Hkv, T, sh.D, gen)
            vc = rand_blocks(vfmt, sh.B, sh.Hkv, T, sh.D, gen)
            nbytes = cache_bytes(kfmt, sh.B, sh.Hkv, T, sh.D) + cache_bytes(vfmt, sh.B, sh.Hkv, T, sh.D)
            for phase, cfg in todo:
                name = f"{sh.label} {kfmt}+{vfmt} {mma_label(cfg)}{' graph' if args.graph else ''}"
                try:
                    p = attention.plan(sh.B, sh.Hq, sh.Hkv, 1, sh.D, T, kfmt, vfmt, q.dtype, cfg, None, dev)
                    r = timer(tune_call(args, attn_fn(q, kc, vc, lens, kfmt, vfmt, config=cfg, max_len=T)))
                except Exception as e:
                    failed(args, name, e)
                    print(f"{name}: FAILED {str(e)[:300]}", flush=True)
                    continue
                warps = attention._per_sm(p.smem, cfg.nwarps * 32, p.regs) * cfg.nwarps
                rows.append(
                    {
                        "shape": sh.label,
                        **dataclasses.asdict(sh),
                        "variant": f"{kfmt}+{vfmt}",
                        "phase": phase,
                        "graph": args.graph,
                        "label": mma_label(cfg),
                        "config": dataclasses.asdict(cfg),
                        "splits": p.splits,
                        "smem": p.smem,
                        "regs": p.regs,
                        "warps_per_sm": warps,
                        **r,
                        "bytes": nbytes,
                        "GBps": nbytes / r["ms"] / 1e6,
                        "pct_copy_rate": 100 * nbytes / (r["ms"] * 1e-3) / args.copy_rate,
                        "speedup_vs_sdpa": sdpa_ms / r["ms"],
                    }
                )
                if T == shape.T:
                    fastest.setdefault((kfmt, vfmt), []).append((r["ms"], cfg))
                row = rows[-1]
                print(
                    f"{name:<58} {phase:<7} splits {p.splits:<3} smem {p.smem / 1024:5.1f} KiB "
                    f"regs {p.regs:3d} {warps:2d} warps/SM: {r['ms'] * 1e3:7.1f} us {row['GBps']:5.0f} GB/s "
                    f"x{row['speedup_vs_sdpa']:.2f} vs sdpa {row['pct_copy_rate']:3.0f}% of copy",
                    flush=True,
                )
            del kc, vc
            torch.cuda.empty_cache()
    print(f"tune-mma: {len(rows)} timings in {time.time() - t_start:.0f} s; fastest vs default:")
    groups: dict[tuple[str, int], list[dict]] = {}  # (variant, T); one shape a run
    for r in rows:
        if "label" in r:
            groups.setdefault((r["variant"], r["T"]), []).append(r)
    for (variant, T), group in groups.items():
        default = mma_label(shape_default(variant.split("+")[1], shape))
        base = next((r for r in group if r["label"] == default), None)
        best = min(group, key=lambda r: r["ms"])
        vs = f", {base['ms'] / best['ms']:.2f}x the default's {base['ms'] * 1e3:.1f} us" if base else ""
        us, sp = best["ms"] * 1e3, best["speedup_vs_sdpa"]
        print(f"  T{T} {variant}: {best['label']} {us:.1f} us, x{sp:.2f} vs sdpa{vs}")
    return rows


# name: AttnConfig kwargs (cupy_kernels.attention) + optional "splits", "combine"; None = the simt kernel
COMPARE_CFGS = {
    "simt (before)": None,
    "mma default": {},
    # the default's output written through the partials and the combine kernel, as before session 38 (an out
    # whose rows are padded, so not contiguous, takes that path; the default writes it from the kernel
    # when the plan has one split)
    "mma combine": dict(combine=True),
    "mma no-qstage": dict(qstage=False),  # (the default before session 19)
    "mma fp32-prec": dict(prec="fp32"),
    "mma 8w32k2s splits4": dict(nwarps=8, wtile=32, stages=2, splits=4),
    "mma 8w32k2s splits16": dict(nwarps=8, wtile=32, stages=2, splits=16),
    "mma 16w32k2s": dict(nwarps=16, wtile=32, stages=2),
    "mma 4w16k2s": dict(nwarps=4, wtile=16, stages=2),
    "mma 4w32k3s (first mma shape)": dict(nwarps=4, wtile=32, stages=3, splits=16),
}


def timed_row(sh: Shape, variant: str, r: dict, nbytes: int, **extra) -> dict:
    """A result row: the shape, the variant, the timer's numbers, the bytes and their rate, extra keys."""
    return {
        "shape": sh.label,
        **dataclasses.asdict(sh),
        "variant": variant,
        **r,
        "bytes": nbytes,
        "GBps": nbytes / r["ms"] / 1e6,
        **extra,
    }


def headline_inputs(T: int, gen):
    """Issue 11's benchmark shape at context T (B=16, 32/8 heads, D=128, float16 q, every key valid): the
    shape, q, lens, fp16 SDPA over random fp16 K/V (a closure) and the bytes it reads; draws q, K, V from
    gen."""
    torch = _torch()
    sh = Shape(16, T, 32, 8, 128)
    q = torch.randn((sh.B, sh.Hq, 1, sh.D), generator=gen, device="cuda", dtype=torch.float16)
    lens = torch.full((sh.B,), T, dtype=torch.int32, device="cuda")
    k16 = rand_blocks("f16", sh.B, sh.Hkv, T, sh.D, gen)
    v16 = rand_blocks("f16", sh.B, sh.Hkv, T, sh.D, gen)
    return sh, q, lens, sdpa_fns(q, k16, v16)["sdpa_fold"], 2 * cache_bytes("f16", sh.B, sh.Hkv, T, sh.D)


def cmd_compare(args, timer) -> list[dict]:
    """The simt kernel (before) against tensor-core variants, same run, same data; fp16 q.

    B=16 at --contexts (32/8 heads, D=128) for polar K+V, polar K + fp16 V, polar3 K+V, then
    B=1 T=32768 eager vs CUDA-graph replay."""
    torch = _torch()
    from cupy_kernels import attention

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(4)
    fmts = [("polar", "polar"), ("polar", "f16"), ("polar3", "polar3")]
    for T in args.contexts:
        sh, q, lens, sdpa, sdpa_bytes = headline_inputs(T, gen)
        r = timer(sdpa)
        base = r["ms"]
        rows.append(timed_row(sh, "sdpa fp16", r, sdpa_bytes))
        print_rows(rows[-1:])
        # the same call replayed from a CUDA graph (as a decode loop runs it, gpu_decode_bench.py): an eager
        # call's host time (Python, argument checks, launches) is hidden behind the timer's L2 flush only up
        # to the flush's length; the graph rows time the kernels alone, SDPA's and ours alike
        base_graph = None
        try:
            g = graph_fn(sdpa)
            rg = timer(g)
            del g
            base_graph = rg["ms"]
            rows.append(timed_row(sh, "sdpa fp16 graph", rg, sdpa_bytes))
            print_rows(rows[-1:])
        except Exception as e:
            failed(args, f"{sh.label} graph capture of sdpa", e)
        del sdpa  # (and the fp16 K/V it holds)
        for kfmt, vfmt in fmts:
            kc = rand_blocks(kfmt, sh.B, sh.Hkv, T, sh.D, gen)
            vc = rand_blocks(vfmt, sh.B, sh.Hkv, T, sh.D, gen)
            nbytes = cache_bytes(kfmt, sh.B, sh.Hkv, T, sh.D) + cache_bytes(vfmt, sh.B, sh.Hkv, T, sh.D)
            names = list(COMPARE_CFGS) if (kfmt, vfmt) != ("polar3", "polar3") else list(COMPARE_CFGS)[:3]
            if T > min(args.contexts):
                names = names[:5]
            for name in names:
                kw = COMPARE_CFGS[name]
                kw = dict(kw or {}) if kw is not None else None
                splits = kw.pop("splits", None) if kw else None
                extra = {}
                if kw and kw.pop("combine", False):
                    extra["out"] = torch.empty((*q.shape[:3], sh.D + 8), dtype=q.dtype, device="cuda")[
                        ..., : sh.D
                    ]
                if kw is None:
                    cfg = attention.SIMT_CONFIG_F16V if vfmt == "f16" else attention.SIMT_CONFIG
                else:
                    if "stages" in kw:  # a shape: its stages are (K, V) slots, one ring
                        kw.setdefault("kvsplit", False)
                    cfg = dataclasses.replace(shape_default(vfmt, sh), **kw)
                    if (
                        mma_occupancy(cfg, kfmt, vfmt)[0] > attention.SMEM_LIMIT
                    ):  # e.g. 16 warps with fp16 V rows
                        print(
                            f"{sh.label} {kfmt}+{vfmt} {name}: does not fit in shared memory, skipped",
                            flush=True,
                        )
                        continue
                try:
                    r = timer(
                        attn_fn(q, kc, vc, lens, kfmt, vfmt, config=cfg, max_len=T, splits=splits, **extra)
                    )
                    # what the call launched (attention() plans it so; cached): key splits, registers,
                    # and whether the kernel wrote the output (one split, contiguous out) or a combine
                    p = attention.plan(sh.B, sh.Hq, sh.Hkv, 1, sh.D, T, kfmt, vfmt, q.dtype, cfg, splits)
                    launched = dict(
                        splits=p.splits, regs=p.regs, direct=attention.writes_out(p, extra.get("out"))
                    )
                except Exception as e:
                    failed(args, f"{sh.label} {kfmt} {name}", e)
                    print(f"{sh.label} {kfmt}+{vfmt} {name}: FAILED {str(e)[:300]}", flush=True)
                    continue
                rows.append(
                    timed_row(
                        sh,
                        f"{kfmt}+{vfmt} {name}",
                        r,
                        nbytes,
                        config=dataclasses.asdict(cfg),
                        pct_copy_rate=100 * nbytes / (r["ms"] * 1e-3) / args.copy_rate,
                        speedup_vs_sdpa=base / r["ms"],
                        **launched,
                    )
                )
                print_rows(rows[-1:])
                if name == "mma default" and base_graph is not None:  # against SDPA's graph (above)
                    try:
                        g = graph_fn(
                            attn_fn(q, kc, vc, lens, kfmt, vfmt, config=cfg, max_len=T, splits=splits)
                        )
                        rg = timer(g)
                        del g
                    except Exception as e:
                        failed(args, f"{sh.label} graph capture of {kfmt} {name}", e)
                        continue
                    rows.append(
                        timed_row(
                            sh,
                            f"{kfmt}+{vfmt} {name} graph",
                            rg,
                            nbytes,
                            config=dataclasses.asdict(cfg),
                            pct_copy_rate=100 * nbytes / (rg["ms"] * 1e-3) / args.copy_rate,
                            speedup_vs_sdpa=base_graph / rg["ms"],
                            vs="sdpa fp16 graph",
                        )
                    )
                    print_rows(rows[-1:])
            del kc, vc
            torch.cuda.empty_cache()
    # batch 1: host overhead vs a CUDA graph of the same call
    for T in (4096, 32768):
        sh = Shape(1, T, 32, 8, 128)
        q = torch.randn((1, 32, 1, 128), generator=gen, device="cuda", dtype=torch.float16)
        lens = torch.full((1,), T, dtype=torch.int32, device="cuda")
        kc = rand_blocks("polar", 1, 8, T, 128, gen)
        vc = rand_blocks("polar", 1, 8, T, 128, gen)
        k16 = rand_blocks("f16", 1, 8, T, 128, gen)
        v16 = rand_blocks("f16", 1, 8, T, 128, gen)
        nbytes = 2 * cache_bytes("polar", 1, 8, T, 128)
        fns = {
            "sdpa fp16 eager": sdpa_fns(q, k16, v16)["sdpa_fold"],
            "polar+polar simt eager": attn_fn(
                q, kc, vc, lens, "polar", "polar", config=attention.SIMT_CONFIG, max_len=T
            ),
            "polar+polar mma eager": attn_fn(q, kc, vc, lens, "polar", "polar", max_len=T),
        }
        for name in list(fns):
            try:
                fns[name.replace("eager", "graph")] = graph_fn(fns[name])
            except Exception as e:
                failed(args, f"graph capture of {name}", e)
        for name, fn in fns.items():
            rows.append(timed_row(sh, name, timer(fn), nbytes))
            print_rows(rows[-1:])
    return rows


def cta_stats(t) -> dict:
    """Summary (us) of one launch's per-CTA stamps (attention.cta_times): from the first CTA's entry."""
    import numpy as np

    t = t[t[:, 3] > 0].astype(np.int64)  # CTAs with keys
    e, iss, qd, tab, loop, wr, sm = (t[:, k] for k in range(7))
    t0 = e.min()
    us = lambda x: float(x) / 1e3  # noqa: E731
    med = lambda x: us(np.median(x))  # noqa: E731
    stamps = np.unique(t[:, :6])
    steps = np.diff(stamps)
    per_sm = np.bincount(sm)
    two = per_sm[sm] >= 2  # CTAs sharing their SM
    return {
        "ctas": len(t),
        "sms": len(np.unique(sm)),
        "max_ctas_per_sm": int(per_sm.max()),
        "entry_last_us": us(e.max() - t0),
        "issue_med_us": med(iss - e),
        "q_med_us": med(qd - iss),
        "table_wait_med_us": med(tab - qd),
        "prologue_med_us": med(tab - e),
        "prologue_max_us": us((tab - e).max()),
        "loop_min_us": us((loop - tab).min()),
        "loop_med_us": med(loop - tab),
        "loop_max_us": us((loop - tab).max()),
        "loop_med_shared_sm_us": med((loop - tab)[two]) if two.any() else None,
        "loop_med_own_sm_us": med((loop - tab)[~two]) if (~two).any() else None,
        "epilogue_med_us": med(wr - loop),
        "epilogue_max_us": us((wr - loop).max()),
        "first_done_us": us(wr.min() - t0),
        "median_done_us": med(wr - t0),
        "span_us": us(wr.max() - t0),
        "tail_us": us(wr.max() - np.median(wr)),
        "timer_step_ns": int(steps[steps > 0].min()) if (steps > 0).any() else 0,
    }


def stamped_launches(fn, p, flush, reps: int):
    """reps launches of fn (plan p, stamped) each after flush(): [(cta_stats, stamps relative to the first
    entry, ns, and the SM)], sorted by span."""
    torch = _torch()
    from cupy_kernels import attention

    out = []
    for _ in range(reps):
        attention.cta_times(p, reset=True)
        flush()
        fn()
        torch.cuda.synchronize()
        t = attention.cta_times(p).astype("int64")
        rel = t.copy()
        ok = t[:, 0] > 0
        base = t[ok, 0].min()
        rel[:, :6] = (t[:, :6] - base) * (t[:, :6] > 0)
        out.append((cta_stats(t), rel.tolist()))
    out.sort(key=lambda x: x[0]["span_us"])
    return out


def print_stamped(label: str, what: str, ms: float, splits: int, st: dict) -> None:
    print(
        f"{label:<24} {what}: {ms * 1e3:7.1f} us timed; {splits} splits, {st['ctas']} CTAs on "
        f"{st['sms']} SMs; "
        f"span {st['span_us']:.1f} us (entries within {st['entry_last_us']:.1f}); prologue "
        f"{st['prologue_med_us']:.1f} (issue {st['issue_med_us']:.1f}, q {st['q_med_us']:.1f}, table wait "
        f"{st['table_wait_med_us']:.1f}; max {st['prologue_max_us']:.1f}), loop {st['loop_min_us']:.1f}/"
        f"{st['loop_med_us']:.1f}/{st['loop_max_us']:.1f} (median sharing an SM "
        f"{st['loop_med_shared_sm_us'] or 0:.1f}, alone {st['loop_med_own_sm_us'] or 0:.1f}), epilogue "
        f"{st['epilogue_med_us']:.1f}; done {st['first_done_us']:.1f}/{st['median_done_us']:.1f}/"
        f"{st['span_us']:.1f} (tail {st['tail_us']:.1f}); timer step {st['timer_step_ns']} ns",
        flush=True,
    )


def headline_plan(sh: Shape, cfg, splits: int | None = None):
    """attention.plan of polar K+V at headline_inputs' shape sh (one float16 query row a head) for cfg."""
    from cupy_kernels import attention

    return attention.plan(
        sh.B, sh.Hq, sh.Hkv, 1, sh.D, sh.T, "polar", "polar", _torch().float16, cfg, splits, 0
    )


def clocks(rows: list, sh, variant: str, fn) -> None:
    """A row of the SM and memory clocks and power while fn runs back to back (clock_samples), printed."""
    c = clock_samples(fn)
    if c is None:
        return
    rows.append({"shape": sh.label, "T": sh.T, "variant": f"{variant} clocks", **c})
    v = {k: "-" if x is None else f"{x:.0f}" for k, x in c.items()}
    print(
        f"{sh.label:<24} {variant} clocks: SM {v['sm_mhz_med']} MHz (min {v['sm_mhz_min']}, "
        f"max {v['sm_mhz_max']}), memory {v['mem_mhz_med']} MHz, {v['power_w_med']} W; "
        f"{c['samples']} samples over {c['calls']} calls",
        flush=True,
    )


def cmd_anatomy(args, timer) -> list[dict]:
    """Where polar K+V's time goes (issue 11: B=16, 32/8 heads, D=128, fp16 q; the default kernel).

    1. SDPA fp16 and the default kernel over --contexts, the L2 flushed by a write (the timer's default:
       the call's first reads also write back dirty lines) and by a read (clean lines, as after a decode
       step's weight reads); a straight line through each series (least squares): its intercept is the
       part that does not grow with the context.
    2. At each context, launches of the same kernel with per-CTA %globaltimer stamps (AttnConfig.cta_times,
       the median launch of --reps): prologue, main loop, epilogue, the spread of the CTAs' starts and
       ends, and the partial kernel's span against the timed call (partial + combine).
    3. At each context, the SM and memory clocks and the power (nvidia-smi, `clock_samples`) while SDPA and
       the default kernel each run back to back for a second: what turns a loop's cycles into time."""
    import numpy as np

    torch = _torch()
    from cupy_kernels import attention

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(5)
    timers = {"write": timer, "read": Timer(timer.reps, timer.warmup, flush="read")}
    cfg = shape_default("polar", MMA_TUNE_SHAPE)  # this GPU's at batch 16 (loop_bound_device)
    cfg_t = dataclasses.replace(cfg, cta_times=True)
    cfg_q = dataclasses.replace(cfg, qstage=False)  # q from global memory (the default before session 19)
    for T in args.contexts:
        sh, q, lens, sdpa, sdpa_bytes = headline_inputs(T, gen)
        base = {}
        for fl, tm in timers.items():
            r = tm(sdpa)
            base[fl] = r["ms"]
            rows.append(timed_row(sh, "sdpa fp16", r, sdpa_bytes, flush=fl))
            print_rows(rows[-1:])
        clocks(rows, sh, "sdpa fp16", sdpa)
        del sdpa
        kc = rand_blocks("polar", sh.B, sh.Hkv, T, sh.D, gen)
        vc = rand_blocks("polar", sh.B, sh.Hkv, T, sh.D, gen)
        nbytes = 2 * cache_bytes("polar", sh.B, sh.Hkv, T, sh.D)
        for name, c in (("default", cfg), ("no-qstage", cfg_q)):
            p = headline_plan(sh, c)
            fn = attn_fn(q, kc, vc, lens, "polar", "polar", config=c, max_len=T)
            for fl, tm in timers.items():
                r = tm(fn)
                rows.append(
                    timed_row(
                        sh,
                        f"polar+polar mma {name}",
                        r,
                        nbytes,
                        flush=fl,
                        pct_copy_rate=100 * nbytes / (r["ms"] * 1e-3) / args.copy_rate,
                        speedup_vs_sdpa=base[fl] / r["ms"],
                        splits=p.splits,
                        regs=p.regs,
                    )
                )
                print_rows(rows[-1:])
            if name == "default":
                clocks(rows, sh, f"polar+polar mma {name}", fn)
        # the stamped kernel: timed like the others (the stamps should cost nothing), then launched --reps
        # times alone after each kind of flush, and the launch of median span kept (its stamps too); at
        # --stamp-splits contexts also with other split counts (more CTAs than slots: the block scheduler
        # fills the SMs that finish first)
        stamped = [("default", cfg_t, None)]
        if T == args.stamp_context:
            stamped += [("default", cfg_t, s) for s in args.stamp_splits]
            stamped += [("no-qstage", dataclasses.replace(cfg_t, qstage=False), None)]
        for name, c, splits in stamped:
            fn = attn_fn(q, kc, vc, lens, "polar", "polar", config=c, max_len=T, splits=splits)
            p = headline_plan(sh, c, splits)
            r = timer(fn)
            for fl, tm in timers.items():
                launches = stamped_launches(fn, p, tm.flush_l2, timer.reps)
                st, stamps = launches[len(launches) // 2]
                rows.append(
                    timed_row(
                        sh,
                        f"polar+polar mma {name}, stamped",
                        r,
                        nbytes,
                        flush=fl,
                        splits=p.splits,
                        regs=p.regs,  # (the split model counts CTAs a SM from them)
                        span_min_us=launches[0][0]["span_us"],
                        span_max_us=launches[-1][0]["span_us"],
                        marks=list(attention.CTA_MARKS),
                        stamps=stamps,
                        **st,
                    )
                )
                print_stamped(sh.label, f"{name} stamped, flush {fl}", r["ms"], p.splits, st)
        del kc, vc, fn
        torch.cuda.empty_cache()
    # the straight lines: time = a + b * T for each series
    for variant in ("sdpa fp16", "polar+polar mma default", "polar+polar mma no-qstage"):
        for fl in timers:
            pts = [(r["T"], r["ms"] * 1e3) for r in rows if r["variant"] == variant and r.get("flush") == fl]
            if len(pts) < 2:
                continue
            x, y = np.array(pts, dtype=float).T
            b, a = np.polyfit(x, y, 1)
            rows.append(
                {
                    "variant": f"{variant} fit",
                    "flush": fl,
                    "contexts": [int(v) for v in x],
                    "intercept_us": float(a),
                    "us_per_32768": float(b * 32768),
                    "max_residual_us": float(np.abs(y - (a + b * x)).max()),
                }
            )
            print(
                f"fit {variant:<24} flush {fl:<5}: {a:6.1f} us + {b * 32768:6.1f} us per 32768 keys "
                f"(max residual {rows[-1]['max_residual_us']:.1f} us)",
                flush=True,
            )
    return rows


def scaling_row(B: int, Hkv: int, T: int, us: float, nbytes: int, copy_rate: float) -> dict:
    """scaling's numbers of one timed call at one key split: its CTAs (one a (sequence, KV head)), the
    nanoseconds a CTA spends on a key, and the call's bytes a second against the copy rate."""
    if B < 1 or Hkv < 1 or T < 1 or us <= 0 or nbytes < 1 or copy_rate <= 0:
        raise ValueError(
            "scaling_row: expected positive B, Hkv, T, us, nbytes, copy_rate, "
            f"got {B}, {Hkv}, {T}, {us}, {nbytes}, {copy_rate}"
        )
    rate = nbytes / (us * 1e-6)
    return {
        "ctas": B * Hkv,
        "us": us,
        "ns_per_key": us * 1e3 / T,
        "GBps": rate / 1e9,
        "pct_copy_rate": 100 * rate / copy_rate,
    }


def scaling_fmts(kfmt: str, vfmt: str, cset: str) -> str:
    """scaling's format key of a row: "K/V" for the default config (what `project --fmts` selects), "K/V+SET"
    for a --config-sets entry SET such as "ctas=2" (its own headroom; `project --config-sets SET` projects
    it)."""
    return f"{kfmt}/{vfmt}" + ("" if cset == "default" else f"+{cset}")


def scaling_clock_variant(variant: str, ctas: int) -> str:
    """The variant name under which scaling samples a timed row's SM clocks (`clocks` adds " clocks"):
    cmd_scaling writes it, scaling_projection looks it up."""
    return f"{variant}, {ctas} CTAs"


def scaling_headroom(rows: list[dict]) -> dict[str, float]:
    """For each format pair and context ("polar/polar @ 65536"): the ns a key with the most CTAs over the ns
    with the fewest, the factor by which a CTA's loop slows when all of them share the memory. 1.0: the
    loop's own speed binds it (faster memory, the H200's, would not help); 1.4: a CTA alone runs 1.4x
    faster than under the full load."""
    out = {}
    for fmts, T in sorted({(r["fmts"], r["T"]) for r in rows}):
        mine = sorted((r for r in rows if (r["fmts"], r["T"]) == (fmts, T)), key=lambda r: r["ctas"])
        if len(mine) >= 2:
            out[f"{fmts} @ {T}"] = mine[-1]["ns_per_key"] / mine[0]["ns_per_key"]
    return out


def cmd_scaling(args, timer) -> list[dict]:
    """What binds the attention loop: the loop alone against the loop under the full memory load.

    The default kernel of each --fmts pair (batch 16's, on this GPU) at one key split (one CTA a (sequence,
    KV head), its whole context in one loop) for each of --batches (B x 8 KV heads: 8 to 128 CTAs, one a SM)
    at each of --contexts, 32/8 heads, D=128, fp16 q. With few CTAs the memory is far from busy and a CTA's
    ns a key is its loop's own speed; with 128 it is what the shared memory leaves. Their ratio
    (scaling_headroom) is how much faster the loop could go on faster memory: what an H100 says about the
    H200. The SM clock is sampled at the fewest and the most CTAs (a lightly loaded GPU may boost higher).
    --config-sets: each shape with each set of changes to the default config ("default": none; "ctas=2"),
    one after the other on the same data, as format pair "K/V+SET"."""
    torch = _torch()
    from cupy_kernels import attention

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(6)
    for T, (kfmt, vfmt), B in itertools.product(args.contexts, args.fmts, sorted(args.batches)):
        sh = Shape(B, T, 32, 8, 128)
        q = torch.randn((B, sh.Hq, 1, sh.D), generator=gen, device="cuda", dtype=torch.float16)
        lens = torch.full((B,), T, dtype=torch.int32, device="cuda")
        kc = rand_blocks(kfmt, B, sh.Hkv, T, sh.D, gen)
        vc = rand_blocks(vfmt, B, sh.Hkv, T, sh.D, gen)
        nbytes = cache_bytes(kfmt, B, sh.Hkv, T, sh.D) + cache_bytes(vfmt, B, sh.Hkv, T, sh.D)
        for cset, changes in args.config_sets:  # each set on the same data, one after the other
            fmts = scaling_fmts(kfmt, vfmt, cset)
            cfg = dataclasses.replace(shape_default(vfmt, MMA_TUNE_SHAPE), **changes)  # (batch 16's)
            try:
                fn = attn_fn(q, kc, vc, lens, kfmt, vfmt, config=cfg, max_len=T, splits=1)
                p = attention.plan(B, sh.Hq, sh.Hkv, 1, sh.D, T, kfmt, vfmt, q.dtype, cfg, 1)
                r = timer(fn)
            except Exception as e:
                failed(args, f"scaling {sh.label} {fmts}", e)
                continue
            row = timed_row(
                sh,
                f"{kfmt}+{vfmt} mma {cset}, 1 split",
                r,
                nbytes,
                fmts=fmts,
                splits=p.splits,
                regs=p.regs,
                **scaling_row(B, sh.Hkv, T, r["ms"] * 1e3, nbytes, args.copy_rate),
            )
            rows.append(row)
            print(
                f"{sh.label:<24} {fmts:<19} {row['ctas']:4d} CTAs  {row['us']:9.1f} us  "
                f"{row['ns_per_key']:6.2f} ns a key a CTA  {row['GBps']:7.0f} GB/s  "
                f"{row['pct_copy_rate']:4.0f}% of copy",
                flush=True,
            )
            if B in (min(args.batches), max(args.batches)):
                clocks(rows, sh, scaling_clock_variant(row["variant"], row["ctas"]), fn)
            del fn
        del kc, vc
        torch.cuda.empty_cache()
    for fmts, h in scaling_headroom([r for r in rows if "ns_per_key" in r]).items():
        rows.append({"variant": f"{fmts} headroom", "headroom": h})
        print(f"headroom {fmts}: a CTA's loop {h:.2f}x faster alone than under the full load", flush=True)
    return rows


def scaling_projection(
    rows: list[dict],
    copy_Bps: float,
    sdpa_us: float,
    target_ratio: float = 3.0,
    wavefronts_per_key: float | None = None,
    context: int | None = None,
    fmts_pairs: list[str] | None = None,
) -> list[dict]:
    """What a scaling run on one GPU says about another with a faster memory (copy_Bps, its measured copy
    rate) where fp16 SDPA takes sdpa_us: for each format pair and context, the call's time there is at
    least its loop's (the fastest call below the most CTAs: a CTA alone, at the light-load SM clock of
    the fewest CTAs) and at least the full load's bytes at copy_Bps; the loop's time also at the SM clock
    the full load held (it may drop under load). Their larger one gives the projected ratio to SDPA (a
    range over the two clocks), and the loop's speed-up that target_ratio needs. Only the rows at context
    and of fmts_pairs (K/V names) where given: sdpa_us and wavefronts_per_key are one shape's and one
    kernel's. With wavefronts_per_key (shared-memory wavefronts a key of the loop's SASS, sass_order.py):
    the loop's SM cycles a key and the share of the shared-memory pipe's rate it runs at."""
    if copy_Bps <= 0 or sdpa_us <= 0 or target_ratio <= 0:
        raise ValueError(
            "scaling_projection: expected positive copy_Bps, sdpa_us, target_ratio, "
            f"got {copy_Bps}, {sdpa_us}, {target_ratio}"
        )
    timed = [r for r in rows if "ns_per_key" in r and (context is None or r["T"] == context)]
    if fmts_pairs is not None:
        timed = [r for r in timed if r["fmts"] in fmts_pairs]
    if not timed:
        raise ValueError(
            f"scaling_projection: expected timed rows for {fmts_pairs or 'any format'} at "
            f"{context or 'any context'}, got none of {len(rows)} rows"
        )
    clock = {
        (r["T"], r["variant"].removesuffix(" clocks")): r.get("sm_mhz_med")
        for r in rows
        if r.get("variant", "").endswith(" clocks")
    }
    out = []
    for fmts, T in sorted({(r["fmts"], r["T"]) for r in timed}):
        mine = sorted((r for r in timed if (r["fmts"], r["T"]) == (fmts, T)), key=lambda r: r["ctas"])
        if len(mine) < 2:
            raise ValueError(
                f"scaling_projection: {fmts} @ {T}: expected rows at 2 or more CTA counts, got 1"
            )
        full = mine[-1]
        alone = min(mine[:-1], key=lambda r: r["us"])
        light = clock.get((T, scaling_clock_variant(mine[0]["variant"], mine[0]["ctas"])))
        loaded = clock.get((T, scaling_clock_variant(full["variant"], full["ctas"])))
        if not light or not loaded:
            raise ValueError(
                f"scaling_projection: {fmts} @ {T}: expected SM clock rows at {mine[0]['ctas']} and "
                f"{full['ctas']} CTAs (scaling samples them), got {light} and {loaded}"
            )
        loop_us = alone["us"]
        loop_us_loaded = loop_us * light / loaded
        memory_us = full["bytes"] / copy_Bps * 1e6
        best, worst = max(loop_us, memory_us), max(loop_us_loaded, memory_us)
        row = {
            "fmts": fmts,
            "T": T,
            "full_ctas": full["ctas"],
            "alone_ctas": alone["ctas"],
            "alone_ns_per_key": alone["ns_per_key"],
            "sm_mhz_light": light,
            "sm_mhz_full": loaded,
            "loop_us": loop_us,
            "loop_us_full_load_clock": loop_us_loaded,
            "memory_us": memory_us,
            "projected_us": [best, worst],
            "ratio_to_sdpa": [sdpa_us / best, sdpa_us / worst],
            "bound": "loop" if loop_us_loaded > memory_us else "memory",
            "target_ratio": target_ratio,
            # None where the bytes alone take longer than the target allows: no loop reaches it
            "loop_speedup_needed": None
            if memory_us * target_ratio > sdpa_us
            else [
                max(1.0, loop_us * target_ratio / sdpa_us),
                max(1.0, loop_us_loaded * target_ratio / sdpa_us),
            ],
            "cycles_per_key": alone["ns_per_key"] * light / 1e3,
        }
        if wavefronts_per_key is not None:
            row["wavefronts_per_key"] = wavefronts_per_key
            row["pct_smem_rate"] = 100 * wavefronts_per_key / row["cycles_per_key"]
        out.append(row)
    return out


def cmd_project(args) -> list[dict]:
    """bench_gpu.py project --from SCALING.json --copy-gbps G --sdpa-us U: scaling_projection of a scaling
    run's rows, printed (no GPU needed)."""
    try:
        data = json.loads(Path(args.from_json).read_text())
        rows = data["scaling"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(
            f"bench_gpu project: expected --from a JSON of `bench_gpu.py scaling --json` (a 'scaling' list), "
            f"got {args.from_json}: {type(e).__name__}: {e}"
        ) from None
    fmts = [scaling_fmts(k, v, c) for k, v in args.fmts for c, _ in args.config_sets]
    try:
        out = scaling_projection(
            rows,
            args.copy_gbps * 1e9,
            args.sdpa_us,
            args.target_ratio,
            args.wavefronts_per_key,
            args.context,
            fmts,
        )
    except ValueError as e:
        raise SystemExit(f"bench_gpu project: {e}") from None
    dev, there = data.get("device", {}).get("name", "?"), data.get("copy_rate_Bps", 0) / 1e9
    print(
        f"from {args.from_json} ({dev}, copy {there:.0f} GB/s there) to a GPU "
        f"with copy {args.copy_gbps:.0f} GB/s and fp16 SDPA {args.sdpa_us:.1f} us:"
    )
    for r in out:
        lo, hi = r["projected_us"]
        rb, rw = r["ratio_to_sdpa"]
        need = r["loop_speedup_needed"]
        goal = f"{r['target_ratio']:.2f}x " + (
            f"needs the loop {100 * (need[0] - 1):.1f}-{100 * (need[1] - 1):.1f} % faster"
            if need
            else "is out of the loop's reach (the bytes alone take longer)"
        )
        line = (
            f"{r['fmts']:<14} @ {r['T']:>6}: loop {r['loop_us']:.1f} us ({r['alone_ctas']} CTAs, "
            f"{r['alone_ns_per_key']:.2f} ns a key = {r['cycles_per_key']:.2f} SM cycles at "
            f"{r['sm_mhz_light']:.0f} MHz), "
            f"{r['loop_us_full_load_clock']:.1f} us at the full load's {r['sm_mhz_full']:.0f} MHz; "
            f"bytes {r['memory_us']:.1f} us -> {lo:.1f}-{hi:.1f} us, {rw:.2f}-{rb:.2f}x SDPA "
            f"({r['bound']}-bound); "
            f"{goal}"
        )
        if "pct_smem_rate" in r:
            line += (
                f"; {r['wavefronts_per_key']:.2f} wavefronts a key = {r['pct_smem_rate']:.0f} % of the "
                "shared-memory rate"
            )
        print(line, flush=True)
    return out


def cmd_small(args, timer) -> list[dict]:
    """Small shapes: simt vs mma, eager vs CUDA-graph replay (host time vs kernel time), split counts."""
    torch = _torch()
    from cupy_kernels import attention

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(5)
    for sh in (Shape(16, 4096, 32, 8, 128), Shape(16, 16384, 9, 3, 64), Shape(1, 4096, 9, 3, 64)):
        q = torch.randn((sh.B, sh.Hq, 1, sh.D), generator=gen, device="cuda", dtype=torch.float16)
        lens = torch.full((sh.B,), sh.T, dtype=torch.int32, device="cuda")
        kc = rand_blocks("polar", sh.B, sh.Hkv, sh.T, sh.D, gen)
        vc = rand_blocks("polar", sh.B, sh.Hkv, sh.T, sh.D, gen)
        nbytes = 2 * cache_bytes("polar", sh.B, sh.Hkv, sh.T, sh.D)
        fns = {
            "simt": attn_fn(q, kc, vc, lens, "polar", "polar", config=attention.SIMT_CONFIG, max_len=sh.T),
            "mma": attn_fn(q, kc, vc, lens, "polar", "polar", max_len=sh.T),
        }
        for sp in (1, 2, 4, 8, 16, 32):
            fns[f"mma splits{sp}"] = attn_fn(q, kc, vc, lens, "polar", "polar", max_len=sh.T, splits=sp)
        for name in ("simt", "mma", "mma splits8"):
            try:
                fns[name + " graph"] = graph_fn(fns[name])
            except Exception as e:
                failed(args, f"graph capture of {name}", e)
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(50):
                fn()
            host_us = (time.perf_counter() - t0) / 50 * 1e6
            torch.cuda.synchronize()
            r = timer(fn)
            rows.append(
                {
                    "shape": sh.label,
                    **dataclasses.asdict(sh),
                    "variant": name,
                    **r,
                    "bytes": nbytes,
                    "GBps": nbytes / r["ms"] / 1e6,
                    "host_us_per_call": host_us,
                }
            )
            print(
                f"{sh.label:<24} {name:<18} {r['ms'] * 1e3:8.1f} us   host {host_us:6.1f} us/call", flush=True
            )
    return rows


def _encode_variant_names(args) -> list[str]:
    from cupy_kernels import codec

    want = list(codec.ENCODE_VARIANTS) if "all" in args.variants else args.variants
    bad = [v for v in want if v not in codec.ENCODE_VARIANTS]
    if bad:
        raise SystemExit(
            f"unknown encoder variants {bad}: choose from {list(codec.ENCODE_VARIANTS)} or 'all'"
        )
    return ["base", *dict.fromkeys(v for v in want if v != "base")]


def _hard_encode_inputs(torch) -> dict[str, object]:
    """The parity tests' blocks (tests/blocks.py: zeros, tiny/huge, NaN/inf, subnormals, random
    bits, fp16 grid, ...), 4096 blocks of each kind, as one float32 CUDA tensor per kind."""
    import zlib

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import blocks

    return {
        k: torch.from_numpy(blocks.rows(k, 4096, np.random.default_rng(zlib.crc32(k.encode())))).cuda()
        for k in blocks.KINDS
    }


def _bytes_mismatch(got, want) -> str | None:
    """None if the two (..., type_size) uint8 tensors are equal, else where they differ."""
    torch = _torch()
    if torch.equal(got, want):
        return None
    got, want = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
    bad = (got != want).any(1).nonzero().flatten()
    i = int(bad[0])
    first = f"first {i}: {got[i].tolist()} != base {want[i].tolist()}"
    return f"{len(bad)} of {got.shape[0]} blocks differ; {first}"


def cmd_encode_variants(args, timer) -> list[dict]:
    """Each encoder variant (cupy_kernels.codec.ENCODE_VARIANTS) against "base": M blocks/s on the
    encode benchmark's input (64 Mi values, polar and polar3 from float16 and float32), and its
    bytes compared with base's on that input and on the hard
    inputs of the parity tests (float32 and float16). A difference is a failure (exit status 1)."""
    torch = _torch()
    from cupy_kernels import codec

    names = _encode_variant_names(args)
    t0 = time.time()
    # one module per variant's #defines, compiled in threads (NVRTC may run them in parallel;
    # if anything goes wrong there, the loop below compiles them one by one)
    first = {codec.ENCODE_VARIANTS[v].defines: v for v in reversed(names)}
    try:
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(len(first)) as ex:
            list(ex.map(lambda v: codec._variant_kernel(v, "polar", "f16"), first.values()))
    except Exception as e:  # any failure: the serial loop below compiles and reports it
        print(f"compiling the variant modules in threads failed ({type(e).__name__}: {e})", flush=True)
    for fmt in ("polar", "polar3"):  # compile every module first: outside the timings
        for dt in (torch.float16, torch.float32):
            for v in names:
                codec.encode(torch.zeros((1, 64), device="cuda", dtype=dt), fmt, variant=v)
    torch.cuda.synchronize()
    print(f"encoder variants {names}: compiled in {time.time() - t0:.1f} s", flush=True)

    mismatches = []
    n_bad = dict.fromkeys(names, 0)

    def check(label: str, v: str, got, want) -> bool:
        msg = _bytes_mismatch(got, want)
        if msg:
            mismatches.append(f"{label} [{v}]: {msg}")
            n_bad[v] += 1
            if n_bad[v] <= 3:  # the first few in full; all of them in the json's failures
                print(f"BYTES DIFFER: {label} [{v}]: {msg}", file=sys.stderr, flush=True)
        return msg is None

    hard = _hard_encode_inputs(torch)
    hard_ok = {v: True for v in names}
    for fmt in ("polar", "polar3"):
        for dt in (torch.float32, torch.float16):
            for kind, x in hard.items():
                xt = x.to(dt)
                want = codec.encode(xt, fmt, variant="base")
                for v in names[1:]:
                    ok = check(
                        f"hard {kind} {fmt} from {str(dt).split('.')[-1]}",
                        v,
                        codec.encode(xt, fmt, variant=v),
                        want,
                    )
                    hard_ok[v] &= ok
    print(
        f"hard inputs ({len(hard)} kinds x 4096 blocks): "
        + ", ".join(f"{v} {'equal' if hard_ok[v] else 'DIFFER'}" for v in names[1:]),
        flush=True,
    )

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(3)
    n = 1 << 26  # 64 Mi values, as cmd_encode
    for dtype in (torch.float16, torch.float32):
        x = torch.randn((n // 128, 128), generator=gen, device="cuda").to(dtype)
        dname = str(dtype).split(".")[-1]
        for fmt in ("polar", "polar3"):
            want = codec.encode(x, fmt, variant="base")
            base = None
            for v in names:
                equal = v == "base" or check(
                    f"bench input {fmt} from {dname}", v, codec.encode(x, fmt, variant=v), want
                )
                r = timer(lambda x=x, fmt=fmt, v=v: codec.encode(x, fmt, variant=v))
                mbs = n / 64 / r["ms"] / 1e3
                base = mbs if base is None else base
                rows.append(
                    {
                        "variant": f"encode {fmt} from {dname} [{v}]",
                        "encoder_variant": v,
                        "fmt": fmt,
                        "dtype": dname,
                        **r,
                        "Mblocks_per_s": mbs,
                        "vs_base": mbs / base,
                        "bytes_equal_bench_input": equal,
                        "bytes_equal_hard_inputs": hard_ok[v],
                    }
                )
                print(
                    f"encode {fmt:<6} from {dname:<7} {v:<16} {r['ms']:7.3f} ms  {mbs:6.0f} M blocks/s  "
                    f"x{mbs / base:.3f}  bytes {'equal' if equal and hard_ok[v] else 'DIFFER'}",
                    flush=True,
                )
            # base again, last: how far the clocks drifted over the variants
            r = timer(lambda x=x, fmt=fmt: codec.encode(x, fmt, variant="base"))
            mbs = n / 64 / r["ms"] / 1e3
            rows.append(
                {
                    "variant": f"encode {fmt} from {dname} [base, again]",
                    "encoder_variant": "base-again",
                    "fmt": fmt,
                    "dtype": dname,
                    **r,
                    "Mblocks_per_s": mbs,
                    "vs_base": mbs / base,
                }
            )
            print(
                f"encode {fmt:<6} from {dname:<7} {'base (again)':<16} {r['ms']:7.3f} ms  "
                f"{mbs:6.0f} M blocks/s  x{mbs / base:.3f}",
                flush=True,
            )
        del x
    cols = [(f, d) for d in ("float16", "float32") for f in ("polar", "polar3")]
    print("\nM blocks/s (x base)     " + "".join(f"{f + ' ' + d:>22}" for f, d in cols) + "  bytes")
    for v in [*names, "base-again"]:
        got = {(r["fmt"], r["dtype"]): r for r in rows if r["encoder_variant"] == v}
        cells = "".join(
            f"{got[c]['Mblocks_per_s']:>13.0f} (x{got[c]['vs_base']:.3f})" if c in got else f"{'-':>22}"
            for c in cols
        )
        bytes_ok = "" if v == "base-again" else ("equal" if n_bad[v] == 0 else f"DIFFER ({n_bad[v]} cases)")
        print(f"{v:<23} {cells}  {bytes_ok}", flush=True)
    if mismatches:
        args.failures.extend(mismatches)
        print(f"ENCODER VARIANTS WRITE OTHER BYTES ({len(mismatches)} cases)", file=sys.stderr, flush=True)
    return rows


def cmd_encode(args, timer) -> list[dict]:
    torch = _torch()
    from cupy_kernels import codec

    if args.variants:
        return cmd_encode_variants(args, timer)
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(3)
    n = 1 << 26  # 64 Mi values
    for dtype in (torch.float16, torch.float32):
        x = torch.randn((n // 128, 128), generator=gen, device="cuda").to(dtype)
        for fmt in ("polar", "polar3"):
            r = timer(lambda x=x, fmt=fmt: codec.encode(x, fmt))
            nbytes = x.numel() * x.element_size()
            rows.append(
                {
                    "variant": f"encode {fmt} from {str(dtype).split('.')[-1]}",
                    **r,
                    "bytes": nbytes,
                    "GBps": nbytes / r["ms"] / 1e6,
                    "Mblocks_per_s": n / 64 / r["ms"] / 1e3,
                }
            )
            print(
                f"{rows[-1]['variant']:<28} {r['ms']:8.2f} ms  {rows[-1]['GBps']:7.1f} GB/s of input  "
                f"{rows[-1]['Mblocks_per_s']:.0f} M blocks/s",
                flush=True,
            )
        del x
    blocks = codec.encode(torch.randn((n // 128, 128), generator=gen, device="cuda"), "polar")
    r = timer(lambda: codec.decode(blocks, "polar", torch.float16))
    rows.append(
        {
            "variant": "decode polar to f16",
            **r,
            "bytes": blocks.numel() + n * 2,
            "GBps": (blocks.numel() + n * 2) / r["ms"] / 1e6,
        }
    )
    print(f"{'decode polar to f16':<28} {r['ms']:8.2f} ms  {rows[-1]['GBps']:7.1f} GB/s (read + written)")
    return rows


LATENCY_BLOCKS = (3, 4, 8, 132, 528)  # SmolLM2's and Qwen2.5's K of a decode step, 8, one and four a SM
LATENCY_LAUNCHES = 64  # launches captured back to back into one CUDA graph


def cmd_encode_latency(args, timer) -> list[dict]:
    """Each kernel of the encoder's latency path (cupy_kernels.codec.CTA_VARIANTS: one CTA of 16 warps a
    block, the shape of ggml-cuda's SET_ROWS and layer launch in a decode step) on a few blocks of float32:
    us a launch, from LATENCY_LAUNCHES launches in one CUDA graph (so that the host's launch cost does not
    hide the kernel's latency). The bytes of every variant are checked against the default's first."""
    torch = _torch()
    from cupy_kernels import codec

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(5)
    for fmt in ("polar", "polar3"):
        for nb in LATENCY_BLOCKS:
            x = torch.randn((1, 1, nb, 64), generator=gen, device="cuda")
            ts = codec.get_format(fmt).type_size
            want = codec.encode(x, fmt, "cta")
            for v in codec.CTA_VARIANTS:
                cache = torch.zeros((1, 1, nb, 1, ts), dtype=torch.uint8, device="cuda")
                codec.encode_into(x, cache, fmt, 0, "cta", cta_variant=v)
                if not torch.equal(cache.reshape(want.shape), want):
                    args.failures.append(
                        f"encode-latency {fmt} {nb} blocks [{v}]: bytes differ from the default's"
                    )
                    continue

                def launches(x=x, cache=cache, fmt=fmt, v=v):
                    for _ in range(LATENCY_LAUNCHES):
                        codec.encode_into(x, cache, fmt, 0, "cta", cta_variant=v)

                r = timer(graph_fn(launches))
                us = r["ms"] * 1e3 / LATENCY_LAUNCHES
                rows.append(
                    {
                        "variant": f"encode-latency {fmt} {nb} blocks [{v}]",
                        "fmt": fmt,
                        "blocks": nb,
                        "cta_variant": v,
                        **r,
                        "us_per_launch": us,
                    }
                )
                # the default is CTA_VARIANTS' first; its row is missing only if its own bytes failed above
                base = next((row for row in rows if row["fmt"] == fmt and row["blocks"] == nb), None)
                ratio = ""
                if base is not None and base["cta_variant"] == next(iter(codec.CTA_VARIANTS)):
                    rows[-1]["vs_default"] = us / base["us_per_launch"]
                    ratio = f" ({rows[-1]['vs_default']:.3f}x the default's)"
                line = f"encode-latency {fmt:<6} {nb:4d} blocks {v:<9} {us:7.2f} us a launch"
                print(line + ratio, flush=True)
    return rows


def cmd_copy(args, timer) -> list[dict]:
    """Device-to-device copy of 1 GiB: the bandwidth every percentage of this run is taken against."""
    torch = _torch()
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    r = timer(lambda: b.copy_(a))
    rate = 2 * a.numel() / r["ms"] / 1e6
    print(f"device copy 1 GiB: {r['ms']:.3f} ms = {rate:.0f} GB/s (read + written)")
    from cupy_kernels import attention, loader

    feed = loader.memory_bytes_per_sm_cycle(0)  # (the device's attributes: what the default rests on)
    label = mma_label(shape_default("polar", MMA_TUNE_SHAPE))
    print(
        f"memory feeds {feed if feed is None else round(feed, 1)} bytes a SM cycle (loop-bound above "
        f"{attention.LOOP_BOUND_BYTES}): polar K+V's default at head size 128 is {label}"
    )
    a = b = None
    torch.cuda.empty_cache()
    return [{"variant": "copy 1GiB", **r, "GBps": rate}]


def cmd_profile(args, timer) -> list[dict]:
    """Runs the default attention kernels, untimed, for a profiler (Nsight Compute) to pick up:
    B=16, 32/8 heads, D=128, first of --contexts, polar K+V then polar K + fp16 V, --reps calls each.

        ncu --clock-control none -k regex:polar_attn -s 5 -c 1 python scripts/bench_gpu.py profile
    """
    torch = _torch()
    gen = torch.Generator(device="cuda").manual_seed(4)
    T = args.contexts[0]
    sh = Shape(16, T, 32, 8, 128)
    q = torch.randn((sh.B, sh.Hq, 1, sh.D), generator=gen, device="cuda", dtype=torch.float16)
    lens = torch.full((sh.B,), T, dtype=torch.int32, device="cuda")
    rows = []
    for kfmt, vfmt in (("polar", "polar"), ("polar", "f16")):
        kc = rand_blocks(kfmt, sh.B, sh.Hkv, T, sh.D, gen)
        vc = rand_blocks(vfmt, sh.B, sh.Hkv, T, sh.D, gen)
        fn = attn_fn(q, kc, vc, lens, kfmt, vfmt, max_len=T)
        for _ in range(args.reps):
            fn()
        torch.cuda.synchronize()
        rows.append({"shape": sh.label, "variant": f"{kfmt}+{vfmt} default (profiled)", "calls": args.reps})
        print(f"{sh.label} {kfmt}+{vfmt}: {args.reps} calls", flush=True)
    return rows


def fmt_pair(text: str) -> tuple[str, str]:
    """'polar3/polar3' -> ("polar3", "polar3"): a K format of the kernels and a V format or f16."""
    from cupy_kernels import formats

    k, _, v = text.partition("/")
    known = formats.BUILTIN
    if k not in known or v not in (*known, "f16"):
        raise argparse.ArgumentTypeError(
            f"expected K/V with K in {', '.join(known)} and V in {', '.join((*known, 'f16'))}, got {text!r}"
        )
    return k, v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "cmd",
        nargs="?",
        choices=[
            "attn",
            "tune",
            "tune-mma",
            "kmode",
            "encode",
            "encode-latency",
            "copy",
            "compare",
            "anatomy",
            "scaling",
            "project",
            "small",
            "profile",
            "all",
        ],
    )
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument(
        "--stamp-splits", type=int, nargs="*", default=[4, 8], help="anatomy: split counts stamped too"
    )
    ap.add_argument("--stamp-context", type=int, default=32768, help="anatomy: ... at this context")
    ap.add_argument("--no-dequant", dest="dequant", action="store_false", help="skip dequantize+SDPA")
    ap.add_argument("--quick", action="store_true", help="tune: a small grid")
    ap.add_argument("--tuned", action="store_true", help="attn: tune the kernel shape first")
    ap.add_argument(
        "--variants",
        nargs="+",
        metavar="V",
        help="encode: measure these encoder variants (cupy_kernels.codec.ENCODE_VARIANTS, or 'all') "
        "against 'base' and check that their bytes are the same",
    )
    ap.add_argument(
        "--fmts",
        nargs="+",
        type=fmt_pair,
        default=list(MMA_TUNE_FMTS),
        metavar="K/V",
        help="tune-mma: these K/V format pairs (default: polar/polar polar/f16)",
    )
    ap.add_argument(
        "--phases",
        nargs="+",
        choices=["options", "shapes", "new", "ctas", "depth"],
        default=list(MMA_TUNE_PHASES),
        help="tune-mma: these parts of the grid (tune_mma_grid)",
    )
    ap.add_argument(
        "--tune-shape",
        nargs=5,
        type=int,
        metavar=("B", "T", "HQ", "HKV", "D"),
        help="tune-mma: time the grid at this shape (then T=131072) instead of 16 32768 32 8 128",
    )
    ap.add_argument(
        "--graph",
        action="store_true",
        help="tune-mma: time each call replayed from a CUDA graph (small shapes are host-bound eagerly)",
    )
    ap.add_argument(
        "--config-sets",
        nargs="+",
        type=config_set,
        default=[config_set("default")],
        metavar="SET",
        help="scaling: time each format's default config with each of these AttnConfig changes on the same "
        "data, 'default' (none) or FIELD=INT[,FIELD=INT...]; project: project those rows",
    )
    ap.add_argument("--from", dest="from_json", help="project: a `scaling --json` file")
    ap.add_argument("--context", type=int, help="project: the context (keys) --sdpa-us was timed at")
    ap.add_argument("--copy-gbps", type=float, help="project: the other GPU's measured copy rate, GB/s")
    ap.add_argument("--sdpa-us", type=float, help="project: fp16 SDPA's time there at the same shape, us")
    ap.add_argument("--target-ratio", type=float, default=3.0, help="project: the ratio to SDPA aimed at")
    ap.add_argument(
        "--wavefronts-per-key",
        type=float,
        help="project: the loop's shared-memory wavefronts a key (sass_order.py --loops --per 64)",
    )
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if args.cmd is None:
        ap.print_help()
        return 0
    if args.cmd == "project":  # arithmetic on a scaling run's JSON: no GPU
        if not args.from_json or args.copy_gbps is None or args.sdpa_us is None or args.context is None:
            ap.error("project: expected --from, --context, --copy-gbps and --sdpa-us")
        if args.wavefronts_per_key is not None and len(args.fmts) * len(args.config_sets) != 1:
            ap.error(
                "project: --wavefronts-per-key is one kernel's: expected one --fmts pair and one "
                f"--config-sets, got {len(args.fmts)} and {len(args.config_sets)}"
            )
        out = {"argv": sys.argv, "project": cmd_project(args)}
        if args.json:
            atomic_write_text(Path(args.json), json.dumps(out, indent=1) + "\n", mkdir=True)
        return 0
    args.tune_grid = [
        (4, 1, 3, 16),
        (4, 1, 2, 16),
        (4, 2, 2, 16),
        (4, 1, 2, 8),
        (4, 2, 2, 8),
        (8, 1, 2, 8),
        (2, 2, 3, 16),
        (2, 1, 4, 16),
    ]  # (warps, keys per thread, stages, table copies)
    args.best = {}
    args.failures = []
    args.tune_splits = [] if args.quick else [32, 64]
    if args.quick:
        args.tune_grid = args.tune_grid[:3]
    timer = Timer(args.reps, args.warmup)
    out = {
        "device": device_info(),
        "argv": sys.argv,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "failures": args.failures,
    }
    cmds = ["encode", "kmode", "tune", "attn"] if args.cmd == "all" else [args.cmd]
    # every bandwidth percentage is against the copy rate measured here, in the same run
    out["copy"] = cmd_copy(args, timer)
    args.copy_rate = out["copy"][0]["GBps"] * 1e9
    out["copy_rate_Bps"] = args.copy_rate
    cmds = [c for c in cmds if c != "copy"]
    if args.cmd == "attn" and args.tuned:  # kernel shapes picked by a quick tune first
        args.tune_splits = []
        cmd_tune(args, timer)
    for c in cmds:
        t0 = time.time()
        out[c] = globals()[f"cmd_{c.replace('-', '_')}"](args, timer)
        if c == "tune":
            out["chosen_configs"] = {f"{k[0]}+{k[1]}": dataclasses.asdict(v[0]) for k, v in args.best.items()}
        log.info("%s took %.1f s", c, time.time() - t0)
        if args.json:  # write as we go: a run cut short keeps what it measured
            atomic_write_text(Path(args.json), json.dumps(out, indent=1) + "\n", mkdir=True)
    if args.failures:
        print(f"{len(args.failures)} measurements failed:", *args.failures, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
