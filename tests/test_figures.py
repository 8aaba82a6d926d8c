"""docs/figures/ and docs/results.md: drawn from the raw result files, and up to date with them.

The PNGs are compared through their `kvpolar-sources` tEXt chunk (sha256 over scripts/figures.py and
the raw files a figure reads), not byte for byte: rendering may differ by a pixel between machines
or matplotlib builds, the inputs may not. Regenerate with `python scripts/write_results.py`.
"""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

import figures
import write_results
from kvpolar import paths

REPO = paths.repo_root()
STALE = "out of date: run `python scripts/write_results.py` and commit docs/results.md and docs/figures/"

# What the raw files in docs/ support; one more figure per docs/bench/gpu/ops-decode*.json.
EXPECTED = {
    "kld-vs-bits.png",
    "tg-vs-depth.png",
    "pp-vs-depth.png",
    "gpu-attention-vs-context.png",
    "gpu-kernel-history.png",
    "kv-memory.png",
}


def _expected() -> set[str]:
    ops = {p.stem + ".png" for p in (REPO / "docs/bench/gpu").glob("ops-decode*.json")}
    return EXPECTED | ops


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    return out, figures.draw_all(out)


def test_every_figure_is_drawn_from_the_raw_files(drawn):
    out, paths_ = drawn
    assert {p.name for p in paths_} == _expected()
    by_name = {f.name: f for f in figures.figures()}
    for p in paths_:
        assert p.parent == out and p.stat().st_size > 5000, p
        with Image.open(p) as im:
            assert im.format == "PNG"
            w, h = im.size
            assert 600 <= w <= 2000 and 300 <= h <= 1000, (p.name, im.size)
            assert im.text[figures.FINGERPRINT_KEY] == figures.fingerprint(by_name[p.name])
            # a drawn figure, not a blank canvas: many colours, mostly background
            colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
            assert colours is not None and len(colours) >= 8, p.name


def test_drawing_is_deterministic(tmp_path):
    fig = next(f for f in figures.figures() if f.name == "kv-memory.png")
    a = figures.draw(fig, tmp_path / "a").read_bytes()
    b = figures.draw(fig, tmp_path / "b").read_bytes()
    assert a == b


def test_results_md_is_up_to_date():
    committed = (REPO / "docs" / "results.md").read_text()
    assert write_results.render() == committed, f"docs/results.md {STALE}"


def test_readme_headline_is_up_to_date():
    """README.md's "Where it stands" is results.md's headline, with links from the repository root."""
    readme = (REPO / "README.md").read_text()
    want = write_results.readme_with_headline(readme, write_results.readme_headline(write_results.render()))
    assert readme == want, f"README.md's headline {STALE} and README.md"
    block = readme.split(write_results.README_BEGIN)[1].split(write_results.README_END)[0]
    assert (
        "CuPy decode attention on NVIDIA H200" in block and "](docs/gpu/" in block and "](gpu/" not in block
    )


def test_readme_headline_markers(tmp_path):
    text = f"intro\n{write_results.README_BEGIN}\nold\nlines\n{write_results.README_END}\nrest\n"
    assert write_results.readme_with_headline(text, ["- new", ""]) == (
        f"intro\n{write_results.README_BEGIN}\n- new\n{write_results.README_END}\nrest\n"
    )
    with pytest.raises(ValueError, match="expected the markers"):
        write_results.readme_with_headline("no markers\n", ["x"])
    with pytest.raises(ValueError, match="in that order"):
        write_results.readme_with_headline(
            f"{write_results.README_END}\n{write_results.README_BEGIN}\n", ["x"]
        )


def test_committed_figures_match_results_md_and_their_sources():
    text = (REPO / "docs" / "results.md").read_text()
    referenced = re.findall(r"!\[[^\]]*\]\(figures/([^)]+)\)", text)
    assert sorted(referenced) == sorted(_expected())
    for f in figures.figures():
        p = figures.FIG_DIR / f.name
        assert p.is_file(), f"{p} is missing: {STALE}"
        with Image.open(p) as im:
            assert im.text.get(figures.FINGERPRINT_KEY) == figures.fingerprint(f), f"{p} {STALE}"
        # the caption names every raw file and the command that wrote it
        caption = f"*{f.caption()}*"
        assert caption in text
        for src in f.sources:
            assert f"`{src}`" in caption
    on_disk = {p.name for p in figures.FIG_DIR.glob("*.png")}
    assert on_disk == set(referenced), (
        f"files in docs/figures/ not in results.md: {on_disk - set(referenced)}"
    )


def test_a_raw_file_missing_a_field_is_named(tmp_path, monkeypatch):
    rel = "docs/bench/quality-qwen.json"
    d = json.loads((REPO / rel).read_text())
    del d["model_file"]
    (tmp_path / "docs/bench").mkdir(parents=True)
    (tmp_path / rel).write_text(json.dumps(d))
    monkeypatch.setattr(figures, "REPO", tmp_path)
    with pytest.raises(ValueError, match=r"quality-qwen\.json: expected the keys .*missing \['model_file'\]"):
        figures.draw_quality()
