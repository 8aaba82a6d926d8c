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
