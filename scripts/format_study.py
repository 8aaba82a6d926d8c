#!/usr/bin/env python3
# ruff: noqa: RUF001, RUF003  (writes Markdown: ×, −, – and ‖ are meant)
"""Regenerate the format study: docs/format-study.md and docs/format-study.json.

    python3 scripts/format_study.py run            # everything (dumps activations if missing)
    python3 scripts/format_study.py render         # rewrite the .md from the .json
    python3 scripts/format_study.py run --quick    # small smoke run, writes to /tmp

What `run` measures (study):
  (a) i.i.d. N(0, 1) blocks: every layout's relative MSE and bits/elem, against the Shannon
      bound 2^(-2R) of a Gaussian source;
  (b) real post-RoPE K and V of SmolLM2-135M and Qwen2.5-Coder-1.5B on the SQuAD text,
      with llama.cpp's Hadamard rotation on/off and per-layer centering on/off: relative MSE,
      attention-logit error, softmax KL and attention-output error with the real queries.
Needs torch + transformers (+ accelerate) for the activation dump; the data files come from
`python3 scripts/bootstrap.py data --qwen`.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DOC_MD = REPO / "docs" / "format-study.md"
DOC_JSON = REPO / "docs" / "format-study.json"
COMMAND = "python3 scripts/format_study.py run"

log = logging.getLogger("format_study")

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
CRIT_BITS = 4.25
CRIT_GAUSS = 0.0065


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
    from importlib import metadata

    for mod in ("torch", "transformers", "gguf"):
        try:
            vers[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            vers[mod] = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
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


def machine_line(m: dict) -> str:
    return f"{m['cpu']} (`lscpu` model name), {m['cores']} cores, commit {m['commit'] or '?'}"


# ----------------------------------------------------------------------------------------------
# Workers (run in spawned processes with one BLAS thread each)


def _worker_init() -> None:
    logging.basicConfig(level=logging.WARNING)


def gauss_task(key: str, n_blocks: int, seed: int) -> dict:
    from study import layouts

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
    from study.paper_a import sylvester_hadamard

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
    from study import AttentionRef, activations, layouts, rel_mse_sums

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
    from study import finish_attention

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


def run_real(pool, model: str, args) -> dict | None:
    from study import activations

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
        from kvpolar.paths import DataNotFoundError

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
                env={**{k: v for k, v in os.environ.items() if k not in THREAD_VARS}, "TQDM_DISABLE": "1"},
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


def cmd_run(args) -> int:
    from study import baselines, layouts

    t_start = time.time()
    m = machine()
    md_path = Path(args.out_md)
    json_path = Path(args.out_json)
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
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(res, indent=1, default=float) + "\n")
    md_path.write_text(render(res))
    print(f"wrote {md_path} and {json_path} ({res['total_seconds']:.0f}s)")
    return 0


def cmd_render(args) -> int:
    res = json.loads(Path(args.out_json).read_text())
    Path(args.out_md).write_text(render(res))
    print(f"wrote {args.out_md}")
    return 0


# ----------------------------------------------------------------------------------------------
# Markdown


def f4(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 0.01:
        return f"{v:.4f}"
    return f"{v:.2e}"


def bits_s(b: float) -> str:
    s = f"{b:.4f}".rstrip("0").rstrip(".")
    return s


def _dump_note(res: dict) -> str:
    done = {m: r.get("dumped_s") for m, r in res["real"].items() if r and "meta" in r}
    made = {m: t for m, t in done.items() if t}
    if made:
        return (
            ", including the activation dumps (" + ", ".join(f"{m} {t:.0f} s" for m, t in made.items()) + ")"
        )
    cached = {m: r["meta"].get("seconds") for m, r in res["real"].items() if r and "meta" in r}
    return (
        ", activations cached (dumping them takes "
        + ", ".join(f"{m} {t:.0f} s" for m, t in cached.items() if t)
        + " more)"
    )


def _iq4_note(v: str | None) -> str:
    if v and v.endswith(".so"):
        return f"`ggml_quantize_chunk` + `to_float` of the llama.cpp build's {Path(v).name} (ctypes)"
    return v or "not measured"


def render(res: dict) -> str:
    from study import layouts

    labels = {k: lay.label for k, lay in layouts("norm").items()}
    m = res["machine"]
    prov = f"Produced by `{res['command']}` on {machine_line(m)}."
    L: list[str] = []
    w = L.append
    w("# Format study: is `polar` / `polar3` the right block format?")
    w("")
    w(
        f"Generated by `{COMMAND}` (do not edit by hand; numbers: `docs/format-study.json`). "
        f"Machine: {machine_line(m)}; Python {m['versions']['python']}, numpy {m['versions']['numpy']}, "
        f"torch {m['versions'].get('torch')}, transformers {m['versions'].get('transformers')}, "
        f"gguf {m['versions'].get('gguf')}. This run: {res['total_seconds'] / 60:.1f} min"
        + _dump_note(res)
        + "."
    )
    w("")
    w(
        "Code: `study` (`paper_a`, `paper_b`, `variants`, `baselines`, `activations`); the chosen "
        "formats are measured through the reference codec `kvpolar.codec` itself. Bits/elem count every "
        "stored scale, norm, min/max and codebook. Tests: `tests/test_paper_a.py`, `tests/test_paper_b.py`, "
        "`tests/test_variants.py`. q4_0, q4_1, q5_0, q8_0: gguf-py's numpy quants (bit-exact with ggml); "
        f"iq4_nl: {_iq4_note(res.get('iq4_nl'))}."
    )
    w("")
    dec = res.get("decision") or {}
    if dec:
        w("## Decision")
        w("")
        w(decision_text(res))
        w("")

    # (a) Gaussian
    s = res["settings"]
    w("## (a) Gaussian blocks")
    w("")
    w(
        f"{s['gauss_blocks']} rows of 64 i.i.d. N(0, 1) values (seed {s['gauss_seed']}); relative MSE "
        "E|x - x̂|² / E|x|²; Shannon's bound for a Gaussian source at R bits is 2^(-2R). " + prov
    )
    w("")
    w("| layout | family | bits/elem | rel. MSE | × bound |")
    w("|---|---|---|---|---|")
    for r in res["gaussian"]:
        w(f"| {r['label']} | {r['family']} | {bits_s(r['bits'])} | {f4(r['rel_mse'])} | {r['x_bound']:.1f} |")
    w("")
    gk = {r["key"]: r for r in res["gaussian"]}
    need = ("A-preset", "B-44-ch", "B-33-ch", "polar", "polar-norm", "polar-max", "LM-r3a5")
    if all(k in gk for k in need):
        gain_n = 1 - gk["polar"]["rel_mse"] / gk["polar-norm"]["rel_mse"]
        gain_m = 1 - gk["polar"]["rel_mse"] / gk["polar-max"]["rel_mse"]
        w(
            "Reading: paper A's preset spends 2 of its 3.875 bits on level-1 angles (a 4-bit uniform angle "
            "alone costs "
            "(2π/16)²/12 ≈ 0.013 of the pair energy) and its 2-bit upper levels are coarse; the "
            "preconditioner makes no "
            "difference on data that is already rotation invariant, and online codebooks gain nothing over "
            "the analytic "
            "ones (the analytic densities are exact here). Paper B's uniform radius/angle quantizers land at "
            f"{gk['B-44-ch']['x_bound']:.1f}× (Polar_44) and {gk['B-33-ch']['x_bound']:.1f}× (Polar_33) the "
            "bound. A "
            "Lloyd-Max radius with a finer uniform angle (3 + 5 bits) reaches "
            f"{gk['LM-r3a5']['x_bound']:.1f}×; ring "
            f"codes, whose number of angles grows with the radius, reach {gk['polar']['x_bound']:.1f}×. "
            "Searching the "
            f"block scale instead of setting it from the block RMS or max removes {gain_n:.0%} / "
            f"{gain_m:.0%} of the "
            "error."
        )
        w("")

    # (b) real
    w("## (b) Real K and V")
    w("")
    for model, r in res["real"].items():
        if not r or "skipped" in r:
            w(f"**{model}**: skipped ({(r or {}).get('skipped')}).")
            w("")
            continue
        mt = r["meta"]
        w(f"### {model}")
        w("")
        w(
            f"{mt['n_layer']} layers, {mt['n_head']} query / {mt['n_head_kv']} KV heads, "
            f"head size {mt['head_dim']}, RoPE base {mt['rope_theta']:g}, "
            f"RoPE pairs in llama.cpp's cache rows: `{mt['pairing']}`"
            f"{', k-projection bias' if mt.get('has_kbias') else ''}. "
            f"{mt['n_seq']} windows of {mt['seq_len']} tokens of squad.txt (model NLL "
            f'{", ".join(f"{v:.2f}" for v in mt["nll"])} nats/token): offsets ("mean") are '
            "measured on the first, everything is evaluated on the last. "
            f"Layers {r['layers']} (of {mt['n_layer']}); "
            f"{r['queries_per_head']} query positions per head (every "
            f"{max(1, mt['seq_len'] // s['nq'])}th token), each over its causal window. " + prov
        )
        w("")
        cells = r["cells"]
        labels = {k: lay.label for k, lay in layouts(mt["pairing"]).items()}
        for t, tname in (("k", "K"), ("v", "V")):
            main = cells.get(MAIN_CELL[t])
            if not main:
                continue
            what = "rotation on, centered" if t == "k" else "rotation on, not centered"
            w(f"**{tname}, {what}** (the configuration the format targets):")
            w("")
            if t == "k":
                w("| layout | bits/elem | rel. MSE (stored) | logit err | softmax KL | attn-out err |")
                w("|---|---|---|---|---|---|")
            else:
                w("| layout | bits/elem | rel. MSE (stored) | attn-out err |")
                w("|---|---|---|---|")
            rows = sorted(main["layouts"].items(), key=lambda kv: (kv[1]["bits"], kv[0]))
            for key, v in rows:
                lab = labels.get(key, key)
                if t == "k":
                    w(
                        f"| {lab} | {bits_s(v['bits'])} | {f4(v['rel_mse'])} | {f4(v['logit_err'])} | "
                        f"{f4(v['kl'])} | "
                        f"{f4(v['out_err_k'])} |"
                    )
                else:
                    w(f"| {lab} | {bits_s(v['bits'])} | {f4(v['rel_mse'])} | {f4(v['out_err_v'])} |")
            w("")
            # rotation x centering grid
            metric = "logit_err" if t == "k" else "out_err_v"
            mname = "attention-logit error" if t == "k" else "attention-output error"
            combos = [ck for ck in cells if ck.startswith(t + "|")]
            heads = []
            for ck in combos:
                c = cells[ck]
                heads.append(
                    (
                        ck,
                        f"rot {'on' if c['rot'] else 'off'}, "
                        f"{c['center'] if c['center'] != 'none' else 'raw'}",
                    )
                )
            w(
                f"**{tname}: {mname} with rotation on/off and centering** (raw = not centered; mean = "
                "per-layer "
                "per-channel mean of the calibration window subtracted"
                + ("; kbias = the k-projection bias subtracted" if t == "k" and mt.get("has_kbias") else "")
                + "):"
            )
            w("")
            w("| layout | bits/elem | " + " | ".join(h for _, h in heads) + " |")
            w("|---|---|" + "---|" * len(heads))
            for key in CORE:
                if key not in main["layouts"]:
                    continue
                vals = [f4(cells[ck]["layouts"].get(key, {}).get(metric)) for ck, _ in heads]
                w(
                    f"| {labels.get(key, key)} | {bits_s(main['layouts'][key]['bits'])} | "
                    + " | ".join(vals)
                    + " |"
                )
            w("")
            if t == "k":
                w(f"**{tname}: softmax KL per query** (same cells):")
                w("")
                w("| layout | " + " | ".join(h for _, h in heads) + " |")
                w("|---|" + "---|" * len(heads))
                for key in CORE:
                    if key not in main["layouts"]:
                        continue
                    vals = [f4(cells[ck]["layouts"].get(key, {}).get("kl")) for ck, _ in heads]
                    w(f"| {labels.get(key, key)} | " + " | ".join(vals) + " |")
                w("")
    w("## Definitions")
    w("")
    w(
        "- rel. MSE (stored): Σ|s − ŝ|² / Σ|s|² of the rows the cache stores (after centering and rotation), "
        "comparable with the Gaussian table. `docs/format-study.json` also has `rel_mse_x`, the error "
        "relative to the "
        "raw K/V."
    )
    w(
        "- logit err: Σ(l̂ − l)² / Σ(l − l̄_q)² over all (query, key ≤ query) pairs, l = q·k/√d with the "
        "real "
        "(unquantized) queries, k̂ decoded (un-rotated, offset added back), l̄_q the mean logit of the "
        "query's window: "
        "logit MSE over the per-query logit variance. Pooled over heads and the listed layers."
    )
    w("- softmax KL: mean over queries of KL(softmax(l) ‖ softmax(l̂)) over the causal window (nats).")
    w(
        "- attn-out err: Σ|ô − o|² / Σ|o|², o = softmax(qKᵀ/√d)V; for K rows with K quantized and V exact, "
        "for V rows "
        "with V quantized and K exact."
    )
    w(
        "- rotation: llama.cpp's graph rotation for quantized caches (`llama_kv_cache::build_input_k_rot`): "
        "the "
        "normalized Sylvester Hadamard matrix of the largest power of two ≥ 64 dividing the head size (64 "
        "for "
        "SmolLM2, 128 for Qwen2.5) on K (and Q), of size 64 on V; it is its own inverse and leaves q·k "
        "unchanged."
    )
    w(
        "- centering: a fixed per-layer offset μ (per KV head and channel) subtracted after RoPE before the "
        "cache "
        "write and added back on read (for K it shifts every logit of a query by the same q·μ, so softmax is "
        "exactly "
        "unchanged; for V it adds μ to the output because the attention weights sum to 1)."
    )
    w(
        "- Rows use llama.cpp's cache layout: SmolLM2 (llama arch) K/Q rows are permuted by the GGUF "
        "converter so "
        "that RoPE pairs are (2i, 2i+1); Qwen2 (NEOX RoPE) keeps (i, i + d/2). Block formats group "
        "consecutive "
        'values of a row; paper B uses the model\'s RoPE pairing ("wrong pairing" row: the other one).'
    )
    w("")
    return "\n".join(L) + "\n"


def _get(res: dict, model: str, ck: str, key: str, metric: str):
    try:
        return res["real"][model]["cells"][ck]["layouts"][key][metric]
    except (KeyError, TypeError):
        return None


def _ratio_range(res: dict, model: str, ck: str, a: str, b: str, metric: str) -> tuple[float, float] | None:
    try:
        pa = res["real"][model]["cells"][ck]["layouts"][a]["per_layer"]
        pb = res["real"][model]["cells"][ck]["layouts"][b]["per_layer"]
    except (KeyError, TypeError):
        return None
    r = [pa[layer][metric] / pb[layer][metric] for layer in pa if metric in pa[layer]]
    return (min(r), max(r)) if r else None


QW, SM = "qwen2.5-coder-1.5b", "smollm2-135m"
NAMES = {QW: "Qwen2.5", SM: "SmolLM2"}


def decision_text(res: dict) -> str:
    dec = res["decision"]
    g = {r["key"]: r for r in res["gaussian"]}
    labels = {r["key"]: r["label"] for r in res["gaussian"]}
    p, q = dec["polar"], dec["polar3"]
    models = [m for m in (QW, SM) if res["real"].get(m) and "cells" in res["real"][m]]
    out = []
    w = out.append
    yn = {True: "yes", False: "**NO**", None: "not measured"}
    w(f"### `polar` (4.25 bits/elem): {'confirmed' if p['confirmed'] else 'CHALLENGED'}")
    w("")
    w("| criterion | measured | met |")
    w("|---|---|---|")
    w(f"| bits/elem ≤ {CRIT_BITS} | {bits_s(p['bits'])} | {yn[p['bits_ok']]} |")
    w(f"| Gaussian rel. MSE ≤ {CRIT_GAUSS} | {p['gauss_rel_mse']:.5f} | {yn[p['gauss_ok']]} |")
    if p.get("qwen_ok") is not None:
        w(
            f"| attention-logit error on real Qwen2.5 K (rotated + centered) below q4_0's | "
            f"{f4(p['qwen_k_logit_err'])} vs {f4(p['qwen_k_logit_err_q4_0'])} | {yn[p['qwen_ok']]} |"
        )
    else:
        w("| attention-logit error on real Qwen2.5 K below q4_0's | – | not measured |")
    w("")
    for m in models:
        rq = _ratio_range(res, m, "k|1|mean", "polar", "q4_0", "logit_err")
        ri = _ratio_range(res, m, "k|1|mean", "polar", "iq4_nl", "logit_err")
        lv = {k: _get(res, m, "k|1|mean", k, "logit_err") for k in ("polar", "q4_0", "iq4_nl", "q5_0")}
        kl = {k: _get(res, m, "k|1|mean", k, "kl") for k in ("polar", "q4_0", "iq4_nl")}
        vv = {k: _get(res, m, "v|1|none", k, "out_err_v") for k in ("polar", "q4_0", "iq4_nl")}
        txt = (
            f"- {NAMES[m]}, K rotated + centered: logit error polar {f4(lv['polar'])}, q4_0 "
            f"{f4(lv['q4_0'])}, "
            f"iq4_nl {f4(lv['iq4_nl'])}, q5_0 {f4(lv['q5_0'])}; softmax KL polar {f4(kl['polar'])}, q4_0 "
            f"{f4(kl['q4_0'])}, iq4_nl {f4(kl['iq4_nl'])}."
        )
        if rq and ri:
            txt += (
                f" Per layer, polar's logit error is {rq[0]:.2f}-{rq[1]:.2f}× q4_0's and "
                f"{ri[0]:.2f}-{ri[1]:.2f}× iq4_nl's."
            )
        txt += (
            f" V (rotated, not centered), attention-output error: polar {f4(vv['polar'])}, q4_0 "
            f"{f4(vv['q4_0'])}, iq4_nl {f4(vv['iq4_nl'])}."
        )
        w(txt)
    if models:
        b32 = _get(res, QW, "k|1|mean", "ring:polar-b32", "logit_err")
        iq = _get(res, QW, "k|1|mean", "iq4_nl", "logit_err")
        r11 = g.get("ring:256 pts, 11 rings", {}).get("rel_mse")
        ratios_q4, ratios_iq, stored, worse = [], [], [], []
        for m in models:
            for metric, ck in (("logit_err", MAIN_CELL["k"]), ("out_err_v", MAIN_CELL["v"])):
                for ref, acc in (("q4_0", ratios_q4), ("iq4_nl", ratios_iq)):
                    try:
                        pa = res["real"][m]["cells"][ck]["layouts"]["polar"]["per_layer"]
                        pb = res["real"][m]["cells"][ck]["layouts"][ref]["per_layer"]
                    except KeyError:
                        continue
                    for layer in pa:
                        r = pa[layer][metric] / pb[layer][metric]
                        acc.append(r)
                        if ref == "q4_0" and r >= 1:
                            worse.append(f"{NAMES[m]} {ck[0].upper()} layer {layer}: {r:.2f}")
                stored.append(_get(res, m, ck, "polar", "rel_mse"))
        stored = [v for v in stored if v is not None]
        w("")
        w(
            "Reading: at 0.25 bits/elem less, `polar` beats q4_0 on both tensors of both models "
            + ("and in every layer measured " if not worse else "in aggregate ")
            + f"(per-layer error ratio to q4_0: {min(ratios_q4):.2f}-{max(ratios_q4):.2f}"
            + (f"; not below 1 in {', '.join(worse)}" if worse else "")
            + ") and stays behind "
            f"iq4_nl at 4.5 bits (ratio {min(ratios_iq):.2f}-{max(ratios_iq):.2f}), as the Gaussian numbers "
            "predicted: real K (rotated + centered) and V (rotated) quantize like Gaussian blocks "
            f"(polar's stored rel. MSE on them: {min(stored):.5f}-{max(stored):.5f}, "
            f"Gaussian {g['polar']['rel_mse']:.5f}). "
            "The same 256-point code on blocks of 32 (4.5 bits"
            + (f"; Qwen2.5 K logit error {f4(b32)} vs iq4_nl {f4(iq)}" if b32 is not None else "")
            + ") is on par with or better than iq4_nl at equal bits: the gap is the scale overhead "
            "saved, not the code. Other ring counts change little"
            + (
                f" (11 rings: Gaussian {r11:.5f} vs {g['polar']['rel_mse']:.5f}, mixed on real data)"
                if r11
                else ""
            )
            + ": no reason to change the tables."
        )
    w("")

    best = q["gauss_best_other_3_25"]
    w(
        f"### `polar3` (3.25 bits/elem): {'confirmed' if q['gauss_ok'] else 'CHALLENGED'} as the 3.25-bit "
        "option"
    )
    w("")
    w(
        f"Gaussian rel. MSE {q['gauss_rel_mse']:.4f} ({g['polar3']['x_bound']:.1f}× the bound); the best "
        "other 3.25-bit "
        f"layout measured is {labels.get(best[1], best[1])} at {best[0]:.4f}; paper B's Polar_33 "
        f"{g['B-33-ch']['rel_mse']:.4f}."
    )
    w("")
    for m in models:
        r3 = _get(res, m, "k|1|mean", "polar3", "logit_err")
        r4 = _get(res, m, "k|1|mean", "q4_0", "logit_err")
        ra = _get(res, m, "k|1|mean", "A-preset", "logit_err")
        rb = _get(res, m, "k|1|mean", "B-33-ch", "logit_err")
        if r3 is not None and r4:
            w(
                f"- {NAMES[m]} K (rotated + centered), logit error: polar3 {f4(r3)} = {r3 / r4:.1f}× q4_0's "
                "at "
                f"{3.25 / 4.5:.0%} of its bits; paper A preset (3.875 bits) {f4(ra)}; paper B Polar_33 "
                f"{f4(rb)}."
            )
    w("")
    w(
        "polar3 is the low-memory option (4.9× smaller than f16), not a q4_0 replacement at equal quality. "
        "Among "
        "3.25-bit layouts it is the best measured, and it also beats paper A's 3.875-bit preset."
    )
    w("")

    w("### Where rotation and centering live: in the graph, not in the block")
    w("")
    w(
        "llama.cpp already multiplies Q and K (and V, undone after attention) by a Hadamard matrix in the "
        "graph whenever "
        "the cache type is quantized, so a block format gets rotated rows for free and must not pay for a "
        "preconditioner of its own (paper A's random rotation is the same operation). Centering K is a fixed "
        "per-layer offset subtracted after RoPE, before the cache write; it belongs in the graph next to the "
        "rotation, "
        "computed once from calibration text (for Qwen2 the k-projection bias is a weights-only stand-in), "
        "and costs "
        "no bits per block. K shift (context shift) must add the offset back before re-rotating stored keys."
    )
    w("")
    for m in models:
        v = {
            ck: _get(res, m, ck, "polar", "logit_err")
            for ck in ("k|0|none", "k|1|none", "k|0|mean", "k|1|mean")
        }
        vq = {ck: _get(res, m, ck, "q4_0", "logit_err") for ck in v}
        kb = _get(res, m, "k|1|kbias", "polar", "logit_err")
        w(
            f"- {NAMES[m]} K, logit error raw / rotated / centered / rotated + centered: polar "
            f"{f4(v['k|0|none'])} / {f4(v['k|1|none'])} / {f4(v['k|0|mean'])} / {f4(v['k|1|mean'])}; q4_0 "
            f"{f4(vq['k|0|none'])} / {f4(vq['k|1|none'])} / {f4(vq['k|0|mean'])} / {f4(vq['k|1|mean'])}"
            + (
                f"; rotated with the k bias subtracted instead of the mean: polar {f4(kb)}"
                if kb is not None
                else ""
            )
            + "."
        )
    w("")
    w(
        "Do **not** center V. It is exact too, but it does not help and can hurt a lot: the attention-sink "
        "token (token 0) has a near-zero value vector and receives a large share of the attention; centering "
        "turns its small value into a large one (≈ −μ) whose quantization error then dominates the output. "
        "With token 0 kept exact, centering V would help a little (last two numbers below); that is a "
        "different cache policy, not measured further here."
    )
    w("")
    for m in models:
        r = res["real"][m]
        vn = _get(res, m, "v|1|none", "polar", "out_err_v")
        vm = _get(res, m, "v|1|mean", "polar", "out_err_v")
        vn0 = _get(res, m, "v|1|none", "polar", "out_err_v_t0")
        vm0 = _get(res, m, "v|1|mean", "polar", "out_err_v_t0")
        if vn is not None and vn0 is not None:
            w(
                f"- {NAMES[m]}: token 0 takes {r['sink_mass']:.0%} of the attention mass (mean over the "
                "measured "
                f"layers and queries); polar V output error (rotated) raw {f4(vn)} vs centered {f4(vm)}; "
                "with token 0 "
                f"kept exact {f4(vn0)} vs {f4(vm0)}."
            )
    w("")

    pa, pb, pb3 = g["A-preset"], g["B-44-ch"], g["B-33-ch"]
    w("### Where the papers land")
    w("")
    w(
        f"- Paper A preset ({bits_s(pa['bits'])} bits): Gaussian rel. MSE {pa['rel_mse']:.4f} "
        f"({pa['x_bound']:.1f}× the "
        f"bound), worse than polar3 ({g['polar3']['rel_mse']:.4f}) with 0.625 bits/elem more. The "
        "preconditioner "
        "(none / randomized Hadamard / Haar rotation) and the online codebooks change the result by < 1 %: "
        "the analytic "
        "angle densities are exact for rotated data, and the loss is in the layout (4-bit uniform level-1 "
        "angles, "
        "2-bit upper levels, an fp16 radius per 16 values)."
        + (
            f" Qwen2.5 K logit error: {f4(_get(res, QW, 'k|1|mean', 'A-preset', 'logit_err'))} rotated + "
            "centered."
            if _get(res, QW, "k|1|mean", "A-preset", "logit_err") is not None
            else ""
        )
    )
    b_q = _get(res, QW, "k|1|mean", "B-44-ch", "logit_err")
    b_raw = _get(res, QW, "k|0|none", "B-44-ch", "logit_err")
    b_kl_raw = _get(res, QW, "k|0|none", "B-44-ch", "kl")
    p_kl_raw = _get(res, QW, "k|0|none", "polar", "kl")
    p_q = _get(res, QW, "k|1|mean", "polar", "logit_err")
    w(
        f"- Paper B Polar_44 (4.25 bits, per-channel groups of 128 tokens): Gaussian {pb['rel_mse']:.4f}, "
        f"{pb['rel_mse'] / g['polar']['rel_mse']:.1f}× polar's error at equal bits; Polar_33 (3.25 bits) "
        f"{pb3['rel_mse']:.4f}."
        + (
            " Its strength: per-channel min/max absorbs the K offset, so on raw, unrotated, uncentered "
            "Qwen2.5 K it stays "
            f"usable (logit error {f4(b_raw)}, KL {f4(b_kl_raw)}) where every per-token block format fails "
            "(polar KL "
            f"{f4(p_kl_raw)}); centering in the graph removes that advantage (rotated + centered: Polar_44 "
            f"{f4(b_q)} vs "
            f"polar {f4(p_q)})."
            if b_raw is not None
            else ""
        )
        + " Its per-channel groups also need 128 tokens buffered before a group can be written, which "
        "llama.cpp's per-row cache write does not have."
    )
    pair = []
    for m in models:
        right = _get(res, m, "k|0|none", "B-44-ch", "logit_err")
        other = _get(res, m, "k|0|none", "B-44-ch-other", "logit_err")
        if right is not None and other is not None:
            pair.append(f"{NAMES[m]} {f4(right)} with the RoPE pairs vs {f4(other)} with the other pairing")
    if pair:
        w(
            "- Paper B's premise that pairing by RoPE pairs is what makes the radius/angle split work is not "
            "borne out here: on raw, unrotated K (its intended input) the RoPE pairing gives a higher logit "
            "error than pairing the other way ("
            + "; ".join(pair)
            + "). What helps paper B is the per-channel min/max "
            "over tokens, not the pairing."
        )
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="format_study.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="measure everything, write the .md and .json")
    r.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-1.5b"])
    r.add_argument("--layers", type=int, default=8, help="layers per model, evenly spaced (default 8)")
    r.add_argument("--n-seq", type=int, default=2, help="token windows per model (first calibrates offsets)")
    r.add_argument("--seq-len", type=int, default=1024)
    r.add_argument("--nq", type=int, default=128, help="query positions per head")
    r.add_argument("--gauss-blocks", type=int, default=32768)
    r.add_argument("--seed", type=int, default=20250204)
    r.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    r.add_argument("--no-dump", action="store_true", help="skip models whose activations are not cached")
    r.add_argument("--quick", action="store_true", help="smoke run: few layouts/layers, writes under /tmp")
    r.add_argument("--out-md", default=None)
    r.add_argument("--out-json", default=None)
    rr = sub.add_parser("render", help="rewrite the .md from the .json")
    rr.add_argument("--out-md", default=str(DOC_MD))
    rr.add_argument("--out-json", default=str(DOC_JSON))
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s"
    )
    if args.cmd is None:
        ap.print_help()
        return 0
    if args.cmd == "run":
        if args.out_md is None:
            args.out_md = "/tmp/format-study-quick.md" if args.quick else str(DOC_MD)
        if args.out_json is None:
            args.out_json = "/tmp/format-study-quick.json" if args.quick else str(DOC_JSON)
        return cmd_run(args)
    return cmd_render(args)


if __name__ == "__main__":
    raise SystemExit(main())
