"""llama.cpp's RPC backend with the polar KV cache: a model and its cache spread over two servers.

Starts two `ggml-rpc-server` processes on 127.0.0.1 (one CPU thread each, no on-disk cache) and
runs llama-completion with `--rpc` and `-ngl 99`: every layer, its weights and its KV cache go to
the two servers, whose CPU backends run the polar cache writes and flash attention. The greedy
text must equal the same command run locally on the CPU, for an f16 cache (the RPC path itself)
and for polar and polar3 K and V caches (the blocks written, stored and attended to remotely).

The log must show KV buffers on both RPC devices and none on the host: a run that silently fell
back to the local CPU, or kept the polar cache on the host (patch 0010's fallback for devices
that cannot write polar), fails. (The RPC client answers "supported" for every op without
asking the server, so that fallback never triggers for an RPC device; see docs/rpc.md.)
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time

import pytest

from test_llama_cpp import binary, run

pytestmark = pytest.mark.build

HOST = "127.0.0.1"
PROMPT = "The capital of France is"
N_PREDICT = 24
START_DEADLINE_S = 30
N_SERVERS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_until_listening(proc: subprocess.Popen, port: int, log_path) -> None:
    """Return once `proc` accepts TCP connections on `port`; fail if it exits or takes too long."""
    deadline = time.monotonic() + START_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"ggml-rpc-server on port {port} exited with {proc.returncode} before accepting "
                f"connections:\n{log_path.read_text(errors='replace')[-2000:]}",
                pytrace=False,
            )
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(
        f"ggml-rpc-server did not accept connections on {HOST}:{port} within {START_DEADLINE_S} s:\n"
        f"{log_path.read_text(errors='replace')[-2000:]}",
        pytrace=False,
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def bindir(build_dir):
    return build_dir / "bin"


@pytest.fixture(scope="module")
def rpc_servers(bindir, tmp_path_factory, request) -> list[str]:
    """Two running ggml-rpc-servers (CPU backend, 1 thread, cache off), as host:port endpoints."""
    server = binary(bindir, "ggml-rpc-server")
    tmp = tmp_path_factory.mktemp("rpc")
    endpoints = []
    for i in range(N_SERVERS):
        port = free_port()
        log_path = tmp / f"rpc-server-{i}.log"
        with open(log_path, "wb") as log:
            # no -c: the server's tensor cache on disk stays off; LLAMA_CACHE points into tmp anyway
            proc = subprocess.Popen(
                [str(server), "-H", HOST, "-p", str(port), "-t", "1"],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp,
                env={**os.environ, "LLAMA_CACHE": str(tmp / "cache")},
            )
        request.addfinalizer(lambda proc=proc: stop(proc))
        wait_until_listening(proc, port, log_path)
        endpoints.append(f"{HOST}:{port}")
    return endpoints


def complete(bindir, model, cache_type: str, extra=()) -> subprocess.CompletedProcess:
    """Greedy continuation of PROMPT on one thread; stdout is the generated text, stderr the log."""
    cmd = [
        binary(bindir, "llama-completion"), "-m", model, "-p", PROMPT, "-n", N_PREDICT, "--temp", 0,
        "--top-k", 1, "--seed", 1, "-ctk", cache_type, "-ctv", cache_type, "-fa", "on", "-t", 1,
        "-c", 512, "-no-cnv", "--no-display-prompt", "--no-warmup", "--simple-io",
        "-lv", 4, *extra,  # -lv 4 lets libllama's own lines (devices, buffers) into the log
    ]  # fmt: skip
    return run(cmd, timeout=120)


def buffers(log: str, owner: str, kind: str) -> list[tuple[str, float]]:
    """(buffer name, MiB) from the `<owner>: <name> <kind> buffer size = <x> MiB` lines of a log."""
    pattern = rf"{owner}:\s+(\S+) {kind} buffer size = +([\d.]+) MiB"
    return [(name, float(mib)) for name, mib in re.findall(pattern, log)]


def rpc_endpoint(buffer_name: str) -> str | None:
    """host:port of a buffer on an RPC device (named RPC<device on that server>[host:port]), else None."""
    m = re.fullmatch(r"RPC\d+\[(.+)\]", buffer_name)
    return m.group(1) if m else None


@pytest.mark.parametrize("cache_type", ["f16", "polar", "polar3"])
def test_rpc_matches_local(bindir, smollm2_path, rpc_servers, cache_type, record_property):
    local = complete(bindir, smollm2_path, cache_type)
    remote = complete(bindir, smollm2_path, cache_type, extra=("--rpc", ",".join(rpc_servers), "-ngl", 99))
    log = remote.stderr

    # every layer on the RPC devices, weights and cache on both servers, no KV buffer on the host
    m = re.search(r"offloaded (\d+)/(\d+) layers", log)
    assert m and m.group(1) == m.group(2), f"not every layer was offloaded:\n{log[-4000:]}"
    model = buffers(log, "load_tensors", "model")  # the token embeddings stay on the host (CPU_Mapped)
    assert {rpc_endpoint(name) for name, _ in model} - {None} == set(rpc_servers), f"model buffers: {model}"
    kv = buffers(log, "llama_kv_cache", "KV")
    kv_endpoints = sorted(str(rpc_endpoint(name)) for name, _ in kv)
    assert kv_endpoints == sorted(rpc_servers), f"expected one KV buffer on each of {rpc_servers}: {kv}"
    assert "backend cannot write a" not in log, f"the KV cache fell back to host memory:\n{log[-4000:]}"
    assert re.search(rf"K \({cache_type}\):.*V \({cache_type}\):", log), (
        f"no {cache_type} cache:\n{log[-4000:]}"
    )
    record_property("kv_buffers_mib", kv)

    assert local.stdout.strip(), f"the local run generated no text:\n{local.stderr[-2000:]}"
    assert remote.stdout.strip() == local.stdout.strip(), (
        f"{cache_type} cache: greedy text over RPC differs from the local CPU run\n"
        f"  local: {local.stdout.strip()!r}\n  rpc:   {remote.stdout.strip()!r}"
    )
