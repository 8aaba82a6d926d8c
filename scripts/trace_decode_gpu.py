#!/usr/bin/env python3
"""Where a decode step's wall-clock time goes on the GPU, from a timeline: llama-bench tg under a CUPTI
tracer (scripts/cupti_trace.cpp; Nsight Systems is not on the H200 machine). ncu (profile_decode_gpu.py)
times each kernel alone; this sees the real run: kernels overlapping under programmatic dependent launch,
the gaps between them, and the host's time between one token's CUDA graph and the next.

    python3 scripts/trace_decode_gpu.py run --bin BUILD/bin --model M [--kv f16/f16 polar/polar]
        [--tokens 16] [--depth 0] [--env NAME=VALUE ...] [--out DIR] [--name trace-decode]
    python3 scripts/trace_decode_gpu.py analyze TRACE.txt [--steps 8]     # one trace, printed
    python3 scripts/trace_decode_gpu.py analyze DIR/NAME-K-V.txt.gz ... --out DIR --name NAME [--depth D]
                                                        # the .json and .md of `run` again from its traces
    python3 scripts/trace_decode_gpu.py --render DIR/NAME.json             # only the .md again
    python3 scripts/trace_decode_gpu.py run --host ...                     # the host's side of a step only
    python3 scripts/trace_decode_gpu.py head-start TRACE.txt.gz --kernel NAME [--steps 8]
                                          # how early each launch of a kernel starts before the one ahead ends

`run` builds the tracer once (g++ against the machine's CUPTI: $CUPTI_ROOT, the CUDA toolkit's
extras/CUPTI, or the nvidia-cuda-cupti Python package) and runs, for each K/V pair, `llama-bench -p 0
-n TOKENS -d DEPTH -ngl 99 -fa 1 -r 1 --no-warmup` (the depth prefilled as one batch) with
CUDA_INJECTION64_PATH set. A decode step is the time from one cudaGraphLaunch to the next (each token
is one graph replay); the last STEPS of them are averaged:
  - wall: launch to launch; gpu span: the step's first kernel start to its last kernel end;
  - idle between steps: the last kernel's end to the next step's first kernel start (host work
    and launch latency that nothing overlaps);
  - per kernel, its *advance*: how far its end moves the step's latest end forward (kernels in launch
    order), the time the step's critical path spends on it with the overlap of the real run; the
    advances sum to the gpu span. Under programmatic dependent launch a kernel starts early and waits
    for the one before it inside (ggml-cuda's kernels let the next one launch as they begin), so its
    start says little and its duration (end - start, also given) counts that wait.
`run --host` records the runtime calls only (KVPOLAR_TRACE_KERNELS=0: tracing the kernels of a graph slows
each cudaGraphLaunch by hundreds of us, so the kernel trace cannot time the host). Per step (launch to
launch): wall; *waiting*, the time the host spends in calls that wait for the GPU (cudaStreamSynchronize,
cudaEventSynchronize, cudaDeviceSynchronize, a synchronous cudaMemcpy); *host*, the rest (the graph's inputs,
llama.cpp's and ggml's own work, the launch); and each runtime call's count and time a step. A type whose
host is longer than f16's loses that time in tg; one whose waiting is longer loses it on the GPU.
Writes DIR/NAME.json, DIR/NAME.md and each raw trace as DIR/NAME-K-V.txt.gz; exits non-zero when a
run failed or gave no steps.
"""

from __future__ import annotations

import argparse
import bisect
import glob
import gzip
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

from bench_llama_gpu import gpu_name
from profile_decode_gpu import OTHER, PARTS, decode_bench_cmd, part_of, short, write_tables

HERE = Path(__file__).resolve().parent
GRAPH_LAUNCH = "cudaGraphLaunch"


def parse(lines) -> tuple[list[tuple], list[tuple]]:
    """Kernel records (start, end, graph, name) and runtime-call records (start, end, name) of a trace,
    each sorted by start; a line of another shape is an error naming it."""
    kernels, calls = [], []
    for n, line in enumerate(lines, 1):
        line = line.rstrip("\n")
        if not line:
            continue
        f = line.split(" ", 6)
        try:
            if f[0] == "K" and len(f) == 7:
                kernels.append((int(f[1]), int(f[2]), int(f[3]), f[6]))
                continue
            if f[0] == "R" and len(f) >= 5:
                calls.append((int(f[1]), int(f[2]), " ".join(f[4:])))
                continue
        except ValueError:
            pass
        raise ValueError(
            f"trace line {n}: expected 'K start end graph grid block name' or 'R start end thread call', "
            f"got {line[:120]!r}"
        )
    kernels.sort()
    calls.sort()
    return kernels, calls


def step_bounds(calls: list[tuple], steps: int) -> list[tuple[int, int]]:
    """(start, end) of the last `steps` decode steps: consecutive graph launches (the last launch's step is
    left out: nothing marks its end); an error when the trace has fewer than 3 launches."""
    launches = [c[0] for c in calls if c[2].startswith(GRAPH_LAUNCH)]
    if len(launches) < 3:
        raise ValueError(
            f"{len(launches)} {GRAPH_LAUNCH} calls in the trace; "
            "a decode step needs CUDA graphs and at least 3 tokens"
        )
    return list(itertools.pairwise(launches))[-steps:]


def kernels_in(kernels: list[tuple], starts: list[int], a: int, b: int) -> list[tuple]:
    """The kernels (sorted by start; starts: their start times) that start in [a, b)."""
    return kernels[bisect.bisect_left(starts, a) : bisect.bisect_left(starts, b)]


def steps_of(kernels: list[tuple], calls: list[tuple], steps: int) -> dict:
    """The mean decode step over the last `steps` complete graph launches (see the module doc)."""
    bounds = step_bounds(calls, steps)
    starts = [k[0] for k in kernels]
    per, out = OrderedDict(), []
    for a, b in bounds:
        ks = kernels_in(kernels, starts, a, b)
        if not ks:
            raise ValueError(f"no kernel between two graph launches at {a} and {b} ns")
        after = bisect.bisect_left(starts, b)
        nxt = kernels[after][0] if after < len(kernels) else None
        end = max(k[1] for k in ks)
        span = end - ks[0][0]
        reach = ks[0][0]  # the latest end so far
        for k in ks:
            adv = max(k[1], reach) - reach
            reach = max(reach, k[1])
            cell = per.setdefault(short(k[3]), [0.0, 0.0, 0.0])
            cell[0] += 1
            cell[1] += adv / 1e3
            cell[2] += (k[1] - k[0]) / 1e3
        out.append(
            {
                "wall_us": (b - a) / 1e3,
                "launch_to_first_kernel_us": (ks[0][0] - a) / 1e3,
                "gpu_span_us": span / 1e3,
                "kernel_sum_us": sum(k[1] - k[0] for k in ks) / 1e3,
                "idle_after_us": (nxt - end) / 1e3 if nxt is not None else None,
                "kernels": len(ks),
            }
        )
    n = len(out)
    mean = {
        key: sum(s[key] for s in out) / n
        for key in ("wall_us", "launch_to_first_kernel_us", "gpu_span_us", "kernel_sum_us")
    }
    idle = [s["idle_after_us"] for s in out if s["idle_after_us"] is not None]
    mean["idle_between_steps_us"] = sum(idle) / len(idle) if idle else None
    mean["kernels"] = out[-1]["kernels"]
    mean["steps"] = n
    mean["per_kernel"] = [
        {"kernel": name, "launches": c[0] / n, "advance_us": c[1] / n, "duration_us": c[2] / n}
        for name, c in sorted(per.items(), key=lambda x: -x[1][1])
    ]
    return mean


WAITS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy_")


def host_steps_of(calls: list[tuple], steps: int) -> dict:
    """The mean decode step's host side over the last `steps` complete graph launches, from the runtime
    calls alone (see the module doc, `run --host`)."""
    bounds = step_bounds(calls, steps)
    starts = [c[0] for c in calls]
    per: OrderedDict[str, list[float]] = OrderedDict()
    walls, waits = [], []
    for a, b in bounds:
        wait = 0
        for c in calls[bisect.bisect_left(starts, a) : bisect.bisect_left(starts, b)]:
            name = c[2].rsplit("_v", 1)[0]
            cell = per.setdefault(name, [0.0, 0.0])
            cell[0] += 1
            cell[1] += (c[1] - c[0]) / 1e3
            if any(c[2].startswith(w) for w in WAITS):
                wait += min(c[1], b) - c[0]
        walls.append((b - a) / 1e3)
        waits.append(wait / 1e3)
    n = len(bounds)
    wall, wait = sum(walls) / n, sum(waits) / n
    return {
        "steps": n,
        "wall_us": wall,
        "waiting_us": wait,
        "host_us": wall - wait,
        "per_call": [
            {"call": name, "calls": c[0] / n, "time_us": c[1] / n}
            for name, c in sorted(per.items(), key=lambda x: -x[1][1])
        ],
    }


def _md_head(data: dict, title: str, about: str) -> tuple[list[str], str, str]:
    """The start of a run's markdown: title, command and what the numbers are, then the header of a table
    with one column a K/V pair; returns the lines, that header row and its separator row."""
    runs = data["runs"]
    head = "| | " + " | ".join(r["kv"] for r in runs) + " |"
    sep = "|---|" + "---|" * len(runs)
    md = [
        f"# {title} ({data['gpu']}), depth {data['depth']}",
        "",
        f"Generated by `{data['command']}`. Per step, us, the mean of the last steady steps ({about}).",
        "",
        head,
        sep,
    ]
    return md, head, sep


def _md_value_rows(runs: list, rows) -> list[str]:
    """One table row a (label, key): each run's value of key, us to 0.1 ("-" for None; counts as integers)."""
    return [
        f"| {label} | "
        + " | ".join(
            "-" if r[key] is None else str(r[key]) if isinstance(r[key], int) else f"{r[key]:.1f}"
            for r in runs
        )
        + " |"
        for label, key in rows
    ]


def _md_per_name(runs: list, items: str, key: str, size: str, what: str, cell) -> list[str]:
    """A table of the entries run[items] of every run by their name run[items][i][key], the largest (by size,
    over the runs) first, one column a run; cell(entry) is a cell's text ("-" where a run lacks the name)."""
    sizes: dict[str, float] = {}
    for r in runs:
        for x in r[items]:
            sizes[x[key]] = max(sizes.get(x[key], 0.0), x[size])
    md = ["| " + what + " | " + " | ".join(r["kv"] for r in runs) + " |", "|---|" + "---|" * len(runs)]
    for name in sorted(sizes, key=lambda n: -sizes[n]):
        cells = []
        for r in runs:
            x = next((x for x in r[items] if x[key] == name), None)
            cells.append(cell(x) if x else "-")
        md.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return md


def render_host(data: dict) -> str:
    runs = data["runs"]
    md, _, _ = _md_head(
        data,
        "The host's side of a decode step",
        "CUPTI runtime-call trace, no kernel activity; *waiting*: in calls that wait for the GPU; "
        "*host*: the rest of the step",
    )
    md += _md_value_rows(
        runs,
        (
            ("wall (graph launch to the next)", "wall_us"),
            ("waiting for the GPU", "waiting_us"),
            ("host", "host_us"),
        ),
    )
    md += ["", "Per runtime call: calls x time, us a step:", ""]
    md += _md_per_name(
        runs,
        "per_call",
        "call",
        "time_us",
        "call",
        lambda x: f"{x['calls']:.1f} x {x['time_us'] / max(x['calls'], 1e-9):.1f}",
    )
    return "\n".join(md) + "\n"


def head_start(kernels: list[tuple], calls: list[tuple], kernel: str, steps: int) -> dict:
    """Over the last `steps` decode steps, each launch of the kernels whose name contains `kernel`: how long
    before the kernel ahead of it ends it starts (its head start under programmatic dependent launch, us) and
    its duration; their count, median and maximum."""
    heads, durs = [], []
    starts = [k[0] for k in kernels]
    for a, b in step_bounds(calls, steps):
        ks = kernels_in(kernels, starts, a, b)
        for i, k in enumerate(ks):
            if i > 0 and kernel in k[3]:
                heads.append((ks[i - 1][1] - k[0]) / 1e3)
                durs.append((k[1] - k[0]) / 1e3)
    if not heads:
        raise ValueError(f"no launch of a kernel named like {kernel!r} in the last {steps} steps")
    return {
        "kernel": kernel,
        "launches": len(heads),
        "head_start_median_us": statistics.median(heads),
        "head_start_max_us": max(heads),
        "duration_median_us": statistics.median(durs),
    }


def find_cupti() -> tuple[str, str, str]:
    """(include dir of cupti.h, include dir of cuda.h, libcupti file) on this machine."""
    roots = [os.environ.get("CUPTI_ROOT", "")]
    nvcc = shutil.which("nvcc")
    cuda = str(Path(nvcc).resolve().parent.parent) if nvcc else "/usr/local/cuda"
    roots += [f"{cuda}/extras/CUPTI", cuda, f"{cuda}/targets/x86_64-linux"]
    try:
        import nvidia  # the nvidia-cuda-cupti package (namespace package)

        roots += [str(Path(p) / sub) for p in nvidia.__path__ for sub in ("cu13", "cuda_cupti", "cu12")]
    except ImportError:
        pass
    for r in filter(None, roots):
        if Path(r, "include", "cupti.h").is_file():
            libs = sorted(glob.glob(f"{r}/lib*/libcupti.so*"), key=len)
            if libs:
                cuda_h = next(
                    (
                        str(Path(d, "include"))
                        for d in (r, cuda, f"{cuda}/targets/x86_64-linux")
                        if Path(d, "include", "cuda.h").is_file()
                    ),
                    None,
                )
                if cuda_h:
                    return str(Path(r, "include")), cuda_h, libs[0]
    raise FileNotFoundError(
        f"no cupti.h with a libcupti.so beside it under {', '.join(filter(None, roots))}; set CUPTI_ROOT"
    )


def build_tracer(dest: Path) -> Path:
    inc, cuda_inc, lib = find_cupti()
    so = dest / "libcupti_trace.so"
    cmd = [
        "g++",
        "-std=c++17",
        "-O2",
        "-fPIC",
        "-shared",
        f"-I{inc}",
        f"-I{cuda_inc}",
        str(HERE / "cupti_trace.cpp"),
        "-o",
        str(so),
        lib,
        f"-Wl,-rpath,{Path(lib).parent}",
    ]
    subprocess.run(cmd, check=True)
    return so


def render(data: dict) -> str:
    runs = data["runs"]
    md, head, sep = _md_head(
        data,
        "One decode step on the timeline",
        "CUPTI activity trace: kernels overlap as in the real run; *advance* = how far a kernel's end moves "
        "the step's latest end",
    )
    md += _md_value_rows(
        runs,
        (
            ("wall (graph launch to the next)", "wall_us"),
            ("GPU span (first kernel start to last end)", "gpu_span_us"),
            ("GPU idle between steps", "idle_between_steps_us"),
            ("launch call to first kernel", "launch_to_first_kernel_us"),
            ("kernel durations summed", "kernel_sum_us"),
            ("kernels", "kernels"),
        ),
    )
    md += ["", "Advance by part (us a step; `PARTS` of profile_decode_gpu.py):", "", head, sep]
    for part in [p for p, _ in PARTS] + [OTHER]:
        md.append(
            f"| {part} | "
            + " | ".join(
                f"{sum(x['advance_us'] for x in r['per_kernel'] if part_of(x['kernel']) == part):.1f}"
                for r in runs
            )
            + " |"
        )
    md += ["", "Per kernel: launches x advance (duration), us a step:", ""]
    md += _md_per_name(
        runs,
        "per_kernel",
        "kernel",
        "advance_us",
        "kernel",
        lambda x: f"{x['launches']:.0f} x {x['advance_us']:.1f} ({x['duration_us']:.1f})",
    )
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--render", metavar="JSON", help="only write the .md of an earlier run's JSON next to it")
    sub = ap.add_subparsers(dest="cmd")
    r = sub.add_parser("run")
    r.add_argument("--bin", required=True)
    r.add_argument("--model", required=True)
    r.add_argument("--kv", nargs="+", default=["f16/f16", "polar/polar"])
    r.add_argument("--tokens", type=int, default=16)
    r.add_argument("--steps", type=int, default=8)
    r.add_argument("--depth", type=int, default=0)
    r.add_argument("--env", nargs="*", default=[], help="NAME=VALUE for every run")
    r.add_argument("--host", action="store_true", help="the runtime calls only: the host's side of a step")
    r.add_argument("--out", default="docs/bench/gpu")
    r.add_argument("--name", default="trace-decode")
    a = sub.add_parser("analyze")
    a.add_argument("trace", nargs="+")
    a.add_argument("--steps", type=int, default=8)
    a.add_argument(
        "--out", help="with --name: write DIR/NAME.json and .md, one run a trace (K/V from its name)"
    )
    a.add_argument("--name")
    a.add_argument("--depth", type=int, default=0)
    a.add_argument("--host", action="store_true", help="traces of `run --host`: the host's side of a step")
    a.add_argument(
        "--gpu", help="the GPU the traces were taken on (default: this machine's, from nvidia-smi)"
    )
    h = sub.add_parser("head-start")
    h.add_argument("trace")
    h.add_argument("--kernel", required=True, help="a part of the kernel's name, e.g. k_polar_layer_chains")
    h.add_argument("--steps", type=int, default=8)
    args = ap.parse_args(argv)
    if args.cmd == "head-start":
        opener = gzip.open if args.trace.endswith(".gz") else open
        with opener(args.trace, "rt") as f:
            print(json.dumps(head_start(*parse(f), args.kernel, args.steps), indent=1))
        return 0
    if args.render:
        src = Path(args.render)
        data = json.loads(src.read_text())
        host = bool(data["runs"]) and "host_us" in data["runs"][0]
        src.with_suffix(".md").write_text((render_host if host else render)(data))
        return 0
    if args.cmd == "analyze":
        runs = []
        for trace in args.trace:
            opener = gzip.open if trace.endswith(".gz") else open
            with opener(trace, "rt") as f:
                kernels, calls = parse(f)
            step = host_steps_of(calls, args.steps) if args.host else steps_of(kernels, calls, args.steps)
            if not args.name:
                print(json.dumps(step, indent=1))
                continue
            k, v = Path(trace).name.split(".")[0].split("-")[-2:]
            runs.append({"kv": f"{k}/{v}", "trace": Path(trace).name, **step})
        if args.name:
            out = Path(args.out or ".")
            write_tables(
                out,
                args.name,
                "trace_decode_gpu.py",
                argv,
                args.gpu or gpu_name(),
                args.depth,
                runs,
                render_host if args.host else render,
            )
        return 0
    if args.cmd != "run":
        ap.error("a subcommand (run, analyze, head-start) or --render is required")
    if args.tokens < args.steps + 2:
        ap.error(
            "--tokens must be at least --steps + 2 (the first tokens are not steady), "
            f"got {args.tokens} < {args.steps + 2}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    so = build_tracer(out)
    env = dict(os.environ)
    env.update(dict(e.split("=", 1) for e in args.env))
    runs, failed = [], 0
    for kv in args.kv:
        k, v = kv.split("/")
        trace = out / f"{args.name}-{k}-{v}.txt"
        cmd = decode_bench_cmd(args.bin, args.model, k, v, args.tokens, args.depth)
        trace_env = {"CUDA_INJECTION64_PATH": str(so), "KVPOLAR_TRACE_OUT": str(trace)}
        if args.host:
            trace_env["KVPOLAR_TRACE_KERNELS"] = "0"
        p = subprocess.run(
            cmd,
            env={**env, **trace_env},
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        try:
            if p.returncode != 0:
                raise ValueError(f"llama-bench rc {p.returncode}: {p.stderr[-1500:]}")
            with open(trace) as f:
                kernels, calls = parse(f)
            step = host_steps_of(calls, args.steps) if args.host else steps_of(kernels, calls, args.steps)
        except (ValueError, OSError) as e:
            print(f"{kv}: {e}", file=sys.stderr)
            failed += 1
            continue
        finally:
            if trace.exists():
                with open(trace, "rb") as f, gzip.open(f"{trace}.gz", "wb") as g:
                    shutil.copyfileobj(f, g)
                trace.unlink()
        runs.append({"kv": kv, "command": " ".join(cmd), **step})
        if args.host:
            print(
                f"{kv}: wall {step['wall_us']:.1f} us a step, host {step['host_us']:.1f}, "
                f"waiting for the GPU {step['waiting_us']:.1f}",
                flush=True,
            )
        else:
            print(
                f"{kv}: wall {step['wall_us']:.1f} us a step, gpu span {step['gpu_span_us']:.1f}, "
                f"idle between steps {step['idle_between_steps_us']}",
                flush=True,
            )
    write_tables(
        out,
        args.name,
        "trace_decode_gpu.py",
        argv,
        gpu_name(),
        args.depth,
        runs,
        render_host if args.host else render,
    )
    return 1 if failed or not runs else 0


if __name__ == "__main__":
    sys.exit(main())
