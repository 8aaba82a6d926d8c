"""scripts/check_kernels.py's SASS count (--sass-count): instructions per function of `cuobjdump -sass`
output, the lines with an address only (the count behind the encoder variants' SASS numbers in
docs/results-gpu.md); and its --resources lines from ptxas -v logs."""

from __future__ import annotations

import pytest

from check_kernels import resources, sass_counts

SASS = """
	code for sm_90
		Function : polar_encode_rs_polar_f16
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;        /* 0x00000a00ff017b82 */
                                                                 /* 0x000fe40000000800 */
        /*0010*/              @!P0 BRA 0x330 ;                   /* 0x00000000004c8947 */
        ..........

		Function : polar_encode_cta_polar_f32
        /*0000*/                   EXIT ;                        /* 0x000000000000794d */
"""


def test_sass_counts_per_function():
    assert sass_counts(SASS) == {"polar_encode_rs_polar_f16": 2, "polar_encode_cta_polar_f32": 1}
    assert sass_counts("no sass here") == {}


@pytest.mark.parametrize(
    ("log", "smem"),
    [
        (  # ptxas 13: no smem on the registers' line where the kernel has none static
            "ptxas info    : Compiling entry function 'polar_attn_mma' for 'sm_90'\n"
            "ptxas info    : Function properties for polar_attn_mma\n"
            "    96 bytes stack frame, 144 bytes spill stores, 160 bytes spill loads\n"
            "ptxas info    : Used 80 registers, used 1 barriers, 96 bytes cumulative stack size\n",
            "-",
        ),
        (  # ptxas 12
            "ptxas info    : Compiling entry function 'polar_attn_mma' for 'sm_90'\n"
            "ptxas info    : Function properties for polar_attn_mma\n"
            "    96 bytes stack frame, 144 bytes spill stores, 160 bytes spill loads\n"
            "ptxas info    : Used 80 registers, 16 bytes smem, 400 bytes cmem[0]\n",
            "16",
        ),
    ],
)
def test_resources_of_a_ptxas_log(log, smem):
    """--resources reads registers, stack and spills from both ptxas versions' -v logs (with nvcc 13 it
    printed nothing until session 31: its pattern wanted "bytes smem" on every entry)."""
    (line,) = resources(log)
    assert line.split() == [
        "polar_attn_mma",
        "regs",
        "80",
        "stack",
        "96",
        "spill",
        "st/ld",
        "144/160",
        "smem",
        smem,
    ]
