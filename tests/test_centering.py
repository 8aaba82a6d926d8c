"""KV-cache centering in the patched llama.cpp: exact under softmax, on by default for polar K.

A model copy gets arbitrary per-layer offsets (blk.N.attn_{k,v}.center, the tensors
`kvpolar calibrate` writes). With an f16 cache, subtracting any fixed vector from the keys
(and from the values, adding it back to the output) must leave the perplexity unchanged up
to f16 rounding of the shifted values.
"""

from __future__ import annotations

import os
import re
import subprocess

import numpy as np
import pytest

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


def perplexity(build_dir, model, text, env=None, ctk="f16", ctv="f16"):
    cmd = [
        str(build_dir / "bin" / "llama-perplexity"),
        "-m",
        str(model),
        "-f",
        str(text),
        "-c",
        "256",
        "--chunks",
        "3",
        "-b",
        "256",
        "-t",
        str(os.cpu_count() or 2),
        "-fa",
        "on",
        "-ctk",
        ctk,
        "-ctv",
        ctv,
        "-v",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **(env or {})), timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
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


def test_centering_default_on_for_polar_k(build_dir, offset_model, squad_head):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_KV_CENTER")}
    cmd = [
        str(build_dir / "bin" / "llama-perplexity"),
        "-m",
        str(offset_model),
        "-f",
        str(squad_head),
        "-c",
        "128",
        "--chunks",
        "1",
        "-fa",
        "on",
        "-ctk",
        "polar",
        "-ctv",
        "f16",
        "-v",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "KV centering: K offsets in 30 of 30 layers, V offsets in 0" in out, out[-3000:]
