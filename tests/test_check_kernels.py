"""scripts/check_kernels.py's SASS count (--sass-count): instructions per function of `cuobjdump -sass`
output, the lines with an address only (the count behind the encoder variants' SASS numbers in
docs/results-gpu.md)."""

from __future__ import annotations

from check_kernels import sass_counts

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
