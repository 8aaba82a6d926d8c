"""The exact sink key (patch 0024, LLAMA_KV_EXACT_SINK) in the patched llama.cpp.

With a polar/polar3 K cache, the key stored in cell 0 of a stream (a fresh sequence's first token: the
attention sink, about 30 % of the attention mass) is also kept in f32 beside the cache, and flash
attention uses it for key 0 instead of its codes (ggml_flash_attn_ext_set_k0); without flash attention the
graph writes its scores over key 0's (patch 0033). KLD of polar K on SmolLM2
0.0255 -> 0.0208 (docs/quality-levers.md). It must be on by default for polar K only, replace key 0 (not
add to it, not another key), travel with saved states (whole and per sequence) and follow a K shift.
The CUDA kernels' use of it is checked against the CPU by test-backend-ops (cases with k0=1,
scripts/cuda_llama_check.sh) and by scripts/fa_polar_harness.cu.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from kv_llama import logits, new_llama, prompted

pytestmark = pytest.mark.build

N_LAYER, N_EMBD_KV = 30, 192  # SmolLM2-135M: 3 KV heads x 64
SINK_MAGIC = (0x53435650).to_bytes(4, "little")  # "PVCS", llama_kv_cache::state_write
# the last part of a state of one stream whose first cell is cell 0 (llama_kv_cache::state_write_k0):
# flag 1, then per layer n = N_EMBD_KV and the key
K0_TAIL = 4 + N_LAYER * (4 + 4 * N_EMBD_KV)


def k0_rows(state: bytes) -> np.ndarray:
    """The exact sink keys a state carries at its end ([N_LAYER, N_EMBD_KV])."""
    assert SINK_MAGIC in state, "the state carries no exact sink key"
    tail = state[-K0_TAIL:]
    assert int.from_bytes(tail[:4], "little") == 1, "the state's first cell is not cell 0"
    rows, i = [], 4
    for _ in range(N_LAYER):
        assert int.from_bytes(tail[i : i + 4], "little") == N_EMBD_KV
        rows.append(np.frombuffer(tail[i + 4 : i + 4 + 4 * N_EMBD_KV], dtype=np.float32))
        i += 4 + 4 * N_EMBD_KV
    return np.stack(rows)


def with_k0(state: bytes, rows: np.ndarray | None) -> bytes:
    """The state with other exact sink keys, or (rows None) with none: flag 0, the reader then decodes
    cell 0's codes (as if the key had never been kept)."""
    head = state[:-K0_TAIL]
    if rows is None:
        return head + (0).to_bytes(4, "little")
    out = bytearray((1).to_bytes(4, "little"))
    for r in rows.astype(np.float32):
        out += N_EMBD_KV.to_bytes(4, "little") + r.tobytes()
    return head + bytes(out)


def set_state(state, data: bytes):
    """A llama_cpp.LlamaState with other bytes (the binding checks the size it was saved with)."""
    state.llama_state = data
    state.llama_state_size = len(data)


def load(llama_cpp, model, state, ctk="polar"):
    llm = new_llama(llama_cpp, model, ctk=ctk)
    llm.load_state(state)
    return llm


def kl(a: np.ndarray, b: np.ndarray) -> float:
    p, q = (np.exp(x - x.max()) / np.exp(x - x.max()).sum() for x in (a, b))
    return float(np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30))))


@pytest.mark.parametrize("ctk", ["polar", "polar3"])
def test_on_by_default_for_polar_k(llama_cpp, kv_env, smollm2_path, tokens, ctk):
    prompt, cont, _ = tokens
    out = {}
    for name, env in {"default": {}, "off": {"LLAMA_KV_EXACT_SINK": "0"}}.items():
        kv_env(**env)
        llm = new_llama(llama_cpp, smollm2_path, ctk=ctk)
        llm.eval(prompt)
        state = llm.save_state().llama_state
        llm.eval(cont)
        out[name] = (SINK_MAGIC in state, logits(llama_cpp, llm))
    assert out["default"][0] and not out["off"][0]
    assert np.abs(out["default"][1] - out["off"][1]).max() > 0.01


@pytest.mark.parametrize("ctk", ["polar", "polar3"])
def test_used_without_flash_attention(llama_cpp, kv_env, smollm2_path, tokens, ctk):
    """Without flash attention (llama_cpp.Llama's default flash_attn=False) key 0 comes from the exact copy
    too (patch 0033: its scores written over kq's column 0): the logits move with LLAMA_KV_EXACT_SINK (the
    offsets held the same), toward flash attention's. Before the patch the copy was kept and not read there,
    and the two runs were the same (SmolLM2 polar K KLD 0.0352 without flash attention, 0.0199 with;
    docs/quality-levers.md, session 20)."""
    prompt, cont, _ = tokens
    out = {}
    for name, env, fa in (
        ("fa", {}, True),
        ("exact", {}, False),
        # the same offsets as with the exact key (its sink weight 0), key 0 from its codes
        ("codes", {"LLAMA_KV_EXACT_SINK": "0", "LLAMA_KV_CENTER_SINK": "0"}, False),
    ):
        kv_env(**env)
        llm = new_llama(llama_cpp, smollm2_path, ctk=ctk, flash_attn=fa)
        llm.eval(prompt + cont)
        out[name] = logits(llama_cpp, llm)
    assert np.abs(out["exact"] - out["codes"]).max() > 0.01
    assert kl(out["fa"], out["exact"]) < kl(out["fa"], out["codes"]), (
        kl(out["fa"], out["exact"]),
        kl(out["fa"], out["codes"]),
    )


def test_off_for_other_k_types(llama_cpp, kv_env, smollm2_path, tokens):
    """Only the polar types' GPU kernels take the exact key: asked for with q4_0 K, it is left off (a
    warning), bit for bit the same run."""
    prompt, cont, _ = tokens
    out = {}
    for v in ("0", "1"):
        kv_env(LLAMA_KV_EXACT_SINK=v)
        llm = new_llama(llama_cpp, smollm2_path, ctk="q4_0")
        llm.eval(prompt)
        state = llm.save_state().llama_state
        llm.eval(cont)
        out[v] = (SINK_MAGIC in state, logits(llama_cpp, llm))
    assert not out["0"][0] and not out["1"][0]
    assert np.array_equal(out["0"][1], out["1"][1])


@pytest.mark.parametrize("n_prompt", [96, 600])
def test_replaces_key_0(llama_cpp, kv_env, smollm2_path, smollm2_f32, squad_head, n_prompt):
    """One state, three ways to take one more token: with its exact keys (A); with cell 0's codes decoded
    as the exact key (B: the state's keys dropped); in a context without the exact key, reading its
    codes (C). B must equal C up to float rounding and A must differ by far more: the exact key replaces
    key 0 (not added to it, not another key). One token: the CPU's plain decode at 96 tokens, its split-KV
    decode at 600 (> 512 keys). The model's weights are float32 (smollm2_f32): B's score of key 0 is a
    float32 dot product of the decoded key, C's the polar dot product of its codes, and they may round
    apart, which the Q4_1 file amplifies to order 1 (docs/centering-online.md). Measured (session 39, an
    AVX2-only AMD EPYC, 96 tokens): B - C 0.82 with the Q4_1 file, 0.009 with float32 weights, A - C
    1.0-1.3; the Q4_1 file's B and C had been equal bit for bit on AVX-512 machines."""
    llm0 = llama_cpp.Llama(model_path=str(smollm2_path), n_ctx=1024, vocab_only=True, verbose=False)
    toks = llm0.tokenize(squad_head.read_text(encoding="utf-8").encode())
    assert len(toks) > n_prompt + 1
    prompt, cont = toks[:n_prompt], toks[n_prompt : n_prompt + 1]

    def make(env):
        kv_env(**env)
        return llama_cpp.Llama(
            model_path=str(smollm2_f32),
            n_ctx=1024,
            n_batch=1024,
            type_k=llama_cpp.GGML_TYPE_POLAR,
            type_v=llama_cpp.GGML_TYPE_F16,
            flash_attn=True,
            n_threads=2,
            verbose=False,
        )

    def cont_logits(llm):
        llm.eval(cont[:1])
        return logits(llama_cpp, llm)

    llm = make({})
    llm.eval(prompt)
    state = llm.save_state()
    rows = k0_rows(state.llama_state)
    want = cont_logits(llm)

    out = {}
    for name, env, st in (
        ("A", {}, state.llama_state),
        ("B", {}, with_k0(state.llama_state, None)),
        ("C", {"LLAMA_KV_EXACT_SINK": "0"}, state.llama_state),
    ):
        llm = make(env)
        set_state(state, st)
        llm.load_state(state)
        out[name] = cont_logits(llm)
    assert np.array_equal(out["A"], want)
    bc, ac = (float(np.abs(out[x] - out["C"]).max()) for x in "BA")
    assert bc < 0.05 and ac > 0.3, (bc, ac)
    assert np.abs(rows).max() > 0.1


def test_survives_state_restore(llama_cpp, kv_env, smollm2_path, tokens):
    prompt, cont, other = tokens
    kv_env()
    llm, state = prompted(llama_cpp, smollm2_path, prompt)
    rows = k0_rows(state.llama_state)
    llm.eval(cont)
    want = logits(llama_cpp, llm)

    # a fresh context adopts the state's exact keys: the same logits, bit for bit
    llm2 = load(llama_cpp, smollm2_path, state)
    llm2.eval(cont)
    assert np.array_equal(logits(llama_cpp, llm2), want)

    # the keys in the state are what attention uses: other keys give other logits
    set_state(state, with_k0(state.llama_state, rows + 0.5))
    llm3 = load(llama_cpp, smollm2_path, state)
    llm3.eval(cont)
    assert np.abs(logits(llama_cpp, llm3) - want).max() > 0.01

    # a new conversation keeps its own first key
    llm.reset()
    llm.eval(other)
    assert not np.array_equal(k0_rows(llm.save_state().llama_state), rows)


def test_survives_sequence_restore(llama_cpp, kv_env, smollm2_path, tokens):
    """llama_state_seq_get/set_data (llama-server's slot save): the sequence's cell 0 lands in cell 0 of
    an empty context and takes its exact key along."""
    prompt, cont, _ = tokens
    kv_env()
    llm = new_llama(llama_cpp, smollm2_path)
    llm.eval(prompt)
    n = llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
    buf = (ctypes.c_uint8 * n)()
    assert llama_cpp.llama_state_seq_get_data(llm.ctx, buf, n, 0) == n
    assert np.abs(k0_rows(bytes(buf))).max() > 0.1
    llm.eval(cont)
    want = logits(llama_cpp, llm)

    llm2 = new_llama(llama_cpp, smollm2_path)
    assert llama_cpp.llama_state_seq_set_data(llm2.ctx, buf, n, 0) == n
    llm2.n_tokens = len(prompt)
    llm2.eval(cont)
    assert np.array_equal(logits(llama_cpp, llm2), want)


def decoded_k0(llama_cpp, model, state) -> np.ndarray:
    """Cell 0's codes decoded: the state loaded without its exact keys (the reader then decodes the codes
    into k0), saved again."""
    set_state(state, with_k0(state.llama_state, None))
    return k0_rows(load(llama_cpp, model, state).save_state().llama_state)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


SHIFT = 100


def test_follows_k_shift(llama_cpp, kv_env, smollm2_path, tokens):
    """Every position moved by 100 (a K shift of all cells, cell 0 too): the exact key must be rotated
    like cell 0's codes. Before the shift the exact key differs from cell 0's decoded codes by the
    quantization error (rms 0.22); after it, from the shifted and re-encoded codes by that and the
    re-encoding (0.28), while the unshifted key is far from them (0.52); and what the exact key moved
    by follows what the codes moved by (correlation 0.89). A key left unshifted fails all but the
    first. (The logits alone would not tell: the sink's attention hardly depends on its distance, so
    measured, a key 7 positions off changed the KL of the continuation by 5 %.)"""
    prompt, cont, _ = tokens
    kv_env()
    llm, pre = prompted(llama_cpp, smollm2_path, prompt)
    rows_pre = k0_rows(pre.llama_state)
    dec_pre = decoded_k0(llama_cpp, smollm2_path, pre)
    mem = llama_cpp.llama_get_memory(llm.ctx)
    llama_cpp.llama_memory_seq_add(mem, 0, 0, -1, SHIFT)
    llm.n_tokens = len(prompt) + SHIFT
    llm.eval(cont[:1])  # the shift is applied before this token
    post = llm.save_state()
    rows_post = k0_rows(post.llama_state)
    dec_post = decoded_k0(llama_cpp, smollm2_path, post)
    err_pre, err_post, stale = rms(rows_pre - dec_pre), rms(rows_post - dec_post), rms(rows_pre - dec_post)
    moved = np.corrcoef((rows_post - rows_pre).ravel(), (dec_post - dec_pre).ravel())[0, 1]
    assert 0 < err_pre and err_post < 1.5 * err_pre, (err_pre, err_post)
    assert stale > 1.5 * err_post, (stale, err_post)
    assert moved > 0.8, moved
