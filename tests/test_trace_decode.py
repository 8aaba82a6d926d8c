"""scripts/trace_decode_gpu.py: the decode-step timeline read from a CUPTI trace (no GPU needed: a
synthetic trace with known gaps and overlaps), and the tracer's source compiled where CUPTI is found."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import trace_decode_gpu as td  # noqa: E402


def synthetic(n_steps=5, wall=1000_000, idle=50_000):
    """n_steps graph launches `wall` ns apart; each step: a q8_1 quantization (100 us), an attention
    kernel (300 us) that the next kernel overlaps by 20 us, the write kernel (200 us); then the GPU is
    idle for `idle` ns before the next step's first kernel."""
    lines = []
    t0 = 10_000_000
    for i in range(n_steps + 1):
        a = t0 + i * wall
        lines.append(f"R {a} {a + 8_000} 77 cudaGraphLaunch_v10000")
        k = a + 30_000  # launch call to first kernel
        lines.append(f"K {k} {k + 100_000} 3 64 128 void quantize_q8_1(float const*, void*)")
        k2 = k + 100_000
        lines.append(
            f"K {k2} {k2 + 300_000} 3 192 128 void flash_attn_ext_vec<64, 1, 43, 43, 0, 0>(char const*)"
        )
        k3 = k2 + 280_000
        lines.append(
            f"K {k3} {k3 + 200_000} 3 9 512 void k_polar_layer_chains<0, 0, 64, 64>(polar_layer_args)"
        )
        lines.append(f"R {k3 + 200_000} {k3 + 210_000} 77 cudaStreamSynchronize_v3020")
    return lines


def test_steps_of_synthetic():
    lines = synthetic()
    kernels, calls = td.parse(lines)
    s = td.steps_of(kernels, calls, steps=3)
    assert s["steps"] == 3
    assert s["wall_us"] == pytest.approx(1000.0)
    assert s["launch_to_first_kernel_us"] == pytest.approx(30.0)
    assert s["gpu_span_us"] == pytest.approx(580.0)  # 100 + 280 + 200
    assert s["kernel_sum_us"] == pytest.approx(600.0)
    assert s["idle_between_steps_us"] == pytest.approx(1000.0 - 580.0)
    adv = {x["kernel"]: x for x in s["per_kernel"]}
    # the end-to-end advances: 100, then the attention ends 300 later, the write 180 after that
    assert adv["flash_attn_ext_vec<64, 1, 43, 43, 0, 0>"]["advance_us"] == pytest.approx(300.0)
    assert adv["k_polar_layer_chains<0, 0, 64, 64>"]["advance_us"] == pytest.approx(180.0)
    assert adv["flash_attn_ext_vec<64, 1, 43, 43, 0, 0>"]["duration_us"] == pytest.approx(300.0)
    assert sum(x["advance_us"] for x in s["per_kernel"]) == pytest.approx(s["gpu_span_us"])
    assert s["per_kernel"][0]["kernel"] == "flash_attn_ext_vec<64, 1, 43, 43, 0, 0>"  # largest advance first


def test_short_keeps_template_casts():
    assert td.short("void f<(ggml_type)1, 64>(char const*, int)") == "f<(ggml_type)1, 64>"
    assert td.short("quantize_q8_1(float const*)") == "quantize_q8_1"


def test_parse_rejects_other_lines():
    with pytest.raises(ValueError, match="trace line 2: expected"):
        td.parse(["K 1 2 0 1 1 k()", "X what"])
    with pytest.raises(ValueError, match="trace line 1"):
        td.parse(["K one 2 0 1 1 k()"])


def test_too_few_graph_launches():
    kernels, calls = td.parse(synthetic(n_steps=1))
    with pytest.raises(ValueError, match="2 cudaGraphLaunch calls"):
        td.steps_of(kernels, calls, steps=3)


def test_analyze_and_render(tmp_path, capsys):
    trace = tmp_path / "t.txt.gz"
    with gzip.open(trace, "wt") as f:
        f.write("\n".join(synthetic()) + "\n")
    assert td.main(["analyze", str(trace), "--steps", "2"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["steps"] == 2 and s["wall_us"] == pytest.approx(1000.0)
    data = {"gpu": "test GPU", "command": "x", "depth": 0, "runs": [{"kv": "polar/polar", **s}]}
    md = td.render(data)
    assert "| GPU idle between steps | 420.0 |" in md
    assert "| attention (flash attention, combine or stream-k fixup) | 300.0 |" in md
    assert "| RoPE and the cache writes | 180.0 |" in md


def test_run_needs_enough_tokens():
    with pytest.raises(SystemExit):
        td.main(["run", "--bin", "b", "--model", "m", "--tokens", "4", "--steps", "8"])


def test_tracer_compiles_where_cupti_is():
    try:
        inc, cuda_inc, _ = td.find_cupti()
    except FileNotFoundError:
        pytest.skip("no CUPTI headers and library on this machine (the GPU machine has them)")
    out = subprocess.run(
        [
            "g++",
            "-std=c++17",
            "-fsyntax-only",
            f"-I{inc}",
            f"-I{cuda_inc}",
            str(ROOT / "scripts" / "cupti_trace.cpp"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr


def synthetic_host(n_steps=5, wall=1000_000, extra_copies=0):
    """Runtime calls only (`run --host`): each step a graph launch (8 us), 2 + extra_copies input copies
    (5 us each), then cudaStreamSynchronize until 700 us into the step."""
    lines = []
    t0 = 10_000_000
    for i in range(n_steps + 1):
        a = t0 + i * wall
        t = a - 10_000 * (2 + extra_copies)
        for _ in range(2 + extra_copies):
            lines.append(f"R {t} {t + 5_000} 77 cudaMemcpyAsync_v3020")
            t += 10_000
        lines.append(f"R {a} {a + 8_000} 77 cudaGraphLaunch_v10000")
        lines.append(f"R {a + 20_000} {a + 700_000} 77 cudaStreamSynchronize_v3020")
    return lines


def test_host_steps_of_synthetic():
    _, calls = td.parse(synthetic_host())
    s = td.host_steps_of(calls, steps=3)
    assert s["steps"] == 3
    assert s["wall_us"] == pytest.approx(1000.0)
    assert s["waiting_us"] == pytest.approx(680.0)
    assert s["host_us"] == pytest.approx(320.0)
    per = {x["call"]: x for x in s["per_call"]}
    assert per["cudaMemcpyAsync"]["calls"] == pytest.approx(2.0)
    assert per["cudaMemcpyAsync"]["time_us"] == pytest.approx(10.0)
    assert per["cudaGraphLaunch"]["calls"] == pytest.approx(1.0)
    # a type with more input copies a step shows them as calls (the wall here is fixed by construction)
    _, calls2 = td.parse(synthetic_host(extra_copies=3))
    s2 = td.host_steps_of(calls2, steps=3)
    assert {x["call"]: x for x in s2["per_call"]}["cudaMemcpyAsync"]["calls"] == pytest.approx(5.0)
    md = td.render_host(
        {
            "gpu": "G",
            "command": "c",
            "depth": 0,
            "runs": [{"kv": "f16/f16", **s}, {"kv": "polar/polar", **s2}],
        }
    )
    assert "| host | 320.0 | 320.0 |" in md
    assert "| `cudaMemcpyAsync` | 2.0 x 5.0 | 5.0 x 5.0 |" in md


def test_host_steps_need_graph_launches():
    _, calls = td.parse(synthetic_host(n_steps=1))
    with pytest.raises(ValueError, match="2 cudaGraphLaunch calls"):
        td.host_steps_of(calls, steps=3)


def test_head_start_synthetic():
    # each step's write kernel starts 20 us before the attention ahead of it ends and runs 200 us
    kernels, calls = td.parse(synthetic())
    h = td.head_start(kernels, calls, "k_polar_layer_chains", steps=3)
    assert h["launches"] == 3
    assert h["head_start_median_us"] == pytest.approx(20.0)
    assert h["head_start_max_us"] == pytest.approx(20.0)
    assert h["duration_median_us"] == pytest.approx(200.0)
    with pytest.raises(ValueError, match="no launch of a kernel named like 'nothing'"):
        td.head_start(kernels, calls, "nothing", steps=3)
