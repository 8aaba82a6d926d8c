"""The low-memory pair's layer policy (patch 0034, LLAMA_KV_LAYER_POLICY) in the patched llama.cpp.

With -ctk polar -ctv polar3 (3.75 bits/elem) the cache gives V polar to the first round(L / 10) of the
model's L layers with a KV cache and K polar3 to the last as many: the same bytes, KLD -12 % on SmolLM2 and
-11 % on Qwen2.5 (docs/quality-levers.md, session 21; scripts/layer_policy.py). It must be on by default for
that pair only, change the result, keep the cache's size, travel with saved states (a state records each
layer's types, so a context without the policy refuses it) and reject a mistyped setting by name.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from kv_llama import logits, new_llama, restored_logits
from test_llama_cpp import PROMPT, binary, run

pytestmark = pytest.mark.build


@pytest.fixture
def bindir(build_dir):
    return build_dir / "bin"


def completion_log(bindir, model, ctk, ctv, env=None, check=True):
    return run(
        [
            binary(bindir, "llama-completion"), "-m", model, "-p", PROMPT, "-n", 2, "-ctk", ctk, "-ctv", ctv,
            "-fa", "on", "-no-cnv", "--no-warmup", "-c", 256, "-t", 2, "-lv", 4,
        ],
        env=env,
        check=check,
        timeout=120,
    )  # fmt: skip


def size_line(text: str) -> tuple[float, str, str]:
    m = re.search(r"llama_kv_cache: size = +([\d.]+) MiB .*K \(([^)]*)\): .*V \(([^)]*)\)", text)
    assert m, text[-2000:]
    return float(m.group(1)), m.group(2), m.group(3)


def test_types_per_layer_and_the_same_size(bindir, smollm2_path, kv_env):
    kv_env()  # none of the KV settings from the caller's environment
    on = completion_log(bindir, smollm2_path, "polar", "polar3").stderr
    off = completion_log(bindir, smollm2_path, "polar", "polar3", {"LLAMA_KV_LAYER_POLICY": "0"}).stderr
    assert "KV layer policy: V polar in the first 3 and K polar3 in the last 3 of the model's 30 layers" in on
    size_on, k_on, v_on = size_line(on)
    size_off, k_off, v_off = size_line(off)
    assert (k_on, v_on) == ("polar x27 + polar3 x3", "polar x3 + polar3 x27")
    assert (k_off, v_off) == ("polar", "polar3") and "KV layer policy" not in off
    assert size_on == size_off  # 3 layers' V 1 bit an element more, 3 layers' K 1 less
    for ctk, ctv in (("polar", "polar"), ("polar", "f16"), ("polar3", "polar3")):
        text = completion_log(bindir, smollm2_path, ctk, ctv).stderr
        assert "KV layer policy" not in text and size_line(text)[1:] == (ctk, ctv)


def test_a_mistyped_setting_is_an_error_naming_it(bindir, smollm2_path, kv_env):
    kv_env()
    p = completion_log(bindir, smollm2_path, "polar", "polar3", {"LLAMA_KV_LAYER_POLICY": "on"}, check=False)
    assert p.returncode != 0
    assert "LLAMA_KV_LAYER_POLICY=on: expected 0 (off) or 1 (on)" in p.stderr, p.stderr[-2000:]


def test_changes_the_result_and_travels_with_the_state(llama_cpp, kv_env, smollm2_path, tokens):
    prompt, cont, _ = tokens
    out = {}
    for name, env in {"on": {}, "off": {"LLAMA_KV_LAYER_POLICY": "0"}}.items():
        kv_env(**env)
        llm = new_llama(llama_cpp, smollm2_path, ctv="polar3")
        llm.eval(prompt)
        state = llm.save_state()
        llm.eval(cont)
        out[name] = (state, logits(llama_cpp, llm))
    assert np.abs(out["on"][1] - out["off"][1]).max() > 0.01
    assert out["on"][0].llama_state_size == out["off"][0].llama_state_size  # the same bytes per cell
    # restored where the policy is on: the same logits, bit for bit
    kv_env()
    assert np.array_equal(
        restored_logits(llama_cpp, smollm2_path, out["on"][0], cont, ctv="polar3"), out["on"][1]
    )
    # a context without the policy holds other types in 6 layers: it refuses the state
    kv_env(LLAMA_KV_LAYER_POLICY="0")
    llm = new_llama(llama_cpp, smollm2_path, ctv="polar3")
    with pytest.raises(RuntimeError):
        llm.load_state(out["on"][0])
