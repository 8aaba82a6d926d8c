"""Split-K decode attention over polar / polar3 / paper-B caches against a float32 torch
reference on the dequantized cache; plus CPU tests of the paper-B block reference.

Tolerance: max |out - ref| / max |ref| per case. Measured on an NVIDIA H100 80GB HBM3
(docs/gpu/attn_errors_h100.jsonl, 2 seeds x every case below): see ATTN_TOL.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import bench_gpu
import check_kernels
from conftest import _missing
from cupy_kernels import attention as attn
from cupy_kernels import codec as gpu_codec
from cupy_kernels import formats, loader
from study import paperb_kernel_ref as pb

# float32 q/out: max over 2 seeds x 169 cases on an H100 was 1.7e-6 (docs/gpu/attn_errors_h100.jsonl):
# float32 accumulation in another order than the reference, exp2f. float16 / bfloat16 q and out:
# 2.2e-4 / 3.4e-3 (output rounding). The tensor-core kernel (impl "mma") with prec "fp32" (fp16 hi + lo
# operands, float32 accumulation) is held to the same ATTN_TOL; with prec "fp16" (one fp16 product,
# the default for float16/bfloat16 q) to FP16_PREC_TOL. Measured on the H100 (attn_errors_h100.jsonl):
# mma "fp32" max 1.9e-6 over 137 float32 cases; mma "fp16" on float32 q max 1.4e-3 over 44 cases.
ATTN_TOL = 1e-5
HALF_TOL = {"float16": 2e-3, "bfloat16": 1e-2}
FP16_PREC_TOL = 2e-3


# ---- CPU: paper-B reference ------------------------------------------------------------------


def test_paperb_layout_and_tables():
    cx, cy = pb.tables()
    assert cx.dtype == np.float32 and cx.shape == (256,)
    k = np.arange(256) & 15
    assert np.allclose(np.hypot(cx, cy), k / 15, atol=1e-6)
    x = np.zeros((2, 64), np.float32)
    b = pb.quantize_blocks(x)
    assert b.shape == (2, 34) and not b.any()
    assert not pb.dequantize_blocks(b).any()


def test_paperb_matches_study_module():
    from study import paper_b as study

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 40, 128)) * np.exp(rng.standard_normal((3, 40, 1)))).astype(np.float32)
    ref = study.roundtrip(x, pb.study_config())
    got = pb.dequantize_blocks(pb.quantize_blocks(x.reshape(-1, 64))).reshape(x.shape)
    assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()


def test_paperb_codes():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 64)).astype(np.float32)
    b = pb.quantize_blocks(x)
    d = b[:, :2].copy().view(np.float16)[:, 0].astype(np.float64)
    r = np.hypot(x[:, 0::2], x[:, 1::2])
    assert (d >= r.max(1)).all()  # fp16 ceiling of the block radius
    y = pb.dequantize_blocks(b)
    # radius error <= half a level, angle error <= half a cell
    rr = np.hypot(y[:, 0::2], y[:, 1::2])
    assert (np.abs(rr - r) <= d[:, None] / 30 * (1 + 1e-5) + 1e-6).all()
    with pytest.raises(ValueError, match="shape"):
        pb.quantize_blocks(np.zeros((3, 32)))


def test_paperb_kernel_format():
    """The research side registers paper B with the kernels (cupy_kernels.formats)."""
    fmt = pb.register_kernel_format()
    assert formats.get("paperb") is fmt and pb.register_kernel_format() is fmt
    assert (fmt.kernel_id, fmt.type_size, fmt.ncodes, fmt.angle_lut) == (0, 34, 256, True)
    assert np.array_equal(fmt.cx, pb.tables()[0])
    assert formats.type_size("polar") == 34 and not formats.get("polar").angle_lut
    with pytest.raises(ValueError, match="another definition"):
        formats.register_format("paperb", "polar", fmt.cy, fmt.cx, angle_lut=True)
    with pytest.raises(ValueError, match="built-in"):
        formats.register_format("polar", "polar", fmt.cx, fmt.cy)


def test_attention_reference_cpu():
    torch = pytest.importorskip("torch")
    from gpu_reference import attention_reference

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 3, 64, generator=g)
    k = torch.randn(2, 2, 10, 64, generator=g)
    v = torch.randn(2, 2, 10, 64, generator=g)
    lens = torch.tensor([10, 6], dtype=torch.int32)
    out = attention_reference(q, k, v, lens)
    # row tq of sequence b sees keys 0 .. lens[b] - 3 + tq
    b, h, t = 1, 3, 1
    n = 6 - 3 + t + 1
    s = (q[b, h] @ k[b, h // 2, :n].T)[t] / 8
    want = torch.softmax(s, 0) @ v[b, h // 2, :n]
    assert torch.allclose(out[b, h, t], want, atol=1e-6)


def test_mma_options_cpu():
    """The mma tuning options (swizzle, lean, kvsplit): their #defines, the shared memory they
    take (kvsplit: the same bytes in two rings, so stages=1 halves the stage area) and plan()'s
    checks, without a GPU."""
    base = attn.AttnConfig(impl="mma", nwarps=8, wtile=32, stages=2)  # the kernel before the options
    d = attn.attn_defines(128, "polar", "polar", 4, 1, base)
    assert (d["SWZ"], d["LEAN"], d["KVSPLIT"]) == (0, 0, 0)
    opt = dataclasses.replace(base, swizzle=True, lean=2, kvsplit=True)
    d2 = attn.attn_defines(128, "polar", "polar", 4, 1, opt)
    assert (d2["SWZ"], d2["LEAN"], d2["KVSPLIT"]) == (1, 2, 1)
    assert attn.smem_bytes("mma", d) == attn.smem_bytes("mma", d2) == 106752
    one = attn.attn_defines(128, "polar", "polar", 4, 1, dataclasses.replace(opt, stages=1))
    assert attn.smem_bytes("mma", one) == 106752 - 8 * 4352  # 8 warps x (32 keys x 68 bytes, K and V)
    assert attn._per_sm(attn.smem_bytes("mma", one), 256, 80) == 3
    with pytest.raises(ValueError, match="stages"):
        attn.plan(1, 8, 2, 1, 128, 64, config=dataclasses.replace(base, stages=1))
    with pytest.raises(ValueError, match="lean"):
        attn.plan(1, 8, 2, 1, 128, 64, config=dataclasses.replace(base, lean=3))
    # issue 11's cuts: PDW's P area is WN = ceil(V blocks / 2) (x 2 for prec fp32) words an entry
    new = dataclasses.replace(opt, pdw=True, smlean=2, vunroll=True, ptrs=True)
    for D, qt, wn in ((128, 1, 1), (128, 0, 2), (64, 1, 1), (256, 1, 2), (256, 0, 4)):
        dn = attn.attn_defines(D, "polar", "polar", 4, qt, new)
        assert (dn["PDW"], dn["SMLEAN"], dn["VUNROLL"], dn["PTRS"]) == (1, 2, 1, 1)
        do = attn.attn_defines(D, "polar", "polar", 4, qt, opt)
        assert attn.smem_bytes("mma", dn) - attn.smem_bytes("mma", do) == 8 * 32 * 4 * 4 * (wn - 1)
    assert attn.smem_bytes("mma", attn.attn_defines(128, "polar", "f16", 4, 1, new)) == attn.smem_bytes(
        "mma", attn.attn_defines(128, "polar", "f16", 4, 1, opt)
    )  # float16 V: one value (P) an entry
    with pytest.raises(ValueError, match="smlean"):
        attn.plan(1, 8, 2, 1, 128, 64, config=dataclasses.replace(base, smlean=3))
    for bad in (-1, 9):
        with pytest.raises(ValueError, match=f"ctas must be 0 .* got {bad}"):
            attn.plan(1, 8, 2, 1, 128, 64, config=dataclasses.replace(base, ctas=bad))
    for bad in (-1, 16, 256):
        with pytest.raises(ValueError, match=f"maxrreg must be 0 .* got {bad}"):
            attn.plan(1, 8, 2, 1, 128, 64, config=dataclasses.replace(base, maxrreg=bad))
    d255 = attn.attn_defines(128, "polar", "polar", 4, 1, dataclasses.replace(base, maxrreg=255))
    assert d255["MAXRREG"] == 255 and "MAXRREG" not in attn.attn_defines(128, "polar", "polar", 4, 1, base)
    assert loader.define_options(d255) == ("--maxrregcount=255",) and loader.define_options(d) == ()


def test_pshfl_only_where_it_applies_and_frees_the_p_slots():
    """AttnConfig.pshfl sets PSHFL only where the kernel can take it (pshfl_applies; the kernel static_asserts
    the same), elsewhere the variant is the one without it; with it the warps' P slots are not reserved, only
    the epilogue's RBP floats of l."""
    lb = attn.LOOP_BOUND_CONFIG
    assert lb.pshfl
    off = dataclasses.replace(lb, pshfl=False)
    d = attn.attn_defines(128, "polar", "polar", 4, 1, lb)
    d0 = attn.attn_defines(128, "polar", "polar", 4, 1, off)
    assert d["PSHFL"] == 1 and attn.pshfl_applies(d0)
    # 12 warps x 64 keys x 4 rows x 4 bytes x WN 1 -> 16 bytes
    assert attn.smem_bytes("mma", d0) - attn.smem_bytes("mma", d) == 12 * 64 * 4 * 4 - 16
    for args in ((128, "polar", "polar", 8, 1), (128, "polar", "f16", 4, 1)):  # 8 rows; float16 V
        assert attn.attn_defines(*args, lb) == attn.attn_defines(*args, off)
    for change in (dict(wtile=16), dict(vunroll=False), dict(swizzle=False), dict(pdw=False)):
        c = dataclasses.replace(lb, **change)
        assert "PSHFL" not in attn.attn_defines(128, "polar", "polar", 4, 1, c), change


def test_smem_bytes_mirror_the_kernels():
    """smem_bytes equals the kernels' own MSMEM_TOTAL (mma) / SMEM_TOTAL (simt) for every attention variant
    check_kernels compiles: each variant's NVRTC source (loader.build_source) run through the C preprocessor
    with a #if that fails where they differ; and a wrong value does fail."""
    cpp = shutil.which("cpp")
    if cpp is None:  # (the C compiler the llama.cpp build needs brings it)
        _missing("no C preprocessor (cpp) on PATH")

    def differs(file: str, defines: dict, n: int) -> str:
        mac = "MSMEM_TOTAL" if file == "polar_attn_mma.cu" else "SMEM_TOTAL"
        src = loader.build_source(file, defines) + f"\n#if {mac} != {n}\n#error {mac} is not {n}\n#endif\n"
        cmd = [cpp, "-x", "c++", "-P", *loader.include_options(), "-o", os.devnull, "-"]
        r = subprocess.run(cmd, input=src, text=True, capture_output=True)
        return r.stderr if r.returncode else ""

    impls = {"polar_attn_mma.cu": "mma", "polar_attn_simt.cu": "simt"}
    vs = [v for v in check_kernels.variants(False) if v.file in impls]
    assert len(vs) > 600 and {v.file for v in vs} == set(impls)
    assert any(dict(v.defines).get("PSHFL") for v in vs)
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        errs = ex.map(
            lambda v: differs(v.file, dict(v.defines), attn.smem_bytes(impls[v.file], dict(v.defines))), vs
        )
        bad = [(v.label, e) for v, e in zip(vs, errs, strict=True) if e]
    assert not bad, f"{len(bad)} of {len(vs)} variants differ, e.g. {bad[0]}"
    d = dict(vs[0].defines)
    assert "is not" in differs(vs[0].file, d, attn.smem_bytes(impls[vs[0].file], d) + 16)


def test_tune_mma_grid():
    """scripts/bench_gpu.py tune-mma: every config fits in shared memory, the default of each
    format is timed, the sweep is bounded (one NVRTC compile per config on the GPU run)."""
    grid = bench_gpu.tune_mma_grid()
    assert 40 <= len(grid) <= 60
    assert 8 <= sum(ph == "new" for ph, *_ in grid) <= 24  # option sets already in a default drop out
    assert len({(k, v, c) for _, k, v, c in grid}) == len(grid)
    for kfmt, vfmt in bench_gpu.MMA_TUNE_FMTS:
        assert (kfmt, vfmt, attn.default_config(vfmt)) in {(k, v, c) for _, k, v, c in grid}
    for _, kfmt, vfmt, cfg in grid:
        assert bench_gpu.mma_occupancy(cfg, kfmt, vfmt)[0] <= attn.SMEM_LIMIT
    assert (
        bench_gpu.mma_label(attn.AttnConfig(impl="mma", nwarps=8, wtile=32, stages=2, lean=2, kvsplit=True))
        == "8w32k2s+lean2+kvs"
    )
    assert bench_gpu.mma_label(attn.DEFAULT_CONFIG) == "8w64k1s+swz+lean2+kvs+pdw+sml1+vun+ptrs+qst"
    assert (
        bench_gpu.mma_label(
            dataclasses.replace(attn.DEFAULT_CONFIG, wtile=32, stages=2, kvsplit=False, smlean=2)
        )
        == "8w32k2s+swz+lean2+pdw+sml2+vun+ptrs+qst"
    )


def test_tune_mma_polar3_grid():
    """tune-mma's polar3 V grid (`--fmts polar3/polar3 polar/polar3 --phases ctas new`): polar's default with
    the CTAs a SM asked of ptxas (MMA_CTAS, only where set: every other variant's defines stay), and polar3's
    own default, for both pairs."""
    grid = bench_gpu.tune_mma_grid(bench_gpu.MMA_TUNE_POLAR3_FMTS, ("ctas", "new"))
    assert {ph for ph, *_ in grid} == {"ctas", "new"} and 20 <= len(grid) <= 40
    for kfmt, vfmt in bench_gpu.MMA_TUNE_POLAR3_FMTS:
        cfgs = {c for _, k, v, c in grid if (k, v) == (kfmt, vfmt)}
        assert attn.POLAR3V_CONFIG in cfgs and attn.DEFAULT_CONFIG in cfgs
        assert dataclasses.replace(attn.DEFAULT_CONFIG, ctas=2) in cfgs
    d = attn.attn_defines(128, "polar3", "polar3", 4, 1, dataclasses.replace(attn.DEFAULT_CONFIG, ctas=2))
    assert d["MMA_CTAS"] == 2
    assert "MMA_CTAS" not in attn.attn_defines(128, "polar3", "polar3", 4, 1, attn.DEFAULT_CONFIG)
    s6 = attn.AttnConfig(**bench_gpu.POLAR3V_S6)
    assert bench_gpu.mma_label(dataclasses.replace(s6, ctas=3)) == "8w32k2s+swz+lean2+qst+c3"
    assert attn.POLAR3V_CONFIG == dataclasses.replace(s6, pdw=True, smlean=1, vunroll=True, ptrs=True)
    with pytest.raises(SystemExit):
        bench_gpu.main(["tune-mma", "--fmts", "polar4/polar"])


def test_writes_out_rule_cpu():
    """Which launches write the output from the partial kernel (run's rule, and compare's record of it): the
    mma kernel with one split into a contiguous out (or run's own); not with 2 splits, a padded out, or the
    simt kernel. The direct variant's defines are the plan's plus OUT_TYPE."""
    import torch

    d = tuple(attn.attn_defines(128, "polar", "polar", 4, 1, attn.DEFAULT_CONFIG).items())
    p = attn.Plan(1, 4, 1, 1, 128, "polar", "polar", 1, attn.DEFAULT_CONFIG, d, 0, 4, 1, 1, 512, 0)
    assert attn.writes_out(p) and attn.writes_out(p, torch.empty(1, 4, 1, 128))
    assert not attn.writes_out(p, torch.empty(1, 4, 1, 136)[..., :128])
    assert not attn.writes_out(dataclasses.replace(p, splits=2))
    assert not attn.writes_out(dataclasses.replace(p, config=attn.SIMT_CONFIG))
    assert attn.direct_defines(d, 2) == (*d, ("OUT_TYPE", 2))


def test_tune_mma_depth_grid():
    """tune-mma's "depth" phase: polar's default and deeper rings of it (2 slots of 64 keys each, one ring or
    two; 3 and 4 slots of 32) or more warps (12, 10, 16; 12 with 168 registers), P d by shuffles (pshfl,
    8 and 12 warps), each fitting in shared memory, named by label."""
    grid = bench_gpu.tune_mma_grid((("polar", "polar"),), ("depth",))
    cfgs = [c for _, _, _, c in grid]
    assert {ph for ph, *_ in grid} == {"depth"} and cfgs[0] == attn.DEFAULT_CONFIG and len(cfgs) == 14
    assert "12w64k1s+swz+lean2+kvs+pdw+sml1+vun+ptrs+qst" in {bench_gpu.mma_label(c) for c in cfgs}
    assert "16w64k1s+swz+lean2+kvs+pdw+sml1+vun+ptrs+qst" in {bench_gpu.mma_label(c) for c in cfgs}
    labels = {bench_gpu.mma_label(c) for c in cfgs}
    assert "8w64k2s+swz+lean2+kvs+pdw+sml1+vun+ptrs+qst" in labels
    assert "8w32k4s+swz+lean2+kvs+pdw+sml1+vun+ptrs+qst" in labels
    assert "8w64k2s+swz+lean2+kvs+pdw+sml1+vun+ptrs+qst+r255" in labels  # (maxrreg, session 43)
    assert "12w64k1s+swz+lean2+kvs+pdw+sml1+vun+ptrs+qst+r168" in labels
    assert "12w64k1s+swz+lean2+kvs+pdw+sml1+vun+ptrs+qst+psh" in labels  # (pshfl, session 45)


def test_qstage_changes_no_fallback():
    """The q rows of qstage (on in the defaults) move no shape across the shared-memory limit: every default
    config fits with it exactly where it fits without it (head sizes 64-256, 1-8 rows, each q type), as the
    AttnConfig docstring says. CPU only."""
    for D in attn.HEAD_DIMS:
        for kfmt, vfmt in (("polar", "polar"), ("polar", "f16"), ("polar3", "polar3"), ("polar", "polar3")):
            cfg = attn.default_config(vfmt, D=D)
            assert cfg.qstage
            off = dataclasses.replace(cfg, qstage=False)
            for rb in range(1, 9):
                for qt in (0, 1, 2):
                    with_q = attn.smem_bytes("mma", attn.attn_defines(D, kfmt, vfmt, rb, qt, cfg))
                    without = attn.smem_bytes("mma", attn.attn_defines(D, kfmt, vfmt, rb, qt, off))
                    assert with_q >= without
                    fits = (with_q <= attn.SMEM_LIMIT, without <= attn.SMEM_LIMIT)
                    assert fits[0] == fits[1], (D, kfmt, vfmt, rb, qt)


def test_choose_splits_mma():
    # headline shape (B=16, 8 KV heads, 2 CTAs/SM on 132 SMs, tile 256): one full wave of 2 splits
    assert attn.choose_splits_mma(128, 32768, 256, 2, 132) == 2
    # batch 1: fill one wave
    assert attn.choose_splits_mma(8, 32768, 256, 2, 132) == 33
    assert attn.choose_splits_mma(8, 100, 256, 2, 132) == 1
    for n in (1, 7, 128, 300, 5000):
        s = attn.choose_splits_mma(n, 65536, 256, 2, 132)
        assert 1 <= s <= 256


# ---- GPU -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch(cuda_torch):
    pb.register_kernel_format()  # the "paperb" cases
    return cuda_torch


def _rand_cache(torch, fmt, B, H, T_max, D, gen):
    """Random valid blocks (finite positive scales) or float16 values."""
    if fmt == "f16":
        return torch.randn((B, H, T_max, D), generator=gen, device="cuda").half()
    ts = formats.type_size(fmt)
    c = torch.randint(0, 256, (B, H, T_max, D // 64, ts), generator=gen, device="cuda", dtype=torch.uint8)
    d = (torch.rand((B, H, T_max, D // 64, 1), generator=gen, device="cuda") * 1.5 + 0.25).half()
    c[..., :2] = d.view(torch.uint8)
    return c


def _record(case: str, err: float) -> None:
    path = os.environ.get("KVPOLAR_RECORD_ERRORS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"case": case, "err": err}) + "\n")


def _check(torch, q, kc, vc, lens, kfmt, vfmt, case, tol=None, **kw):
    from gpu_reference import attention_reference, dequantize_any

    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device="cuda")
    attn.attention(q, kc, vc, lens, kfmt, vfmt, out=out, **kw)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), f"{case}: unwritten or non-finite outputs"
    k = dequantize_any(kc, kfmt)
    v = dequantize_any(vc, vfmt)
    ref = attention_reference(q.float(), k, v, lens)
    err = float((out.float() - ref).abs().max() / ref.abs().max())
    _record(case, err)
    if tol is None:
        tol = ATTN_TOL if q.dtype == torch.float32 else HALF_TOL[str(q.dtype).split(".")[-1]]
    assert err <= tol, f"{case}: relative error {err:.3g} > {tol}"


CASES = [  # (kfmt, vfmt, kmode, impl)
    *(
        (k, v, "gather", impl)
        for impl in ("mma", "simt")
        for k, v in (
            ("polar", "polar"),
            ("polar3", "polar3"),
            ("polar", "f16"),
            ("polar3", "f16"),
            ("polar", "polar3"),
            ("paperb", "paperb"),
        )
    ),
    ("paperb", "paperb", "anglelut", "simt"),
    ("paperb", "f16", "anglelut", "simt"),
    ("polar3", "polar3", "lut", "simt"),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("kfmt,vfmt,kmode,impl", CASES)
def test_decode_attention(torch, seed, D, heads, kfmt, vfmt, kmode, impl):
    Hq, Hkv = heads
    gen = torch.Generator(device="cuda").manual_seed(seed)
    lens = torch.tensor([1, 37, 129, 700 + seed], dtype=torch.int32, device="cuda")
    B, T_max = len(lens), 712
    kc = _rand_cache(torch, kfmt, B, Hkv, T_max, D, gen)
    vc = _rand_cache(torch, vfmt, B, Hkv, T_max, D, gen)
    q = torch.randn((B, Hq, 1, D), generator=gen, device="cuda") * 2
    # mma: the shipped default shape, as plan picks it (4 sequences x Hkv heads: 4-16 work items, the
    # few-items default at 4 and 8); simt: the first kernel shape (4 warps, 1 key/thread, 3 stages)
    cfg = None if impl == "mma" else attn.AttnConfig(kmode=kmode, impl="simt")
    case = f"{kfmt}/{vfmt}/{kmode}/{impl} D{D} {Hq}/{Hkv} s{seed}"
    _check(torch, q, kc, vc, lens, kfmt, vfmt, case, config=cfg)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("kfmt,vfmt", [("polar", "polar"), ("polar", "f16"), ("polar3", "polar3")])
def test_mma_fp16_precision(torch, seed, D, heads, kfmt, vfmt):
    """The tensor-core kernel with one fp16 product (prec "fp16") on float32 q: the error it adds."""
    Hq, Hkv = heads
    gen = torch.Generator(device="cuda").manual_seed(100 + seed)
    lens = torch.tensor([1, 37, 129, 700 + seed], dtype=torch.int32, device="cuda")
    B, T_max = len(lens), 712
    kc = _rand_cache(torch, kfmt, B, Hkv, T_max, D, gen)
    vc = _rand_cache(torch, vfmt, B, Hkv, T_max, D, gen)
    q = torch.randn((B, Hq, 1, D), generator=gen, device="cuda") * 2
    cfg = attn.AttnConfig(prec="fp16")
    case = f"fp16prec {kfmt}/{vfmt} D{D} {Hq}/{Hkv} s{seed}"
    _check(torch, q, kc, vc, lens, kfmt, vfmt, case, tol=FP16_PREC_TOL, config=cfg)


@pytest.mark.parametrize("impl", ["mma", "simt"])
@pytest.mark.parametrize("Tq", [2, 3, 5])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (16, 2)])
def test_causal_tail(torch, Tq, heads, impl):
    """Tq > 1 query tokens, causal within the tail, rows split across CTAs when R > 8."""
    Hq, Hkv = heads
    gen = torch.Generator(device="cuda").manual_seed(Tq)
    lens = torch.tensor([Tq, 300, 77], dtype=torch.int32, device="cuda")
    kc = _rand_cache(torch, "polar", 3, Hkv, 304, 128, gen)
    vc = _rand_cache(torch, "polar", 3, Hkv, 304, 128, gen)
    q = torch.randn((3, Hq, Tq, 128), generator=gen, device="cuda")
    cfg = attn.AttnConfig(impl=impl)
    _check(torch, q, kc, vc, lens, "polar", "polar", f"causal Tq{Tq} {Hq}/{Hkv} {impl}", config=cfg)


TILE_CFGS = {  # name: AttnConfig kwargs
    **{
        n: dict(impl="simt", nwarps=int(n[0]), tpt=int(n[2]), stages=int(n[4]), repl=int(n[6:-1]))
        for n in ("4w1t3s16r", "4w2t2s16r", "8w1t2s8r", "2w2t4s16r", "4w1t2s8r")
    },
    "mma 8w32k2s": dict(nwarps=8, wtile=32, stages=2),
    "mma 4w32k4s": dict(nwarps=4, wtile=32, stages=4),
    "mma 8w16k2s": dict(nwarps=8, wtile=16, stages=2),
    "mma 2w64k3s": dict(nwarps=2, wtile=64, stages=3),
    "mma 2w48k5s fp16": dict(nwarps=2, wtile=48, stages=5, prec="fp16"),
    # the tuning options (AttnConfig swizzle / lean / kvsplit), float32 q (prec "fp32") unless named
    "mma 8w32k2s swz": dict(nwarps=8, wtile=32, stages=2, swizzle=True),
    "mma 8w32k2s lean1": dict(nwarps=8, wtile=32, stages=2, lean=1),
    "mma 8w32k2s lean2": dict(nwarps=8, wtile=32, stages=2, lean=2),
    "mma 8w32k1s kvs": dict(nwarps=8, wtile=32, stages=1, kvsplit=True),
    "mma 4w64k2s swz lean2 kvs": dict(nwarps=4, wtile=64, stages=2, swizzle=True, lean=2, kvsplit=True),
    "mma 2w48k3s swz lean1 fp16": dict(nwarps=2, wtile=48, stages=3, swizzle=True, lean=1, prec="fp16"),
    "mma 4w16k1s swz lean2 kvs fp16": dict(
        nwarps=4, wtile=16, stages=1, swizzle=True, lean=2, kvsplit=True, prec="fp16"
    ),
}


@pytest.mark.parametrize("splits", [1, 2, 7, 64])
@pytest.mark.parametrize("cfg", list(TILE_CFGS))
@pytest.mark.parametrize("vfmt", ["polar", "f16"])
def test_splits_and_tiles(torch, splits, cfg, vfmt):
    if vfmt == "f16" and not cfg.startswith("mma"):
        pytest.skip("simt shapes: polar V only")
    gen = torch.Generator(device="cuda").manual_seed(splits)
    lens = torch.tensor([3000, 1, 1234], dtype=torch.int32, device="cuda")
    kc = _rand_cache(torch, "polar", 3, 2, 3000, 128, gen)
    vc = _rand_cache(torch, vfmt, 3, 2, 3000, 128, gen)
    q = torch.randn((3, 8, 1, 128), generator=gen, device="cuda")
    c = attn.AttnConfig(**TILE_CFGS[cfg])
    tol = FP16_PREC_TOL if c.prec == "fp16" else None
    _check(
        torch,
        q,
        kc,
        vc,
        lens,
        "polar",
        vfmt,
        f"splits{splits} {cfg} {vfmt}",
        tol=tol,
        config=c,
        splits=splits,
    )


MMA_OPTION_CFGS = {  # all options on: a 32-key tile with a ring of 1, a 48-key tile (32 + 16 keys)
    "swz lean2 kvs 8w32k1s": dict(nwarps=8, wtile=32, stages=1, swizzle=True, lean=2, kvsplit=True),
    "swz lean2 2w48k3s": dict(nwarps=2, wtile=48, stages=3, swizzle=True, lean=2),
}


def _options_case(torch, kfmt, vfmt, Hq, Hkv, D, seed):
    """q, K and V caches and lengths of the option tests: 4 sequences of 1, 37, 129 and 700 keys
    (empty, partial and full tiles) in caches of 712, one query token."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    lens = torch.tensor([1, 37, 129, 700], dtype=torch.int32, device="cuda")
    B, T_max = len(lens), 712
    kc = _rand_cache(torch, kfmt, B, Hkv, T_max, D, gen)
    vc = _rand_cache(torch, vfmt, B, Hkv, T_max, D, gen)
    q = torch.randn((B, Hq, 1, D), generator=gen, device="cuda") * 2
    return q, kc, vc, lens


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("heads", [(6, 2), (8, 1)])
@pytest.mark.parametrize(
    "kfmt,vfmt", [("polar3", "polar3"), ("polar", "polar3"), ("polar3", "f16"), ("paperb", "paperb")]
)
@pytest.mark.parametrize("cfg", list(MMA_OPTION_CFGS))
def test_mma_options_formats(torch, cfg, kfmt, vfmt, heads, D):
    """The tuning options on the other block layouts, head sizes (D=64: rows 2-byte aligned, no
    swizzle) and row counts (3 rows: 4 padded; 8 rows), float32 q (prec "fp32")."""
    Hq, Hkv = heads
    q, kc, vc, lens = _options_case(torch, kfmt, vfmt, Hq, Hkv, D, 200 + D + Hq)
    c = attn.AttnConfig(**MMA_OPTION_CFGS[cfg])
    _check(torch, q, kc, vc, lens, kfmt, vfmt, f"options {cfg} {kfmt}/{vfmt} D{D} {Hq}/{Hkv}", config=c)


NEW_OPTION_CFGS = {  # issue 11's cuts (pdw, smlean, vunroll, ptrs) with the options they sit on
    "pdw sml2 vun ptrs 8w32k2s swz lean2": dict(
        nwarps=8, wtile=32, stages=2, swizzle=True, lean=2, pdw=True, smlean=2, vunroll=True, ptrs=True
    ),
    "pdw sml1 vun 8w32k1s swz lean2 kvs fp16": dict(
        nwarps=8,
        wtile=32,
        stages=1,
        swizzle=True,
        lean=2,
        kvsplit=True,
        pdw=True,
        smlean=1,
        vunroll=True,
        prec="fp16",
    ),
    "pdw sml2 ptrs 2w48k3s kvs fp16": dict(
        nwarps=2, wtile=48, stages=3, kvsplit=True, pdw=True, smlean=2, ptrs=True, prec="fp16"
    ),
    # session 43: the polar default compiled with --maxrregcount=255 (AttnConfig.maxrreg)
    "default maxrreg255": dict(dataclasses.asdict(attn.DEFAULT_CONFIG), maxrreg=255),
    # session 44: polar V's default at head size 128 on a GPU whose memory outruns its loop (12 warps)
    "loop-bound default": dataclasses.asdict(attn.LOOP_BOUND_CONFIG),
    # session 45: P d by warp shuffles (taken at 3 rows, not at 8, nor at D=64 where the swizzle is off)
    "default pshfl": dict(dataclasses.asdict(attn.DEFAULT_CONFIG), pshfl=True),
    "loop-bound without pshfl": dict(dataclasses.asdict(attn.LOOP_BOUND_CONFIG), pshfl=False),
}


@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("heads", [(6, 2), (8, 1)])
@pytest.mark.parametrize("kfmt,vfmt", [("polar", "polar"), ("polar3", "f16"), ("polar", "polar3")])
@pytest.mark.parametrize("cfg", list(NEW_OPTION_CFGS))
def test_mma_new_options(torch, cfg, kfmt, vfmt, heads, D):
    """pdw / smlean / vunroll / ptrs on other layouts, head sizes (D=64: 1 V block, rows 2-byte aligned;
    D=256: 4 V blocks, 2 or 4 words per P entry), row counts (3 rows: 4 padded, smlean's repeated q
    columns with fp16 operands; 8 rows: 2 V n-tiles), kvsplit (the V wait before the softmax; ptrs'
    separate K and V pointers), partial and empty tiles (ptrs: lean 0's zero-fill path); float32 q
    (prec "fp32" unless named)."""
    Hq, Hkv = heads
    c = attn.AttnConfig(**NEW_OPTION_CFGS[cfg])
    d = attn.attn_defines(D, kfmt, vfmt, min(Hq // Hkv, 8), 0, c)
    if attn.smem_bytes("mma", d) > attn.SMEM_LIMIT:
        pytest.skip("shared memory")
    q, kc, vc, lens = _options_case(torch, kfmt, vfmt, Hq, Hkv, D, 400 + D + Hq)
    tol = FP16_PREC_TOL if c.prec == "fp16" else None
    for splits in (None, 3):
        case = f"new options {cfg} {kfmt}/{vfmt} D{D} {Hq}/{Hkv} splits={splits}"
        _check(torch, q, kc, vc, lens, kfmt, vfmt, case, tol=tol, config=c, splits=splits)


TUNE_MMA = {
    f"{ph} {k}+{v} {bench_gpu.mma_label(c)}": (k, v, c)
    for ph, k, v, c in [
        *bench_gpu.tune_mma_grid(),
        *bench_gpu.tune_mma_grid(bench_gpu.MMA_TUNE_POLAR3_FMTS, ("ctas", "new")),
        *bench_gpu.tune_mma_grid(phases=("depth",)),
    ]
}


@pytest.mark.parametrize("case", list(TUNE_MMA))
def test_tune_mma_variants(torch, case):
    """Every variant that `scripts/bench_gpu.py tune-mma` times, with its #defines (D=128, 4 rows
    per CTA, float16 q: prec "fp16"), on ragged lengths (a partial last tile, an empty chunk)."""
    kfmt, vfmt, c = TUNE_MMA[case]
    gen = torch.Generator(device="cuda").manual_seed(300)
    lens = torch.tensor([3000, 1, 1234], dtype=torch.int32, device="cuda")
    kc = _rand_cache(torch, kfmt, 3, 2, 3000, 128, gen)
    vc = _rand_cache(torch, vfmt, 3, 2, 3000, 128, gen)
    q = torch.randn((3, 8, 1, 128), generator=gen, device="cuda").half()
    for splits in (None, 7):
        _check(
            torch, q, kc, vc, lens, kfmt, vfmt, f"tune-mma {case} splits={splits}", config=c, splits=splits
        )


@pytest.mark.parametrize("impl", ["mma", "simt"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_queries_and_encoded_cache(torch, dtype, impl):
    """Real encoded data (GPU encoder) and float16/bfloat16 q/out."""
    gen = torch.Generator(device="cuda").manual_seed(9)
    B, Hkv, T, D = 2, 3, 520, 64
    k = torch.randn((B, Hkv, T, D), generator=gen, device="cuda")
    v = torch.randn((B, Hkv, T, D), generator=gen, device="cuda")
    kc = torch.empty((B, Hkv, T, 1, 34), dtype=torch.uint8, device="cuda")
    vc = torch.empty_like(kc)
    gpu_codec.encode_into(k, kc, "polar", 0)
    gpu_codec.encode_into(v, vc, "polar", 0)
    q = torch.randn((B, 9, 1, D), generator=gen, device="cuda").to(getattr(torch, dtype))
    lens = torch.tensor([520, 333], dtype=torch.int32, device="cuda")
    _check(
        torch, q, kc, vc, lens, "polar", "polar", f"encoded {dtype} {impl}", config=attn.AttnConfig(impl=impl)
    )


def test_attention_bad_inputs(torch):
    q = torch.zeros((1, 4, 1, 128), device="cuda")
    kc = torch.zeros((1, 2, 64, 2, 34), dtype=torch.uint8, device="cuda")
    lens = torch.tensor([5], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="multiple of the cache's KV heads"):
        attn.attention(torch.zeros((1, 3, 1, 128), device="cuda"), kc, kc, lens)
    with pytest.raises(ValueError, match="k_cache"):
        attn.attention(q, kc[..., :26].contiguous(), kc, lens)
    with pytest.raises(ValueError, match="anglelut"):
        attn.attention(q, kc, kc, lens, config=attn.AttnConfig(kmode="anglelut"))
    with pytest.raises(ValueError, match="lens"):
        attn.attention(q, kc, kc, lens.long())
    with pytest.raises(ValueError, match="T_max must be a multiple of 8"):
        attn.attention(q, kc[:, :, :60].contiguous(), kc[:, :, :60].contiguous(), lens)


def test_plan_run(torch):
    """plan() is cached per shape and run(plan) is attention(): same bits; run checks its inputs."""
    gen = torch.Generator(device="cuda").manual_seed(12)
    lens = torch.tensor([300, 17], dtype=torch.int32, device="cuda")
    kc = _rand_cache(torch, "polar", 2, 2, 304, 128, gen)
    vc = _rand_cache(torch, "polar3", 2, 2, 304, 128, gen)
    q = torch.randn((2, 8, 1, 128), generator=gen, device="cuda")
    p = attn.plan(2, 8, 2, 1, 128, 304, "polar", "polar3", q.dtype, device=q.device.index or 0)
    assert attn.plan(2, 8, 2, 1, 128, 304, "polar", "polar3", q.dtype, device=q.device.index or 0) is p
    assert p.kernel == "polar_attn_mma" and p.splits * p.chunk >= 304 and p.chunk % p.config.tile == 0
    got = attn.run(p, q, kc, vc, lens)
    want = attn.attention(q, kc, vc, lens, "polar", "polar3")
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="plan"):
        attn.run(p, q.half(), kc, vc, lens)
    with pytest.raises(ValueError, match="v_cache"):
        attn.run(p, q, kc, kc, lens)


@pytest.mark.parametrize("odtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("kfmt,vfmt", [("polar", "polar"), ("polar", "f16"), ("polar3", "polar3")])
def test_one_split_writes_out_directly(torch, monkeypatch, odtype, kfmt, vfmt):
    """With one split the mma kernel writes the output itself (no partials, no combine): the same values as
    the combine path (taken for an out that is not contiguous) in each output type, zeros for a sequence
    without keys, several row groups (Hq 20 over 2 KV heads: 10 rows, CTAs of 8 and 2) and causal rows
    (Tq 2)."""
    gen = torch.Generator(device="cuda").manual_seed(15)
    lens = torch.tensor([900, 0, 41], dtype=torch.int32, device="cuda")
    kc = _rand_cache(torch, kfmt, 3, 2, 904, 128, gen)
    vc = _rand_cache(torch, vfmt, 3, 2, 904, 128, gen)
    dt = getattr(torch, odtype)
    launched = []  # the defines of each launch's partial kernel: the direct one has OUT_TYPE
    real = attn._kernels
    monkeypatch.setattr(
        attn, "_kernels", lambda impl, d, smem: launched.append(dict(d)) or real(impl, d, smem)
    )
    for Hq, Tq in ((8, 1), (20, 1), (8, 2)):
        q = torch.randn((3, Hq, Tq, 128), generator=gen, device="cuda").half()
        p = attn.plan(3, Hq, 2, Tq, 128, 904, kfmt, vfmt, q.dtype, splits=1, device=q.device.index or 0)
        assert p.kernel == "polar_attn_mma" and p.splits == 1
        direct = torch.full(q.shape, float("nan"), dtype=dt, device="cuda")
        attn.run(p, q, kc, vc, lens, out=direct)
        combined = torch.full((3, Hq, Tq, 136), float("nan"), dtype=dt, device="cuda")[..., :128]
        attn.run(p, q, kc, vc, lens, out=combined)
        assert not combined.is_contiguous() and torch.equal(direct, combined), f"Hq {Hq} Tq {Tq}"
        assert launched[-2].get("OUT_TYPE") == attn._q_type(dt) and "OUT_TYPE" not in launched[-1]
        assert (direct[1] == 0).all() and torch.isfinite(direct).all()
    with pytest.raises(ValueError, match="out must be float32, float16 or bfloat16"):
        attn.run(p, q, kc, vc, lens, out=torch.empty(q.shape, dtype=torch.float64, device="cuda"))


def test_cta_times(torch):
    """The stamped kernel (AttnConfig.cta_times, bench_gpu.py anatomy) gives the default's bits, and each
    CTA with keys has stamps in order on a real SM; a CTA without keys (lens 17 < the second split) none
    past its entry; a plan without stamps is refused."""
    import dataclasses

    gen = torch.Generator(device="cuda").manual_seed(13)
    lens = torch.tensor([1000, 17], dtype=torch.int32, device="cuda")
    kc = _rand_cache(torch, "polar", 2, 2, 1024, 128, gen)
    vc = _rand_cache(torch, "polar", 2, 2, 1024, 128, gen)
    q = torch.randn((2, 8, 1, 128), generator=gen, device="cuda").half()
    cfg = dataclasses.replace(attn.default_config("polar"), cta_times=True)
    p = attn.plan(2, 8, 2, 1, 128, 1024, "polar", "polar", q.dtype, cfg, 2, q.device.index or 0)
    attn.cta_times(p, reset=True)
    got = attn.run(p, q, kc, vc, lens)
    torch.cuda.synchronize()
    t = attn.cta_times(p)
    want = attn.attention(q, kc, vc, lens, "polar", "polar", splits=2)
    assert torch.equal(got, want)
    nm = len(attn.CTA_MARKS)
    assert t.shape == (p.splits * p.n_groups * 2 * 2, nm + 1) and p.splits == 2
    z = torch.arange(t.shape[0]).numpy() // (p.splits * p.n_groups)  # b * Hkv + h
    split = torch.arange(t.shape[0]).numpy() % p.splits
    assert p.chunk >= 17
    empty = (z >= 2) & (split == 1)  # batch 1's second split: no keys
    assert (t[:, 0] > 0).all()
    assert (t[empty, 1:nm] == 0).all()
    full = t[~empty]
    assert all((full[:, k] <= full[:, k + 1]).all() for k in range(nm - 1)) and (full[:, nm - 1] > 0).all()
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    assert (t[:, nm] < sm_count).all()
    # one split: the launch writes the output itself (another module); its stamps are the ones read
    p1 = attn.plan(2, 8, 2, 1, 128, 1024, "polar", "polar", q.dtype, cfg, 1, q.device.index or 0)
    attn.cta_times(p1, reset=True)
    got = attn.run(p1, q, kc, vc, lens)
    torch.cuda.synchronize()
    t1 = attn.cta_times(p1)
    assert torch.equal(got, attn.attention(q, kc, vc, lens, "polar", "polar", splits=1))
    assert t1.shape == (4, nm + 1) and (t1[:, nm - 1] > 0).all() and (t1[:, nm - 1] >= t1[:, 0]).all()
    with pytest.raises(ValueError, match="cta_times"):
        attn.cta_times(
            attn.plan(2, 8, 2, 1, 128, 1024, "polar", "polar", q.dtype, device=q.device.index or 0)
        )


@pytest.mark.parametrize("qdtype", ["float16", "float32", "bfloat16"])
@pytest.mark.parametrize("kfmt,vfmt", [("polar", "polar"), ("polar", "f16"), ("polar3", "polar3")])
def test_qstage_same_bits(torch, qdtype, kfmt, vfmt):
    """AttnConfig.qstage (q rows through shared memory, on in the defaults) gives the bits of the same
    config without it: on a contiguous q (16-byte copies), on a q view whose rows are not 16-byte aligned
    (element copies), and with more query rows than a CTA takes (rows split over CTAs, a last CTA with
    fewer rows)."""
    import dataclasses

    gen = torch.Generator(device="cuda").manual_seed(14)
    lens = torch.tensor([700, 33, 1], dtype=torch.int32, device="cuda")
    kc = _rand_cache(torch, kfmt, 3, 2, 712, 128, gen)
    vc = _rand_cache(torch, vfmt, 3, 2, 712, 128, gen)
    dt = getattr(torch, qdtype)
    base = attn.default_config(vfmt)
    for Hq in (8, 20):
        big = torch.randn((3, Hq, 1, 129), generator=gen, device="cuda").to(dt)
        for q in (big[..., :128].contiguous(), big[..., 1:]):  # aligned rows; rows 1 element off
            assert base.qstage
            got = attn.attention(q, kc, vc, lens, kfmt, vfmt, config=base)
            want = attn.attention(q, kc, vc, lens, kfmt, vfmt, config=dataclasses.replace(base, qstage=False))
            assert torch.equal(got, want), f"{kfmt}/{vfmt} {qdtype} Hq {Hq} stride {q.stride()}"


@pytest.mark.parametrize("qdtype", ["float16", "float32", "bfloat16"])
@pytest.mark.parametrize("kfmt,vfmt", [("polar", "polar"), ("polar", "polar3"), ("polar3", "polar3")])
@pytest.mark.parametrize("nwarps", [8, 12])
def test_pshfl_same_bits(torch, qdtype, kfmt, vfmt, nwarps):
    """AttnConfig.pshfl (P d by warp shuffles) gives the bits of the same config without it: 4 rows a CTA
    (where it is taken), float16/bfloat16 q (one word a P entry) and float32 q (two), ragged lengths (a
    partial last tile, an empty chunk), one split and 3."""
    import dataclasses

    gen = torch.Generator(device="cuda").manual_seed(45)
    lens = torch.tensor([2100, 1, 777], dtype=torch.int32, device="cuda")
    kc = _rand_cache(torch, kfmt, 3, 2, 2112, 128, gen)
    vc = _rand_cache(torch, vfmt, 3, 2, 2112, 128, gen)
    q = torch.randn((3, 8, 1, 128), generator=gen, device="cuda").to(getattr(torch, qdtype))
    base = dataclasses.replace(attn.default_config(vfmt, D=128), nwarps=nwarps)
    for splits in (1, 3):
        want = attn.attention(q, kc, vc, lens, kfmt, vfmt, config=base, splits=splits)
        got = attn.attention(
            q, kc, vc, lens, kfmt, vfmt, config=dataclasses.replace(base, pshfl=True), splits=splits
        )
        assert torch.equal(got, want), f"{kfmt}/{vfmt} {qdtype} {nwarps} warps splits={splits}"


def test_default_config_by_head_size():
    """polar3 V takes polar's default with 2 CTAs a SM at head size 64 (session 33's graph-timed tune), its
    own shape above; polar and float16 V one shape for every head size; each default fits in shared memory
    without a fallback at every head size, row count and q type. CPU only."""
    d64 = dataclasses.replace(attn.DEFAULT_CONFIG, ctas=2)
    assert attn.default_config("polar3", D=64) == d64 == attn.POLAR3V_D64_CONFIG
    for D in (None, 128, 256):
        assert attn.default_config("polar3", D=D) == attn.POLAR3V_CONFIG
    for D in (None, *attn.HEAD_DIMS):
        assert attn.default_config("polar", D=D) == attn.DEFAULT_CONFIG
        assert attn.default_config("f16", D=D) == attn.F16V_CONFIG
    assert attn.default_config("polar3", "lut", D=64).impl == "simt"
    for kfmt in ("polar", "polar3"):
        for rb in range(1, 9):
            for qt in (0, 1, 2):
                cfg, _, smem = attn.select_variant(64, kfmt, "polar3", rb, qt, d64, True)
                assert cfg == d64 and smem <= attn.SMEM_LIMIT, (kfmt, rb, qt)


def test_default_config_by_work_units():
    """Calls with few work items (session 34's graph-timed tune on an H100) take polar's default with 1 CTA a
    SM: polar3 V at head sizes 64 and 128 up to 8 items, polar V at 64 up to 12; not at 256, not float16 V,
    not when the count is unknown; the shape fits without a fallback wherever it is taken. CPU only."""
    few = attn.FEW_UNITS_CONFIG
    assert few == dataclasses.replace(attn.DEFAULT_CONFIG, ctas=1)
    assert attn.work_units(1, 9, 3, 1) == 3 and attn.work_units(16, 32, 8, 1) == 128
    assert attn.work_units(2, 32, 8, 3) == 2 * 8 * 2  # 12 rows a KV head: two groups of up to 8
    assert attn.call_config("polar3", 1, 9, 3, 1, 64) == attn.FEW_UNITS_CONFIG  # 3 items
    assert attn.call_config("polar3", 16, 9, 3, 1, 64) == attn.POLAR3V_D64_CONFIG  # 48 items
    for D in (64, 128):
        assert attn.default_config("polar3", D=D, units=attn.POLAR3V_FEW_UNITS) == few
        assert attn.default_config("polar3", D=D, units=attn.POLAR3V_FEW_UNITS + 1) == attn.default_config(
            "polar3", D=D
        )
        assert attn.default_config("polar3", D=D, units=None) != few
        assert attn.default_config("f16", D=D, units=1) == attn.F16V_CONFIG
    assert attn.default_config("polar", D=64, units=attn.POLARV_D64_FEW_UNITS) == few
    assert attn.default_config("polar", D=64, units=attn.POLARV_D64_FEW_UNITS + 1) == attn.DEFAULT_CONFIG
    assert attn.default_config("polar", D=128, units=1) == attn.DEFAULT_CONFIG
    assert attn.default_config("polar3", D=256, units=1) == attn.POLAR3V_CONFIG
    assert attn.default_config("polar3", "lut", D=64, units=1).impl == "simt"
    # the benchmarks' "default" rows take the same rule from their shape
    assert bench_gpu.shape_default("polar3", bench_gpu.Shape(1, 32768, 9, 3, 64)) == few
    assert bench_gpu.shape_default("polar3", bench_gpu.Shape(16, 32768, 9, 3, 64)) == attn.POLAR3V_D64_CONFIG
    for D, vfmt in ((64, "polar"), (64, "polar3"), (128, "polar3")):
        for kfmt in ("polar", "polar3"):
            for rb in range(1, 9):
                for qt in (0, 1, 2):
                    cfg, _, smem = attn.select_variant(D, kfmt, vfmt, rb, qt, few, True)
                    assert cfg == few and smem <= attn.SMEM_LIMIT, (D, kfmt, vfmt, rb, qt)


def test_default_config_by_memory_rate(monkeypatch):
    """On a GPU whose memory feeds each SM more than LOOP_BOUND_BYTES bytes a cycle (an H200) polar V at head
    size 128 takes 12 warps (session 44) and P d by shuffles (session 45); every other case keeps its shape;
    the rate comes from the device's attributes (an H200's, by its specification, give 18.8; an H100 SXM's
    12.8) and an unreadable one keeps the default; the shape fits without a fallback at every row count, q
    type and K format. CPU only."""
    lb = attn.LOOP_BOUND_CONFIG
    assert lb == dataclasses.replace(attn.DEFAULT_CONFIG, nwarps=12, pshfl=True)
    assert attn.default_config("polar", D=128, loop_bound=True) == lb
    assert attn.default_config("polar", D=128, units=128, loop_bound=True) == lb
    for D in (None, 64, 256):
        assert attn.default_config("polar", D=D, loop_bound=True) == attn.default_config("polar", D=D)
    for D in (None, *attn.HEAD_DIMS):
        for vfmt in ("polar3", "f16"):
            assert attn.default_config(vfmt, D=D, loop_bound=True) == attn.default_config(vfmt, D=D)
    assert attn.default_config("polar", "lut", D=128, loop_bound=True).impl == "simt"
    for kfmt in ("polar", "polar3"):
        for rb in range(1, 9):
            for qt in (0, 1, 2):
                cfg, _, smem = attn.select_variant(128, kfmt, "polar", rb, qt, lb, True)
                assert cfg == lb and smem <= attn.SMEM_LIMIT, (kfmt, rb, qt)

    class Runtime:  # cudaDeviceGetAttribute of one device: memory kHz, bus bits, SM kHz, SMs
        def __init__(self, attrs):
            self.attrs = dict(zip(loader.DEVICE_ATTRIBUTES, attrs, strict=True))

        def deviceGetAttribute(self, attr, device):
            if device != 0:
                raise RuntimeError("invalid device ordinal")
            return self.attrs[attr]

    def fake(attrs):
        rt = Runtime(attrs)
        cp = type("cp", (), {"cuda": type("cuda", (), {"runtime": rt})})
        monkeypatch.setattr(loader, "cupy", lambda: cp)
        loader.memory_bytes_per_sm_cycle.cache_clear()

    try:
        fake((3201000, 6144, 1980000, 132))  # H200
        assert loader.memory_bytes_per_sm_cycle(0) == pytest.approx(18.81, abs=0.01)
        assert attn.loop_bound_device(0) and not attn.loop_bound_device(1)  # device 1: no attributes
        assert attn.call_config("polar", 16, 32, 8, 1, 128) == lb
        assert attn.call_config("polar", 16, 32, 8, 1, 128, device=1) == attn.DEFAULT_CONFIG
        fake((2619000, 5120, 1980000, 132))  # H100 SXM
        assert loader.memory_bytes_per_sm_cycle(0) == pytest.approx(12.83, abs=0.01)
        assert not attn.loop_bound_device(0)
        assert attn.call_config("polar", 16, 32, 8, 1, 128) == attn.DEFAULT_CONFIG
        fake((0, 6144, 1980000, 132))  # a runtime that reports no memory clock
        assert loader.memory_bytes_per_sm_cycle(0) is None and not attn.loop_bound_device(0)
    finally:
        loader.memory_bytes_per_sm_cycle.cache_clear()
