"""scripts/bench_llama.py startup: the time a context that serves several sequences spends on patch 0035's
built-in text, read from a llama.cpp tool's time-stamped log (a stand-in llama-perplexity here)."""

from __future__ import annotations

import pytest

import bench_llama


def test_stamp_reads_minutes_seconds_ms_us():
    assert bench_llama.stamp("0.01.333.187 I kvpolar_center_fixed: x") == pytest.approx(1.333187)
    assert bench_llama.stamp("2.03.004.005 I x") == pytest.approx(123.004005)
    assert bench_llama.stamp("llama_kv_cache: no stamp") is None


def fake_perplexity(tmp_path, body: str):
    exe = tmp_path / "llama-perplexity"
    exe.write_text("#!/usr/bin/env bash\ncat <<'LOG'\n" + body + "LOG\n")
    exe.chmod(0o755)
    return exe


def run_startup(tmp_path, monkeypatch, body: str) -> dict:
    exe = fake_perplexity(tmp_path, body)
    monkeypatch.setattr(bench_llama.paths, "bin_path", lambda name: exe)
    monkeypatch.setattr(bench_llama.paths, "data_file", lambda name: tmp_path / str(name))
    args = bench_llama.argparse.Namespace(model="smollm2", seqs=4, threads=2, rounds=2)
    return bench_llama.startup(args, [])


def test_startup_is_the_time_before_the_measured_line(tmp_path, monkeypatch):
    log = (
        "0.00.361.010 I sched_reserve: CPU compute buffer size = 98.25 MiB\n"
        "continued line without a stamp\n"
        "0.01.333.187 I kvpolar_center_fixed: KV centering: K offsets measured from 125 tokens of a text\n"
    )
    res = run_startup(tmp_path, monkeypatch, log)
    assert res["rows"] == [{"round": i, "tokens": 125, "seconds": 0.972} for i in range(2)]


def test_startup_without_the_line_says_so(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match="measured from N tokens"):
        run_startup(tmp_path, monkeypatch, "0.00.361.010 I llama_kv_cache: one sequence\n")
