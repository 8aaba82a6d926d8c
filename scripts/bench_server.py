#!/usr/bin/env python3
"""llama-server throughput with the f16 and the polar KV cache, for 1, 4 and 8 parallel clients.

    python scripts/bench_server.py [--types f16 polar] [--clients 1 4 8] [--prompt-tokens 1500]
                                   [--n-predict 32] [--gen-reps 3]

One llama-server per cache type, all running at once: -ctk/-ctv TYPE -fa on -np max(clients)
-t <cores>, a context of slots x (prompt + n_predict + 64) tokens. For each client count N, each
type in turn (so bursts of other work on a shared machine fall on the types more evenly): client i
takes its own slice of squad.txt, cut to exactly --prompt-tokens tokens by the server's /tokenize
(the same slices for every type, different ones for every N), pinned to slot i, and all N clients
send at once:

  1. prompt:     the slice with n_predict 1. prompt t/s = all prompt tokens / the phase's wall
                 time; the per-client rate (prompt_n / prompt_ms) comes from the server's timings.
  2. generation: the same tokens with n_predict --n-predict and ignore_eos; the slot's cache holds
                 the prompt (checked: the server re-evaluates at most 2 tokens), so this is decoding
                 at a depth of ~prompt-tokens. total gen t/s = all generated tokens / the phase's
                 wall time; per-client gen t/s = the mean of the timings' predicted_per_second.
                 Repeated --gen-reps times (cheap: the prompt stays cached); the best run is
                 reported (the least disturbed by other work on a shared machine), all are kept.

Writes docs/bench/server-smollm2.json and .md (--out), naming the machine, the command and the
1-minute load average after each row (the machine may be shared); exits 1 when a server or a
request failed. tests/test_server.py uses the Server class.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from kvpolar import paths
from kvpolar.atomic import atomic_write_text
from kvsetup.cpu import machine_label
from kvsetup.util import signal_name

SLACK_TOKENS = 64  # per slot, beyond prompt + n_predict


class ServerError(RuntimeError):
    pass


def _die_with_parent() -> None:
    """Linux prctl(PR_SET_PDEATHSIG, SIGKILL): the server ends when the process that started it dies,
    even by SIGKILL, so no server outlives a killed benchmark or test run."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A llama-server child process on a free 127.0.0.1 port, stdout and stderr in log_path.

    Use as a context manager (stop() always runs) or call start()/stop(). start() waits for
    /health until start_timeout seconds; a server that exits or never gets healthy raises
    ServerError with the tail of its log.
    """

    def __init__(self, binary: Path, args: list[str], log_path: Path, start_timeout: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [str(binary), "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.log_path = Path(log_path)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        deadline = time.monotonic() + self.start_timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                how = f"killed by {signal_name(-rc)}" if rc < 0 else f"exit {rc}"
                raise ServerError(
                    f"llama-server stopped during start-up ({how}): {' '.join(self.cmd)}\n"
                    f"log tail ({self.log_path}):\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass  # not listening yet, or 503 while the model loads
            if time.monotonic() > deadline:
                raise ServerError(
                    f"llama-server not healthy after {self.start_timeout:.0f} s: {' '.join(self.cmd)}\n"
                    f"log tail ({self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)

    def request(self, path: str, body: dict | None = None, timeout: float = 120) -> dict | list:
        """GET (body None) or POST json to path; the decoded reply. HTTP errors raise ServerError."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            raise ServerError(f"{path}: HTTP {e.code}: {e.read().decode(errors='replace')[:500]}") from e


def run_concurrently(fn, args: list) -> tuple[list, float]:
    """fn(arg) for every arg, each in its own thread, released together; (results, wall seconds).
    The first exception is re-raised after all threads finished."""
    results: list = [None] * len(args)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(args) + 1)

    def work(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(args[i])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return results, wall


def prompt_slices(server: Server, text: str, count: int, n_tokens: int) -> list[list[int]]:
    """count consecutive pieces of text, each cut to exactly n_tokens token ids."""
    out, pos = [], 0
    chunk = n_tokens * 8  # characters; English prose is ~4-5 characters a token
    while len(out) < count:
        if pos + chunk > len(text):
            raise ValueError(
                f"the text has {len(text)} characters, too short for {count} x {n_tokens} tokens"
            )
        toks = server.request("/tokenize", {"content": text[pos : pos + chunk]})["tokens"]
        if len(toks) < n_tokens:
            raise ValueError(f"{chunk} characters gave {len(toks)} tokens, expected at least {n_tokens}")
        out.append(toks[:n_tokens])
        pos += chunk
    return out


def measure(server: Server, slices: list[list[int]], n_predict: int, gen_reps: int, timeout: float) -> dict:
    """The prompt phase once, then the generation phase gen_reps times (the best reported), with one
    client per slice; client i on slot i."""

    def complete(i: int, n: int, ignore_eos: bool) -> dict:
        body = {
            "prompt": slices[i],
            "n_predict": n,
            "temperature": 0,
            "cache_prompt": True,
            "id_slot": i,
            "ignore_eos": ignore_eos,
        }
        return server.request("/completion", body, timeout=timeout)["timings"]

    idx = list(range(len(slices)))
    pp, pp_wall = run_concurrently(lambda i: complete(i, 1, False), idx)
    prompt_tokens = sum(t["prompt_n"] for t in pp)
    row = {
        "prompt_tokens": prompt_tokens,
        "prompt_wall_s": round(pp_wall, 3),
        "prompt_tps": round(prompt_tokens / pp_wall, 1),
        "prompt_tps_per_client": round(statistics.mean(t["prompt_per_second"] for t in pp), 1),
    }
    totals, per_client = [], []
    for _ in range(gen_reps):
        tg, tg_wall = run_concurrently(lambda i: complete(i, n_predict, True), idx)
        reevaluated = max(t["prompt_n"] for t in tg)
        if reevaluated > 2:
            raise ServerError(f"generation re-evaluated {reevaluated} prompt tokens, expected <= 2 (cached)")
        gen_tokens = sum(t["predicted_n"] for t in tg)
        if gen_tokens != n_predict * len(slices):
            raise ServerError(f"generated {gen_tokens} tokens, expected {n_predict} x {len(slices)}")
        totals.append(round(gen_tokens / tg_wall, 1))
        per_client.append(round(statistics.mean(t["predicted_per_second"] for t in tg), 1))
    row.update(
        gen_tokens=gen_tokens,
        gen_tps=max(totals),
        gen_tps_per_client=max(per_client),
        gen_tps_reps=totals,
        gen_tps_per_client_reps=per_client,
        loadavg_after=round(os.getloadavg()[0], 2),
    )
    return row


def server_args(args, kv: str) -> list[str]:
    slots = max(args.clients)
    ctx = slots * (args.prompt_tokens + args.n_predict + SLACK_TOKENS)
    return [
        "-m", str(args.model), "-ctk", kv, "-ctv", kv, "-fa", "on",
        "-np", str(slots), "-c", str(ctx), "-t", str(args.threads),
    ]  # fmt: skip


def bench(args, text: str, log_dir: Path) -> list[dict]:
    """One row per (cache type, client count), with "error" where it failed. All types' servers run
    at once (an idle one takes no CPU) and each client count is measured for every type in turn, so
    bursts of other work on a shared machine fall on the types more evenly."""
    rows = []
    with contextlib.ExitStack() as stack:
        servers: dict[str, Server | str] = {}
        for kv in args.types:
            server = Server(args.server, server_args(args, kv), log_dir / f"llama-server-{kv}.log")
            try:
                servers[kv] = stack.enter_context(server)
            except ServerError as e:
                servers[kv] = f"ServerError: {e}"
        try:
            tokenizer = next(s for s in servers.values() if isinstance(s, Server))
            slices = prompt_slices(tokenizer, text, sum(args.clients), args.prompt_tokens)
        except StopIteration:
            slices = []
        except (ServerError, OSError, ValueError) as e:
            servers = dict.fromkeys(servers, f"cutting the prompts: {type(e).__name__}: {e}")
        for n in args.clients:
            mine, slices = slices[:n], slices[n:]
            for kv, server in servers.items():
                row = {"type": kv, "clients": n}
                try:
                    if isinstance(server, str):
                        row["error"] = server
                    else:
                        row.update(measure(server, mine, args.n_predict, args.gen_reps, args.timeout))
                except (ServerError, OSError) as e:
                    row["error"] = f"{type(e).__name__}: {e}"
                rows.append(row)
                print(json.dumps(row), flush=True)
    return sorted(rows, key=lambda r: args.types.index(r["type"]))


def render(res: dict) -> str:
    lines = [
        f"# llama-server with the f16 and polar KV caches ({res['machine']})",
        "",
        f"Generated by `{res['command']}`: {res['model']}, {res['threads']} threads, one slot per client, "
        f"prompts of {res['prompt_tokens']} tokens from squad.txt (a different slice per client), "
        f"{res['n_predict']} generated tokens per client (ignore_eos) decoded after the prompt is cached, "
        f"best of {res['gen_reps']} generation runs (every run is in the JSON; prompt: one run). "
        f"Server: `{res['server_args']}`. Total rates are all clients' tokens over the wall time of the "
        "phase; per-client rates are the mean of the server's timings (predicted_per_second, "
        "prompt_per_second). The machine may be shared with other work: load average "
        f"{res['loadavg_before']} before the run, the 1-minute load after each row in the last column "
        f"(rows marked *disturbed*: load above the {res['threads']} threads, so other work competed "
        "and their rates say more about that work than about the cache type). "
        f"{res['seconds']} s in all.",
        "",
        "| type | clients | total gen t/s | per-client gen t/s | prompt t/s (total) "
        "| prompt t/s (per client) | load after |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['type']} | {r['clients']} | failed: {r['error'].splitlines()[0]} | | | | |")
            continue
        lines.append(
            f"| {r['type']} | {r['clients']} | {r['gen_tps']:.1f} | {r['gen_tps_per_client']:.1f} "
            f"| {r['prompt_tps']:.1f} | {r['prompt_tps_per_client']:.1f} | {r['loadavg_after']:.2f}"
            + (" *disturbed* |" if r["loadavg_after"] > res["threads"] else " |")
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=["f16", "polar"])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--prompt-tokens", type=int, default=1500)
    ap.add_argument("--n-predict", type=int, default=32)
    ap.add_argument("--gen-reps", type=int, default=3, help="generation phases per row (best kept)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--timeout", type=float, default=300, help="seconds per request")
    ap.add_argument("--server", type=Path, default=None, help="llama-server binary (default: build/bin)")
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--text", type=Path, default=None, help="prompt source (default: squad.txt)")
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON path (default: docs/bench/server-smollm2.json)"
    )
    args = ap.parse_args(argv)
    limits = [("--prompt-tokens", args.prompt_tokens), ("--n-predict", args.n_predict)]
    limits += [("--threads", args.threads), ("--gen-reps", args.gen_reps)]
    limits += [("--clients", c) for c in args.clients]
    for flag, value in limits:
        if value < 1:
            ap.error(f"{flag} must be >= 1, got {value}")

    args.server = args.server or paths.bin_path("llama-server")
    args.model = args.model or paths.data_file(paths.SMOLLM2_GGUF)
    text = (args.text or paths.data_file(paths.SQUAD_TXT)).read_text(encoding="utf-8")
    out = args.out or paths.repo_root() / "docs" / "bench" / "server-smollm2.json"
    log_dir = Path(tempfile.mkdtemp(prefix="bench_server-"))

    loadavg = os.getloadavg()
    t0 = time.time()
    rows = bench(args, text, log_dir)
    shown = server_args(args, "TYPE")
    shown[1] = args.model.name
    result = {
        "command": " ".join(["python scripts/bench_server.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_label(),
        "model": args.model.name,
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "n_predict": args.n_predict,
        "gen_reps": args.gen_reps,
        "server_args": "llama-server " + " ".join(shown),
        "loadavg_before": " ".join(f"{x:.2f}" for x in loadavg),
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(time.time() - t0),
        "rows": rows,
    }
    atomic_write_text(out, json.dumps(result, indent=1) + "\n", mkdir=True)
    atomic_write_text(out.with_suffix(".md"), render(result), mkdir=True)
    print(render(result))
    failed = [r for r in rows if "error" in r]
    if failed:
        print(f"{len(failed)} of {len(rows)} runs failed; server logs kept in {log_dir}", file=sys.stderr)
        return 1
    shutil.rmtree(log_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
