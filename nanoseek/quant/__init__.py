"""Quantized weights and low-precision compute: the DeepSeek-V3 FP8 recipe (section 3.3: 1x128 / 128x128 tiles, fp32 promotion), its Triton kernels and FP8-stored weights for serving."""
