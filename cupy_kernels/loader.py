"""Loading the CUDA sources of cupy_kernels and launching them on torch's stream.

The kernels are real files next to this module: `polar_common.cuh` (conversions, block
readers), `polar_encode.cu` (encoder, decoder), `polar_attn_common.cuh` + `polar_attn_simt.cu`,
`polar_attn_mma.cu`, `polar_attn_combine.cu` (decode attention). `module(name, defines)` compiles
one file with NVRTC into a `cupy.RawModule`, once per process and variant (functools.cache), with
the variant's compile-time constants prepended as #defines (`build_source`); the generated
`kvpolar/csrc/ggml-polar-format.h` (block structs, kernel format ids, tables from
`kvpolar.format`) is on the include path.

CuPy and torch are imported on first use: importing cupy_kernels needs neither, and a missing
CuPy raises a RuntimeError naming the package to install.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import numpy as np

import kvpolar

log = logging.getLogger("cupy_kernels")

CUPY_PACKAGE = "cupy-cuda13x"
# NVRTC options of every module; EXACT_OPTIONS are added for the encoder (IEEE float32 as
# docs/FORMAT.md requires: no contraction, IEEE division and square root, subnormals kept). CuPy
# appends -ftz=true after them and NVRTC takes the last of the two, so on CuPy the encoder is built
# with ftz; its bytes do not depend on it (polar_block.cuh: every float32 operation of the encoder
# is inline PTX without .ftz), and its GPU parity tests check them against numpy.
OPTIONS = ("--std=c++17",)
EXACT_OPTIONS = ("--fmad=false", "--prec-div=true", "--prec-sqrt=true", "--ftz=false")


def kernel_dir() -> Path:
    """Folder holding the CUDA sources (this package)."""
    return Path(__file__).resolve().parent


def header_dir() -> Path:
    """Folder holding the generated ggml-polar-format.h."""
    return Path(kvpolar.__file__).resolve().parent / "csrc"


def include_options() -> tuple[str, ...]:
    return (f"-I{kernel_dir()}", f"-I{header_dir()}")


@functools.cache
def _sources_digest() -> str:
    h = hashlib.sha256()
    for p in [*sorted(kernel_dir().glob("*.cu*")), header_dir() / "ggml-polar-format.h"]:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def build_source(name: str, defines: dict[str, int | float]) -> str:
    """The NVRTC source of kernel file `name`: a digest line of all sources (CuPy's cache key,
    so an edited header recompiles), the #defines, then the file."""
    lines = [f"// kvpolar {name} sources {_sources_digest()}"]
    lines += [f"#define {k} {v}" for k, v in defines.items()]
    return "\n".join(lines) + "\n" + (kernel_dir() / name).read_text()


def cupy():
    """The cupy module, or a RuntimeError saying how to install it."""
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError(f"the CuPy kernels need CuPy: pip install {CUPY_PACKAGE}") from e
    return cupy


def torch():
    import torch

    return torch


def define_options(defines) -> tuple[str, ...]:
    """Compiler options a variant's defines ask for besides the #defines: MAXRREG N -> --maxrregcount=N
    (cupy_kernels.attention's AttnConfig.maxrreg: a register budget the front end also plans with, which
    __launch_bounds__ and __maxnreg__ do not give)."""
    return tuple(f"--maxrregcount={int(v)}" for k, v in dict(defines).items() if k == "MAXRREG")


@functools.cache
def module(name: str, defines: tuple[tuple[str, int | float], ...] = (), exact: bool = False):
    """cupy.RawModule of kernel file `name` with `defines` (compiled once per process)."""
    cp = cupy()
    opts = OPTIONS + include_options() + (EXACT_OPTIONS if exact else ()) + define_options(defines)
    log.debug("compiling %s %s", name, defines)
    return cp.RawModule(code=build_source(name, dict(defines)), options=opts)


class _Launcher:
    """Launches cupy kernels on torch's current stream with raw pointers."""

    def __init__(self) -> None:
        self._streams: dict[int, object] = {}

    def stream(self):
        ptr = torch().cuda.current_stream().cuda_stream
        s = self._streams.get(ptr)
        if s is None:
            s = self._streams[ptr] = cupy().cuda.ExternalStream(ptr)
        return s

    def __call__(self, kern, grid, block, args, shared_mem: int = 0) -> None:
        with self.stream():
            kern(grid, block, args, shared_mem=shared_mem)


launch = _Launcher()


@functools.cache
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device `device_index` (asked once per device)."""
    return torch().cuda.get_device_properties(device_index).multi_processor_count


# cudaDeviceAttr values (driver_types.h): cudaDevAttrMemoryClockRate (kHz), cudaDevAttrGlobalMemoryBusWidth
# (bits), cudaDevAttrClockRate (kHz), cudaDevAttrMultiProcessorCount
DEVICE_ATTRIBUTES = (36, 37, 13, 16)


@functools.cache
def memory_bytes_per_sm_cycle(device_index: int) -> float | None:
    """Peak DRAM bytes a cycle of one SM of CUDA device `device_index`, from the device's attributes (memory
    clock x 2 x bus width / (SMs x SM clock)): 12.8 on an H100 SXM, ~18.8 on an H200. None where CuPy or
    the attributes are missing (no GPU, a runtime that no longer reports a clock)."""
    try:
        get = cupy().cuda.runtime.deviceGetAttribute
        mem_khz, bus_bits, sm_khz, sms = (get(a, device_index) for a in DEVICE_ATTRIBUTES)
    except Exception:  # no CuPy, no device, or an attribute this runtime does not give
        return None
    if min(mem_khz, bus_bits, sm_khz, sms) <= 0:
        return None
    return 2 * mem_khz * bus_bits / 8 / (sms * sm_khz)


def ptr(t) -> np.uint64:
    """Device address of a torch tensor, as a kernel argument."""
    return np.uint64(t.data_ptr())


def check_cuda(name: str, t) -> None:
    """ValueError unless `t` is a CUDA torch.Tensor."""
    th = torch()
    if not isinstance(t, th.Tensor) or not t.is_cuda:
        raise ValueError(
            f"{name} must be a CUDA torch.Tensor, got {type(t).__name__}"
            + (f" on {t.device}" if isinstance(t, th.Tensor) else "")
        )
