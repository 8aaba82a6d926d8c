"""A few tokens through every built tool and the Python binding, once per build and machine.

A build that compiles can still crash where it runs (an instruction the CPU advertises but
traps, a broken shared library). Each tool runs in a subprocess with `-ctk polar -ctv polar`
on the default model; one that fails stops the set-up with the tool, the signal or exit code,
the last lines of its output and what to try. A passing run is recorded in the build dir
(kvpolar-smoke.json) with the build key and this machine's CPU identity, so a warm set-up does
not repeat it and a cache shared with another machine does.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

from kvpolar.atomic import atomic_write_text
from kvpolar.paths import SMOLLM2_GGUF, SQUAD_TXT, data_dir

from .cpu import cpu_identity_digest
from .data import fetch_smoke_data
from .util import BootstrapError, log, signal_name

SMOKE_FILE = "kvpolar-smoke.json"
TIMEOUT_S = 180
PROMPT = "The capital of France is"

BINDING_CODE = r"""
import sys
import llama_cpp
from llama_cpp import Llama
polar = llama_cpp.GGML_TYPE_POLAR
llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=int(sys.argv[2]), type_k=polar, type_v=polar,
            flash_attn=True, verbose=False)
out = llm(sys.argv[3], max_tokens=4, temperature=0.0)
print(repr(out["choices"][0]["text"]))
"""


def _hint(sig: str | None) -> str:
    if sig == "SIGILL":
        return (
            "SIGILL: the binary executed an instruction this CPU cannot run. The set-up enables only "
            "the instruction sets its probe programs executed (see the cmake flags in "
            "build/kvpolar-build.json); delete $KVPOLAR_CACHE/cpu-probe to probe again, or turn one "
            "off by hand, e.g. KVPOLAR_CMAKE_ARGS='-DGGML_AVX512=OFF' python3 scripts/bootstrap.py all."
        )
    if sig in ("SIGSEGV", "SIGBUS", "SIGABRT"):
        return (
            f"{sig}: a crash in llama.cpp or the patches. Rerun the command above by hand to see it; "
            "with -ctk f16 -ctv f16 to tell whether the polar cache is involved; LLAMA_ARG_REPACK=0 "
            "to rule out the weight repacking; then report it with the output."
        )
    return "Rerun the command above by hand to see its full output."


def _check(name: str, cmd: list[str], env: dict | None = None) -> float:
    t0 = time.time()
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            errors="replace",
            env=env,
            timeout=TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise BootstrapError(
            f"smoke run: {name} did not finish within {TIMEOUT_S} s\n  command: {' '.join(cmd)}\n"
            "What to try: run it by hand; a hang at start-up often means too many threads for this machine."
        ) from None
    if proc.returncode != 0:
        sig = signal_name(-proc.returncode) if proc.returncode < 0 else None
        how = f"was killed by {sig}" if sig else f"exited with code {proc.returncode}"
        tail = "\n".join((proc.stdout + "\n" + proc.stderr).strip().splitlines()[-15:])
        raise BootstrapError(
            f"smoke run: {name} {how}\n  command: {' '.join(cmd)}\n"
            f"--- last lines ---\n{tail}\n------------------\n"
            f"What to try: {_hint(sig)}"
        )
    return time.time() - t0


def smoke_commands(build: Path, threads: int) -> list[tuple[str, list[str]]]:
    bindir = build / "bin"
    model = str(data_dir() / SMOLLM2_GGUF)
    text = str(data_dir() / SQUAD_TXT)
    common = ["-m", model, "-t", str(threads), "-ctk", "polar", "-ctv", "polar"]
    generate = [*common, "-fa", "on", "-c", "256", "-n", "4", "--temp", "0", "--no-warmup", "-p", PROMPT]
    perplexity = [*common, "-fa", "on", "-c", "128", "-b", "128", "--chunks", "1", "-f", text]
    return [
        ("llama-completion", [str(bindir / "llama-completion"), *generate, "-no-cnv"]),
        ("llama-cli", [str(bindir / "llama-cli"), *generate, "-st", "--simple-io"]),
        ("llama-perplexity", [str(bindir / "llama-perplexity"), *perplexity]),
        ("llama-bench", [str(bindir / "llama-bench"), *common, "-fa", "1", "-p", "16", "-n", "4", "-r", "1"]),
    ]


def run_smoke(build: Path, key: str, py: Path | None, *, force: bool = False) -> None:
    """Run the smoke commands unless this build passed them on this machine already."""
    record = build / SMOKE_FILE
    want = {
        "key": key,
        "host": platform.node(),
        "cpu": cpu_identity_digest(),
        "binding": str(py) if py else None,
    }
    if not force and record.is_file():
        try:
            if json.loads(record.read_text()).get("passed") == want:
                log("smoke run ok (recorded)")
                return
        except ValueError:
            pass
    fetch_smoke_data()  # `bootstrap.py llama` alone: the data step may not have run
    threads = max(1, min(4, os.cpu_count() or 1))
    times = {}
    for name, cmd in smoke_commands(build, threads):
        times[name] = round(_check(name, cmd), 2)
    if py is not None:
        env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH", "MTMD_CPP_LIB")}
        cmd = [str(py), "-c", BINDING_CODE, str(data_dir() / SMOLLM2_GGUF), str(threads), PROMPT]
        times["llama_cpp (Python binding)"] = round(_check("the Python binding llama_cpp.Llama", cmd, env), 2)
    log(
        "smoke run passed (-ctk polar -ctv polar, a few tokens): "
        + ", ".join(f"{k} {v:.1f}s" for k, v in times.items())
    )
    atomic_write_text(record, json.dumps({"passed": want, "seconds": times}, indent=2) + "\n", mkdir=True)
