"""llama-server with the polar KV cache: parallel slots, slot save and restore.

One server per cache type for the module: build/bin/llama-server -m SmolLM2 -ctk TYPE -ctv TYPE
-fa on -np 4 -c 1024 -t 2 --slot-save-path <tmp> (scripts/bench_server.py's Server: a free port,
/health with a deadline, the log tail in the failure when start-up fails, stopped in the fixture's
finalizer).

Concurrency. Four different greedy requests sent at once (checked: all four slots busy at the same
moment, so they share decode batches) must give exactly the text each gives when sent alone. This
holds token for token for polar and for f16 on the 2-core Intel Xeon VM (CPU build); the f16 case
runs too, so a failure shows at once whether llama.cpp's batched arithmetic (f16 fails as well) or
the polar cache (only polar fails) is to blame. Why it can hold exactly: on this CPU path every row
of a batch goes through the same kernels whatever the batch size (the Q4_1 weights are not
repacked, activations are quantized per row), each slot has its own KV stream (-np 4 turns the
unified cache off) and polar encodes each K/V row on its own.

Slot files. Slot 0's cache saved and restored into slot 1 must be used there (the continuation
re-evaluates one token) and continue exactly as slot 0 does. The file's growth per token (two saves
of different lengths) must be the polar K+V rows from the model's shape plus llama.cpp's 16 bytes of
per-cell bookkeeping: 6,120 + 16 = 6,136 bytes for SmolLM2, where an f16 cache takes 23,040 + 16.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time

import gguf
import pytest

import bench_server
from bench_server import Server, run_concurrently
from kvpolar.format import POLAR, QK

N_PREDICT = 16
TIMEOUT = 120  # seconds per request
PROMPTS = [
    "The capital of France is",
    "Once upon a time, a little robot",
    "The three primary colors are",
    "To bake bread, you first need",
]
# Slot-file bytes per token besides the K+V rows: the token id, and the cell's pos, n_seq_id and one
# seq_id (llama_kv_cache::state_write_meta), 4 bytes each.
CELL_BYTES = 16


@pytest.fixture(scope="module")
def slot_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("slots")


@pytest.fixture(scope="module")
def servers(build_dir, smollm2_path, slot_dir):
    """servers(kv) -> the module's llama-server with K and V caches of type kv, started once."""
    started: dict[str, Server] = {}
    failed: dict[str, str] = {}

    def get(kv: str) -> Server:
        if kv in failed:
            pytest.fail(failed[kv], pytrace=False)
        if kv not in started:
            args = ["-m", str(smollm2_path), "-ctk", kv, "-ctv", kv, "-fa", "on", "-np", str(len(PROMPTS))]
            args += ["-c", "1024", "-t", "2", "--slot-save-path", str(slot_dir)]
            started[kv] = Server(
                build_dir / "bin" / "llama-server", args, slot_dir.parent / f"server-{kv}.log"
            )
            try:
                started[kv].start()
            except Exception as e:
                failed[kv] = str(e)
                pytest.fail(failed[kv], pytrace=False)
        return started[kv]

    yield get
    for srv in started.values():
        srv.stop()


def complete(server: Server, prompt, **extra) -> dict:
    body = {"prompt": prompt, "n_predict": N_PREDICT, "temperature": 0, "cache_prompt": False, **extra}
    return server.request("/completion", body, timeout=TIMEOUT)


def busy_slots(server: Server) -> int:
    return sum(s["is_processing"] for s in server.request("/slots", timeout=TIMEOUT))


@pytest.mark.build
@pytest.mark.parametrize("kv", ["polar", "f16"])
def test_concurrent_equals_alone(servers, kv):
    server = servers(kv)
    alone = [complete(server, p)["content"] for p in PROMPTS]
    assert len(set(alone)) == len(PROMPTS), f"the prompts should give different answers: {alone}"

    most_busy, done, watch_errors = 0, threading.Event(), []

    def watch() -> None:
        nonlocal most_busy
        try:
            while not done.is_set():
                most_busy = max(most_busy, busy_slots(server))
                time.sleep(0.02)
        except Exception as e:
            watch_errors.append(e)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        replies, _ = run_concurrently(lambda p: complete(server, p), PROMPTS)
    finally:
        done.set()
        watcher.join(timeout=TIMEOUT)
    assert not watch_errors, f"GET /slots failed: {watch_errors[0]}"
    assert most_busy == len(PROMPTS), f"expected {len(PROMPTS)} slots decoding together, saw {most_busy}"
    for prompt, a, r in zip(PROMPTS, alone, replies, strict=True):
        assert r["content"] == a, f"{prompt!r}: concurrent {r['content']!r} != alone {a!r}"


def polar_row_bytes_per_token(model) -> int:
    """K+V bytes per token of a polar cache: layers x 2 x n_embd_kv / QK blocks x the block size."""
    fields = gguf.GGUFReader(model).fields
    arch = fields["general.architecture"].contents()
    n_layer = fields[f"{arch}.block_count"].contents()
    head_dim = (
        fields[f"{arch}.embedding_length"].contents() // fields[f"{arch}.attention.head_count"].contents()
    )
    n_embd_kv = fields[f"{arch}.attention.head_count_kv"].contents() * head_dim
    assert n_embd_kv % QK == 0, (n_embd_kv, QK)
    return n_layer * 2 * n_embd_kv // QK * POLAR.type_size


@pytest.mark.build
def test_slot_save_restore(servers, slot_dir, smollm2_path):
    server = servers("polar")
    prompt = server.request("/tokenize", {"content": "The history of the Roman Empire begins with"})["tokens"]
    first = complete(server, prompt, id_slot=0, cache_prompt=True, return_tokens=True, n_predict=16)
    saved = server.request("/slots/0?action=save", {"filename": "slot0.bin"}, timeout=TIMEOUT)
    path = slot_dir / "slot0.bin"
    assert saved["n_saved"] == first["tokens_cached"] > len(prompt), saved
    assert saved["n_written"] == path.stat().st_size, (saved, path.stat().st_size)
    restored = server.request("/slots/1?action=restore", {"filename": "slot0.bin"}, timeout=TIMEOUT)
    assert (restored["n_restored"], restored["n_read"]) == (saved["n_saved"], saved["n_written"]), restored

    longer = prompt + first["tokens"]
    in_1 = complete(server, longer, id_slot=1, cache_prompt=True, n_predict=16)
    in_0 = complete(server, longer, id_slot=0, cache_prompt=True, n_predict=16)
    assert in_1["id_slot"] == 1 and in_0["id_slot"] == 0
    assert in_1["timings"]["cache_n"] == saved["n_saved"], f"slot 1 did not reuse the restored cache: {in_1}"
    assert in_1["timings"]["prompt_n"] == len(longer) - saved["n_saved"], in_1["timings"]
    assert in_1["content"] == in_0["content"], (in_1["content"], in_0["content"])

    again = server.request("/slots/1?action=save", {"filename": "slot1.bin"}, timeout=TIMEOUT)
    assert again["n_saved"] > saved["n_saved"], (again, saved)
    per_token = (again["n_written"] - saved["n_written"]) / (again["n_saved"] - saved["n_saved"])
    rows = polar_row_bytes_per_token(smollm2_path)
    f16_rows = rows * 2 * QK // POLAR.type_size
    assert per_token == rows + CELL_BYTES, (
        f"slot file grows by {per_token} bytes a token, expected the polar K+V rows ({rows} bytes; "
        f"f16: {f16_rows}) + {CELL_BYTES}"
    )
    assert per_token < f16_rows


def test_bench_exits_nonzero_when_the_server_fails(tmp_path, monkeypatch):
    """A server that dies at start-up: every row records the exit and the log, main returns 1."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the kept server logs
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\necho 'error: no such model' >&2\nexit 3\n")
    fake.chmod(0o755)
    (tmp_path / "text.txt").write_text("Some prose. " * 100)
    out = tmp_path / "server.json"
    argv = ["--server", str(fake), "--model", str(tmp_path / "m.gguf"), "--text", str(tmp_path / "text.txt")]
    argv += ["--out", str(out), "--types", "polar", "--clients", "1", "2"]
    assert bench_server.main(argv) == 1
    rows = json.loads(out.read_text())["rows"]
    assert [r["clients"] for r in rows] == [1, 2]
    for r in rows:
        assert "exit 3" in r["error"] and "error: no such model" in r["error"], r
    assert (
        "failed: ServerError: llama-server stopped during start-up (exit 3)"
        in out.with_suffix(".md").read_text()
    )
