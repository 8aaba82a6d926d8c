"""scripts/llama_bench.py: the llama-bench command line and the rows read from its JSON."""

from __future__ import annotations

import json

import pytest

import llama_bench


def test_command_has_types_depths_and_extra_args():
    cmd = llama_bench.command("llama-bench", "m.gguf", "polar", "f16", [0, 16384], 3, ["-ngl", "99"])
    assert cmd[0] == "llama-bench" and cmd[-2:] == ["-ngl", "99"]
    flags = dict(zip(cmd[1:-2:2], cmd[2:-2:2], strict=True))
    assert flags == {
        "-m": "m.gguf",
        "-fa": "1",
        "-ctk": "polar",
        "-ctv": "f16",
        "-p": "512",
        "-n": "64",
        "-d": "0,16384",
        "-r": "3",
        "-o": "json",
    }


def test_results_from_output_with_log_lines_around_the_json():
    records = [
        {"n_prompt": 512, "n_gen": 0, "n_depth": 16384, "avg_ts": 2048.5, "stddev_ts": 3.25},
        {"n_prompt": 0, "n_gen": 64, "avg_ts": 519.1, "stddev_ts": 0.5},  # no n_depth: depth 0
    ]
    out = "ggml_cuda_init: found 1 device\n" + json.dumps(records, indent=1) + "\nllama_perf: done\n"
    assert llama_bench.results(out) == [
        {"test": "pp512", "depth": 16384, "tps": 2048.5, "tps_sd": 3.25},
        {"test": "tg64", "depth": 0, "tps": 519.1, "tps_sd": 0.5},
    ]


def test_results_without_json_is_an_error_naming_the_output():
    with pytest.raises(ValueError, match=r"no JSON array.*error: model not found"):
        llama_bench.results("error: model not found")
