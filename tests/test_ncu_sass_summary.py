"""scripts/ncu_sass_summary.py on a small SASS table in the shape of ncu's `--page source --csv
--print-source sass` output: instructions grouped by how often a unit of work runs them."""

from __future__ import annotations

import gzip

import pytest

import ncu_sass_summary as ns

HEAD = (
    '"Kernel Name","k_test",\n'
    '"Address","Source","Warp Stall Sampling (All Samples)","# Samples","Instructions Executed"\n'
)


def _write(tmp_path, rows, gz=False):
    text = HEAD + "".join(f'"0x{i:04x}","{s}","{st}","{st}","{e}"\n' for i, (s, e, st) in enumerate(rows))
    p = tmp_path / ("t.csv.gz" if gz else "t.csv")
    if gz:
        with gzip.open(p, "wt") as f:
            f.write(text)
    else:
        p.write_text(text)
    return p


ROWS = [  # 4 units: two straight-line runs (once a unit), a loop body run twice, code never run
    ("LDC R1, c[0x0][0x28]", "4", 3),
    ("@!P0 FADD.FTZ R2, R1, R1", "4", 5),
    ("FMUL R3, R2, R2", "8", 7),
    ("FMUL R3, R3, R3", "8", 1),
    ("BRA 0x10", "0", 0),
    ("STS.128 [R4], R8", "4", 2),
    ("EXIT", "1,000", 0),
]


@pytest.mark.parametrize("gz", [False, True])
def test_summary_groups_by_multiplicity(tmp_path, gz):
    kernel, rows = ns.read_rows(_write(tmp_path, ROWS, gz))
    assert kernel == "k_test" and len(rows) == len(ROWS)
    s = ns.summarize(rows, per=4)
    assert s["executed_a_unit"] == pytest.approx((4 + 4 + 8 + 8 + 4 + 1000) / 4)
    by = {g["times_a_unit"]: g for g in s["by_multiplicity"]}
    assert by[1.0]["sass"] == 3 and by[1.0]["executed"] == pytest.approx(3.0)
    assert by[2.0]["sass"] == 2 and by[2.0]["executed"] == pytest.approx(4.0)
    assert by[2.0]["stall_samples"] == 8
    assert by[250.0]["executed"] == pytest.approx(250.0)  # "1,000": ncu's thousands separator
    assert [(r["first"], r["last"]) for r in s["straight_runs"]] == [(0, 1), (5, 5)]
    ops = {o["opcode"]: o["executed"] for o in s["top_opcodes"]}
    assert ops["FMUL"] == pytest.approx(4.0) and ops["FADD"] == pytest.approx(1.0)  # predicate, modifiers off
    assert "k_test" in ns.render(kernel, s, 4)


def test_bad_input_is_named(tmp_path, capsys):
    p = tmp_path / "x.csv"
    p.write_text('"a","b"\n"1","2"\n')
    assert ns.main([str(p), "--per", "1"]) == 1
    assert "not ncu's SASS page" in capsys.readouterr().err
    good = _write(tmp_path, ROWS)
    with pytest.raises(ValueError, match="--per must be positive"):
        ns.summarize(ns.read_rows(good)[1], per=0)


def test_stall_reasons_segments_and_top_instructions(tmp_path):
    head = (
        '"Kernel Name","k_test",\n'
        '"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed",'
        '"stall_long_sb","stall_barrier","stall_long_sb (Not Issued)"\n'
    )
    rows = [  # (SASS, executed, long_sb, barrier): a phase of 64, a never-run line, more of it, then 4
        ("LDG R1, [R2]", "64", 0, 0),
        ("FADD R3, R1, R1", "64", 9, 0),
        ("BRA 0x10", "0", 0, 0),
        ("BAR.SYNC 0", "64", 0, 5),
        ("FMUL R4, R3, R3", "4", 2, 0),
        ("EXIT", "4", 0, 1),
    ]
    text = head + "".join(
        f'"0x{i:04x}","{s}","{lsb + bar}","{e}","{lsb}","{bar}","99"\n'
        for i, (s, e, lsb, bar) in enumerate(rows)
    )
    p = tmp_path / "t.csv"
    p.write_text(text)
    kernel, rs = ns.read_rows(p)
    s = ns.summarize(rs, per=4)
    assert s["stall_samples"] == 17
    assert s["stall_reasons"] == {"stall_long_sb": 11, "stall_barrier": 6}  # "(Not Issued)" columns left out
    segs = [(g["first"], g["last"], g["executed_each"], g["stall_samples"]) for g in s["segments"]]
    assert segs == [(0, 3, 64, 14), (4, 5, 4, 3)]  # the never-run BRA does not end the first segment
    assert [(t["index"], t["reason"]) for t in s["top_stalled"][:2]] == [
        (1, "stall_long_sb"),
        (3, "stall_barrier"),
    ]
    out = ns.render(kernel, s, 4)
    assert "by reason: long_sb 11, barrier 6" in out and "0-3" in out
