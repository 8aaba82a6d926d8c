"""scripts/sass_order.py: the run-length order of loads and products in a cuobjdump -sass listing."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest

import bench_gpu
import check_kernels
import sass_order
from conftest import _missing


@pytest.fixture
def nvrtc() -> Path:
    """NVRTC 13.0.88's libnvrtc.so.13 ($KVPOLAR_NVRTC), with cuobjdump on PATH: `bootstrap.py data
    --sass-tools` and `bootstrap.py env` provide both, as the test command does (then a missing one fails,
    not skips)."""
    lib = os.environ.get("KVPOLAR_NVRTC")
    if not (lib and shutil.which("cuobjdump")):
        _missing(
            "KVPOLAR_NVRTC (a libnvrtc.so.13 of nvidia-cuda-nvrtc 13.0.88) and cuobjdump not both here: "
            "python3 scripts/bootstrap.py data --sass-tools, then eval $(python3 scripts/bootstrap.py env)"
        )
    return Path(lib)


LISTING = """
	code for sm_90
		Function : _Z3fooPf
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                          /* 0x00000a00ff017b82 */
        /*0010*/                   LDG.E.U16.CONSTANT R2, desc[UR8][R4.64] ;        /* 0x0000000804027981 */
        /*0020*/              @!P1 LDG.E.128 R8, desc[UR8][R6.64] ;                 /* 0x000000080608a981 */
        /*0030*/                   LDS.64 R10, [R2] ;                               /* 0x000000000a0a7984 */
        /*0040*/                   HMMA.16816.F32 R12, R8, R10, RZ ;                /* 0x0000000a080c723c */
        /*0050*/               @P0 BRA 0x10 ;                                       /* 0x00000004001c0947 */
        /*0060*/                   LDG.E R3, desc[UR8][R4.64] ;                     /* 0x0000000804037981 */
		..........
		Function : _Z3barv
        /*0000*/                   MUFU.EX2 R0, R0 ;                                /* 0x0000000000007308 */
        /*0010*/                   EXIT ;                                           /* 0x000000000000794d */
"""


def test_kernels_and_runs():
    ks = sass_order.kernels(LISTING)
    assert list(ks) == ["_Z3fooPf", "_Z3barv"]
    assert ks["_Z3fooPf"][:3] == ["LDC", "LDG.E.U16.CONSTANT", "LDG.E.128"]  # predicates dropped
    assert sass_order.runs(ks["_Z3fooPf"]) == [("LDG", 2), ("LDS", 1), ("HMMA", 1), ("BRA", 1), ("LDG", 1)]
    assert sass_order.runs(ks["_Z3barv"]) == [("MUFU.EX2", 1)]
    assert sass_order.kind("LDGSTS") is None and sass_order.kind("MUFU.RCP") is None


def test_main_on_a_listing(tmp_path, capsys):
    f = tmp_path / "k.sass"
    f.write_text(LISTING)
    assert sass_order.main(["--sass", str(f), "--kernel", "foo"]) == 0
    out = capsys.readouterr().out
    assert "_Z3fooPf: 7 instructions, 2 runs of global loads" in out
    assert "LDG x2, LDS x1, HMMA x1, BRA x1, LDG x1" in out
    assert sass_order.main(["--sass", str(f), "--kernel", "nothing"]) == 1


LOOP = """
		Function : _Z4loopv
        /*0000*/                   MOV R1, RZ ;                                     /* 0x000000ff00017202 */
        /*0010*/                   LDS R2, [R1] ;                                   /* 0x0000000001027984 */
        /*0020*/                   LDS.64 R4, [R1+0x8] ;                            /* 0x0000080001047984 */
        /*0030*/                   LDS.U16 R6, [R1+0x10] ;                          /* 0x0000100001067984 */
        /*0040*/                   STS.128 [R1+0x20], R8 ;                          /* 0x0000200801007388 */
        /*0050*/                   LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64] ;     /* 0x0000000002017fae */
        /*0054*/                   SHFL.BFLY PT, R3, R2, 0x1, 0x1f ;                /* 0x0c201f0002037f89 */
        /*0058*/              @!PT LDS RZ, [RZ] ;                                   /* 0x00000000ff00b984 */
        /*0060*/               @P0 BRA 0x10 ;                                       /* 0xfffffffc00000947 */
        /*0070*/                   EXIT ;                                           /* 0x000000000000794d */
"""


def test_loops_and_wavefronts():
    assert [
        sass_order.wavefronts(op) for op in ("LDS", "LDS.64", "LDS.U16", "STS.128", "LDGSTS.E.BYPASS.128")
    ] == [
        1,
        2,
        1,
        4,
        4,
    ]
    assert sass_order.wavefronts("FFMA") == 0 and sass_order.wavefronts("LDSM.16.M88.4") == 4
    fn = sass_order.function_text(LISTING + LOOP, "_Z4loopv")
    assert "MOV R1" in fn and "_Z3fooPf" not in fn
    by_op = {
        "LDGSTS.E.BYPASS.128": [1, 4],
        "LDS": [1, 1],
        "LDS.64": [1, 2],
        "LDS.U16": [1, 1],
        "STS.128": [1, 4],
    }
    assert sass_order.loops(fn) == [
        {"start": 0x10, "end": 0x60, "instructions": 8, "wavefronts": 12, "shuffles": 1, "by_op": by_op}
    ]  # the @!PT LDS (never executed) is an instruction without traffic; a shuffle moves no shared memory
    assert sass_order.never("@!PT ") and not sass_order.never("@!P0 ") and not sass_order.never(None)
    assert sass_order.runs(sass_order.kernels(LOOP)["_Z4loopv"]) == [("LDS", 3), ("BRA", 1)]


def test_main_loops_per_key(tmp_path, capsys):
    f = tmp_path / "l.sass"
    f.write_text(LOOP)
    assert sass_order.main(["--sass", str(f), "--kernel", "loop", "--loops", "--per", "4"]) == 0
    out = capsys.readouterr().out
    assert (
        "loop 0x10-0x60: 8 instructions, 12 shared-memory wavefronts = 2.0 and 3.0 per key, 1 shuffles" in out
    )
    assert "LDGSTS.E.BYPASS.128 x1 (4), LDS x1 (1), LDS.64 x1 (2), LDS.U16 x1 (1), STS.128 x1 (4)" in out


def test_resources():
    text = """
 Resource usage:
 Common:
  GLOBAL:0
 Function _Z3fooPf:
  REG:219 STACK:0 SHARED:0 LOCAL:8 CONSTANT[0]:904 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z3barv:
  REG:40 STACK:16 SHARED:0 LOCAL:0 CONSTANT[0]:896 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert sass_order.resources(text) == {
        "_Z3fooPf": {"REG": 219, "STACK": 0, "LOCAL": 8},
        "_Z3barv": {"REG": 40, "STACK": 16, "LOCAL": 0},
    }


def test_config_field():
    """--set FIELD=INT: an integer or boolean AttnConfig field; anything else is refused, naming them."""
    import argparse

    assert sass_order.config_field("ctas=1") == ("ctas", 1)
    assert sass_order.config_field("swizzle=0") == ("swizzle", False)
    for bad in ("ctas", "prec=1", "nope=2", "wtile=x"):
        with pytest.raises(argparse.ArgumentTypeError, match="FIELD=INT with FIELD one of"):
            sass_order.config_field(bad)


def test_nvrtc_errors_say_what_was_expected(tmp_path, caplog):
    """--nvrtc: a path that is no libnvrtc is refused with what was expected and what came, by the compile
    helper, by sass_order and by check_kernels (which checks the path before compiling)."""
    bad = tmp_path / "libnvrtc.so.13"
    bad.write_text("not a library")
    with pytest.raises(RuntimeError, match=r"expected a libnvrtc\.so, got .*libnvrtc\.so\.13"):
        check_kernels.nvrtc_cubin(bad, "", [])
    with pytest.raises(
        SystemExit, match=r"sass_order --nvrtc: expected a libnvrtc\.so, got .*libnvrtc\.so\.13"
    ):
        sass_order.main(["--cupy-default", "polar", "polar", "--nvrtc", str(bad), "--kernel", "x"])
    assert check_kernels.main(["--nvrtc", str(tmp_path / "none.so"), "--only", "polar_encode"]) == 1
    assert "--nvrtc: expected a libnvrtc.so file and --emit cubin, got" in caplog.text  # before any compile


def test_nvrtc_compiles_as_the_gpu_machine(capsys, nvrtc):
    """sass_order --nvrtc with NVRTC 13.0.88: the polar K+V default takes the 164 registers it took on the GPU
    machine in session 43 (nvcc here: 128), and its main loop the 7.5 wavefronts a key of every build."""
    argv = [
        "--cupy-default",
        "polar",
        "polar",
        "--nvrtc",
        str(nvrtc),
        "--kernel",
        "polar_attn_mma",
        "--loops",
    ]
    assert sass_order.main(argv) == 0
    out = capsys.readouterr().out
    assert "164 registers" in out
    assert (
        "LDGSTS.E.BYPASS.128 x18 (72), LDGSTS.E.BYPASS.128.ZFILL x14 (56), LDS x360 (360), LDS.U16 x32 (32)"
        in out
    )


def test_check_kernels_nvrtc_reports_a_failed_compile(tmp_path, nvrtc):
    """check_kernels --nvrtc: a variant NVRTC refuses comes back as its message (the run goes on)."""
    lib = nvrtc
    ok = check_kernels.Variant("polar_attn_combine.cu", (("HD", 128),))
    assert check_kernels.compile_one(ok, "", "sm_90", "cubin", tmp_path, None, nvrtc=lib) is None
    bad = check_kernels.Variant("polar_attn_combine.cu", (("HD", "not_a_number"),))
    err = check_kernels.compile_one(bad, "", "sm_90", "cubin", tmp_path, None, nvrtc=lib)
    assert err and err.startswith("NVRTC failed (") and "error" in err


@pytest.mark.parametrize(
    "run,batch,fmts,phases,count",
    [  # session 41: tune-mma --phases ctas depth shapes on an H100 (B=8); session 44: depth ctas on the H200
        ("h100-llama/session41/tune-b8.txt", 8, bench_gpu.MMA_TUNE_FMTS, ("depth", "ctas", "shapes"), 30),
        ("h200-llama/session44/issue11-tune.txt", 16, (("polar", "polar"),), ("depth", "ctas"), 19),
    ],
)
def test_nvrtc_gives_the_registers_the_gpu_runs_recorded(nvrtc, run, batch, fmts, phases, count):
    """Every polar K+V variant of a tune-mma run on a GPU (its text records each one's registers there) takes
    the same registers compiled here with --nvrtc: the check behind results-gpu's register counts (session
    43's "all 30"; session 44's 12 warps, 143)."""
    import re

    from cupy_kernels import attention

    text = (Path(__file__).parents[1] / "docs/gpu" / run).read_text()
    row = rf"B{batch} T32768 32/8 D128 polar\+polar (\S+)\s+\w+\s+splits.*?regs\s+(\d+)"
    there = dict(re.findall(row, text))
    base = attention.default_config("polar")
    seen = {}
    for _, k, v, cfg in bench_gpu.tune_mma_grid(fmts, phases):
        label = bench_gpu.mma_label(cfg)
        if (k, v) != ("polar", "polar") or label not in there or label in seen:
            continue
        changes = {
            f.name: getattr(cfg, f.name)
            for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(base, f.name)
        }
        text = sass_order.cupy_default_sass(k, v, "90", changes, None, nvrtc)
        name = next(n for n in sass_order.kernels(text) if "polar_attn_mma" in n)
        seen[label] = (sass_order.resources(text)[name]["REG"], int(there[label]))
    assert len(seen) == count
    assert {lab: r for lab, r in seen.items() if r[0] != r[1]} == {}


def test_nvrtc_takes_the_last_ftz_option(tmp_path, nvrtc):
    """CuPy appends -ftz=true after the caller's options (the encoder's --ftz=false among them): NVRTC takes
    the last, as loader.py's comment says."""
    import subprocess

    src = 'extern "C" __global__ void k(float* o, const float* a) { o[threadIdx.x] = a[threadIdx.x] * a[0]; }'
    lib = nvrtc
    for opts, ftz in ((["--ftz=false", "-ftz=true"], True), (["-ftz=true", "--ftz=false"], False)):
        cubin, _ = check_kernels.nvrtc_cubin(lib, src, [*opts, "-arch=sm_90"])
        (tmp_path / "k.cubin").write_bytes(cubin)
        sass = subprocess.run(
            ["cuobjdump", "-sass", str(tmp_path / "k.cubin")], capture_output=True, text=True
        )
        assert ("FMUL.FTZ" in sass.stdout) == ftz, opts
