"""scripts/cpu_build_ab.py: the A/B of two builds on the CPU (the encoder's timing and its refusals)."""

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
    assert "the builds write different bytes: polar cache write" in capsys.readouterr().err
    assert not ran  # no llama-bench after a difference


def test_pool_gives_means_and_each_rounds_ratio():
    rows = [
        {"build": b, "round": n, "type": "polar", "test": "tg64", "depth": 0, "tps": t}
        for b, n, t in (("A", 0, 100.0), ("B", 0, 110.0), ("B", 1, 90.0), ("A", 1, 100.0))
    ]
    (r,) = cpu_build_ab.pool(rows)
    assert (r["A"], r["B"], r["B/A"]) == (100.0, 100.0, 1.0)
    assert r["rounds"] == pytest.approx([1.1, 0.9])
