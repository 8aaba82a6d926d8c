"""CuPy kernels of the polar formats (CUDA sources in this folder, compiled with NVRTC).

Modules, imported on demand (none needs CuPy or torch to import):
  loader     sources, #defines, cupy.RawModule per variant, launches on torch's stream
  formats    the block formats the kernels read (polar, polar3, registered research formats)
  codec      encode / encode_into / decode / dequantize_cache; codebook tables on the device
  attention  split-K decode attention: plan (variant, shared memory, splits) and run
"""
