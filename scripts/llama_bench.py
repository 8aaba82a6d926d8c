"""One llama-bench run: the command line and its JSON output as rows, for the benchmark scripts
(bench_llama.py on the CPU, bench_llama_gpu.py on a GPU, bench_cpu_flags.py); and the KV cache's size
as llama-completion logs it (their memory tables); and the command line every result file records
(command_line). Standard library only: the GPU machine runs it with any python3."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """How a result was made, as its file records it: `python3 scripts/SCRIPT ARGS`, ARGS being argv (None:
    this process's arguments), each quoted where the shell needs it."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python3", f"scripts/{script}", *map(shlex.quote, args)])


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


def kv_probe_command(
    binary: str | os.PathLike, model: str | os.PathLike, k: str, v: str, ctx: int, extra: Sequence[str] = ()
) -> list[str]:
    """llama-completion that creates a context of `ctx` cells with K cache type k and V cache type v (flash
    attention on, which a quantized V needs), decodes one token and logs (-v) the cache's size line, which
    `kv_size` reads; `extra`: more arguments (-t N, -ngl 99)."""
    return [
        str(binary),
        "-m",
        str(model),
        *extra,
        "-fa",
        "on",
        "-c",
        str(ctx),
        "-ctk",
        k,
        "-ctv",
        v,
        "-n",
        "1",
        "-p",
        "hi",
        "-no-cnv",
        "--temp",
        "0",
        "-v",
    ]


# llama.cpp's line (src/llama-kv-cache.cpp), e.g.
#   llama_kv_cache: size =   90.00 MiB (  4096 cells,  30 layers,  1/1 seqs), K (f16):   45.00 MiB,
#   V (f16):   45.00 MiB   (one line)
KV_SIZE = re.compile(
    r"llama_kv_cache: +size = +([\d.]+) MiB .*?K \(([^)]*)\): +([\d.]+) MiB, V \(([^)]*)\): +([\d.]+) MiB"
)


def kv_size(log: str) -> dict | None:
    """The first KV cache size line of a llama.cpp log as {total_mib, k_type, k_mib, v_type, v_mib}; None
    where the log has none."""
    m = KV_SIZE.search(log)
    if not m:
        return None
    total, kt, km, vt, vm = m.groups()
    return {"total_mib": float(total), "k_type": kt, "k_mib": float(km), "v_type": vt, "v_mib": float(vm)}


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


def llama_patch_numbers(patches: Iterable[str]) -> list[str]:
    """'0001', ... of the llama.cpp patches in a build's patch list (kvpolar-build.json's "patches":
    patches/llama.cpp/NNNN-*.patch next to patches/llama-cpp-python/*)."""
    return [Path(p).name[:4] for p in patches if Path(p).parent.name == "llama.cpp"]


def build_info(bin_dir: str | os.PathLike, required: bool = True) -> dict | None:
    """The build a run used, for its JSON: the build key and the patch series from kvpolar-build.json
    (which bootstrap.py writes beside bin/), and the experiment diffs `gpu_run.sh prepare` compiled in
    (which the key does not see: $KVPOLAR_EXPERIMENTS_FILE, one `sha256  name` line each or `none`).
    When bin_dir is not a bootstrap.py build (a measurement build made by hand): ValueError, or None
    with required=False."""
    meta = Path(bin_dir).resolve().parent / "kvpolar-build.json"
    if not meta.is_file():
        if not required:
            return None
        raise ValueError(f"expected a bootstrap.py build (bin/ beside kvpolar-build.json), got {bin_dir}")
    b = json.loads(meta.read_text())
    patches = b.get("patches", [])
    llama = llama_patch_numbers(patches)
    info = {
        "key": b["key"],
        "pin": b.get("pin"),
        "patches": patches,
        "last_patch": llama[-1] if llama else None,
    }
    exp = os.environ.get("KVPOLAR_EXPERIMENTS_FILE")
    if exp:
        lines = [
            ln.split()[-1] for ln in Path(exp).read_text().splitlines() if ln.strip() and ln.strip() != "none"
        ]
        info["experiments"] = lines
    return info


def build_label(info: dict | None) -> str | None:
    """'build KEY (patches 0001-NNNN[, experiments: a.diff b.diff])' of a build_info, None without one."""
    if not info:
        return None
    label = f"build {info['key']} (patches 0001-{info['last_patch']}"
    if info.get("experiments"):
        label += ", experiments: " + " ".join(info["experiments"])
    return label + ")"
