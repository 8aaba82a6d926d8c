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


# ---- scripts/profile_decode_cpu.py: perf report's text, and symbols into the decode step's groups

PERF_REPORT = """# To display the perf.data header info, please use --header/--header-only options.
#
# Samples: 54K of event 'cpu-clock:ppp'
# Event count (approx.): 13626750000
#
# Overhead  Shared Object          Symbol
# ........  .....................  ......
#
    46.80%  libggml-cpu.so.0.25.3  [.] ggml_vec_dot_q4_1_q8_1
     9.58%  libgomp.so.1.0.0       [.] 0x000000000001f7da
     4.97%  libggml-cpu.so.0.25.3  [.] ggml_vec_dot_polar_f32
     3.51%  libggml-cpu.so.0.25.3  [.] ggml_cpu_dequantize_row_polar
     2.06%  libggml-cpu.so.0.25.3  [.] polar_encode_at_scale.constprop.1
     0.47%  [kernel.kallsyms]      [k] do_syscall_64
     0.22%  libggml-cpu.so.0.25.3  [.] ggml::cpu::repack::extra_buffer_type::get_tensor_traits
"""


def test_cpu_profile_report_parsed():
    from profile_decode_cpu import parse_report

    rows, ms = parse_report(PERF_REPORT)
    assert ms == pytest.approx(13626.75)
    assert len(rows) == 7
    assert rows[0] == (46.80, "libggml-cpu.so.0.25.3", "ggml_vec_dot_q4_1_q8_1")
    assert rows[5] == (0.47, "[kernel.kallsyms]", "do_syscall_64")
    assert rows[6][2] == "ggml::cpu::repack::extra_buffer_type::get_tensor_traits"
    with pytest.raises(ValueError, match="Event count"):
        parse_report("    1.00%  libc.so.6  [.] memcpy\n")


@pytest.mark.parametrize(
    "dso, symbol, group",
    [
        ("libggml-cpu.so", "polar_encode_at_scale.constprop.1", "cache write"),
        ("libggml-cpu.so", "quantize_row_q4_0", "cache write"),
        ("libggml-cpu.so", "dequantize_row_q4_0", "V read"),  # not the cache write: "de" first
        ("libggml-cpu.so", "ggml_cpu_dequantize_row_polar", "V read"),
        ("libggml-cpu.so", "ggml_vec_dot_polar_f32", "K read"),
        ("libggml-cpu.so", "ggml_vec_dot_q4_0_q8_0", "K read"),
        ("libggml-cpu.so", "ggml_vec_dot_q4_1_q8_1", "weights matmul"),
        ("libggml-cpu.so", "quantize_row_q8_1", "weights matmul"),
        ("libggml-cpu.so", "ggml_compute_forward_flash_attn_ext", "attention, rest"),
        ("libgomp.so.1.0.0", "0x000000000001f7da", "thread wait"),  # unresolved: by its library
        ("libc.so.6", "__memmove_avx_unaligned_erms", "other"),
    ],
)
def test_cpu_profile_groups(dso, symbol, group):
    from profile_decode_cpu import group_of

    assert group_of(dso, symbol) == group


def test_cpu_profile_table_and_results_section():
    """render: the cache's groups first, a group the run did not see as 0; write_results' section of it."""
    import write_results
    from profile_decode_cpu import COLUMNS, render

    row = {"k": "polar", "v": "polar", "tg_tps": 117.9, "percent": {"K read": 3.4, "cache write": 3.7}}
    row["cpu_us_per_token"] = {"K read": 578.0, "cache write": 642.0}
    res = {
        "rows": [row],
        "model": "m.gguf",
        "n": 256,
        "threads": 2,
        "machine": "AMD EPYC (AVX2), 2 cores, Linux",
    }
    table = render(res).splitlines()
    assert table[0] == "| K / V | tg t/s | " + " | ".join(COLUMNS) + " |"
    assert table[2].startswith("| polar / polar | 117.9 | 3.7 % (642) | 3.4 % (578) | 0.0 % (0) |")
    res.update(command="python3 scripts/profile_decode_cpu.py", date="2026-12-07", seconds=54)
    text = "\n".join(write_results.profile_table(res))
    assert "tg256 from an empty cache, 2 threads, under perf, AMD EPYC (AVX2)" in text and table[2] in text
    row["window"] = {"seconds": 1.5, "tokens": 102.4, "samples": 6000}
    text = "\n".join(write_results.profile_table({**res, "depth": 4096}))
    assert (
        "tg256 at depth 4096 (a time window of the last rep's decode, the samples of 102 tokens), 2 threads"
        in text
    )


# perf script -F time,period,ip,sym,dso: a prompt's matmuls, the decode's steps, the exit's tail
PERF_SCRIPT = """   100.000100:     500000      7f00000000a1 ggml_gemm_q4_0_8x8_q8_0 (/b/libggml-cpu.so)
   100.500000:     500000      7f00000000a2 ggml_vec_dot_q4_1_q8_1 (/b/libggml-cpu.so)
   101.000000:     500000      7f00000000a3 ggml_vec_dot_polar_f32 (/b/libggml-cpu.so)
   101.200000:     500000      7f00000000a4 [unknown] (/usr/lib/libgomp.so.1.0.0)
   101.400000:    1000000      7f00000000a5 ggml_vec_dot_q4_1_q8_1 (/b/libggml-cpu.so)
   101.450000:     500000  ffffffff81621188 do_exit ([kernel.kallsyms])
not a sample line
"""


def test_cpu_profile_samples_and_the_decode_window():
    from profile_decode_cpu import WINDOW_SHARE, decode_window, parse_samples

    s = parse_samples(PERF_SCRIPT)
    assert len(s) == 6
    assert s[0] == (100.0001, 500000, "libggml-cpu.so", "ggml_gemm_q4_0_8x8_q8_0")
    assert s[3] == (101.2, 500000, "libgomp.so.1.0.0", "0x7f00000000a4")  # unresolved: its address
    assert s[5][2:] == ("[kernel.kallsyms]", "do_exit")
    # the window ends at the last matmul sample (101.4, not the exit's 101.45) and spans
    # WINDOW_SHARE of 10 tokens at 10 tokens/s
    t0, t1 = decode_window(s, 10, 10.0)
    assert t1 == 101.4 and t0 == pytest.approx(101.4 - WINDOW_SHARE * 1.0)
    with pytest.raises(ValueError, match="expected samples of the model's matmuls"):
        decode_window([x for x in s if "q4_1" not in x[3] and "gemm" not in x[3]], 10, 10.0)
    with pytest.raises(ValueError, match="expected positive n and tps"):
        decode_window(s, 10, 0.0)
    with pytest.raises(ValueError, match="expected perf script's"):
        parse_samples("nothing here\n")


def test_cpu_profile_window_groups_by_period():
    from profile_decode_cpu import parse_samples, window_groups

    s = parse_samples(PERF_SCRIPT)
    # 101.0-101.4: a K read (0.5 ms), the thread pool (0.5 ms, by its library), a matmul (1.0 ms)
    groups, cpu_ms, n = window_groups(s, 101.0, 101.4)
    assert n == 3 and cpu_ms == pytest.approx(2.0)
    assert groups == pytest.approx({"K read": 25.0, "thread wait": 25.0, "weights matmul": 50.0})
    with pytest.raises(ValueError, match=r"expected samples between 50\.000 and 60\.000 s"):
        window_groups(s, 50.0, 60.0)


def test_cpu_profile_totals_in_the_results_section():
    """cpu_totals: the cache's own groups and every group, CPU us a token; write_results prints them in ms."""
    import write_results
    from profile_decode_cpu import cpu_totals

    row = {"k": "polar", "v": "polar", "tg_tps": 44.5, "percent": {"V read": 16.8, "weights matmul": 27.3}}
    row["cpu_us_per_token"] = {"cache write": 669.0, "V read": 7534.0, "attention, rest": 17222.0}
    assert cpu_totals(row) == pytest.approx((8203.0, 25425.0))
    res = {"rows": [row], "model": "m.gguf", "n": 128, "threads": 2, "machine": "AMD EPYC (AVX2), 2 cores"}
    res.update(command="c", date="d", seconds=1)
    text = "\n".join(write_results.profile_table(res))
    assert "the cache's own (write, K read, V read) and all groups: polar / polar: 8.2 of 25.4." in text
