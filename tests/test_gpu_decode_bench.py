"""scripts/gpu_decode_bench.py and the static caches of cupy_kernels.torch_cache.

Pure Python (sizes, arguments, the table) runs everywhere; the CPU tests with torch check the
static caches' device-position writes, the folded float16 attention and the eager decode loop
against the dynamic caches (backend "reference"); the GPU test (skipped without CuPy and CUDA)
checks that the CUDA-graph replay of a decode step computes what the eager step computes, for
the float16, polar K+V and polar K + fp16 V static caches, on a tiny random Llama.
"""

from __future__ import annotations

import dataclasses

import pytest

import gpu_decode_bench as gdb
import gpu_generate
from kvpolar.format import get_format

# ---- pure Python -------------------------------------------------------------------------------


def test_padded_arguments_and_pads():
    args = gdb.parse_args(["padded", "--batch", "3", "--context", "64", "--caches", "fp16", "polar"])
    assert (args.cmd, args.batch, args.context, args.caches, args.steps) == (
        "padded",
        3,
        64,
        ["fp16", "polar"],
        16,
    )
    assert gdb.left_pads(3, 64) == [0, 16, 32] and gdb.left_pads(1, 64) == [0]
    with pytest.raises(SystemExit):
        gdb.parse_args(["padded", "--caches", "polar3"])


def test_capacity():
    assert gdb.capacity(8192, 36) == 8448
    assert gdb.capacity(32768, 36) == 33024
    assert gdb.capacity(0, 0) == 256
    assert gdb.capacity(256, 0) == 256
    assert gdb.capacity(257, 0) == 512
    assert gdb.capacity(30, 33, step=8) == 64
    with pytest.raises(ValueError, match=">= 0"):
        gdb.capacity(-1, 4)


def test_kv_bytes_per_token():
    ts = get_format("polar").type_size
    assert gdb.kv_bytes_per_token("fp16", 28, 2, 128) == 28 * 2 * 2 * 256
    assert gdb.kv_bytes_per_token("polar", 28, 2, 128) == 28 * 2 * 2 * 2 * ts
    assert gdb.kv_bytes_per_token("polar+f16", 28, 2, 128) == 28 * 2 * (2 * ts + 256)
    t3 = get_format("polar3").type_size
    assert gdb.kv_bytes_per_token("polar3", 28, 2, 128) == 28 * 2 * 2 * 2 * t3
    assert gdb.kv_bytes_per_token("polar+polar3", 28, 2, 128) == 28 * 2 * 2 * (ts + t3)
    with pytest.raises(ValueError, match="cache must be one of"):
        gdb.kv_bytes_per_token("q8_0", 28, 2, 128)
    with pytest.raises(ValueError, match="multiple of 64"):
        gdb.kv_bytes_per_token("polar", 28, 2, 96)


def test_parse_args(tmp_path, capsys):
    a = gdb.parse_args(["bench"])
    assert (a.batches, a.contexts, a.caches) == ([1, 16], [8192, 32768], ["fp16", "polar", "polar+f16"])
    assert (a.steps, a.warmup, a.eager_steps, a.layers, a.attn_prec) == (32, 4, 4, 28, "auto")
    a = gdb.parse_args(
        ["bench", "--batches", "2", "--contexts", "512", "--caches", "polar", "--md", str(tmp_path / "t.md")]
    )
    assert (a.batches, a.contexts, a.caches, a.md) == ([2], [512], ["polar"], tmp_path / "t.md")
    a = gdb.parse_args(["greedy", "m.gguf", "--tokens", "8", "--no-center"])
    assert (a.cmd, a.path.name, a.tokens, a.no_center) == ("greedy", "m.gguf", 8, True)
    assert gdb.parse_args([]).cmd is None
    assert "bench" in capsys.readouterr().out
    for bad in (["bench", "--batches", "0"], ["bench", "--caches", "q8_0"], ["bench", "--warmup", "-1"]):
        with pytest.raises(SystemExit):
            gdb.parse_args(bad)


def test_markdown_table():
    rows = [
        {"cache": "fp16", "batch": 1, "context": 8192, "tok_per_s": 100.0, "ms_per_step": 10.0,
         "eager_tok_per_s": 20.0, "peak_gib": 4.0, "cache_gib": 0.5},
        {"cache": "polar", "batch": 1, "context": 8192, "tok_per_s": 150.0, "ms_per_step": 6.667,
         "peak_gib": 3.6, "cache_gib": 0.13},
        {"cache": "polar+f16", "batch": 16, "context": 8192, "error": "OutOfMemoryError: no"},
    ]  # fmt: skip
    t = gdb.markdown_table(rows).splitlines()
    assert t[0].startswith("| batch | context | cache | tok/s (graph)")
    assert t[2] == "| 1 | 8192 | fp16 + SDPA | 100.0 | 10.000 | 1.00x | 20.0 | 4.00 | 0.500 |"
    assert t[3] == "| 1 | 8192 | polar K+V | 150.0 | 6.667 | 1.50x | - | 3.60 | 0.130 |"
    assert "failed: OutOfMemoryError" in t[4] and t[4].count("|") == t[2].count("|")


def test_write_results(tmp_path):
    import argparse
    import json

    rows = [{"cache": "polar", "batch": 1, "context": 8, "error": "RuntimeError: x"}]
    args = argparse.Namespace(json=tmp_path / "a" / "r.json", md=tmp_path / "r.md")
    res = {"rows": rows, "device": {"name": "GPU X"}, "argv": ["scripts/gpu_decode_bench.py", "bench"]}
    gdb.write_results(res, args)
    assert json.loads(args.json.read_text())["rows"] == rows
    md = args.md.read_text()
    assert md.startswith("# Greedy decode tokens/s with CUDA-graph replay on GPU X")
    assert "`python scripts/gpu_decode_bench.py bench`" in md and md.endswith(gdb.markdown_table(rows))
    gdb.write_results(
        {"rows": rows}, argparse.Namespace(json=None, md=None)
    )  # nothing asked, nothing written


def test_first_divergence():
    assert gdb.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert gdb.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert gdb.first_divergence([1, 2], [1, 2, 3]) == 2


# ---- torch on the CPU --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def th():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return torch


@pytest.mark.parametrize("impl", ["sdpa", "matmul"])
def test_static_f16_attention_matches_sdpa(th, impl):
    torch = th
    from cupy_kernels import torch_cache as tc

    g = torch.Generator().manual_seed(0)
    layer = tc.StaticF16CacheLayer(37, impl)
    assert layer.max_cache_len == 40
    ks = [torch.randn(2, 2, t, 64, generator=g) for t in (7, 3, 1)]
    vs = [torch.randn(2, 2, t, 64, generator=g) for t in (7, 3, 1)]
    for n, (k, v) in enumerate(zip(ks, vs, strict=True)):
        h, _ = layer.update(k, v)
        Tq = k.shape[2]
        q = torch.randn(2, 4, Tq, 64, generator=g)
        kk, vv = torch.cat(ks[: n + 1], 2), torch.cat(vs[: n + 1], 2)
        L = kk.shape[2]
        assert layer.get_seq_length() == L and layer.lens.tolist() == [L, L]
        assert torch.equal(layer.keys[:, :, :L], kk) and not layer.keys[:, :, L:].any()
        out = tc.static_f16_attention(layer, q, 0.125)
        mask = torch.arange(L)[None, :] <= (L - Tq) + torch.arange(Tq)[:, None]
        ref = torch.nn.functional.scaled_dot_product_attention(
            q, kk.repeat_interleave(2, 1), vv.repeat_interleave(2, 1), attn_mask=mask, scale=0.125
        )
        assert torch.allclose(out.transpose(1, 2), ref, atol=1e-5), n
        assert isinstance(h, tc.StaticKV)
    with pytest.raises(ValueError, match="holds 40 tokens"):
        layer.update(torch.zeros(2, 2, 30, 64), torch.zeros(2, 2, 30, 64))
    layer.set_length(8)
    assert layer.get_seq_length() == 8 and layer.lens.tolist() == [8, 8]
    with pytest.raises(ValueError, match="impl must be one of"):
        tc.StaticF16CacheLayer(8, "flash")


def test_attn_prec_cache_takes_the_steps_default(th):
    """make_cache with --attn-prec: plan's default for a decode step of `batch` sequences, that precision."""
    from cupy_kernels import attention as gpu_attn

    m = gpu_generate.tiny_llama()  # 4/2 heads, D=64: 2 work items a sequence
    few = gdb.make_cache(m, "polar", 64, attn_prec="fp16", batch=1).layers[0].attn_config
    many = gdb.make_cache(m, "polar", 64, attn_prec="fp16", batch=16).layers[0].attn_config
    assert few == dataclasses.replace(gpu_attn.FEW_UNITS_CONFIG, prec="fp16")
    assert many == dataclasses.replace(gpu_attn.DEFAULT_CONFIG, prec="fp16")
    assert gdb.make_cache(m, "polar", 64).layers[0].attn_config is None  # "auto": plan's own choice


@pytest.mark.parametrize("vfmt", ["polar", "f16"])
def test_static_polar_layer_equals_dynamic_cpu(th, vfmt):
    torch = th
    from cupy_kernels import torch_cache as tc

    g = torch.Generator().manual_seed(1)
    st = tc.StaticPolarCacheLayer(20, "polar", vfmt, backend="reference", offsets="prefill")
    dy = tc.PolarCacheLayer("polar", vfmt, backend="reference", offsets="prefill")
    for t in (5, 1, 1):
        k, v = torch.randn(1, 2, t, 128, generator=g), torch.randn(1, 2, t, 128, generator=g)
        st.update(k, v)
        dy.update(k, v)
    assert st.keys.shape[2] == 24 and st.get_max_length() == 24 and st.kernel_max_len() == 24
    assert st.length == dy.length == 7 and st.lens.tolist() == dy.lens.tolist() == [7]
    assert torch.equal(st.keys[:, :, :7], dy.keys[:, :, :7])
    assert torch.equal(st.values[:, :, :7], dy.values[:, :, :7])
    with pytest.raises(ValueError, match="holds 24 tokens"):
        st.update(torch.zeros(1, 2, 20, 128), torch.zeros(1, 2, 20, 128))
    with pytest.raises(ValueError, match="kfmt 'f16'"):
        tc.StaticPolarCache(num_layers=1, max_cache_len=8, kfmt="f16", vfmt="polar")
    with pytest.raises(ValueError, match="positive"):
        tc.StaticPolarCache(num_layers=1, max_cache_len=0)


@pytest.mark.parametrize("padded", [False, True])
def test_eager_decoder_matches_dynamic_caches_cpu(th, padded):
    """GraphDecoder's eager steps over the static caches = model.generate with the dynamic ones
    (fp16 baseline: transformers' DynamicCache; polar K + fp16 V: PolarCache, reference codec); padded:
    a left-padded batch (the static caches drop the padding at the prefill, the steps take each
    sequence's own positions; generate gets the mask)."""
    torch = th
    from cupy_kernels import torch_cache as tc

    m = gpu_generate.tiny_llama()
    ids = torch.randint(1, 512, (3, 12), generator=torch.Generator().manual_seed(2))
    am = torch.ones(3, 12, dtype=torch.long)
    pads = [0, 4, 9] if padded else [0, 0, 0]
    for b, p in enumerate(pads):
        am[b, :p], ids[b, :p] = 0, 0
    n = 8
    with torch.no_grad():
        for kind, ref_cache in (
            ("fp16", None),
            ("fp16-mm", None),
            ("polar+f16", tc.PolarCache(m.config, kfmt="polar", vfmt="f16", backend="reference")),
        ):
            cache = gdb.make_cache(m, kind, gdb.capacity(12, n, step=8))
            mask = am if padded else None
            got = gdb.greedy_tokens(m, cache, ids, n, graph=False, attention_mask=mask)
            assert cache.get_seq_length() == 12 + n - 1
            assert cache.layers[0].lens.tolist() == [12 + n - 1 - p for p in pads], kind
            assert (cache.layers[0].pads is not None) == padded, kind
            kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            ref = m.generate(ids, attention_mask=mask, past_key_values=ref_cache, **kw)
            assert got == ref[:, 12:].tolist(), kind


# ---- GPU ---------------------------------------------------------------------------------------


def _decode(torch, model, cache, ids, n, graph):
    """Tokens [B, n] and the decode steps' logits [n - 1, B, vocab] (float32)."""
    first = gdb.prefill(model, cache, ids).argmax(-1)
    dec = gdb.GraphDecoder(model, cache, first, ids.shape[1])
    if graph:
        dec.capture()
    toks, logits = [first], []
    for _ in range(n - 1):
        logits.append(dec.step().float().clone())
        toks.append(dec.ids[:, 0].clone())
    dec.sync_cache()
    dec.release()
    return torch.stack(toks, 1), torch.stack(logits)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["fp16", "polar", "polar+f16", "polar3", "polar+polar3", "fp16-mm"])
def test_gpu_graph_replay_matches_eager(cuda_torch, kind):
    """The CUDA-graph replay of a decode step computes what the eager step computes (same
    kernels, same launches: the logits agree to float16 rounding, the tokens exactly), and the
    static cache's eager steps agree with the dynamic caches on the same tokens (teacher forced:
    other key splits for the polar kernel, other SDPA kernels for fp16)."""
    torch = cuda_torch
    from cupy_kernels import torch_cache as tc

    m = gpu_generate.tiny_llama(0, "cuda", torch.float16)
    ids = torch.randint(0, 512, (3, 32), generator=torch.Generator().manual_seed(3)).cuda()
    n = 17
    cap = gdb.capacity(32, n + 2, step=8)
    with torch.no_grad():
        te, le = _decode(torch, m, gdb.make_cache(m, kind, cap), ids, n, graph=False)
        cache = gdb.make_cache(m, kind, cap)
        tg, lg = _decode(torch, m, cache, ids, n, graph=True)
        assert cache.get_seq_length() == 32 + n - 1
        assert cache.layers[0].lens.tolist() == [32 + n - 1] * 3
        err = ((lg - le).abs().amax() / le.abs().amax()).item()
        assert err <= 1e-3, err
        assert torch.equal(tg, te)

        kfmt, vfmt = gdb.KINDS[kind]
        dyn = None if kfmt == "f16" else tc.PolarCache(m.config, kfmt=kfmt, vfmt=vfmt)
        seq = torch.cat([ids, te[:, :-1]], 1)
        out = m(seq[:, :32], past_key_values=dyn, use_cache=True)
        dyn = out.past_key_values
        ref = []
        for i in range(n - 1):
            ref.append(m(seq[:, 32 + i : 33 + i], past_key_values=dyn, use_cache=True).logits[:, -1].float())
        ref = torch.stack(ref)
        err = ((le - ref).abs().amax() / ref.abs().amax()).item()
        assert err <= 1e-2, err


@pytest.mark.gpu
def test_gpu_padded_bench_rows(cuda_torch):
    """`padded` on a small shape: every cache runs, the polar cache drops the padding, the kept one does
    not (the logits of the two paths: tests/test_torch_cache.py::test_gpu_left_padded_teacher_forced)."""
    torch = cuda_torch
    args = gdb.parse_args(["padded", "--batch", "3", "--context", "96", "--steps", "4", "--layers", "2"])
    model = gdb.qwen_like(args.layers)
    ids = torch.randint(0, 1000, (3, 96), generator=torch.Generator().manual_seed(0)).cuda()
    am = torch.ones_like(ids)
    for b, p in enumerate(gdb.left_pads(3, 96)):
        am[b, :p] = 0
    rows = {k: gdb.padded_one(model, k, ids, am, args) for k in gdb.PADDED_KINDS}
    assert rows["polar"]["dropped_padding"] == [0, 24, 48] and rows["polar-keep"]["dropped_padding"] is None
    assert all(
        len(r["tokens"]) == 3 and len(r["tokens"][0]) == 6 and r["tok_per_s"] > 0 for r in rows.values()
    )
    # the prefill is the same path for both: their first tokens agree
    assert [t[0] for t in rows["polar"]["tokens"]] == [t[0] for t in rows["polar-keep"]["tokens"]]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["fp16", "polar", "polar+f16", "polar balance"])
def test_gpu_graph_replay_left_padded(cuda_torch, kind):
    """A left-padded batch on a static cache: the CUDA-graph replay of the decode step gives the tokens of
    the eager steps, each sequence at its own positions after the padding was dropped at the prefill ("polar
    balance": with "prefill" offsets and K balancing, their factors taken at the eager prefill)."""
    torch = cuda_torch
    m = gpu_generate.tiny_llama(0, "cuda", torch.float16)
    ids = torch.randint(1, 512, (3, 32), generator=torch.Generator().manual_seed(4)).cuda()
    am = torch.ones_like(ids)
    am[1, :7], am[2, :20] = 0, 0
    n = 17
    cap = gdb.capacity(32, n + 2, step=8)
    kw = dict(centering="prefill", balance=True) if kind == "polar balance" else {}
    kind = kind.split()[0]
    with torch.no_grad():
        eager = gdb.greedy_tokens(
            m, gdb.make_cache(m, kind, cap, **kw), ids, n, graph=False, attention_mask=am
        )
        cache = gdb.make_cache(m, kind, cap, **kw)
        graph = gdb.greedy_tokens(m, cache, ids, n, graph=True, attention_mask=am)
    assert graph == eager
    if kw:
        assert cache.layers[0].bal_q is not None
    assert cache.layers[0].pads.tolist() == [0, 7, 20]
    assert cache.layers[0].lens.tolist() == [32 + n - 1 - p for p in (0, 7, 20)]
