#!/usr/bin/env python3
"""Decode at kernel speed: one greedy decode step over a static cache captured in a CUDA graph.

    python scripts/gpu_decode_bench.py bench [--batches 1 16] [--contexts 8192 32768]
        [--caches fp16 polar polar+f16] [--steps 32] [--json out.json] [--md out.md]
    python scripts/gpu_decode_bench.py greedy PATH.gguf [--tokens 32] [--json out.json]
    python scripts/gpu_decode_bench.py padded [--batch 8] [--context 8192] [--steps 16] [--json out.json]

Caches (cupy_kernels.torch_cache.StaticPolarCache, storage allocated once for the capacity):
  fp16       float16 K and V, SDPA over the capacity with a mask built on the device from the
             filled length (the G query heads of a KV head folded into query rows, no repeated K/V)
  polar      polar K + polar V, the split-K kernel planned for the capacity, reading the filled
             length from the device (it reads only the filled keys)
  polar+f16  polar K + float16 V, the same kernel
  polar3, polar+polar3  (not in the default list) polar3 K+V and polar K + polar3 V (3.75 bits: the low-memory
             pair of llama.cpp, without its layer policy), the same kernel
  fp16-mm    (not in the default list) float16 K and V, the same attention as two batched matmuls
             and a float32 softmax: work spread over the keys, where the masked SDPA kernel
             (efficient attention; flash takes no mask) spreads over query rows and heads only
             (B * 2 KV heads blocks at 6 rows), which leaves most of the GPU idle at batch 1

`GraphDecoder` holds the step's input token and position in device buffers; the step runs the
model, takes the argmax and writes it back with position + 1, and every cache layer writes its
new K/V at its device length and adds 1 to it: nothing is read back to the host, so the step is
captured once (after warm-up steps that are then rewound) and replayed.

`bench` builds a model of Qwen2.5-1.5B's configuration (transformers Qwen2Config: hidden 1536,
28 layers, 12/2 heads, head_dim 128, intermediate 8960, vocab 151936) with random weights in
float16, fills each cache with `context` tokens of random K/V (standard normal, written through
the cache's own write path, the polar encoder included) instead of a prefill, and measures:
decode tokens/s of the graph replay (batch x steps / time between two CUDA events around
`steps` replays, after `warmup` replays), of the same step called eagerly (`--eager-steps`), and
peak memory (torch.cuda.max_memory_allocated: weights, cache, graph pool, activations).
Attention precision: PolarCache rotates q in float32, so the kernel runs prec "auto" = "fp32"
(cupy_kernels.attention.AttnConfig) as in the eager cache; `--attn-prec fp16` picks the fp16 one.

`padded` times eager greedy decode steps of a left-padded batch (prompt b has context - pad_b random
tokens, pads spread evenly from 0 to context / 2) with the dynamic caches of `generate`: fp16
(transformers' DynamicCache + SDPA with the padding mask), polar (PolarCache: it drops the padding
after the prefill, decode steps run the kernel on per-sequence lengths) and polar-keep
(PolarCache(keep_padding=True): every masked step dequantizes the cache for SDPA, as before session 35).

`greedy` loads a GGUF model (kvpolar.calibrate.load_gguf_model, as scripts/gpu_generate.py) and
checks, per cache, that the graph replay produces the same greedy tokens as the same static cache
stepped eagerly (exit 1 if not); it also reports the first token where both differ from
model.generate with today's PolarCache (fp16: transformers' own cache), for information.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from pathlib import Path

from kvpolar.atomic import atomic_write_text
from kvpolar.format import QK, get_format

log = logging.getLogger("gpu_decode_bench")

KINDS = {
    "fp16": ("f16", "f16"),
    "polar": ("polar", "polar"),
    "polar+f16": ("polar", "f16"),
    "polar3": ("polar3", "polar3"),
    "polar+polar3": ("polar", "polar3"),
    "fp16-mm": ("f16", "f16"),
}
KIND_LABELS = {
    "fp16": "fp16 + SDPA",
    "polar": "polar K+V",
    "polar+f16": "polar K + fp16 V",
    "polar3": "polar3 K+V",
    "polar+polar3": "polar K + polar3 V",
    "fp16-mm": "fp16 + matmul",
}
DEFAULT_KINDS = ["fp16", "polar", "polar+f16"]
QWEN15B = dict(
    hidden_size=1536,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    head_dim=128,
    intermediate_size=8960,
    vocab_size=151936,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
)
CAPACITY_STEP = 256
PADDED_KINDS = ("fp16", "polar", "polar-keep")  # `padded`: the dynamic caches of generate()


# ----------------------------------------------------------------------------------------------
# Pure Python: sizes, arguments, the table


def capacity(context: int, steps: int, step: int = CAPACITY_STEP) -> int:
    """Cache capacity for `context` filled tokens and `steps` decode steps (every step, warm-up
    included, writes one token), rounded up to a multiple of `step`."""
    if context < 0 or steps < 0:
        raise ValueError(f"context and steps must be >= 0, got {context}, {steps}")
    n = context + steps
    return max(step, -(-n // step) * step)


def kv_bytes_per_token(kind: str, layers: int, hkv: int, head_dim: int) -> int:
    """K + V bytes one token takes in the cache `kind`, all layers and KV heads."""
    if kind not in KINDS:
        raise ValueError(f"cache must be one of {tuple(KINDS)}, got {kind!r}")
    if head_dim % QK:
        raise ValueError(f"head_dim must be a multiple of {QK}, got {head_dim}")

    def one(fmt: str) -> int:
        return head_dim * 2 if fmt == "f16" else head_dim // QK * get_format(fmt).type_size

    k, v = KINDS[kind]
    return layers * hkv * (one(k) + one(v))


def markdown_report(res: dict) -> str:
    """The bench result as markdown: a heading naming the GPU, the model and the command, then the table."""
    dev = res.get("device", {})
    head = [
        f"# Greedy decode tokens/s with CUDA-graph replay on {dev.get('name', 'unknown GPU')}",
        "",
        f"{res.get('model', '')}; cache filled with {res.get('fill', '')}. torch {dev.get('torch', '?')}, "
        f"transformers {dev.get('transformers', '?')}, cupy {dev.get('cupy', '?')}.",
        "",
        "Generated by `python " + " ".join(res.get("argv", [])) + "`.",
        "",
    ]
    return "\n".join(head) + "\n" + markdown_table(res.get("rows", []))


def markdown_table(rows: list[dict]) -> str:
    """The bench rows as a markdown table (speed-up against the fp16 row of the same batch and
    context when there is one)."""
    base = {(r["batch"], r["context"]): r for r in rows if r["cache"] == "fp16" and r.get("tok_per_s")}
    lines = [
        "| batch | context | cache | tok/s (graph) | ms / step | vs fp16 | tok/s (eager) | peak GiB "
        "| cache GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        label = KIND_LABELS.get(r["cache"], r["cache"])
        if r.get("error"):
            lines.append(f"| {r['batch']} | {r['context']} | {label} | failed: {r['error'][:80]} ||||||")
            continue
        b = base.get((r["batch"], r["context"]))
        vs = f"{r['tok_per_s'] / b['tok_per_s']:.2f}x" if b else "-"
        eager = f"{r['eager_tok_per_s']:.1f}" if r.get("eager_tok_per_s") else "-"
        lines.append(
            f"| {r['batch']} | {r['context']} | {label} | {r['tok_per_s']:.1f} | {r['ms_per_step']:.3f} | "
            f"{vs} | {eager} | {r['peak_gib']:.2f} | {r['cache_gib']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _positive(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _nonneg(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", type=Path, help="write the results to this file")
    common.add_argument("--verbose", action="store_true")
    common.add_argument("--caches", nargs="+", choices=list(KINDS), default=DEFAULT_KINDS)
    common.add_argument("--attn-prec", choices=["auto", "fp32", "fp16"], default="auto")
    common.add_argument("--seed", type=int, default=0)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    b = sub.add_parser(
        "bench", help="decode tokens/s and peak memory, random Qwen2.5-1.5B shape", parents=[common]
    )
    b.add_argument("--batches", nargs="+", type=_positive, default=[1, 16])
    b.add_argument("--contexts", nargs="+", type=_positive, default=[8192, 32768])
    b.add_argument("--steps", type=_positive, default=32, help="timed graph replays")
    b.add_argument("--warmup", type=_nonneg, default=4, help="untimed graph replays before them")
    b.add_argument("--eager-steps", type=_nonneg, default=4, help="timed eager steps (0: none)")
    b.add_argument("--layers", type=_positive, default=QWEN15B["num_hidden_layers"])
    b.add_argument("--md", type=Path, help="write the markdown table to this file")
    b.add_argument(
        "--profile", action="store_true", help="profile one eager step per row (torch.profiler, GPU kernels)"
    )
    pd = sub.add_parser("padded", help="eager decode of a left-padded batch, dynamic caches (random weights)")
    pd.add_argument("--json", type=Path, help="write the results to this file")
    pd.add_argument("--verbose", action="store_true")
    pd.add_argument("--seed", type=int, default=0)
    pd.add_argument("--caches", nargs="+", choices=PADDED_KINDS, default=list(PADDED_KINDS))
    pd.add_argument("--batch", type=_positive, default=8)
    pd.add_argument("--context", type=_positive, default=8192, help="the padded prompt length")
    pd.add_argument("--steps", type=_positive, default=16, help="timed eager decode steps")
    pd.add_argument("--warmup", type=_nonneg, default=2, help="untimed decode steps before them")
    pd.add_argument("--layers", type=_positive, default=QWEN15B["num_hidden_layers"])
    g = sub.add_parser("greedy", help="graph replay == eager steps, real weights (GGUF)", parents=[common])
    g.add_argument("path", type=Path)
    g.add_argument("--tokens", type=_positive, default=32, help="greedy tokens compared (N)")
    g.add_argument("--no-center", action="store_true", help="no centering (default: model_offsets)")
    return ap


def parse_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.cmd is None:
        ap.print_help()
    return args


# ----------------------------------------------------------------------------------------------
# The decode step and its graph


class GraphDecoder:
    """Greedy decode steps of `model` over a static cache (StaticPolarCache).

    first_ids: int64 [B] on the model's device, the token fed at host position `position` (the
    cache holds positions 0 .. position - 1). `step()` returns the step's logits [B, vocab]; the
    next input is then `ids[:, 0]`. After `capture()`, steps replay the graph (the logits tensor
    is then the same static buffer every step: clone it to keep it). A left-padded batch: `positions`
    [B] are the sequences' own token positions (position - their padding), the cache dropped the padding
    at its prefill (`prefill(..., attention_mask)`)."""

    def __init__(self, model, cache, first_ids, position: int, positions=None):
        import torch

        self.model, self.cache = model, cache
        B = first_ids.shape[0]
        self.ids = first_ids.reshape(B, 1).to(torch.long).clone()
        if positions is None:
            self.pos = torch.full((B, 1), position, dtype=torch.long, device=first_ids.device)
        else:
            self.pos = positions.reshape(B, 1).to(torch.long).clone()
        self.position = position
        self.graph = None
        self.logits = None

    def _step(self):
        out = self.model(
            input_ids=self.ids,
            position_ids=self.pos,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1]
        self.ids.copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)
        return logits

    def _check_room(self, n: int) -> None:
        cap = self.cache.capacity
        if self.position + n > cap:
            raise ValueError(
                f"the cache holds {cap} tokens: no room for {n} steps at position {self.position}"
            )

    def step(self):
        self._check_room(1)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.logits = self._step()
        self.position += 1
        return self.logits

    def capture(self, warmup: int = 2) -> None:
        """Capture one step (after `warmup` eager steps on a side stream, which are rewound:
        cache lengths, input and position back to where they were)."""
        import torch

        self._check_room(max(warmup, 1))
        ids0, pos0, n0 = self.ids.clone(), self.pos.clone(), self.position
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        self._rewind(ids0, pos0, n0)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self.logits = self._step()
        torch.cuda.synchronize()
        self._rewind(ids0, pos0, n0)  # capture ran update() on the host (length += 1), no kernel
        self.graph = g

    def _rewind(self, ids0, pos0, n0: int) -> None:
        self.ids.copy_(ids0)
        self.pos.copy_(pos0)
        self.position = n0
        self.cache.set_length(n0)

    def sync_cache(self) -> None:
        """Set the caches' host lengths to the position (graph replays do not move them)."""
        self.cache.set_length(self.position)

    def release(self) -> None:
        if self.graph is not None:
            self.graph.reset()
            self.graph = None
        self.logits = None


def prefill(model, cache, ids, attention_mask=None):
    """Run the prompt ids [B, P] into the cache (attention_mask [B, P]: a left padding, each sequence's
    positions counted from its first token); returns the last position's logits [B, vocab]."""
    from cupy_kernels import torch_cache as tc

    kw = {}
    if attention_mask is not None:
        kw = dict(attention_mask=attention_mask, position_ids=tc.padded_positions(attention_mask))
    return model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **kw).logits[:, -1]


def greedy_tokens(model, cache, ids, n: int, graph: bool, attention_mask=None) -> list[list[int]]:
    """n greedy tokens after the prompt ids [B, P] (the first from the prefill; attention_mask: a left
    padding), the steps eager or replayed from a graph. Returns [B][n] token ids."""
    import torch

    first = prefill(model, cache, ids, attention_mask).argmax(-1)
    out = [first]
    if n > 1:
        positions = None if attention_mask is None else attention_mask.sum(-1)
        dec = GraphDecoder(model, cache, first, ids.shape[1], positions)
        if graph:
            dec.capture()
        for _ in range(n - 1):
            dec.step()
            out.append(dec.ids[:, 0].clone())
        dec.sync_cache()
        dec.release()
    return torch.stack(out, 1).tolist()


def make_cache(
    model, kind: str, max_len: int, centering=None, attn_prec: str = "auto", batch: int = 1, balance=False
):
    """The static cache of `kind` (centering and balance as StaticPolarCache takes them); attn_prec other than
    "auto": the kernel shape plan would take for a decode step of `batch` sequences, with that precision."""
    import dataclasses

    from cupy_kernels import attention as gpu_attn
    from cupy_kernels import torch_cache as tc

    kfmt, vfmt = KINDS[kind]
    cfg = None
    if attn_prec != "auto":
        text = model.config.get_text_config(decoder=True)
        H = (text.num_attention_heads, text.num_key_value_heads)
        cfg = gpu_attn.call_config(vfmt, batch, *H, 1, tc.head_dim(model.config))
        cfg = dataclasses.replace(cfg, prec=attn_prec)
    f16_impl = "matmul" if kind == "fp16-mm" else "sdpa"
    return tc.StaticPolarCache(
        model.config,
        max_len,
        kfmt=kfmt,
        vfmt=vfmt,
        centering=centering,
        attn_config=cfg,
        f16_impl=f16_impl,
        balance=balance,
    )


# ----------------------------------------------------------------------------------------------
# bench


def qwen_like(layers: int, device: str = "cuda"):
    """A random-weight float16 Qwen2ForCausalLM of Qwen2.5-1.5B's shape (`layers` layers)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from cupy_kernels import torch_cache as tc

    torch.manual_seed(0)
    cfg = Qwen2Config(**{**QWEN15B, "num_hidden_layers": layers}, max_position_embeddings=131072)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    model = model.to(torch.float16).eval()
    tc.enable(model)
    return model


def fill_random(cache, model, batch: int, context: int, seed: int, chunk: int = 2048) -> None:
    """Write `context` tokens of random standard-normal K/V into every layer of the cache
    through its update() (the polar encoder for polar layers)."""
    import torch

    cfg = model.config
    H, D = cfg.num_key_value_heads, cfg.head_dim
    dev = next(model.parameters()).device
    g = torch.Generator(dev).manual_seed(seed)
    for layer in cache.layers:
        for t0 in range(0, context, chunk):
            t = min(chunk, context - t0)
            k = torch.randn((batch, H, t, D), generator=g, device=dev, dtype=torch.float16)
            v = torch.randn((batch, H, t, D), generator=g, device=dev, dtype=torch.float16)
            layer.update(k, v)


def bench_one(model, kind: str, batch: int, context: int, args) -> dict:
    import torch

    cfg = model.config
    row = {"cache": kind, "batch": batch, "context": context}
    cap = capacity(context, max(1 + args.eager_steps, 2, args.warmup + args.steps))
    row["capacity"] = cap
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    dec = cache = None
    try:
        cache = make_cache(model, kind, cap, attn_prec=args.attn_prec, batch=batch)
        fill_random(cache, model, batch, context, args.seed)
        row["cache_gib"] = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) / 2**30
        g = torch.Generator().manual_seed(args.seed + 1)
        first = torch.randint(0, cfg.vocab_size, (batch,), generator=g).cuda()
        dec = GraphDecoder(model, cache, first, context)
        if args.eager_steps:
            dec.step()  # compiles the kernel variants, fills the codebook tables
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.eager_steps):
                dec.step()
            torch.cuda.synchronize()
            row["eager_tok_per_s"] = batch * args.eager_steps / (time.perf_counter() - t0)
            dec._rewind(first.reshape(batch, 1), torch.full_like(dec.pos, context), context)
        if args.profile:
            try:
                row["profile"] = profile_step(dec)
            except Exception as e:  # the profiler is optional; the row's timings are not
                row["profile_error"] = f"{type(e).__name__}: {e}"
            dec._rewind(first.reshape(batch, 1), torch.full_like(dec.pos, context), context)
        dec.capture()
        for _ in range(args.warmup):
            dec.step()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        e0.record()
        for _ in range(args.steps):
            dec.step()
        e1.record()
        host = time.perf_counter() - t0
        torch.cuda.synchronize()
        ms = e0.elapsed_time(e1) / args.steps
        row.update(
            ms_per_step=ms,
            tok_per_s=batch * 1000.0 / ms,
            host_enqueue_ms_per_step=host * 1000.0 / args.steps,
            peak_gib=torch.cuda.max_memory_allocated() / 2**30,
            kv_bytes_per_token=kv_bytes_per_token(
                kind, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
            ),
        )
        if not all(torch.isfinite(dec.logits.float()).all(1).tolist()):
            row["note"] = "non-finite logits (random weights)"
    except Exception as e:  # one failed configuration (out of memory, ...) does not stop the rest
        log.warning("%s B=%d T=%d failed: %s", kind, batch, context, e)
        row["error"] = f"{type(e).__name__}: {e}"
    finally:
        if dec is not None:
            dec.release()
        del dec, cache
        gc.collect()
        torch.cuda.empty_cache()
    return row


def profile_step(dec: GraphDecoder, top: int = 12) -> str:
    """GPU kernel times of one eager step (the kernels a replay runs), torch.profiler's table."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    dec.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=top, max_name_column_width=60)
    print(table, flush=True)
    return table


def device_info() -> dict:
    import torch
    import transformers

    p = torch.cuda.get_device_properties(0)
    info = {"name": p.name, "sm_count": p.multi_processor_count, "torch": torch.__version__}
    info["transformers"] = transformers.__version__
    try:
        import cupy

        info["cupy"] = cupy.__version__
    except ImportError:
        pass
    return info


def cmd_bench(args) -> int:
    import torch

    model = qwen_like(args.layers)
    weights = sum(p.nbytes for p in model.parameters())
    res = {
        "what": "greedy decode steps, CUDA-graph replay, static caches (scripts/gpu_decode_bench.py)",
        "model": f"random-weight Qwen2ForCausalLM, Qwen2.5-1.5B shape, {args.layers} layers, float16",
        "fill": "random standard-normal K/V written through each cache's update() (no prefill)",
        "device": device_info(),
        "argv": sys.argv,
        "weights_gib": weights / 2**30,
        "rows": [],
    }
    print(f"{res['model']}; weights {weights / 2**30:.2f} GiB; {res['device']['name']}", flush=True)
    for batch in args.batches:
        for context in args.contexts:
            for kind in args.caches:
                r = bench_one(model, kind, batch, context, args)
                res["rows"].append(r)
                if r.get("error"):
                    print(f"B={batch} T={context} {kind}: FAILED {r['error']}", flush=True)
                else:
                    print(
                        f"B={batch:<3} T={context:<6} {KIND_LABELS[kind]:<17} {r['tok_per_s']:9.1f} tok/s "
                        f"({r['ms_per_step']:.3f} ms/step, eager {r.get('eager_tok_per_s', 0):.1f} tok/s), "
                        f"peak {r['peak_gib']:.2f} GiB, cache {r['cache_gib']:.3f} GiB",
                        flush=True,
                    )
                write_results(res, args)  # after every row: a run cut short keeps what it measured
    del model
    torch.cuda.empty_cache()
    print(markdown_table(res["rows"]))
    return 1 if any(r.get("error") for r in res["rows"]) else 0


def write_results(res: dict, args) -> None:
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=1) + "\n", mkdir=True)
    if getattr(args, "md", None):  # (bench only)
        atomic_write_text(args.md, markdown_report(res), mkdir=True)


# ----------------------------------------------------------------------------------------------
# padded


def left_pads(batch: int, context: int) -> list[int]:
    """Pads of a left-padded batch: spread evenly from 0 (row 0) to context // 2 (the last row)."""
    return [round(b * (context // 2) / max(batch - 1, 1)) for b in range(batch)]


def padded_one(model, kind: str, ids, am, args) -> dict:
    """Prefill the left-padded ids [B, P] (mask am) into a fresh cache of `kind`, then greedy
    eager decode steps: `warmup` untimed, `steps` timed."""
    import torch
    from transformers import DynamicCache

    from cupy_kernels import torch_cache as tc

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if kind == "fp16":
        cache = DynamicCache(config=model.config)
    else:
        cache = tc.PolarCache(model.config, keep_padding=kind == "polar-keep")
    B = ids.shape[0]
    pos = tc.padded_positions(am)
    tokens = []
    with torch.no_grad():
        kw = dict(past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = (
            model(input_ids=ids, attention_mask=am, position_ids=pos, **kw)
            .logits[:, -1]
            .argmax(-1, keepdim=True)
        )
        dt = 0.0
        for s in range(args.warmup + args.steps):
            tokens.append(nxt[:, 0].tolist())
            am = torch.cat([am, torch.ones((B, 1), dtype=am.dtype, device=am.device)], 1)
            p = pos[:, -1:] + 1
            pos = torch.cat([pos, p], 1)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = model(input_ids=nxt, attention_mask=am, position_ids=p, **kw).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            if s >= args.warmup:
                dt += time.perf_counter() - t0
    row = {
        "cache": kind,
        "batch": B,
        "context": ids.shape[1],
        "steps": args.steps,
        "tok_per_s": B * args.steps / dt,
        "ms_per_step": 1e3 * dt / args.steps,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "tokens": [list(t) for t in zip(*tokens, strict=True)],
    }
    if kind != "fp16":
        layer = cache.layers[0]
        row["dropped_padding"] = layer.pads.tolist() if layer.pads is not None else None
    del cache
    return row


def cmd_padded(args) -> int:
    import torch

    model = qwen_like(args.layers)
    pads = left_pads(args.batch, args.context)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, QWEN15B["vocab_size"], (args.batch, args.context), generator=g).cuda()
    am = torch.ones_like(ids)
    for b, p in enumerate(pads):
        am[b, :p] = 0
    res = {
        "what": "eager greedy decode steps, left-padded batch, dynamic caches (gpu_decode_bench.py padded)",
        "model": f"random-weight Qwen2ForCausalLM, Qwen2.5-1.5B shape, {args.layers} layers, float16",
        "pads": pads,
        "device": device_info(),
        "argv": sys.argv,
        "rows": [],
    }
    print(f"{res['model']}; {res['device']['name']}; B={args.batch}, padded to {args.context}, pads {pads}")
    for kind in args.caches:
        try:
            r = padded_one(model, kind, ids, am, args)
        except Exception as e:  # a row that cannot run is reported, the others still run
            r = {"cache": kind, "error": f"{type(e).__name__}: {e}"}
        res["rows"].append(r)
        if r.get("error"):
            print(f"{kind}: FAILED {r['error']}", flush=True)
        else:
            dropped = (
                f", padding dropped: {r['dropped_padding'] is not None}" if "dropped_padding" in r else ""
            )
            print(
                f"{kind:<11} {r['tok_per_s']:9.1f} tok/s ({r['ms_per_step']:.2f} ms/step), "
                f"peak {r['peak_gib']:.2f} GiB{dropped}",
                flush=True,
            )
        write_results(res, args)
    by = {r["cache"]: r for r in res["rows"] if not r.get("error")}
    if "polar" in by and "polar-keep" in by:  # the same bytes through two attention paths
        same = [
            first_divergence(a, b)
            for a, b in zip(by["polar"]["tokens"], by["polar-keep"]["tokens"], strict=True)
        ]
        res["polar_vs_keep_first_divergence"] = same
        print(f"polar vs polar-keep, first differing step per row: {same}")
        write_results(res, args)
    return 1 if any(r.get("error") for r in res["rows"]) else 0


# ----------------------------------------------------------------------------------------------
# greedy


def first_divergence(a: list[int], b: list[int]) -> int | None:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return None if len(a) == len(b) else n


def cmd_greedy(args) -> int:
    import torch

    import gpu_generate
    from cupy_kernels import torch_cache as tc

    if not args.path.is_file():
        raise SystemExit(f"no such GGUF file: {args.path}")
    model, tok = gpu_generate.load_gguf(args.path)
    tc.enable(model)
    offsets = None if args.no_center else (tc.model_offsets(model, args.path) or None)
    ids = tok(gpu_generate.PROMPT, return_tensors="pt").input_ids.cuda()
    n = args.tokens
    cap = capacity(ids.shape[1], n + 4)
    gpu_generate.run(model, ids, 4)  # warm-up (cuBLAS, SDPA)
    res = {
        "model": args.path.name,
        "device": device_info(),
        "argv": sys.argv,
        "prompt_tokens": ids.shape[1],
        "tokens": n,
        "centering": f"{len(offsets)} layers" if offsets else "none",
        "caches": {},
    }
    ok = True
    for kind in args.caches:
        kfmt, vfmt = KINDS[kind]
        eager = greedy_tokens(model, make_cache(model, kind, cap, offsets, args.attn_prec), ids, n, False)[0]
        graph = greedy_tokens(model, make_cache(model, kind, cap, offsets, args.attn_prec), ids, n, True)[0]
        if kfmt == "f16":
            ref_cache = None
        else:
            ref_cache = tc.PolarCache(model.config, kfmt=kfmt, vfmt=vfmt, centering=offsets)
        gen, _ = gpu_generate.run(model, ids, n, ref_cache)
        gen = gen[0].tolist()
        same = graph == eager
        ok &= same
        res["caches"][kind] = {
            "graph": graph,
            "eager_static": eager,
            "generate": gen,
            "graph_equals_eager": same,
            "first_divergence_graph_vs_eager": first_divergence(graph, eager),
            "first_divergence_graph_vs_generate": first_divergence(graph, gen),
            "text_graph": tok.decode(graph),
        }
        print(
            f"{KIND_LABELS[kind]}: graph vs eager static cache, {n} tokens: {'SAME' if same else 'DIFFERENT'}"
            f" (first difference {first_divergence(graph, eager)}); vs model.generate"
            f" ({'PolarCache' if ref_cache is not None else 'its own fp16 cache'}): first difference"
            f" {first_divergence(graph, gen)}",
            flush=True,
        )
        torch.cuda.empty_cache()
    for kind, r in res["caches"].items():
        print(f"--- {kind} (graph)\n{r['text_graph']}")
    res["ok"] = ok
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=1) + "\n", mkdir=True)
    print("greedy check:", "PASS" if ok else "FAIL (graph replay differs from the eager steps)")
    return 0 if ok else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cmd is None:
        return 0
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    return {"bench": cmd_bench, "padded": cmd_padded, "greedy": cmd_greedy}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
