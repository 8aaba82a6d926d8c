#!/usr/bin/env python3
"""What the polar cache's per-layer extras cost at few keys: llama-bench tg64 on the GPU with each
extra turned off by its environment variable (docs/bench/gpu/ab-depth0-session6.md).

    python3 scripts/ab_llama_gpu.py --bin BUILD/bin --model SmolLM2-135M-Instruct.Q4_1.gguf \
        [--depths 0 4096] [--reps 5] [--out docs/bench/gpu] [--name ab-depth0]
        [--set extras|gqa|kernel|steps|graphs|k0|sched|rope|rot|pdl|early|prefetch|targets]

Rows: f16/f16 and q4_0/q4_0 (references; q4_0 K is centered by default since patch 0015, so also
with LLAMA_KV_CENTER=0), then polar/polar with the defaults, GGML_CUDA_POLAR_NO_FUSE_LAYER=1 (each
cache write its own kernel and the query's D^-1 and rotation unfused, as before patch 0018),
GGML_CUDA_POLAR_NO_FUSE=1 (centering and balancing and the Hadamard rotation as separate ops instead
of inside the cache write, patch 0017), LLAMA_ATTN_ROT_DISABLE=1 (upstream's rotation of Q, K, V
and the output off), LLAMA_KV_BALANCE=0, LLAMA_KV_CENTER=0, GGML_CUDA_POLAR_FA_GQA=0, and the last
two together; then polar K + f16 V with the defaults and with GGML_CUDA_POLAR_NO_FUSE_LAYER=1.
--set gqa: the query heads a CTA of the polar vector kernel takes, GGML_CUDA_POLAR_FA_GQA unset (the
default), 4 and 0, for polar K+V and polar K + polar3 V, next to f16 and q4_0 (session 9 ran it on
Qwen2.5-1.5B's GQA 6, with also 8 from a build that had a CTA of 8 heads); since patch 0022 with
GGML_CUDA_POLAR_FA_MMA=0 (the vector kernel).
--set kernel: patch 0022's tensor-core kernel for one token (the default) against the vector kernel
(GGML_CUDA_POLAR_FA_MMA=0) for polar/polar, polar3/polar3, polar/polar3 and polar/f16, next to f16
and q4_0.
--set steps: the tensor-core kernel's minimum steps of 128 keys a CTA (GGML_CUDA_POLAR_FA_MMA_STEPS unset,
1, 4, 8) for polar/polar, next to the vector kernel, f16 and q4_0.
--set graphs: f16, q4_0, polar/polar and polar/f16, each with ggml-cuda's CUDA graphs (the default) and
with GGML_CUDA_DISABLE_GRAPHS=1 (does a decode step replay one graph?).
(Sessions 11-12's sets fuseout and warps, for experiment diffs that no longer apply on patch 0025, were
removed in session 13; git history has them.)
--set k0: the exact sink key of patch 0024 (on by default for polar/polar3 K) on and off
(LLAMA_KV_EXACT_SINK=0) for polar/polar and polar/f16, next to f16 and q4_0: what it costs in tg.
--set sched: patch 0025's scheduling of the tensor-core kernel, each choice undone: parallel blocks as
upstream chooses them (GGML_CUDA_POLAR_FA_MMA_BALANCE=0), the tensor-core kernel also below 1024 keys
(GGML_CUDA_POLAR_FA_MMA_MIN_KV=0), 2 steps a CTA at every length (GGML_CUDA_POLAR_FA_MMA_STEPS=2), for
polar/polar; polar/f16, polar/polar3 and polar3/polar3 with the defaults; next to f16 and q4_0.
--set rope: patch 0026's choices (defaults) against each one undone, for polar/polar: the ROPEs of Q
and K as their own kernels (GGML_CUDA_POLAR_NO_FUSE_ROPE=1), upstream's merge of the tensor-core
kernel's partial results (GGML_CUDA_POLAR_FA_COMBINE=0), both; polar/f16, polar/polar3 and
polar3/polar3 with the defaults; next to f16 and q4_0.
--set rot: patch 0027's V output rotation written by the tensor-core kernel's row combine (the default)
against it as its own kernel (GGML_CUDA_POLAR_NO_FUSE_ROT_OUT=1), for polar/polar; polar/f16,
polar/polar3 and polar3/polar3 with the defaults; next to f16 and q4_0.
--set pdl: f16, q4_0 and polar/polar each with upstream's programmatic dependent launch (the default) and
without it (GGML_CUDA_PDL=0): session 15 found polar's decode-step kernels summing to less than f16's under
Nsight Compute while its tg stayed 0-4 % lower; does f16 gain more from kernels overlapping their neighbours?
--set early: mmvq lets the next kernel launch early (patch 0029, the default) or not
(GGML_CUDA_MMVQ_PDL_LC=0), and, on a tree with KVPOLAR_EXPERIMENTS="session17-chain-early-v2.diff",
polar's layer kernel reads its inputs before its wait (default) or after (GGML_CUDA_POLAR_NO_EARLY=1;
without the experiment that variable does nothing, and its rows repeat the ones without it); f16 and
polar/polar with each, q4_0 for reference.
--set prefetch: for a tree with KVPOLAR_EXPERIMENTS="session19-fa-prefetch.diff": the polar tensor-core
kernel at head size 64 loading the next step's codes during this step's products (default) or not
(GGML_CUDA_POLAR_FA_PREFETCH=0), for polar/polar, polar/f16 and polar/polar3, next to f16 and q4_0 (at
head size 128, Qwen2.5's, the experiment changes nothing: its rows repeat).
--set targets: issue 10's pairs (f16, q4_0, polar/polar, polar/f16, polar/polar3, polar3/polar3) with the
defaults and nothing else: the shortest set for the repeated passes that a same-run ratio near 1.0 needs
(a tg64 row scatters by 3-7 % at 3 reps on the H200; `summarize` shows each pass's ratio).
(Session 19's set combine, for the experiment that is patch 0031 since session 20, was removed; its
definition is at commit f4b43fa.)
--set cpu-extras (with --cpu THREADS): f16, q4_0 and polar/polar with the defaults, then with upstream's
rotation, K balancing, K centering and the exact sink key each turned off, and the three together: what the
graph's extra nodes cost on the CPU backend.
Runs llama-bench -ngl 99 (--cpu THREADS: -ngl 0 -t THREADS) through scripts/llama_bench.py (pp512 and tg64;
the table shows tg64).
Writes <out>/<name>.json and .md; standard library only; exits non-zero when a run failed.

    python3 scripts/ab_llama_gpu.py summarize RUN.json ... --depth D [--same-as NAME=VALUE ...] [--out F.md]

pools repeated runs of one set (e.g. three passes, each run by `gpu_run.sh ab`): per (K / V, environment)
the mean tg64 and pp512 at depth D over every run and rep, and the ratio of polar's rows to f16/f16 and
q4_0/q4_0 without an environment. --same-as NAME=VALUE drops that setting from a row's environment (a
variable the measured build does not read), so its rows pool with the rows without it.

    python3 scripts/ab_llama_gpu.py change --before RUN.json ... --after RUN.json ... --depth D

compares two builds' passes of one set, each pooled as `summarize` pools it: per row without an environment,
tg64 over f16/f16's (and q4_0/q4_0's) in each, and the change of the f16 ratio. Each ratio is a same-run
ratio; their change is across runs, so it carries the scatter of two sessions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "converter"))  # for kvpolar.atomic

import llama_bench
from bench_llama_gpu import gpu_name
from kvpolar.atomic import atomic_write_text

VARIANTS = (  # (K, V, environment)
    ("f16", "f16", {}),
    ("q4_0", "q4_0", {}),
    ("q4_0", "q4_0", {"LLAMA_KV_CENTER": "0"}),
    ("polar", "polar", {}),
    ("polar", "polar", {"GGML_CUDA_POLAR_NO_FUSE_LAYER": "1"}),
    ("polar", "polar", {"GGML_CUDA_POLAR_NO_FUSE": "1"}),
    ("polar", "polar", {"LLAMA_ATTN_ROT_DISABLE": "1"}),
    ("polar", "polar", {"LLAMA_KV_BALANCE": "0"}),
    ("polar", "polar", {"LLAMA_KV_CENTER": "0"}),
    ("polar", "polar", {"GGML_CUDA_POLAR_FA_GQA": "0"}),
    ("polar", "polar", {"LLAMA_KV_CENTER": "0", "GGML_CUDA_POLAR_FA_GQA": "0"}),
    ("polar", "f16", {}),
    ("polar", "f16", {"GGML_CUDA_POLAR_NO_FUSE_LAYER": "1"}),
)
GQA_VARIANTS = (  # (K, V, environment); the vector kernel (GGML_CUDA_POLAR_FA_MMA=0) since patch 0022
    ("f16", "f16", {}),
    ("q4_0", "q4_0", {}),
    *(
        (k, v, {"GGML_CUDA_POLAR_FA_MMA": "0", **env})
        for k, v in (("polar", "polar"), ("polar", "polar3"))
        for env in ({}, *({"GGML_CUDA_POLAR_FA_GQA": n} for n in ("4", "0")))
    ),
)
KERNEL_VARIANTS = (  # (K, V, environment): patch 0022's tensor-core kernel (default) vs the vector kernel
    ("f16", "f16", {}),
    ("q4_0", "q4_0", {}),
    *(
        (k, v, env)
        for k, v in (("polar", "polar"), ("polar3", "polar3"), ("polar", "polar3"), ("polar", "f16"))
        for env in ({}, {"GGML_CUDA_POLAR_FA_MMA": "0"})
    ),
)
STEPS_VARIANTS = (  # (K, V, environment): steps of 128 keys a CTA of the tensor-core kernel takes at least
    ("f16", "f16", {}),
    ("q4_0", "q4_0", {}),
    ("polar", "polar", {}),
    *(("polar", "polar", {"GGML_CUDA_POLAR_FA_MMA_STEPS": n}) for n in ("1", "4", "8")),
    ("polar", "polar", {"GGML_CUDA_POLAR_FA_MMA": "0"}),
)
GRAPHS_VARIANTS = tuple(  # (K, V, environment): with ggml-cuda's CUDA graphs (default) and without
    (k, v, env)
    for k, v in (("f16", "f16"), ("q4_0", "q4_0"), ("polar", "polar"), ("polar", "f16"))
    for env in ({}, {"GGML_CUDA_DISABLE_GRAPHS": "1"})
)
K0_VARIANTS = (  # (K, V, environment): the exact sink key (default) and without it
    ("f16", "f16", {}),
    ("q4_0", "q4_0", {}),
    *(
        (k, v, env)
        for k, v in (("polar", "polar"), ("polar", "f16"))
        for env in ({}, {"LLAMA_KV_EXACT_SINK": "0"})
    ),
)
SCHED_VARIANTS = (  # (K, V, environment): patch 0025's choices (defaults) against each one undone
    ("f16", "f16", {}),
    ("q4_0", "q4_0", {}),
    ("polar", "polar", {}),
    ("polar", "polar", {"GGML_CUDA_POLAR_FA_MMA_BALANCE": "0"}),
    ("polar", "polar", {"GGML_CUDA_POLAR_FA_MMA_MIN_KV": "0"}),
    ("polar", "polar", {"GGML_CUDA_POLAR_FA_MMA_STEPS": "2"}),
    ("polar", "f16", {}),
    ("polar", "polar3", {}),
    ("polar3", "polar3", {}),
)
ROPE_VARIANTS = (  # (K, V, environment): patch 0026's choices (defaults) against each one undone
    ("f16", "f16", {}),
    ("q4_0", "q4_0", {}),
    ("polar", "polar", {}),
    ("polar", "polar", {"GGML_CUDA_POLAR_NO_FUSE_ROPE": "1"}),
    ("polar", "polar", {"GGML_CUDA_POLAR_FA_COMBINE": "0"}),
    ("polar", "polar", {"GGML_CUDA_POLAR_NO_FUSE_ROPE": "1", "GGML_CUDA_POLAR_FA_COMBINE": "0"}),
    ("polar", "f16", {}),
    ("polar", "polar3", {}),
    ("polar3", "polar3", {}),
)
ROT_VARIANTS = (  # (K, V, environment): patch 0027's V output rotation in the row combine (default), outside
    ("f16", "f16", {}),
    ("q4_0", "q4_0", {}),
    ("polar", "polar", {}),
    ("polar", "polar", {"GGML_CUDA_POLAR_NO_FUSE_ROT_OUT": "1"}),
    ("polar", "f16", {}),
    ("polar", "polar3", {}),
    ("polar3", "polar3", {}),
)
PDL_VARIANTS = tuple(  # (K, V, environment): upstream's programmatic dependent launch on (default) and off
    (k, v, env)
    for k, v in (("f16", "f16"), ("q4_0", "q4_0"), ("polar", "polar"))
    for env in ({}, {"GGML_CUDA_PDL": "0"})
)
EARLY_VARIANTS = (  # (K, V, environment): session 17's experiments, each turned off
    ("f16", "f16", {}),
    ("f16", "f16", {"GGML_CUDA_MMVQ_PDL_LC": "0"}),
    ("q4_0", "q4_0", {}),
    ("polar", "polar", {}),
    ("polar", "polar", {"GGML_CUDA_POLAR_NO_EARLY": "1"}),
    ("polar", "polar", {"GGML_CUDA_MMVQ_PDL_LC": "0"}),
    ("polar", "polar", {"GGML_CUDA_MMVQ_PDL_LC": "0", "GGML_CUDA_POLAR_NO_EARLY": "1"}),
)
PREFETCH_VARIANTS = (  # (K, V, environment): session 19's experiment, the next step's loads early, on and off
    ("f16", "f16", {}),
    ("q4_0", "q4_0", {}),
    ("polar", "polar", {}),
    ("polar", "polar", {"GGML_CUDA_POLAR_FA_PREFETCH": "0"}),
    ("polar", "f16", {}),
    ("polar", "f16", {"GGML_CUDA_POLAR_FA_PREFETCH": "0"}),
    ("polar", "polar3", {}),
    ("polar", "polar3", {"GGML_CUDA_POLAR_FA_PREFETCH": "0"}),
)
TARGET_VARIANTS = (  # (K, V, environment): issue 10's pairs with the defaults, for repeated passes
    ("f16", "f16", {}),
    ("q4_0", "q4_0", {}),
    ("polar", "polar", {}),
    ("polar", "f16", {}),
    ("polar", "polar3", {}),
    ("polar3", "polar3", {}),
)
CPU_EXTRAS_VARIANTS = (  # (K, V, environment): a polar cache's per-layer graph extras on the CPU (--cpu)
    ("f16", "f16", {}),
    ("q4_0", "q4_0", {}),
    ("polar", "polar", {}),
    ("polar", "polar", {"LLAMA_ATTN_ROT_DISABLE": "1"}),
    ("polar", "polar", {"LLAMA_KV_BALANCE": "0"}),
    ("polar", "polar", {"LLAMA_KV_CENTER": "0"}),
    ("polar", "polar", {"LLAMA_KV_EXACT_SINK": "0"}),
    ("polar", "polar", {"LLAMA_ATTN_ROT_DISABLE": "1", "LLAMA_KV_CENTER": "0", "LLAMA_KV_EXACT_SINK": "0"}),
)
SETS = {
    "targets": TARGET_VARIANTS,
    "cpu-extras": CPU_EXTRAS_VARIANTS,
    "extras": VARIANTS,
    "early": EARLY_VARIANTS,
    "prefetch": PREFETCH_VARIANTS,
    "pdl": PDL_VARIANTS,
    "rot": ROT_VARIANTS,
    "sched": SCHED_VARIANTS,
    "rope": ROPE_VARIANTS,
    "gqa": GQA_VARIANTS,
    "kernel": KERNEL_VARIANTS,
    "steps": STEPS_VARIANTS,
    "graphs": GRAPHS_VARIANTS,
    "k0": K0_VARIANTS,
}


def env_key(env: dict[str, str]) -> str:
    """A row's environment as `pool` keys it: "NAME=VALUE ..." sorted by name, "-" for none."""
    return " ".join(f"{k}={v}" for k, v in sorted(env.items())) or "-"


def pool(
    docs, depth: int, drop: dict[str, str] | None = None
) -> dict[tuple[str, str], dict[str, list[float]]]:
    """The rows of several runs of this script (their JSON documents) at `depth`, by (K / V, environment
    "NAME=VALUE ..." or "-"): {"tg": [t/s, ...], "pp": [...]}, one value per run and row. `drop`: settings
    left out of a row's environment (a variable the build does not read), so its rows pool with the others."""
    drop = drop or {}
    pooled: dict[tuple[str, str], dict[str, list[float]]] = {}
    for doc in docs:
        for r in doc["runs"]:
            env = {k: v for k, v in r["env"].items() if drop.get(k) != v}
            key = (r["kv"], env_key(env))
            cell = pooled.setdefault(key, {"tg": [], "pp": []})
            for x in r["rows"]:
                if x["depth"] == depth:
                    cell["tg" if x["test"].startswith("tg") else "pp"].append(x["tps"])
    return pooled


def per_run_ratios(
    runs: list[dict], key: tuple[str, str], ref: tuple[str, str] = ("f16/f16", "-")
) -> list[float]:
    """tg of row `key` over tg of row `ref` within each run that has both, in run order: the same-run
    ratio, one a run (a row that occurs twice in a run: its mean). runs: each run's `pool([doc], ...)`."""
    out = []
    for c in runs:
        a, b = c.get(key, {}).get("tg"), c.get(ref, {}).get("tg")
        if a and b:
            out.append((sum(a) / len(a)) / (sum(b) / len(b)))
    return out


# two-sided 95 % quantiles of Student's t by degrees of freedom 1..10 (more: the last, which bounds them)
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def mean_ci95(xs: list[float]) -> tuple[float, float]:
    """The mean of xs and the half-width of its 95 % t interval (nan for fewer than 2 values): for the
    runs' ratios, each run one sample (the runs alternate the settings, so drift between runs cancels)."""
    n = len(xs)
    m = sum(xs) / n if n else float("nan")
    if n < 2:
        return m, float("nan")
    sd = (sum((x - m) ** 2 for x in xs) / (n - 1)) ** 0.5
    return m, T95[min(n - 2, len(T95) - 1)] * sd / n**0.5


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def device_of(doc: dict) -> str:
    """The machine an A/B file ran on: "device" (the GPU's name, or "CPU: model, N threads" with --cpu); files
    written before session 27 name it "gpu", whichever it was."""
    return doc.get("device") or doc.get("gpu", "?")


def summary_lines(docs: list[dict], paths: list[str], depth: int, same_as: list[str]) -> list[str]:
    """The markdown of `summarize` for runs `docs` read from `paths` (named in its "Generated by" line), with
    the settings NAME=VALUE of `same_as` left out of the rows' environments; ValueError without a tg row."""
    drop = dict(kv.split("=", 1) for kv in same_as)
    gpus = {device_of(d) for d in docs}
    pooled = pool(docs, depth, drop)
    if not any(c["tg"] for c in pooled.values()):
        raise ValueError(f"no tg rows at depth {depth} in {list(paths)}")
    per_run = [pool([d], depth, drop) for d in docs]
    f16 = _mean(pooled.get(("f16/f16", "-"), {}).get("tg", []))
    q4 = _mean(pooled.get(("q4_0/q4_0", "-"), {}).get("tg", []))
    md = [
        f"# tg64 and pp512 at depth {depth}, pooled over {len(paths)} runs ({', '.join(sorted(gpus))})",
        "",
        "Generated by `python3 scripts/ab_llama_gpu.py summarize "
        + " ".join(Path(f).as_posix() for f in paths)
        + f" --depth {depth}"
        + (" --same-as " + " ".join(same_as) if same_as else "")
        + "`; tokens/s, the mean of every run's mean (n = runs pooled into the row). *Each run*: the "
        "row's tg64 over f16's in the same run, lowest and highest over the runs, in how many runs it was "
        ">= 1, and (2 runs or more) their mean ± the half-width of its 95 % t interval."
        + "".join(
            sorted({f" Build: {llama_bench.build_label(d['build'])}." for d in docs if d.get("build")})
        ),
        "",
        "| K / V | environment | n | tg64 | tg64 / f16 | each run / f16 | tg64 / q4_0 | pp512 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (kv, env), c in pooled.items():
        tg, pp = _mean(c["tg"]), _mean(c["pp"])
        rr = per_run_ratios(per_run, (kv, env))
        each = f"{min(rr):.3f}-{max(rr):.3f} ({sum(r >= 1 for r in rr)} of {len(rr)} >= 1)" if rr else "-"
        if len(rr) >= 2:
            m, h = mean_ci95(rr)
            each += f"; mean {m:.3f} ± {h:.3f}"
        cells = (kv, env, len(c["tg"]), f"{tg:.1f}", f"{tg / f16:.3f}", each, f"{tg / q4:.3f}", f"{pp:.0f}")
        md.append("| " + " | ".join(map(str, cells)) + " |")
    return md


def summarize(argv) -> int:
    """The `summarize` subcommand (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="ab_llama_gpu.py summarize")
    ap.add_argument("runs", nargs="+", help="JSON files written by this script, same --set")
    ap.add_argument("--depth", type=int, required=True)
    ap.add_argument("--same-as", nargs="*", default=[], metavar="NAME=VALUE")
    ap.add_argument("--out", help="write the markdown table here (default: print it)")
    args = ap.parse_args(argv)
    bad = [kv for kv in args.same_as if "=" not in kv]
    if bad:
        ap.error(f"--same-as takes NAME=VALUE, got {bad[0]!r}")
    try:
        md = summary_lines(_read_runs(ap, args.runs), args.runs, args.depth, args.same_as)
    except ValueError as e:
        ap.error(str(e))
    text = "\n".join(md) + "\n"
    if args.out:
        atomic_write_text(args.out, text)
    print(text, end="")
    return 0


def _read_runs(ap, files: list[str]) -> list[dict]:
    """The A/B documents of `files`, or the parser's error naming the file that is not one."""
    docs = []
    for f in files:
        try:
            doc = json.loads(Path(f).read_text())
            if not isinstance(doc, dict) or not isinstance(doc.get("runs"), list):
                raise ValueError("no list of runs")
            docs.append(doc)
        except (OSError, ValueError) as e:
            ap.error(f"{f}: expected a JSON file written by ab_llama_gpu.py ({type(e).__name__}: {e})")
    return docs


def change_lines(before: list[dict], after: list[dict], depth: int) -> list[str]:
    """The markdown of `change`: per row without an environment in both sets, its pooled tg64 over f16/f16's
    and over q4_0/q4_0's in each set, and the difference of the f16 ratios; ValueError naming the set
    without an f16/f16 or q4_0/q4_0 row."""
    sets = [{k: _mean(c["tg"]) for k, c in pool(d, depth).items() if c["tg"]} for d in (before, after)]
    for name, t in zip(("--before", "--after"), sets, strict=True):
        missing = [k for k in ("f16/f16", "q4_0/q4_0") if (k, "-") not in t]
        if missing:
            raise ValueError(f"{name}: no tg64 row of {' and '.join(missing)} at depth {depth}")
    md = [
        f"| K / V (tg64, depth {depth}) | before / f16 | after / f16 | change | before / q4_0 "
        "| after / q4_0 |",
        "|---|---|---|---|---|---|",
    ]
    for key in [k for k in sets[0] if k in sets[1] and k[1] == "-"]:
        r = [t[key] / t[("f16/f16", "-")] for t in sets]
        q = [t[key] / t[("q4_0/q4_0", "-")] for t in sets]
        md.append(f"| {key[0]} | {r[0]:.3f} | {r[1]:.3f} | {r[1] - r[0]:+.3f} | {q[0]:.3f} | {q[1]:.3f} |")
    return md


def change(argv) -> int:
    """The `change` subcommand (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="ab_llama_gpu.py change")
    ap.add_argument("--before", nargs="+", required=True, help="JSON files of the earlier build's passes")
    ap.add_argument("--after", nargs="+", required=True, help="JSON files of the later build's passes")
    ap.add_argument("--depth", type=int, required=True)
    args = ap.parse_args(argv)
    try:
        md = change_lines(_read_runs(ap, args.before), _read_runs(ap, args.after), args.depth)
    except ValueError as e:
        ap.error(str(e))
    print("\n".join(md))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["summarize"]:
        return summarize(argv[1:])
    if argv[:1] == ["change"]:
        return change(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--depths", type=int, nargs="+", default=[0, 4096])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="docs/bench/gpu")
    ap.add_argument("--name", default="ab-depth0")
    ap.add_argument("--set", choices=tuple(SETS), default="extras")
    ap.add_argument(
        "--cpu",
        type=int,
        metavar="THREADS",
        help="run on the CPU backend (-ngl 0 -t THREADS) instead of -ngl 99",
    )
    args = ap.parse_args(argv)
    device = ["-ngl", "99"] if args.cpu is None else ["-ngl", "0", "-t", str(args.cpu)]
    if args.cpu is None:
        where = gpu_name()
    else:
        from kvsetup.cpu import cpu_model  # (not standard library only: the set-up's venv runs --cpu)

        where = f"CPU: {cpu_model()}, {args.cpu} threads"
    binary = str(Path(args.bin) / "llama-bench")
    build = llama_bench.build_info(args.bin)
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            ("LLAMA_KV_", "LLAMA_ATTN_ROT", "GGML_CUDA_POLAR_", "GGML_CUDA_DISABLE_GRAPHS", "GGML_CUDA_MMVQ_")
        )
    }
    runs, failed = [], 0
    for k, v, env in SETS[args.set]:
        kv = f"{k}/{v}"
        cmd = llama_bench.command(binary, args.model, k, v, args.depths, args.reps, device)
        p = subprocess.run(
            cmd, env={**clean, **env}, capture_output=True, text=True, stdin=subprocess.DEVNULL
        )
        try:
            rows = llama_bench.results(p.stdout)
        except ValueError as e:
            print(f"{kv} {env}: {e}", file=sys.stderr)
            failed += 1
            continue
        runs.append({"kv": kv, "env": env, "command": " ".join(cmd), "rows": rows})
        print(json.dumps(runs[-1]["rows"]), flush=True)
    command = llama_bench.command_line("ab_llama_gpu.py", argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out / f"{args.name}.json",
        json.dumps({"device": where, "build": build, "command": command, "runs": runs}, indent=1) + "\n",
    )
    head = " | ".join(f"tg64 d{d}" for d in args.depths)
    md = [
        f"# tg64 with each polar extra turned off ({where})",
        "",
        f"Generated by `{command}`; tokens/s, mean ± sd.",
        "",
        f"| K / V | environment | {head} |",
        "|---|---|" + "---|" * len(args.depths),
    ]
    for r in runs:
        tg = {x["depth"]: x for x in r["rows"] if x["test"].startswith("tg")}
        cells = " | ".join(
            f"{tg[d]['tps']:.1f} ± {tg[d]['tps_sd']:.1f}" if d in tg else "-" for d in args.depths
        )
        env = " ".join(f"{k}={v}" for k, v in r["env"].items()) or "-"
        md.append(f"| {r['kv']} | {env} | {cells} |")
    atomic_write_text(out / f"{args.name}.md", "\n".join(md) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
