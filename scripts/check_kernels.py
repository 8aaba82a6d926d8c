#!/usr/bin/env python3
"""Compile every CuPy kernel variant with nvcc, without a GPU.

    python scripts/check_kernels.py              the variants of the tested shapes (cubin, sm_90)
    python scripts/check_kernels.py --all        every shape with every format, q type and row count
    python scripts/check_kernels.py --emit ptx --out DIR   keep the PTX of each variant in DIR
    python scripts/check_kernels.py --list       print the variants, compile nothing
    python scripts/check_kernels.py --smem       each attention variant's shared memory and the CTAs a SM that
                                                 the plan counts against what a SM holds (compile nothing)
    python scripts/check_kernels.py --resources --only polar_encode   ptxas -v: registers, spills, smem
    python scripts/check_kernels.py --sass-count --only polar_encode  SASS instructions per entry (cuobjdump)
    python scripts/check_kernels.py --nvrtc LIB [--resources]   with the GPU machine's compiler (NVRTC 13.0)

The source of each variant is the text cupy_kernels.loader gives NVRTC (`build_source`: the
#defines of cupy_kernels.attention's plan, then the file), compiled with the loader's options
plus -arch; --nvrtc LIB: by that libnvrtc.so (PyPI's nvidia-cuda-nvrtc==13.0.88, the version CuPy reports on
the GPU machine) with the options CuPy adds there (DEVICE_NVRTC_OPTIONS), whose registers and code differ from
nvcc's. Variants: the encoder, its throughput and latency variants (cupy_kernels.codec.ENCODE_VARIANTS,
CTA_VARIANTS),
polar_attn_combine per head dim, and polar_attn_mma / polar_attn_simt for head dims
64/128/256, K/V formats polar, polar3, paperb (the research
preset, registered from scripts/study) and float16 V, every kmode, q float32/float16/bfloat16
(mma precision fp32/fp16), the configurations of tests/test_gpu_attention.py and the shipped
defaults. NVRTC has no host headers: the kernel sources may include only each other and the
generated header (checked first). Exit status 1 if anything fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cupy_kernels import attention, codec, loader
from study import paperb_kernel_ref

log = logging.getLogger("check_kernels")

ATTN_CASES = [  # (kfmt, vfmt, kmode)
    *(
        (k, v, "gather")
        for k, v in (
            ("polar", "polar"),
            ("polar3", "polar3"),
            ("polar", "f16"),
            ("polar3", "f16"),
            ("polar", "polar3"),
            ("paperb", "paperb"),
            ("paperb", "f16"),
        )
    ),
    ("paperb", "paperb", "anglelut"),
    ("paperb", "f16", "anglelut"),
    ("polar3", "polar3", "lut"),
    ("polar", "polar", "lut"),
]
CONFIGS = [  # kernel shapes besides default_config: tests/test_gpu_attention.py, scripts/bench_gpu.py
    attention.SIMT_CONFIG,
    attention.SIMT_CONFIG_F16V,
    attention.AttnConfig(impl="simt"),
    attention.AttnConfig(impl="simt", nwarps=8, tpt=1, stages=2, repl=8),
    attention.AttnConfig(impl="simt", nwarps=2, tpt=2, stages=4, repl=16),
    attention.AttnConfig(nwarps=4, wtile=32, stages=4),
    attention.AttnConfig(nwarps=8, wtile=16, stages=2),
    attention.AttnConfig(nwarps=2, wtile=64, stages=3),
    attention.AttnConfig(nwarps=2, wtile=48, stages=5, prec="fp16"),
    attention.AttnConfig(prec="fp16"),
    # issue 11's instruction cuts (pdw, smlean, vunroll, ptrs) on the defaults, with kvsplit, on a 48-key tile
    # (32 + 16 keys) without the swizzle; fp16 operands for smlean's repeated q columns
    *(
        dataclasses.replace(attention.DEFAULT_CONFIG, **kw)
        for kw in (
            dict(vunroll=True),
            dict(pdw=True),
            dict(smlean=1),
            dict(smlean=2),
            dict(pdw=True, smlean=2, vunroll=True),
            dict(pdw=True, smlean=1, vunroll=True, prec="fp16"),
            dict(pdw=True, smlean=2, vunroll=True, prec="fp16"),
            dict(stages=1, kvsplit=True, pdw=True, smlean=1, vunroll=True),
            dict(stages=1, kvsplit=True, pdw=True, smlean=2, vunroll=True, prec="fp16"),
            dict(nwarps=2, wtile=48, stages=3, swizzle=False, pdw=True, smlean=1, prec="fp16"),
            dict(ptrs=True),
            dict(pdw=True, smlean=1, vunroll=True, ptrs=True, prec="fp16"),
            dict(nwarps=2, wtile=48, stages=3, lean=0, kvsplit=True, pdw=True, smlean=2, ptrs=True),
        )
    ),
    dataclasses.replace(attention.F16V_CONFIG, pdw=True, smlean=1, vunroll=True),
    dataclasses.replace(attention.F16V_CONFIG, pdw=True, smlean=2, vunroll=True, prec="fp16"),
    dataclasses.replace(attention.F16V_CONFIG, pdw=True, smlean=1, vunroll=True, ptrs=True),
    dataclasses.replace(attention.DEFAULT_CONFIG, cta_times=True),  # bench_gpu.py anatomy's stamps
    dataclasses.replace(attention.DEFAULT_CONFIG, cta_times=True, qstage=False),
    # q from global memory (the defaults before session 19), with fp16 and fp32 operands
    dataclasses.replace(attention.DEFAULT_CONFIG, qstage=False),
    dataclasses.replace(attention.DEFAULT_CONFIG, qstage=False, prec="fp16"),
    dataclasses.replace(attention.F16V_CONFIG, qstage=False),
    dataclasses.replace(attention.POLAR3V_CONFIG, qstage=False),
    # polar's default with the CTAs a SM asked of ptxas (AttnConfig.ctas; tune-mma's "ctas" phase)
    dataclasses.replace(attention.DEFAULT_CONFIG, ctas=2),
    dataclasses.replace(attention.DEFAULT_CONFIG, ctas=1, wtile=32),
    # tune-mma's "depth" phase: deeper rings, more warps in the CTA
    dataclasses.replace(attention.DEFAULT_CONFIG, stages=2),
    dataclasses.replace(attention.DEFAULT_CONFIG, nwarps=12),
    # session 43: the compile's register budget (AttnConfig.maxrreg, --maxrregcount)
    dataclasses.replace(attention.DEFAULT_CONFIG, maxrreg=255),
    # session 45: P d by warp shuffles (AttnConfig.pshfl), on the defaults and 32-key tiles (12 warps without
    # it, the loop-bound default before it, is the depth phase's nwarps=12 above)
    dataclasses.replace(attention.DEFAULT_CONFIG, pshfl=True),
    dataclasses.replace(attention.POLAR3V_CONFIG, pshfl=True),
    dataclasses.replace(attention.DEFAULT_CONFIG, pshfl=True, wtile=32, stages=2),
]


@dataclasses.dataclass(frozen=True)
class Variant:
    file: str
    defines: tuple[tuple[str, int], ...]
    exact: bool = False

    @property
    def label(self) -> str:
        return f"{self.file} " + " ".join(f"{k}={v}" for k, v in self.defines)

    @property
    def key(self) -> str:
        stem = self.file.removesuffix(".cu")
        return f"{stem}-{hashlib.sha256(self.label.encode()).hexdigest()[:12]}"


def _attn(seen: dict, D: int, kfmt: str, vfmt: str, cfg, fallback: bool, qt: int, rb: int) -> None:
    """The variant of cfg (and, for a default (fallback) mma variant, the one writing the output itself in q's
    type: OUT_TYPE, run's kernel for a plan of one split)."""
    if cfg.kmode != "gather" and cfg.impl == "mma":
        cfg = dataclasses.replace(cfg, impl="simt")
    c, d, smem = attention.select_variant(D, kfmt, vfmt, rb, qt, cfg, fallback)
    if smem <= attention.SMEM_LIMIT:
        seen.setdefault(Variant(f"{attention.KERNELS[c.impl]}.cu", tuple(d.items())), None)
        if fallback and c.impl == "mma":
            direct = attention.direct_defines(tuple(d.items()), qt)
            seen.setdefault(Variant(f"{attention.KERNELS[c.impl]}.cu", direct), None)


def variants(full: bool) -> list[Variant]:
    """Default: every format pair, kmode, head dim, q type and 1/4/8 rows with the default shape
    and the tests' simt shape, and the other shapes at D=128, 4 rows, float32 q (as the tests
    run them). full: every shape with every format pair, q type and row count 1..8."""
    paperb_kernel_ref.register_kernel_format()
    out = [Variant("polar_encode.cu", (), exact=True)]
    enc = dict.fromkeys(v.defines for v in codec.ENCODE_VARIANTS.values() if v.defines)
    enc.update(dict.fromkeys(d for d in codec.CTA_VARIANTS.values() if d))
    out += [Variant("polar_encode.cu", d, exact=True) for d in enc]
    out += [Variant("polar_attn_combine.cu", (("HD", D),)) for D in attention.HEAD_DIMS]
    seen: dict[Variant, None] = {}
    rows = range(1, 9) if full else (1, 4, 8)
    for D in attention.HEAD_DIMS:
        for kfmt, vfmt, kmode in ATTN_CASES:
            for qt in (0, 1, 2):
                for rb in rows:
                    _attn(seen, D, kfmt, vfmt, attention.default_config(vfmt, kmode, D), True, qt, rb)
                    # the default of calls with few work items (plan's units), where it differs
                    _attn(
                        seen, D, kfmt, vfmt, attention.default_config(vfmt, kmode, D, units=1), True, qt, rb
                    )
                    # the default on a GPU whose memory outruns the polar K+V loop (an H200), where it differs
                    loop_bound = attention.default_config(vfmt, kmode, D, loop_bound=True)
                    _attn(seen, D, kfmt, vfmt, loop_bound, True, qt, rb)
                    _attn(seen, D, kfmt, vfmt, attention.AttnConfig(kmode=kmode, impl="simt"), False, qt, rb)
                    for cfg in CONFIGS if full else ():
                        _attn(seen, D, kfmt, vfmt, dataclasses.replace(cfg, kmode=kmode), False, qt, rb)
    for cfg in () if full else CONFIGS:
        for vfmt in ("polar", "f16"):
            _attn(seen, 128, "polar", vfmt, cfg, False, 0, 4)
    return out + list(seen)


SM_SMEM = 228 * 1024  # shared memory a SM of sm_90 (polar_attn_mma.cu's SMEM_CTAS divides it)


def smem_report(vs: list[Variant]) -> list[str]:
    """A line per attention variant of vs: its dynamic shared memory (attention.smem_bytes), the CTAs a SM the
    plan counts by it (attention._per_sm, registers left out) and those a SM holds (SM_SMEM / (smem + 1 KiB),
    threads and the 16-CTA cap applied alike); then how many of them differ."""
    out, differ, n = [], 0, 0
    for v in vs:
        impl = next((i for i, k in attention.KERNELS.items() if v.file == f"{k}.cu"), None)
        if impl is None:
            continue
        d = dict(v.defines)
        smem = attention.smem_bytes(impl, d)
        nthreads = d["NWARPS"] * 32
        plan = attention._per_sm(smem, nthreads, 0)
        sm = max(1, min(SM_SMEM // (smem + 1024), 2048 // nthreads, 16))
        n += 1
        differ += plan != sm
        out.append(f"{smem:7d} bytes  plan {plan}  SM {sm}{'  differs' if plan != sm else ''}  {v.label}")
    return [*out, f"{n} attention variants, {differ} where the plan's CTAs a SM differ from the SM's"]


def check_includes() -> list[str]:
    """Problems with the #includes of the kernel sources: NVRTC finds only the include path."""
    dirs = (loader.kernel_dir(), loader.header_dir())
    bad = []
    for p in sorted(loader.kernel_dir().glob("*.cu*")):
        for m in re.finditer(r'^\s*#\s*include\s*([<"])([^>"]+)', p.read_text(), re.M):
            if m.group(1) == "<":
                bad.append(f"{p.name}: #include <{m.group(2)}> (a host header: NVRTC has none)")
            elif not any((d / m.group(2)).is_file() for d in dirs):
                bad.append(f'{p.name}: #include "{m.group(2)}" is not on the include path')
    return bad


_PTXAS_USAGE = re.compile(
    r"Compiling entry function '(\w+)'.*?(\d+) bytes stack frame, (\d+) bytes spill stores, "
    r"(\d+) bytes spill loads.*?Used (\d+) registers([^\n]*)",
    re.S,
)


def resources(ptxas_log: str) -> list[str]:
    """One line per entry function of a ptxas -v log: registers, stack, spills, static smem (ptxas 12 prints
    it on the registers' line, ptxas 13 only where there is some: "-" then)."""
    out = []
    for m in _PTXAS_USAGE.finditer(ptxas_log):
        smem = re.search(r"(\d+) bytes smem", m[6])
        spill = f"spill st/ld {m[3]}/{m[4]}"
        out.append(f"  {m[1]:<44} regs {m[5]:>3}  stack {m[2]:>3}  {spill}  smem {smem[1] if smem else '-'}")
    return out


_SASS_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_SASS_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S")


def sass_counts(sass: str) -> dict[str, int]:
    """SASS instructions per function in `cuobjdump -sass` output (the lines with an address)."""
    counts: dict[str, int] = {}
    fn = None
    for line in sass.splitlines():
        m = _SASS_FUNCTION.match(line)
        if m:
            fn = m.group(1)
            counts[fn] = 0
        elif fn is not None and _SASS_INSTRUCTION.match(line):
            counts[fn] += 1
    return counts


# What CuPy adds after cupy_kernels.loader's options on the GPU machine: -ftz=true (cupy.cuda.compiler's
# _compile_with_cache_cuda appends it, and NVRTC takes the last of --ftz=false / -ftz=true); -default-device
# is inferred, not read: NVRTC 13.0.88 refuses the kernel's lambdas without it. With both, the three variants
# session 43 timed take the registers they took there (164, 128, 128).
DEVICE_NVRTC_OPTIONS = ("-default-device", "-ftz=true")


def nvrtc_cubin(lib: Path, source: str, options: list[str]) -> tuple[bytes, str]:
    """(cubin, NVRTC's log) of source compiled by the libnvrtc at lib (ctypes) with options; RuntimeError with
    the log when it fails."""
    import ctypes

    try:
        for builtins in sorted(Path(lib).parent.glob("libnvrtc-builtins.so.*")):  # NVRTC opens them by name:
            if re.fullmatch(r"libnvrtc-builtins\.so(\.[0-9]+)+", builtins.name):  # (not bootstrap's stamps)
                ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)  # loaded first, no LD_LIBRARY_PATH needed
        nv = ctypes.CDLL(str(lib))
    except OSError as e:
        raise RuntimeError(f"expected a libnvrtc.so, got {lib}: {e}") from None
    prog = ctypes.c_void_p()
    if nv.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernel.cu", 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    try:
        opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        rc = nv.nvrtcCompileProgram(prog, len(options), opts)
        n = ctypes.c_size_t()
        nv.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        nv.nvrtcGetProgramLog(prog, log)
        if rc:
            raise RuntimeError(f"NVRTC failed ({' '.join(options)}):\n{log.value.decode(errors='replace')}")
        nv.nvrtcGetCUBINSize(prog, ctypes.byref(n))
        out = ctypes.create_string_buffer(n.value)
        if nv.nvrtcGetCUBIN(prog, out):
            raise RuntimeError("NVRTC gave no cubin (older than 11.1?)")
        return out.raw, log.value.decode(errors="replace")
    finally:
        nv.nvrtcDestroyProgram(ctypes.byref(prog))


def compile_one(
    v: Variant,
    nvcc: str,
    arch: str,
    emit: str,
    tmp: Path,
    out: Path | None,
    usage: bool = False,
    cuobjdump: str | None = None,
    nvrtc: Path | None = None,
) -> str | None:
    """None if `v` compiles, else the compiler's message; usage: the ptxas -v lines (resources);
    cuobjdump: the SASS instruction count of each entry (a cubin); nvrtc: compiled by that libnvrtc with
    DEVICE_NVRTC_OPTIONS (a cubin), as CuPy compiles it on the GPU machine, instead of by nvcc."""
    source = loader.build_source(v.file, dict(v.defines))
    opts = [
        *loader.OPTIONS,
        *loader.include_options(),
        *(loader.EXACT_OPTIONS if v.exact else ()),
        *loader.define_options(v.defines),
    ]
    dst = (out or tmp) / f"{v.key}.{emit}"
    if nvrtc is not None:
        try:
            cubin, text = nvrtc_cubin(
                nvrtc,
                source,
                [*opts, *DEVICE_NVRTC_OPTIONS, f"-arch={arch}", *(["-Xptxas=-v"] if usage else [])],
            )
        except RuntimeError as e:
            return str(e)[-3000:]
        dst.write_bytes(cubin)
    else:
        src = tmp / f"{v.key}.cu"
        src.write_text(source)
        cmd = [nvcc, *opts, f"-arch={arch}", f"--{emit}", str(src), "-o", str(dst)]
        cmd += ["-Xptxas=-v"] if usage else []
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode or not dst.is_file():
            return f"nvcc exit status {r.returncode}\n" + (r.stderr + r.stdout).strip()[-3000:]
        text = r.stderr + r.stdout
    if out is not None:
        (out / f"{v.key}.txt").write_text(v.label + "\n")
    if usage:
        log.info("%s\n%s", v.label, "\n".join(resources(text)))
    if cuobjdump:
        d = subprocess.run([cuobjdump, "-sass", str(dst)], capture_output=True, text=True)
        if d.returncode:
            return f"cuobjdump exit status {d.returncode}\n" + d.stderr.strip()[-3000:]
        counts = sass_counts(d.stdout)
        log.info(
            "%s\n%s", v.label, "\n".join(f"  {fn:<44} {n:6d} SASS instructions" for fn, n in counts.items())
        )
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="every shape x format pair x q type x rows 1..8")
    ap.add_argument("--arch", default="sm_90", help="nvcc -arch (default sm_90)")
    ap.add_argument("--emit", choices=("cubin", "ptx"), default="cubin", help="cubin also runs ptxas")
    ap.add_argument("--out", type=Path, help="keep the outputs here, with a .txt naming each variant")
    ap.add_argument("--nvcc", default=shutil.which("nvcc") or "/usr/local/bin/nvcc")
    ap.add_argument(
        "--nvrtc",
        type=Path,
        metavar="LIB",
        help="compile with this libnvrtc.so and CuPy's options there (DEVICE_NVRTC_OPTIONS; cubin)",
    )
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--list", action="store_true", help="print the variants and exit")
    ap.add_argument(
        "--smem", action="store_true", help="print the attention variants' smem and CTAs a SM, exit"
    )
    ap.add_argument(
        "--only", metavar="FILE", help="only the variants of this kernel file (e.g. polar_encode)"
    )
    ap.add_argument("--resources", action="store_true", help="print ptxas -v registers/spills/smem per entry")
    ap.add_argument(
        "--sass-count", action="store_true", help="print the SASS instructions of each entry (cubin)"
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")

    bad = check_includes()
    for b in bad:
        log.error("%s", b)
    vs = variants(args.all)
    if args.only:
        vs = [v for v in vs if v.file.removesuffix(".cu") == args.only.removesuffix(".cu")]
    if args.list:
        print(*(v.label for v in vs), sep="\n")
        return 1 if bad else 0
    if args.smem:
        print(*smem_report(vs), sep="\n")
        return 1 if bad else 0
    if args.nvrtc is not None and (args.emit != "cubin" or not args.nvrtc.is_file()):
        log.error(
            "--nvrtc: expected a libnvrtc.so file and --emit cubin, got %s and --emit %s",
            args.nvrtc,
            args.emit,
        )
        return 1
    if args.nvrtc is None and not Path(args.nvcc).exists():
        log.error("nvcc not found (%s): pass --nvcc", args.nvcc)
        return 1
    cuobjdump = None
    if args.sass_count:
        cuobjdump = shutil.which("cuobjdump") or str(Path(args.nvcc).with_name("cuobjdump"))
        if args.emit != "cubin" or not Path(cuobjdump).exists():
            log.error(
                "--sass-count needs --emit cubin and cuobjdump (next to nvcc or on PATH), got %s", cuobjdump
            )
            return 1
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    log.info(
        "compiling %d variants with %s (-arch=%s, %d jobs)",
        len(vs),
        args.nvrtc or args.nvcc,
        args.arch,
        args.jobs,
    )
    failed = 0
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(args.jobs) as ex:
        jobs = {
            ex.submit(
                compile_one,
                v,
                args.nvcc,
                args.arch,
                args.emit,
                Path(tmp),
                args.out,
                args.resources,
                cuobjdump,
                args.nvrtc,
            ): v
            for v in vs
        }
        for i, fut in enumerate(concurrent.futures.as_completed(jobs), 1):
            v, err = jobs[fut], fut.result()
            if err:
                failed += 1
                log.error("FAILED %s\n%s", v.label, err)
            else:
                log.debug("ok %s", v.label)
            if i % 50 == 0:
                log.info("%d/%d", i, len(vs))
    log.info("%d variants, %d failed", len(vs), failed)
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
