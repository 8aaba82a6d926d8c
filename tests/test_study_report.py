"""docs/format-study.md is `study.report.render` of docs/format-study.json: prose (the template)
and numbers (the JSON) cannot drift apart from the committed report."""

from __future__ import annotations

import difflib
import itertools
import json

import pytest

from kvpolar.paths import repo_root
from study import report

DOCS = repo_root() / "docs"


def test_committed_report_renders_from_committed_json():
    res = json.loads((DOCS / "format-study.json").read_text(encoding="utf-8"))
    want = (DOCS / "format-study.md").read_text(encoding="utf-8")
    got = report.render(res)
    if got != want:
        diff = difflib.unified_diff(want.splitlines(True), got.splitlines(True), "committed", "rendered")
        pytest.fail(
            "docs/format-study.md is not the render of docs/format-study.json; run "
            "`python3 scripts/format_study.py render` (after measuring, `run`)\n"
            + "".join(itertools.islice(diff, 40))
        )


def test_render_without_a_model_or_a_decision():
    """The branches the committed run does not take: a skipped model, cached activations, no
    iq4_nl, no Qwen2.5 criterion, polar below q4_0 in every layer, no decision at all."""
    res = json.loads((DOCS / "format-study.json").read_text(encoding="utf-8"))
    res["real"]["smollm2-135m"]["dumped_s"] = None
    res["real"]["smollm2-135m"]["meta"]["seconds"] = 67.0
    res["real"]["qwen2.5-coder-1.5b"] = {"skipped": "no activations in /nowhere"}
    res["iq4_nl"] = None
    res["decision"]["polar"]["qwen_ok"] = None
    for cell in res["real"]["smollm2-135m"]["cells"].values():
        for layer in cell["layouts"].get("polar", {}).get("per_layer", {}).values():
            for metric in layer:
                layer[metric] /= 2
    md = report.render(res)
    assert "activations cached (dumping them takes smollm2-135m 67 s more)" in md
    assert "**qwen2.5-coder-1.5b**: skipped (no activations in /nowhere)." in md
    assert "iq4_nl: not measured." in md
    assert "| attention-logit error on real Qwen2.5 K below q4_0's | – | not measured |" in md  # noqa: RUF001
    assert "of both models and in every layer measured (per-layer" in md
    res["decision"] = {}
    md = report.render(res)
    assert "## Decision" not in md and md.endswith("the other one).\n\n")
