"""Shared pieces of the GPU benchmarks (scripts/bench_gpu.py): timer, inputs, references.

CUDA events, warm-ups, median of the repetitions, L2 flushed before every timed repetition.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics

log = logging.getLogger("bench_gpu")


def _torch():
    import torch

    return torch


class Timer:
    """Median time (ms) of fn() over reps, the L2 flushed before each: flush "write" (the default) writes
    256 MB, which leaves the L2 full of dirty lines that the timed call's first reads write back; "read"
    reads them (a sum), which leaves clean lines, as a decode step's weight reads do."""

    FLUSHES = ("write", "read")

    def __init__(self, reps: int, warmup: int, flush: str = "write"):
        torch = _torch()
        if flush not in self.FLUSHES:
            raise ValueError(f"flush must be one of {self.FLUSHES}, got {flush!r}")
        self.reps, self.warmup, self.flush_kind = reps, warmup, flush
        self.flush = torch.empty(64 * 1024 * 1024, dtype=torch.int32, device="cuda")
        self.flush.zero_()

    def flush_l2(self) -> None:
        if self.flush_kind == "write":
            self.flush.zero_()
        else:
            self.flush.sum()

    def __call__(self, fn) -> dict:
        torch = _torch()
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        ev = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(self.reps)
        ]
        for s, e in ev:
            self.flush_l2()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        ts = sorted(s.elapsed_time(e) for s, e in ev)
        return {"ms": statistics.median(ts), "min_ms": ts[0], "max_ms": ts[-1], "reps": self.reps}


def rand_blocks(fmt: str, B: int, H: int, T: int, D: int, gen):
    """Random valid cache blocks (finite positive fp16 scales), or float16 values."""
    torch = _torch()
    from cupy_kernels import formats

    if fmt == "f16":
        return torch.randn((B, H, T, D), generator=gen, device="cuda", dtype=torch.float16)
    ts = formats.type_size(fmt)
    c = torch.randint(0, 256, (B, H, T, D // 64, ts), generator=gen, device="cuda", dtype=torch.uint8)
    d = (torch.rand((B, H, T, D // 64, 1), generator=gen, device="cuda") + 0.5).half()
    c[..., :2] = d.view(torch.uint8)
    return c


def attn_fn(q, kc, vc, lens, kfmt: str, vfmt: str, **kw):
    """A no-argument closure over one attention call (binds its arguments now)."""
    from cupy_kernels.attention import attention

    return lambda: attention(q, kc, vc, lens, kfmt, vfmt, **kw)


def cache_bytes(fmt: str, B: int, H: int, T: int, D: int) -> int:
    from cupy_kernels import formats

    return B * H * T * (2 * D if fmt == "f16" else (D // 64) * formats.type_size(fmt))


@dataclasses.dataclass
class Shape:
    B: int
    T: int
    Hq: int
    Hkv: int
    D: int

    @property
    def label(self) -> str:
        return f"B{self.B} T{self.T} {self.Hq}/{self.Hkv} D{self.D}"


def sdpa_fns(q, k, v):
    """SDPA on fp16 K/V, two ways of doing GQA decode; returns {name: fn}."""
    torch = _torch()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    qf = q.reshape(B, Hkv, Hq // Hkv, D)  # the group's heads as query rows (no mask needed)
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]

    def folded():
        with sdpa_kernel(backends):
            return torch.nn.functional.scaled_dot_product_attention(qf, k, v)

    def gqa():
        with sdpa_kernel(backends):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    return {"sdpa_fold": folded, "sdpa_gqa": gqa}


def failed(args, what: str, e: Exception) -> None:
    """A measurement that could not run: logged, and kept for main's exit status and the JSON."""
    log.warning("%s failed: %s", what, e)
    args.failures.append(f"{what}: {str(e)[:300]}")


def print_rows(rows) -> None:
    for r in rows:
        extra = ""
        if r.get("speedup_vs_sdpa"):
            extra += f"  x{r['speedup_vs_sdpa']:.2f} vs {r.get('vs', 'sdpa')}"
        if r.get("pct_copy_rate"):
            extra += f"  {r['pct_copy_rate']:.0f}% of copy"
        if r.get("flush"):
            extra += f"  (L2 flush: {r['flush']})"
        if "splits" in r:  # (compare's kernel rows: what the call launched)
            extra += f"  [{r['splits']} split{'s' if r['splits'] > 1 else ''}, {r['regs']} regs"
            extra += ", out from the kernel]" if r.get("direct") else "]"
        print(
            f"{r['shape']:<24} {r['variant']:<26} {r['ms'] * 1e3:9.1f} us  {r['GBps']:7.0f} GB/s{extra}",
            flush=True,
        )


def register_paperb() -> None:
    """The paper-B preset (research: scripts/study) as the kernels' "paperb" format."""
    from study import paperb_kernel_ref

    paperb_kernel_ref.register_kernel_format()


def graph_fn(fn):
    """fn captured into a CUDA graph (after a warm-up on a side stream); returns the replay."""
    torch = _torch()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g.replay


def device_info() -> dict:
    torch = _torch()
    p = torch.cuda.get_device_properties(0)
    info = {"name": p.name, "sm_count": p.multi_processor_count, "torch": torch.__version__}
    from cupy_kernels import loader

    # what the attention's default rests on (attention.loop_bound_device): None where it cannot be read
    info["memory_bytes_per_sm_cycle"] = loader.memory_bytes_per_sm_cycle(0)
    try:
        import cupy

        info["cupy"] = cupy.__version__
        info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
    except ImportError:
        pass
    return info


# what clock_samples asks nvidia-smi for, in this order
CLOCK_QUERY = "timestamp,clocks.sm,clocks.mem,power.draw"


def parse_clock_samples(text: str, t0, t1) -> dict:
    """The samples of `nvidia-smi --query-gpu=CLOCK_QUERY --format=csv,noheader,nounits` taken between the
    datetimes t0 and t1: {"samples", "sm_mhz_med", "sm_mhz_min", "sm_mhz_max", "mem_mhz_med", "power_w_med"}
    (None for a field with no sample; lines that do not parse are skipped)."""
    import datetime

    sm, mem, pw = [], [], []
    for line in text.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            ts = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f")
            vals = [float(x) for x in parts[1:]]
        except ValueError:
            continue
        if t0 <= ts <= t1:
            sm.append(vals[0])
            mem.append(vals[1])
            pw.append(vals[2])

    def med(xs):
        return statistics.median(xs) if xs else None

    return {
        "samples": len(sm),
        "sm_mhz_med": med(sm),
        "sm_mhz_min": min(sm) if sm else None,
        "sm_mhz_max": max(sm) if sm else None,
        "mem_mhz_med": med(mem),
        "power_w_med": med(pw),
    }


def clock_samples(fn, seconds: float = 1.0, period_ms: int = 20, device: int = 0) -> dict | None:
    """The GPU's SM and memory clocks and power while fn() runs back to back for `seconds` (nvidia-smi
    sampling every period_ms; parse_clock_samples's dict, plus "calls"), or None without nvidia-smi. What a
    kernel's time in cycles needs: a boost clock of 1.98 GHz may not hold under a memory-bound load."""
    import datetime
    import shutil
    import subprocess
    import time

    torch = _torch()
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    cmd = [
        smi,
        f"--query-gpu={CLOCK_QUERY}",
        "--format=csv,noheader,nounits",
        f"-lms={period_ms}",
        f"-i={device}",
    ]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(0.5)  # nvidia-smi's own start
        fn()
        torch.cuda.synchronize()
        t0 = datetime.datetime.now()
        end = time.monotonic() + seconds
        calls = 0
        while time.monotonic() < end:
            for _ in range(16):
                fn()
            calls += 16
            torch.cuda.synchronize()
        t1 = datetime.datetime.now()
    finally:
        p.terminate()
        out = p.communicate(timeout=10)[0]
    return dict(parse_clock_samples(out, t0, t1), calls=calls)


def config_field(text: str) -> tuple[str, int]:
    """FIELD=INT (sass_order.py --set, bench_gpu.py --config-sets): an integer or boolean field of
    cupy_kernels.attention.AttnConfig."""
    from cupy_kernels import attention

    name, eq, value = text.partition("=")
    fields = {f.name: f.type for f in dataclasses.fields(attention.AttnConfig)}
    if not eq or fields.get(name) not in ("int", "bool") or not value.lstrip("-").isdigit():
        ints = sorted(n for n, t in fields.items() if t in ("int", "bool"))
        raise argparse.ArgumentTypeError(f"expected FIELD=INT with FIELD one of {ints}, got {text!r}")
    return name, bool(int(value)) if fields[name] == "bool" else int(value)


def config_set(text: str) -> tuple[str, dict]:
    """One of bench_gpu.py --config-sets: "default" (the format's default config as it is) or FIELD=INT
    changes to it, comma-separated ("ctas=2", "ctas=2,wtile=32"): (the text, {field: value})."""
    if text == "default":
        return text, {}
    return text, dict(config_field(t) for t in text.split(","))
