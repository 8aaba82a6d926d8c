"""scripts/bench_gpu_lib.py: the clock samples the kernel analysis reads (no GPU needed)."""

from __future__ import annotations

import datetime
import shutil

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
