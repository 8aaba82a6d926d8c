#!/usr/bin/env python3
"""The set-up's probed CPU flags against GGML_NATIVE=ON: llama-bench in the same run.

The set-up builds llama.cpp with GGML_NATIVE=OFF and only the instruction sets its probe
programs executed, AMX always off (scripts/kvsetup/cpu.py). This script builds the same
patched sources a second time with GGML_NATIVE=ON (-march=native, AMX included where CPUID
lists it) into <llama dir>/build-native (llama-bench only; ccache makes it cost the ggml-cpu
files), then runs llama-bench from both builds, alternating, for each K+V cache type:

    python scripts/bench_cpu_flags.py [--types f16 q4_0 polar] [--depths 0 4096] [--reps 3]

A native run that dies (e.g. SIGILL in the AMX kernels) is recorded with its signal, and the
native build is then also run with --repack 0 (no AMX weight buffers). Writes
docs/bench/cpu-flags-<model>.json and docs/bench/cpu-flags-<model>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import llama_bench
from kvpolar import paths
from kvpolar.atomic import atomic_write_text
from kvsetup import llama as setup_llama
from kvsetup.cpu import cpuinfo_field, machine_label
from kvsetup.pins import CMAKE_FLAGS
from kvsetup.util import signal_name


def cpu_flags_of_interest() -> list[str]:
    return sorted(f for f in cpuinfo_field("flags").split() if f.startswith(("avx512", "amx", "avx_vnni")))


def bench(binp: Path, model: str, kv: str, depth: int, reps: int, threads: int, extra: list[str]) -> dict:
    cmd = llama_bench.command(str(binp), model, kv, kv, [depth], reps, ["-t", str(threads), *extra])
    p = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        sig = signal_name(-p.returncode) if p.returncode < 0 else None
        return {
            "error": sig or f"exit {p.returncode}",
            "cmd": " ".join(cmd),
            "tail": (p.stdout + p.stderr).strip().splitlines()[-5:],
        }
    out = {"cmd": " ".join(cmd)}
    for r in llama_bench.results(p.stdout):
        out[r["test"]] = round(r["tps"], 2)
        out[r["test"] + "_sd"] = round(r["tps_sd"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=["f16", "q4_0", "polar"])
    ap.add_argument("--depths", type=int, nargs="+", default=[0, 4096])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    info = paths.build_info()
    build = paths.build_dir()
    src = Path(info["src"])
    native = build.resolve().parent / "build-native"
    native_flags = (*CMAKE_FLAGS, "-DGGML_NATIVE=ON")
    if not (native / "bin" / "llama-bench").exists():
        print(f"building the GGML_NATIVE=ON variant into {native} ...", flush=True)
        setup_llama.build_llama(
            src, native, info["key"] + "-native", flags=native_flags, targets=("llama-bench",)
        )
    model = str(paths.data_file(paths.SMOLLM2_GGUF))
    builds = {"probed": (build / "bin" / "llama-bench", []), "native": (native / "bin" / "llama-bench", [])}
    rows = []
    t0 = time.time()
    for depth in args.depths:
        for kv in args.types:
            for name, (binp, extra) in list(builds.items()):
                r = bench(binp, model, kv, depth, args.reps, args.threads, extra)
                if name == "native" and "error" in r and "native --repack 0" not in builds:
                    builds["native --repack 0"] = (binp, ["--repack", "0"])
                    rows.append({"build": name, "kv": kv, "depth": depth, **r})
                    print(json.dumps(rows[-1]), flush=True)
                    r = bench(binp, model, kv, depth, args.reps, args.threads, ["--repack", "0"])
                    name = "native --repack 0"
                rows.append({"build": name, "kv": kv, "depth": depth, **r})
                print(json.dumps(rows[-1]), flush=True)
    result = {
        "command": "python scripts/bench_cpu_flags.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_label(),  # the ISA the set-up builds with, as every result file names it
        "cpu_flags": cpu_flags_of_interest(),
        "probed_cmake_flags": info.get("cmake_flags"),
        "native_cmake_flags": list(native_flags),
        "model": paths.SMOLLM2_GGUF,
        "reps": args.reps,
        "threads": args.threads,
        "seconds": round(time.time() - t0),
        "rows": rows,
    }
    out = Path(args.out) if args.out else paths.repo_root() / "docs" / "bench" / "cpu-flags-smollm2.json"
    atomic_write_text(out, json.dumps(result, indent=1) + "\n", mkdir=True)
    atomic_write_text(out.with_suffix(".md"), render(result), mkdir=True)
    print(render(result))
    failed = [r for r in rows if "error" in r and r["build"] == "probed"]
    return 1 if failed else 0


def render(res: dict) -> str:
    lines = [
        f"# Probed CPU flags vs GGML_NATIVE=ON ({res['machine']})",
        "",
        f"Generated by `{res['command']}`; llama-bench -fa 1, K+V cache type as given, {res['model']}, "
        f"{res['threads']} threads, {res['reps']} reps (tokens/s, mean ± sd).",
        f"CPU flags of interest: {' '.join(res['cpu_flags']) or '-'}.",
        "",
        "| depth | K+V | build | pp512 t/s | tg64 t/s | tg64 vs probed |",
        "|---|---|---|---|---|---|",
    ]
    base = {(r["kv"], r["depth"]): r for r in res["rows"] if r["build"] == "probed" and "tg64" in r}
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['depth']} | {r['kv']} | {r['build']} | {r['error']} | {r['error']} | |")
            continue
        b = base.get((r["kv"], r["depth"]))
        ratio = f"{r['tg64'] / b['tg64']:.2f}x" if b else ""
        lines.append(
            f"| {r['depth']} | {r['kv']} | {r['build']} | {r['pp512']:.1f} ± {r['pp512_sd']:.1f} "
            f"| {r['tg64']:.1f} ± {r['tg64_sd']:.1f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
