#!/usr/bin/env python3
"""Issue 12, levers 2 and 3: per-channel balancing and protecting the attention sink, measured.

    python3 scripts/quality_levers.py study [--model M ...] [--layers N] [--json out.json]
    python3 scripts/quality_levers.py kld --bin build/bin [--model M ...]
        [--set levers|voffset|sinkauto|exactsink|exactsink-built|polar3k|multiseq]
        [--layout single|streams|unified ...] [--json out.json]
    python3 scripts/quality_levers.py vshape [--model M ...] [--types T ...] [--c C ...] [--json out.json]
    python3 scripts/quality_levers.py vtransform [--model M ...] [--types T ...] [--variants V ...]
        [--other-text] [--json out.json]
    python3 scripts/quality_levers.py vtransform-files [--model M ...] [--variants V ...]   (kld --set vxform)
    python3 scripts/quality_levers.py scalebits [--blocks N] [--levels L ...] [--json out.json]
    python3 scripts/quality_levers.py changes KLD.json ... [--band REGEX]   (kld rows against their defaults)

`study` works in numpy on real post-RoPE Q/K/V (`study.activations`, window 0 calibrates, the
last window is scored, as in docs/format-study.md) and measures, per lever, the attention-logit
error, the softmax KL per query and the attention-output error of the polar/polar3 codes, with
llama.cpp's graph rotation (Hadamard) and online K centering (the mean of window 0):

- Sink-weighted K offset: mu = (1 - w) mean + w k_0 over the first ubatch (k_0: the first key, the
  attention sink, about 30 % of the attention mass), w = 0.125 / 0.25 / 0.375.
- K balancing: the cache stores H (D (k - mu)) and the query is multiplied by 1/D, so q.k is
  unchanged; D_j = 2^round(log2 (E q_j^2 / E (k_j - mu_j)^2)^(1/4)) per KV head and channel (the
  query statistics averaged over the heads that read the KV head, the key statistics weighting k_0
  like mu), the same for both channels of a RoPE pair (a K shift rotates the pair), log2 D centred
  per head. With white quantization error after the rotation, this minimises
  (sum_j E q_j^2 / D_j^2)(sum_j D_j^2 E k_j^2), the logit error.
- V balancing: the cache stores H (E v) and the attention output is divided by E;
  E_j = 2^round(log2 (E v_j^2)^(-1/4)) (minimises the output error (sum 1/E^2)(sum E^2 v^2)).
- Sink: token 0's K or V kept exact (f16 in a real cache: +11.75 bits for one token a head).

`vshape` measures V noise shaping along the tokens (`study.vshape`: each token coded with part of the
previous token's residual added), the same way, on every layer. `scalebits` measures what an 8-bit block
scale would cost the codes (`study.scalebits`: the reference encoder with its scales on a log grid).
`vtransform` measures V transform coding (`study.vtransform`: the cache stores H diag(lambda^-p) U^T v per KV
head, U, lambda the eigenvectors and eigenvalues of v's second moment over a first ubatch, and the output is
multiplied back; `diag`: the channels' own moments, V balancing without the power-of-two rounding).

`kld` runs the patched llama-perplexity --kl-divergence with the settings of
docs/centering-online.md (SQuAD, -fa on, -b = -c, -t 1) for each cache setting and environment;
`--set voffset` runs session 9's online V offset experiment (a build with
patches/experiments/session9-v-offset-online.diff). `--layout` runs the chunks as several sequences
of one cache, as llama-server's parallel slots do: `streams` (-b = 4 x -c: four sequences, a stream
each, as `llama-server -np 4`) or `unified` (the same with -kvu: one shared stream, as llama-server's
default); `single` (the default) is one sequence at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench_llama import BITS
from kvpolar.atomic import atomic_write_text
from kvpolar.paths import GEMMA3_GGUF, QWEN_GGUF, SMOLLM2_GGUF, SQUAD_TXT, data_file
from kvsetup.cpu import cpu_model
from llama_bench import build_info, command_line
from study import AttentionRef, activations, layouts, scalebits, vshape, vtransform
from study.run import hadamard_rows, k_rot_size, pick_layers

log = logging.getLogger("quality_levers")

# ----------------------------------------------------------------------------------------------
# numpy study


def pair_ids(d: int, pairing: str) -> np.ndarray:
    """Channel -> RoPE pair index in llama.cpp's cache rows: norm (2i, 2i+1), neox (i, i + d/2)."""
    j = np.arange(d)
    return j // 2 if pairing == "norm" else j % (d // 2)


def tie_pairs(x: np.ndarray, pairing: str) -> np.ndarray:
    """(..., d) -> the mean over each RoPE pair, written to both channels."""
    pid = pair_ids(x.shape[-1], pairing)
    n = pid.max() + 1
    s = np.zeros((*x.shape[:-1], n))
    for j, p in enumerate(pid):
        s[..., p] += x[..., j]
    return (s / 2)[..., pid]


def pow2_factors(ratio: np.ndarray, expo: float, power2: bool = True) -> np.ndarray:
    """ratio (..., d) -> ratio^expo with log2 centred over the last axis, rounded to 2^n, n in [-8, 8]
    (what the graph computes: exact in float arithmetic)."""
    lg = expo * np.log2(np.maximum(ratio, 1e-30))
    lg = lg - lg.mean(-1, keepdims=True)
    if power2:
        lg = np.clip(np.round(lg), -8, 8)
    return 2.0**lg


def k_factors(
    q0: np.ndarray, k0: np.ndarray, mu: np.ndarray, pairing: str, w_sink: float = 0.0, **kw
) -> np.ndarray:
    """q0 (Hq, T, d), k0 (Hkv, T, d), mu (Hkv, 1, d) -> D (Hkv, 1, d). The key statistics weight the
    first key by w_sink, like the offset (patch 0012's graph)."""
    hkv = k0.shape[0]
    eq = (q0.astype(np.float64) ** 2).mean(1).reshape(hkv, -1, q0.shape[-1]).mean(1)
    dk2 = (k0.astype(np.float64) - mu) ** 2
    ek = (1 - w_sink) * dk2.mean(1) + w_sink * dk2[:, 0]
    return pow2_factors(tie_pairs(eq, pairing) / tie_pairs(ek, pairing), 0.25, **kw)[:, None, :]


def v_factors(v0: np.ndarray, **kw) -> np.ndarray:
    """v0 (Hkv, T, d) -> E (Hkv, 1, d)."""
    ev = (v0.astype(np.float64) ** 2).mean(1)
    return pow2_factors(1.0 / ev, 0.25, **kw)[:, None, :]


SINK_WEIGHTS = (0.125, 0.25, 0.375)
ONLINE_TOKENS = 512  # the first ubatch (-ub 512) measures the online offsets


SINK_NS = (2, 4, 8, 16)  # --sinks: the first N keys / values kept exact
TOP_NS = (4, 16, 64)  # --sinks: the N keys / values with the most attention mass kept exact (an oracle)


def _top_mass(ref: AttentionRef, n: int) -> list[np.ndarray]:
    """Per KV head, the n token positions with the most attention mass over the scored queries."""
    return [np.argsort(-p.sum(0), kind="stable")[:n] for p in ref.p]


def _top_score(score: np.ndarray, n: int) -> list[np.ndarray]:
    """Per KV head (rows of score (Hkv, T)), the n positions of the largest score, and token 0 (the sink)."""
    return [np.union1d(np.argsort(-row, kind="stable")[:n], [0]) for row in score]


def _exact_at(xh: np.ndarray, x: np.ndarray, idx: list[np.ndarray]) -> np.ndarray:
    out = xh.copy()
    for g, ii in enumerate(idx):
        out[g, ii] = x[g, ii]
    return out


def layer_levers(
    model: str, layer: int, n_seq: int, seq_len: int, nq: int, types: list[str], sinks: bool = False
) -> dict:
    """Sums (AttentionRef.k_sums / v_sums) per "tensor|type|lever" for one layer.

    K offsets: "mean0" the mean of window 0 (docs/format-study.md), "online" the mean of the first
    ONLINE_TOKENS keys of the scored window (what patch 0007 measures), "sinkW" the online offset
    weighted toward the first key, (1 - W) mean + W k_0 (patch 0012). "+D": K balancing with
    factors from the same tokens; "+sink": token 0's K or V exact. sinks: also the first N keys
    (with "online+D", the default of the built patches) or values exact, N in SINK_NS; the N with the
    most attention mass (TOP_NS; an oracle: it needs the later queries); the N keys with the largest
    stored norm |D (k - mu)|, or values with the largest |v|, plus token 0 (what a cache write could
    choose); and "mass": the share of the attention on each of tokens 0-7.
    """
    meta = activations.meta(model, n_seq, seq_len)
    data = activations.load_layer(model, layer, n_seq, seq_len)
    lays = layouts(meta["pairing"])
    ev = n_seq - 1
    q, k, v = data["q"][ev], data["k"][ev], data["v"][ev]
    x = k.astype(np.float64)
    xv = v.astype(np.float64)
    head = slice(0, ONLINE_TOKENS)
    online = x[:, head].mean(1, keepdims=True)
    centers = {"mean0": data["k"][0].mean(1, keepdims=True).astype(np.float64), "online": online}
    for w in SINK_WEIGHTS:
        centers[f"sink{w:g}"] = (1 - w) * online + w * x[:, :1]
    k_cfg = [(name, mu, None) for name, mu in centers.items()]
    for name, w in (("online", 0.0), (f"sink{SINK_WEIGHTS[1]:g}", SINK_WEIGHTS[1])):
        mu = centers[name]
        k_cfg.append((f"{name}+D", mu, k_factors(q[:, head], k[:, head], mu, meta["pairing"], w)))
    v_cfg = [("none", None), ("E", v_factors(v[:, head]))]
    rk, rv = k_rot_size(k.shape[-1]), 64
    ref = AttentionRef(q, k, v, np.arange(seq_len // nq - 1, seq_len, seq_len // nq))
    out: dict = {"p0": ref.p0 / ref.nq}
    if sinks:
        out["mass"] = [float(sum(p[:, j].sum() for p in ref.p)) / ref.nq for j in range(8)]
    if sinks:  # the cells kept exact, per N (the same for every type)
        first = {n: [np.arange(n)] * k.shape[0] for n in SINK_NS}
        top = {n: _top_mass(ref, n) for n in TOP_NS}
        mu_d, f_d = next((mu, f) for name, mu, f in k_cfg if name == "online+D")
        k_norm = {n: _top_score(((f_d * (x - mu_d)) ** 2).sum(-1), n) for n in TOP_NS}
        v_norm = {n: _top_score((xv**2).sum(-1), n) for n in TOP_NS}
    for t in types:
        fn = lays[t].fn
        for name, mu, f in k_cfg:
            f = 1.0 if f is None else f
            s = hadamard_rows(f * (x - mu), rk).astype(np.float32)
            xh = hadamard_rows(fn(s).astype(np.float64), rk) / f + mu
            out[f"k|{t}|{name}"] = ref.k_sums(xh)
            if name in ("online", f"sink{SINK_WEIGHTS[1]:g}", "online+D"):
                if sinks and name == "online+D":
                    for n in SINK_NS:
                        out[f"k|{t}|{name}+first {n} exact"] = ref.k_sums(_exact_at(xh, x, first[n]))
                    for n in TOP_NS:
                        out[f"k|{t}|{name}+top {n} mass exact"] = ref.k_sums(_exact_at(xh, x, top[n]))
                        out[f"k|{t}|{name}+top {n} stored norm exact"] = ref.k_sums(
                            _exact_at(xh, x, k_norm[n])
                        )
                xh[:, 0] = x[:, 0]
                out[f"k|{t}|{name}+sink exact"] = ref.k_sums(xh)
        for name, f in v_cfg:
            f = 1.0 if f is None else f
            s = hadamard_rows(f * xv, rv).astype(np.float32)
            vh = hadamard_rows(fn(s).astype(np.float64), rv) / f
            out[f"v|{t}|{name}"] = ref.v_sums(vh)
            if sinks and name == "none":
                for n in SINK_NS:
                    out[f"v|{t}|{name}+first {n} exact"] = ref.v_sums(_exact_at(vh, xv, first[n]))
                for n in TOP_NS:
                    out[f"v|{t}|{name}+top {n} mass exact"] = ref.v_sums(_exact_at(vh, xv, top[n]))
                    out[f"v|{t}|{name}+top {n} norm exact"] = ref.v_sums(_exact_at(vh, xv, v_norm[n]))
            vh[:, 0] = xv[:, 0]
            out[f"v|{t}|{name}+sink exact"] = ref.v_sums(vh)
    return out


def finish(sums: list[dict]) -> dict:
    """Per-layer sums -> pooled metrics per key (logit_err, kl, out_err_k / out_err_v)."""
    res: dict = {}
    for key in sums[0]:
        if not key.startswith(("k|", "v|")):
            continue
        tot: dict = {}
        for s in sums:
            for a, b in s[key].items():
                tot[a] = tot.get(a, 0.0) + b
        if key.startswith("k|"):
            res[key] = {
                "logit_err": tot["logit_se"] / tot["logit_var"],
                "kl": tot["kl"] / tot["nq"],
                "out_err": tot["outk_se"] / tot["out_sq"],
            }
        else:
            res[key] = {"out_err": tot["outv_se"] / tot["out_sq"]}
    return res


def run_study(args) -> dict:
    res = {"machine": cpu_model(), "models": {}}
    for model in args.model:
        meta = activations.require(model, args.n_seq, args.seq_len)
        layers = pick_layers(meta["n_layer"], args.layers)
        per = activations.per_layer(
            model,
            layers,
            lambda il, m=model: layer_levers(
                m, il, args.n_seq, args.seq_len, args.nq, args.types, args.sinks
            ),
            log,
        )
        res["models"][model] = {
            "layers": layers,
            "pooled": finish(list(per.values())),
            "per_layer": {il: finish([s]) for il, s in per.items()},
            "p0": float(np.mean([s["p0"] for s in per.values()])),
        }
        if args.sinks:
            res["models"][model]["mass"] = np.mean([s["mass"] for s in per.values()], axis=0).tolist()
    return res


def render_study(res: dict) -> str:
    lines = []
    for model, r in res["models"].items():
        lines += [
            f"### {model} (layers {r['layers']}; token 0 takes {100 * r['p0']:.0f} % of the attention)",
            "",
            *(
                [
                    "tokens 0-7, share of the attention: " + ", ".join(f"{100 * m:.1f} %" for m in r["mass"]),
                    "",
                ]
                if "mass" in r
                else []
            ),
            "| tensor | type | lever | logit err | softmax KL | attn-out err | vs online / none |",
            "|---|---|---|---|---|---|---|",
        ]
        pooled = r["pooled"]
        for key, m in pooled.items():
            tensor, t, lever = key.split("|")
            base = pooled[f"{tensor}|{t}|{'online' if tensor == 'k' else 'none'}"]
            ref = base["kl"] if tensor == "k" else base["out_err"]
            val = m["kl"] if tensor == "k" else m["out_err"]
            lines.append(
                f"| {tensor.upper()} | {t} | {lever} | {m.get('logit_err', float('nan')):.3e} | "
                f"{m.get('kl', float('nan')):.3e} | {m['out_err']:.3e} | {val / ref:.3f} |"
            )
        lines.append("")
    return "\n".join(lines).replace("nan", "-")


# ----------------------------------------------------------------------------------------------
# llama-perplexity --kl-divergence

MODELS = {
    "smollm2-135m": {"gguf": SMOLLM2_GGUF, "ctx": 2048, "chunks": 4},
    "qwen2.5-coder-1.5b": {"gguf": QWEN_GGUF, "ctx": 1024, "chunks": 2},
    # a third family: sliding-window layers (512 keys) in llama.cpp's iSWA cache, head size 256
    "gemma3-270m": {"gguf": GEMMA3_GGUF, "ctx": 2048, "chunks": 4},
}

# (K type, V type, environment). PREV: patch 0007 alone (the online mean, no balancing); SINK: the
# offset weighted toward the first key; SINK_BAL: and K balancing (patch 0012's default since session 6)
NONE = {"LLAMA_KV_CENTER": "0"}  # no centering at all (what a sliding-window model got before patch 0013)
PREV = {"LLAMA_KV_CENTER_SINK": "0", "LLAMA_KV_BALANCE": "0"}
SINK = {"LLAMA_KV_BALANCE": "0"}
SINK_BAL = {"LLAMA_KV_BALANCE": "1"}
NO_ROT = {"LLAMA_ATTN_ROT_DISABLE": "1"}  # upstream's Hadamard rotation of Q/K/V off (defaults otherwise)
SETTINGS = [
    *(("polar", "f16", env) for env in (NONE, PREV, SINK, SINK_BAL, NO_ROT)),
    *(("polar3", "f16", env) for env in (NONE, PREV, SINK, SINK_BAL)),
    *(("polar", "polar3", env) for env in (NONE, PREV, SINK, SINK_BAL)),
    ("q4_0", "f16", {}),
    ("q4_0", "q4_0", {}),
    ("q4_0", "f16", {"LLAMA_KV_CENTER": "1"}),
    ("q4_0", "q4_0", {"LLAMA_KV_CENTER": "1"}),
]


# --set voffset (session 9, an experiment build with LLAMA_KV_CENTER_V_ONLINE): an online V offset,
# (1 - w) mean + w v_0 of the first ubatch, subtracted before the V write and added to the attention
# output (exact: a query's weights sum to 1); w = 1 stores the sink token's value exactly
V_ONLINE = [
    *(
        (k, v, env)
        for k, v in (("polar", "polar3"), ("polar", "polar"), ("polar3", "polar3"))
        for env in ({}, *({"LLAMA_KV_CENTER_V_ONLINE": w} for w in ("1", "0.5")))
    ),
    ("q4_0", "q4_0", {}),
]
# session 11, each on a build with an experiment diff applied (patches/experiments/): the sink weight as
# the measured attention mass (session11-sink-weight-auto.diff), and key 0 exact (the measurement hack
# session11-exact-sink-measure.diff); the rows without the variable are the defaults of that build
SINK_AUTO = [
    (k, v, env)
    for k, v in (("polar", "f16"), ("polar", "polar3"))
    for env in ({}, {"LLAMA_KV_CENTER_SINK": "auto"})
]
EXACT_SINK = [
    ("polar", "f16", {}),
    *(
        (k, v, {"LLAMA_KV_EXACT_SINK": "1"})
        for k, v in (("polar", "f16"), ("polar", "polar3"), ("polar3", "f16"))
    ),
]
# session 12: the exact sink key built (patch 0024, on by default for polar/polar3 K, and with it the
# sink's weight in the K offset defaults to 0): each setting with its defaults, without the exact key
# (LLAMA_KV_EXACT_SINK=0, which also brings back the weight 0.25: the defaults before patch 0024), and
# with the exact key but the old weight (LLAMA_KV_CENTER_SINK=0.25)
EXACT_SINK_BUILT = [
    (k, v, env)
    for k, v in (("polar", "f16"), ("polar3", "f16"), ("polar", "polar3"))
    for env in ({}, {"LLAMA_KV_EXACT_SINK": "0"}, {"LLAMA_KV_CENTER_SINK": "0.25"})
]
# session 13: polar3 K's own levers under the exact sink key (issue 12's "polar3 K within 2x q4_0 K"):
# K balancing off, a small sink weight, both; and the low-memory pair polar/polar3 with balancing off
POLAR3K = [
    ("polar3", "f16", {}),
    ("polar3", "f16", {"LLAMA_KV_BALANCE": "0"}),
    ("polar3", "f16", {"LLAMA_KV_CENTER_SINK": "0.125"}),
    ("polar3", "f16", {"LLAMA_KV_BALANCE": "0", "LLAMA_KV_CENTER_SINK": "0.125"}),
    ("polar", "polar3", {"LLAMA_KV_BALANCE": "0"}),
]
# session 15: the keys of largest stored norm kept exact, on a build with the measurement hack
# patches/experiments/session15-exact-top-measure.diff (LLAMA_KV_EXACT_TOP=M: M keys a head, CPU only);
# the rows without the variable are that build's defaults, next to q4_0's
EXACT_TOP = [
    *(
        (k, v, env)
        for k, v in (("polar3", "f16"), ("polar", "f16"), ("polar", "polar3"))
        for env in ({}, {"LLAMA_KV_EXACT_TOP": "16"})
    ),
    ("q4_0", "f16", {}),
    ("q4_0", "q4_0", {}),
    ("polar3", "f16", {"LLAMA_KV_EXACT_TOP": "64"}),
    ("polar3", "f16", {"LLAMA_KV_EXACT_TOP": "256"}),
]
# session 16: the sink's value kept exact too, on a build with the measurement hack
# patches/experiments/session16-exact-v0-measure.diff (session 15's hack plus LLAMA_KV_EXACT_V0=1: cell 0's V
# row in f32, CPU only); the row without the variable is that build's default
EXACT_V0 = [
    ("polar", "polar3", {}),
    ("polar", "polar3", {"LLAMA_KV_EXACT_V0": "1"}),
    ("polar", "polar", {"LLAMA_KV_EXACT_V0": "1"}),
]
# session 20: polar and polar3 K with the defaults (V f16), for --fa off against on (patch 0033)
KTYPES = [("polar", "f16", {}), ("polar3", "f16", {})]
# session 22: caches that serve several sequences (--layout streams / unified), where the K offsets are
# not measured online by default; LLAMA_KV_CENTER_ONLINE=1 measures one offset for all of them from
# the first ubatch (which then mixes the sequences' first tokens), next to q4_0 K+V
MULTISEQ = [
    *(
        (k, v, env)
        for k, v in (("polar", "f16"), ("polar", "polar"))
        for env in ({}, {"LLAMA_KV_CENTER_ONLINE": "1"})
    ),
    ("polar", "polar3", {}),
    ("q4_0", "q4_0", {}),
]
# the same settings with the defaults only (for a build that changes them, patch 0035)
MULTISEQ_DEFAULTS = [(k, v, env) for k, v, env in MULTISEQ if not env]
# patch 0035's offsets from the built-in text: the sink's weight in them (the default: 0 where every
# sequence keeps its sink key exact, in a stream of its own; 0.25 in a unified cache)
MULTISEQ_SINK = [("polar", "f16", {"LLAMA_KV_CENTER_SINK": w}) for w in ("0", "0.25", "0.5")]
# session 23: the sink's weight in the K offsets of a sliding-window cache alone (Gemma 3's iSWA: its
# sliding-window layers drop the sink token from their window; on a build with the measurement hack
# patches/experiments/session23-swa-sink-weight-measure.diff on the tree of patches 0001-0036,
# LLAMA_KV_CENTER_SINK_SWA=w); the rows without the variable are that tree's defaults (weight 0 in both caches
# with the exact sink key; patch 0037 makes 0.5 the sliding-window cache's default, so on a later build the
# variable is ignored and every row is that default)
SWA_SINK = [
    (k, v, env)
    for k, v in (("polar", "f16"), ("polar3", "f16"), ("polar", "polar3"))
    for env in ({}, *({"LLAMA_KV_CENTER_SINK_SWA": w} for w in ("0.25", "0.5", "0.75", "1")))
]
# session 30: V transform coding (study.vtransform), a build with
# patches/experiments/session30-v-transform.diff; the matrices from `quality_levers.py vtransform-files`
# ({work}: --work, {model}: the row's model)
VXFORM_DIR = "{work}/vxform/{model}/{variant}"
V_XFORM = [
    (k, v, env)
    for k, v, variants in (
        ("polar", "polar3", ("klt-1_8", "klt-1_4", "diag-1_4", "klt-0", "rand-0")),
        ("polar", "polar", ("klt-1_4", "diag-1_4")),
    )
    for env in ({}, *({"LLAMA_KV_VXFORM": VXFORM_DIR.replace("{variant}", var)} for var in variants))
]
# the realization band of one text's KLD: the low-memory pair under orthogonal re-rotations of V alone
# (rand-0 with other random bases; `vtransform-files --variants rand-0 --seeds 1 2 3 4 5 6`)
V_XFORM_BAND = [
    ("polar", "polar3", env)
    for env in (
        {},
        *({"LLAMA_KV_VXFORM": VXFORM_DIR.replace("{variant}", f"rand-0-s{s}")} for s in range(1, 7)),
    )
]
# llama-perplexity decodes -b / -c chunks together, each as its own sequence
# (sequences, extra arguments, how the table names it)
LAYOUTS = {
    "single": (1, [], ""),
    "streams": (4, [], "a cache for 4 sequences, a stream each"),
    "unified": (4, ["-kvu"], "a cache for 4 sequences, one unified stream"),
}
SETS = {
    "levers": SETTINGS,
    "ktypes": KTYPES,
    "polar3k": POLAR3K,
    "voffset": V_ONLINE,
    "sinkauto": SINK_AUTO,
    "exactsink": EXACT_SINK,
    "exactsink-built": EXACT_SINK_BUILT,
    "exacttop": EXACT_TOP,
    "exactv0": EXACT_V0,
    "multiseq": MULTISEQ,
    "multiseq-defaults": MULTISEQ_DEFAULTS,
    "multiseq-sink": MULTISEQ_SINK,
    "swasink": SWA_SINK,
    "vxform": V_XFORM,
    "vxform-band": V_XFORM_BAND,
}


def perplexity(
    bin_dir: Path,
    model: str,
    args_extra: list[str],
    env: dict,
    chunks: int,
    fa: str = "on",
    text: Path | None = None,
    layout: str = "single",
) -> str:
    """llama-perplexity with this module's settings; text: SQuAD unless given; layout: see LAYOUTS."""
    m = MODELS[model]
    seqs, layout_args, _ = LAYOUTS[layout]
    cmd = [
        str(bin_dir / "llama-perplexity"),
        "-m",
        str(data_file(m["gguf"])),
        "-f",
        str(text or data_file(SQUAD_TXT)),
        "-c",
        str(m["ctx"]),
        "--chunks",
        str(chunks),
        "-b",
        str(m["ctx"] * seqs),
        "-t",
        "1",
        "-fa",
        fa,
        *layout_args,
        *args_extra,
    ]
    log.info("%s %s", " ".join(f"{a}={b}" for a, b in env.items()), " ".join(cmd))
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_KV_", "LLAMA_ATTN_"))}
    p = subprocess.run(cmd, env={**clean, **env}, capture_output=True, text=True, check=False)
    if p.returncode:
        raise RuntimeError(f"llama-perplexity failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p.stdout + p.stderr


def parse_kld(text: str) -> dict:
    def grab(pat: str) -> tuple[float, float]:
        m = re.search(pat + r"\s*:\s*([-\d.e]+)\s*±\s*([-\d.e]+)", text)
        if not m:
            raise ValueError(f"no {pat!r} in llama-perplexity's output")
        return float(m.group(1)), float(m.group(2))

    kld = grab(r"Mean\s+KLD")
    top = grab(r"Same top p")
    ratio = grab(r"Mean\s+PPL\(Q\)/PPL\(base\)")
    return {"kld": kld[0], "kld_pm": kld[1], "same_top": top[0], "ppl_ratio": ratio[0]}


def tail_text(work: Path) -> Path:
    """The second half of the SQuAD text (from a line start), a text apart from the first chunks that
    every KLD row reads (layer_policy.py's scan chooses on it; `kld --text tail` checks a choice there)."""
    src = data_file(SQUAD_TXT).read_text()
    cut = src.index("\n", len(src) // 2) + 1
    work.mkdir(parents=True, exist_ok=True)
    out = work / "squad-tail.txt"
    if not out.is_file() or out.read_text() != src[cut:]:
        atomic_write_text(out, src[cut:])
    return out


def kld_base(
    bin_dir: Path, model: str, chunks: int, work: Path, text: Path | None = None, tag: str = ""
) -> Path:
    """The f16 logits (no centering, -fa on) that the KLD rows of `model` compare with, made once in
    `work`: <model>[-<tag>]-<chunks>.kld (tag names a text other than SQuAD's head)."""
    work.mkdir(parents=True, exist_ok=True)
    base = work / f"{model}{'-' + tag if tag else ''}-{chunks}.kld"
    if not base.is_file():
        # written under another name and renamed when complete: an interrupted run leaves no base that a
        # later run would take for whole
        part = base.with_name(base.name + ".part")
        args = ["--kl-divergence-base", str(part), "-ctk", "f16", "-ctv", "f16"]
        perplexity(bin_dir, model, args, {"LLAMA_KV_CENTER": "0"}, chunks, text=text)
        part.replace(base)
    return base


def kld_row(
    bin_dir: Path,
    model: str,
    base: Path,
    ctk: str,
    ctv: str,
    env: dict,
    chunks: int,
    fa: str = "on",
    text: Path | None = None,
    layout: str = "single",
) -> dict:
    """parse_kld of one K/V setting against `base` (kld_base of the same model, chunks and text)."""
    extra = ["--kl-divergence-base", str(base), "--kl-divergence", "-ctk", ctk, "-ctv", ctv]
    return parse_kld(perplexity(bin_dir, model, extra, env, chunks, fa, text, layout))


def run_kld(args) -> dict:
    out = {"machine": cpu_model(), "nproc": os.cpu_count(), "rows": []}
    # None for a measurement build made by hand (no kvpolar-build.json)
    out["build"] = build_info(args.bin, required=False)
    text = tail_text(Path(args.work)) if args.text == "tail" else None
    if text:
        out["text"] = "squad second half"
    for model in args.model:
        chunks = args.chunks or MODELS[model]["chunks"]
        base = kld_base(Path(args.bin), model, chunks, Path(args.work), text, "tail" if text else "")
        for (ctk, ctv, env), layout in ((s, lay) for s in SETS[args.set] for lay in args.layout):
            if args.only and f"{ctk}/{ctv}" not in args.only:
                continue
            if args.env and any(e.split("=", 1) not in ([k, v] for k, v in env.items()) for e in args.env):
                continue
            env = {k: v.format(work=args.work, model=model) for k, v in env.items()}
            row = {"model": model, "chunks": chunks, "ctk": ctk, "ctv": ctv, "env": env, "fa": args.fa}
            if layout != "single":
                row["layout"] = layout
            row.update(kld_row(Path(args.bin), model, base, ctk, ctv, env, chunks, args.fa, text, layout))
            log.info("%s", row)
            out["rows"].append(row)
    return out


def kld_changes(results: list[dict], band: str | None = None) -> str:
    """The rows of `kld` results with an environment, each against its setting's default row (the same model,
    K/V types, layout and -fa, no environment, first found in `results`), as a relative change; with `band`
    (a regex), the rows whose environment values match it pooled per setting: n, mean, sd, lowest, highest."""
    rows = [r for res in results for r in res["rows"]]

    def key(r):
        return r["model"], r["ctk"], r["ctv"], r.get("layout"), r.get("fa", "on")

    base = {}
    for r in rows:
        if not r["env"]:
            base.setdefault(key(r), r["kld"])
    lines = ["| model | K / V | environment | mean KLD | change |", "|---|---|---|---|---|"]
    pooled: dict = {}
    for r in rows:
        if not r["env"]:
            continue
        if key(r) not in base:
            raise SystemExit(f"changes: no default row (no environment) for {key(r)} in the results given")
        ch = r["kld"] / base[key(r)] - 1
        env = " ".join(f"`{a}={b}`" for a, b in r["env"].items())
        lines.append(
            f"| {r['model']} | {r['ctk']} / {r['ctv']} | {env} | {r['kld']:.6f} | {100 * ch:+.1f} % |"
        )
        if band and any(re.search(band, v) for v in r["env"].values()):
            pooled.setdefault(key(r), []).append(ch)
    if band:
        lines += ["", f"Rows matching `{band}`:", "", "| model | K / V | n | mean | sd | lowest | highest |"]
        lines.append("|---|---|---|---|---|---|---|")
        for k, ch in pooled.items():
            a = np.array(ch) * 100
            sd = f"{a.std(ddof=1):.1f} %" if len(a) > 1 else "-"
            stats = f"{a.mean():+.1f} % | {sd} | {a.min():+.1f} % | {a.max():+.1f} %"
            lines.append(f"| {k[0]} | {k[1]} / {k[2]} | {len(a)} | {stats} |")
    return "\n".join(lines)


def render_kld(res: dict) -> str:
    lines = [
        "| model | K | V | K+V bits/elem | environment | mean KLD | same top token | PPL ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        env = " ".join(f"`{a}={b}`" for a, b in r["env"].items()) or "(default)"
        if r.get("fa", "on") != "on":  # the base logits are always from -fa on
            env += f" `-fa {r['fa']}`"
        if "layout" in r:
            env += f" ({LAYOUTS[r['layout']][2]})"
        lines.append(
            f"| {r['model']} | {r['ctk']} | {r['ctv']} | {(BITS[r['ctk']] + BITS[r['ctv']]) / 2:g} | {env} | "
            f"{r['kld']:.4f} ± {r['kld_pm']:.4f} | "
            f"{r['same_top']:.1f} % | {r['ppl_ratio']:.3f} |"
        )
    return "\n".join(lines)


NUMPY_MODELS = ["smollm2-135m", "qwen2.5-coder-1.5b"]  # the models with study.activations dumps


def activations_args(p, models=NUMPY_MODELS, nq: bool = True) -> None:
    """The arguments of a subcommand reading study.activations: the models, the dump's size, the queries."""
    p.add_argument("--model", nargs="+", default=list(models), choices=list(MODELS))
    p.add_argument("--n-seq", type=int, default=2, help="the dump's sequences (study.activations)")
    p.add_argument("--seq-len", type=int, default=1024, help="their length")
    if nq:
        p.add_argument("--nq", type=int, default=128, help="query positions per head")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd")
    p = sub.add_parser("study", help="numpy estimate per lever on real activations")
    activations_args(p, models=MODELS)
    p.add_argument("--layers", type=int, default=8, help="layers measured (evenly spaced)")
    p.add_argument("--types", nargs="+", default=["polar", "polar3"])
    p.add_argument(
        "--sinks", action="store_true", help="also the first / most-attended N keys and values exact"
    )
    p.add_argument("--json", help="write the results here")
    p = sub.add_parser("kld", help="llama-perplexity --kl-divergence per cache setting")
    p.add_argument("--bin", required=True, help="folder with the patched llama-perplexity")
    p.add_argument("--model", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--chunks", type=int, help="chunks (default: 4 for SmolLM2, 2 for Qwen)")
    p.add_argument("--work", default="/tmp/quality_levers", help="base logits go here")
    p.add_argument("--only", nargs="+", help="only these K/V settings, e.g. polar/f16")
    p.add_argument("--env", nargs="+", help="only the rows with these settings, e.g. LLAMA_KV_CENTER=1")
    p.add_argument("--set", choices=list(SETS), default="levers", help="the settings (default: levers)")
    p.add_argument(
        "--text",
        choices=("head", "tail"),
        default="head",
        help="SQuAD's first chunks (head, as every KLD in the docs) or its second half (tail: check a choice "
        "made on the head on other text)",
    )
    p.add_argument(
        "--fa", choices=("on", "off"), default="on", help="flash attention of the measured runs (base: on)"
    )
    p.add_argument(
        "--layout",
        nargs="+",
        choices=list(LAYOUTS),
        default=["single"],
        help="chunks one at a time (single) or 4 together, a stream each or one unified stream",
    )
    p.add_argument("--json", help="write the results here")
    p = sub.add_parser("vshape", help="V noise shaping along the tokens, numpy (study.vshape)")
    activations_args(p)
    p.add_argument("--types", nargs="+", default=["polar3", "polar"])
    p.add_argument(
        "--c", nargs="+", type=float, default=[0.25, 0.5, 0.75], help="shaping strengths (0 is added)"
    )
    p.add_argument("--json", help="write the results here")
    p = sub.add_parser(
        "vtransform", help="V transform coding (a shaping A per KV head), numpy (study.vtransform)"
    )
    activations_args(p)
    p.add_argument("--types", nargs="+", default=["polar3", "polar"])
    p.add_argument(
        "--variants", nargs="+", default=list(vtransform.VARIANTS), choices=list(vtransform.VARIANTS)
    )
    p.add_argument(
        "--calib", type=int, default=512, help="the transform from tokens 1..CALIB-1 (a first ubatch)"
    )
    p.add_argument(
        "--other-text", action="store_true", help="the transform from the first sequence, not the scored one"
    )
    p.add_argument("--json", help="write the results here")
    p = sub.add_parser(
        "vtransform-files", help="the V transform measurement build's matrices (kld --set vxform)"
    )
    activations_args(p, nq=False)
    p.add_argument(
        "--variants",
        nargs="+",
        default=["klt-1/8", "klt-1/4", "diag-1/4", "klt-0", "rand-0"],
        choices=list(vtransform.VARIANTS),
    )
    p.add_argument("--calib", type=int, default=512, help="from tokens 1..CALIB-1 of the first sequence")
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0],
        help="rand-0's random bases: seed S > 0 writes the folder rand-0-sS (kld --set vxform-band)",
    )
    p.add_argument("--work", default="/tmp/quality_levers", help="kld's --work: files go to WORK/vxform/")
    p = sub.add_parser("scalebits", help="a block scale on a coarser grid than fp16, numpy (study.scalebits)")
    p.add_argument("--blocks", type=int, default=16384)
    p.add_argument("--spread", type=float, default=8.0, help="octaves the block RMS is spread over")
    p.add_argument(
        "--levels", nargs="+", type=int, default=list(scalebits.LEVELS), help="grid steps an octave"
    )
    p.add_argument(
        "--real",
        nargs="*",
        default=[],
        choices=list(MODELS),
        help="also these models' K and V (study.activations)",
    )
    p.add_argument("--json", help="write the results here")
    p = sub.add_parser("render", help="print the markdown tables of a --json file")
    p.add_argument("json")
    p = sub.add_parser("changes", help="kld rows against their default rows, pooled where --band matches")
    p.add_argument("json", nargs="+", help="kld --json files (the default rows may come from any of them)")
    p.add_argument("--band", help="a regex on the environment's values: those rows pooled (mean, sd, range)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if args.cmd is None:
        ap.print_help()
        return 0
    if args.cmd == "render":
        res = json.loads(Path(args.json).read_text())
        print(render_any(res))
        return 0
    if args.cmd == "changes":
        print(kld_changes([json.loads(Path(f).read_text()) for f in args.json], args.band))
        return 0
    if args.cmd in ("vtransform", "vtransform-files") and not 2 < args.calib <= args.seq_len:
        ap.error(f"{args.cmd} --calib: must be in 3..{args.seq_len} (--seq-len), got {args.calib}")
    if args.cmd == "vtransform-files":
        for model in args.model:
            for var in args.variants:
                for seed in args.seeds if var.startswith("rand") else [0]:
                    name = var.replace("/", "_") + (f"-s{seed}" if seed else "")
                    d = VXFORM_DIR.format(work=args.work, model=model, variant=name)
                    n = vtransform.write_matrices(
                        model, d, var, args.n_seq, args.seq_len, args.calib, seed=seed
                    )
                    print(f"{model} {name}: {n} layers in {d}")
        return 0
    if args.cmd == "vshape":
        bad = [c for c in args.c if not 0.0 < c <= 1.0]
        if bad:
            ap.error(
                f"vshape --c: each strength must be in (0, 1] (the plain codes are measured too), got {bad}"
            )
        res = vshape.measure(args.model, args.types, args.c, args.n_seq, args.seq_len, args.nq, log=log)
        res["machine"] = cpu_model()
    elif args.cmd == "vtransform":
        su = vtransform.Setup(
            args.types, args.variants, args.n_seq, args.seq_len, args.nq, args.calib, other=args.other_text
        )
        res = vtransform.measure(args.model, su, log=log)
        res["machine"] = cpu_model()
    elif args.cmd == "scalebits":
        bad = [lv for lv in args.levels if lv < 1]
        if bad or args.blocks < 1:
            ap.error(
                f"scalebits: --levels must be >= 1 and --blocks >= 1, got {args.levels} and {args.blocks}"
            )
        res = scalebits.measure(args.blocks, args.spread, args.levels)
        if args.real:
            res["real"] = scalebits.measure_real(args.real, levels=args.levels)
        res["machine"] = cpu_model()
    else:
        res = run_study(args) if args.cmd == "study" else run_kld(args)
    res["command"] = command_line("quality_levers.py", argv)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(res, indent=1) + "\n", mkdir=True)
    print(render_any(res))
    return 0


def render_any(res: dict) -> str:
    """The tables of a result of `study`, `kld`, `vshape` or `scalebits`."""
    if "cs" in res:
        return vshape.render(res)
    if "variants" in res:
        return vtransform.render(res)
    if "spread_octaves" in res:
        return scalebits.render(res)
    return render_study(res) if "models" in res else render_kld(res)


if __name__ == "__main__":
    sys.exit(main())
