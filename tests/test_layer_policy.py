"""scripts/layer_policy.py (issue 12's per-layer policy study) on the stand-in llama-perplexity
(tests/fake_perplexity.py: a layer's K weighs 1 + l in its KLD, its V n - l, over FAKE_LAYERS = 4)."""

from __future__ import annotations

import json

import pytest

import layer_policy
import quality_levers


def test_span_and_parse_layers_round_trip():
    assert layer_policy.span([0, 1, 2, 7, 9, 10]) == "0-2,7,9-10"
    assert layer_policy.parse_layers("0-2,7,9-10") == [0, 1, 2, 7, 9, 10]
    assert layer_policy.policy_env([3, 0, 1], [5]) == {
        "LLAMA_KV_LAYER_V": "polar:0-1,3",
        "LLAMA_KV_LAYER_K": "polar3:5",
    }
    # both always set: with the session-29 hack an unset one would leave patch 0034's policy in place
    assert layer_policy.policy_env([], []) == {"LLAMA_KV_LAYER_V": "polar:", "LLAMA_KV_LAYER_K": "polar3:"}
    assert layer_policy.policy_bits(10, [0, 1], [9, 8]) == pytest.approx(3.75)
    assert layer_policy.policy_bits(8, [0, 1], []) == pytest.approx((4.25 + 3.25 + 2 / 8) / 2)


@pytest.fixture
def fake_data(tmp_path, monkeypatch):
    text = "".join(f"line {i}\n" for i in range(100))
    (tmp_path / "squad.txt").write_text(text)
    (tmp_path / "kvpolar-build.json").write_text(json.dumps({"key": "k1", "patches": []}))  # beside fakebin/
    monkeypatch.setattr(quality_levers, "data_file", lambda name: tmp_path / str(name))
    monkeypatch.setattr(layer_policy, "data_file", lambda name: tmp_path / str(name))
    monkeypatch.setattr(layer_policy, "n_layers", lambda model: 4)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "log.jsonl"))
    return text


def test_scan_measures_each_group_on_the_second_half_then_chooses(tmp_path, fake_bin, fake_data, capsys):
    out = tmp_path / "scan.json"
    argv = ["scan", "--bin", str(fake_bin), "--group", "2", "--work", str(tmp_path / "w"), "--json", str(out)]
    assert layer_policy.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["build"]["key"] == "k1"
    rows = res["models"]["smollm2-135m"]["rows"]
    assert [(r["move"], r["layers"]) for r in rows] == [
        ("preset", []),
        ("v_up", [0, 1]),
        ("k_down", [0, 1]),
        ("v_up", [2, 3]),
        ("k_down", [2, 3]),
    ]
    # V weights 4, 3, 2, 1 (of 10), polar3 -> polar V saves 0.12 of a layer's V term, halved in the mean
    # of K and V; K weights 1, 2, 3, 4, polar -> polar3 K costs 0.12
    want = [-0.7 * 0.06, 0.3 * 0.06, -0.3 * 0.06, 0.7 * 0.06]
    assert [r["delta"] for r in rows[1:]] == pytest.approx(want, abs=2e-6)
    calls = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    tail = (tmp_path / "w" / "squad-tail.txt").read_text()
    assert fake_data.endswith(tail) and 0 < len(tail) < len(fake_data) and tail.startswith("line ")
    assert all(c[c.index("-f") + 1].endswith("squad-tail.txt") for c in calls)
    # the V group that saves most, and of the others the K group that costs least
    assert layer_policy.choose(res, "smollm2-135m", 1) == ([0, 1], [2, 3])
    assert "| 0-1 | -0.0420 | +0.0180 |" in capsys.readouterr().out


def test_eval_runs_preset_target_and_policies_on_the_first_chunks(tmp_path, fake_bin, fake_data):
    out = tmp_path / "eval.json"
    argv = [
        "eval",
        "--bin",
        str(fake_bin),
        "--policy",
        "1/3",
        "--work",
        str(tmp_path / "w"),
        "--json",
        str(out),
    ]
    assert layer_policy.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["policy"], r["ctk"], r["ctv"], r["env"]) for r in rows] == [
        ("default", "polar", "polar3", {}),
        ("uniform", "polar", "polar3", {"LLAMA_KV_LAYER_POLICY": "0"}),
        ("q4_0 K+V", "q4_0", "q4_0", {}),
        ("1/3", "polar", "polar3", {"LLAMA_KV_LAYER_V": "polar:1", "LLAMA_KV_LAYER_K": "polar3:3"}),
    ]
    assert [r["bits"] for r in rows] == pytest.approx([3.75, 3.75, 4.5, 3.75])
    # preset (0.03 + 0.15) / 2; the policy: V of layer 1 (3 of 10) polar, K of layer 3 (4 of 10) polar3
    assert [r["kld"] for r in rows] == pytest.approx(
        [0.09, 0.09, 0.04, 0.09 - 0.3 * 0.06 + 0.4 * 0.06], abs=2e-6
    )
    calls = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(c[c.index("-f") + 1].endswith("squad.txt") for c in calls)
    with pytest.raises(SystemExit, match="expected as many V-up as K-down layers"):
        layer_policy.main([*argv[:-2], "--policy", "0-1/3"])
    with pytest.raises(SystemExit, match=r"expected layers 0-3 of smollm2-135m, got \[4\]"):
        layer_policy.main([*argv[:-2], "--policy", "4/3"])


def test_eval_any_bits_records_the_bits_and_sets_both_lists(tmp_path, fake_bin, fake_data, capsys):
    out = tmp_path / "eval.json"
    argv = ["eval", "--bin", str(fake_bin), "--policy", "0-1/", "--any-bits", "--policies-only"]
    assert layer_policy.main([*argv, "--work", str(tmp_path / "w"), "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["env"] == {"LLAMA_KV_LAYER_V": "polar:0-1", "LLAMA_KV_LAYER_K": "polar3:"}
    assert row["bits"] == pytest.approx((4.25 + 3.25 + 2 / 4) / 2)
    # V of layers 0 and 1 (weights 4 and 3 of 10) polar, every K polar
    assert row["kld"] == pytest.approx((0.03 + 0.15 - 0.7 * 0.12) / 2, abs=2e-6)
    assert "| smollm2-135m | 0-1/ | 4 | " in capsys.readouterr().out


def test_speed_render_pools_the_rounds():
    rows = [
        {"model": "m", "policy": p, "round": r, "test": "tg64", "depth": 4096, "tps": t}
        for p, r, t in (
            ("default", 0, 30.0),
            ("uniform", 0, 29.0),
            ("default", 1, 32.0),
            ("uniform", 1, 31.0),
        )
    ]
    text = layer_policy.render({"rows": rows})
    assert "| m | tg64 | 4096 | 31.0 | 30.0 | 1.033 |" in text


def test_per_layer_types_need_the_measurement_build(tmp_path, fake_bin, fake_data):
    """A build by hand (no kvpolar-build.json) is recorded as unknown; a bootstrap build with patch 0034
    ignores LLAMA_KV_LAYER_K/_V, so scan and --policy refuse it by name."""
    argv = ["scan", "--bin", str(fake_bin), "--group", "2", "--work", str(tmp_path / "w")]
    (tmp_path / "kvpolar-build.json").write_text(
        json.dumps(
            {"key": "k2", "patches": ["patches/llama.cpp/0001-a.patch", "patches/llama.cpp/0034-b.patch"]}
        )
    )
    with pytest.raises(SystemExit, match=r"scan: per-layer types need a measurement build .* build k2"):
        layer_policy.main(argv)
    with pytest.raises(SystemExit, match="eval: per-layer types need a measurement build"):
        layer_policy.main(["eval", "--bin", str(fake_bin), "--policy", "1/3", "--work", str(tmp_path / "w")])
    (tmp_path / "kvpolar-build.json").unlink()
    out = tmp_path / "scan.json"
    assert layer_policy.main([*argv, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["build"] is None
