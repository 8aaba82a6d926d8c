"""The patched llama.cpp with polar/polar3 KV caches: its own tests, generation, perplexity, guards.

Runs binaries of the patched build (<repo>/build/bin or $KVPOLAR_BUILD/bin) on the CPU:
  - test-backend-ops -b CPU for SET_ROWS, GET_ROWS, CPY, MUL_MAT, SET and FLASH_ATTN_EXT with the
    polar types (with only a CPU this compares the fast paths against the CPU reference path:
    crash-freedom, shapes and the tiled / split-KV / GQA flash-attention paths),
  - test-quantize-fns,
  - greedy generation with SmolLM2 and a polar K (and V) cache against an f16 cache,
  - a short llama-perplexity run,
  - the context-creation guards (quantized V without flash attention, head size not a multiple
    of the block size) and a K shift with the Hadamard rotation disabled.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.build

POLAR_TYPES = ("polar", "polar3")
PROMPT = "The capital of France is"


def run(cmd, timeout=600, env=None, check=True) -> subprocess.CompletedProcess:
    """Run a binary; on failure show the command and the tail of its output."""
    full_env = {**os.environ, **(env or {})}
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and p.returncode != 0:
        tail = (p.stdout[-3000:] + "\n--- stderr ---\n" + p.stderr[-3000:]).strip()
        pytest.fail(f"{' '.join(map(str, cmd))} exited with {p.returncode}:\n{tail}", pytrace=False)
    return p


@pytest.fixture(scope="module")
def bindir(build_dir) -> Path:
    return build_dir / "bin"


def binary(bindir: Path, name: str) -> Path:
    path = bindir / name
    if not path.exists():
        pytest.fail(
            f"{path} is missing from the build; rebuild with python3 scripts/bootstrap.py llama",
            pytrace=False,
        )
    return path


# ----------------------------------------------------------------------------------------------
# llama.cpp's own tests

# (op, params regex): small selections of the cases test-backend-ops generates for the polar
# types (a full FLASH_ATTN_EXT sweep per type takes ~1.5 min on 2 cores; these take seconds)
BACKEND_OPS = [
    ("SET_ROWS", "polar"),
    ("GET_ROWS", "polar"),
    ("CPY", "polar"),
    ("MUL_MAT", "polar"),
    ("SET", "polar"),  # KQ with the exact sink key's scores set over column 0 (patches 0033, 0038)
    # the polar x polar/polar3/f16 block: vec path (nb=2), tiled prefill (nb=64,67), split-KV
    # decode with GQA (nb=1, kv=640/1024)
    ("FLASH_ATTN_EXT", r"nh=(2|3),nr23=\[(2|3),1\],kv=(640|1024),"),
    # the generic sweep at head size 64, one setting of the extras, each polar type as K=V
    ("FLASH_ATTN_EXT", r"hsk=64,hsv=64,nh=4,nr23=\[1,1\],kv=(113|512),nb=(1|3|32|75),mask=1,sinks=0,"
                       r"max_bias=0.000000,logit_softcap=0.000000,prec=f32,type_K=polar3?,"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("op", "params"), BACKEND_OPS, ids=[f"{op}-{i}" for i, (op, _) in enumerate(BACKEND_OPS)]
)
def test_backend_ops(bindir, op, params):
    p = run([binary(bindir, "test-backend-ops"), "-b", "CPU", "-o", op, "-p", params], timeout=900)
    out = p.stdout + p.stderr
    m = re.search(r"(\d+)/(\d+) tests passed", out)
    assert m, out[-2000:]
    passed, total = int(m.group(1)), int(m.group(2))
    assert total > 0, f"the filter {params!r} selected no {op} test case"
    assert passed == total, out[-4000:]
    assert "FAIL" not in out, out[-4000:]


def test_quantize_fns(bindir):
    p = run([binary(bindir, "test-quantize-fns"), "-v"], timeout=300)
    for name in POLAR_TYPES:
        lines = [ln for ln in p.stdout.splitlines() if ln.strip().startswith(f"{name} ")]
        assert len(lines) >= 3, f"test-quantize-fns did not test {name}:\n{p.stdout[-2000:]}"
        assert all(" ok " in ln for ln in lines), "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# generation and perplexity with SmolLM2


def generate(bindir, model, ctk, ctv, fa, n=32, env=None, extra=()) -> str:
    """Greedy continuation of PROMPT (the generated text only)."""
    cmd = [
        binary(bindir, "llama-completion"), "-m", model, "-p", PROMPT, "-n", n, "--temp", 0, "--top-k", 1,
        "--seed", 1, "-ctk", ctk, "-ctv", ctv, "-fa", fa, "-t", 2, "-c", 512, "-no-cnv",
        "--no-display-prompt", "--no-warmup", "--simple-io", *extra,
    ]  # fmt: skip
    return run(cmd, timeout=300, env=env).stdout.strip()


def divergence(a: list[str], b: list[str]) -> int:
    """Index of the first differing word (len of the shorter when one is a prefix)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


@pytest.fixture(scope="module")
def f16_text(bindir, smollm2_path) -> str:
    text = generate(bindir, smollm2_path, "f16", "f16", "on")
    assert "Paris" in text, text
    return text


@pytest.mark.parametrize(
    ("ctk", "ctv", "fa"),
    [("polar", "polar", "on"), ("polar", "f16", "off"), ("polar3", "polar3", "on"), ("f16", "polar", "on")],
)
def test_greedy_generation(bindir, smollm2_path, f16_text, ctk, ctv, fa, record_property):
    text = generate(bindir, smollm2_path, ctk, ctv, fa)
    ref_words, words = f16_text.split(), text.split()
    at = divergence(ref_words, words)
    record_property("divergence_word", at)
    print(f"-ctk {ctk} -ctv {ctv} -fa {fa}: first {at} of {len(ref_words)} words equal f16's")
    print(f"  f16:  {f16_text!r}\n  this: {text!r}")
    # coherent: words, and the answer
    assert len(words) >= 5, text
    assert sum(w.isascii() for w in words) >= 0.9 * len(words), text
    assert words[0].startswith("Paris"), text
    # After "Paris." the model is unsure what to write next, so any change of the cache, or of the
    # float rounding, can change the continuation: polar K+V with flash attention followed f16 for 9 of
    # 21 words on AVX-512 machines and for 2 on an AVX2-only AMD EPYC (session 39; with float32 weights
    # for 1 there). How closely a cache follows f16 is measured over many tokens instead:
    # test_kld_against_f16.


def llama_perplexity(bindir, model, text_file, ctk, ctv, *extra) -> str:
    """llama-perplexity's output over 3 chunks of 512 tokens of text_file, flash attention on, 2 threads."""
    out = run([
        binary(bindir, "llama-perplexity"), "-m", model, "-f", text_file, "-c", 512, "--chunks", 3, "-b", 512,
        "-ctk", ctk, "-ctv", ctv, "-fa", "on", "-t", 2, *extra,
    ], timeout=600)  # fmt: skip
    return out.stdout + out.stderr


def final_ppl(out: str) -> float:
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    assert m, out[-2000:]
    return float(m.group(1))


@pytest.fixture(scope="module")
def f16_base(bindir, smollm2_path, squad_head, tmp_path_factory) -> tuple[Path, float]:
    """One f16 run: its logits (llama-perplexity --kl-divergence-base) and its perplexity."""
    base = tmp_path_factory.mktemp("kld") / "f16.kld"
    out = llama_perplexity(bindir, smollm2_path, squad_head, "f16", "f16", "--kl-divergence-base", base)
    return base, final_ppl(out)


def test_perplexity(bindir, smollm2_path, squad_head, f16_base, record_property):
    ppl = {"f16": f16_base[1]}
    ppl |= {
        t: final_ppl(llama_perplexity(bindir, smollm2_path, squad_head, t, t)) for t in ("polar", "polar3")
    }
    record_property("ppl", ppl)
    print("perplexity, 3 x 512 tokens of SQuAD, K and V of one type:", ppl)
    assert all(math.isfinite(v) and v > 1 for v in ppl.values()), ppl
    # measured (SmolLM2-135M Q4_1, rotation on, 2 threads): f16 20.98, polar 21.71 (+3.5 %),
    # polar3 25.87 (+23 %); q4_0 22.02 (+5.0 %) and q8_0 21.05 for comparison
    assert ppl["polar"] < 1.06 * ppl["f16"], ppl
    assert ppl["polar3"] < 1.35 * ppl["f16"], ppl


def kld(bindir, model, text_file, ctk, ctv, base) -> tuple[float, float]:
    """(mean KLD, same top-1 %) of llama-perplexity --kl-divergence against the f16 logits in base."""
    out = llama_perplexity(
        bindir, model, text_file, ctk, ctv, "--kl-divergence-base", base, "--kl-divergence"
    )
    m, top = re.search(r"Mean +KLD: +([0-9.]+)", out), re.search(r"Same top p: +([0-9.]+)", out)
    assert m and top, out[-2000:]
    return float(m.group(1)), float(top.group(1))


def test_kld_against_f16(bindir, smollm2_path, squad_head, f16_base, record_property):
    """Teacher-forced, over 3 x 512 tokens: polar K+V against the f16 cache's logits, beside q4_0 K+V in the
    same runs. Measured (session 39, AVX2-only AMD EPYC, 2 threads): polar KLD 0.0192 (same top-1 92.8 %),
    q4_0 0.0313 (91.5 %); each ± 5-6 % of itself."""
    res = {t: kld(bindir, smollm2_path, squad_head, t, t, f16_base[0]) for t in ("polar", "q4_0")}
    record_property("kld", res)
    print("KLD against f16, same top-1 %:", res)
    assert res["polar"][0] < 0.8 * res["q4_0"][0], res
    assert res["polar"][1] >= 88.0, res


# ----------------------------------------------------------------------------------------------
# guards


def test_quantized_v_needs_flash_attention(bindir, smollm2_path):
    p = run([
        binary(bindir, "llama-completion"), "-m", smollm2_path, "-p", PROMPT, "-n", 4,
        "-ctk", "f16", "-ctv", "polar", "-fa", "off", "-no-cnv", "--no-warmup",
    ], check=False, timeout=120)  # fmt: skip
    assert p.returncode != 0
    assert "quantized V cache requires flash_attn" in p.stderr, p.stderr[-2000:]


def write_tiny_llama(path: Path, head_dim: int = 80, n_head: int = 2, n_vocab: int = 64) -> Path:
    """A 1-layer llama GGUF with random F32 weights and no vocabulary (only context creation is
    exercised), head size `head_dim`."""
    import gguf

    n_embd = head_dim * n_head
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_block_count(1)
    w.add_feed_forward_length(64)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("none")

    def t(name, *shape):  # numpy shape = reversed ggml ne
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    t("token_embd.weight", n_vocab, n_embd)
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(n_embd, np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(n_embd, np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        t(f"blk.0.{name}.weight", n_embd, n_embd)
    t("blk.0.ffn_gate.weight", 64, n_embd)
    t("blk.0.ffn_up.weight", 64, n_embd)
    t("blk.0.ffn_down.weight", n_embd, 64)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_head80(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-head80.gguf")


@pytest.mark.parametrize("fa", ["on", "off"])
@pytest.mark.parametrize("name", POLAR_TYPES)
def test_head_size_guard(bindir, tiny_head80, name, fa):
    """Head size 80 with a 64-block type fails at context creation, also without flash attention
    (where it used to be accepted and compute on partial blocks). llama-bench -v logs synchronously."""
    p = run([
        binary(bindir, "llama-bench"), "-m", tiny_head80, "-p", 8, "-n", 0, "-r", 1, "-v",
        "-ctk", name, "-ctv", "f16", "-fa", "1" if fa == "on" else "0",
    ], check=False, timeout=120)  # fmt: skip
    assert p.returncode != 0, p.stdout[-1000:]
    msg = (
        f"llama_init_from_model: K cache type {name} stores blocks of 64 values, which does not divide the "
        "head size 80 of layer 0; use -ctk f16 or bf16 for this model"
    )
    assert msg in p.stdout + p.stderr, p.stderr[-2000:]


def test_head_size_ok_with_f16(bindir, tiny_head80):
    """The tiny model itself is fine: the guard is what fails above."""
    run(
        [
            binary(bindir, "llama-bench"),
            "-m",
            tiny_head80,
            "-p",
            8,
            "-n",
            0,
            "-r",
            1,
            "-ctk",
            "f16",
            "-fa",
            "1",
        ],
        timeout=120,
    )


@pytest.mark.parametrize("rot_disable", ["1", "0"])
def test_k_shift_polar(bindir, smollm2_path, rot_disable):
    """Context shift rotates the stored keys (dequantize, RoPE, requantize); with the Hadamard
    rotation disabled the rotation matrix is null and must be skipped, not dereferenced (without
    the fix: segmentation fault). 256 is the smallest context llama.cpp makes, so 300 tokens shift."""
    text = generate(
        bindir, smollm2_path, "polar", "polar", "on", n=300, env={"LLAMA_ATTN_ROT_DISABLE": rot_disable},
        extra=("-c", 256, "--context-shift", "--ignore-eos"),
    )  # fmt: skip
    assert len(text.split()) > 100, text
