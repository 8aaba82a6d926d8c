"""One llama-bench run: the command line and its JSON output as rows, for the benchmark scripts
(bench_llama.py on the CPU, bench_llama_gpu.py on a GPU, bench_cpu_flags.py). Standard library
only: the GPU machine runs it with any python3."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence


def command(
    binary: str,
    model: str,
    k: str,
    v: str,
    depths: Iterable[int],
    reps: int,
    extra: Sequence[str] = (),
) -> list[str]:
    """llama-bench with flash attention, K/V cache types k/v, pp512 and tg64 at each depth, JSON out."""
    return [
        binary,
        "-m",
        model,
        "-fa",
        "1",
        "-ctk",
        k,
        "-ctv",
        v,
        "-p",
        "512",
        "-n",
        "64",
        "-d",
        ",".join(str(d) for d in depths),
        "-r",
        str(reps),
        "-o",
        "json",
        *extra,
    ]


def results(stdout: str) -> list[dict]:
    """(test, depth, tokens/s, its standard deviation, and each rep's tokens/s where llama-bench gives them:
    tps_samples) of each llama-bench JSON record in stdout;
    test is "pp<n>" or "tg<n>". Raises ValueError when stdout holds no JSON array."""
    try:
        data = json.loads(stdout[stdout.index("[") : stdout.rindex("]") + 1])
    except ValueError as e:
        raise ValueError(f"llama-bench printed no JSON array: {stdout[-500:]!r}") from e
    return [
        {
            "test": f"pp{d['n_prompt']}" if d["n_prompt"] else f"tg{d['n_gen']}",
            "depth": d.get("n_depth", 0),
            "tps": d["avg_ts"],
            "tps_sd": d["stddev_ts"],
            **({"tps_samples": d["samples_ts"]} if "samples_ts" in d else {}),
        }
        for d in data
    ]
