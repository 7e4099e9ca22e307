"""Fused FP8 quantization on CUDA (Triton): one pass reads x, writes E4M3 data and the fp32
scales in the layout `torch._scaled_mm` wants. Same formulas as `nanoseek.fp8.quantize`
(max(amax, eps) / 448, optional power-of-two round-up, clamp, round-to-nearest-even cast) with
IEEE-rounded divisions, so results are bit-identical to the PyTorch version; the benchmark
checks that on the GPU. Only the 1x128 (per token) tiling along the last dim is fused."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8 import ACT, E4M3, E4M3_MAX, EPS, Fp8Tensor


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm,
                       EPS_C: tl.constexpr, POW2: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * ROWS + tl.arange(0, ROWS)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    amax = tl.maximum(amax, EPS_C)
    s = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
    if POW2:
        bits = s.to(tl.int32, bitcast=True)
        exp = (bits >> 23) & 0xFF
        exp = exp + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        exp = tl.minimum(tl.maximum(exp, 1), 254)
        s = (exp << 23).to(tl.float32, bitcast=True)
    q = tl.math.div_rn(x, s[:, None])
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q.to(tl.float8e4nv), mask=mask)
    # scales M-major ([M, L] with strides (1, M)): what _scaled_mm's 1x128 operand wants
    tl.store(s_ptr + pid_k * M + rows, s, mask=rows < M)


def quantize_rows(x: torch.Tensor, pow2: bool = False) -> Fp8Tensor:
    """1x128 quantization of a 2-D CUDA tensor [M, K] (last dim contiguous): E4M3 data [M, K],
    scales [M, ceil(K/128)] stored M-major."""
    assert x.is_cuda and x.dim() == 2
    if x.stride(1) != 1:
        x = x.contiguous()
    M, K = x.shape
    L = triton.cdiv(K, 128)
    q = torch.empty(M, K, dtype=E4M3, device=x.device)
    s = torch.empty(L, M, dtype=torch.float32, device=x.device)
    ROWS = 16
    _quant_rows_kernel[(triton.cdiv(M, ROWS), L)](x, q, s, M, K, x.stride(0), q.stride(0), EPS_C=EPS,
                                                  POW2=pow2, BLOCK_K=128, ROWS=ROWS, num_warps=4)
    return Fp8Tensor(q, s.t(), ACT)


def install() -> bool:
    """Route the FP8 layers' 1x128 quantizations of CUDA tensors through the Triton kernel."""
    from . import fp8
    fp8.ROW_QUANTIZER = quantize_rows
    return True


__all__ = ["quantize_rows", "install", "E4M3_MAX"]
