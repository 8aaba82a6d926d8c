#!/usr/bin/env python3
"""The order of a CUDA kernel's memory loads and tensor products in its SASS, without a GPU.

    python3 scripts/sass_order.py TREE FILE.cu --kernel REGEX [--arch 90]
    python3 scripts/sass_order.py --sass FILE.sass --kernel REGEX
    python3 scripts/sass_order.py --cupy-default KFMT VFMT --kernel polar_attn_mma --loops [--per 64]
    python3 scripts/sass_order.py --cupy-default KFMT VFMT --nvrtc LIB --kernel polar_attn_mma --loops

--nvrtc LIB compiles the CuPy default with that libnvrtc.so (PyPI's nvidia-cuda-nvrtc) and the options CuPy
passes on the GPU machine (check_kernels.DEVICE_NVRTC_OPTIONS), instead of with nvcc: the binary the GPU
machine runs.
Session 43: the GPU machine's CuPy reports NVRTC 13.0, and its polar K+V default took 164 registers there
against 128 from nvcc 13.0 here; NVRTC 13.0.88 with those options gives 164 too (and 128 for the two
variants that took 128 there), so the instruction counts of --nvrtc are the GPU's (`pip install
nvidia-cuda-nvrtc==13.0.88`, LIB = .../nvidia/cu13/lib/libnvrtc.so.13).

Compiles FILE.cu of a patched llama.cpp tree (with scripts/ggml_cuda_nvcc.sh: nvcc and cuobjdump on PATH,
PyPI's nvidia-cuda-nvcc has them) or reads a `cuobjdump -sass` listing, and prints, for every kernel whose
mangled name matches REGEX, its registers, stack and local memory (of a compile: `cuobjdump -res-usage`), and
its instructions of a few kinds in program order as runs: global loads (LDG),
shared loads (LDS), tensor products (HMMA), exp2 (MUFU.EX2), branches (BRA), barriers (BAR), e.g.
`LDG x5, LDS x8, BRA x1, LDG x8, HMMA x4, ...`. A loop whose loads come in several runs, each after the
products of the previous one, waits for memory once per run (session 18: the polar tensor-core flash
attention kernel, `docs/results-cuda.md`). Exit status 1 when no kernel matches or a compile fails.

--cupy-default KFMT VFMT compiles the CuPy attention kernel's default variant for those formats (head size
128, 4 query rows a KV head, float16 q: issue 11's benchmark) from cupy_kernels' own defines and source.
--loops lists each loop (a backward branch) with its instruction count and its shared-memory traffic in
wavefronts of 128 bytes, as if conflict-free: a 32-bit LDS or STS is 1, a 64-bit one 2, a 128-bit one 4
(narrower loads 1), a 16-byte cp.async (LDGSTS) 4, one that never executes (`@!PT LDS RZ, [RZ]`, ptxas's
placeholders after cp.async copies) 0; --per N divides both by N (keys a loop iteration takes).
An SM serves one wavefront a cycle, so a loop that needs more wavefronts than it issues instructions per
scheduler is bound by shared memory (session 18, `docs/results-gpu.md`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_gpu_lib import config_field

KINDS = ("LDG", "LDS", "HMMA", "MUFU.EX2", "BRA", "BAR")
_INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def never(pred: str | None) -> bool:
    """Whether a predicate guard never holds: `@!PT` (not true), which ptxas puts on placeholder instructions
    such as `@!PT LDS RZ, [RZ]` after cp.async copies; they take an issue slot and move no bytes."""
    return bool(pred) and pred.strip() in ("@!PT", "@!UPT")


def kernels(sass: str) -> dict[str, list[str]]:
    """{mangled name: its instruction opcodes in order} of a cuobjdump -sass listing."""
    out: dict[str, list[str]] = {}
    cur = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = out.setdefault(m.group(1), [])
            continue
        m = _INSN.search(line)
        if m and cur is not None:
            cur.append("NOP" if never(m.group(1)) else m.group(2))  # (a never-executed load is no load)
    return out


def kind(op: str) -> str | None:
    for k in KINDS:
        if op == k or op.startswith(k + "."):
            return k
    return None


def runs(ops: list[str]) -> list[tuple[str, int]]:
    """The opcodes of KINDS in order, consecutive ones of a kind merged: [(kind, count)]."""
    out: list[tuple[str, int]] = []
    for op in ops:
        k = kind(op)
        if k is None:
            continue
        if out and out[-1][0] == k:
            out[-1] = (k, out[-1][1] + 1)
        else:
            out.append((k, 1))
    return out


def wavefronts(op: str) -> int:
    """Shared-memory wavefronts of one warp instruction (conflict-free), 0 for other instructions."""
    if op.startswith("LDGSTS"):
        return 4 if ".128" in op else (2 if ".64" in op else 1)
    if op.startswith("LDSM"):  # ldmatrix: .x1 / .x2 / .x4 8x8 matrices of 16 bits (128 bytes each)
        return 4 if op.endswith(".4") else (2 if op.endswith(".2") else 1)
    if op.split(".")[0] in ("LDS", "STS"):
        if ".128" in op:
            return 4
        return 2 if ".64" in op else 1
    return 0


def loops(sass_fn: str) -> list[dict]:
    """The loops of one kernel's listing (cuobjdump -sass text of one function): a backward branch and its
    target; per loop its instruction count, shared-memory wavefronts (see `wavefronts`), warp shuffles (SHFL:
    no shared memory, but 32 results a cycle an SM in CUDA's throughput table, one wavefront's rate) and, by
    opcode, the shared-memory instructions and their wavefronts ("by_op": {opcode: [instructions,
    wavefronts]}, all paths of the body counted, also those a given iteration skips)."""
    ins = []
    for line in sass_fn.splitlines():
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", line)
        if m:  # a never-executed instruction counts as an instruction, not as shared-memory traffic
            ins.append((int(m.group(1), 16), "NOP" if never(m.group(2)) else m.group(3), m.group(4)))
    out = []
    for addr, op, rest in ins:
        m = re.search(r"0x([0-9a-f]+)\s*$", rest.strip())
        if op == "BRA" and m and int(m.group(1), 16) < addr:
            lo = int(m.group(1), 16)
            body = [o for a, o, _ in ins if lo <= a <= addr]
            by_op: dict[str, list[int]] = {}
            for o in body:
                if wavefronts(o):
                    cell = by_op.setdefault(o, [0, 0])
                    cell[0] += 1
                    cell[1] += wavefronts(o)
            out.append(
                {
                    "start": lo,
                    "end": addr,
                    "instructions": len(body),
                    "wavefronts": sum(map(wavefronts, body)),
                    "shuffles": sum(1 for o in body if o.split(".")[0] == "SHFL"),
                    "by_op": dict(sorted(by_op.items())),
                }
            )
    return out


def function_text(sass: str, name: str) -> str:
    """The listing of one function of a cuobjdump -sass text."""
    parts = re.split(r"(?=\n\s*Function : )", sass)
    return next((p for p in parts if f"Function : {name}" in p), "")


def cupy_default_sass(
    kfmt: str,
    vfmt: str,
    arch: str,
    overrides: dict | None = None,
    out_type: int | None = None,
    nvrtc: Path | None = None,
) -> str:
    """SASS (and resource usage) of the CuPy attention kernel's default variant (head size 128, 4 rows,
    float16 q), with the AttnConfig fields in `overrides` changed (out_type: the variant writing the output
    itself in that type, OUT_TYPE, as a plan of one split runs it), compiled as scripts/check_kernels.py
    compiles every variant; with nvrtc (a libnvrtc.so), as CuPy compiles it on the GPU machine instead."""
    import check_kernels
    from cupy_kernels import attention

    cfg = dataclasses.replace(attention.default_config(vfmt, D=128), **(overrides or {}))
    d = tuple(attention.attn_defines(128, kfmt, vfmt, 4, 1, cfg).items())
    if out_type is not None:
        d = attention.direct_defines(d, out_type)
    v = check_kernels.Variant(f"{attention.KERNELS[cfg.impl]}.cu", d)
    nvcc = shutil.which("nvcc")
    if nvrtc is None and not nvcc:
        raise SystemExit("sass_order: nvcc and cuobjdump must be on PATH (pip install nvidia-cuda-nvcc)")
    with tempfile.TemporaryDirectory() as tmp:  # with nvrtc: as CuPy compiles it on the GPU machine
        err = check_kernels.compile_one(v, nvcc or "", f"sm_{arch}", "cubin", Path(tmp), None, nvrtc=nvrtc)
        if err and nvrtc is not None:
            raise SystemExit(f"sass_order --nvrtc: {err}")
        if err:
            print(err, file=sys.stderr)
            raise SystemExit(f"sass_order: nvcc failed on {v.label}")
        if not shutil.which("cuobjdump"):
            raise SystemExit("sass_order: cuobjdump must be on PATH (pip install nvidia-cuda-cuobjdump)")
        return _listings(str(Path(tmp) / f"{v.key}.cubin"))


def _listings(obj: str) -> str:
    """cuobjdump -sass of an object, followed by its -res-usage lines (registers, stack, local memory)."""
    cuobjdump = shutil.which("cuobjdump")
    sass = subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([cuobjdump, "-res-usage", obj], capture_output=True, text=True, check=True).stdout
    return sass + "\n" + res


def resources(text: str) -> dict[str, dict[str, int]]:
    """{mangled name: {"REG": .., "STACK": .., "LOCAL": ..}} from cuobjdump -res-usage lines in text."""
    out: dict[str, dict[str, int]] = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+?):?\s*$", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            out[name] = {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", line)}
            name = None
    return out


def compile_sass(tree: Path, file: str, arch: str) -> str:
    """cuobjdump -sass of FILE of a patched llama.cpp tree, compiled by scripts/ggml_cuda_nvcc.sh (the flags
    cuda_sass_diff.sh and gpu_run.sh's harness build use too)."""
    nvcc, cuobjdump = shutil.which("nvcc"), shutil.which("cuobjdump")
    if not nvcc or not cuobjdump:
        raise SystemExit("sass_order: nvcc and cuobjdump must be on PATH (pip install nvidia-cuda-nvcc)")
    with tempfile.TemporaryDirectory() as tmp:
        obj = os.path.join(tmp, "out.o")
        script = Path(__file__).resolve().parent / "ggml_cuda_nvcc.sh"
        cmd = [str(script), str(tree), arch, "-c", str(tree / file)]
        p = subprocess.run([*cmd, "-o", obj], capture_output=True, text=True)
        if p.returncode:
            print(p.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"sass_order: nvcc failed on {tree / file}")
        return _listings(obj)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tree", nargs="?", type=Path, help="a patched llama.cpp source tree")
    ap.add_argument("file", nargs="?", help="a .cu file under the tree")
    ap.add_argument("--sass", type=Path, help="a cuobjdump -sass listing instead of a compile")
    ap.add_argument(
        "--nvrtc",
        type=Path,
        metavar="LIB",
        help="--cupy-default: compile with this libnvrtc.so as CuPy does there",
    )
    ap.add_argument("--kernel", required=True, help="regular expression over the mangled kernel names")
    ap.add_argument("--arch", default="90")
    ap.add_argument("--cupy-default", nargs=2, metavar=("KFMT", "VFMT"), help="the CuPy attention default")
    ap.add_argument(
        "--set",
        nargs="+",
        default=[],
        type=config_field,
        metavar="FIELD=INT",
        help="--cupy-default: AttnConfig fields changed, e.g. ctas=1 wtile=32",
    )
    ap.add_argument(
        "--out-type",
        type=int,
        choices=[0, 1, 2],
        help="--cupy-default: the variant writing the output itself (one split): float32, float16, bfloat16",
    )
    ap.add_argument(
        "--loops", action="store_true", help="each loop's instructions and shared-memory wavefronts"
    )
    ap.add_argument("--per", type=int, default=0, help="--loops: divide by N (keys a loop iteration takes)")
    args = ap.parse_args(argv)
    if args.sass:
        text = args.sass.read_text()
    elif args.cupy_default:
        text = cupy_default_sass(*args.cupy_default, args.arch, dict(args.set), args.out_type, args.nvrtc)
    elif args.tree and args.file:
        text = compile_sass(args.tree, args.file, args.arch)
    else:
        ap.error("give TREE FILE.cu, --sass FILE or --cupy-default KFMT VFMT")
    found = {n: ops for n, ops in kernels(text).items() if re.search(args.kernel, n)}
    if not found:
        print(f"sass_order: no kernel matches {args.kernel!r}", file=sys.stderr)
        return 1
    res = resources(text)
    for name, ops in found.items():
        r = runs(ops)
        rs = res.get(name)
        extra = (
            f"; {rs.get('REG', 0)} registers, stack {rs.get('STACK', 0)}, local {rs.get('LOCAL', 0)}"
            if rs
            else ""
        )
        print(
            f"{name}: {len(ops)} instructions, "
            f"{sum(1 for k, _ in r if k == 'LDG')} runs of global loads{extra}"
        )
        print("  " + ", ".join(f"{k} x{n}" for k, n in r))
        if args.loops:
            for lp in loops(function_text(text, name)):
                per = ""
                if args.per:
                    n = args.per
                    per = f" = {lp['instructions'] / n:.1f} and {lp['wavefronts'] / n:.1f} per key"
                print(
                    f"  loop 0x{lp['start']:x}-0x{lp['end']:x}: {lp['instructions']} instructions, "
                    f"{lp['wavefronts']} shared-memory wavefronts{per}, {lp['shuffles']} shuffles"
                )
                if lp["by_op"]:
                    print("    " + ", ".join(f"{o} x{n} ({w})" for o, (n, w) in lp["by_op"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
