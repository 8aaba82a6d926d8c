"""A transformers `Cache` that stores K and V as polar blocks (transformers 5.x).

Keys and values are written through the GPU encoder (`cupy_kernels.codec.encode_into`) into
[B, Hkv, T_max, D/64, type_size] uint8 tensors, after the rotations llama.cpp applies:

    K: k' = (k - mu_k) H_D        H_n = normalized Sylvester Hadamard matrix of order n;
    q: q' = q H_D                 q'.k' = q.k - q.mu_k: the shift is the same for every key of
                                  a query, so the softmax does not change
    V: v' = (v - mu_v) H_64^(blocks of 64)   output o = o' H_64^(blocks) + mu_v (sum p = 1)

mu_k / mu_v are optional per-layer centering offsets (`centering="prefill"` takes the mean of
the first update's keys and values per sequence and head; or pass a dict layer -> (mu_k,
mu_v) of [Hkv, D] tensors). Decode steps (up to `max_kernel_q` query tokens, no padding
mask) run the split-K attention kernel on the compressed cache; prefill and masked steps
dequantize the cache and call SDPA.

Left-padded batches (what `generate` runs for prompts of different lengths): when the first
prefill's mask shows each sequence's padding as a run of masked keys at its start, the layer drops
those keys after that step (each sequence's tokens move to the start of its rows, `lens` becomes
its own length, `pads` holds what was dropped). Later steps whose mask is exactly that padding plus
causality take the kernel path with the per-sequence lengths; any other mask takes the dequantize +
SDPA path on the padded view (`padded`). `keep_padding=True` keeps the padding (every masked step
then dequantizes the cache: the behaviour before). The "prefill" centering offsets are the mean
over each sequence's own tokens of the first update: when its mask shows a left padding, the layer
re-encodes that update from its key and value states with them (`recenter_prefill`; with keep_padding
too), so a sequence's offsets do not depend on its batch. (Until session 37 the padding's keys were in
the mean: scripts/padded_centering.py measured both, docs/results-gpu.md.)

Use:

    from cupy_kernels.torch_cache import PolarCache, enable
    enable(model)                                   # registers attention "kvpolar"
    cache = PolarCache(model.config, kfmt="polar", vfmt="polar")
    model.generate(ids, past_key_values=cache, do_sample=False, max_new_tokens=64)

StaticPolarCache(config, max_cache_len, ...) is the same cache allocated once for max_cache_len
tokens, its positions on the device, so that a decode step can be captured in a CUDA graph
(kfmt="f16": the float16 baseline; see "Static caches" below, scripts/gpu_decode_bench.py). Its layers
read the mask at the prefill only (decode steps are graphs): a left padding is dropped after it as above,
and the decode steps must then feed each sequence's own positions (gpu_decode_bench.GraphDecoder's
`positions`); a mask that is neither causal nor a left padding is refused.

backend="reference" runs the same cache on any device with the numpy codec (kvpolar.codec)
and SDPA: slow, for tests without a GPU.
"""

from __future__ import annotations

import functools
import logging
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from kvpolar import codec
from kvpolar.format import QK, get_format

from . import attention as gpu_attn
from . import codec as gpu_codec

log = logging.getLogger("cupy_kernels.torch_cache")

ATTN_NAME = "kvpolar"
BACKENDS = ("auto", "cupy", "reference")
CAPACITY_STEP = 256  # tokens; T_max stays a multiple of 8 as the kernel needs


@functools.cache
def _hadamard_cpu(n: int) -> torch.Tensor:
    return torch.from_numpy(codec.sylvester_hadamard(n)).to(torch.float32)  # ggml_gen_hadamard's


def hadamard(n: int, device) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix [n, n] float32 (symmetric, orthonormal)."""
    return _hadamard_cpu(n).to(device)


def rotate_blocks(x: torch.Tensor, h64: torch.Tensor) -> torch.Tensor:
    """x [..., D] -> x with every 64-block multiplied by H_64 (its own inverse)."""
    shp = x.shape
    return (x.reshape(*shp[:-1], shp[-1] // QK, QK) @ h64).reshape(shp)


def _cupy_usable(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


class PolarKV:
    """What PolarCacheLayer.update returns in place of the key and value tensors."""

    __slots__ = ("layer",)

    def __init__(self, layer: PolarCacheLayer) -> None:
        self.layer = layer


class LeftPadding:
    """A left padding dropped from a cache layer's K/V rows (the module doc): what PolarCacheLayer and the
    static layers share. The layer has B, device, length, is_initialized, keys and values [B, H, T, ...]
    and lens [B]."""

    keep_padding = False
    pads = None  # [B] int32 on the device once dropped

    def set_lens(self, n: int) -> None:
        """lens := n for every sequence, less its dropped padding (in place: a static layer's graphs
        read this tensor)."""
        if self.pads is None:
            self.lens.fill_(n)
        else:
            self.lens.copy_(n - self.pads)

    def reset_lengths(self) -> None:
        """No token taken and no padding dropped (lens zeroed in place: a static layer's graphs read it)."""
        self.length = 0
        self.pads = None
        if self.is_initialized:
            self.lens.zero_()

    def drop_padding(self, pads: torch.Tensor) -> None:
        """Drop the first pads[b] stored keys of each sequence b (int32 [B] on the device, each
        below `length`): its other tokens move to the start of its rows, lens = length - pads."""
        n = self.length
        host = tuple(pads.tolist())  # the one host read; mask_adds_nothing's memo keys on it
        if len(host) != self.B or pads.dim() != 1 or not all(0 <= p < n for p in host):
            raise ValueError(f"pads must be {self.B} counts in [0, {n}), got {list(host)}")
        src = (torch.arange(n, device=self.device)[None, :] + pads.long()[:, None]).clamp(max=n - 1)
        for name in ("keys", "values"):
            c = getattr(self, name)
            idx = src.view(self.B, 1, n, *([1] * (c.dim() - 3))).expand(self.B, c.shape[1], n, *c.shape[3:])
            c[:, :, :n] = torch.gather(c[:, :, :n], 2, idx)
        self.pads, self.pads_host = pads.to(torch.int32), host
        self.set_lens(n)

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """A dequantized [B, H, length, D] tensor of a layer that dropped its padding, back at the
        positions transformers counts (the dropped keys' places hold a copy of key 0: mask them)."""
        n = self.length
        src = (torch.arange(n, device=x.device)[None, :] - self.pads.long()[:, None]).clamp(min=0)
        return torch.gather(x, 2, src.view(self.B, 1, n, 1).expand(self.B, x.shape[1], n, x.shape[3]))

    def visible(self, tq: int) -> torch.Tensor:
        """[B or 1, 1, tq, length] bool at transformers' positions: key j visible to query i of the
        last tq tokens (causal; the dropped padding masked): the mask under which the kernel path
        computes what SDPA would."""
        return padded_causal(tq, self.length, self.pads, self.device)

    def stored_mask(self, tq: int) -> torch.Tensor:
        """[B, 1, tq, length] bool over the stored keys: key j visible to query i of the last tq
        tokens of sequence b iff j <= lens[b] - tq + i (what the kernel computes from lens)."""
        j = torch.arange(self.length, device=self.device)
        i = torch.arange(tq, device=self.device)
        return j.view(1, 1, 1, -1) <= self.lens.long().view(-1, 1, 1, 1) - tq + i.view(1, 1, -1, 1)


def balance_factors(dk: torch.Tensor, q: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """K balancing (llama.cpp's, patch 0012): per sequence, KV head and RoPE pair a power of two
    D = 2^round(log2 (E q^2 / E dk^2) / 4), log2 D centred per head and within [-8, 8]: the cache stores
    D (k - mu), the query is multiplied by D^-1 (logits unchanged), which with white quantization error after
    the rotation minimises the logit error (sum_j E q_j^2 / D_j^2)(sum_j D_j^2 E dk_j^2).
    dk [B, Hkv, n, D]: the first update's keys less the offsets; q [B, Hq, n, D]: its queries (the Hq / Hkv
    heads of a KV head pooled); own [B, 1, n, 1]: 1 on each sequence's own tokens. Both channels of a RoPE
    pair (i, i + D/2, transformers' rotate_half) get one factor, so D commutes with RoPE.
    Returns D [B, Hkv, 1, D] float32."""
    B, H, _, D = dk.shape
    count = own.sum(2, keepdim=True).clamp(min=1.0)
    ek = (dk.square() * own).sum(2, keepdim=True) / count
    eq = (q.square() * own).sum(2, keepdim=True) / count  # [B, Hq, 1, D]
    eq = eq.view(B, H, -1, 1, D).mean(2)
    pair = lambda t: (t + t.roll(D // 2, -1)) / 2  # noqa: E731 (the mean over each RoPE pair)
    ratio = pair(eq).clamp(min=1e-30) / pair(ek).clamp(min=1e-30)
    lg = 0.25 * torch.log2(ratio)
    lg = (lg - lg.mean(-1, keepdim=True)).round().clamp(-8.0, 8.0)
    return torch.exp2(lg)


class PolarCacheLayer(LeftPadding, CacheLayerMixin):
    """One layer: K and V blocks [B, Hkv, T_max, D/64, type_size] uint8 (V float16 [B, Hkv,
    T_max, D] for vfmt="f16"). `length`: the tokens every sequence has taken (padding included:
    what transformers counts); `lens` [B] int32 on the device: the keys stored per sequence,
    `length` for all unless the layer dropped a left padding (`pads` [B], see the module doc)."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(
        self,
        kfmt: str = "polar",
        vfmt: str = "polar",
        rotate: bool = True,
        offsets: tuple[torch.Tensor, torch.Tensor] | str | None = None,
        backend: str = "auto",
        max_kernel_q: int = 8,
        attn_config: gpu_attn.AttnConfig | None = None,
        keep_padding: bool = False,
        balance: bool = False,
    ):
        super().__init__()
        if balance and offsets != "prefill":
            raise ValueError(
                f"balance needs offsets='prefill' (factors from the first update), got {offsets!r}"
            )
        if kfmt not in ("polar", "polar3"):
            raise ValueError(f"kfmt must be 'polar' or 'polar3', got {kfmt!r}")
        if vfmt not in ("polar", "polar3", "f16"):
            raise ValueError(f"vfmt must be 'polar', 'polar3' or 'f16', got {vfmt!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not (offsets is None or offsets == "prefill" or isinstance(offsets, tuple)):
            raise ValueError(f"offsets must be None, 'prefill' or a (mu_k, mu_v) tuple, got {offsets!r}")
        self.kfmt, self.vfmt, self.rotate = kfmt, vfmt, rotate
        self.offsets = offsets
        self.backend = backend
        self.max_kernel_q = max_kernel_q
        self.attn_config = attn_config
        self.keep_padding = keep_padding
        self.length = 0
        self.pads = None
        self.mu_k = self.mu_v = None
        self.balance = balance
        self.bal_k = self.bal_q = None  # balance: K's factors D [B, Hkv, 1, D] and Q's D^-1 [B, Hq, 1, D]
        self._first = None  # "prefill": the first update's key and value states until its attention

    # ---- storage ---------------------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        B, H, _, D = key_states.shape
        if D % QK:
            raise ValueError(f"head size must be a multiple of {QK} for polar caches, got {D}")
        self.B, self.H, self.D = B, H, D
        if self.backend == "auto":
            self.backend = "cupy" if _cupy_usable(self.device) else "reference"
        if self.backend == "cupy" and not _cupy_usable(self.device):
            raise ValueError(f"backend 'cupy' needs CuPy and CUDA tensors, got tensors on {self.device}")
        self.hd = hadamard(D, self.device) if self.rotate else None
        self.h64 = hadamard(QK, self.device) if self.rotate else None
        self.keys = torch.empty(
            (B, H, 0, D // QK, get_format(self.kfmt).type_size), dtype=torch.uint8, device=self.device
        )
        if self.vfmt == "f16":
            self.values = torch.empty((B, H, 0, D), dtype=torch.float16, device=self.device)
        else:
            self.values = torch.empty(
                (B, H, 0, D // QK, get_format(self.vfmt).type_size), dtype=torch.uint8, device=self.device
            )
        self.lens = torch.zeros((B,), dtype=torch.int32, device=self.device)
        self.length = 0
        self.pads = None
        if isinstance(self.offsets, tuple):
            mk, mv = self.offsets
            self.mu_k = mk.to(self.device, torch.float32).reshape(1, H, 1, D)
            self.mu_v = mv.to(self.device, torch.float32).reshape(1, H, 1, D)
        self.is_initialized = True

    def _reserve(self, n: int) -> None:
        cap = self.keys.shape[2]
        if n <= cap:
            return
        new = max(n, 2 * cap)
        new = -(-new // CAPACITY_STEP) * CAPACITY_STEP
        for name in ("keys", "values"):
            old = getattr(self, name)
            t = torch.zeros(
                (old.shape[0], old.shape[1], new, *old.shape[3:]), dtype=old.dtype, device=old.device
            )
            t[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, t)

    def _prep(self, key_states: torch.Tensor, value_states: torch.Tensor):
        k = key_states.float()
        v = value_states.float()
        if self.offsets == "prefill" and self.mu_k is None:
            self.mu_k = k.mean(2, keepdim=True)
            self.mu_v = v.mean(2, keepdim=True)
            self._first = (key_states, value_states)  # (for recenter_prefill, at the prefill's attention)
        if self.mu_k is not None:
            k = k - self.mu_k
            v = v - self.mu_v
        if self.bal_k is not None:
            k = k * self.bal_k
        if self.rotate:
            k = k @ self.hd
            v = rotate_blocks(v, self.h64)
        return k, v

    def _write(self, x: torch.Tensor, cache: torch.Tensor, fmt: str) -> None:
        """x [B, H, t, D] into the cache at `length` (every sequence), or at each sequence's own
        `lens[b]` once the layer has dropped a padding."""
        t = x.shape[2]
        ragged = self.pads is not None
        if fmt == "f16":
            if ragged:
                _scatter_positions(cache, x, self.lens)
            else:
                cache[:, :, self.length : self.length + t] = x.to(torch.float16)
        elif self.backend == "cupy":
            gpu_codec.encode_into(x.contiguous(), cache, fmt, self.lens if ragged else self.length)
        else:
            b = codec.quantize_blocks(x.detach().cpu().numpy().reshape(-1, QK), fmt)
            b = torch.from_numpy(b).reshape(x.shape[0], x.shape[1], t, -1, b.shape[-1]).to(cache.device)
            starts = self.lens.tolist() if ragged else [self.length] * x.shape[0]
            for i, p in enumerate(starts):
                cache[i, :, p : p + t] = b[i]

    def recenter_prefill(self, pads: torch.Tensor | None, query: torch.Tensor | None = None) -> None:
        """centering="prefill" when the first update's attention finds a left padding (pads [B], before the
        layer drops it): the offsets become the mean over each sequence's own tokens (its last length -
        pads[b]), not the padding's too, and the first update is encoded again with them from its key and
        value states (kept until then: no second rounding). So a sequence's offsets do not depend on what it
        was batched with. With `balance`, also K's balancing factors from this prefill's `query` (see
        `balance_factors`), pads None where there is no padding. A no-op once the first update's attention
        has run."""
        first, self._first = self._first, None
        if first is None or (pads is None and not (self.balance and query is not None)):
            return
        ks, vs = first
        B, _, n, _ = ks.shape
        own = torch.ones((B, 1, n, 1), device=ks.device)  # 1 on each sequence's own tokens
        if pads is not None:
            own = (torch.arange(n, device=ks.device)[None, :] >= pads.to(ks.device).long()[:, None]).float()
            own = own.view(B, 1, n, 1)
            count = own.sum(2, keepdim=True).clamp(min=1.0)
            self.mu_k = (ks.float() * own).sum(2, keepdim=True) / count
            self.mu_v = (vs.float() * own).sum(2, keepdim=True) / count
        if self.balance and query is not None:
            self.bal_k = balance_factors(ks.float() - self.mu_k, query.float(), own)
            self.bal_q = (1.0 / self.bal_k).repeat_interleave(query.shape[1] // ks.shape[1], 1)
        k, v = self._prep(ks, vs)
        length = self.length
        self.length = 0  # (the first update sits at 0 in every row: no padding dropped yet)
        try:
            self._write(k, self.keys, self.kfmt)
            self._write(v, self.values, self.vfmt)
        finally:
            self.length = length

    def _take(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """The start of an update: room for its t tokens, the states centered and rotated: (t, k, v)."""
        self._first = None
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[2]
        self._reserve(self.length + t)
        return (t, *self._prep(key_states, value_states))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Encode the new keys/values [B, Hkv, t, D]; returns PolarKV handles for the
        "kvpolar" attention function (which reads the blocks)."""
        t, k, v = self._take(key_states, value_states)
        self._write(k, self.keys, self.kfmt)
        self._write(v, self.values, self.vfmt)
        self.length += t
        self.set_lens(self.length)
        h = PolarKV(self)
        return h, h

    # ---- reads -----------------------------------------------------------------------------

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated, centered K and V as float32 [B, Hkv, length, D] (what the kernel sees)."""
        n = self.length
        if self.backend == "cupy":
            k = gpu_codec.dequantize_cache(self.keys, self.kfmt, torch.float32, n)
            v = (
                self.values[:, :, :n].float()
                if self.vfmt == "f16"
                else gpu_codec.dequantize_cache(self.values, self.vfmt, torch.float32, n)
            )
            return k, v

        def deq(c, fmt):
            if fmt == "f16":
                return c[:, :, :n].float()
            raw = c[:, :, :n].cpu().numpy()
            y = codec.dequantize_blocks(raw.reshape(-1, raw.shape[-1]), fmt)
            return torch.from_numpy(y).reshape(*raw.shape[:3], -1).to(c.device)

        return deq(self.keys, self.kfmt), deq(self.values, self.vfmt)

    def rotate_q(self, q: torch.Tensor) -> torch.Tensor:
        q = q.float()
        if self.bal_q is not None:
            q = q * self.bal_q
        return q @ self.hd if self.rotate else q

    def finish_output(self, o: torch.Tensor) -> torch.Tensor:
        """Output in the rotated, centered V space [B, Hq, Tq, D] -> model space (float32)."""
        if self.rotate:
            o = rotate_blocks(o.float(), self.h64)
        if self.mu_v is not None:
            G = o.shape[1] // self.H
            o = o + self.mu_v.repeat_interleave(G, 1)
        return o

    # ---- CacheLayerMixin API ---------------------------------------------------------------

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def kernel_max_len(self) -> int:
        """The max_len the attention kernel is planned for: the filled length (a plan per step)."""
        return self.length

    def reset(self) -> None:
        self.reset_lengths()
        self._first = None
        if self.offsets == "prefill":
            self.mu_k = self.mu_v = None
            self.bal_k = self.bal_q = None

    def _per_sequence(self, f) -> None:
        """Apply f (a batch-dim selection) to every per-sequence tensor, and take B from it."""
        for name in ("keys", "values", "lens", "pads", "mu_k", "mu_v", "bal_k", "bal_q"):
            x = getattr(self, name)
            if x is not None and (name in ("keys", "values", "lens", "pads") or x.shape[0] == self.B > 1):
                setattr(self, name, f(x))
        self.B = self.keys.shape[0]
        if self.pads is not None:
            self.pads_host = tuple(self.pads.tolist())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._per_sequence(lambda x: x.index_select(0, beam_idx.to(self.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._per_sequence(lambda x: x.repeat_interleave(repeats, 0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._per_sequence(lambda x: x[indices])

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last tokens (assisted decoding rolls back its rejected drafts), as transformers'
        DynamicLayer: -n removes n, 0 nothing, n > 0 (the older form) keeps the first n where there are
        more. The bytes stay; the next update writes over them."""
        tokens_to_remove = int(tokens_to_remove)  # (generate passes a 0-d tensor)
        if tokens_to_remove > 0:
            n = max(self.length - tokens_to_remove, 0)
        else:
            n = min(-tokens_to_remove, self.length)
        if n == 0:
            return
        if self.pads is not None and n > int(self.lens.min()):
            raise ValueError(
                f"crop of {n} tokens reaches into the dropped padding of a sequence "
                f"(tokens per sequence: {self.lens.tolist()})"
            )
        self.length -= n
        if self.is_initialized:
            self.lens -= n  # in place: a static layer's graphs read this tensor


class PolarCache(Cache):
    """A Cache of PolarCacheLayer, one per decoder layer of `config` (or `num_layers`).

    centering: None, "prefill" (per sequence and KV head, the mean of its first update's keys and values
    over its own tokens: a left padding left out), or {layer_idx: (mu_k [Hkv, D], mu_v [Hkv, D])}.
    keep_padding: keep a left padding in the cache (masked steps dequantize it; the module doc).
    balance: with centering="prefill", K balancing (`balance_factors`) from the first prefill's keys and
    queries.
    """

    def __init__(
        self,
        config=None,
        num_layers: int | None = None,
        kfmt: str = "polar",
        vfmt: str = "polar",
        rotate: bool = True,
        centering: str | dict | None = None,
        backend: str = "auto",
        max_kernel_q: int = 8,
        attn_config: gpu_attn.AttnConfig | None = None,
        keep_padding: bool = False,
        balance: bool = False,
    ):
        layers = [
            PolarCacheLayer(
                kfmt, vfmt, rotate, off, backend, max_kernel_q, attn_config, keep_padding, balance
            )
            for off in layer_offsets("PolarCache", config, num_layers, centering)
        ]
        super().__init__(layers=layers)


def layer_offsets(cache: str, config, num_layers: int | None, centering) -> list:
    """Each layer's `offsets` argument of a `cache` (PolarCache, StaticPolarCache) of `num_layers` layers
    (None: the decoder layers of `config`) from its `centering`: None, "prefill" or {layer_idx: (mu_k, mu_v)}.
    ValueError naming what is missing or what was received."""
    if num_layers is None:
        if config is None:
            raise ValueError(f"{cache} needs a model config or num_layers")
        num_layers = config.get_text_config(decoder=True).num_hidden_layers
    if not (centering is None or centering == "prefill" or isinstance(centering, dict)):
        raise ValueError(f"centering must be None, 'prefill' or a dict, got {centering!r}")
    return [centering.get(i) if isinstance(centering, dict) else centering for i in range(num_layers)]


# ----------------------------------------------------------------------------------------------
# Static caches: storage for max_cache_len tokens allocated once, write positions on the device.
# A decode step over them launches the same kernels with the same arguments at every position,
# so it can be captured once in a CUDA graph and replayed (scripts/gpu_decode_bench.py).
#
# Position design: every layer keeps `lens`, an int32 [B] CUDA tensor (valid keys per sequence).
# update() writes the new tokens at lens .. lens + t - 1 (the encoder reads the position from the
# device; the float16 writes scatter at lens + arange(t)) and then adds t to lens in place; the
# polar kernel is planned once for the capacity (its key splits fixed) and reads lens[b] itself,
# so it reads only the filled part: a split whose chunk starts past lens[b] writes neutral
# partials and exits. The float16 cache has no such kernel: SDPA reads all max_cache_len keys
# with a mask built on the device from lens (keys past lens[b] masked).
#
# `length` (host) is the eager bookkeeping (prefill, get_seq_length); a graph replay does not move
# it: whoever replays sets it back with `set_length` (GraphDecoder in gpu_decode_bench does).


def _round_capacity(n: int) -> int:
    if n <= 0:
        raise ValueError(f"max_cache_len must be positive, got {n}")
    return -(-n // 8) * 8  # the kernels need T_max % 8 == 0


def _scatter_positions(cache: torch.Tensor, x: torch.Tensor, lens: torch.Tensor) -> None:
    """cache[b, :, lens[b] + i] = x[b, :, i] for x [B, H, t, ...] (device positions)."""
    B, H, t = x.shape[:3]
    rest = x.shape[3:]
    idx = lens.long()[:, None] + torch.arange(t, device=x.device)[None, :]  # [B, t]
    idx = idx.view(B, 1, t, *([1] * len(rest))).expand(B, H, t, *rest)
    cache.scatter_(2, idx, x.to(cache.dtype))


class StaticPolarCacheLayer(PolarCacheLayer):
    """PolarCacheLayer with K/V blocks allocated once for `max_cache_len` tokens (rounded up to a
    multiple of 8) and written at the device positions `lens` (see above). Decode steps plan the
    kernel for the capacity; prefill steps take PolarCacheLayer's dequantize + SDPA path. The
    attention mask is ignored (causal from lens), but for a left padding at the prefill, which is
    dropped after it as in PolarCacheLayer (`static_prefill_padding`).
    backend "reference" writes polar blocks at the host `length` (numpy codec; not capturable)."""

    def __init__(self, max_cache_len: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_cache_len = _round_capacity(max_cache_len)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        for name in ("keys", "values"):
            old = getattr(self, name)
            shape = (old.shape[0], old.shape[1], self.max_cache_len, *old.shape[3:])
            setattr(self, name, torch.zeros(shape, dtype=old.dtype, device=old.device))

    def _reserve(self, n: int) -> None:
        if n > self.max_cache_len:
            raise ValueError(f"static cache holds {self.max_cache_len} tokens, {n} asked for")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        t, k, v = self._take(key_states, value_states)
        for x, cache, fmt in ((k, self.keys, self.kfmt), (v, self.values, self.vfmt)):
            if fmt == "f16":
                _scatter_positions(cache, x, self.lens)
            elif self.backend == "cupy":
                gpu_codec.encode_into(x.contiguous(), cache, fmt, self.lens)
            else:
                self._write(x, cache, fmt)
        self.lens += t
        self.length += t
        h = PolarKV(self)
        return h, h

    def get_max_length(self) -> int:
        return self.max_cache_len

    def kernel_max_len(self) -> int:
        return self.max_cache_len

    def set_length(self, n: int) -> None:
        """Host and device length := n (after graph replays, or to rewind; a sequence whose padding was
        dropped holds n - pads[b] keys)."""
        self._reserve(n)
        self.length = n
        if self.is_initialized:
            self.set_lens(n)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("static caches keep their batch size")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("static caches keep their batch size")


class StaticKV:
    """What StaticF16CacheLayer.update returns in place of the key and value tensors."""

    __slots__ = ("layer",)

    def __init__(self, layer: StaticF16CacheLayer) -> None:
        self.layer = layer


class StaticF16CacheLayer(LeftPadding, CacheLayerMixin):
    """The float16 baseline of the static caches: K and V [B, Hkv, max_cache_len, D] in the
    model's dtype, written at the device positions `lens`; attention (`static_f16_attention`) is
    SDPA over all max_cache_len keys with a mask from `lens` (the mask transformers passes is
    ignored, but for a left padding at the prefill, which is dropped as in PolarCacheLayer); impl
    "matmul": the same as two batched matmuls
    and a float32 softmax (work spread over the keys, where SDPA's masked kernel spreads over
    query rows and heads only)."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    IMPLS = ("sdpa", "matmul")

    def __init__(self, max_cache_len: int, impl: str = "sdpa"):
        super().__init__()
        if impl not in self.IMPLS:
            raise ValueError(f"impl must be one of {self.IMPLS}, got {impl!r}")
        self.max_cache_len = _round_capacity(max_cache_len)
        self.impl = impl
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        B, H, _, D = key_states.shape
        self.B, self.H, self.D = B, H, D
        shape = (B, H, self.max_cache_len, D)
        self.keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.lens = torch.zeros((B,), dtype=torch.int32, device=self.device)
        self.length = 0
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[2]
        if self.length + t > self.max_cache_len:
            raise ValueError(f"static cache holds {self.max_cache_len} tokens, {self.length + t} asked for")
        _scatter_positions(self.keys, key_states, self.lens)
        _scatter_positions(self.values, value_states, self.lens)
        self.lens += t
        self.length += t
        h = StaticKV(self)
        return h, h

    def set_length(self, n: int) -> None:
        """Host and device length := n (after graph replays, or to rewind; a sequence whose padding was
        dropped holds n - pads[b] keys)."""
        if n > self.max_cache_len:
            raise ValueError(f"static cache holds {self.max_cache_len} tokens, {n} asked for")
        self.length = n
        if self.is_initialized:
            self.set_lens(n)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        self.reset_lengths()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("StaticF16CacheLayer does not support crop")


def static_f16_attention(layer: StaticF16CacheLayer, query: torch.Tensor, scaling: float | None):
    """SDPA of query [B, Hq, Tq, D] over layer's K/V [B, Hkv, T_max, D]: the G = Hq / Hkv query
    heads of a KV head are folded into its query rows (no repeated K/V), row g * Tq + tq sees keys
    j <= lens[b] - Tq + tq. Returns [B, Tq, Hq, D]."""
    B, Hq, Tq, D = query.shape
    H, T = layer.H, layer.max_cache_len
    G = Hq // H
    qf = query.reshape(B, H, G * Tq, D)
    tq = torch.arange(Tq, device=query.device).repeat(G)  # [G * Tq]: the token of each row
    limit = layer.lens.long()[:, None] - Tq + 1 + tq[None, :]  # [B, G * Tq] keys visible
    mask = torch.arange(T, device=query.device)[None, None, :] < limit[:, :, None]
    if layer.impl == "matmul":
        scale = D**-0.5 if scaling is None else scaling
        s = torch.matmul(qf * scale, layer.keys.transpose(2, 3)).float()  # [B, H, G * Tq, T]
        s = s.masked_fill_(~mask[:, None], float("-inf"))
        o = torch.matmul(torch.softmax(s, -1).to(layer.values.dtype), layer.values)
    else:
        o = F.scaled_dot_product_attention(
            qf, layer.keys, layer.values, attn_mask=mask[:, None], scale=scaling
        )
    return o.reshape(B, Hq, Tq, D).transpose(1, 2).contiguous()


class StaticPolarCache(Cache):
    """A Cache of StaticPolarCacheLayer (kfmt/vfmt, centering and balance as PolarCache) or, with kfmt="f16",
    of StaticF16CacheLayer (the float16 baseline; f16_impl "sdpa" or "matmul"), every layer holding
    `max_cache_len` tokens."""

    def __init__(
        self,
        config=None,
        max_cache_len: int = 0,
        num_layers: int | None = None,
        kfmt: str = "polar",
        vfmt: str = "polar",
        rotate: bool = True,
        centering: str | dict | None = None,
        backend: str = "auto",
        attn_config: gpu_attn.AttnConfig | None = None,
        f16_impl: str = "sdpa",
        balance: bool = False,
    ):
        offsets = layer_offsets("StaticPolarCache", config, num_layers, centering)
        _round_capacity(max_cache_len)
        if kfmt == "f16" and vfmt != "f16":
            raise ValueError(f"kfmt 'f16' (the float16 baseline) needs vfmt 'f16', got {vfmt!r}")
        layers = []
        for off in offsets:
            if kfmt == "f16":
                layers.append(StaticF16CacheLayer(max_cache_len, f16_impl))
                continue
            layers.append(
                StaticPolarCacheLayer(
                    max_cache_len, kfmt, vfmt, rotate, off, backend, 8, attn_config, balance=balance
                )
            )
        super().__init__(layers=layers)
        self.capacity = _round_capacity(max_cache_len)

    def set_length(self, n: int) -> None:
        """Host and device length of every layer := n."""
        for layer in self.layers:
            layer.set_length(n)


def head_dim(config) -> int:
    """A transformers config's attention head size: its head_dim, else hidden_size / num_attention_heads."""
    cfg = config.get_text_config(decoder=True)
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def model_offsets(model, gguf_path=None, center_v: bool = False) -> dict:
    """Centering offsets as the patched llama.cpp picks them, for PolarCache(centering=...).

    {layer: (mu_k [Hkv, D], mu_v [Hkv, D])} float32: K from blk.N.attn_k.center in the GGUF
    (written by `kvpolar calibrate`) when `gguf_path` has it, else the layer's k_proj bias;
    V (only with center_v, llama.cpp's LLAMA_KV_CENTER_V=1) from attn_v.center or the v_proj
    bias, zeros otherwise. Layers with no K source are left out (no centering there)."""
    from kvpolar import calibrate

    cfg = model.config.get_text_config(decoder=True)
    D = head_dim(cfg)
    H = cfg.num_key_value_heads
    arch, stored = ("", {})
    if gguf_path is not None:
        arch, stored = calibrate.read_offsets(gguf_path)
    out = {}
    for il, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        ks, vs = stored.get(il, (None, None))

        def pick(stored_vec, proj):
            if stored_vec is not None:
                return torch.from_numpy(calibrate.llama_to_hf_dims(stored_vec, D, arch).copy())
            b = getattr(proj, "bias", None)
            return None if b is None else b.detach().float().cpu()

        mk = pick(ks, attn.k_proj)
        if mk is None:
            continue
        mv = pick(vs, attn.v_proj) if center_v else None
        mv = torch.zeros(H * D) if mv is None else mv
        out[il] = (mk.reshape(H, D), mv.reshape(H, D))
    return out


# ----------------------------------------------------------------------------------------------
# The attention function


def _causal_tail_mask(tq: int, kv: int, device) -> torch.Tensor:
    i = torch.arange(tq, device=device)[:, None]
    j = torch.arange(kv, device=device)[None, :]
    return j <= (kv - tq) + i  # [tq, kv] True = attend


def padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """position_ids [B, T] of a left-padded batch from its attention_mask [B, T] (1 = token, 0 = padding):
    each token counted from its sequence's first one, the padding at 0 (what `generate` passes)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def padded_causal(tq: int, n: int, pads: torch.Tensor | None, device) -> torch.Tensor:
    """[B or 1, 1, tq, n] bool: key j visible to query i of the last tq of n tokens, causal, and each
    sequence's first pads[b] keys masked (pads None: none; a padding's own query row sees nothing)."""
    causal = _causal_tail_mask(tq, n, device)[None, None]
    if pads is None:
        return causal
    return causal & (torch.arange(n, device=device).view(1, 1, 1, -1) >= pads.view(-1, 1, 1, 1))


def _sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scaling, dtype=None) -> torch.Tensor:
    """SDPA of q [B, Hq, Tq, D] over k / v [B, Hkv, T, D], each KV head repeated for its Hq / Hkv query heads,
    all in `dtype` (default q's); mask None: causal (Tq == T)."""
    G = q.shape[1] // k.shape[1]
    dtype = dtype or q.dtype
    q, k, v = q.to(dtype), k.repeat_interleave(G, 1).to(dtype), v.repeat_interleave(G, 1).to(dtype)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
    mask = mask if mask.dtype == torch.bool else mask.to(dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)


# The last value per_mask computed for each name, on which mask: a step's layers get the same mask object
# and (after the same prefill) the same padding, so only the first of them reads its answer on the host.
_MASK_MEMO: dict = {}


def per_mask(name: str, mask: torch.Tensor, key: tuple, compute):
    """compute(), or its value from the last call of this name on the same mask object (same version) with
    the same key (what else the answer depends on)."""
    key = (tuple(mask.shape), mask._version, *key)
    last = _MASK_MEMO.get(name)
    if last is not None and last[0]() is mask and last[1] == key:
        return last[2]
    value = compute()
    _MASK_MEMO[name] = (weakref.ref(mask), key, value)
    return value


def left_padding(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """pads [B] int32 if the bool mask [B, 1 or H, n, n] of a first prefill is causal with each
    sequence's first pads[b] keys masked (a left padding, some pads[b] > 0, every pads[b] < n);
    None for any other mask. The padding's own query rows are not looked at (transformers masks
    them entirely or not at all, by version)."""
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-2:] != (n, n):
        return None
    pads = (~mask[:, 0, -1, :]).sum(-1)  # the last query sees every key but the padding
    want = padded_causal(n, n, pads, mask.device)
    rows = torch.arange(n, device=mask.device).view(1, 1, -1, 1)
    real = rows >= pads.view(-1, 1, 1, 1)  # the query rows of real tokens
    ok = ((mask == want) | ~real).all() & (pads > 0).any() & (pads < n).all()
    return pads.to(torch.int32) if bool(ok) else None


def static_prefill_padding(layer, mask: torch.Tensor | None, tq: int) -> torch.Tensor | None:
    """A static cache's layer computes causal attention from `lens` and ignores masks: its decode steps are
    captured in CUDA graphs, where the host cannot read one. Its prefill (tq == length tokens: never
    captured) reads the mask: causality alone gives None; a left padding gives the pads (the prefill then
    runs with the mask, and the padding is dropped after it, as PolarCacheLayer does); any other mask
    raises (right padding, packed sequences, a sliding window: PolarCache takes those on its masked path)."""
    n = layer.length
    if mask is None or tq != n:
        return None
    keep = mask if mask.shape[-1] == n else mask[..., -n:]
    keep = keep if keep.dtype == torch.bool else keep == 0
    pads = per_mask("left_padding", keep, (n,), lambda: left_padding(keep, n))
    if pads is None and not per_mask(
        "causal", keep, (n,), lambda: bool((keep == padded_causal(n, n, None, keep.device)).all())
    ):
        raise ValueError(
            "static caches take causal attention with at most a left padding, and this prefill's attention "
            "mask masks other keys (right padding, packed sequences, a sliding window?): use PolarCache"
        )
    return pads


def mask_adds_nothing(layer: PolarCacheLayer, mask: torch.Tensor, tq: int) -> bool:
    """Whether the bool mask (over the layer's `length` keys) is exactly what the layer computes without
    one (`visible`: causality, its dropped padding). One host read a decode step, not one a layer."""
    pads = layer.pads_host if layer.pads is not None else None
    return per_mask(
        "adds_nothing", mask, (tq, layer.length, pads), lambda: bool((mask == layer.visible(tq)).all())
    )


def polar_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key,
    value,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
):
    """AttentionInterface function "kvpolar": query [B, Hq, Tq, D]; key/value PolarKV handles
    (any other tensors go to SDPA). Returns ([B, Tq, Hq, D], None)."""
    if isinstance(key, StaticKV):
        layer = key.layer
        pads = static_prefill_padding(layer, attention_mask, query.shape[2])
        if pads is None:
            return static_f16_attention(layer, query, scaling), None
        n = layer.length
        mask = padded_causal(n, n, pads, query.device)
        o = _sdpa_gqa(query, layer.keys[:, :, :n], layer.values[:, :, :n], mask, scaling)
        layer.drop_padding(pads)
        return o.transpose(1, 2).contiguous(), None
    if not isinstance(key, PolarKV):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    layer = key.layer
    Tq, D = query.shape[2:]
    scaling = D**-0.5 if scaling is None else scaling
    n = layer.length
    drop = None  # a left padding to drop after this prefill
    if isinstance(layer, StaticPolarCacheLayer):
        # causal from lens; under CUDA-graph capture transformers builds a mask (is_tracing) that a
        # comparison would read on the host: only the prefill's is read
        drop = static_prefill_padding(layer, attention_mask, Tq)
        attention_mask = None if drop is None else padded_causal(n, n, drop, query.device)
    elif attention_mask is not None and attention_mask.shape[-1] != n:
        attention_mask = attention_mask[..., -n:]
    given = attention_mask
    found = drop  # a left padding at the first prefill
    if (
        layer.pads is None
        and Tq == n
        and given is not None
        and not isinstance(layer, StaticPolarCacheLayer)
        and (not layer.keep_padding or layer._first is not None)
    ):
        found = per_mask("left_padding", given, (n,), lambda: left_padding(given, n))
        drop = None if layer.keep_padding else found
    if layer._first is not None:  # the first prefill ("prefill" centering: offsets, balancing factors)
        layer.recenter_prefill(found, query)  # (and the kept states let go)
    q = layer.rotate_q(query)
    # a mask that adds nothing to what the layer knows (causality; its dropped padding) is left out
    # (a static layer's padded prefill mask, just built, adds its padding)
    if (
        drop is None
        and attention_mask is not None
        and attention_mask.dtype == torch.bool
        and mask_adds_nothing(layer, attention_mask, Tq)
    ):
        attention_mask = None
    if attention_mask is None and layer.backend == "cupy" and Tq <= layer.max_kernel_q:
        o = gpu_attn.attention(
            q.contiguous(),
            layer.keys,
            layer.values,
            layer.lens,
            layer.kfmt,
            layer.vfmt,
            scale=scaling,
            config=layer.attn_config,
            max_len=layer.kernel_max_len(),
        )
    else:
        # Prefill / masked steps: dequantize and SDPA (in the model's dtype on CUDA, so long
        # prompts take the flash kernel; float32 elsewhere).
        k, v = layer.dequantized()
        if attention_mask is not None and layer.pads is not None:
            # a mask of its own over transformers' positions: the keys back there, the dropped ones masked
            k, v = layer.padded(k), layer.padded(v)
            if attention_mask.dtype == torch.bool:
                attention_mask = attention_mask & layer.visible(Tq)
            else:
                attention_mask = attention_mask.masked_fill(~layer.visible(Tq), float("-inf"))
        mask = attention_mask
        if mask is None and layer.pads is not None:
            mask = layer.stored_mask(Tq)
        elif mask is None and Tq != n:
            mask = _causal_tail_mask(Tq, n, q.device)  # (Tq == n: SDPA's is_causal)
        o = _sdpa_gqa(q, k, v, mask, scaling, query.dtype if q.is_cuda else torch.float32)
    if drop is not None:
        layer.drop_padding(drop)
    o = layer.finish_output(o).to(query.dtype)
    return o.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register the "kvpolar" attention (and its mask, SDPA's) with transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, polar_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def enable(model) -> None:
    """Register "kvpolar" and switch `model` to it (its other caches still run through SDPA)."""
    register()
    model.set_attn_implementation(ATTN_NAME)


def first_divergence(a, b) -> int | None:
    """Index of the first differing token of two [B, n] token arrays (None if equal)."""
    a = np.asarray(a.cpu() if hasattr(a, "cpu") else a)
    b = np.asarray(b.cpu() if hasattr(b, "cpu") else b)
    n = min(a.shape[-1], b.shape[-1])
    diff = np.nonzero((a[..., :n] != b[..., :n]).any(0) if a.ndim > 1 else a[:n] != b[:n])[0]
    return int(diff[0]) if len(diff) else None
