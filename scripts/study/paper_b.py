"""Paper B: pairwise radius + angle quantization over RoPE pairs.

"PolarQuant: Leveraging Polar Transformation for Key Cache Quantization and Decoding
Acceleration" (NeurIPS 2025; reviews and author replies in shared/papers). Each RoPE pair
(x_a, x_b) of a key is written as r = |(x_a, x_b)|, theta = atan2(x_b, x_a) in (-pi, pi];
r and theta are quantized by uniform min/max quantizers ("Polar_44": 4-bit radius, 4-bit
angle; "Polar_33": 3/3).

Pairings (which coords RoPE rotates together):
    "norm": (2i, 2i+1)     (GPT-J / llama.cpp LLAMA_ROPE_TYPE_NORM rows)
    "neox": (i, i + d/2)   (GPT-NeoX / HF rotate_half; llama.cpp LLAMA_ROPE_TYPE_NEOX rows)

Groupings:
    "channel": the paper's layout: per pair-channel, groups of `group` consecutive tokens
        (128 in the paper); fp16 min and max of r and of theta per group: 64 bits per pair per
        group = 32/group bits/coord (Polar_44 at 128: 4.25 bits; Polar_33: 3.25 bits).
        Needs `group` tokens buffered before they can be written (KIVI-style residual).
    "token": per token, blocks of `group` coords along the head dim (group/2 pairs):
        params="minmax": fp16 min and max of r and of theta per block (64 bits per block);
        params="scale": one fp16 max of r per block (r in [0, max], levels k*max/(2^b-1))
        and theta on the full circle (2^b uniform cells, no parameters) (16 bits per block).

min/max are rounded outward to fp16 (min down, max up) so that every value lies inside the
stored range: the reconstruction error of a uniform quantizer is then at most half a step.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

PAIRINGS = ("norm", "neox")
GROUPINGS = ("channel", "token")
PARAMS = ("minmax", "scale")


def pair_indices(d: int, pairing: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices (a, b) of the d/2 RoPE pairs of a head of size d."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    if d % 2:
        raise ValueError(f"head size must be even, got {d}")
    h = d // 2
    if pairing == "norm":
        return np.arange(0, d, 2), np.arange(1, d, 2)
    return np.arange(h), np.arange(h, d)


def to_pairs(x: np.ndarray, pairing: str) -> tuple[np.ndarray, np.ndarray]:
    """(..., d) -> radius (..., d/2) and angle (..., d/2) in (-pi, pi], float64."""
    x = np.asarray(x, np.float64)
    a, b = pair_indices(x.shape[-1], pairing)
    return np.hypot(x[..., a], x[..., b]), np.arctan2(x[..., b], x[..., a])


def from_pairs(r: np.ndarray, theta: np.ndarray, pairing: str) -> np.ndarray:
    d = 2 * r.shape[-1]
    a, b = pair_indices(d, pairing)
    x = np.empty((*r.shape[:-1], d))
    x[..., a] = r * np.cos(theta)
    x[..., b] = r * np.sin(theta)
    return x


def f16_floor(v: np.ndarray) -> np.ndarray:
    """Largest binary16 value <= v (float64 result)."""
    h = np.asarray(v, np.float64).astype(np.float16)
    over = h.astype(np.float64) > v
    h = np.where(over, np.nextafter(h, np.float16(-np.inf)), h)
    return h.astype(np.float64)


def f16_ceil(v: np.ndarray) -> np.ndarray:
    """Smallest binary16 value >= v (float64 result)."""
    h = np.asarray(v, np.float64).astype(np.float16)
    under = h.astype(np.float64) < v
    h = np.where(under, np.nextafter(h, np.float16(np.inf)), h)
    return h.astype(np.float64)


def uniform_minmax(v: np.ndarray, mn: np.ndarray, mx: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform quantizer with levels mn + k*step, step = (mx-mn)/(2^bits-1), k = 0..2^bits-1.

    Returns (codes int, reconstruction float64). mn/mx broadcast against v.
    """
    nl = (1 << bits) - 1
    step = (mx - mn) / nl
    safe = np.where(step > 0, step, 1.0)
    q = np.clip(np.rint((v - mn) / safe), 0, nl)
    q = np.where(step > 0, q, 0).astype(np.int32)
    return q, mn + q * step


def uniform_circle(theta: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Angle on the full circle: 2^bits cells of width 2pi/2^bits centred on -pi + k*step."""
    n = 1 << bits
    step = 2 * math.pi / n
    q = np.rint((theta + math.pi) / step).astype(np.int64) % n
    return q.astype(np.int32), -math.pi + q * step


@dataclasses.dataclass(frozen=True)
class PaperBConfig:
    rbits: int = 4
    abits: int = 4
    pairing: str = "neox"
    grouping: str = "channel"
    group: int = 128  # tokens per group ("channel") or coords per block ("token")
    params: str = "minmax"

    def __post_init__(self) -> None:
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {self.pairing!r}")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, got {self.grouping!r}")
        if self.params not in PARAMS:
            raise ValueError(f"params must be one of {PARAMS}, got {self.params!r}")
        if self.grouping == "channel" and self.params != "minmax":
            raise ValueError("per-channel groups use min/max parameters (the paper's layout)")
        if self.grouping == "token" and self.group % 2:
            raise ValueError(f"token blocks must hold whole pairs, got {self.group} coords")

    @property
    def bits_per_elem(self) -> float:
        """Codes (rbits + abits per pair) plus fp16 parameters, per coordinate."""
        codes = (self.rbits + self.abits) / 2
        if self.grouping == "channel":
            return codes + 64 / (2 * self.group)
        return codes + (64 if self.params == "minmax" else 16) / self.group

    @property
    def label(self) -> str:
        if self.grouping == "channel":
            g = f"per-channel g={self.group} tok"
        else:
            g = f"per-token block {self.group} {self.params}"
        return f"paper B r{self.rbits}/a{self.abits} {self.pairing} {g}"


POLAR_44 = PaperBConfig(4, 4)
POLAR_33 = PaperBConfig(3, 3)


def _check(x: np.ndarray, cfg: PaperBConfig) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 3:
        raise ValueError(f"expected (heads, tokens, head_dim), got shape {x.shape}")
    if cfg.grouping == "channel" and x.shape[1] % cfg.group:
        raise ValueError(f"{cfg.label}: tokens ({x.shape[1]}) must be a multiple of the group {cfg.group}")
    if cfg.grouping == "token" and (x.shape[2] // 2) % (cfg.group // 2):
        raise ValueError(f"{cfg.label}: head size {x.shape[2]} is not a multiple of the block {cfg.group}")
    return x


def roundtrip(x: np.ndarray, cfg: PaperBConfig = POLAR_44) -> np.ndarray:
    """(heads, tokens, head_dim) float -> the same shape float32 after quantize + dequantize."""
    x = _check(x, cfg)
    nh, nt, d = x.shape
    r, th = to_pairs(x, cfg.pairing)  # (nh, nt, d/2)
    if cfg.grouping == "channel":
        g = cfg.group
        rg = r.reshape(nh, nt // g, g, d // 2)
        tg = th.reshape(nh, nt // g, g, d // 2)
        out = []
        for v, bits in ((rg, cfg.rbits), (tg, cfg.abits)):
            mn = f16_floor(v.min(2, keepdims=True))
            mx = f16_ceil(v.max(2, keepdims=True))
            out.append(uniform_minmax(v, mn, mx, bits)[1].reshape(nh, nt, d // 2))
        rh, thh = out
    else:
        p = cfg.group // 2
        rb = r.reshape(nh, nt, d // 2 // p, p)
        tb = th.reshape(nh, nt, d // 2 // p, p)
        if cfg.params == "minmax":
            out = []
            for v, bits in ((rb, cfg.rbits), (tb, cfg.abits)):
                mn = f16_floor(v.min(-1, keepdims=True))
                mx = f16_ceil(v.max(-1, keepdims=True))
                out.append(uniform_minmax(v, mn, mx, bits)[1])
            rh, thh = out
        else:
            mx = f16_ceil(rb.max(-1, keepdims=True))
            rh = uniform_minmax(rb, np.zeros_like(mx), mx, cfg.rbits)[1]
            thh = uniform_circle(tb, cfg.abits)[1]
        rh = rh.reshape(nh, nt, d // 2)
        thh = thh.reshape(nh, nt, d // 2)
    return from_pairs(rh, thh, cfg.pairing).astype(np.float32)
