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


def test_command_line_records_the_arguments_quoted(monkeypatch):
    """What a result file records: the script and its arguments, re-runnable in a shell (quoted where needed);
    without argv, this process's arguments."""
    assert llama_bench.command_line("x.py", ["--a", "1", "b c"]) == "python3 scripts/x.py --a 1 'b c'"
    assert llama_bench.command_line("x.py", []) == "python3 scripts/x.py"
    monkeypatch.setattr("sys.argv", ["prog", "--fmts", "polar/f16"])
    assert llama_bench.command_line("y.py") == "python3 scripts/y.py --fmts polar/f16"


def test_results_from_output_with_log_lines_around_the_json():
    records = [
        {"n_prompt": 512, "n_gen": 0, "n_depth": 16384, "avg_ts": 2048.5, "stddev_ts": 3.25},
        # no n_depth: depth 0
        {"n_prompt": 0, "n_gen": 64, "avg_ts": 519.1, "stddev_ts": 0.5, "samples_ts": [518.6, 519.6]},
    ]
    out = "ggml_cuda_init: found 1 device\n" + json.dumps(records, indent=1) + "\nllama_perf: done\n"
    assert llama_bench.results(out) == [
        {"test": "pp512", "depth": 16384, "tps": 2048.5, "tps_sd": 3.25},
        {"test": "tg64", "depth": 0, "tps": 519.1, "tps_sd": 0.5, "tps_samples": [518.6, 519.6]},
    ]


def test_results_without_json_is_an_error_naming_the_output():
    with pytest.raises(ValueError, match=r"no JSON array.*error: model not found"):
        llama_bench.results("error: model not found")


def _ab_doc(rows):
    """An ab_llama_gpu.py JSON document: rows = [(kv, env, tg at 32768, pp at 32768)]."""
    return {
        "gpu": "GPU X",
        "runs": [
            {
                "kv": kv,
                "env": env,
                "rows": [
                    {"test": "pp512", "depth": 32768, "tps": pp},
                    {"test": "tg64", "depth": 32768, "tps": tg},
                    {"test": "tg64", "depth": 0, "tps": 999.0},
                ],
            }
            for kv, env, tg, pp in rows
        ],
    }


def test_ab_summarize_pools_runs_and_drops_unread_settings(tmp_path, capsys):
    import ab_llama_gpu

    a = _ab_doc(
        [
            ("f16/f16", {}, 400.0, 10.0),
            ("q4_0/q4_0", {}, 300.0, 9.0),
            ("polar/polar", {}, 390.0, 8.0),
            ("polar/polar", {"UNREAD": "1"}, 410.0, 8.0),
            ("polar/polar", {"OFF": "0"}, 350.0, 8.0),
        ]
    )
    b = _ab_doc(
        [("f16/f16", {}, 380.0, 12.0), ("q4_0/q4_0", {}, 280.0, 9.0), ("polar/polar", {}, 400.0, 8.0)]
    )
    pooled = ab_llama_gpu.pool([a, b], 32768, {"UNREAD": "1"})
    assert pooled[("polar/polar", "-")]["tg"] == [390.0, 410.0, 400.0]
    assert pooled[("polar/polar", "OFF=0")]["tg"] == [350.0]
    assert pooled[("f16/f16", "-")] == {"tg": [400.0, 380.0], "pp": [10.0, 12.0]}
    assert ab_llama_gpu.pool([a], 32768)[("polar/polar", "UNREAD=1")]["tg"] == [410.0]
    files = []
    for i, d in enumerate((a, b)):
        files.append(tmp_path / f"run{i}.json")
        files[-1].write_text(json.dumps(d))
    out = tmp_path / "s.md"
    argv = ["summarize", *map(str, files), "--depth", "32768", "--same-as", "UNREAD=1", "--out", str(out)]
    assert ab_llama_gpu.main(argv) == 0
    text = out.read_text()
    # 400 / 390 f16, / 290 q4_0; each run: (390 + 410) / 2 / 400 in run a, 400 / 380 in run b
    # 2 runs: mean 1.026, sd 0.0372, t(1) 12.706: ± 12.706 * 0.0372 / sqrt(2) = 0.334
    assert (
        "| polar/polar | - | 3 | 400.0 | 1.026 | 1.000-1.053 (2 of 2 >= 1); mean 1.026 ± 0.334 | 1.379 | 8 |"
        in text
    )
    assert "| polar/polar | OFF=0 | 1 | 350.0 | 0.897 | 0.875-0.875 (0 of 1 >= 1) |" in text
    assert "| f16/f16 | - | 2 | 390.0 | 1.000 |" in text and "GPU X" in text and "Build:" not in text
    runs = [ab_llama_gpu.pool([d], 32768, {"UNREAD": "1"}) for d in (a, b)]
    ratios = ab_llama_gpu.per_run_ratios(runs, ("polar/polar", "-"))
    assert ratios == [1.0, 400 / 380]
    m, h = ab_llama_gpu.mean_ci95([1.0, 1.1, 0.9])  # sd 0.1, t(2) 4.303
    assert m == pytest.approx(1.0) and h == pytest.approx(4.303 * 0.1 / 3**0.5)
    _, h = ab_llama_gpu.mean_ci95([1.0, 1.1, 0.9] * 5)  # 14 degrees of freedom: the table's last, 2.228
    assert h == pytest.approx(2.228 * (0.1 / 14) ** 0.5 / 15**0.5)  # sd^2 = 5 * 0.02 / 14
    assert capsys.readouterr().out == text
    a["build"] = {"key": "abc123", "last_patch": "0033"}
    files[0].write_text(json.dumps(a))
    assert ab_llama_gpu.main(argv) == 0
    assert " Build: build abc123 (patches 0001-0033)." in out.read_text()
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit):
        ab_llama_gpu.main(["summarize", str(bad), "--depth", "32768"])
    assert "expected a JSON file written by ab_llama_gpu.py" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ab_llama_gpu.main(["summarize", str(files[0]), "--depth", "4096"])
    assert "no tg rows at depth 4096" in capsys.readouterr().err


def test_build_info_names_key_series_and_experiments(tmp_path, monkeypatch):
    build = tmp_path / "build"
    (build / "bin").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"expected a bootstrap\.py build"):
        llama_bench.build_info(build / "bin")
    (build / "kvpolar-build.json").write_text(
        json.dumps(
            {
                "key": "abc123",
                "pin": "llama-cpp-python==0.3.36",
                "patches": [
                    "patches/llama.cpp/0001-a.patch",
                    "patches/llama.cpp/0033-b.patch",
                    "patches/llama-cpp-python/0002-c.patch",
                ],
            }
        )
    )
    monkeypatch.delenv("KVPOLAR_EXPERIMENTS_FILE", raising=False)
    info = llama_bench.build_info(build / "bin")
    assert info["key"] == "abc123" and info["last_patch"] == "0033" and "experiments" not in info
    assert llama_bench.build_label(info) == "build abc123 (patches 0001-0033)"
    exp = tmp_path / "experiments.txt"
    exp.write_text("0f00  session21-x.diff\n")
    monkeypatch.setenv("KVPOLAR_EXPERIMENTS_FILE", str(exp))
    info = llama_bench.build_info(build / "bin")
    assert llama_bench.build_label(info) == "build abc123 (patches 0001-0033, experiments: session21-x.diff)"
    exp.write_text("none\n")
    assert llama_bench.build_info(build / "bin")["experiments"] == []
    assert llama_bench.build_label(None) is None


def test_ab_cpu_runs_each_setting_on_the_cpu_backend(tmp_path, monkeypatch):
    """ab_llama_gpu.py --cpu THREADS: -ngl 0 -t THREADS instead of -ngl 99, each row's environment as set,
    and the machine named as the CPU."""
    import ab_llama_gpu

    (tmp_path / "kvpolar-build.json").write_text(json.dumps({"key": "k", "patches": []}))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = []
    out = '[{"n_prompt": 0, "n_gen": 64, "n_depth": 0, "avg_ts": 10.0, "stddev_ts": 0.1}]'

    def fake_run(cmd, env=None, **kw):
        calls.append((cmd, {k: v for k, v in env.items() if k.startswith(("LLAMA_KV_", "LLAMA_ATTN_ROT"))}))
        return ab_llama_gpu.subprocess.CompletedProcess(cmd, 0, out, "")

    monkeypatch.setattr(ab_llama_gpu.subprocess, "run", fake_run)
    monkeypatch.setenv("LLAMA_KV_CENTER", "0")  # from the caller's shell: not passed on
    argv = ["--bin", str(bindir), "--model", "m.gguf", "--set", "cpu-extras", "--cpu", "2", "--depths", "0"]
    assert ab_llama_gpu.main([*argv, "--out", str(tmp_path / "o"), "--name", "x"]) == 0
    assert len(calls) == len(ab_llama_gpu.CPU_EXTRAS_VARIANTS)
    assert all(c[c.index("-ngl") + 1] == "0" and c[c.index("-t") + 1] == "2" for c, _ in calls)
    assert [env for _, env in calls] == [env for _, _, env in ab_llama_gpu.CPU_EXTRAS_VARIANTS]
    doc = json.loads((tmp_path / "o" / "x.json").read_text())
    assert doc["device"].startswith("CPU: ") and doc["device"].endswith(", 2 threads") and "gpu" not in doc


def test_kv_size_reads_llama_cpps_size_line():
    """llama_bench.kv_size: the first size line of a log, its five fields; None without one."""
    log = (
        "llama_kv_cache:        CPU KV buffer size =    42.19 MiB\n"
        "llama_kv_cache: size =   42.19 MiB (  8192 cells,  30 layers,  1/1 seqs), "
        "K (polar):   23.91 MiB, V (polar3):   18.28 MiB\n"
    )
    assert llama_bench.kv_size(log) == {
        "total_mib": 42.19,
        "k_type": "polar",
        "k_mib": 23.91,
        "v_type": "polar3",
        "v_mib": 18.28,
    }
    assert llama_bench.kv_size("llama_kv_cache: CPU KV buffer size = 1.00 MiB\n") is None


def test_kv_probe_command_asks_for_the_size_line():
    cmd = llama_bench.kv_probe_command("bin/llama-completion", "m.gguf", "polar", "f16", 8192, ["-ngl", "99"])
    assert cmd[:5] == ["bin/llama-completion", "-m", "m.gguf", "-ngl", "99"]
    assert cmd[cmd.index("-c") + 1] == "8192" and cmd[cmd.index("-ctk") + 1] == "polar"
    assert cmd[cmd.index("-ctv") + 1] == "f16" and cmd[-1] == "-v" and "on" == cmd[cmd.index("-fa") + 1]


def test_device_of_reads_both_keys():
    """ab_llama_gpu.device_of: "device" (written since session 27), else the older files' "gpu", else "?"."""
    import ab_llama_gpu

    assert ab_llama_gpu.device_of({"device": "CPU: X, 2 threads", "gpu": "old"}) == "CPU: X, 2 threads"
    assert ab_llama_gpu.device_of({"gpu": "NVIDIA H100"}) == "NVIDIA H100"
    assert ab_llama_gpu.device_of({}) == "?"


def test_ab_change_compares_two_builds(tmp_path, capsys):
    """`change`: each set pooled, polar's tg64 over f16's and q4_0's in each, and the change of the f16 ratio;
    rows with an environment are left out; a set without an f16 or q4_0 row is refused, naming it."""
    import ab_llama_gpu

    before = _ab_doc(
        [("f16/f16", {}, 400.0, 1.0), ("q4_0/q4_0", {}, 300.0, 1.0), ("polar/polar", {}, 396.0, 1.0)]
    )
    after = _ab_doc(
        [
            ("f16/f16", {}, 380.0, 1.0),
            ("q4_0/q4_0", {}, 290.0, 1.0),
            ("polar/polar", {}, 383.8, 1.0),
            ("polar/polar", {"OFF": "1"}, 100.0, 1.0),
        ]
    )
    paths = []
    for name, d in (("b.json", before), ("a.json", after)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(d))
    argv = ["change", "--before", str(paths[0]), "--after", str(paths[1]), "--depth", "32768"]
    assert ab_llama_gpu.main(argv) == 0
    out = capsys.readouterr().out
    # 396 / 400 = 0.990, 383.8 / 380 = 1.010; / q4_0: 396 / 300 = 1.320, 383.8 / 290 = 1.323
    assert "| polar/polar | 0.990 | 1.010 | +0.020 | 1.320 | 1.323 |" in out, out
    assert "OFF" not in out and "100" not in out, out
    no_q4 = tmp_path / "n.json"
    no_q4.write_text(json.dumps(_ab_doc([("f16/f16", {}, 400.0, 1.0)])))
    with pytest.raises(SystemExit):
        ab_llama_gpu.main(["change", "--before", str(no_q4), "--after", str(paths[1]), "--depth", "32768"])
    assert "--before: no tg64 row of q4_0/q4_0 at depth 32768" in capsys.readouterr().err
