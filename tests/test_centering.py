"""KV-cache centering in the patched llama.cpp: exact under softmax, on by default for polar K.

A model copy gets arbitrary per-layer offsets (blk.N.attn_{k,v}.center, the tensors
`kvpolar calibrate` writes). With an f16 cache, subtracting any fixed vector from the keys
(and from the values, adding it back to the output) must leave the perplexity unchanged up
to f16 rounding of the shifted values.

Without offsets in the file (SmolLM2 has no k bias) the cache measures them online from the first
ubatch it stores (docs/centering-online.md): they must travel with saved states, be used by K shift
and be absent with LLAMA_KV_CENTER=0.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess

import numpy as np
import pytest

from kv_llama import k_shift_logits, logits, new_llama, prompted, restored_logits
from kvpolar import calibrate

pytestmark = pytest.mark.build

N_LAYER, N_EMBD_KV = 30, 192  # SmolLM2-135M: 3 KV heads x 64


@pytest.fixture(scope="module")
def offset_model(tmp_path_factory, smollm2_path):
    rng = np.random.default_rng(0)
    offsets = {
        il: (
            rng.normal(0, 2.0, N_EMBD_KV).astype(np.float32),
            rng.normal(0, 0.5, N_EMBD_KV).astype(np.float32),
        )
        for il in range(N_LAYER)
    }
    out = tmp_path_factory.mktemp("centered") / "smollm2-offsets.gguf"
    calibrate.write_with_offsets(smollm2_path, out, offsets, progress=False)
    return out


def run_ppl(build_dir, model, text, *, chunks=3, batch=256, ctk="f16", ctv="f16", env=None, extra=()) -> str:
    """llama-perplexity on 256-token chunks (-b batch: batch / 256 sequences at a time), flash attention,
    all cores, -v; its output (the run must succeed)."""
    cmd = [
        str(build_dir / "bin" / "llama-perplexity"),
        *("-m", str(model), "-f", str(text), "-c", "256", "--chunks", str(chunks), "-b", str(batch)),
        *("-t", str(os.cpu_count() or 2), "-fa", "on", "-ctk", ctk, "-ctv", ctv, "-v", *extra),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **(env or {})), timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    return out


def perplexity(build_dir, model, text, env=None, ctk="f16", ctv="f16"):
    out = run_ppl(build_dir, model, text, ctk=ctk, ctv=ctv, env=env)
    m = re.search(r"Final estimate: PPL = ([\d.]+)", out)
    assert m, out[-3000:]
    return float(m.group(1)), out


@pytest.fixture(scope="module")
def base_ppl(build_dir, smollm2_path, squad_head) -> float:
    """Perplexity of the model without offsets, centering off."""
    return perplexity(build_dir, smollm2_path, squad_head, env={"LLAMA_KV_CENTER": "0"})[0]


def test_centering_is_exact_with_f16_cache(build_dir, base_ppl, offset_model, squad_head):
    base = base_ppl
    cen, log = perplexity(
        build_dir, offset_model, squad_head, env={"LLAMA_KV_CENTER": "1", "LLAMA_KV_CENTER_V": "1"}
    )
    assert re.search(r"KV centering: K offsets in 30 of 30 layers, V offsets in 30", log), log[-3000:]
    assert abs(cen / base - 1) < 2e-3, (base, cen)


def test_centering_off_ignores_offsets(build_dir, base_ppl, offset_model, squad_head):
    base = base_ppl
    off, log = perplexity(build_dir, offset_model, squad_head, env={"LLAMA_KV_CENTER": "0"})
    assert "KV centering:" not in log
    assert off == base


@pytest.mark.parametrize(
    "which,ctk",
    [("calibrated", "polar"), ("stock", "polar"), ("stock", "q4_0"), ("stock", "q8_0"), ("stock", "f16")],
)
def test_centering_default(build_dir, offset_model, smollm2_path, squad_head, which, ctk):
    """On by default for every quantized K type (patch 0015): a calibration file's offsets come
    first; a stock SmolLM2 (no k bias) gets online offsets; an f16 cache stays uncentered."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_KV_CENTER")}
    cmd = [
        str(build_dir / "bin" / "llama-perplexity"),
        "-m",
        str(offset_model if which == "calibrated" else smollm2_path),
        "-f",
        str(squad_head),
        "-c",
        "128",
        "-b",
        "128",  # one sequence per batch: llama-perplexity fits -b / -c sequences into the cache
        "--chunks",
        "1",
        "-fa",
        "on",
        "-ctk",
        ctk,
        "-ctv",
        "f16",
        "-v",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    if ctk == "f16":
        assert "KV centering:" not in out, out[-3000:]
        return
    n_online = 0 if which == "calibrated" else 30
    assert f"K offsets in 30 of 30 layers, V offsets in 0 ({n_online} K offsets measured" in out, out[-3000:]


# Online centering: a model without offsets (SmolLM2 has no k bias) gets its K offsets measured from
# the first ubatch an empty cache stores. They must travel with the state, and K shift must use them.

STATE_MAGIC = b"PVCK" + N_LAYER.to_bytes(4, "little")  # llama_kv_cache::state_write_center


def offsets(state: bytes) -> np.ndarray:
    """The K offsets a state carries ([N_LAYER, N_EMBD_KV]); the state must have them."""
    i = state.find(STATE_MAGIC)
    assert i >= 0, "the state carries no K offsets"
    i += len(STATE_MAGIC)
    mu = []
    for _ in range(N_LAYER):
        n = int.from_bytes(state[i : i + 4], "little")
        assert n == N_EMBD_KV
        mu.append(np.frombuffer(state[i + 4 : i + 4 + 4 * n], dtype=np.float32))
        i += 4 + 4 * n
    return np.stack(mu)


def with_offsets(state: bytes, mu: np.ndarray) -> bytes:
    i = state.find(STATE_MAGIC) + len(STATE_MAGIC)
    out = bytearray(state)
    for il in range(N_LAYER):
        out[i + 4 : i + 4 + 4 * N_EMBD_KV] = mu[il].astype(np.float32).tobytes()
        i += 4 + 4 * N_EMBD_KV
    return bytes(out)


def test_online_offsets_survive_state_restore(llama_cpp, kv_env, smollm2_path, tokens):
    prompt, cont, other = tokens
    kv_env()
    llm, state = prompted(llama_cpp, smollm2_path, prompt)
    mu = offsets(state.llama_state)
    assert np.abs(mu).max() > 0.1, "no offsets measured"
    llm.eval(cont)
    want = logits(llama_cpp, llm)

    # a fresh context adopts the state's offsets: the same logits, bit for bit
    assert np.array_equal(restored_logits(llama_cpp, smollm2_path, state, cont), want)

    # the offsets in the state are what makes it exact: other offsets give other logits
    state.llama_state = with_offsets(state.llama_state, mu + 1.0)
    assert np.abs(restored_logits(llama_cpp, smollm2_path, state, cont) - want).max() > 0.05

    # a new conversation (the cache emptied) measures new offsets
    llm.reset()
    llm.eval(other)
    mu_other = offsets(llm.save_state().llama_state)
    assert not np.array_equal(mu_other, mu)
    assert np.abs(mu_other - mu).max() < np.abs(mu).max()  # the same model: similar means


def seq_state(llama_cpp, llm, seq_id=0) -> bytes:
    """llama_state_seq_get_data: what llama-server's slot save writes."""
    n = llama_cpp.llama_state_seq_get_size(llm.ctx, seq_id)
    buf = (ctypes.c_uint8 * n)()
    assert llama_cpp.llama_state_seq_get_data(llm.ctx, buf, n, seq_id) == n
    return bytes(buf)


def test_online_offsets_survive_sequence_restore(llama_cpp, kv_env, smollm2_path, tokens):
    prompt, cont, _ = tokens
    kv_env()
    llm = new_llama(llama_cpp, smollm2_path)
    llm.eval(prompt)
    state = seq_state(llama_cpp, llm)
    assert np.abs(offsets(state)).max() > 0.1
    llm.eval(cont)
    want = logits(llama_cpp, llm)

    llm2 = new_llama(llama_cpp, smollm2_path)
    buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
    assert llama_cpp.llama_state_seq_set_data(llm2.ctx, buf, len(state), 0) == len(state)
    llm2.n_tokens = len(prompt)
    llm2.eval(cont)
    assert np.array_equal(logits(llama_cpp, llm2), want)


def test_state_with_offsets_refused_without_centering(llama_cpp, kv_env, smollm2_path, tokens):
    prompt, _, _ = tokens
    kv_env()
    llm = new_llama(llama_cpp, smollm2_path)
    llm.eval(prompt)
    state = llm.save_state()
    kv_env(LLAMA_KV_CENTER="0")
    llm2 = new_llama(llama_cpp, smollm2_path)
    with pytest.raises(RuntimeError, match="Failed to set llama state data"):
        llm2.load_state(state)


def test_center_off_measures_nothing(llama_cpp, kv_env, smollm2_path, tokens):
    prompt, cont, _ = tokens
    results = {}
    for name, env in {
        "off": {"LLAMA_KV_CENTER": "0"},
        "no_online": {"LLAMA_KV_CENTER_ONLINE": "0"},  # SmolLM2 has no k bias: nothing to subtract
        "online": {},
    }.items():
        kv_env(**env)
        llm = new_llama(llama_cpp, smollm2_path)
        llm.eval(prompt)
        state = llm.save_state().llama_state
        llm.eval(cont)
        results[name] = (STATE_MAGIC in state, logits(llama_cpp, llm))
    assert results["off"][0] is False and results["online"][0] is True
    assert np.array_equal(results["off"][1], results["no_online"][1])
    assert np.abs(results["online"][1] - results["off"][1]).max() > 0.01


def test_short_first_batch_keeps_model_offsets(llama_cpp, kv_env, smollm2_path, tokens):
    """Fewer than 16 tokens in the first ubatch: the mean would be mostly the attention sink's key, so
    the cache keeps the model's offsets (SmolLM2: none) for its life, also after longer batches."""
    prompt, _, _ = tokens
    kv_env()
    llm = new_llama(llama_cpp, smollm2_path)
    llm.eval(prompt[:6])
    llm.eval(prompt[6:])
    assert not offsets(llm.save_state().llama_state).any()
    llm.reset()
    llm.eval(prompt[:16])
    assert offsets(llm.save_state().llama_state).any()


def test_k_shift_uses_online_offsets(llama_cpp, kv_env, smollm2_path, tokens):
    """K shift must add the measured offsets back around RoPE: R(k - mu) instead of R(k) - mu is off
    by (R - 1) mu, with |mu| up to ~15 here. With an f16 cache centering changes only rounding, so the
    shifted run matches the uncentered one (measured: KL 0.003, max logit difference 0.55, the same as
    without a shift; with the offsets left out of the shift, a build made for the purpose gave KL 0.25
    and 10.8)."""
    prompt, cont, _ = tokens
    out = {}
    for center in ("0", "1"):
        kv_env(LLAMA_KV_CENTER=center)
        out[center] = k_shift_logits(llama_cpp, new_llama(llama_cpp, smollm2_path, ctk="f16"), prompt, cont)
    kv_env(LLAMA_KV_CENTER="1")
    llm = new_llama(llama_cpp, smollm2_path, ctk="f16")
    llm.eval(prompt)
    assert np.abs(offsets(llm.save_state().llama_state)).max() > 1.0
    p, q = (np.exp(x - x.max()) / np.exp(x - x.max()).sum() for x in (out["0"], out["1"]))
    kl = float(np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30))))
    assert kl < 0.02 and np.abs(out["1"] - out["0"]).max() < 2.0, (kl, np.abs(out["1"] - out["0"]).max())


@pytest.mark.parametrize("n_ubatch", [512, 32])
def test_online_centering_is_exact_in_float32(llama_cpp, kv_env, smollm2_f32, tokens, n_ubatch):
    """With float32 weights and a float32 cache, the logits of every token with online K offsets
    equal those without to float32 rounding (docs/centering-online.md: measured 4e-5 of logits
    up to ~40; the quantized file turns the same rounding into differences of order 1)."""
    prompt, cont, _ = tokens
    scores, states = centered_and_not(llama_cpp, kv_env, smollm2_f32, prompt + cont, n_ubatch)
    assert STATE_MAGIC not in states["0"]
    assert np.abs(offsets(states["1"])).max() > 0.1, "no offsets measured"
    diff = np.abs(scores["1"] - scores["0"]).max()
    assert diff < 1e-3, f"largest logit difference {diff} (max |logit| {np.abs(scores['0']).max()})"


def test_online_centering_in_iswa_cache_is_exact(llama_cpp, kv_env, gemma3_f32, squad_head):
    """Gemma 3 (sliding-window layers: llama.cpp's iSWA cache, two caches; patch 0013): both caches
    measure and carry K offsets, and the logits stay exact in float32 (to its rounding)."""
    vocab = llama_cpp.Llama(model_path=str(gemma3_f32), n_ctx=256, vocab_only=True, verbose=False)
    toks = vocab.tokenize(squad_head.read_text(encoding="utf-8")[:2000].encode())[:104]
    del vocab
    scores, states = centered_and_not(llama_cpp, kv_env, gemma3_f32, toks, 32)
    magic = b"PVCK"
    assert magic not in states["0"]
    assert states["1"].count(magic) == 2, "expected K offsets for the base and the SWA cache"
    for i in (states["1"].find(magic), states["1"].rfind(magic)):
        n_layer = int.from_bytes(states["1"][i + 4 : i + 8], "little")
        n = int.from_bytes(states["1"][i + 8 : i + 12], "little")
        assert n_layer > 0 and n > 0
        mu = np.frombuffer(states["1"][i + 12 : i + 12 + 4 * n], dtype=np.float32)
        assert np.abs(mu).max() > 0.01, "no offsets measured"
    # Gemma's residual stream reaches ~5e3 and carries float32 rounding further than SmolLM2's: in
    # layer 0 the centered logits are the uncentered ones plus a shift constant over the keys to
    # 2e-6, the final logits differ by 5e-4 of their largest (session 6); an offset that is not
    # constant over the keys moves them by order 1 (docs/centering-online.md)
    diff, top = np.abs(scores["1"] - scores["0"]).max(), np.abs(scores["0"]).max()
    assert diff < 2e-3 * top, f"largest logit difference {diff} (max |logit| {top})"


def centered_and_not(llama_cpp, kv_env, model, toks, n_ubatch):
    """Logits of every token and the saved state, online centering off ("0") and on ("1"):
    float32 K/V cache, no flash attention."""
    scores, states = {}, {}
    for center in ("0", "1"):
        kv_env(LLAMA_KV_CENTER=center, LLAMA_KV_CENTER_ONLINE="1")
        llm = llama_cpp.Llama(
            model_path=str(model),
            n_ctx=256,
            n_batch=256,
            n_ubatch=n_ubatch,
            type_k=llama_cpp.GGML_TYPE_F32,
            type_v=llama_cpp.GGML_TYPE_F32,
            flash_attn=False,
            logits_all=True,
            n_threads=2,
            verbose=False,
        )
        llm.eval(toks)
        scores[center] = np.array(llm.scores[: len(toks)], dtype=np.float32)
        states[center] = llm.save_state().llama_state
        del llm
    return scores, states


# A cache that serves several sequences (llama-server's parallel slots; here llama-perplexity with
# -b = 2 x -c, two chunks decoded together as sequences 0 and 1) measures its K offsets once, from a
# built-in text when the context is created (patch 0035), and keeps them for its life.


def chunk_ppls(build_dir, model, text, chunks, env=None, extra=()) -> tuple[list[float], str]:
    """llama-perplexity's running PPL after each chunk: 256-token chunks, a cache for 2 sequences,
    polar K (V f16), and the log (-v)."""
    out = run_ppl(build_dir, model, text, chunks=chunks, batch=512, ctk="polar", env=env, extra=extra)
    ppl = [float(v) for _, v in re.findall(r"\[(\d+)\](\d+\.\d+),", out)]
    assert len(ppl) == chunks, out[-3000:]
    return ppl, out


@pytest.mark.parametrize("layout", [(), ("-kvu",)], ids=["streams", "unified"])
def test_several_sequences_share_offsets_from_the_text(build_dir, kv_env, smollm2_path, squad_head, layout):
    """The first sequence's result is the same whether a second one is decoded beside it: the offsets
    do not come from the batch. They are in effect (not the model's, none for SmolLM2), and a clear of
    the cache's buffers between the chunk pairs (llama-perplexity) keeps them."""
    kv_env()
    alone, log = chunk_ppls(build_dir, smollm2_path, squad_head, 1, extra=layout)
    assert re.search(r"K offsets measured from \d+ tokens of a built-in text", log), log[-3000:]
    # the sink's weight in the offsets: 0 where every sequence keeps its sink key exact (a stream each),
    # 0.25 in a unified cache, where only the sequence in cell 0 does
    weight = re.search(r"first key's weight in the measured K offsets ([\d.]+)", log)
    assert weight and float(weight.group(1)) == (0.25 if layout else 0.0), log[-3000:]
    both, _ = chunk_ppls(build_dir, smollm2_path, squad_head, 2, extra=layout)
    assert both[0] == alone[0]
    model_offsets, _ = chunk_ppls(
        build_dir, smollm2_path, squad_head, 1, {"LLAMA_KV_CENTER_ONLINE": "0"}, layout
    )
    assert model_offsets[0] != alone[0]
    four, _ = chunk_ppls(build_dir, smollm2_path, squad_head, 4, extra=layout)
    assert four[:2] == both
    # zeroed balancing factors (offsets lost in the clear) gave a running PPL in the thousands
    assert max(four) < 1.5 * max(both), four


def test_offsets_from_the_first_batch_would_couple_sequences(build_dir, kv_env, smollm2_path, squad_head):
    """What the shared offsets avoid, so that the test above can fail: LLAMA_KV_CENTER_ONLINE=1 measures
    them from the first batch of all, and the first sequence's result then depends on the second."""
    kv_env()
    env = {"LLAMA_KV_CENTER_ONLINE": "1"}
    alone, _ = chunk_ppls(build_dir, smollm2_path, squad_head, 1, env)
    both, _ = chunk_ppls(build_dir, smollm2_path, squad_head, 2, env)
    assert both[0] != alone[0]


def test_many_sequences_in_a_stream_each(build_dir, kv_env, smollm2_path, squad_head):
    """32 sequences, a stream each (llama-server -np 32): the graph's node budget counts the exact sink
    key's copies per stream and the measuring nodes (the build before patch 0035 aborted here)."""
    kv_env()
    out = run_ppl(build_dir, smollm2_path, squad_head, chunks=1, batch=8192, ctk="polar", ctv="polar")
    assert "n_seq=32" in out and re.search(r"\[1\]\d+\.\d+,", out), out[-3000:]


def test_several_sequences_in_iswa_cache(build_dir, kv_env, gemma3_path, squad_head):
    """Gemma 3 (llama.cpp's iSWA cache: a base and a sliding-window cache): both measure their offsets
    from the built-in text, and the first sequence's result does not depend on the second."""
    kv_env()
    alone, log = chunk_ppls(build_dir, gemma3_path, squad_head, 1)
    assert re.search(r"K offsets measured from \d+ tokens of a built-in text", log), log[-3000:]
    measured = [int(n) for n in re.findall(r"K offsets in (\d+) of \d+ layers", log)]
    assert len(measured) >= 2 and all(n > 0 for n in measured), log[-3000:]
    both, _ = chunk_ppls(build_dir, gemma3_path, squad_head, 2)
    assert both[0] == alone[0]
    model_offsets, _ = chunk_ppls(build_dir, gemma3_path, squad_head, 1, {"LLAMA_KV_CENTER_ONLINE": "0"})
    assert model_offsets[0] != alone[0]


def test_sliding_window_cache_weights_the_sink(build_dir, kv_env, gemma3_path, squad_head):
    """Gemma 3's iSWA cache, one sequence, polar K: with the exact sink key the base cache measures its K
    offsets as the plain mean (weight 0) and the sliding-window cache with the first key at weight 0.5
    (patch 0037); without the exact key both take 0.25. The weight is in effect: the plain mean in both
    caches gives another result."""
    kv_env()
    pattern = r"first key's weight in the measured K offsets ([\d.]+)"

    def weights_and_ppl(env=None):
        out = run_ppl(build_dir, gemma3_path, squad_head, chunks=1, ctk="polar", env=env)
        ppl = re.search(r"Final estimate: PPL = ([\d.]+)", out)
        assert ppl, out[-3000:]
        return {float(w) for w in re.findall(pattern, out)}, float(ppl.group(1))  # (each cache logs it)

    weights, ppl = weights_and_ppl()
    assert weights == {0.0, 0.5}
    assert weights_and_ppl({"LLAMA_KV_EXACT_SINK": "0"})[0] == {0.25}
    plain, ppl_plain = weights_and_ppl({"LLAMA_KV_CENTER_SINK": "0"})
    assert plain == {0.0} and ppl_plain != ppl
