"""torch references of the GPU tests (float32, any device): the dequantized cache and decode
attention, independent of the kernels and of their codebook tables."""

from __future__ import annotations

import torch

from kvpolar import codec
from study import paperb_kernel_ref


def dequantize_any(cache: torch.Tensor, fmt: str, length: int | None = None) -> torch.Tensor:
    """[B, H, T_max, D/64, ts] blocks of any cache format (polar, polar3, paperb) or float16
    [B, H, T_max, D] (fmt "f16") -> float32 [B, H, length, D], decoded on the CPU by the numpy
    references (kvpolar.codec, study.paperb_kernel_ref), so a wrong kernel table shows."""
    length = cache.shape[2] if length is None else length
    if fmt == "f16":
        return cache[:, :, :length].float()
    c = cache[:, :, :length]
    raw = c.reshape(-1, c.shape[-1]).cpu().numpy()
    if fmt == paperb_kernel_ref.NAME:
        y = paperb_kernel_ref.dequantize_blocks(raw)
    else:
        y = codec.dequantize_blocks(raw, fmt)
    return torch.from_numpy(y).to(cache.device).reshape(*c.shape[:3], -1)


def attention_reference(q, k, v, lens, scale: float | None = None) -> torch.Tensor:
    """float32 decode attention: q [B, Hq, Tq, D], k/v float [B, Hkv, T, D], lens [B]; query
    row tq of sequence b sees keys 0 .. lens[b] - Tq + tq (causal tail)."""
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros((B, Hq, Tq, D), dtype=torch.float32, device=q.device)
    for b in range(B):
        n = int(lens[b])
        if n == 0:
            continue
        kb = k[b, :, :n].float().repeat_interleave(Hq // Hkv, 0)
        vb = v[b, :, :n].float().repeat_interleave(Hq // Hkv, 0)
        s = torch.einsum("htd,hkd->htk", q[b].float(), kb) * scale
        pos = n - Tq + torch.arange(Tq, device=q.device)
        mask = torch.arange(n, device=q.device)[None, :] > pos[:, None]
        s = s.masked_fill(mask[None], float("-inf"))
        out[b] = torch.einsum("htk,hkd->htd", torch.softmax(s, -1), vb)
    return out
