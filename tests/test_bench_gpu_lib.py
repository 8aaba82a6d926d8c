"""scripts/bench_gpu_lib.py: the clock samples the kernel analysis reads; scripts/bench_gpu.py scaling's
numbers (no GPU needed)."""

from __future__ import annotations

import datetime
import shutil

import pytest

import bench_gpu
import bench_gpu_lib as lib

SAMPLES = """2026/12/06 22:30:00.100, 1980, 2619, 250.10
2026/12/06 22:30:00.120, 1755, 2619, 612.40
2026/12/06 22:30:00.140, 1650, 2619, 690.00
2026/12/06 22:30:00.160, 1700, 2619, 688.50
garbage line
2026/12/06 22:30:00.180, [N/A], 2619, 688.50
2026/12/06 22:30:00.900, 1980, 2619, 120.00
"""


def test_parse_clock_samples_keeps_the_window():
    t0 = datetime.datetime(2026, 12, 6, 22, 30, 0, 110000)
    t1 = datetime.datetime(2026, 12, 6, 22, 30, 0, 500000)
    c = lib.parse_clock_samples(SAMPLES, t0, t1)  # the idle samples before t0 and after t1 left out
    assert c == {
        "samples": 3,
        "sm_mhz_med": 1700.0,
        "sm_mhz_min": 1650.0,
        "sm_mhz_max": 1755.0,
        "mem_mhz_med": 2619.0,
        "power_w_med": 688.5,
    }
    empty = lib.parse_clock_samples(SAMPLES, t1, t1)
    assert empty["samples"] == 0 and empty["sm_mhz_med"] is None and empty["power_w_med"] is None


def test_clock_samples_without_nvidia_smi(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(lib, "_torch", lambda: None)  # (no torch needed to say "no nvidia-smi")
    assert lib.clock_samples(lambda: None) is None
    assert lib.CLOCK_QUERY.split(",")[0] == "timestamp"  # parse_clock_samples's first column


def test_clock_samples_reads_a_sampler(tmp_path, monkeypatch):
    """clock_samples end to end with a stand-in nvidia-smi that prints a sample every 20 ms with the time."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        'while true; do echo "$(date +"%Y/%m/%d %H:%M:%S.%N" | cut -c1-23), 1650, 2619, 690.00"; '
        "sleep 0.02; done\n"
    )
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{shutil.os.environ['PATH']}")

    class Cuda:
        synchronize = staticmethod(lambda: None)

    class Torch:
        cuda = Cuda

    monkeypatch.setattr(lib, "_torch", lambda: Torch)
    calls = []
    c = lib.clock_samples(lambda: calls.append(1), seconds=0.3)
    assert c["samples"] >= 3 and c["sm_mhz_med"] == 1650.0 and c["power_w_med"] == 690.0
    assert c["calls"] == len(calls) - 1 >= 16  # (one call before the window)


def test_scaling_row_per_key_and_copy_share():
    # 16 sequences x 8 KV heads at 32768 keys in 200 us, 570 MB against a 3 TB/s copy
    r = bench_gpu.scaling_row(16, 8, 32768, 200.0, 570_000_000, 3e12)
    assert r["ctas"] == 128
    assert r["ns_per_key"] == pytest.approx(200e3 / 32768)
    assert r["GBps"] == pytest.approx(2850.0)
    assert r["pct_copy_rate"] == pytest.approx(95.0)
    with pytest.raises(ValueError, match="expected positive B"):
        bench_gpu.scaling_row(0, 8, 32768, 200.0, 1, 3e12)


def test_scaling_headroom_most_over_fewest_ctas():
    rows = [
        {"fmts": "polar/polar", "T": 65536, "ctas": 128, "ns_per_key": 6.0},
        {"fmts": "polar/polar", "T": 65536, "ctas": 8, "ns_per_key": 4.0},
        {"fmts": "polar/polar", "T": 65536, "ctas": 32, "ns_per_key": 5.0},
        {"fmts": "polar/polar", "T": 8192, "ctas": 8, "ns_per_key": 8.0},  # another context: its own ratio
        {"fmts": "polar/polar", "T": 8192, "ctas": 128, "ns_per_key": 8.0},
        {"fmts": "polar/f16", "T": 65536, "ctas": 8, "ns_per_key": 9.0},  # one point: no ratio
    ]
    assert bench_gpu.scaling_headroom(rows) == {
        "polar/polar @ 8192": pytest.approx(1.0),
        "polar/polar @ 65536": pytest.approx(1.5),
    }


def _scaling_rows():
    """A scaling run's rows for one format pair at one context: 8, 32 and 128 CTAs and the SM clocks sampled
    at the fewest and the most."""
    v = "polar+polar mma default, 1 split"
    row = dict(fmts="polar/polar", T=32768, variant=v)
    return [
        {**row, "ctas": 8, "us": 170.0, "ns_per_key": 170e3 / 32768, "bytes": 100},
        {**row, "ctas": 32, "us": 160.0, "ns_per_key": 160e3 / 32768, "bytes": 400},
        {**row, "ctas": 128, "us": 200.0, "ns_per_key": 200e3 / 32768, "bytes": 1_600_000_000},
        {"T": 32768, "variant": f"{v}, 8 CTAs clocks", "sm_mhz_med": 2000.0},
        {"T": 32768, "variant": f"{v}, 128 CTAs clocks", "sm_mhz_med": 1600.0},
        {"fmts": "polar/f16", "T": 8192, "variant": "x", "ctas": 8, "us": 1.0, "ns_per_key": 1.0, "bytes": 1},
    ]


def test_scaling_projection_loop_or_memory_bound():
    # a GPU with 16 TB/s: the full load's 1.6 GB take 100 us, less than the loop's 160 us (200 at 1600 MHz)
    (r,) = bench_gpu.scaling_projection(
        _scaling_rows(), 16e12, 480.0, 3.0, wavefronts_per_key=8.0, context=32768, fmts_pairs=["polar/polar"]
    )
    assert r["alone_ctas"] == 32 and r["loop_us"] == 160.0  # the fastest below the most CTAs
    assert r["loop_us_full_load_clock"] == pytest.approx(200.0)
    assert r["memory_us"] == pytest.approx(100.0)
    assert r["projected_us"] == pytest.approx([160.0, 200.0]) and r["bound"] == "loop"
    assert r["ratio_to_sdpa"] == pytest.approx([3.0, 2.4])
    assert r["loop_speedup_needed"] == pytest.approx([1.0, 1.25])  # 200 us -> 160 us for 3.0x
    assert r["cycles_per_key"] == pytest.approx(160e3 / 32768 * 2.0)
    assert r["pct_smem_rate"] == pytest.approx(100 * 8.0 / r["cycles_per_key"])
    # 4 TB/s: the bytes alone take 400 us, so 3.0x (160 us) is out of any loop's reach
    (m,) = bench_gpu.scaling_projection(
        _scaling_rows(), 4e12, 480.0, context=32768, fmts_pairs=["polar/polar"]
    )
    assert m["bound"] == "memory" and m["projected_us"] == pytest.approx([400.0, 400.0])
    assert m["loop_speedup_needed"] is None and "pct_smem_rate" not in m


def test_scaling_projection_says_what_is_missing():
    rows = _scaling_rows()
    with pytest.raises(ValueError, match="expected positive copy_Bps"):
        bench_gpu.scaling_projection(rows, 0, 480.0)
    with pytest.raises(ValueError, match=r"expected timed rows for \['polar3/polar3'\] at any context"):
        bench_gpu.scaling_projection(rows, 4e12, 480.0, fmts_pairs=["polar3/polar3"])
    with pytest.raises(ValueError, match="polar/f16 @ 8192: expected rows at 2 or more CTA counts"):
        bench_gpu.scaling_projection(rows, 4e12, 480.0, context=8192)
    no_clock = [r for r in rows if r.get("sm_mhz_med") != 1600.0]
    with pytest.raises(ValueError, match="expected SM clock rows at 8 and 128 CTAs"):
        bench_gpu.scaling_projection(no_clock, 4e12, 480.0, context=32768, fmts_pairs=["polar/polar"])


def test_project_command_without_a_gpu(tmp_path, capsys):
    src = tmp_path / "scaling.json"
    src.write_text(
        bench_gpu.json.dumps({"device": {"name": "X"}, "copy_rate_Bps": 3e12, "scaling": _scaling_rows()})
    )
    out = tmp_path / "p.json"
    argv = ["project", "--from", str(src), "--context", "32768", "--copy-gbps", "16000", "--sdpa-us", "480"]
    assert bench_gpu.main([*argv, "--fmts", "polar/polar", "--json", str(out)]) == 0
    assert "2.40-3.00x SDPA (loop-bound); 3.00x needs the loop 0.0-25.0 % faster" in capsys.readouterr().out
    assert bench_gpu.json.loads(out.read_text())["project"][0]["bound"] == "loop"
    with pytest.raises(SystemExit, match=r"expected --from a JSON of `bench_gpu\.py scaling --json`"):
        bench_gpu.main(["project", "--from", str(tmp_path / "none.json"), *argv[3:]])
    with pytest.raises(SystemExit):  # --context missing: argparse's error
        bench_gpu.main(["project", "--from", str(src), "--copy-gbps", "1", "--sdpa-us", "1"])


def test_scaling_config_sets_keep_their_own_rows(tmp_path, capsys):
    """scaling --config-sets: a set's rows carry "K/V+SET", so the default's headroom and projection never mix
    with the set's; `project --config-sets SET` projects the set's rows."""
    assert bench_gpu.scaling_fmts("polar", "polar", "default") == "polar/polar"
    assert bench_gpu.scaling_fmts("polar", "f16", "ctas=2") == "polar/f16+ctas=2"
    assert lib.config_set("default") == ("default", {})
    assert lib.config_set("ctas=2,wtile=32") == ("ctas=2,wtile=32", {"ctas": 2, "wtile": 32})
    for bad in ("nope", "ctas2", "ctas=x", "wtile=32,"):
        with pytest.raises(lib.argparse.ArgumentTypeError, match=r"expected FIELD=INT .* got '"):
            lib.config_set(bad)
    base = _scaling_rows()
    v, vk = "polar+polar mma default, 1 split", "polar+polar mma ctas=2, 1 split"
    fast = [
        dict(r, variant=r["variant"].replace(v, vk), fmts="polar/polar+ctas=2")
        for r in base
        if v in r["variant"]
    ]
    for r in fast:
        if "ns_per_key" in r:
            r["ns_per_key"] *= 0.5
            r["us"] *= 0.5
    assert set(bench_gpu.scaling_headroom([r for r in base + fast if "ns_per_key" in r])) == {
        "polar/polar @ 32768",
        "polar/polar+ctas=2 @ 32768",
    }
    src = tmp_path / "scaling.json"
    src.write_text(
        bench_gpu.json.dumps({"device": {"name": "X"}, "copy_rate_Bps": 3e12, "scaling": base + fast})
    )
    argv = ["project", "--from", str(src), "--context", "32768", "--copy-gbps", "16000", "--sdpa-us", "480"]
    out = tmp_path / "p.json"
    assert bench_gpu.main([*argv, "--fmts", "polar/polar", "--json", str(out)]) == 0
    (row,) = bench_gpu.json.loads(out.read_text())["project"]
    assert (
        bench_gpu.main([*argv, "--fmts", "polar/polar", "--config-sets", "ctas=2", "--json", str(out)]) == 0
    )
    (krow,) = bench_gpu.json.loads(out.read_text())["project"]
    assert krow["fmts"] == "polar/polar+ctas=2" and row["fmts"] == "polar/polar"
    assert krow["loop_us"] == pytest.approx(0.5 * row["loop_us"]) and krow["sm_mhz_light"] == 2000.0
    with pytest.raises(SystemExit):  # --wavefronts-per-key is one kernel's
        bench_gpu.main([*argv, "--config-sets", "default", "ctas=2", "--wavefronts-per-key", "7"])
    capsys.readouterr()
