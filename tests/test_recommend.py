"""kvpolar recommend: errors before any run, the flow on a stand-in llama-perplexity, and one
short end-to-end run on SmolLM2-135M with the patched build (marker `build`)."""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

import gguf
import pytest

from kvpolar import cli, recommend

PROSE = "The Amazon rainforest covers much of the basin of the Amazon River in South America. " * 40


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(["recommend", *(str(a) for a in argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(err: str) -> str:
    assert "Traceback" not in err, err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("kvpolar recommend: error: ")]
    return line


def tiny_model(path: Path, head_count_kv=2, **extra) -> Path:
    """A GGUF header of a 2-layer llama (4 heads, embedding 256: head size 64), no tensors."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(2)
    w.add_embedding_length(256)
    w.add_head_count(4)
    w.add_head_count_kv(head_count_kv)
    for key, val in extra.items():
        w.add_uint32(f"llama.attention.{key}", val)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(autouse=True)
def temp_in_tmp_path(tmp_path, monkeypatch):
    """The command's work folder (logs kept after a failure) goes under tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture
def model(tmp_path) -> Path:
    return tiny_model(tmp_path / "tiny.gguf")


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(PROSE * 4, encoding="utf-8")  # 13 KB: passes the byte check for 512 x 4
    return path


# ----------------------------------------------------------------------------------------------
# Errors before any run (no build needed)


def test_not_a_gguf(tmp_path, text, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 a zip, not a model" + bytes(64))
    rc, _, err = run(capsys, bad, "--text", text)
    assert rc == 2
    line = error_line(err)
    assert "not a GGUF file" in line and "expected magic b'GGUF'" in line and "b'PK\\x03\\x04'" in line


def test_missing_model_and_missing_text(tmp_path, model, capsys):
    rc, _, err = run(capsys, tmp_path / "nope.gguf")
    assert rc == 2 and "nope.gguf' does not exist" in error_line(err)
    rc, _, err = run(capsys, model, "--text", tmp_path / "missing.txt")
    assert rc == 2 and "text file" in error_line(err) and "missing.txt' does not exist" in err


def test_missing_build(tmp_path, model, text, capsys, monkeypatch):
    rc, _, err = run(capsys, model, "--text", text, "--bin", tmp_path / "no-build" / "bin")
    line = error_line(err)
    assert rc == 2
    assert f"llama-perplexity not found in {tmp_path / 'no-build' / 'bin'} (--bin)" in line
    assert "python3 scripts/bootstrap.py llama" in line
    monkeypatch.setenv("KVPOLAR_BUILD", str(tmp_path / "elsewhere"))
    rc, _, err = run(capsys, model, "--text", text)
    line = error_line(err)
    assert (
        rc == 2 and str(tmp_path / "elsewhere") in line and "bootstrap.py llama" in line and "--bin" in line
    )


def test_text_too_short_for_ctx_x_chunks(tmp_path, model, capsys):
    short = tmp_path / "short.txt"
    short.write_text(PROSE[:1500], encoding="utf-8")
    rc, _, err = run(capsys, model, "--text", short, "--ctx", 512, "--chunks", 4, "--bin", tmp_path)
    line = error_line(err)
    assert rc == 2 and "too short: 1500 bytes" in line and "--ctx 512 x --chunks 4 needs 2048 tokens" in line
    # one chunk still needs 2 x ctx tokens (llama-perplexity's rule)
    rc, _, err = run(capsys, model, "--text", short, "--ctx", 1024, "--chunks", 1, "--bin", tmp_path)
    assert rc == 2 and "needs 2048 tokens" in error_line(err)


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["--types", "polar/polar3/f16"], "expected a cache setting 'T' or 'K/V'"),
        (["--types", "q9_9"], "unknown ggml type 'q9_9'"),
        (["--max-kld", "-1"], "--max-kld must be a finite number >= 0, got -1.0"),
        (["--ctx", "0"], "--ctx must be positive, got 0"),
    ],
)
def test_bad_arguments(model, text, capsys, argv, expect):
    rc, _, err = run(capsys, model, "--text", text, *argv)
    assert rc == 2 and expect in error_line(err)


# ----------------------------------------------------------------------------------------------
# Pieces


def test_bits_per_elem_are_ggml_block_sizes():
    got = {t: recommend.bits_per_elem(t) for t in ("f16", "q8_0", "q4_0", "iq4_nl", "polar", "polar3")}
    assert got == {"f16": 16.0, "q8_0": 8.5, "q4_0": 4.5, "iq4_nl": 4.5, "polar": 4.25, "polar3": 3.25}


def test_kv_shape_and_size_from_the_header(tmp_path):
    shape = recommend.kv_shape(tiny_model(tmp_path / "a.gguf"))
    assert (shape.arch, shape.n_layer, shape.n_head_kv, shape.head_k, shape.head_v) == (
        "llama",
        2,
        (2, 2),
        64,
        64,
    )
    f16, mix = recommend.BASE, recommend.parse_setting("polar/polar3")
    assert (
        shape.kv_bytes(f16, 100) == 100 * 2 * 2 * 64 * 2 * 2
    )  # cells x layers x heads x head x K,V x 2 bytes
    assert shape.kv_bytes(mix, 64) == 64 * 2 * 2 * (34 + 26)  # one 64-block per head: polar 34 B, polar3 26 B
    assert shape.bits(mix) == (4.25 + 3.25) / 2
    shape = recommend.kv_shape(tiny_model(tmp_path / "b.gguf", head_count_kv=[1, 3], key_length=128))
    assert shape.n_head_kv == (1, 3) and (shape.head_k, shape.head_v) == (128, 128)
    shape = recommend.kv_shape(tiny_model(tmp_path / "c.gguf", key_length=80, value_length=80))
    assert (
        shape.unfit(recommend.parse_setting("polar"))
        == "K head size 80 is not a multiple of polar's block of 64"
    )
    assert shape.unfit(recommend.parse_setting("f16")) is None


def test_parse_kld_reads_llama_perplexity_summary():
    out = """
====== Perplexity statistics ======
Mean PPL(Q)                   :  24.622329 ±   2.214580
Mean PPL(base)                :  23.213448 ±   2.075597
Mean PPL(Q)/PPL(base)         :   1.060692 ±   0.013174

====== KL divergence statistics ======
Mean    KLD:   0.066583 ±   0.003434
Maximum KLD:   1.474776
RMS Δp    :  6.159 ± 0.431 %
Same top p: 86.667 ± 1.065 %
"""
    assert recommend.parse_kld(out) == {
        "mean_kld": 0.066583,
        "mean_kld_err": 0.003434,
        "same_top_pct": 86.667,
        "same_top_pct_err": 1.065,
        "ppl_ratio": 1.060692,
        "ppl_ratio_err": 0.013174,
    }
    with pytest.raises(ValueError, match=r"no KL-divergence summary.*missing: 'Same top p:'\)"):
        recommend.parse_kld(out.replace("Same top p", "Same tip p"))


def test_choose_fewest_bits_within_budget():
    rows = [
        {"k": "q8_0", "bits": 8.5, "mean_kld": 0.004},
        {"k": "q4_0", "bits": 4.5, "mean_kld": 0.041},
        {"k": "iq4_nl", "bits": 4.5, "mean_kld": 0.030},
        {"k": "polar3", "bits": 3.25, "mean_kld": 0.15},
        {"k": "broken", "bits": 2.0, "mean_kld": float("nan")},
        {"k": "failed", "bits": 1.0, "error": "exit 1"},
    ]
    assert recommend.choose(rows, 0.05)["k"] == "iq4_nl"  # ties on bits: the lower KLD
    assert recommend.choose(rows, 0.035)["k"] == "iq4_nl"
    assert recommend.choose(rows, 0.01)["k"] == "q8_0"
    assert recommend.choose(rows, 0.2)["k"] == "polar3"
    assert recommend.choose(rows, 0.0) is None


# ----------------------------------------------------------------------------------------------
# The flow, on a stand-in llama-perplexity (tests/fake_perplexity.py; the fixture fake_bin, conftest.py)


def test_flow_defaults_json(model, text, fake_bin, capsys):
    rc, out, err = run(capsys, model, "--text", text, "--bin", fake_bin, "--json")
    assert rc == 0, err
    rep = json.loads(out)
    names = [(r["k"], r["v"]) for r in rep["rows"]]  # most bits first
    assert names == [
        ("q8_0", "q8_0"),
        ("q4_0", "q4_0"),
        ("polar", "polar"),
        ("polar", "polar3"),
        ("polar3", "polar3"),
    ]
    assert rep["skipped"] == [
        {"k": "iq4_nl", "v": "iq4_nl", "reason": "llama-perplexity does not accept iq4_nl"}
    ]
    assert rep["recommended"]["k"] == "polar" and rep["recommended"]["v"] == "polar"  # 4.25 bits, KLD 0.03
    assert rep["base"]["ppl"] == 23.2304 and rep["base"]["kv_mib"] == 512 * 2 * 2 * 64 * 4 / 2**20
    assert "logs" not in rep
    assert len(re.findall(r"^\[\d/6\] ", err, re.M)) == 6  # one line per run


def test_flow_text_table_and_no_setting_in_budget(model, text, fake_bin, capsys):
    rc, out, _ = run(
        capsys, model, "--text", text, "--bin", fake_bin, "--types", "q8_0", "polar3", "--max-kld", 0
    )
    assert rc == 0
    assert "recommendation: none of the 2 settings has a mean KLD within the budget 0 (--max-kld)" in out
    assert "K offsets in 0 of 2 layers" in out
    rc, out, _ = run(capsys, model, "--text", text, "--bin", fake_bin, "--types", "polar3", "q8_0/f16")
    assert rc == 0  # polar3 (KLD 0.15) is over the default budget 0.05; K-only q8_0 (0.002) is within
    assert "recommendation: K q8_0 V f16: 12.25 bits/elem" in out and "use: -ctk q8_0 -ctv f16 -fa on" in out


def test_unknown_type_names_the_allowed_ones(model, text, fake_bin, capsys):
    rc, _, err = run(capsys, model, "--text", text, "--bin", fake_bin, "--types", "q5_0")
    line = error_line(err)
    assert rc == 2 and "'q5_0'" in line and "allowed: f32, f16, q8_0, q4_0, polar, polar3" in line


def test_failing_runs_show_their_last_lines(model, text, fake_bin, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_PPL", "fail")
    rc, _, err = run(capsys, model, "--text", text, "--bin", fake_bin)
    assert rc == 1
    assert "failed to create context: unsupported cache type" in err and "load line 29" in err
    line = error_line(err)
    assert "llama-perplexity failed (exit 3)" in line and "full log: " in line
    log = Path(line.split("full log: ")[1].rstrip(")"))
    assert log.is_file() and "load line 0" in log.read_text()  # the whole log is kept

    monkeypatch.setenv("FAKE_PPL", "fail-polar3")  # one candidate fails: the others still run, exit 1
    rc, out, err = run(capsys, model, "--text", text, "--bin", fake_bin, "--types", "q8_0", "polar3")
    assert rc == 1 and "K polar3 V polar3: FAILED: llama-perplexity failed (exit 3)" in err
    assert "failed K polar3 V polar3" in out and "recommendation: K q8_0 V q8_0" in out


@pytest.mark.parametrize(
    ("mode", "expect"),
    [
        ("short", "it tokenizes to 700 tokens; --ctx 512 x --chunks 4 needs 2048"),
        ("fewer", "it holds 3 chunks"),
    ],
)
def test_llama_perplexity_too_short_is_translated(model, text, fake_bin, capsys, monkeypatch, mode, expect):
    monkeypatch.setenv("FAKE_PPL", mode)
    rc, _, err = run(capsys, model, "--text", text, "--bin", fake_bin)
    assert rc == 2 and "is too short" in error_line(err) and expect in err


# ----------------------------------------------------------------------------------------------
# The real thing: SmolLM2-135M with the patched llama-perplexity


def parse_table(out: str) -> dict[tuple[str, str], dict]:
    """Rows of the printed table: (K, V) -> bits, KV MiB, mean KLD, same top %, PPL ratio."""
    rows = {}
    pm = r"(\S+) ± \S+"
    for m in re.finditer(
        rf"^(\w+)\s+(\w+)\s+([\d.]+)\s+([\d.]+)\s+{pm}( \*)?\s+{pm}\s+{pm}\s+\d+ s$", out, re.M
    ):
        k, v, bits, mib, kld, star, top, ratio = m.groups()
        nums = dict(
            zip(
                ("bits", "kv_mib", "mean_kld", "same_top", "ppl_ratio"),
                map(float, (bits, mib, kld, top, ratio)),
                strict=True,
            )
        )
        rows[k, v] = {**nums, "recommended": bool(star)}
    return rows


@pytest.mark.build
def test_end_to_end_smollm2(build_dir, smollm2_path, squad_head, capsys):
    budget = 0.05
    rc, out, err = run(
        capsys, smollm2_path, "--text", squad_head, "--ctx", 256, "--chunks", 2,
        "--types", "q8_0", "polar3", "polar/polar3", "--max-kld", budget,
    )  # fmt: skip
    assert rc == 0, err
    rows = parse_table(out)
    assert set(rows) == {("q8_0", "q8_0"), ("polar3", "polar3"), ("polar", "polar3")}, out
    for r in rows.values():
        assert math.isfinite(r["mean_kld"]) and r["mean_kld"] >= 0 and 0 <= r["same_top"] <= 100
        assert math.isfinite(r["ppl_ratio"]) and r["ppl_ratio"] > 0
    assert (
        rows["q8_0", "q8_0"]["mean_kld"]
        < rows["polar", "polar3"]["mean_kld"]
        < rows["polar3", "polar3"]["mean_kld"]
    )
    assert rows["q8_0", "q8_0"]["same_top"] > rows["polar3", "polar3"]["same_top"]
    assert [r["bits"] for r in rows.values()] == [8.5, 3.75, 3.25]
    assert rows["q8_0", "q8_0"]["kv_mib"] == 2.99  # 30 layers x 256 cells x 3 heads x 64 x 2 x 8.5 bits
    within = [kv for kv, r in rows.items() if r["mean_kld"] <= budget]
    best = min(within, key=lambda kv: (rows[kv]["bits"], rows[kv]["mean_kld"]))
    assert [kv for kv, r in rows.items() if r["recommended"]] == [best]
    assert f"recommendation: K {best[0]} V {best[1]}: " in out
    # SmolLM2 has no K bias: polar K is centered with offsets measured online from the first batch
    assert "K offsets in 30 of 30 layers" in out
    assert "note: llama.cpp reported a different KV size" not in out
    assert len(re.findall(r"^\[\d/4\] ", err, re.M)) == 4

    rc, out, err = run(capsys, smollm2_path, "--text", squad_head, "--ctx", 128, "--chunks", 2,
                       "--types", "q4_0", "--max-kld", 0, "--json")  # fmt: skip
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["recommended"] is None and rep["rows"][0]["mean_kld"] > 0
    assert all(
        r["kv_mib_matches_llama"] for r in [rep["base"], *rep["rows"]]
    )  # header arithmetic == llama.cpp
    assert "recommendation: none of the 1 settings" in recommend.format_report(rep)


@pytest.mark.build
def test_end_to_end_text_too_short_in_tokens(build_dir, smollm2_path, tmp_path, capsys):
    """600 bytes pass the byte check for 2 x 128 tokens but tokenize to fewer: llama-perplexity's
    own complaint (it exits 0) becomes an error."""
    short = tmp_path / "short.txt"
    short.write_text(PROSE[:600], encoding="utf-8")
    rc, _, err = run(capsys, smollm2_path, "--text", short, "--ctx", 128, "--chunks", 2, "--types", "q8_0")
    line = error_line(err)
    assert rc == 2 and re.search(r"it tokenizes to \d+ tokens; --ctx 128 x --chunks 2 needs 256", line), line
