"""Shared fixtures: the patched llama.cpp build, the data files, the gpu/build markers.

Policy for missing prerequisites (build, model, SQuAD text): the test is skipped, unless
KVPOLAR_REQUIRE_BUILD=1 (set by ./scripts/test.sh, which bootstraps everything first), in
which case it fails with the message saying how to create the missing piece.

Markers:
  gpu    skipped when cupy is not importable or no CUDA device is visible
  build  skipped/failed (see policy) when <repo>/build/bin is absent
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import pytest

from kvpolar import paths

REPO = Path(__file__).resolve().parent.parent


def require_build() -> bool:
    return os.environ.get("KVPOLAR_REQUIRE_BUILD", "") not in ("", "0", "false", "no")


def _missing(msg: str):
    if require_build():
        pytest.fail(f"{msg} (KVPOLAR_REQUIRE_BUILD=1)", pytrace=False)
    pytest.skip(msg)


# Point llama_cpp (llama-cpp-python) at this checkout's build before any test imports it.
try:
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(paths.build_dir() / "bin"))
except FileNotFoundError:
    pass


@functools.lru_cache(maxsize=1)
def _gpu_status() -> str | None:
    """None when a CUDA device is usable through cupy, else the reason it is not."""
    if importlib.util.find_spec("cupy") is None:
        return "cupy is not installed"
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # any CUDA/driver failure means "no GPU"
        return f"no usable CUDA device ({type(e).__name__}: {e})"
    return None if n > 0 else "no CUDA device visible"


def pytest_collection_modifyitems(config, items):
    gpu_items = [it for it in items if it.get_closest_marker("gpu")]
    if gpu_items:
        reason = _gpu_status()
        if reason:
            for it in gpu_items:
                it.add_marker(pytest.mark.skip(reason=f"gpu test: {reason}"))
    build_items = [it for it in items if it.get_closest_marker("build")]
    if build_items and not require_build():
        try:
            paths.build_dir()
        except FileNotFoundError as e:
            for it in build_items:
                it.add_marker(pytest.mark.skip(reason=str(e)))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def build_dir() -> Path:
    """<repo>/build (a link to the cached patched llama.cpp build); binaries in build/bin."""
    try:
        return paths.build_dir()
    except FileNotFoundError as e:
        _missing(str(e))


def _data(name: str) -> Path:
    try:
        return paths.data_file(name)
    except FileNotFoundError as e:
        _missing(str(e))


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF (the default model)."""
    return _data(paths.SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """Gemma 3 270M Q4_K_M GGUF: sliding-window layers (llama.cpp's iSWA cache), head size 256."""
    return _data(paths.GEMMA3_GGUF)


def _f32_copy(tmp_path_factory, src: Path, name: str) -> Path:
    """src with every tensor dequantized to float32 (scripts/synth_gguf.py dequant): float32 matrix
    products, no 8-bit rounding of the activations, so a float32 rounding change in attention stays one
    in the logits (the quantized file amplifies it to order 1: docs/centering-online.md)."""
    import synth_gguf

    out = tmp_path_factory.mktemp("f32") / name
    synth_gguf.dequant(src, out)
    return out


@pytest.fixture(scope="session")
def smollm2_f32(tmp_path_factory, smollm2_path) -> Path:
    return _f32_copy(tmp_path_factory, smollm2_path, "smollm2-f32.gguf")


@pytest.fixture(scope="session")
def gemma3_f32(tmp_path_factory, gemma3_path) -> Path:
    return _f32_copy(tmp_path_factory, gemma3_path, "gemma3-f32.gguf")


@pytest.fixture(scope="session")
def squad_text_path() -> Path:
    """SQuAD v2 dev articles joined as ' = Title = ' + paragraphs (~971 KB of prose)."""
    return _data(paths.SQUAD_TXT)


@pytest.fixture(scope="session")
def squad_head(squad_text_path, tmp_path_factory) -> Path:
    """The first ~40 KB of the SQuAD text (enough for 3 chunks of 512 tokens, ~8 KB): short
    perplexity runs read only this instead of tokenizing the whole file."""
    path = tmp_path_factory.mktemp("ppl") / "squad_head.txt"
    path.write_text(squad_text_path.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def cuda_torch():
    """torch, when CuPy and a CUDA device are usable; GPU tests skip cleanly otherwise."""
    pytest.importorskip("cupy")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch


@pytest.fixture(scope="session")
def llama_cpp(build_dir):
    """The llama-cpp-python binding, loaded against this checkout's build."""
    try:
        import llama_cpp
    except ImportError as e:
        pytest.fail(f"llama_cpp is not installed in this venv ({e}); run python3 scripts/bootstrap.py llama")
    return llama_cpp


@pytest.fixture
def kv_env(monkeypatch):
    """kv_env(**env): clear the centering/balancing variables a new context reads
    (kv_llama.KV_ENV_VARS), then set env (in this process; undone after the test)."""
    from kv_llama import KV_ENV_VARS

    def set_env(**env):
        for k in KV_ENV_VARS:
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)

    return set_env


@pytest.fixture(scope="module")
def tokens(llama_cpp, smollm2_path, squad_head):
    """SmolLM2 tokens of the SQuAD head: (prompt 96, continuation 8, another text 96)."""
    llm = llama_cpp.Llama(model_path=str(smollm2_path), n_ctx=256, vocab_only=True, verbose=False)
    toks = llm.tokenize(squad_head.read_text(encoding="utf-8")[:2000].encode())
    assert len(toks) > 150
    return toks[:96], toks[96:104], toks[104:200]


@pytest.fixture
def fake_bin(tmp_path) -> Path:
    """A folder holding the stand-in llama-perplexity of tests/fake_perplexity.py."""
    import fake_perplexity

    return fake_perplexity.make(tmp_path / "fakebin")
