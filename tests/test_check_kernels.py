"""scripts/check_kernels.py's SASS count (--sass-count): instructions per function of `cuobjdump -sass`
output, the lines with an address only (the count behind the encoder variants' SASS numbers in
docs/results-gpu.md); its --resources lines from ptxas -v logs; and its --smem report."""

from __future__ import annotations

import pytest

import check_kernels
from check_kernels import resources, sass_counts
from cupy_kernels import attention

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


def test_smem_report():
    """--smem: a line per attention variant (not the encoder's or the combine's), its bytes from smem_bytes;
    a variant is flagged where the plan's CTAs a SM (227 KiB per block) differ from the SM's 228 KiB: D=64
    polar K+V's default with a 16-bit q (76544 bytes: 2 against 3), and not the D=128 default."""
    vs = check_kernels.variants(False)
    lines = check_kernels.smem_report(vs)
    attn_vs = [v for v in vs if v.file in ("polar_attn_mma.cu", "polar_attn_simt.cu")]
    assert len(lines) == len(attn_vs) + 1 and len(attn_vs) < len(vs)
    flagged = [ln for ln in lines if "differs" in ln]
    tail = f"{len(attn_vs)} attention variants, {len(flagged)} where the plan's CTAs a SM differ"
    assert lines[-1] == tail + " from the SM's"
    d64 = check_kernels.Variant(
        "polar_attn_mma.cu",
        tuple(attention.attn_defines(64, "polar", "polar", 4, 1, attention.DEFAULT_CONFIG).items()),
    )
    d128 = check_kernels.Variant(
        "polar_attn_mma.cu",
        tuple(attention.attn_defines(128, "polar", "polar", 4, 1, attention.DEFAULT_CONFIG).items()),
    )
    one = check_kernels.smem_report([d64, d128])
    assert one[0].startswith("  76544 bytes  plan 2  SM 3  differs  polar_attn_mma.cu HD=64")
    assert (
        "differs" not in one[1]
        and one[2] == "2 attention variants, 1 where the plan's CTAs a SM differ from the SM's"
    )
    assert any(ln.startswith("  76544 bytes  plan 2  SM 3  differs") for ln in flagged)
