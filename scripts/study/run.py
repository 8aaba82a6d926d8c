"""The measurements of the format study (docs/format-study.json); `study.report` renders them.

(a) i.i.d. N(0, 1) blocks: every layout's relative MSE and bits/elem, against the Shannon bound
    2^(-2R) of a Gaussian source;
(b) real post-RoPE K and V of SmolLM2-135M and Qwen2.5-Coder-1.5B on the SQuAD text, with
    llama.cpp's Hadamard rotation on/off and per-layer centering on/off: relative MSE,
    attention-logit error, softmax KL and attention-output error with the real queries.

Layouts run in spawned worker processes with one BLAS thread each; the activation dump
(`study.activations`, torch) runs first in a child process of its own.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from kvpolar.paths import DataNotFoundError, repo_root

from . import AttentionRef, activations, baselines, finish_attention, layouts, rel_mse_sums
from .paper_a import sylvester_hadamard

log = logging.getLogger("study.run")

COMMAND = "python3 scripts/format_study.py run"

SCRIPTS = Path(__file__).resolve().parents[1]  # the folder holding the `study` package

# Layouts per table. Gaussian: everything. Real data: CORE in every cell, MAIN_EXTRA too in the
# cells that matter (rotation on; K centered, V not: see the decision).
MAIN_CELL = {"k": "k|1|mean", "v": "v|1|none"}
CORE = [
    "q8_0",
    "q5_0",
    "q4_0",
    "iq4_nl",
    "polar",
    "polar3",
    "A-preset",
    "B-44-ch",
    "B-44-ch-other",
    "B-33-ch",
    "LM-r3a5",
]
MAIN_EXTRA = [
    "q4_1",
    "polar-norm",
    "polar-max",
    "polar3-norm",
    "A-online",
    "A-4322",
    "B-44-tok32",
    "ring:256 pts, 11 rings",
    "ring:polar-b32",
]
SINK_KEYS = ("polar", "q4_0")  # V error also measured with token 0 kept exact
GAUSS_ORDER = [
    "A-preset",
    "A-none",
    "A-gauss",
    "A-online",
    "A-4322",
    "B-44-ch",
    "B-33-ch",
    "B-44-tok32",
    "B-44-tok64",
    "B-44-tok32-mm",
    "B-33-tok64",
    "LM-r3a5",
    "LM-r4a4",
    "LM-r2a4",
    "polar-norm",
    "polar-max",
    "polar",
    "polar3-norm",
    "polar3-max",
    "polar3",
    "ring:256 pts, 9 rings",
    "ring:256 pts, 10 rings (polar)",
    "ring:256 pts, 11 rings",
    "ring:polar-b32",
    "ring:128 pts, 8 rings",
    "ring:64 pts, 5 rings",
    "ring:64 pts, 6 rings (polar3)",
    "ring:64 pts, 7 rings",
    "q4_0",
    "q4_1",
    "iq4_nl",
    "q5_0",
    "q8_0",
]

THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
CRIT_BITS = 4.25  # the decision's criteria for polar: bits/elem at most this,
CRIT_GAUSS = 0.0065  # Gaussian rel. MSE at most this, real Qwen2.5 K logit error below q4_0's


# ----------------------------------------------------------------------------------------------
# Machine


def machine() -> dict:
    model = "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    vers = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("torch", "transformers", "gguf"):
        try:
            vers[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            vers[mod] = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo_root()), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "versions": vers,
        "commit": commit,
    }


# ----------------------------------------------------------------------------------------------
# Workers (run in spawned processes with one BLAS thread each)


def _worker_init() -> None:
    logging.basicConfig(level=logging.WARNING)


def gauss_task(key: str, n_blocks: int, seed: int) -> dict:
    lay = layouts("norm")[key]
    x = np.random.default_rng(seed).standard_normal((1, n_blocks, 64)).astype(np.float32)
    t0 = time.time()
    y = lay.fn(x)
    dt = time.time() - t0
    err = float(((x.astype(np.float64) - y) ** 2).sum() / (x.astype(np.float64) ** 2).sum())
    bits = lay.bits(x.shape)
    return {
        "key": key,
        "label": lay.label,
        "family": lay.family,
        "bits": bits,
        "rel_mse": err,
        "x_bound": err / 2 ** (-2 * bits),
        "seconds": round(dt, 2),
    }


def hadamard_rows(x: np.ndarray, n: int) -> np.ndarray:
    """x (..., d) -> each consecutive n-chunk multiplied by the normalized Sylvester Hadamard
    matrix (ggml_gen_hadamard's; symmetric and its own inverse)."""
    h = sylvester_hadamard(n)
    sh = x.shape
    return (x.reshape(*sh[:-1], sh[-1] // n, n).astype(np.float64) @ h).reshape(sh)


def k_rot_size(d: int) -> int:
    """llama_kv_cache::build_input_k_rot: the largest power of two >= 64 dividing the head size."""
    n = 64
    while d % (2 * n) == 0:
        n *= 2
    return n


def cells_for(meta: dict) -> list[dict]:
    centers_k = ["none", "mean"] + (["kbias"] if meta.get("has_kbias") else [])
    cells = []
    for tensor, centers in (("k", centers_k), ("v", ["none", "mean"])):
        for rot in (True, False):
            for center in centers:
                main = f"{tensor}|{int(rot)}|{center}" == MAIN_CELL[tensor]
                cells.append(
                    {
                        "tensor": tensor,
                        "rot": rot,
                        "center": center,
                        "layouts": CORE + (MAIN_EXTRA if main else []),
                    }
                )
    return cells


def layer_task(model: str, layer: int, n_seq: int, seq_len: int, nq: int, cells: list[dict]) -> dict:
    meta = activations.meta(model, n_seq, seq_len)
    data = activations.load_layer(model, layer, n_seq, seq_len)
    lays = layouts(meta["pairing"])
    ev = n_seq - 1  # evaluate on the last sequence, calibrate the offsets on the first
    q, k, v = data["q"][ev], data["k"][ev], data["v"][ev]
    mu = {
        "k": {"none": 0.0, "mean": data["k"][0].mean(1, keepdims=True).astype(np.float64)},
        "v": {"none": 0.0, "mean": data["v"][0].mean(1, keepdims=True).astype(np.float64)},
    }
    if "kbias" in data:
        mu["k"]["kbias"] = data["kbias"][:, None, :].astype(np.float64)
    d = k.shape[-1]
    rot_n = {"k": k_rot_size(d), "v": 64}
    step = max(1, seq_len // nq)
    qpos = np.arange(step - 1, seq_len, step)
    ref = AttentionRef(q, k, v, qpos)
    out = {}
    for cell in cells:
        t = cell["tensor"]
        x = (k if t == "k" else v).astype(np.float64)
        s = x - mu[t][cell["center"]]
        if cell["rot"]:
            s = hadamard_rows(s, rot_n[t])
        s32 = s.astype(np.float32)
        res = {}
        for key in cell["layouts"]:
            if key not in lays:
                continue  # e.g. iq4_nl without the build
            sh = lays[key].fn(s32).astype(np.float64)
            se, ss = rel_mse_sums(s32, sh)
            xh = hadamard_rows(sh, rot_n[t]) if cell["rot"] else sh
            xh = xh + mu[t][cell["center"]]
            se_x, ss_x = rel_mse_sums(x, xh)
            att = ref.k_sums(xh) if t == "k" else ref.v_sums(xh)
            if t == "v" and key in SINK_KEYS:
                xh[:, 0] = x[:, 0]
                att["outv_se_t0"] = ref.v_sums(xh)["outv_se"]
            res[key] = {
                "se": se,
                "ss": ss,
                "se_x": se_x,
                "ss_x": ss_x,
                "bits": lays[key].bits(s32.shape),
                **att,
            }
        out[f"{t}|{int(cell['rot'])}|{cell['center']}"] = res
    return {"model": model, "layer": layer, "cells": out, "p0": ref.p0 / ref.nq}


# ----------------------------------------------------------------------------------------------
# Runs


def pick_layers(n_layer: int, n: int) -> list[int]:
    return sorted({round(float(v)) for v in np.linspace(0, n_layer - 1, min(n, n_layer))})


def run_gaussian(pool, n_blocks: int, seed: int, keys: list[str]) -> list[dict]:
    futs = [pool.submit(gauss_task, k, n_blocks, seed) for k in keys]
    rows = []
    for f in futs:
        r = f.result()
        log.info("gauss %-32s %.3f b  rel MSE %.5f  (%.1fs)", r["key"], r["bits"], r["rel_mse"], r["seconds"])
        rows.append(r)
    return rows


def combine(results: list[dict], cells: list[dict]) -> dict:
    out = {}
    for cell in cells:
        ck = f"{cell['tensor']}|{int(cell['rot'])}|{cell['center']}"
        agg: dict[str, dict] = {}
        per_layer: dict[str, dict] = {}
        for r in results:
            for key, s in r["cells"][ck].items():
                a = agg.setdefault(key, {n: 0.0 for n in s if n != "bits"})
                for n, val in s.items():
                    if n != "bits":
                        a[n] += val
                a["bits"] = s["bits"]
                pl = finish_attention(s)
                per_layer.setdefault(key, {})[r["layer"]] = {
                    "rel_mse": s["se"] / s["ss"],
                    **{n: pl[n] for n in ("logit_err", "kl", "out_err_v") if n in pl},
                }
        rows = {}
        for key, a in agg.items():
            fin = finish_attention(a)
            rows[key] = {
                "bits": a["bits"],
                "rel_mse": a["se"] / a["ss"],
                "rel_mse_x": a["se_x"] / a["ss_x"],
                **fin,
                "per_layer": per_layer[key],
            }
            if "outv_se_t0" in a:
                rows[key]["out_err_v_t0"] = a["outv_se_t0"] / a["out_sq"]
        out[ck] = {"tensor": cell["tensor"], "rot": cell["rot"], "center": cell["center"], "layouts": rows}
    return out


def _dump_env() -> dict[str, str]:
    """The activation dump's environment: BLAS threads not pinned to 1, no progress bars, and
    the folder holding `study` on its import path (`-m study.activations` from any directory)."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SCRIPTS), env.get("PYTHONPATH")) if p)
    env["TQDM_DISABLE"] = "1"
    return env


def run_real(pool, model: str, args) -> dict | None:
    spec = activations.get_model(model)
    dumped_s = None
    if not activations.have(model, args.n_seq, args.seq_len):
        if args.no_dump:
            return {
                "skipped": f"no activations in {activations.activations_dir(model, args.n_seq, args.seq_len)}"
            }
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            return {"skipped": f"activation dump needs torch + transformers: {e}"}
        t0 = time.time()
        log.info("dumping activations of %s (%d x %d tokens)", model, args.n_seq, args.seq_len)
        try:
            # in a subprocess: torch gets both cores, and its memory is returned afterwards
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "study.activations",
                    "dump",
                    "--model",
                    model,
                    "--n-seq",
                    str(args.n_seq),
                    "--seq-len",
                    str(args.seq_len),
                ],
                check=True,
                env=_dump_env(),
            )
        except subprocess.CalledProcessError as e:
            try:
                activations.data_file(spec.gguf)
            except DataNotFoundError as dn:
                return {"skipped": str(dn)}
            raise RuntimeError(f"activation dump of {model} failed ({e})") from e
        dumped_s = round(time.time() - t0, 1)
        log.info("dumped %s in %.0fs", model, dumped_s)
    meta = activations.meta(model, args.n_seq, args.seq_len)
    layers = pick_layers(meta["n_layer"], args.layers)
    cells = cells_for(meta)
    if args.quick:
        for c in cells:
            c["layouts"] = [k for k in c["layouts"] if k in ("q4_0", "polar", "B-44-ch")]
    t0 = time.time()
    futs = [pool.submit(layer_task, model, li, args.n_seq, args.seq_len, args.nq, cells) for li in layers]
    results = []
    for f in futs:
        results.append(f.result())
        log.info("%s layer %d done (%.0fs)", model, results[-1]["layer"], time.time() - t0)
    return {
        "meta": meta,
        "layers": layers,
        "eval_tokens": args.seq_len,
        "queries_per_head": len(
            range(max(1, args.seq_len // args.nq) - 1, args.seq_len, max(1, args.seq_len // args.nq))
        ),
        "cells": combine(results, cells),
        "sink_mass": float(np.mean([r["p0"] for r in results])),
        "dumped_s": dumped_s,
        "seconds": round(time.time() - t0, 1),
    }


def decide(res: dict) -> dict:
    g = {r["key"]: r for r in res["gaussian"]}
    dec: dict = {"polar": {}, "polar3": {}}
    p = dec["polar"]
    p["bits"] = g["polar"]["bits"]
    p["bits_ok"] = p["bits"] <= CRIT_BITS
    p["gauss_rel_mse"] = g["polar"]["rel_mse"]
    p["gauss_ok"] = p["gauss_rel_mse"] <= CRIT_GAUSS
    qw = res["real"].get("qwen2.5-coder-1.5b", {})
    main = qw.get("cells", {}).get("k|1|mean", {}).get("layouts", {})
    if "polar" in main and "q4_0" in main:
        p["qwen_k_logit_err"] = main["polar"]["logit_err"]
        p["qwen_k_logit_err_q4_0"] = main["q4_0"]["logit_err"]
        p["qwen_ok"] = p["qwen_k_logit_err"] < p["qwen_k_logit_err_q4_0"]
    else:
        p["qwen_ok"] = None
    p["confirmed"] = bool(p["bits_ok"] and p["gauss_ok"] and p["qwen_ok"])
    q = dec["polar3"]
    q["bits"] = g["polar3"]["bits"]
    q["gauss_rel_mse"] = g["polar3"]["rel_mse"]
    q["gauss_best_other_3_25"] = min(
        (r["rel_mse"], r["key"])
        for r in res["gaussian"]
        if abs(r["bits"] - 3.25) < 1e-9 and r["key"] not in ("polar3", "ring:64 pts, 6 rings (polar3)")
    )
    q["gauss_ok"] = q["gauss_rel_mse"] <= q["gauss_best_other_3_25"][0]
    return dec


def measure(args) -> dict:
    """Everything docs/format-study.json holds, for the settings of `study.cli`'s `run`."""
    t_start = time.time()
    m = machine()
    if args.quick:
        args.layers, args.gauss_blocks, args.nq = 2, 2048, 32
    all_keys = list(layouts("norm"))
    gkeys = [k for k in GAUSS_ORDER if k in all_keys]
    if args.quick:
        gkeys = ["A-preset", "B-44-ch", "polar", "polar3", "q4_0"]
    for k in THREAD_VARS:
        os.environ[k] = "1"  # for the spawned workers (this process already has its BLAS)
    res: dict = {
        "command": COMMAND + (" --quick" if args.quick else ""),
        "machine": m,
        "settings": {
            "gauss_blocks": args.gauss_blocks,
            "gauss_seed": args.seed,
            "layers": args.layers,
            "n_seq": args.n_seq,
            "seq_len": args.seq_len,
            "nq": args.nq,
            "jobs": args.jobs,
        },
        "iq4_nl": baselines.ggml_library() or baselines.IQ4NL_MISSING,
    }
    # activation dumps first (torch wants both cores)
    real: dict = {}
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_worker_init) as pool:
        t0 = time.time()
        res["gaussian"] = run_gaussian(pool, args.gauss_blocks, args.seed, gkeys)
        res["gaussian_seconds"] = round(time.time() - t0, 1)
        for model in args.models:
            real[model] = run_real(pool, model, args)
    res["real"] = real
    res["decision"] = decide(res) if not args.quick else {}
    res["total_seconds"] = round(time.time() - t_start, 1)
    return res
