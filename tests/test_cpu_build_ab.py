"""scripts/cpu_build_ab.py: the A/B of two builds on the CPU (the block timings and their refusals)."""

from __future__ import annotations

import pytest

import cpu_build_ab


@pytest.mark.build
def test_cache_write_writes_the_reference_bytes(build_dir):
    """The CPU backend's cache write (patch 0039: the encoder built with the CPU's vector extensions)
    and ggml-base's reference encoder write the same bytes, and the timing says so per type."""
    r = cpu_build_ab.encode_times(build_dir / "bin", 300, passes=1)
    for name in cpu_build_ab.ENCODE_TYPES:
        write, ref = r[f"{name} cache write"], r[f"{name} reference"]
        assert write["sha256"] == ref["sha256"], name
        assert write["ns_per_block"] > 0 and ref["ns_per_block"] > 0


@pytest.mark.build
def test_reads_are_timed_and_hashed(build_dir):
    """The cache's reads by flash attention (K's vec_dot, V's SIMD decoder) of the written blocks: what they
    return is hashed so that two builds can be held to the same values (patch 0041 changes how polar3 reads
    on AVX-512, not what)."""
    import numpy as np

    from kvpolar import codec

    r = cpu_build_ab.encode_times(build_dir / "bin", 300, passes=1)
    x = (np.random.default_rng(0).standard_normal(300 * 64) * 3.0).astype(np.float32)
    for name in cpu_build_ab.ENCODE_TYPES:
        dot, deq = r[f"{name} vec_dot (K)"], r[f"{name} dequantize (V)"]
        assert dot["ns_per_block"] > 0 and deq["ns_per_block"] > 0
        want = codec.dequantize(codec.quantize(x, name), name).astype(np.float32)
        assert deq["sha256"] == cpu_build_ab.hashlib.sha256(want.tobytes()).hexdigest(), name


def test_refuses_a_folder_without_llama_bench(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cpu_build_ab.main(["--a", str(tmp_path), "--b", str(tmp_path)])
    err = capsys.readouterr().err
    assert "expected a build's bin/ with llama-bench, got" in err and str(tmp_path) in err


def test_stops_when_the_builds_write_different_bytes(tmp_path, monkeypatch, capsys):
    dirs = []
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        (d / "llama-bench").write_text("")
        dirs.append(d)

    def fake_encode(bin_dir, n_blocks):
        sha = "0" * 64 if bin_dir.name == "a" else "1" * 64
        return {"polar cache write": {"ns_per_block": 1.0, "sha256": sha}}

    monkeypatch.setattr(cpu_build_ab, "_encode_in_child", fake_encode)
    ran = []
    monkeypatch.setattr(cpu_build_ab.subprocess, "run", lambda *a, **k: ran.append(a))
    assert cpu_build_ab.main(["--a", str(dirs[0]), "--b", str(dirs[1])]) == 1
    assert "the builds write or read different values: polar cache write" in capsys.readouterr().err
    assert not ran  # no llama-bench after a difference


def test_pool_gives_means_and_each_rounds_ratio():
    rows = [
        {"build": b, "round": n, "type": "polar", "test": "tg64", "depth": 0, "tps": t}
        for b, n, t in (("A", 0, 100.0), ("B", 0, 110.0), ("B", 1, 90.0), ("A", 1, 100.0))
    ]
    (r,) = cpu_build_ab.pool(rows)
    assert (r["A"], r["B"], r["B/A"]) == (100.0, 100.0, 1.0)
    assert r["rounds"] == pytest.approx([1.1, 0.9])


def test_block_rounds_alternate_and_keep_the_least(tmp_path, monkeypatch):
    """--block-rounds: the builds' processes alternate (A B, B A, ...) and each key keeps its least time; a
    build whose output changes between rounds is an error, not a timing."""
    calls = []
    times = {"a": [5.0, 3.0, 4.0], "b": [2.0, 6.0, 1.0]}

    def fake(bin_dir, n_blocks):
        calls.append(bin_dir.name)
        return {"polar3 vec_dot (K)": {"ns_per_block": times[bin_dir.name].pop(0), "sha256": "x"}}

    monkeypatch.setattr(cpu_build_ab, "_encode_in_child", fake)
    builds = {"A": tmp_path / "a", "B": tmp_path / "b"}
    r = cpu_build_ab.block_times(builds, 10, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert r["A"]["polar3 vec_dot (K)"]["ns_per_block"] == 3.0
    assert r["B"]["polar3 vec_dot (K)"]["ns_per_block"] == 1.0

    def flaky(bin_dir, n_blocks):
        flaky.n += 1
        return {"k": {"ns_per_block": 1.0, "sha256": str(flaky.n)}}

    flaky.n = 0
    monkeypatch.setattr(cpu_build_ab, "_encode_in_child", flaky)
    with pytest.raises(ValueError, match="build B wrote or read different values in two rounds: k"):
        cpu_build_ab.block_times(builds, 10, 2)


def test_types_take_k_v_pairs(capsys):
    assert cpu_build_ab.kv_pair("polar") == ("polar", "polar")
    assert cpu_build_ab.kv_pair("polar/f16") == ("polar", "f16")
    for bad in ("polar/", "/f16", "a/b/c"):
        with pytest.raises(ValueError, match="expected a cache type or K/V"):
            cpu_build_ab.kv_pair(bad)
    with pytest.raises(SystemExit):
        cpu_build_ab.main(["--a", "x", "--b", "y", "--types", "polar/"])
    assert (
        "--types: expected a cache type or K/V (e.g. polar, polar/f16), got 'polar/'"
        in capsys.readouterr().err
    )
