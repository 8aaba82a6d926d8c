"""scripts/profile_decode_gpu.py: ncu's raw CSV (a units row, thousands separators) parsed into one
decode step's kernels; the step is the repeating tail of the kernel sequence."""

from __future__ import annotations

import pytest

from profile_decode_gpu import decode_bench_cmd, ncu_rows, per_step, period, render

HEAD = '"ID","Kernel Name","gpu__time_duration.sum"\n"","","nsecond"\n'


def csv_of(kernels):
    return "==PROF== noise\n" + HEAD + "".join(f'"{i}","{n}","{t}"\n' for i, (n, t) in enumerate(kernels))


def test_period_finds_the_step_after_a_prefill():
    prefill = [("mm", "9,000"), ("fa_prefill", "20,000")] * 5
    step = [("get_rows", "1,000"), ("mm", "3,808"), ("fa", "12,500"), ("mm", "2,000")] * 1
    kernels = prefill + step * 4
    rows = ncu_rows(csv_of(kernels))
    assert len(rows) == len(kernels)  # the units row is not a kernel
    names = [r["Kernel Name"] for r in rows]
    assert period(names, lo=2) == 4
    p, n, table = per_step(rows, 3)
    # the smallest repeating tail of at least 8 kernels is two steps; the 16 step kernels hold two of it
    assert (p, n) == (8, 2)
    total = sum(c[1] for c in table.values())
    assert total == pytest.approx(2 * (1000 + 3808 + 12500 + 2000) / 1e3)
    assert table["mm"][0] == 4 and "fa_prefill" not in table


def test_no_table_and_no_step_are_errors():
    with pytest.raises(ValueError, match="no CSV table"):
        ncu_rows("ncu: error")
    with pytest.raises(ValueError, match="no repeating decode step"):
        period([f"k{i}" for i in range(40)])


def test_render_sums_each_part():
    data = {
        "gpu": "G",
        "command": "c",
        "depth": 0,
        "runs": [
            {
                "kv": "polar/polar",
                "step_kernels": 3,
                "total_us": 6.0,
                "per_step": [
                    {"kernel": "void flash_attn_ext_polar_mma<128>(const char *)", "launches": 1, "us": 1.5},
                    {"kernel": "void flash_attn_combine_results<128>(float *)", "launches": 1, "us": 0.5},
                    {"kernel": "void mul_mat_vec_q<8>(const void *)", "launches": 1, "us": 4.0},
                ],
            }
        ],
    }
    md = render(data)
    assert "| `flash_attn_ext_polar_mma<128>` | 1 x 1.5 |" in md
    assert "| attention (flash attention, combine or stream-k fixup) | 2.0 |" in md
    assert "| everything else (weights, norms, q8_1 quantization) | 4.0 |" in md


def test_decode_bench_cmd_prefills_the_depth_as_one_batch():
    cmd = decode_bench_cmd("b", "m.gguf", "polar", "f16", 16, 32768)
    assert (
        cmd[0] == "b/llama-bench"
        and cmd[cmd.index("-ctk") + 1] == "polar"
        and cmd[cmd.index("-ctv") + 1] == "f16"
    )
    assert cmd[cmd.index("-d") + 1] == "32768" and cmd[-4:] == ["-b", "32768", "-ub", "32768"]
    assert "-b" not in decode_bench_cmd("b", "m.gguf", "f16", "f16", 6, 0)
