"""scripts/bench_llama_gpu.py: its tables, the ratios to f16 and q4_0 of the same run, and `render`."""

from __future__ import annotations

import json

import bench_llama_gpu as blg


def _result() -> dict:
    rows = []
    for k, v in blg.PAIRS:
        for test, base in (("tg64", 100.0), ("pp512", 1000.0)):
            for d in (0, 16384):
                scale = {"f16": 2.0, "q4_0": 1.0, "polar": 2.5 if v == "polar" else 1.5}.get(k, 1.25)
                rows.append({"k": k, "v": v, "test": test, "depth": d, "tps": base * scale * (1 + d / 16384)})
    rows = [r for r in rows if not (r["k"] == "polar3" and r["depth"] == 16384 and r["test"] == "tg64")]
    return {
        "command": "python3 scripts/bench_llama_gpu.py --bin b --model m",
        "gpu": "a GPU",
        "name": "m",
        "reps": 3,
        "depths": [0, 16384],
        "budget_gib": 8.0,
        "rows": rows,
        "memory": [{"k": "f16", "v": "f16", "bytes_per_token": 100.0, "max_ctx_in_budget": 85899345}],
    }


def test_ratio_tables_of_the_same_run():
    md = blg.render(_result())
    tg_f16 = md.split("## tg64, over f16 / f16 (same run)")[1].split("##")[0]
    assert "| polar / polar | 1.250 | 1.250 |" in tg_f16
    assert "| polar3 / polar3 | 0.625 | - |" in tg_f16  # a run that is missing stays missing
    pp_q4 = md.split("## pp512, over q4_0 / q4_0 (same run)")[1].split("##")[0]
    assert "| polar / polar | 2.500 | 2.500 |" in pp_q4 and "| q4_0 / q4_0 | 1.000 | 1.000 |" in pp_q4
    assert "| f16 / f16 | 100 | 85,899,345 |" in md


def test_render_writes_the_md_beside_each_json(tmp_path):
    p = tmp_path / "llama-gpu-m.json"
    p.write_text(json.dumps(_result()))
    assert blg.main(["render", str(p)]) == 0
    assert (tmp_path / "llama-gpu-m.md").read_text() == blg.render(_result())
    assert not list(tmp_path.glob("*.tmp"))


def test_render_refuses_what_is_not_its_json(tmp_path, capsys):
    assert blg.main(["render"]) == 2
    assert "expected one or more llama-gpu-*.json files, got none" in capsys.readouterr().err
    bad = tmp_path / "x.json"
    bad.write_text('{"rows": []}')
    assert blg.main(["render", str(bad)]) == 2
    assert f"{bad}: expected a bench_llama_gpu.py JSON, got KeyError" in capsys.readouterr().err
    assert not (tmp_path / "x.md").exists()
