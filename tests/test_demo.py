"""scripts/demo.py: llama.cpp log parsing, and an honest exit status (unknown type, crashed run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import demo

REPO = Path(__file__).resolve().parent.parent

# A recorded `llama-completion -lv 4` log (the demo's polar run: SmolLM2-135M-Instruct Q4_1,
# ctx 4096, the Amazon article), shortened to the context set-up and the timings.
LOG_SAMPLE = REPO / "tests" / "data" / "demo_llama_completion.log"

HELP_SAMPLE = """\
-ctk,  --cache-type-k TYPE              KV cache data type for K
                                        allowed values: f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0,
                                        q5_1, polar, polar3
                                        (default: f16)
                                        (env: LLAMA_ARG_CACHE_TYPE_K)
"""


def test_parse_log():
    got = demo.parse_log(LOG_SAMPLE.read_text())
    assert got == {
        "kv_mib": 23.91, "k_mib": 11.95, "v_mib": 11.95,
        "prompt_tokens": 2999, "prompt_tps": 110.46,
        "gen_tokens": 24, "gen_tps": 32.59,
    }  # fmt: skip
    assert demo.parse_log("no timings here") == {}


def test_parse_answer_and_help():
    assert demo.parse_answer(" Francisco de Orellana, in 1542. [end of text]\n\n") == (
        "Francisco de Orellana, in 1542."
    )
    assert demo.allowed_cache_types(HELP_SAMPLE)[-3:] == ["q5_1", "polar", "polar3"]
    assert "f16" in demo.allowed_cache_types(HELP_SAMPLE)


def test_exit_description():
    assert demo.exit_description(-11) == "killed by SIGSEGV"
    assert demo.exit_description(-4) == "killed by SIGILL"
    assert demo.exit_description(139) == "exit 139 (128+SIGSEGV)"
    assert demo.exit_description(1) == "exit 1"


def test_article():
    text = " = A = \n\nfirst.\n\nsecond.\n\n = B = \n\nthird.\n"
    assert demo.article(text, "A") == "first.\n\nsecond."
    assert demo.article(text, "B") == "third."
    with pytest.raises(ValueError, match="no article 'C'"):
        demo.article(text, "C")


def run_demo(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), *args],
        capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO,
    )  # fmt: skip


@pytest.fixture
def fake_inputs(tmp_path) -> list[str]:
    """--model and --text options pointing at small stand-ins (a fake binary ignores the model)."""
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "squad.txt").write_text(f" = {demo.ARTICLE} = \n\nSome text.\n", encoding="utf-8")
    return ["--model", str(tmp_path / "model.gguf"), "--text", str(tmp_path / "squad.txt")]


def test_crashed_run_exits_nonzero(tmp_path, fake_inputs):
    """A binary killed by SIGSEGV: the demo names the signal and exits 1 after the table."""
    fake = tmp_path / "llama-completion"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --help ]; then printf "%s" "$HELP"; exit 0; fi\n'
        "echo 'llama_model_load: loading the model' >&2\n"
        "kill -SEGV $$\n"
    )
    fake.chmod(0o755)
    p = run_demo("--bin", str(fake), "--types", "f16", "polar", *fake_inputs, env={"HELP": HELP_SAMPLE})
    assert p.returncode == 1, p.stdout + p.stderr
    assert "FAILED (killed by SIGSEGV)" in p.stdout
    assert "llama_model_load: loading the model" in p.stdout  # the log's last lines
    assert "failed runs: f16 (killed by SIGSEGV), polar (killed by SIGSEGV)" in p.stderr


@pytest.mark.build
def test_unknown_type_exits_2(build_dir, smollm2_path, squad_text_path):
    p = run_demo(env={"KVPOLAR_DEMO_TYPES": "f16 no_such_type"}, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "unknown KV cache type 'no_such_type'" in p.stderr
    assert "allows: " in p.stderr and "polar" in p.stderr.split("allows: ")[1]
    assert "llama-completion -ctk" not in p.stdout  # nothing ran


@pytest.mark.build
@pytest.mark.slow
def test_demo_end_to_end(build_dir, smollm2_path, squad_text_path, tmp_path):
    """The real binary on a short article (two paragraphs of the real one): both runs parse."""
    body = demo.article(squad_text_path.read_text(encoding="utf-8"), demo.ARTICLE).split("\n\n")
    short = tmp_path / "squad.txt"
    short.write_text(f" = {demo.ARTICLE} = \n\n{body[0]}\n\n{body[6]}\n", encoding="utf-8")
    p = run_demo("--types", "f16", "polar", "--ctx", "1024", "--text", str(short), timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [line.split() for line in p.stdout.splitlines() if line.startswith(("f16 ", "polar "))]
    table = {row[0]: row for row in rows}
    assert float(table["f16"][3].rstrip("x")) == 1.0
    assert float(table["polar"][3].rstrip("x")) < 0.3  # polar K+V: 4.25 bits vs 16
    assert p.stdout.count("answer with the") == 2
