"""KV-cache centering offsets: measure them on text and write them into a GGUF model.

A fixed vector mu subtracted from every key moves all logits of a query by the same q.mu, so
softmax is unchanged; subtracted from every value and added back to the attention output it
is exact too. The patched llama.cpp (patches/llama.cpp, "KV-cache centering") removes
`blk.N.attn_k.center` / `blk.N.attn_v.center` (f32, [n_embd_k_gqa] / [n_embd_v_gqa], llama.cpp's
head-major layout) from K after RoPE and from V before the cache write; without them it uses
the k/v projection bias. This module computes the per-layer, per-channel mean of post-RoPE K
and of V over calibration text, with torch + transformers on the CPU (transformers loads the
GGUF and dequantizes it), and writes a copy of the model with those tensors, atomically.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .gguf_io import RawTensor, read_gguf, write_tensors
from .gguf_scan import scan

log = logging.getLogger("kvpolar.calibrate")

SUPPORTED_ARCHS = ("llama", "qwen2")
K_CENTER = "blk.{}.attn_k.center"
V_CENTER = "blk.{}.attn_v.center"


def hf_to_llama_dims(head_dim: int) -> np.ndarray:
    """Index map: llama.cpp dim j of a head holds HF dim perm[j].

    llama.cpp's converter permutes Q/K rows of llama models so that RoPE pairs are (2i, 2i+1);
    transformers undoes it on GGUF load (pairs (i, i + d/2))."""
    half = head_dim // 2
    j = np.arange(head_dim)
    return (j // 2) + (j % 2) * half


def gguf_arch(path: str | os.PathLike) -> str:
    """general.architecture of a GGUF model (the file bounds-checked by gguf_scan.scan)."""
    kv = scan(path).kv.get("general.architecture")
    if kv is None or not isinstance(kv.value, str):
        raise ValueError(f"{path}: not a model GGUF (no general.architecture)")
    return kv.value


def load_gguf_model(path: str | os.PathLike, dtype: str = "float32"):
    """(model in eval mode, tokenizer) from a GGUF file through transformers' GGUF loader
    (weights dequantized to `dtype`, a torch dtype name), on the CPU."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ImportError(
            "loading a GGUF model needs torch and transformers: pip install 'kvpolar[calibrate]'"
        ) from e
    path = Path(path)
    kw = {"gguf_file": path.name}
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), dtype=getattr(torch, dtype), **kw
    )
    return model.eval(), tok


def compute_offsets(
    model_path: str | os.PathLike,
    text: str,
    n_tokens: int = 4096,
    ctx: int = 1024,
    progress: bool = True,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{layer: (k_mean [n_kv_heads*head_dim], v_mean [same]) float32} in llama.cpp layout."""
    model_path = Path(model_path)
    arch = gguf_arch(model_path)
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"calibrate supports architectures {SUPPORTED_ARCHS}, got {arch!r} ({model_path})")
    model, tok = load_gguf_model(model_path, "float32")
    import torch
    import transformers
    from tqdm import tqdm

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    modeling = __import__(type(model).__module__, fromlist=["apply_rotary_pos_emb"])

    ids = tok(text, return_tensors="pt").input_ids[0][:n_tokens]
    if len(ids) < 16:
        raise ValueError(f"calibration text too short: {len(ids)} tokens, need at least 16")
    n_layers = cfg.num_hidden_layers
    k_sum = [None] * n_layers
    v_sum = [None] * n_layers
    count = 0
    current = {"layer": 0}

    orig = modeling.apply_rotary_pos_emb

    def capture(q, k, *a, **kw_):
        q2, k2 = orig(q, k, *a, **kw_)
        il = current["layer"]
        s = k2.double().sum(dim=(0, 2))  # [B, Hkv, T, D] -> [Hkv, D]
        k_sum[il] = s if k_sum[il] is None else k_sum[il] + s
        current["layer"] = il + 1
        return q2, k2

    def v_hook(il):
        def hook(_mod, _inp, out):
            s = out.double().sum(dim=(0, 1))  # [B, T, Hkv*D]
            v_sum[il] = s if v_sum[il] is None else v_sum[il] + s

        return hook

    handles = [
        layer.self_attn.v_proj.register_forward_hook(v_hook(i)) for i, layer in enumerate(model.model.layers)
    ]
    modeling.apply_rotary_pos_emb = capture
    try:
        with torch.no_grad():
            chunks = range(0, len(ids), ctx)
            for start in tqdm(chunks, desc="calibrate", unit="chunk", disable=not progress):
                part = ids[start : start + ctx][None]
                current["layer"] = 0
                model(part, use_cache=False)
                if current["layer"] != n_layers:
                    raise RuntimeError(
                        f"captured RoPE in {current['layer']} of {n_layers} layers: this transformers "
                        f"version ({transformers.__version__}) computes attention differently"
                    )
                count += part.shape[1]
    finally:
        modeling.apply_rotary_pos_emb = orig
        for h in handles:
            h.remove()

    perm = hf_to_llama_dims(head_dim) if arch == "llama" else np.arange(head_dim)
    out = {}
    for il in range(n_layers):
        k = (k_sum[il] / count).numpy()[:, perm].reshape(-1)
        v = (v_sum[il] / count).numpy().reshape(-1)
        out[il] = (k.astype(np.float32), v.astype(np.float32))
    log.info("calibrated %d layers on %d tokens", n_layers, count)
    return out


def write_with_offsets(
    src: str | os.PathLike, dst: str | os.PathLike, offsets, progress: bool = True
) -> None:
    """Copy GGUF `src` to `dst` adding the centering tensors; dst appears only when complete."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"output must be a new path, got the input {src}")
    f = read_gguf(src, decode=False, copy=False)  # tensor data stay in the file mapping
    if f.arch is None:
        raise ValueError(f"{src}: not a model GGUF (no general.architecture)")
    tensors: dict[str, RawTensor | np.ndarray] = dict(f.tensors)
    for il, (k, v) in sorted(offsets.items()):
        for tmpl, arr in ((K_CENTER, k), (V_CENTER, v)):
            name = tmpl.format(il)
            if name in tensors:
                raise ValueError(f"{src} already has {name}: calibrate the original model")
            tensors[name] = np.ascontiguousarray(arr, np.float32)
    write_tensors(dst, tensors, None, f.metadata, f.arch, progress=progress)


def read_offsets(path: str | os.PathLike) -> tuple[str, dict[int, tuple]]:
    """(architecture, {layer: (k_center, v_center)}) as stored in a GGUF (llama.cpp layout,
    float32 [n_embd_k_gqa]; None where a layer has no such tensor)."""
    f = read_gguf(path, decode=False, metadata=False, copy=False)
    if f.arch is None:
        raise ValueError(f"{path}: not a model GGUF (no general.architecture)")
    out: dict[int, list] = {}
    for name, t in f.tensors.items():
        for j, pat in enumerate((K_CENTER, V_CENTER)):
            pre, post = pat.split("{}")
            if name.startswith(pre) and name.endswith(post):
                il = int(name[len(pre) : len(name) - len(post)])
                if t.type.name != "F32":
                    raise ValueError(f"{path}: {name} has type {t.type.name}, expected F32")
                out.setdefault(il, [None, None])[j] = np.array(t.data, dtype=np.float32).reshape(-1)
    return f.arch, {il: (kv[0], kv[1]) for il, kv in out.items()}


def llama_to_hf_dims(x: np.ndarray, head_dim: int, arch: str) -> np.ndarray:
    """Undo hf_to_llama_dims on [..., n_heads*head_dim] (identity for non-llama archs)."""
    if arch != "llama":
        return x
    perm = hf_to_llama_dims(head_dim)
    y = np.empty_like(x).reshape(*x.shape[:-1], -1, head_dim)
    y[..., perm] = x.reshape(*x.shape[:-1], -1, head_dim)
    return y.reshape(x.shape)


def calibrate(src, dst, text: str, n_tokens: int = 4096, ctx: int = 1024, progress: bool = True) -> dict:
    offsets = compute_offsets(src, text, n_tokens=n_tokens, ctx=ctx, progress=progress)
    write_with_offsets(src, dst, offsets, progress=progress)
    norms = {il: (float(np.linalg.norm(k)), float(np.linalg.norm(v))) for il, (k, v) in offsets.items()}
    return {"input": str(src), "output": str(dst), "layers": len(offsets), "tokens": n_tokens, "norms": norms}
