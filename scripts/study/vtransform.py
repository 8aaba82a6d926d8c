"""V transform coding: a lever for the low-memory pair's V, measured in numpy (issue 12).

The attention output is linear in the values, so a cache may store A v for any invertible D x D matrix A
per KV head and multiply the output by A^-1: o = sum_t p_t v_t = A^-1 sum_t p_t (A v_t), exact. Today A is
the graph's Hadamard rotation (orthogonal: the block code's white error stays white, the output error is
the code's). A non-orthogonal A shapes the error: with U, lambda the eigenvectors and eigenvalues of v's
second moment (from the first ubatch a context sees, as the K offsets are measured), the transform

    A = H diag(lambda^-p) U^T          (H: the graph's Hadamard rotation, p = 0: an orthogonal A)

spends the block's scale on the directions that carry the value's energy. For a code whose error is white
with a size that follows the block's norm, the output error is proportional to
sum_j lambda_j^(1 - 2p) * sum_j lambda_j^(2p); p = 1/4 minimises it, a gain of D sum(lambda) / (sum
sqrt(lambda))^2 over p = 0 (`predicted_gain`). `diag` takes the channels' own second moments with U = I
(per-channel V balancing, in the channels' basis); `rand-0` a random orthogonal U (the control: what a
re-rotation alone does to the measure).

`measure` runs the reference codec of each type on the real V of `study.activations` (the last window scored,
the exact Q and K, queries at `nq` positions per head, as `study.vshape`), the transform measured from the
scored sequence's first `calib` tokens (token 0, the attention sink, left out of the moment), and reports
per layer the relative output error of the graph's path and each variant's ratio to it; pooled over layers.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import activations
from .run import hadamard_rows
from .vshape import V_ROT, codec_roundtrip, scored_window

VARIANTS = ("klt-0", "klt-1/8", "klt-1/4", "klt-3/8", "diag-1/4", "rand-0")
KINDS = ("klt", "diag", "rand")


def _variant(name: str) -> tuple[str, float]:
    """'klt-1/4' -> ('klt', 0.25): the basis (klt: the eigenvectors, diag: the channels, rand: a random
    orthogonal one, the control) and the exponent p."""
    kind, _, p = name.partition("-")
    num, _, den = p.partition("/")
    if kind not in KINDS or not num:
        raise ValueError(f"V transform variant: expected KIND-P with KIND one of {KINDS}, got {name!r}")
    return kind, float(num) / float(den or 1)


def transform(v_calib: np.ndarray, kind: str, p: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """v_calib (T, D) -> (M, M^-1) with v A^T = (v M) H: M = U diag(lambda^-p) (D x D, applied on the right
    of row vectors) and its inverse; lambda normalised to mean 1 (the code's block scale takes any scale).
    kind rand: U random orthogonal (`seed`), lambda the calibration rows' moments along it."""
    x = np.asarray(v_calib, dtype=np.float64)
    m2 = x.T @ x / len(x)
    if kind == "klt":
        lam, u = np.linalg.eigh(m2)
    elif kind == "diag":
        lam, u = np.diag(m2).copy(), np.eye(len(m2))
    elif kind == "rand":
        u, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal(m2.shape))
        lam = np.einsum("ij,ik,kj->j", u, m2, u)
    else:
        raise ValueError(f"V transform kind: expected one of {KINDS}, got {kind!r}")
    lam = np.maximum(lam, lam.max() * 1e-9)
    lam = lam / lam.mean()
    s = lam**-p
    return u * s, (u / s).T


def predicted_gain(v_calib: np.ndarray) -> float:
    """D sum(lambda) / (sum sqrt(lambda))^2 of the KLT: the output error of p = 0 over p = 1/4's for a
    white code error whose size follows the block's norm."""
    x = np.asarray(v_calib, dtype=np.float64)
    lam = np.maximum(np.linalg.eigvalsh(x.T @ x / len(x)), 0.0)
    return float(len(lam) * lam.sum() / np.sqrt(lam).sum() ** 2)


def shaped_roundtrip(v: np.ndarray, fn, mats: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """v (H, T, D) -> decode(encode((v M_h) H)) H M_h^-1 for each KV head h (float32 into the code)."""
    out = np.empty(v.shape, dtype=np.float64)
    for h, (m, mi) in enumerate(mats):
        y = hadamard_rows(np.asarray(v[h], dtype=np.float64) @ m, V_ROT)
        out[h] = hadamard_rows(fn(y.astype(np.float32)).astype(np.float64), V_ROT) @ mi
    return out


@dataclasses.dataclass(frozen=True)
class Setup:
    """What `measure` runs on every layer: the V types and variants, the activations' window (n_seq x seq_len
    tokens, nq query positions a head), the calibration tokens 1 .. calib - 1, and other: the transform from
    the first sequence's tokens, not the scored one's (a fixed text's transform)."""

    types: list[str]
    variants: list[str]
    n_seq: int
    seq_len: int
    nq: int
    calib: int
    other: bool = False


def layer_rows(model: str, layer: int, su: Setup) -> dict:
    """One layer: |o|^2, the graph's output squared error per type and each variant's, the predicted gain."""
    lays, data, v, ref = scored_window(model, layer, su.n_seq, su.seq_len, su.nq)
    vc = data["v"][0] if su.other else v
    cal = [vc[h, 1 : su.calib] for h in range(v.shape[0])]
    row: dict = {
        "out_sq": ref.out_sq,
        "gain_pred": float(np.mean([predicted_gain(c) for c in cal])),
        "se": {},
    }
    for t in su.types:
        row["se"][t] = {"graph": ref.v_sums(codec_roundtrip(lays[t].fn)(v))["outv_se"]}
        for name in su.variants:
            kind, p = _variant(name)
            mats = [transform(c, kind, p, seed=1000 * layer + h) for h, c in enumerate(cal)]
            row["se"][t][name] = ref.v_sums(shaped_roundtrip(v, lays[t].fn, mats))["outv_se"]
    return row


def measure(models: list[str], su: Setup, log=None) -> dict:
    for name in su.variants:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}: expected one of {', '.join(VARIANTS)}")
    if su.other and su.n_seq < 2:
        raise SystemExit("vtransform --other-text: needs 2 sequences or more (--n-seq)")
    res: dict = {
        "types": su.types,
        "variants": su.variants,
        "calib": su.calib,
        "other": su.other,
        "models": {},
    }
    for model in models:
        n_layer = activations.require(model, su.n_seq, su.seq_len)["n_layer"]
        rows = activations.per_layer(model, range(n_layer), lambda il, m=model: layer_rows(m, il, su), log)
        res["models"][model] = {"layers": rows, "pooled": pooled(rows, su.types, ["graph", *su.variants])}
    return res


def pooled(rows: dict, types: list[str], names: list[str]) -> dict:
    """Per type and variant: the pooled relative output error (sum of squared errors over sum |o|^2)."""
    out_sq = sum(r["out_sq"] for r in rows.values())
    return {t: {n: sum(r["se"][t][n] for r in rows.values()) / out_sq for n in names} for t in types}


def render(res: dict) -> str:
    names = res["variants"]
    lines = []
    for model, m in res["models"].items():
        for t in res["types"]:
            lines += [
                f"**{model}, {t} V** (relative attention-output error of the graph's path; each variant's"
                f" ratio to it; transform from tokens 1-{res['calib'] - 1}"
                f"{' of the first sequence' if res.get('other') else ''})",
                "",
                "| layer | predicted gain | graph | " + " | ".join(names) + " |",
                "|---|---|---|" + "---|" * len(names),
            ]
            for il, r in m["layers"].items():
                base = r["se"][t]["graph"]
                cells = [f"{base / r['out_sq']:.2e}"] + [f"{r['se'][t][n] / base:.3f}" for n in names]
                lines.append(f"| {il} | {r['gain_pred']:.2f} | " + " | ".join(cells) + " |")
            p = m["pooled"][t]
            cells = [f"{p['graph']:.2e}"] + [f"{p[n] / p['graph']:.3f}" for n in names]
            lines += ["| pooled | | " + " | ".join(cells) + " |", ""]
    return "\n".join(lines)


def write_matrices(
    model: str, out_dir, variant: str, n_seq: int, seq_len: int, calib: int, seq: int = 0, seed: int = 0
) -> int:
    """The measurement build's files (patches/experiments/session30-v-transform.diff,
    LLAMA_KV_VXFORM=out_dir): out_dir/Lxx.bin per layer, float32 M [n_head_kv][D][D] then M^-1 (row vectors:
    v' = v M), M = U diag(lambda^-p) from sequence `seq`'s tokens 1..calib-1 of `study.activations`.
    seed: the random bases of `rand` (layer l, head h: seed 1000 (l + 100 seed) + h). Returns the number of
    layers written."""
    from pathlib import Path

    from kvpolar.atomic import atomic_write_bytes

    kind, p = _variant(variant)
    out = Path(out_dir)
    n_layer = activations.require(model, n_seq, seq_len)["n_layer"]
    for il in range(n_layer):
        v = activations.load_layer(model, il, n_seq, seq_len)["v"][seq]
        mats = [
            transform(v[h, 1:calib], kind, p, seed=1000 * (il + 100 * seed) + h) for h in range(v.shape[0])
        ]
        m = np.stack([a for a, _ in mats]).astype(np.float32)
        mi = np.stack([b for _, b in mats]).astype(np.float32)
        atomic_write_bytes(out / f"L{il:02d}.bin", m.tobytes() + mi.tobytes(), mkdir=True)
    return n_layer
