"""CPU instruction sets for the llama.cpp build: probed by executing, not by reading CPUID.

GGML_NATIVE=ON compiles with -march=native, which trusts CPUID. In a VM CPUID can list
extensions whose instructions trap (seen: AMX on a virtualised Sapphire Rapids, SIGILL in
ggml's AMX matmul). So on x86-64 the build turns GGML_NATIVE off and enables each ggml ISA
option only when a probe program executing one instruction of that extension exits 0.
AMX stays off everywhere: its kernels speed up matmuls of some weight types, nothing of the
KV cache, and they need a per-process kernel permission (arch_prctl) that a VM may grant
while the instructions still trap. The result is cached per CPU identity (model, flags,
kernel, compiler) under $CACHE/cpu-probe/ and enters the build key through the cmake flags.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

from kvpolar.atomic import atomic_write_text
from kvpolar.paths import cache_dir

from .util import BootstrapError, compiler, log, sha256_bytes, signal_name

# (ggml cmake option, gcc flags, requires, C statement executing the instruction)
X86_PROBES: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("GGML_SSE42", "-msse4.2", (), "r = _mm_crc32_u32((unsigned)v, 7u);"),
    (
        "GGML_AVX",
        "-mavx",
        (),
        "__m256 a = _mm256_set1_ps((float)v); a = _mm256_add_ps(a, a); r = (int)_mm256_cvtss_f32(a);",
    ),
    (
        "GGML_F16C",
        "-mf16c",
        ("GGML_AVX",),
        "__m128i h = _mm_set1_epi16((short)v); r = (int)_mm_cvtss_f32(_mm_cvtph_ps(h));",
    ),
    (
        "GGML_FMA",
        "-mfma",
        ("GGML_AVX",),
        "__m256 a = _mm256_set1_ps((float)v); a = _mm256_fmadd_ps(a, a, a); r = (int)_mm256_cvtss_f32(a);",
    ),
    ("GGML_BMI2", "-mbmi2", (), "r = (int)_pdep_u32((unsigned)v, 0x55u);"),
    (
        "GGML_AVX2",
        "-mavx2",
        ("GGML_AVX",),
        "__m256i a = _mm256_set1_epi32(v); a = _mm256_add_epi32(a, a); r = _mm256_extract_epi32(a, 0);",
    ),
    (
        "GGML_AVX_VNNI",
        "-mavxvnni",
        ("GGML_AVX2",),
        "__m256i a = _mm256_set1_epi32(v); "
        "a = _mm256_dpbusd_avx_epi32(a, a, a); "
        "r = _mm256_extract_epi32(a, 0);",
    ),
    (
        "GGML_AVX512",
        "-mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw",
        ("GGML_AVX2",),
        "__m512i a = _mm512_set1_epi16((short)v); a = _mm512_add_epi16(a, a); "
        "__m512d d = _mm512_set1_pd((double)v); d = _mm512_and_pd(d, d); "
        "__m256i c = _mm256_conflict_epi32(_mm256_set1_epi32(v)); "
        "r = _mm_cvtsi128_si32(_mm512_castsi512_si128(a)) + (int)_mm512_reduce_add_pd(d) "
        "+ _mm256_extract_epi32(c, 1);",
    ),
    (
        "GGML_AVX512_VBMI",
        "-mavx512vbmi",
        ("GGML_AVX512",),
        "__m512i a = _mm512_set1_epi8((char)v); "
        "a = _mm512_permutexvar_epi8(a, a); "
        "r = _mm_cvtsi128_si32(_mm512_castsi512_si128(a));",
    ),
    (
        "GGML_AVX512_VNNI",
        "-mavx512vnni",
        ("GGML_AVX512",),
        "__m512i a = _mm512_set1_epi32(v); "
        "a = _mm512_dpbusd_epi32(a, a, a); "
        "r = _mm_cvtsi128_si32(_mm512_castsi512_si128(a));",
    ),
    (
        "GGML_AVX512_BF16",
        "-mavx512bf16",
        ("GGML_AVX512",),
        "__m512 a = _mm512_set1_ps((float)v); "
        "__m512bh b = _mm512_cvtne2ps_pbh(a, a); "
        "r = (int)_mm512_dpbf16_ps(a, b, b)[0];",
    ),
)

X86_ALWAYS_OFF = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")

PROBE_VERSION = "1"


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _cc() -> str:
    cc = compiler("c")
    if not cc:
        raise BootstrapError(
            "no C compiler found (cc/gcc/clang); needed to build llama.cpp. "
            "Install one: apt-get install build-essential"
        )
    return cc


def cpuinfo_field(name: str) -> str:
    """The first `name : value` of /proc/cpuinfo ('model name', 'flags'), '' where there is none."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            if k.strip() == name:
                return v.strip()
    return ""


def cpu_model() -> str:
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def machine_label() -> str:
    """The machine a result file names: "AMD EPYC (AVX2), 2 cores, Linux" (simd_label: the build's ISA)."""
    return f"{cpu_model()} ({simd_label()}), {os.cpu_count()} cores, {platform.system()}"


def simd_label() -> str:
    """The widest x86 vector ISA the set-up builds llama.cpp with on this machine ("AVX-512", "AVX2",
    "AVX", "SSE4.2"; "native" elsewhere): one "AMD EPYC" VM may have AVX-512 and the next not, and the
    CPU paths and their rounding differ (session 39)."""
    flags = cpu_cmake_flags()
    for opt, label in (
        ("GGML_AVX512", "AVX-512"),
        ("GGML_AVX2", "AVX2"),
        ("GGML_AVX", "AVX"),
        ("GGML_SSE42", "SSE4.2"),
    ):
        if f"-D{opt}=ON" in flags:
            return label
    return "native" if "-DGGML_NATIVE=ON" in flags else "no SIMD"


@functools.cache
def _cpu_identity() -> str:
    """What the probe result depends on: CPU model and flags, kernel, compiler."""
    model, flags = cpuinfo_field("model name"), cpuinfo_field("flags")
    cc = _cc()
    ver = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    return "\n".join([PROBE_VERSION, platform.machine(), platform.release(), model, flags, cc, *ver])


def cpu_identity_digest() -> str:
    return sha256_bytes(_cpu_identity().encode())[:16]


def probe_x86_features(workdir: Path) -> dict[str, bool]:
    """Compile and run one tiny program per ggml ISA option; True where it executed."""
    cc = _cc()
    found: dict[str, bool] = {}
    for opt, flags, requires, stmt in X86_PROBES:
        if not all(found.get(r) for r in requires):
            found[opt] = False
            continue
        src = workdir / f"{opt.lower()}.c"
        exe = workdir / opt.lower()
        src.write_text(
            "#include <immintrin.h>\n#include <stdio.h>\n"
            "int main(int argc, char **argv) { (void)argv; volatile int v = argc + 1; int r = 0;\n"
            f'  {stmt}\n  printf("%d\\n", r); return 0; }}\n'
        )
        comp = subprocess.run(
            [cc, "-O0", *flags.split(), str(src), "-o", str(exe)], capture_output=True, text=True
        )
        if comp.returncode != 0:
            log(f"cpu probe: {opt}: the compiler does not support {flags} (off)")
            found[opt] = False
            continue
        res = subprocess.run([str(exe)], capture_output=True, text=True)
        found[opt] = res.returncode == 0
        if res.returncode < 0:
            log(
                f"cpu probe: {opt}: executing it raised {signal_name(-res.returncode)}, "
                "whatever CPUID lists (off)"
            )
    return found


@functools.cache
def probed_features(ident: str, cache: Path) -> dict[str, bool]:
    """The probe result for this CPU identity: from `cache` if it is there, else probed and stored."""
    with contextlib.suppress(ValueError, OSError, KeyError):
        return json.loads(cache.read_text())["features"]
    with tempfile.TemporaryDirectory(prefix="kvpolar-cpu-probe-") as tmp:
        found = probe_x86_features(Path(tmp))
    atomic_write_text(cache, json.dumps({"identity": ident, "features": found}, indent=2) + "\n", mkdir=True)
    log("cpu probe: " + " ".join(o.removeprefix("GGML_") for o, ok in found.items() if ok))
    return found


def cpu_cmake_flags() -> tuple[str, ...]:
    """ISA cmake flags for this machine (cached per CPU identity under $CACHE/cpu-probe/)."""
    if not is_x86_64():
        # Elsewhere (aarch64, ...) ggml's native detection does not rely on CPUID lists.
        return ("-DGGML_NATIVE=ON",)
    ident = _cpu_identity()
    found = probed_features(ident, cache_dir() / "cpu-probe" / (sha256_bytes(ident.encode())[:16] + ".json"))
    flags = ["-DGGML_NATIVE=OFF"]
    flags += [f"-D{opt}={'ON' if found.get(opt) else 'OFF'}" for opt, *_ in X86_PROBES]
    flags += [f"-D{opt}=OFF" for opt in X86_ALWAYS_OFF]
    return tuple(flags)
