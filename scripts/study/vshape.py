"""V noise shaping along the tokens: a lever for the low-memory pair's V, measured in numpy (issue 12).

A cache write could code token t's value with what the previous token's code missed added to it:

    x_t = v_t + c r_{t-1},   v^_t = decode(encode(x_t)),   r_t = x_t - v^_t      (r_0 = 0, r_{-1} = 0)

Decoding is unchanged (the cache holds ordinary codes; nothing more is stored). The stored error
e_t = v^_t - v_t = c r_{t-1} - r_t is shaped: attention's output error sum_t p_t e_t becomes
sum_t (c p_{t+1} - p_t) r_t. For white r of equal size that is (1 + c^2 - 2 c rho) times the plain
error, rho the lag-1 correlation of the attention weights (sum p_t p_{t+1} / sum p_t^2): smaller
where neighbouring tokens get alike weights, larger where they do not. `skip_first` does not pass the
first token's error on (token 0 is the attention sink, with its own weight).

`measure` runs it on the real V of `study.activations` (the last window scored, as in
`quality_levers.py study`): the graph's Hadamard rotation (64-row blocks), the reference codec of each
type, queries at `nq` positions per head with the exact Q and K. It reports per layer rho, the sink's V
norm over the median token's (median over the KV heads), the plain output error and the shaped one for
each c; pooled over the layers; and the pooled error with the best c of each layer chosen afterwards (an
oracle: a cache would have to pick c before the queries come).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import AttentionRef, activations, layouts
from .run import hadamard_rows

V_ROT = 64  # the rotation size the study uses for V (quality_levers.layer_levers)


def shaped_roundtrip(
    v: np.ndarray, roundtrip: Callable[[np.ndarray], np.ndarray], c: float, skip_first: bool = True
) -> np.ndarray:
    """v (H, T, d) -> the decoded values when each token is coded with c times the previous token's
    residual added (the tokens in order, all heads at once). c = 0 is the plain round trip."""
    x = np.asarray(v, dtype=np.float64)
    if c == 0.0:
        return roundtrip(x)
    out = np.empty_like(x)
    r = np.zeros_like(x[:, 0])
    for t in range(x.shape[1]):
        xt = x[:, t] + c * r
        out[:, t] = roundtrip(xt)
        r = xt - out[:, t]
        if t == 0 and skip_first:
            r = np.zeros_like(r)
    return out


def lag1(ref: AttentionRef, skip_first: bool = True) -> float:
    """rho = sum p_t p_{t+1} / sum p_t^2 over the queries of `ref` (tokens from 1 with skip_first)."""
    a = 1 if skip_first else 0
    num = sum(float((p[:, a + 1 :] * p[:, a:-1]).sum()) for p in ref.p)
    den = sum(float((p[:, a:] ** 2).sum()) for p in ref.p)
    return num / den


def codec_roundtrip(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """A layout's block round trip behind the graph's V rotation (Hadamard over V_ROT rows, float32 in)."""

    def rt(x: np.ndarray) -> np.ndarray:
        return hadamard_rows(fn(hadamard_rows(x, V_ROT).astype(np.float32)).astype(np.float64), V_ROT)

    return rt


def scored_window(model: str, layer: int, n_seq: int, seq_len: int, nq: int):
    """One layer of `study.activations`: (the study's layouts, the layer's arrays, the last sequence's V
    (H, T, d), its exact attention at `nq` query positions a head)."""
    lays = layouts(activations.meta(model, n_seq, seq_len)["pairing"])
    data = activations.load_layer(model, layer, n_seq, seq_len)
    ev = n_seq - 1
    q, k, v = data["q"][ev], data["k"][ev], data["v"][ev]
    return lays, data, v, AttentionRef(q, k, v, np.arange(seq_len // nq - 1, seq_len, seq_len // nq))


def layer_rows(
    model: str, layer: int, types: list[str], cs: list[float], n_seq: int, seq_len: int, nq: int
) -> dict:
    """One layer: rho, |o|^2 and the output squared error per type and c (c = 0: plain)."""
    lays, _, v, ref = scored_window(model, layer, n_seq, seq_len, nq)
    nrm = np.linalg.norm(v.astype(np.float64), axis=-1)  # (H, T)
    v0 = float(np.median(nrm[:, 0] / np.median(nrm, axis=1)))  # the sink's |v| over the median token's
    row: dict = {"rho": lag1(ref), "v0_norm": v0, "out_sq": ref.out_sq, "se": {}}
    for t in types:
        rt = codec_roundtrip(lays[t].fn)
        row["se"][t] = {f"{c:g}": ref.v_sums(shaped_roundtrip(v, rt, c))["outv_se"] for c in [0.0, *cs]}
    return row


def measure(
    models: list[str], types: list[str], cs: list[float], n_seq: int, seq_len: int, nq: int, log=None
) -> dict:
    res: dict = {"cs": [0.0, *cs], "types": types, "models": {}}
    for model in models:
        n_layer = activations.require(model, n_seq, seq_len)["n_layer"]
        rows = activations.per_layer(
            model, range(n_layer), lambda il, m=model: layer_rows(m, il, types, cs, n_seq, seq_len, nq), log
        )
        res["models"][model] = {"layers": rows, "pooled": pooled(rows, types, res["cs"])}
    return res


def pooled(rows: dict, types: list[str], cs: list[float]) -> dict:
    """Per type: the pooled relative output error per c, and with the best c of each layer (oracle)."""
    out_sq = sum(r["out_sq"] for r in rows.values())
    res = {}
    for t in types:
        per_c = {f"{c:g}": sum(r["se"][t][f"{c:g}"] for r in rows.values()) / out_sq for c in cs}
        best = sum(min(r["se"][t].values()) for r in rows.values()) / out_sq
        res[t] = {"per_c": per_c, "best_c_per_layer": best}
    return res


def render(res: dict) -> str:
    cs = [f"{c:g}" for c in res["cs"]]
    lines = []
    for model, m in res["models"].items():
        for t in res["types"]:
            lines += [
                f"**{model}, {t} V** (relative attention-output error; ratio to c = 0)",
                "",
                "| layer | rho | sink's V norm | " + " | ".join(f"c = {c}" for c in cs) + " |",
                "|---|---|---|" + "---|" * len(cs),
            ]
            for il, r in m["layers"].items():
                base = r["se"][t]["0"]
                cells = [f"{base / r['out_sq']:.2e}"] + [f"{r['se'][t][c] / base:.2f}" for c in cs[1:]]
                lines.append(f"| {il} | {r['rho']:.3f} | {r['v0_norm']:.2f} | " + " | ".join(cells) + " |")
            p = m["pooled"][t]
            base = p["per_c"]["0"]
            cells = [f"{base:.2e}"] + [f"{p['per_c'][c] / base:.3f}" for c in cs[1:]]
            lines += [
                "| pooled | | | " + " | ".join(cells) + " |",
                "",
                f"Best c per layer (chosen afterwards): {p['best_c_per_layer']:.2e}, "
                f"{p['best_c_per_layer'] / base:.3f} of c = 0.",
                "",
            ]
    return "\n".join(lines)
