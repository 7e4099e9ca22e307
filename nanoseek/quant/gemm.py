"""FP8 GEMMs with block-wise scales and fp32 accumulation (DeepSeek-V3 report, arXiv 2412.19437,
section 3.3.1-3.3.2), and the plain-PyTorch reference of the fused path's ops.

- `fp8_gemm`: out = deq(a) deq(b)^T, the "NT" GEMM (both operands quantized along K). On SM90 CUDA
  through `torch._scaled_mm` with cuBLASLt's DeepSeek-style block scaling (operands zero-padded
  where cuBLASLt needs it: exact), checked against the emulation once per tile recipe
  (`checked.REGISTRY`); on CPU an exact emulation (dequantize, fp32 matmul); elsewhere dequantize
  + bf16 GEMM.
- `TorchKernels` (`TORCH_KERNELS`): the fused path's quantizers and grouped GEMMs in plain
  PyTorch, with the Triton kernels' layouts and values: the CPU path of `FP8Config(kernels="torch")`
  and the reference the Triton kernels are checked against (`checked.py`).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from .blocks import ACT, BLOCK, E4M3, WEIGHT, Fp8Tensor, SegmentsT, TileMap, as_weights, quantize
from .checked import REGISTRY

SCALED_MM_RECIPES = {(ACT, WEIGHT), (WEIGHT, ACT), (ACT, ACT)}  # cuBLASLt: no 128x128 x 128x128


# ----------------------------------------------------------------------------------- GEMMs
def _cuda_blockwise_ok(device: torch.device) -> bool:
    return (device.type == "cuda" and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device) == (9, 0))


def round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def pad_rows(t: Fp8Tensor, rows: int) -> Fp8Tensor:
    """Pad a K-major operand [R, K] with zero rows (scales: ones) up to `rows`; exact."""
    R = t.data.shape[0]
    if rows == R:
        return t
    data = torch.cat([t.data, t.data.new_zeros(rows - R, t.data.shape[1])])
    nr = math.ceil(rows / t.tile[0])
    scale = t.scale
    if nr != scale.shape[0]:
        scale = torch.cat([scale, scale.new_ones(nr - scale.shape[0], scale.shape[1])])
    return Fp8Tensor(data, scale, t.tile)


def pad_k(t: Fp8Tensor, K: int) -> Fp8Tensor:
    """Pad the contraction dim with zeros up to K (a multiple of 128), and the scales with ones up
    to K / 128 columns; exact (the padded products are zero)."""
    if t.data.shape[1] == K:
        return t
    data = F.pad(t.data.view(torch.uint8), (0, K - t.data.shape[1])).view(E4M3)
    nc = K // t.tile[1]
    scale = t.scale
    if scale.shape[1] != nc:
        scale = torch.cat([scale, scale.new_ones(scale.shape[0], nc - scale.shape[1])], dim=1)
    return Fp8Tensor(data, scale, t.tile)


def _scaled_mm_blockwise(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """out[M, N] = deq(a) @ deq(b)^T on SM90 through cuBLASLt's DeepSeek-style block scaling.
    a: [M, K] with 1x128 (or 128x128) tiles, b: [N, K] with 128x128 (or 1x128) tiles.
    Layouts (ScaledBlas.cpp): 1x128 scale [M, L] with strides (1, M); 128x128 scale of B^T given
    as [L, N/128] with strides (1, L). Operands are zero-padded (exact) to M, N multiples of 16 and
    K to a multiple of 128, or of 512 with a 128x128 operand: torch 2.11 rejects a 128x128 scale
    whose L = K/128 is not a multiple of 4 (and older cuBLAS paths were silently wrong there).
    `out`: an [M, N] tensor of out_dtype to write into (straight from the GEMM when contiguous and
    no padding is needed)."""
    M, K = a.data.shape
    N = b.data.shape[0]
    kmul = 4 * BLOCK if WEIGHT in (a.tile, b.tile) else BLOCK
    Mp, Np, Kp = round_up(M, 16), round_up(N, 16), round_up(K, kmul)
    a, b = pad_k(pad_rows(a, Mp), Kp), pad_k(pad_rows(b, Np), Kp)
    L = Kp // BLOCK
    if a.tile == ACT:
        sa = a.scale.t().contiguous().t()  # [Mp, L], strides (1, Mp)
    else:  # 128x128 on A: [Mp/128, L] padded to L4 columns, row-major
        buf = a.scale.new_ones(a.scale.shape[0], round_up(L, 4))
        buf[:, :L] = a.scale
        sa = buf[:, :L]
    if b.tile == WEIGHT:
        buf = b.scale.new_ones(b.scale.shape[0], round_up(L, 4))
        buf[:, :L] = b.scale
        sb = buf[:, :L].t()  # [L, N/128], strides (1, L4)
    else:  # 1x128 on B: B^T's scale [Np, L] with strides (1, Np) -> scale_b [L, Np] row-major
        sb = b.scale.t().contiguous()
    if out is not None and (Mp, Np) == (M, N) and out.is_contiguous():
        return torch._scaled_mm(a.data, b.data.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype,
                                use_fast_accum=False, out=out)
    res = torch._scaled_mm(a.data, b.data.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype, use_fast_accum=False)
    return res[:M, :N] if out is None else out.copy_(res[:M, :N])


def fp8_gemm(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype = torch.float32,
             backend: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """out[M, N] = deq(a)[M, K] @ deq(b)[N, K]^T with fp32 accumulation (the "NT" GEMM: both
    operands quantized along K). Backends: "scaled_mm" (SM90), "emulate" (dequantize to fp32,
    fp32 matmul: the exact CPU emulation), "dequant" (dequantize to bf16, bf16 GEMM). `out`: an
    [M, N] tensor of out_dtype to write the result into (a slice of a per-expert output: no copy
    on the scaled_mm path)."""
    recipe = (a.tile, b.tile)
    if out is not None:
        if out.shape != (a.data.shape[0], b.data.shape[0]) or out.dtype != out_dtype:
            raise ValueError(f"fp8_gemm: out {tuple(out.shape)} {out.dtype}, expected "
                             f"{(a.data.shape[0], b.data.shape[0])} {out_dtype}")
        if not (backend in ("auto", "scaled_mm") and _cuda_blockwise_ok(a.data.device)
                and REGISTRY.scaled_mm_verified(recipe)):
            return out.copy_(fp8_gemm(a, b, out_dtype, backend))
        try:
            with torch.autocast(a.data.device.type, enabled=False):
                return _scaled_mm_blockwise(a, b, out_dtype, out)
        except RuntimeError:  # refused: the checked path below (with its fallbacks), then a copy
            return out.copy_(fp8_gemm(a, b, out_dtype, backend))
    dev = a.data.device
    if backend == "auto":
        backend = "scaled_mm" if _cuda_blockwise_ok(dev) else ("emulate" if dev.type == "cpu" else "dequant")
    if backend == "scaled_mm" and (recipe not in SCALED_MM_RECIPES or REGISTRY.scaled_mm_disabled(recipe)):
        backend = "dequant"
    with torch.autocast(dev.type, enabled=False):
        if backend == "scaled_mm":
            try:
                out = _scaled_mm_blockwise(a, b, out_dtype)
            except RuntimeError as e:  # a shape/layout cuBLASLt refuses: fall back for this call only
                warnings.warn(f"fp8: torch._scaled_mm refused {recipe} for {tuple(a.data.shape)} x "
                              f"{tuple(b.data.shape)} ({str(e)[:120]}); dequantize + bf16 GEMM instead")
                return (a.dequantize(torch.bfloat16) @ b.dequantize(torch.bfloat16).t()).to(out_dtype)
            # one self-check per recipe (layouts are easy to get wrong)
            if not REGISTRY.check_scaled_mm(recipe, out, lambda: a.dequantize() @ b.dequantize().t()):
                return (a.dequantize(torch.bfloat16) @ b.dequantize(torch.bfloat16).t()).to(out_dtype)
            return out
        if backend == "emulate":
            return (a.dequantize() @ b.dequantize().t()).to(out_dtype)
        if backend == "dequant":
            return (a.dequantize(torch.bfloat16) @ b.dequantize(torch.bfloat16).t()).to(out_dtype)
    raise ValueError(f"unknown FP8 GEMM backend {backend!r}")


# ----------------------------------------------------------------------------------- the reference ops
class TorchKernels:
    """The fused path's ops in plain PyTorch, same layouts and values as nanoseek.quant.fp8_triton's
    kernels (they are checked against these, bit for bit for the quantizers)."""
    name = "torch"

    @staticmethod
    def quantize_act_dual(x: torch.Tensor, tm: TileMap, pow2: bool = False, rows: bool = True,
                          cols: bool = True) -> tuple[Fp8Tensor | None, SegmentsT | None]:
        """x [T, C] -> (1x128 quantization, scale M-major; per-segment 128x1 `SegmentsT`)."""
        T, C = x.shape
        row = None
        if rows:
            row = quantize(x, ACT, pow2)
            row = Fp8Tensor(row.data, row.scale.t().contiguous().t(), ACT)  # [T, L], strides (1, T)
        col = None
        if cols:
            datas, scales = [], []
            for start, n in zip(torch.tensor([0] + tm.sizes).cumsum(0).tolist(), tm.sizes):
                if n:
                    seg = F.pad(x[start:start + n], (0, 0, 0, math.ceil(n / BLOCK) * BLOCK - n))  # [128 t_e, C]
                    q = quantize(seg.t(), ACT, pow2)  # data [C, 128 t_e], scale [C, t_e]
                    datas.append(q.data.reshape(-1))
                    scales.append(q.scale.t())
            data = torch.cat(datas) if datas else x.new_empty(0, dtype=E4M3)
            scale = torch.cat(scales) if scales else x.new_empty(0, C, dtype=torch.float32)
            col = SegmentsT(data, scale, C)
        return row, col

    @staticmethod
    def swiglu_quantize_dual(gate: torch.Tensor, up: torch.Tensor, tm: TileMap, pow2: bool = False, rows: bool = True,
                             cols: bool = True) -> tuple[Fp8Tensor | None, SegmentsT | None]:
        """`quantize_act_dual` of SwiGLU's output silu(gate) * up [T, I], computed in the inputs' dtype."""
        return TorchKernels.quantize_act_dual(F.silu(gate) * up, tm, pow2, rows, cols)

    @staticmethod
    def quantize_weight_dual(w, pow2: bool = False, transposed: bool = True) -> tuple[Fp8Tensor, Fp8Tensor | None]:
        """W [..., N, K], or a list of weights stacked along N (`stackable`) -> (128x128
        quantization of W (each stacked weight quantized alone), that of W^T: the same blocks
        transposed)."""
        parts = [quantize(wi, WEIGHT, pow2) for wi in as_weights(w)]
        wq = parts[0] if len(parts) == 1 else Fp8Tensor(torch.cat([q.data for q in parts], -2),
                                                          torch.cat([q.scale for q in parts], -2), WEIGHT)
        return wq, (wq.t() if transposed else None)

    @staticmethod
    def grouped_gemm(a: Fp8Tensor, b: Fp8Tensor, tm: TileMap, out_dtype: torch.dtype,
                     backend: str = "auto") -> torch.Tensor:
        """out[T, N]: segment e of a [T, K] (1x128) times b[e] [N, K]^T (128x128); one GEMM per expert."""
        out = a.data.new_empty(a.data.shape[0], b.data.shape[-2], dtype=out_dtype)
        start = 0
        for e, n in enumerate(tm.sizes):
            if n:
                fp8_gemm(a.rows(start, start + n), Fp8Tensor(b.data[e], b.scale[e], b.tile), out_dtype, backend,
                         out=out[start:start + n])
            start += n
        return out

    @staticmethod
    def grouped_wgrad(a: SegmentsT, b: SegmentsT, tm: TileMap, backend: str = "auto") -> torch.Tensor:
        """dW [E, N, K] fp32 = a_e b_e^T per segment (zeros for an empty one); one GEMM per expert."""
        out = torch.zeros(len(tm.sizes), a.C, b.C, dtype=torch.float32, device=a.scale.device)
        for e, n in enumerate(tm.sizes):
            if n:
                fp8_gemm(a.segment(tm, e), b.segment(tm, e), torch.float32, backend, out=out[e])
        return out


TORCH_KERNELS = TorchKernels()
