"""scripts/bench_llama.py startup: the time a context that serves several sequences spends on patch 0035's
built-in text, read from a llama.cpp tool's time-stamped log (a stand-in llama-perplexity here); quality's
plan; and write_results.py's headline, which reads these runs (and bench_gpu.py compare's) against the
issues' targets."""

from __future__ import annotations

import json

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


def test_quality_runs_the_low_memory_pair_also_without_its_layer_policy(tmp_path, monkeypatch):
    """quality: polar K + polar3 V with its layer policy (patch 0034, the default) and once more with
    LLAMA_KV_LAYER_POLICY=0, marked in its row and in results.md's table; no other row sets it."""
    import write_results

    calls = []

    def fake_run(cmd, env_extra=None, log=None):
        calls.append((cmd, dict(env_extra or {})))
        n = len(calls)
        ratio = f"Mean PPL(Q)/PPL(base) : 1.0{n:02d}\n"
        return ratio + f"Mean PPL(Q) : 10.0\nMean KLD: 0.0{n:02d}\nSame top p: 90.0 %\n"

    monkeypatch.setattr(bench_llama, "run", fake_run)
    monkeypatch.setattr(bench_llama.paths, "bin_path", lambda name: tmp_path / name)
    monkeypatch.setattr(bench_llama.paths, "data_file", lambda name: tmp_path / str(name))
    args = bench_llama.argparse.Namespace(model="smollm2", ctx=64, chunks=1, threads=1, only=None)
    res = bench_llama.quality(args, [])
    pair = [
        (r, env)
        for r, (_, env) in zip(res["rows"][1:], calls[1:], strict=True)
        if (r["k"], r["v"]) == ("polar", "polar3")
    ]
    assert [(r["sink"], r.get("layer_policy")) for r, _ in pair] == [
        (True, None),
        (False, None),
        (True, False),
    ]
    assert pair[2][1]["LLAMA_KV_LAYER_POLICY"] == "0"
    assert sum("LLAMA_KV_LAYER_POLICY" in env for _, env in calls) == 1
    d = {**res, "model_file": "m.gguf", "command": "c", "machine": "m", "date": "d", "seconds": 1}
    d["build"] = {"key": "k", "patches": ["patches/llama.cpp/0034-x.patch"]}
    table = "\n".join(write_results.quality_table(d))
    assert table.count("| polar | polar3 (uniform layers) | on | on |") == 1
    assert table.count("| polar | polar3 | on |") == 2
    assert "unless marked uniform" in table


def test_headline_states_issue_12s_targets_from_the_stock_runs(monkeypatch):
    """The headline's quality lines: polar K with its defaults (centering, exact sink) against the issue's
    bound, the low-memory pair with its layer policy against centered q4_0 K+V, polar3 K against 2x centered
    q4_0 K; met or missed as the numbers say, and the rows without the defaults are not the ones taken."""
    import write_results

    def row(k, v, kld, center=True, sink=None, **kw):
        return {"k": k, "v": v, "center": center, "sink": sink, "mean_kld": kld, **kw}

    rows = [
        row("q4_0", "f16", 0.030),
        row("iq4_nl", "f16", 0.026),
        row("polar", "f16", 0.050, center=False, sink=False),
        row("polar", "f16", 0.024, sink=True),
        row("polar", "f16", 0.031, sink=False),
        row("polar3", "f16", 0.061, sink=True),
        row("q4_0", "q4_0", 0.036),
        row("polar", "polar3", 0.035, sink=True),
        row("polar", "polar3", 0.045, sink=False),
        row("polar", "polar3", 0.040, sink=True, layer_policy=False),
    ]
    doc = {
        "rows": rows,
        "command": "cmd",
        "machine": "CPU X, 2 cores",
        "build": {"key": "abc", "patches": []},
    }
    monkeypatch.setattr(write_results, "_load", lambda kind, model: doc if model == "smollm2" else None)
    text = "\n".join(write_results.quality_headline())
    assert "SmolLM2-135M, K = polar (4.25 bits), V f16: mean KLD **0.0240** (target <= 0.025: met)" in text
    assert "**0.0350** against centered q4_0 K + q4_0 V (4.5 bits) 0.0360 (target <=: met)" in text
    assert "**0.0610** = 2.03x centered q4_0 K (0.0300) (target <= 2x: missed)" in text
    assert "Qwen" not in text


def test_headline_takes_the_newest_gpu_run_of_each_kind_and_model():
    import write_results

    lines = [
        (("ab", "H100", "m1"), "new ab h100 m1"),
        (("ab", "H100", "m1"), "old ab h100 m1"),
        (("ab", "H200", "m1"), "ab h200 m1"),
        (("table", "H100", "m1"), "table h100 m1"),
        (("table", "H100", "m1"), "older table h100 m1"),
    ]
    assert [line for _, line in write_results.newest_per_gpu(lines)] == [
        "new ab h100 m1",
        "ab h200 m1",
        "table h100 m1",
    ]


def test_headline_states_issue_11s_kernel_targets(tmp_path, monkeypatch):
    """The headline's CuPy lines: the graph-replayed rows of the newest compare JSON of each GPU that has
    them (by its recorded time, a plain file or a member of a .tgz), each target met or missed."""
    import tarfile

    import write_results

    def row(T, variant, x=None, pct=None):
        return {"shape": f"B16 T{T} 32/8 D128", "T": T, "D": 128, "variant": variant,
                "speedup_vs_sdpa": x, "pct_copy_rate": pct}  # fmt: skip

    def doc(gpu, time, x, full=True):
        rows = [
            row(32768, "polar+polar mma default", 3.5, 90.0),  # eager: not the one taken
            row(32768, "polar+polar mma default graph", x, 80.0),
            row(32768, "polar+f16 mma default graph", 1.5, 99.0),
        ]
        if full:
            rows.append(row(131072, "polar+polar mma default graph", 3.1, 74.0))
        return {"device": {"name": gpu}, "time": time, "copy_rate_Bps": 4.0e12, "compare": rows}

    gpu = tmp_path / "docs" / "gpu"
    (gpu / "s1").mkdir(parents=True)
    (gpu / "s1" / "compare.json").write_text(json.dumps(doc("GPU X", "2026-12-01 10:00:00", 2.5)))
    (gpu / "s1" / "compare-y.json").write_text(json.dumps(doc("GPU Y", "2026-12-01 11:00:00", 3.2)))
    (gpu / "s2").mkdir()
    (gpu / "s2" / "issue11-compare.json").write_text(json.dumps(doc("GPU X", "2026-12-02 10:00:00", 2.9)))
    with tarfile.open(gpu / "s2" / "issue11-json.tgz", "w:gz") as t:
        t.add(gpu / "s2" / "issue11-compare.json", arcname="issue11-compare.json")
    (gpu / "s2" / "issue11-compare.json").unlink()
    # newer, but without the 131072-key row: not taken
    (gpu / "s2" / "contexts.json").write_text(
        json.dumps(doc("GPU X", "2026-12-03 10:00:00", 9.9, full=False))
    )
    (gpu / "s2" / "other.json").write_text(json.dumps({"rows": []}))  # not a compare
    monkeypatch.setattr(write_results, "REPO", tmp_path)
    x, y = write_results.kernel_headline()
    assert "on GPU X, B=16, 32768 keys: polar K+V 2.90x fp16 SDPA (>= 3.0x: missed)" in x
    assert "polar K + fp16 V 1.50x (>= 1.45x: met)" in x
    assert "74 % of the copy rate measured in the same run (4000 GB/s; >= 75 %: missed)" in x
    assert "2026-12-02 10:00:00, [issue11-json.tgz: issue11-compare.json](gpu/s2/issue11-json.tgz)" in x
    assert "on GPU Y, B=16, 32768 keys: polar K+V 3.20x fp16 SDPA (>= 3.0x: met)" in y
    assert "[compare-y.json](gpu/s1/compare-y.json)" in y


def test_model_files_take_a_models_variants_in_order(tmp_path, monkeypatch):
    """write_results.model_files: KIND-MODEL.json, then KIND-MODEL-SUFFIX.json (another machine, then its
    depths), never another model whose name starts alike (smollm2c for smollm2)."""
    import write_results

    for name in (
        "speed-m.json",
        "speed-m-avx2.json",
        "speed-mc.json",
        "profile-decode-m-avx2-d4096.json",
        "profile-decode-m-avx2.json",
    ):
        (tmp_path / name).write_text("{}")
    monkeypatch.setattr(write_results, "BENCH", tmp_path)
    names = [
        [p.name for p in write_results.model_files(k, "m")] for k in ("speed", "profile-decode", "memory")
    ]
    assert names == [
        ["speed-m.json", "speed-m-avx2.json"],
        ["profile-decode-m-avx2.json", "profile-decode-m-avx2-d4096.json"],
        [],
    ]
