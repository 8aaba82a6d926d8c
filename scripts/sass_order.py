#!/usr/bin/env python3
"""The order of a CUDA kernel's memory loads and tensor products in its SASS, without a GPU.

    python3 scripts/sass_order.py TREE FILE.cu --kernel REGEX [--arch 90]
    python3 scripts/sass_order.py --sass FILE.sass --kernel REGEX

Compiles FILE.cu of a patched llama.cpp tree (as scripts/cuda_sass_diff.sh does: nvcc and cuobjdump on PATH,
PyPI's nvidia-cuda-nvcc has them) or reads a `cuobjdump -sass` listing, and prints, for every kernel whose
mangled name matches REGEX, its instructions of a few kinds in program order as runs: global loads (LDG),
shared loads (LDS), tensor products (HMMA), exp2 (MUFU.EX2), branches (BRA), barriers (BAR), e.g.
`LDG x5, LDS x8, BRA x1, LDG x8, HMMA x4, ...`. A loop whose loads come in several runs, each after the
products of the previous one, waits for memory once per run (session 18: the polar tensor-core flash
attention kernel, `docs/results-cuda.md`). Exit status 1 when no kernel matches or a compile fails.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

KINDS = ("LDG", "LDS", "HMMA", "MUFU.EX2", "BRA", "BAR")
_INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


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
            cur.append(m.group(1))
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


def compile_sass(tree: Path, file: str, arch: str) -> str:
    nvcc, cuobjdump = shutil.which("nvcc"), shutil.which("cuobjdump")
    if not nvcc or not cuobjdump:
        raise SystemExit("sass_order: nvcc and cuobjdump must be on PATH (pip install nvidia-cuda-nvcc)")
    nv = Path(nvcc).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        obj = os.path.join(tmp, "out.o")
        cmd = [
            nvcc,
            "-std=c++17",
            f"-arch=sm_{arch}",
            "-O3",
            "-use_fast_math",
            "-extended-lambda",
            "-DGGML_USE_CUDA",
        ]
        cmd += ["-DNDEBUG", "-DGGML_CUDA_USE_PDL", f"-I{nv}/include", f"-I{nv}/include/cccl"]
        cmd += [
            f"-I{tree}/ggml/include",
            f"-I{tree}/ggml/src",
            f"-I{tree}/ggml/src/ggml-cuda",
            "-c",
            str(tree / file),
        ]
        p = subprocess.run([*cmd, "-o", obj], capture_output=True, text=True)
        if p.returncode:
            print(p.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"sass_order: nvcc failed on {tree / file}")
        return subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True, check=True).stdout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tree", nargs="?", type=Path, help="a patched llama.cpp source tree")
    ap.add_argument("file", nargs="?", help="a .cu file under the tree")
    ap.add_argument("--sass", type=Path, help="a cuobjdump -sass listing instead of a compile")
    ap.add_argument("--kernel", required=True, help="regular expression over the mangled kernel names")
    ap.add_argument("--arch", default="90")
    args = ap.parse_args(argv)
    if args.sass:
        text = args.sass.read_text()
    elif args.tree and args.file:
        text = compile_sass(args.tree, args.file, args.arch)
    else:
        ap.error("give TREE FILE.cu, or --sass FILE")
    found = {n: ops for n, ops in kernels(text).items() if re.search(args.kernel, n)}
    if not found:
        print(f"sass_order: no kernel matches {args.kernel!r}", file=sys.stderr)
        return 1
    for name, ops in found.items():
        r = runs(ops)
        print(f"{name}: {len(ops)} instructions, {sum(1 for k, _ in r if k == 'LDG')} runs of global loads")
        print("  " + ", ".join(f"{k} x{n}" for k, n in r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
