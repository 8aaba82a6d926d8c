"""Paper A: PolarQuant with random preconditioning and a recursive polar transform.

Han, Kacham, Karbasi, Mirrokni, Zandieh, "PolarQuant: Quantizing KV Caches with Polar
Transformation", arXiv 2502.02617. A row x (d coords) is multiplied by a shared random
orthogonal matrix, cut into blocks of 2^L coords, and each block is written in polar form
recursively:

    level 1:      psi1_j = atan2(x_{2j+1}, x_{2j}) in [0, 2pi),   r1_j = |(x_{2j}, x_{2j+1})|
    level l >= 2: psil_j = atan2(r_{2j+1}, r_{2j})  in [0, pi/2], r_j = |(r_{2j}, r_{2j+1})|

After L levels one radius per block remains (stored fp16); every angle is replaced by the
nearest centroid of a scalar codebook of its level. For a Gaussian input the level-l angle
has the density (paper, Lemma 2)

    f_l(psi) ∝ sin^(2^(l-1) - 1)(2 psi) on [0, pi/2]   (l >= 2),   uniform on [0, 2pi) (l = 1),

and the offline codebooks are Lloyd-Max for these densities (`angle_codebook`), computed by
numerical integration and cached. The online variant runs 1-D k-means on the input's own
angles of each level (`PaperAConfig(codebook="online")`); its centroids (fp16) are counted
in the bits, amortized over the input.

Preset (`PRESET`): 16-coord blocks, L = 4, angle bits 4/2/2/2, fp16 radius:
(8*4 + 4*2 + 2*2 + 1*2 + 16) / 16 = 3.875 bits/coord.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import numpy as np

from kvpolar.codec import sylvester_hadamard

PRECONDITIONERS = ("none", "hadamard", "gaussian")
CODEBOOKS = ("offline", "online")
_GRID = 200_001  # points of the integration grid of the Lloyd-Max design


# ----------------------------------------------------------------------------------------------
# Lloyd-Max on a density given as a function (shared with variants.py)


@dataclasses.dataclass(frozen=True)
class ScalarCodebook:
    """Scalar quantizer: sorted centroids (k,) and the k-1 interior cell boundaries (float64)."""

    centroids: np.ndarray
    boundaries: np.ndarray

    def encode(self, v: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.boundaries, v).astype(
            np.uint8 if len(self.centroids) <= 256 else np.int32
        )

    def decode(self, q: np.ndarray) -> np.ndarray:
        return self.centroids[q]


def lloyd_max(
    pdf: Callable[[np.ndarray], np.ndarray],
    lo: float,
    hi: float,
    n_levels: int,
    tol: float = 1e-13,
    max_iter: int = 20_000,
    grid: int = _GRID,
) -> ScalarCodebook:
    """Lloyd-Max quantizer of the (unnormalized) density `pdf` on [lo, hi].

    Conditional means are integrals of the trapezoid rule on a uniform grid of `grid` points
    (cumulative F = ∫f, G = ∫t f, linearly interpolated at the boundaries). Iterates the two
    optimality conditions (boundaries = midpoints, centroids = conditional means) from a
    uniform start until the centroids move less than `tol`.
    """
    t = np.linspace(lo, hi, grid)
    f = np.maximum(pdf(t), 0.0)
    h = t[1] - t[0]
    F = np.concatenate([[0.0], np.cumsum((f[1:] + f[:-1]) * h / 2)])
    tf = t * f
    G = np.concatenate([[0.0], np.cumsum((tf[1:] + tf[:-1]) * h / 2)])
    total = F[-1]
    if not total > 0:
        raise ValueError("density integrates to 0 on the interval")
    F /= total
    G /= total
    # start from the quantiles of the density
    c = np.interp((np.arange(n_levels) + 0.5) / n_levels, F, t)
    for _ in range(max_iter):
        b = (c[1:] + c[:-1]) / 2
        edges = np.concatenate([[lo], b, [hi]])
        Fe = np.interp(edges, t, F)
        Ge = np.interp(edges, t, G)
        mass = np.diff(Fe)
        new = np.where(mass > 0, np.diff(Ge) / np.where(mass > 0, mass, 1.0), (edges[1:] + edges[:-1]) / 2)
        done = np.max(np.abs(new - c)) < tol
        c = new
        if done:
            break
    return ScalarCodebook(centroids=c, boundaries=(c[1:] + c[:-1]) / 2)


def angle_density(level: int) -> Callable[[np.ndarray], np.ndarray]:
    """Unnormalized density of the level-`level` angle (>= 2) of a Gaussian vector on [0, pi/2]."""
    if level < 2:
        raise ValueError(f"angle_density is for levels >= 2, got {level}")
    k = 2 ** (level - 1) - 1
    return lambda psi: np.sin(2 * psi) ** k


def angle_range(level: int) -> tuple[float, float]:
    return (0.0, 2 * math.pi) if level == 1 else (0.0, math.pi / 2)


@functools.cache
def angle_codebook(level: int, bits: int) -> ScalarCodebook:
    """The offline (analytic) Lloyd-Max codebook of a level. Level 1: uniform on [0, 2pi)."""
    if level < 1 or bits < 1 or bits > 8:
        raise ValueError(f"need level >= 1 and 1 <= bits <= 8, got level={level}, bits={bits}")
    n = 1 << bits
    if level == 1:
        step = 2 * math.pi / n
        c = (np.arange(n) + 0.5) * step
        return ScalarCodebook(centroids=c, boundaries=(c[1:] + c[:-1]) / 2)
    lo, hi = angle_range(level)
    return lloyd_max(angle_density(level), lo, hi, n)


def kmeans_1d(v: np.ndarray, init: np.ndarray, iters: int = 30) -> ScalarCodebook:
    """1-D k-means (Lloyd on the empirical distribution) of the samples `v` from `init`."""
    v = np.sort(np.asarray(v, np.float64).ravel())
    cs = np.concatenate([[0.0], np.cumsum(v)])
    c = np.sort(np.asarray(init, np.float64))
    for _ in range(iters):
        b = (c[1:] + c[:-1]) / 2
        idx = np.concatenate([[0], np.searchsorted(v, b), [len(v)]])
        cnt = np.diff(idx)
        sums = cs[idx[1:]] - cs[idx[:-1]]
        new = np.where(cnt > 0, sums / np.maximum(cnt, 1), c)
        if np.array_equal(new, c):
            break
        c = np.sort(new)
    return ScalarCodebook(centroids=c, boundaries=(c[1:] + c[:-1]) / 2)


# ----------------------------------------------------------------------------------------------
# Preconditioning


@functools.cache
def preconditioner(kind: str, d: int, seed: int = 0) -> np.ndarray:
    """A seeded orthogonal (d, d) float64 matrix P; rows are preconditioned as y = x @ P.T.

    "none": identity; "hadamard": normalized Sylvester Hadamard times random signs (a
    randomized Hadamard transform, d a power of two); "gaussian": the Q factor of a seeded
    i.i.d. N(0, 1) matrix with the signs of R's diagonal folded in (Haar-random rotation; a raw
    Gaussian S is not invertible in a useful way, the paper decodes with S^T of a rotation).
    """
    if kind not in PRECONDITIONERS:
        raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {kind!r}")
    if kind == "none":
        return np.eye(d)
    rng = np.random.default_rng(seed)
    if kind == "hadamard":
        return sylvester_hadamard(d) * rng.choice([-1.0, 1.0], size=d)[None, :]
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))[None, :]


# ----------------------------------------------------------------------------------------------
# Recursive polar transform


def polar_transform(x: np.ndarray, levels: int) -> tuple[list[np.ndarray], np.ndarray]:
    """(n, m * 2^levels) float -> angles [level 1: (n, m*2^(L-1)), ..., level L: (n, m)] and radii (n, m).

    Each consecutive group of 2^levels coords is one polar block.
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[1] % (1 << levels):
        raise ValueError(f"rows must be a multiple of 2^levels = {1 << levels} long, got shape {x.shape}")
    angles = []
    r = x
    for level in range(1, levels + 1):
        a, b = r[:, 0::2], r[:, 1::2]
        psi = np.arctan2(b, a)
        if level == 1:
            psi = np.where(psi < 0, psi + 2 * math.pi, psi)
        angles.append(psi)
        r = np.hypot(a, b)
    return angles, r


def inverse_polar_transform(angles: Sequence[np.ndarray], radii: np.ndarray) -> np.ndarray:
    """Inverse of `polar_transform`: (n, m*2^L) float64."""
    r = np.asarray(radii, np.float64)
    for psi in reversed(angles):
        out = np.empty((r.shape[0], 2 * r.shape[1]))
        out[:, 0::2] = r * np.cos(psi)
        out[:, 1::2] = r * np.sin(psi)
        r = out
    return r


# ----------------------------------------------------------------------------------------------
# Quantizer


@dataclasses.dataclass(frozen=True)
class PaperAConfig:
    """levels L (block = 2^L coords), angle bits per level (level 1 first), preconditioner,
    seed of the preconditioner, codebook "offline" (analytic Lloyd-Max) or "online" (k-means)."""

    levels: int = 4
    bits: tuple[int, ...] = (4, 2, 2, 2)
    precond: str = "hadamard"
    seed: int = 0
    codebook: str = "offline"

    def __post_init__(self) -> None:
        if self.levels < 1 or len(self.bits) != self.levels:
            raise ValueError(f"need one bit count per level: levels={self.levels}, bits={self.bits}")
        if self.precond not in PRECONDITIONERS:
            raise ValueError(f"precond must be one of {PRECONDITIONERS}, got {self.precond!r}")
        if self.codebook not in CODEBOOKS:
            raise ValueError(f"codebook must be one of {CODEBOOKS}, got {self.codebook!r}")

    @property
    def block(self) -> int:
        return 1 << self.levels

    @property
    def label(self) -> str:
        b = "/".join(map(str, self.bits))
        return f"paper A L={self.levels} {b} {self.precond} {self.codebook}"


PRESET = PaperAConfig()


@dataclasses.dataclass
class PaperACodes:
    config: PaperAConfig
    d: int  # row length
    angles: list[np.ndarray]  # level l: (n, d / 2^l) uint8 cell indices
    radii: np.ndarray  # (n, d / 2^L) float16
    codebooks: list[ScalarCodebook]  # per level, as used (online: fp16-rounded centroids)


def bits_per_elem(cfg: PaperAConfig, n_rows: int | None = None, d: int | None = None) -> float:
    """Exact bits per coordinate: angle codes + one fp16 radius per 2^L block; online codebooks
    (2^b fp16 centroids per level) amortized over n_rows x d coordinates."""
    blk = cfg.block
    bits = sum((blk >> level) * b for level, b in enumerate(cfg.bits, start=1)) + 16
    per = bits / blk
    if cfg.codebook == "online":
        if n_rows is None or d is None:
            raise ValueError("online codebooks: bits depend on the input size; pass n_rows and d")
        per += 16 * sum(1 << b for b in cfg.bits) / (n_rows * d)
    return per


def quantize(x: np.ndarray, cfg: PaperAConfig = PRESET) -> PaperACodes:
    """(n, d) float rows -> codes; d a multiple of 2^L (and a power of two for "hadamard")."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[1] % cfg.block:
        raise ValueError(f"{cfg.label}: rows must be a multiple of {cfg.block} long, got shape {x.shape}")
    d = x.shape[1]
    y = x @ preconditioner(cfg.precond, d, cfg.seed).T
    n = len(y)
    yb = y.reshape(n * d // cfg.block, cfg.block)
    angles, radii = polar_transform(yb, cfg.levels)
    codes, books = [], []
    for level, (psi, b) in enumerate(zip(angles, cfg.bits, strict=True), start=1):
        book = angle_codebook(level, b)
        if cfg.codebook == "online":
            fit = kmeans_1d(psi, book.centroids)
            c = np.sort(fit.centroids.astype(np.float16).astype(np.float64))
            book = ScalarCodebook(centroids=c, boundaries=(c[1:] + c[:-1]) / 2)
        books.append(book)
        codes.append(book.encode(psi).reshape(n, -1))
    r16 = np.minimum(radii, 65504.0).astype(np.float16).reshape(n, -1)
    return PaperACodes(cfg, d, codes, r16, books)


def dequantize(codes: PaperACodes) -> np.ndarray:
    """codes -> (n, d) float32."""
    cfg = codes.config
    n, d = codes.radii.shape[0], codes.d
    nb = n * d // cfg.block
    psi = [book.decode(q.reshape(nb, -1)) for q, book in zip(codes.angles, codes.codebooks, strict=True)]
    yb = inverse_polar_transform(psi, codes.radii.astype(np.float64).reshape(nb, -1))
    y = yb.reshape(n, d)
    return (y @ preconditioner(cfg.precond, d, cfg.seed)).astype(np.float32)


def roundtrip(x: np.ndarray, cfg: PaperAConfig = PRESET) -> np.ndarray:
    return dequantize(quantize(x, cfg))
