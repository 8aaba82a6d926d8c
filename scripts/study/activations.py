"""Real post-RoPE Q, K and V of SmolLM2-135M and Qwen2.5-Coder-1.5B on the SQuAD text.

The GGUF models are loaded with transformers (`from_pretrained(dir, gguf_file=...)`, which
dequantizes the weights to float32) and run on the CPU with torch. Q and K are captured after
RoPE by wrapping the modeling module's `apply_rotary_pos_emb` (what the attention really
used), V from `v_proj`'s output. Sequences are consecutive `seq_len`-token windows of
squad.txt (` = Title = ` + paragraphs, no BOS, as llama-perplexity reads it for these models).

Saved under $KVPOLAR_CACHE/activations/<model>-<n_seq>x<seq_len>/ :
    meta.json                      model facts, pairing of the stored rows, NLL per sequence
    L{ii}.q.npy  (n_seq, n_head,    seq_len, head_dim) float32
    L{ii}.k.npy  (n_seq, n_head_kv, seq_len, head_dim) float32
    L{ii}.v.npy  (n_seq, n_head_kv, seq_len, head_dim) float32
    L{ii}.kbias.npy (n_head_kv, head_dim) float32   (models with a k-projection bias)

Rows are stored in llama.cpp's KV-cache layout: for llama-arch models convert_hf_to_gguf
permutes the Q/K projection rows so that RoPE pairs are (2i, 2i+1) (LLAMA_ROPE_TYPE_NORM);
transformers undoes that permutation when it loads the GGUF, so Q/K (and the k bias) are
permuted back here: cache[2i] = hf[i], cache[2i+1] = hf[i + d/2]. Qwen2 uses NEOX RoPE and
no permutation (pairs (i, i + d/2)). V is never permuted.

    python -m study.activations dump --model smollm2-135m
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from kvpolar.paths import QWEN_GGUF, SMOLLM2_GGUF, SQUAD_TXT, cache_dir, data_file

log = logging.getLogger("study.activations")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    key: str
    gguf: str  # file name under $KVPOLAR_CACHE/data
    arch: str  # transformers model_type
    pairing: str  # RoPE pairing of the rows as llama.cpp stores them ("norm" / "neox")
    fetch: str  # how to get the GGUF


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        "smollm2-135m", SMOLLM2_GGUF, "llama", "norm", "python3 scripts/bootstrap.py data"
    ),
    "qwen2.5-coder-1.5b": ModelSpec(
        "qwen2.5-coder-1.5b", QWEN_GGUF, "qwen2", "neox", "python3 scripts/bootstrap.py data --qwen"
    ),
}


def get_model(key: str) -> ModelSpec:
    try:
        return MODELS[key]
    except KeyError:
        raise ValueError(f"unknown model {key!r}; expected one of {sorted(MODELS)}") from None


def activations_dir(key: str, n_seq: int, seq_len: int) -> Path:
    return cache_dir() / "activations" / f"{key}-{n_seq}x{seq_len}"


def have(key: str, n_seq: int, seq_len: int) -> bool:
    d = activations_dir(key, n_seq, seq_len)
    if not (d / "meta.json").is_file():
        return False
    meta = json.loads((d / "meta.json").read_text())
    return all((d / f"L{i:02d}.v.npy").is_file() for i in range(meta["n_layer"]))


def dump(key: str, n_seq: int = 2, seq_len: int = 1024, force: bool = False) -> Path:
    """Run the model on `n_seq` windows of squad.txt and save Q, K, V of every layer."""
    spec = get_model(key)
    out = activations_dir(key, n_seq, seq_len)
    if have(key, n_seq, seq_len) and not force:
        return out
    import importlib

    import torch
    import transformers

    from kvpolar.calibrate import hf_to_llama_dims, load_gguf_model

    gguf = data_file(spec.gguf)  # raises DataNotFoundError naming the bootstrap command
    text = data_file(SQUAD_TXT).read_text(encoding="utf-8")
    t0 = time.time()
    torch.set_grad_enabled(False)
    model, tok = load_gguf_model(gguf, "float32")
    ids = tok(text[: 12 * n_seq * seq_len], add_special_tokens=False, return_tensors="pt").input_ids[0]
    if len(ids) < n_seq * seq_len:
        raise ValueError(f"squad.txt gave only {len(ids)} tokens, need {n_seq * seq_len}")
    cfg = model.config
    if cfg.model_type != spec.arch:
        raise ValueError(f"{key}: expected model_type {spec.arch}, got {cfg.model_type}")
    log.info("%s: loaded in %.0fs", key, time.time() - t0)

    n_layer = cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    perm = hf_to_llama_dims(hd) if spec.arch == "llama" else np.arange(hd)
    mod = importlib.import_module(type(model).__module__)
    orig = mod.apply_rotary_pos_emb
    cur = {"layer": -1}
    caps: list[dict] = [{} for _ in range(n_layer)]

    def wrapped(q, k, *a, **kw):
        qe, ke = orig(q, k, *a, **kw)
        caps[cur["layer"]]["q"] = qe[0].float().numpy()[..., perm].copy()
        caps[cur["layer"]]["k"] = ke[0].float().numpy()[..., perm].copy()
        return qe, ke

    hooks = []
    layers = model.model.layers
    for i, layer in enumerate(layers):
        attn = layer.self_attn

        def pre(_m, _a, _kw=None, i=i):
            cur["layer"] = i

        def vhook(_m, _inp, outp, i=i):
            caps[i]["v"] = outp[0].float().numpy().reshape(outp.shape[1], -1, hd).transpose(1, 0, 2).copy()

        hooks.append(attn.register_forward_pre_hook(pre))
        hooks.append(attn.v_proj.register_forward_hook(vhook))

    out.mkdir(parents=True, exist_ok=True)
    acc: list[dict[str, list]] = [{"q": [], "k": [], "v": []} for _ in range(n_layer)]
    nll = []
    mod.apply_rotary_pos_emb = wrapped
    try:
        for s in range(n_seq):
            x = ids[s * seq_len : (s + 1) * seq_len][None]
            t1 = time.time()
            res = model(x, labels=x, use_cache=False)
            nll.append(float(res.loss))
            for i in range(n_layer):
                if set(caps[i]) != {"q", "k", "v"}:
                    raise RuntimeError(
                        f"{key}: layer {i} captured {sorted(caps[i])}; the modeling code no longer calls "
                        f"{mod.__name__}.apply_rotary_pos_emb"
                    )
                for n in ("q", "k", "v"):
                    acc[i][n].append(caps[i].pop(n))
            log.info("%s: sequence %d/%d in %.0fs, NLL %.3f", key, s + 1, n_seq, time.time() - t1, nll[-1])
    finally:
        mod.apply_rotary_pos_emb = orig
        for h in hooks:
            h.remove()

    for i in range(n_layer):
        for n in ("q", "k", "v"):
            np.save(out / f"L{i:02d}.{n}.npy", np.stack(acc[i][n]).astype(np.float32))
        bias = getattr(layers[i].self_attn.k_proj, "bias", None)
        if bias is not None:
            b = bias.detach().float().numpy().reshape(-1, hd)[..., perm]
            np.save(out / f"L{i:02d}.kbias.npy", b.astype(np.float32))
    meta = {
        "model": key,
        "gguf": spec.gguf,
        "arch": spec.arch,
        "n_layer": n_layer,
        "n_head": cfg.num_attention_heads,
        "n_head_kv": cfg.num_key_value_heads,
        "head_dim": hd,
        "rope_theta": _rope_theta(cfg),
        "pairing": spec.pairing,
        "layout": "llama.cpp KV-cache rows (llama arch: HF rows permuted to interleaved RoPE pairs)",
        "n_seq": n_seq,
        "seq_len": seq_len,
        "text": "squad.txt, consecutive windows from the start, no BOS",
        "nll": nll,
        "has_kbias": (out / "L00.kbias.npy").is_file(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seconds": round(time.time() - t0, 1),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return out


def _rope_theta(cfg) -> float | None:
    rp = getattr(cfg, "rope_parameters", None) or {}
    return rp.get("rope_theta", getattr(cfg, "rope_theta", None))


def meta(key: str, n_seq: int = 2, seq_len: int = 1024) -> dict:
    return json.loads((activations_dir(key, n_seq, seq_len) / "meta.json").read_text())


def require(key: str, n_seq: int = 2, seq_len: int = 1024) -> dict:
    """meta() of a dump that exists, else SystemExit naming the command that makes it."""
    if not have(key, n_seq, seq_len):
        raise SystemExit(
            f"no activations for {key} at {n_seq} x {seq_len}: python -m study.activations dump --model {key}"
            f" --n-seq {n_seq} --seq-len {seq_len} (from scripts/, needs torch, transformers and accelerate)"
        )
    return meta(key, n_seq, seq_len)


def per_layer(key: str, layers, row, log=None) -> dict:
    """{layer: row(layer)} for `layers`, each timed in `log` (a logging.Logger) when given."""
    rows = {}
    for il in layers:
        t0 = time.time()
        rows[il] = row(il)
        if log:
            log.info("%s layer %d (%.1f s)", key, il, time.time() - t0)
    return rows


def load_layer(key: str, layer: int, n_seq: int = 2, seq_len: int = 1024) -> dict[str, np.ndarray]:
    """{"q", "k", "v"[, "kbias"]} of one layer (arrays as saved, see the module docstring)."""
    d = activations_dir(key, n_seq, seq_len)
    res = {n: np.load(d / f"L{layer:02d}.{n}.npy") for n in ("q", "k", "v")}
    if (d / f"L{layer:02d}.kbias.npy").is_file():
        res["kbias"] = np.load(d / f"L{layer:02d}.kbias.npy")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m study.activations",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd")
    p = sub.add_parser("dump", help="run a model and save its Q, K, V")
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--n-seq", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--force", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if args.cmd != "dump":
        ap.print_help()
        return 0
    print(dump(args.model, args.n_seq, args.seq_len, args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
