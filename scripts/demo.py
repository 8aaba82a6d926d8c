"""The main job: a long prompt to llama.cpp with an f16 and a polar KV cache, side by side.

    ./scripts/demo.sh                  bootstraps, then runs this file with the venv's python
    python scripts/demo.py [--types f16 polar] [--ctx 4096] [--threads N]

Most of one SQuAD article (from the text bootstrap.py fetches; about 3,000 tokens) and a question
whose answer is in it go to `llama-completion` on the default model (SmolLM2-135M-Instruct
Q4_1): chat template, single turn, greedy, flash attention on, once per cache type with
`-ctk T -ctv T`. From llama.cpp's own log the demo reads the KV cache size
(`llama_kv_cache: size = ...`), the prompt and generation speed (`prompt eval time = ...`,
`eval time = ...`) and the answer, and prints them side by side.

Environment (the options win): KVPOLAR_DEMO_TYPES (default "f16 polar"), KVPOLAR_DEMO_CTX
(default 4096), KVPOLAR_DEMO_THREADS (default: all cores).

Exit status: 0 when every run succeeded; 1 when a run failed (non-zero exit or killed by a
signal; the table shows what the other runs gave); 2 when the demo cannot start (an unknown
cache type, a missing file).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from kvpolar import paths

ARTICLE = "Amazon rainforest"  # the title line in squad.txt is " = Amazon rainforest = "
MAX_CHARS = 13_500  # its first 19 of 21 paragraphs, ~3,000 tokens: a warm run stays under a minute on 2 cores
QUESTION = "Who was the first European to travel the length of the Amazon River, and in what year?"
N_PREDICT = 48

# Lines of llama.cpp's log (src/llama-kv-cache.cpp; common/sampling.cpp common_perf_print), e.g.
#   llama_kv_cache: size =   90.00 MiB (  4096 cells,  30 layers,  1/1 seqs), K (f16):   45.00 MiB, ...
#   common_perf_print: prompt eval time = 7707.08 ms /  3436 tokens (2.24 ms per token, 445.82 tokens ...
#   common_perf_print:        eval time =  512.33 ms /    47 runs   (10.90 ms per token, 91.74 tokens ...
# (tests/data/demo_llama_completion.log is a whole one)
_NUM = r"([-+]?(?:\d+(?:\.\d*)?|inf|nan))"
KV_RE = re.compile(
    rf"llama_kv_cache: +size = *{_NUM} MiB .*?K \(([^)]*)\): *{_NUM} MiB, V \(([^)]*)\): *{_NUM} MiB"
)
PROMPT_RE = re.compile(
    rf"prompt eval time = *{_NUM} ms / *(\d+) tokens \( *{_NUM} ms per token, *{_NUM} tokens per second\)"
)
EVAL_RE = re.compile(
    rf"(?<!prompt) eval time = *{_NUM} ms / *(\d+) runs *\( *{_NUM} ms per token, *{_NUM} tokens per second\)"
)
END_OF_TEXT = "[end of text]"


@dataclass
class Run:
    """One llama-completion run: what its log says (None where it says nothing), and why it
    failed (None when it did not)."""

    type: str
    error: str | None
    seconds: float
    log: Path
    answer: str = ""
    kv_mib: float | None = None
    k_mib: float | None = None
    v_mib: float | None = None
    prompt_tokens: int | None = None
    prompt_tps: float | None = None
    gen_tokens: int | None = None
    gen_tps: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def parse_log(log: str) -> dict:
    """KV size (MiB: total, K, V) and timings from llama.cpp's stderr; the last match of each."""
    out: dict = {}
    if kv := KV_RE.findall(log):
        total, _, k, _, v = kv[-1]
        out.update(kv_mib=float(total), k_mib=float(k), v_mib=float(v))
    if pp := PROMPT_RE.findall(log):
        _, n, _, tps = pp[-1]
        out.update(prompt_tokens=int(n), prompt_tps=float(tps))
    if tg := EVAL_RE.findall(log):
        _, n, _, tps = tg[-1]
        out.update(gen_tokens=int(n), gen_tps=float(tps))
    return out


def parse_answer(stdout: str) -> str:
    """The generated text: llama-completion's stdout without the end-of-text marker."""
    text = stdout.strip()
    if text.endswith(END_OF_TEXT):
        text = text[: -len(END_OF_TEXT)]
    return text.strip()


def allowed_cache_types(help_text: str) -> list[str]:
    """The values listed under --cache-type-k in `llama-completion --help` (the list wraps)."""
    m = re.search(r"--cache-type-k.*?allowed values:(.*?)\(default", help_text, re.S)
    return re.findall(r"[\w.]+", m.group(1)) if m else []


def exit_description(rc: int) -> str:
    """'exit 1', 'killed by SIGSEGV', or for a shell's 128+N 'exit 139 (128+SIGSEGV)'."""
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    if rc > 128:
        try:
            return f"exit {rc} (128+{signal.Signals(rc - 128).name})"
        except ValueError:
            pass
    return f"exit {rc}"


def article(text: str, title: str) -> str:
    """The paragraphs of one article of squad.txt (articles start with a ' = Title = ' line)."""
    m = re.search(rf"^ = {re.escape(title)} = *$\n(.*?)(?=^ = [^\n]* = *$|\Z)", text, re.M | re.S)
    if not m:
        raise ValueError(f"no article {title!r} in the SQuAD text")
    return m.group(1).strip()


def build_prompt(squad_text: str) -> str:
    """The article's paragraphs up to MAX_CHARS (at least one), then the question."""
    kept: list[str] = []
    for para in article(squad_text, ARTICLE).split("\n\n"):
        if kept and sum(len(k) + 2 for k in kept) + len(para) > MAX_CHARS:
            break
        kept.append(para)
    body = "\n\n".join(kept)
    return (
        f"Read this article about the {ARTICLE}, then answer the question after it.\n\n"
        f"{body}\n\nQuestion: {QUESTION}\nAnswer in one sentence."
    )


def run_type(binary: Path, model: Path, prompt_file: Path, t: str, args, logdir: Path) -> Run:
    cmd = [
        str(binary), "-m", str(model), "-f", str(prompt_file), "-n", str(N_PREDICT),
        "--temp", "0", "-c", str(args.ctx), "-t", str(args.threads), "-fa", "on",
        "-ctk", t, "-ctv", t, "-fit", "off", "-cnv", "-st", "--no-display-prompt", "--simple-io",
        "-lv", "4",  # 4 (trace) lets libllama's own lines (the KV size) through
    ]  # fmt: skip
    log = logdir / f"llama-completion-{t}.log"
    out = logdir / f"llama-completion-{t}.out"
    t0 = time.perf_counter()
    with log.open("w") as ferr, out.open("w") as fout:
        ferr.write(" ".join(cmd) + "\n\n")
        ferr.flush()
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=fout, stderr=ferr)
    error = exit_description(p.returncode) if p.returncode else None
    run = Run(t, error, time.perf_counter() - t0, log, parse_answer(out.read_text(errors="replace")))
    for k, v in parse_log(log.read_text(errors="replace")).items():
        setattr(run, k, v)
    if run.ok and None in (run.kv_mib, run.prompt_tps, run.gen_tps):
        run.error = "no 'llama_kv_cache: size' or timing line in its log"
    return run


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(runs: list[Run]) -> None:
    base = next((r.kv_mib for r in runs if r.type == "f16" and r.kv_mib), None)
    rows = [("type", "KV cache", "vs f16", "K", "V", "prompt tok", "prompt t/s", "gen t/s", "wall s")]
    for r in runs:
        ratio = f"{r.kv_mib / base:.3f}x" if base and r.kv_mib is not None else "-"
        rows.append((
            r.type if r.ok else f"{r.type} FAILED",
            _fmt(r.kv_mib, ".2f") + " MiB" * (r.kv_mib is not None), ratio,
            _fmt(r.k_mib, ".2f"), _fmt(r.v_mib, ".2f"),
            _fmt(r.prompt_tokens, "d"), _fmt(r.prompt_tps, ".1f"), _fmt(r.gen_tps, ".1f"),
            f"{r.seconds:.1f}",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:  # type and size left-aligned, numbers right-aligned
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in pairs]
        print("  ".join(cells))
    print("(K and V in MiB; speeds from llama.cpp's prompt eval / eval timings)")
    print()
    for r in runs:
        print(f"answer with the {r.type} cache:")
        text = r.answer or ("(no answer: the run failed)" if not r.ok else "(empty)")
        print(textwrap.fill(text, width=100, initial_indent="    ", subsequent_indent="    "))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    env = os.environ.get
    ap.add_argument(
        "--types",
        nargs="+",
        default=env("KVPOLAR_DEMO_TYPES", "f16 polar").split(),
        help="KV cache types, one run each (default: $KVPOLAR_DEMO_TYPES or f16 polar)",
    )
    ap.add_argument("--ctx", type=int, default=int(env("KVPOLAR_DEMO_CTX", "4096")))
    ap.add_argument("--threads", type=int, default=int(env("KVPOLAR_DEMO_THREADS", os.cpu_count() or 2)))
    ap.add_argument("--bin", type=Path, help="llama-completion (default: the patched build's)")
    ap.add_argument("--model", type=Path, help="GGUF model (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--text", type=Path, help="SQuAD text (default: the one bootstrap.py fetched)")
    args = ap.parse_args(argv)

    try:
        binary = args.bin or paths.bin_path("llama-completion")
        model = args.model or paths.data_file(paths.SMOLLM2_GGUF)
        prompt = build_prompt((args.text or paths.data_file(paths.SQUAD_TXT)).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2

    try:
        p = subprocess.run([str(binary), "--help"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as e:
        print(f"demo: cannot run {binary}: {e}", file=sys.stderr)
        return 2
    allowed = allowed_cache_types(p.stdout + p.stderr)
    if not allowed:
        print(
            f"demo: `{binary} --help` ({exit_description(p.returncode)}) lists no cache types "
            "(no 'allowed values:' under --cache-type-k)",
            file=sys.stderr,
        )
        return 2
    unknown = [t for t in args.types if t not in allowed]
    if unknown:
        print(
            f"demo: unknown KV cache type {', '.join(map(repr, unknown))} "
            f"(KVPOLAR_DEMO_TYPES / --types); {binary.name} allows: {', '.join(allowed)}",
            file=sys.stderr,
        )
        return 2

    logdir = Path(tempfile.mkdtemp(prefix="kvpolar-demo-"))
    prompt_file = logdir / "prompt.txt"
    prompt_file.write_text(prompt, encoding="utf-8")
    print(
        f"== kvpolar demo: {model.name}, ctx {args.ctx}, {args.threads} threads, greedy, "
        f"{N_PREDICT} new tokens, flash attention on =="
    )
    print(f"   prompt: the SQuAD article '{ARTICLE}' ({len(prompt):,} characters), then: {QUESTION}")
    print(f"   logs: {logdir}")
    print()

    runs = []
    for t in args.types:
        print(f"-- {binary.name} -ctk {t} -ctv {t} ...", end=" ", flush=True)
        r = run_type(binary, model, prompt_file, t, args, logdir)
        runs.append(r)
        print(f"{r.seconds:.1f} s" if r.ok else f"FAILED ({r.error})", flush=True)
        if not r.ok:
            tail = r.log.read_text(errors="replace").splitlines()[-15:]
            print(f"   last lines of {r.log}:")
            print("\n".join(f"   | {line}" for line in tail))
    print()
    print_table(runs)
    print()
    print(f"full logs: {logdir}")
    failed = [r for r in runs if not r.ok]
    if failed:
        print("demo: failed runs: " + ", ".join(f"{r.type} ({r.error})" for r in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
