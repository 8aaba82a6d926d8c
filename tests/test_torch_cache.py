"""cupy_kernels.torch_cache: the transformers Cache holding polar blocks.

CPU tests use backend="reference" (numpy codec + SDPA); GPU tests (skipped without CuPy and
CUDA) check that the kernel path computes what the reference path computes, on the same
bytes, and run greedy generation of a tiny random Llama with the polar cache.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from cupy_kernels import torch_cache as tc  # noqa: E402
from gpu_generate import tiny_llama  # noqa: E402
from kvpolar import codec  # noqa: E402


def test_hadamard():
    for n in (64, 128):
        h = tc.hadamard(n, "cpu")
        assert torch.allclose(h @ h, torch.eye(n), atol=1e-6)
        assert torch.equal(h, h.T)
    x = torch.randn(3, 5, 128)
    h64 = tc.hadamard(64, "cpu")
    assert torch.allclose(tc.rotate_blocks(tc.rotate_blocks(x, h64), h64), x, atol=1e-5)
    with pytest.raises(ValueError, match="power of two"):
        tc.hadamard(96, "cpu")


def _layer_roundtrip(backend: str, device: str, vfmt: str, centering):
    layer = tc.PolarCacheLayer("polar", vfmt, offsets=centering, backend=backend)
    g = torch.Generator(device=device).manual_seed(0)
    k1 = torch.randn((2, 2, 7, 128), generator=g, device=device) + 0.5
    v1 = torch.randn((2, 2, 7, 128), generator=g, device=device) - 0.25
    k2 = torch.randn((2, 2, 1, 128), generator=g, device=device)
    v2 = torch.randn((2, 2, 1, 128), generator=g, device=device)
    layer.update(k1, v1)
    layer.update(k2, v2)
    return layer, torch.cat([k1, k2], 2), torch.cat([v1, v2], 2)


@pytest.mark.parametrize("vfmt", ["polar", "f16"])
@pytest.mark.parametrize("centering", [None, "prefill"])
def test_layer_bytes_and_attention_cpu(vfmt, centering):
    """Cache bytes = numpy codec of the rotated (centered) keys; the attention function equals
    SDPA on the dequantized, un-rotated cache."""
    layer, k, _v = _layer_roundtrip("reference", "cpu", vfmt, centering)
    assert layer.get_seq_length() == 8 and layer.keys.shape[2] % 8 == 0
    kr = k - (layer.mu_k if layer.mu_k is not None else 0)
    kr = kr @ tc.hadamard(128, "cpu")
    want = codec.quantize_blocks(kr.numpy().reshape(-1, 64), "polar").reshape(2, 2, 8, 2, 34)
    assert np.array_equal(layer.keys[:, :, :8].numpy(), want)

    kq, vq = layer.dequantized()
    h, h64 = tc.hadamard(128, "cpu"), tc.hadamard(64, "cpu")
    k_model = kq @ h + (layer.mu_k if layer.mu_k is not None else 0)
    v_model = tc.rotate_blocks(vq, h64) + (layer.mu_v if layer.mu_v is not None else 0)
    q = torch.randn(2, 4, 1, 128)

    class M(torch.nn.Module):
        num_key_value_groups = 2

    handle = tc.PolarKV(layer)
    out, _ = tc.polar_attention_forward(M(), q, handle, handle, None, scaling=128**-0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k_model.repeat_interleave(2, 1), v_model.repeat_interleave(2, 1), scale=128**-0.5
    )
    assert torch.allclose(out.transpose(1, 2), ref, atol=2e-5, rtol=1e-4)


def test_cache_generate_cpu():
    m = tiny_llama()
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(ids).logits[0, -1]
        cache = tc.PolarCache(m.config, backend="reference")
        got = m(ids, past_key_values=cache).logits[0, -1]
    cos = torch.nn.functional.cosine_similarity(ref, got, 0)
    assert cos > 0.99, cos
    out = m.generate(
        ids, past_key_values=tc.PolarCache(m.config, backend="reference"), max_new_tokens=6, do_sample=False
    )
    assert out.shape == (1, 18)


def test_cache_bad_args():
    with pytest.raises(ValueError, match="kfmt"):
        tc.PolarCacheLayer("q8_0")
    with pytest.raises(ValueError, match="backend"):
        tc.PolarCacheLayer(backend="triton")
    with pytest.raises(ValueError, match="config or num_layers"):
        tc.PolarCache()
    layer = tc.PolarCacheLayer(backend="reference")
    with pytest.raises(ValueError, match="multiple of 64"):
        layer.update(torch.zeros(1, 1, 2, 96), torch.zeros(1, 1, 2, 96))


def test_first_divergence():
    assert tc.first_divergence(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 2, 3]])) is None
    assert tc.first_divergence(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 5, 3]])) == 1


# ---- GPU -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda(cuda_torch):
    return "cuda"


@pytest.mark.gpu
@pytest.mark.parametrize("vfmt", ["polar", "polar3", "f16"])
def test_gpu_layer_matches_reference(cuda, vfmt):
    a, _, _ = _layer_roundtrip("cupy", cuda, vfmt, "prefill")
    b, _, _ = _layer_roundtrip("reference", cuda, vfmt, "prefill")
    assert torch.equal(a.keys[:, :, :8], b.keys[:, :, :8])
    assert torch.equal(a.values[:, :, :8], b.values[:, :, :8])
    q = torch.randn(2, 4, 1, 128, device=cuda)

    class M(torch.nn.Module):
        num_key_value_groups = 2

    oa, _ = tc.polar_attention_forward(M(), q, tc.PolarKV(a), tc.PolarKV(a), None, scaling=0.1)
    ob, _ = tc.polar_attention_forward(M(), q, tc.PolarKV(b), tc.PolarKV(b), None, scaling=0.1)
    assert torch.allclose(oa, ob, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
def test_gpu_teacher_forced_logits(cuda):
    """Same tokens through the kernel path (cupy) and the dequantize+SDPA path (reference)."""
    m = tiny_llama(device=cuda)
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(2)).to(cuda)
    ca = tc.PolarCache(m.config, backend="cupy")
    cb = tc.PolarCache(m.config, backend="reference")
    with torch.no_grad():
        m(ids[:, :8], past_key_values=ca)
        m(ids[:, :8], past_key_values=cb)
        worst = 0.0
        for t in range(8, 40):
            la = m(ids[:, t : t + 1], past_key_values=ca).logits
            lb = m(ids[:, t : t + 1], past_key_values=cb).logits
            worst = max(worst, float((la - lb).abs().max() / lb.abs().max()))
    assert worst < 1e-4, worst


@pytest.mark.gpu
@pytest.mark.parametrize("vfmt", ["polar", "f16"])
def test_gpu_generate_tiny(cuda, vfmt):
    """Greedy generation, fp16 DynamicCache vs the polar cache (kernel decode steps)."""
    m = tiny_llama(device=cuda, dtype=torch.float16)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(3)).to(cuda)
    ref = m.generate(ids, max_new_tokens=32, do_sample=False)
    cache = tc.PolarCache(m.config, vfmt=vfmt)
    got = m.generate(ids, past_key_values=cache, max_new_tokens=32, do_sample=False)
    assert got.shape == ref.shape
    assert cache.layers[0].backend == "cupy" and cache.get_seq_length() == 16 + 31
    div = tc.first_divergence(ref[:, 16:], got[:, 16:])
    print(f"tiny llama fp16 vs polar/{vfmt}: first divergence {div}")


@pytest.mark.gpu
@pytest.mark.parametrize("centering", [None, "prefill", "balance"])
def test_gpu_left_padded_teacher_forced(cuda, monkeypatch, centering):
    """A left-padded batch: after the prefill the layers drop the padding, the decode steps run the
    kernel on per-sequence lengths (no dequantize + SDPA), and give the logits of the reference path
    (numpy codec + SDPA over the same bytes) on the real rows; with "prefill" centering, the first update
    re-encoded on the GPU with each sequence's own-token offsets; "balance": that with K balancing
    (PolarCache(balance=True): keys stored times D, queries times D^-1)."""
    m = tiny_llama(device=cuda)
    tc.enable(m)
    g = torch.Generator().manual_seed(4)
    n0, pads = 24, [0, 9, 17]
    ids = torch.randint(1, 512, (3, n0 + 16), generator=g).to(cuda)
    am = torch.ones(3, n0, dtype=torch.long, device=cuda)
    for b, p in enumerate(pads):
        am[b, :p] = 0
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    opts = dict(centering="prefill", balance=True) if centering == "balance" else dict(centering=centering)
    ca = tc.PolarCache(m.config, backend="cupy", **opts)
    cb = tc.PolarCache(m.config, backend="reference", **opts)
    calls = []
    real_attention = tc.gpu_attn.attention
    monkeypatch.setattr(
        tc.gpu_attn, "attention", lambda *a, **k: calls.append(a[3]) or real_attention(*a, **k)
    )
    with torch.no_grad():
        la = m(ids[:, :n0], attention_mask=am, position_ids=pos, past_key_values=ca).logits[:, -1]
        lb = m(ids[:, :n0], attention_mask=am, position_ids=pos, past_key_values=cb).logits[:, -1]
        assert ca.layers[0].pads.tolist() == pads and not calls
        worst = float((la - lb).abs().max() / lb.abs().max())
        for t in range(n0, n0 + 16):
            am = torch.cat([am, torch.ones(3, 1, dtype=torch.long, device=cuda)], 1)
            p = pos[:, -1:] + 1
            pos = torch.cat([pos, p], 1)
            kw = dict(attention_mask=am, position_ids=p)
            la = m(ids[:, t : t + 1], past_key_values=ca, **kw).logits
            lb = m(ids[:, t : t + 1], past_key_values=cb, **kw).logits
            worst = max(worst, float((la - lb).abs().max() / lb.abs().max()))
    assert len(calls) == 16 * m.config.num_hidden_layers
    if centering == "balance":  # the factors were taken (not all ones) and the GPU path used them
        assert not torch.equal(ca.layers[1].bal_k, torch.ones_like(ca.layers[1].bal_k))
        assert torch.equal(ca.layers[1].bal_k, cb.layers[1].bal_k)
    assert calls[-1].tolist() == [n0 + 16 - p for p in pads]  # the kernel's lens: each sequence's own
    assert worst < 1e-4, worst


@pytest.mark.gpu
def test_gpu_crop_then_decode(cuda):
    """After crop(-3) the kernel reads what a cache that never held the removed tokens reads (same
    bytes: the same output), and assisted greedy decoding runs on the kernel path."""
    g = torch.Generator(device=cuda).manual_seed(8)
    k = torch.randn((2, 2, 11, 128), generator=g, device=cuda)
    v = torch.randn((2, 2, 11, 128), generator=g, device=cuda)
    q = torch.randn((2, 4, 1, 128), generator=g, device=cuda)
    a = tc.PolarCacheLayer(backend="cupy")
    b = tc.PolarCacheLayer(backend="cupy")
    a.update(k[:, :, :10], v[:, :, :10])
    a.crop(-3)
    a.update(k[:, :, 10:], v[:, :, 10:])
    b.update(torch.cat([k[:, :, :7], k[:, :, 10:]], 2), torch.cat([v[:, :, :7], v[:, :, 10:]], 2))

    class M(torch.nn.Module):
        num_key_value_groups = 2

    oa, _ = tc.polar_attention_forward(M(), q, tc.PolarKV(a), tc.PolarKV(a), None, scaling=0.1)
    ob, _ = tc.polar_attention_forward(M(), q, tc.PolarKV(b), tc.PolarKV(b), None, scaling=0.1)
    assert a.get_seq_length() == 8 and torch.equal(a.keys[:, :, :8], b.keys[:, :, :8]) and torch.equal(oa, ob)

    m = tiny_llama(device=cuda, dtype=torch.float16)
    draft = tiny_llama(seed=1, device=cuda, dtype=torch.float16)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(3)).to(cuda)
    cache = tc.PolarCache(m.config)
    got = m.generate(ids, past_key_values=cache, assistant_model=draft, max_new_tokens=24, do_sample=False)
    plain = m.generate(ids, past_key_values=tc.PolarCache(m.config), max_new_tokens=24, do_sample=False)
    n = cache.get_seq_length()
    assert got.shape == (1, 40) and n == 39 and cache.layers[0].lens.tolist() == [n]
    div = tc.first_divergence(got, plain)
    print(f"assisted vs plain greedy, polar cache (fp16 tiny llama): first divergence {div}")


def test_model_offsets_from_bias_and_gguf(tmp_path):
    """Centering offsets as llama.cpp picks them: the GGUF's attn_k.center (llama dim order
    undone), else the k_proj bias; V only on request."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from kvpolar import calibrate, gguf_io

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    m = Qwen2ForCausalLM(cfg).eval()
    for layer in m.model.layers:
        torch.nn.init.normal_(layer.self_attn.k_proj.bias)
        torch.nn.init.normal_(layer.self_attn.v_proj.bias)
    off = tc.model_offsets(m)
    assert sorted(off) == [0, 1]
    assert torch.equal(off[1][0], m.model.layers[1].self_attn.k_proj.bias.reshape(1, 64))
    assert torch.count_nonzero(off[1][1]) == 0
    off_v = tc.model_offsets(m, center_v=True)
    assert torch.equal(off_v[0][1], m.model.layers[0].self_attn.v_proj.bias.reshape(1, 64))

    src, dst = tmp_path / "m.gguf", tmp_path / "c.gguf"
    gguf_io.write_tensors(src, {"blk.0.attn_k.weight": np.ones((4, 64), np.float32)}, fmt=None, arch="llama")
    k_hf = np.linspace(-1, 1, 64, dtype=np.float32)
    k_llama = k_hf[calibrate.hf_to_llama_dims(64)]
    calibrate.write_with_offsets(src, dst, {0: (k_llama, np.zeros(64, np.float32))}, progress=False)
    off = tc.model_offsets(m, dst)
    assert torch.equal(off[0][0], torch.from_numpy(k_hf).reshape(1, 64))  # from the file
    assert torch.equal(off[1][0], m.model.layers[1].self_attn.k_proj.bias.reshape(1, 64))  # bias


def test_prefill_is_causal_matches_masked():
    """The prefill path (Tq == length, no mask: SDPA is_causal) equals the explicit tail mask."""
    layer, _k, _v = _layer_roundtrip("reference", "cpu", "polar", None)
    q = torch.randn(2, 4, 8, 128, generator=torch.Generator().manual_seed(3))

    class M(torch.nn.Module):
        num_key_value_groups = 2

    h = tc.PolarKV(layer)
    out, _ = tc.polar_attention_forward(M(), q, h, h, None, scaling=0.1)
    mask = tc._causal_tail_mask(8, 8, "cpu")
    out2, _ = tc.polar_attention_forward(M(), q, h, h, mask[None, None], scaling=0.1)
    assert torch.allclose(out, out2, atol=1e-6)
    out3, _ = tc.polar_attention_forward(M(), q[:, :, -3:], h, h, None, scaling=0.1)
    assert torch.allclose(out[:, -3:], out3, atol=1e-6)


def _padded_layers(vfmt: str = "polar", centering=None):
    """Two layers with the same bytes (B=2, 8 prefill tokens, sequence 1 left-padded by 3), both shown the
    padding mask at their prefill: `a` drops the padding, `b` keeps it (keep_padding; with "prefill"
    centering both take the offsets over each sequence's own tokens)."""
    g = torch.Generator().manual_seed(5)
    k = torch.randn((2, 2, 8, 128), generator=g) + 0.3
    v = torch.randn((2, 2, 8, 128), generator=g)
    q = torch.randn((2, 4, 8, 128), generator=g)
    pads = torch.tensor([0, 3])
    j = torch.arange(8)
    mask = tc._causal_tail_mask(8, 8, "cpu")[None, None] & (j.view(1, 1, 1, -1) >= pads.view(-1, 1, 1, 1))

    class M(torch.nn.Module):
        num_key_value_groups = 2

    out = {}
    for name, keep in (("a", False), ("b", True)):
        layer = tc.PolarCacheLayer("polar", vfmt, offsets=centering, backend="reference", keep_padding=keep)
        h = tc.PolarKV(layer.update(k, v)[0].layer)
        o, _ = tc.polar_attention_forward(M(), q, h, h, mask, scaling=0.1)
        out[name] = layer, o
    return out, M, mask, g


@pytest.mark.parametrize("vfmt", ["polar", "f16"])
def test_left_padding_dropped_cpu(vfmt, monkeypatch):
    """A left-padded prefill: the layer drops the padding (bytes moved, lens per sequence); a decode
    step whose mask is that padding takes the mask-free path and computes what SDPA over the padded
    cache with the mask computes; any other mask takes the padded view (same result as a layer that
    kept the padding)."""
    out, M, mask, g = _padded_layers(vfmt, "prefill")
    (a, _), (b, _) = out["a"], out["b"]
    assert a.pads.tolist() == [0, 3] and a.lens.tolist() == [8, 5] and b.pads is None
    assert torch.equal(a.keys[1, :, :5], b.keys[1, :, 3:8]) and torch.equal(
        a.keys[0, :, :8], b.keys[0, :, :8]
    )
    assert torch.equal(a.values[1, :, :5], b.values[1, :, 3:8])
    with pytest.raises(ValueError, match=r"pads must be 2 counts in \[0, 8\)"):
        b.drop_padding(torch.tensor([0, 8]))
    k1 = torch.randn((2, 2, 1, 128), generator=g)
    v1 = torch.randn((2, 2, 1, 128), generator=g)
    q1 = torch.randn((2, 4, 1, 128), generator=g)
    a.update(k1, v1)
    b.update(k1, v1)
    assert a.lens.tolist() == [9, 6] and a.get_seq_length() == 9
    assert torch.equal(a.keys[1, :, 5], b.keys[1, :, 8]) and torch.equal(a.values[1, :, 5], b.values[1, :, 8])
    dmask = mask[:, :, -1:, :].clone()
    dmask = torch.cat([dmask, torch.ones(2, 1, 1, 1, dtype=torch.bool)], -1)  # [2, 1, 1, 9]
    ha, hb = tc.PolarKV(a), tc.PolarKV(b)
    ref, _ = tc.polar_attention_forward(M(), q1, hb, hb, dmask, scaling=0.1)

    def boom(*args, **kw):
        raise AssertionError("the padded view was taken")

    with monkeypatch.context() as mp:
        mp.setattr(tc.PolarCacheLayer, "padded", boom)
        got, _ = tc.polar_attention_forward(M(), q1, ha, ha, dmask, scaling=0.1)
        got_none, _ = tc.polar_attention_forward(M(), q1, ha, ha, None, scaling=0.1)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4)
    assert torch.allclose(got_none, ref, atol=1e-5, rtol=1e-4)
    hole = dmask.clone()
    hole[1, 0, 0, 5] = False  # one more key masked: not what the layer knows
    ref2, _ = tc.polar_attention_forward(M(), q1, hb, hb, hole, scaling=0.1)
    got2, _ = tc.polar_attention_forward(M(), q1, ha, ha, hole, scaling=0.1)
    assert torch.allclose(got2, ref2, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got2, got, atol=1e-3)
    fmask = torch.zeros(hole.shape).masked_fill(~hole, float("-inf"))  # the same as an additive mask
    got3, _ = tc.polar_attention_forward(M(), q1, ha, ha, fmask, scaling=0.1)
    assert torch.allclose(got3, ref2, atol=1e-5, rtol=1e-4)


def test_reorder_moves_every_per_sequence_tensor():
    """Beam reordering / batch selection after a dropped padding: bytes, lens, pads and the per-sequence
    "prefill" offsets move together (mu_v is added back to each sequence's output)."""
    out, _M, _mask, _g = _padded_layers("polar", "prefill")
    a, _ = out["a"]
    keys, lens, pads, mu_v = a.keys.clone(), a.lens.clone(), a.pads.clone(), a.mu_v.clone()
    a.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(a.keys, keys.flip(0)) and a.lens.tolist() == lens.flip(0).tolist()
    assert a.pads.tolist() == pads.flip(0).tolist() and torch.equal(a.mu_v, mu_v.flip(0))
    a.batch_repeat_interleave(2)
    assert a.B == 4 and a.lens.tolist() == [5, 5, 8, 8] and a.pads.tolist() == [3, 3, 0, 0]
    assert a.mu_k.shape[0] == 4
    a.batch_select_indices(torch.tensor([0, 3]))
    assert a.B == 2 and a.lens.tolist() == [5, 8] and torch.equal(a.mu_v, mu_v.flip(0))


def test_crop_forgets_the_last_tokens():
    """crop(-n) (assisted decoding's roll-back): the next token is written where the first removed one
    was, and attention reads only what is left; crop(0) does nothing; a crop into a dropped padding fails."""
    layer, k, v = _layer_roundtrip("reference", "cpu", "polar", None)  # 8 tokens
    ref = tc.PolarCacheLayer("polar", "polar", backend="reference")
    ref.update(k[:, :, :5], v[:, :, :5])
    layer.crop(0)
    assert layer.get_seq_length() == 8
    layer.crop(-3)
    assert layer.get_seq_length() == 5 and layer.lens.tolist() == [5, 5]
    k9, v9 = torch.randn(2, 2, 1, 128), torch.randn(2, 2, 1, 128)
    layer.update(k9, v9)
    ref.update(k9, v9)
    assert torch.equal(layer.keys[:, :, :6], ref.keys[:, :, :6]) and torch.equal(
        layer.values[:, :, :6], ref.values[:, :, :6]
    )
    layer.crop(4)  # the older form: keep 4
    assert layer.get_seq_length() == 4 and layer.lens.tolist() == [4, 4]
    out, _M, _mask, _g = _padded_layers()
    a, _ = out["a"]  # lens [8, 5]
    a.crop(-5)
    assert a.lens.tolist() == [3, 0]
    with pytest.raises(ValueError, match="dropped padding"):
        a.crop(-1)


def test_assisted_generation_cpu():
    """Assisted (speculative) greedy decoding with the polar cache: the draft's rejected tokens are cropped
    away, and the tokens are those of plain greedy decoding with the same cache."""
    m = tiny_llama()
    draft = tiny_llama(seed=1)
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(7))
    kw = dict(max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        plain = m.generate(ids, past_key_values=tc.PolarCache(m.config, backend="reference"), **kw)
        cache = tc.PolarCache(m.config, backend="reference")
        fast = m.generate(ids, past_key_values=cache, assistant_model=draft, **kw)
    assert torch.equal(fast, plain)
    n = cache.get_seq_length()
    assert type(n) is int and n == 10 + 12 - 1 and cache.layers[0].lens.tolist() == [n]


@pytest.mark.parametrize("kfmt", ["polar", "f16"])
def test_static_cache_refuses_other_masks(kfmt):
    """The static caches ignore masks past the prefill (their decode steps run in CUDA graphs): a prefill
    mask that is neither causal nor a left padding raises, naming the cause, instead of being ignored."""
    m = tiny_llama()
    ids = torch.randint(1, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    am = torch.ones(2, 12, dtype=torch.long)
    kw = dict(kfmt=kfmt, vfmt=kfmt, backend="reference")
    with torch.no_grad():
        m(ids, attention_mask=am, past_key_values=tc.StaticPolarCache(m.config, 32, **kw))
        am[1, 7:] = 0  # right padding
        cache = tc.StaticPolarCache(m.config, 32, **kw)
        with pytest.raises(ValueError, match=r"at most a left padding.*use PolarCache"):
            m(ids, attention_mask=am, past_key_values=cache)


def test_left_padding_detection():
    """tc.left_padding: pads of a left-padded causal prefill mask, None for anything else."""
    n = 6
    causal = tc._causal_tail_mask(n, n, "cpu")[None, None]
    j = torch.arange(n).view(1, 1, 1, -1)

    def left(pads):
        m = causal & (j >= torch.tensor(pads).view(-1, 1, 1, 1))
        rows = torch.arange(n).view(1, 1, -1, 1) < torch.tensor(pads).view(-1, 1, 1, 1)
        return m & ~rows  # the padding's own rows fully masked (transformers 5.x)

    assert tc.left_padding(left([0, 2, 5]), n).tolist() == [0, 2, 5]
    assert tc.left_padding(left([0, 2]).expand(2, 4, n, n), n).tolist() == [0, 2]  # per-head masks
    assert tc.left_padding(causal & j >= 0, n) is None  # no padding: nothing to drop
    assert tc.left_padding(None, n) is None
    assert tc.left_padding(left([0, 2]).float(), n) is None  # additive masks: not looked at
    assert tc.left_padding(left([0, 6]), n) is None  # a sequence of padding only
    right = causal & (j < torch.tensor([6, 4]).view(-1, 1, 1, 1))
    assert tc.left_padding(right, n) is None
    hole = left([0, 2]).clone()
    hole[0, 0, 5, 3] = False
    assert tc.left_padding(hole, n) is None
    assert tc.left_padding(left([0, 2])[..., :5, :5], n) is None  # not the first prefill's shape


def _two_prompts(seed: int):
    """A tiny model (the "kvpolar" attention) and prompts a (12 tokens) and b (7) as one left-padded batch:
    (model, a, b, ids [2, 12], attention mask)."""
    m = tiny_llama()
    tc.enable(m)
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(1, 512, (1, 12), generator=g)
    b = torch.randint(1, 512, (1, 7), generator=g)
    ids = torch.zeros((2, 12), dtype=torch.long)
    ids[0], ids[1, 5:] = a[0], b[0]
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, :5] = 0
    return m, a, b, ids, am


def test_prefill_offsets_batch_invariant_cpu():
    """centering="prefill" on a left-padded batch: each sequence's offsets are the mean over its own tokens
    (as when it runs alone, to float rounding), not the padding's too, in both padding modes and in the
    static cache; the first update is encoded again with them (its bytes are those of a layer given these
    offsets from the start)."""
    m, a, b, ids, am = _two_prompts(2)
    pos = tc.padded_positions(am)
    alone = {}
    for name, x in (("a", a), ("b", b)):
        c = tc.PolarCache(m.config, backend="reference", centering="prefill")
        with torch.no_grad():
            m(input_ids=x, past_key_values=c, use_cache=True)
        alone[name] = c.layers[1]
    caches = {
        "dropped": tc.PolarCache(m.config, backend="reference", centering="prefill"),
        "static": tc.StaticPolarCache(m.config, 32, backend="reference", centering="prefill"),
        "kept": tc.PolarCache(m.config, backend="reference", centering="prefill", keep_padding=True),
    }
    for kind, c in caches.items():
        with torch.no_grad():
            m(input_ids=ids, attention_mask=am, position_ids=pos, past_key_values=c, use_cache=True)
        layer = c.layers[1]
        assert (layer.pads is None) == (kind == "kept") and layer._first is None
        for i, name in enumerate("ab"):
            for mu in ("mu_k", "mu_v"):
                torch.testing.assert_close(
                    getattr(layer, mu)[i], getattr(alone[name], mu)[0], atol=1e-5, rtol=0
                )
    # the padded mean differs (it is what the layer encodes first)
    padded = tc.PolarCache(m.config, backend="reference", centering="prefill", keep_padding=True)
    real = tc.PolarCacheLayer.recenter_prefill
    try:
        tc.PolarCacheLayer.recenter_prefill = lambda self, pads, query=None: None
        with torch.no_grad():
            m(input_ids=ids, attention_mask=am, position_ids=pos, past_key_values=padded, use_cache=True)
    finally:
        tc.PolarCacheLayer.recenter_prefill = real
    assert not torch.allclose(padded.layers[1].mu_k[1], layer.mu_k[1], atol=1e-3)
    import padded_centering  # (its "prefill-real" offsets: the own-token mean set before the first encoding)

    plain = tc.PolarCacheLayer._prep
    try:
        tc.PolarCacheLayer._prep = padded_centering.real_mean_prep(am.bool())
        direct = tc.PolarCache(m.config, backend="reference", centering="prefill", keep_padding=True)
        with torch.no_grad():
            m(input_ids=ids, attention_mask=am, position_ids=pos, past_key_values=direct, use_cache=True)
    finally:
        tc.PolarCacheLayer._prep = plain
    assert torch.equal(direct.layers[1].keys, layer.keys) and torch.equal(
        direct.layers[1].values, layer.values
    )


def test_left_padded_generate_cpu(monkeypatch):
    """generate() on a left-padded batch: each row's tokens as when it runs alone, the decode steps
    on the mask-free path (the layer dropped the padding)."""
    m, a, b, ids, am = _two_prompts(1)
    cache = tc.PolarCache(m.config, backend="reference")
    calls = []
    real_padded = tc.PolarCacheLayer.padded
    monkeypatch.setattr(tc.PolarCacheLayer, "padded", lambda self, x: calls.append(1) or real_padded(self, x))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = m.generate(ids, attention_mask=am, past_key_values=cache, **kw)
        o1 = m.generate(a, past_key_values=tc.PolarCache(m.config, backend="reference"), **kw)
        o2 = m.generate(b, past_key_values=tc.PolarCache(m.config, backend="reference"), **kw)
    assert torch.equal(out[0, 12:], o1[0, 12:]) and torch.equal(out[1, 12:], o2[0, 7:])
    layer = cache.layers[0]
    assert layer.pads.tolist() == [0, 5] and layer.lens.tolist() == [17, 12] and cache.get_seq_length() == 17
    assert not calls
    # the decode steps' masks were read on the host once a step, not once a layer
    seen = []
    real_visible = tc.PolarCacheLayer.visible
    monkeypatch.setattr(
        tc.PolarCacheLayer, "visible", lambda self, tq: seen.append(tq) or real_visible(self, tq)
    )
    with torch.no_grad():
        again = m.generate(
            ids, attention_mask=am, past_key_values=tc.PolarCache(m.config, backend="reference"), **kw
        )
    # 5 steps (the prefill's padding is found by left_padding, once for all layers, not by `visible`)
    assert torch.equal(again, out) and len(seen) == 5 and m.config.num_hidden_layers == 4
    # keep_padding: the behaviour before (masked steps on the padded cache)
    kept = tc.PolarCache(m.config, backend="reference", keep_padding=True)
    with torch.no_grad():
        out_kept = m.generate(ids, attention_mask=am, past_key_values=kept, **kw)
    assert torch.equal(out_kept, out) and kept.layers[0].pads is None
    assert kept.layers[0].lens.tolist() == [17, 17]


@pytest.mark.parametrize("centering", [None, "prefill"])
def test_left_padded_beam_search_cpu(centering):
    """Beam search on a left-padded batch (the prompts expanded to 3 beams each, reordered every step) runs
    with the padding dropped and gives the tokens of the padding kept (the masked path). (The beams of a
    prompt share its padding and offsets: test_reorder_moves_every_per_sequence_tensor moves unequal ones.)"""
    m = tiny_llama()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 512, (2, 12), generator=g)
    am = torch.ones(2, 12, dtype=torch.long)
    ids[1, :5], am[1, :5] = 0, 0
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, num_beams=3)
    out = {}
    with torch.no_grad():
        for keep in (False, True):
            cache = tc.PolarCache(m.config, backend="reference", centering=centering, keep_padding=keep)
            out[keep] = m.generate(ids, attention_mask=am, past_key_values=cache, **kw)
            if not keep:
                assert cache.layers[0].pads.tolist() == [0, 0, 0, 5, 5, 5]
    assert torch.equal(out[False], out[True])


def test_head_dim_from_the_config():
    """torch_cache.head_dim: a config's head_dim where it sets one, else hidden_size / attention heads."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    cfg.head_dim = None
    assert tc.head_dim(cfg) == 64
    cfg.head_dim = 128
    assert tc.head_dim(cfg) == 128


def test_padded_positions():
    am = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    assert tc.padded_positions(am).tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]


def test_balance_factors():
    """K balancing's factors: powers of two within 2^-8 .. 2^8, one per RoPE pair (i, i + D/2), centred per
    head in log2; a channel pair with more query energy and less key energy gets a larger factor."""
    g = torch.Generator().manual_seed(3)
    dk = torch.randn(2, 2, 10, 64, generator=g)
    q = torch.randn(2, 4, 10, 64, generator=g)
    dk[..., [3, 35]] *= 1 / 16  # key energy / 256 on RoPE pair (3, 35): E q^2 / E k^2 ~ 256 -> D = 4
    own = torch.ones(2, 1, 10, 1)
    d = tc.balance_factors(dk, q, own)
    assert d.shape == (2, 2, 1, 64)
    lg = torch.log2(d)
    assert torch.equal(lg, lg.round()) and lg.abs().max() <= 8
    assert torch.equal(d[..., :32], d[..., 32:])  # one factor a RoPE pair
    assert (d[..., 3] == 4).all() and (d[..., 3] >= d.amax(-1)).all()
    own[1, :, :4] = 0  # sequence 1's first 4 tokens are padding: left out of its statistics
    d2 = tc.balance_factors(dk, q, own)
    assert torch.equal(d2[0], d[0])
    assert torch.equal(d2[1], tc.balance_factors(dk[1:, :, 4:], q[1:, :, 4:], torch.ones(1, 1, 6, 1))[0])


def test_static_cache_balance_cpu():
    """StaticPolarCache(balance=True) on a left-padded batch: the factors, offsets and bytes of the dynamic
    cache's, and the same logits at the prefill and at decode steps."""
    m, _a, _b, ids, am = _two_prompts(6)
    pos = tc.padded_positions(am)
    opts = dict(backend="reference", centering="prefill", balance=True)
    dyn, sta = tc.PolarCache(m.config, **opts), tc.StaticPolarCache(m.config, 32, **opts)
    nxt = torch.randint(1, 512, (2, 3), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = []
        for c in (dyn, sta):
            got = [m(input_ids=ids, attention_mask=am, position_ids=pos, past_key_values=c).logits[:, -1]]
            a, p = am, pos
            for t in range(3):
                a = torch.cat([a, torch.ones(2, 1, dtype=a.dtype)], 1)
                p = p[:, -1:] + 1
                got.append(
                    m(
                        input_ids=nxt[:, t : t + 1], attention_mask=a, position_ids=p, past_key_values=c
                    ).logits[:, -1]
                )
            out.append(torch.stack(got))
    ld, ls = dyn.layers[1], sta.layers[1]
    assert ls.balance and not torch.equal(ls.bal_k, torch.ones_like(ls.bal_k))
    for name in ("bal_k", "bal_q", "mu_k", "mu_v"):
        assert torch.equal(getattr(ld, name), getattr(ls, name)), name
    for b, p in enumerate((0, 5)):  # each sequence's stored rows (the static cache writes at its own lens)
        n = 12 - p + 3
        assert torch.equal(ld.keys[b, :, :n], ls.keys[b, :, :n]) and torch.equal(
            ld.values[b, :, :n], ls.values[b, :, :n]
        )
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=1e-5)


def test_balance_is_exact_and_decodes_cpu():
    """PolarCache(balance=True): the query scaled by D^-1 and the stored keys by D leave every logit as it was
    (powers of two); factors per sequence and KV head from the first prefill; a tiny model's logits as near an
    exact cache's as without balancing; balance without centering="prefill" is refused."""
    with pytest.raises(ValueError, match="balance needs offsets='prefill'"):
        tc.PolarCacheLayer("polar", "polar", offsets=None, balance=True)
    m, _a, _b, ids, am = _two_prompts(4)
    pos = tc.padded_positions(am)
    err = {}
    with torch.no_grad():
        want = m(input_ids=ids, attention_mask=am, position_ids=pos).logits
        for bal in (False, True):
            c = tc.PolarCache(m.config, backend="reference", centering="prefill", balance=bal)
            got = m(input_ids=ids, attention_mask=am, position_ids=pos, past_key_values=c).logits
            err[bal] = float((got - want)[am.bool()].abs().max() / want[am.bool()].abs().max())
    layer = c.layers[1]
    assert layer.bal_k.shape == (2, 2, 1, 64) and layer.bal_q.shape == (2, 4, 1, 64)
    assert not torch.equal(layer.bal_k, torch.ones_like(layer.bal_k))
    assert err[True] < 1.25 * err[False], err
    g = torch.Generator().manual_seed(5)
    k = torch.randn(2, 2, 7, 64, generator=g)
    q = torch.randn(2, 4, 1, 64, generator=g)
    lay = tc.PolarCacheLayer(
        "polar", "polar", rotate=False, offsets="prefill", backend="reference", balance=True
    )
    lay.update(k, torch.randn(2, 2, 7, 64, generator=g))
    lay.recenter_prefill(None, torch.randn(2, 4, 7, 64, generator=g))
    kb = (k - lay.mu_k) * lay.bal_k  # what the cache stores before quantization
    qb = lay.rotate_q(q)
    for h in range(4):
        torch.testing.assert_close(
            qb[:, h] @ kb[:, h // 2].transpose(-1, -2), q[:, h] @ (k - lay.mu_k)[:, h // 2].transpose(-1, -2)
        )
