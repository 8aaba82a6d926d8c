"""What a block's scale costs in bits: polar / polar3 with the scale on a coarser grid than fp16 (issue 12).

The block scale is an fp16 value: 16 of a block's bits, 0.25 bits/elem of polar's 4.25 and polar3's 3.25.
An 8-bit scale would give 0.125 bits/elem back to every K and V row. This measures what the coarser scale
costs the codes: the reference encoder (`kvpolar.codec`, the scale search and its least-squares refinement)
with every scale it tries rounded to a log grid of `levels` steps an octave instead of to fp16. 8 bits at 16
steps an octave span 16 octaves; at 8 steps, 32. The blocks are Gaussian (64 values, the format study's
shape) with a block RMS spread over `spread` octaves, so that the grid's phase does not favour one size;
`measure_real` does the same on the real K and V of `study.activations` (K centered by window 0's mean and
rotated as llama.cpp's graph does, V rotated; the last window's rows, a few layers of each model).
What the saved bits buy when spent on V is measured by KLD in llama.cpp (`layer_policy.py eval --any-bits`,
docs/quality-levers.md, session 29).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kvpolar import codec

from . import activations
from .run import hadamard_rows, k_rot_size, pick_layers

LEVELS = (32, 16, 8)  # steps an octave


def log_grid(levels: int) -> Callable[[np.ndarray], np.ndarray]:
    """float32 -> the nearest 2^(k / levels) (0 and below: 0), float32."""
    if levels < 1:
        raise ValueError(f"log_grid: expected at least 1 step an octave, got {levels}")

    def rnd(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, np.float32)
        pos = v > 0
        k = np.round(np.log2(np.where(pos, v, np.float32(1))) * levels)
        return np.where(pos, np.exp2(k / levels), 0).astype(np.float32)

    return rnd


def roundtrip(
    x: np.ndarray, fmt: str, rnd: Callable[[np.ndarray], np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """x (n, 64) -> the decoded blocks and their scales, every scale the encoder tries rounded by rnd (None:
    the format's fp16)."""
    s, c = codec._encode_chunk(codec._fmt(fmt), np.asarray(x, np.float32), rnd or codec.to_half)
    return codec.decode(fmt, s, c), s


def blocks(n: int, spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    amp = np.exp2(rng.uniform(-spread / 2, spread / 2, (n, 1)))
    return (rng.standard_normal((n, 64)) * amp).astype(np.float32)


def measure(n: int = 16384, spread: float = 8.0, levels=LEVELS, seed: int = 20250204) -> dict:
    rows = rel_mse_rows(blocks(n, spread, seed), levels, {})
    return {"blocks": n, "spread_octaves": spread, "seed": seed, "rows": rows}


def rel_mse_rows(x: np.ndarray, levels, label: dict) -> list[dict]:
    """Rows of rel. MSE of blocks x (n, 64) for polar / polar3 with fp16 scales and each log grid."""
    e = float((x.astype(np.float64) ** 2).sum())
    rows = []
    for fmt in ("polar", "polar3"):
        base = span = None
        for lv in (None, *levels):
            y, s = roundtrip(x, fmt, None if lv is None else log_grid(lv))
            mse = float(((x - y).astype(np.float64) ** 2).sum()) / e
            if base is None:  # the fp16 run: its error and the span of the scales it stores
                base = mse
                lg = np.log2(s[s > 0])
                span = [float(lg.min()), float(lg.max())] if lg.size else None
            rows.append(
                {
                    **label,
                    "scale_log2": span,
                    "type": fmt,
                    "scale": "fp16" if lv is None else f"log {lv}/octave",
                    "levels": lv,
                    "rel_mse": mse,
                    "vs_fp16": mse / base,
                }
            )
    return rows


def measure_real(models, n_layers: int = 8, levels=LEVELS, n_seq: int = 2, seq_len: int = 1024) -> list[dict]:
    """The K (centered by window 0's mean, rotated over k_rot_size(d)) and V (rotated over 64) rows of the
    last window, n_layers evenly spaced layers pooled, each model."""
    rows = []
    for model in models:
        meta = activations.require(model, n_seq, seq_len)
        ks, vs = [], []
        for il in pick_layers(meta["n_layer"], n_layers):
            data = activations.load_layer(model, il, n_seq, seq_len)
            k, v = data["k"], data["v"]
            mu = k[0].mean(axis=1, keepdims=True)  # window 0's mean, per KV head and channel
            ks.append(hadamard_rows(k[-1] - mu, k_rot_size(k.shape[-1])).reshape(-1, 64))
            vs.append(hadamard_rows(v[-1], 64).reshape(-1, 64))
        for tensor, xs in (("K", ks), ("V", vs)):
            x = np.concatenate(xs).astype(np.float32)
            rows += rel_mse_rows(x, levels, {"model": model, "tensor": tensor})
    return rows


def render(res: dict) -> str:
    lines = [
        f"{res['blocks']} Gaussian blocks of 64, block RMS spread over {res['spread_octaves']:g} octaves "
        f"(seed {res['seed']}):",
        "",
        "| type | scale | rel. MSE | / fp16 scale |",
        "|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['type']} | {r['scale']} | {r['rel_mse']:.5f} | {r['vs_fp16']:.3f} |")
    if res.get("real"):
        lines += [
            "",
            "Real K (centered, rotated) and V (rotated), the last window's rows:",
            "",
            "| model | tensor | its fp16 scales, log2 | type | scale | rel. MSE | / fp16 scale |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res["real"]:
            lg = r.get("scale_log2")
            span = f"{lg[0]:.1f} .. {lg[1]:.1f}" if lg else "-"
            lines.append(
                f"| {r['model']} | {r['tensor']} | {span} | {r['type']} | {r['scale']} | {r['rel_mse']:.5f} "
                f"| {r['vs_fp16']:.3f} |"
            )
    return "\n".join(lines)
