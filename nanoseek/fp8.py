"""FP8 training with the DeepSeek-V3 recipe (report section 3.3; spec: shared/docs/fp8.md).

- E4M3 everywhere (forward and backward), online scales, one scale per tile:
  1x128 for activations and activation gradients (per token, along the GEMM's K),
  128x128 for weights, 128x1 for the weight-gradient GEMM's inputs (along the token axis).
  Scale (the dequantization multiplier): s = max(amax, eps) / 448 in fp32, optionally rounded up
  to a power of two; q = cast_e4m3(clamp(x / s, -448, 448)); x ~= q * s. Partial edge tiles
  are quantized on the zero-padded tile (padding never changes an amax), then cropped.
- The three GEMMs of every converted Linear run on FP8 inputs with fp32 accumulation:
  Fprop  y  = x  W^T   (x 1x128,  W 128x128)
  Dgrad  dx = dy W     (dy 1x128, W 128x128 transposed: same blocks, no requantization)
  Wgrad  dW = dy^T x   (dy 128x1, x 128x1; fp32 output)
  On CUDA (SM90) through `torch._scaled_mm` with block-wise scales; elsewhere (CPU) an exact
  emulation: dequantize, then matmul in fp32. The forward caches x for the backward in FP8 only
  (its 128x1-tiled copy, the only form the backward needs): 1 byte per element.
- `convert(model)` swaps modules in place from outside the model (class swap: same parameters,
  same state_dict keys, so checkpoints still save and load in the HF layout). The embedding,
  output head, router, norms, MTP eh_proj and the attention core stay in high precision.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
EPS = 1e-4  # amax floor (DeepSeek / DeepGEMM): a zero tile quantizes to zeros, never 0/0
BLOCK = 128
ACT = (1, BLOCK)  # activations, activation gradients
WEIGHT = (BLOCK, BLOCK)  # weights
COL = (BLOCK, 1)  # the weight-gradient GEMM's operands (tiles along the token axis)


@dataclass
class FP8Config:
    """Options of the recipe. `pow2_scales`: round every scale up to a power of two (exact
    re-tiling, bit-identical across formulas; costs about one binade of headroom).
    `cache_fp8`: save the Linear input for the backward as its FP8 128x1 copy (else keep the
    high-precision tensor and quantize it in the backward). `backend`: "auto" (scaled_mm on
    SM90 CUDA, emulation on CPU, dequantize + bf16 GEMM on other GPUs), "emulate", "dequant",
    "scaled_mm"."""
    pow2_scales: bool = False
    cache_fp8: bool = True
    backend: str = "auto"


DEFAULT_CONFIG = FP8Config()


# ----------------------------------------------------------------------------------- quantizers
class Fp8Tensor(NamedTuple):
    """E4M3 data [..., R, C], fp32 scales [..., ceil(R/tr), ceil(C/tc)] and the tile (tr, tc)."""
    data: torch.Tensor
    scale: torch.Tensor
    tile: tuple[int, int]

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.data, self.scale, self.tile, dtype)

    def t(self) -> "Fp8Tensor":
        """The transpose (of the last two dims), contiguous; exact (tiles transpose with it)."""
        return Fp8Tensor(self.data.transpose(-2, -1).contiguous(), self.scale.transpose(-2, -1).contiguous(),
                         (self.tile[1], self.tile[0]))

    def rows(self, start: int, stop: int) -> "Fp8Tensor":
        """Rows [start, stop) of a row-tiled (tr == 1) tensor."""
        assert self.tile[0] == 1, "row slicing needs 1xC tiles"
        return Fp8Tensor(self.data[..., start:stop, :], self.scale[..., start:stop, :], self.tile)


def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2 s) for positive normal fp32 s, exactly (bit manipulation, like DeepGEMM's
    ceil_to_ue8m0): bump the exponent when the mantissa is not zero, clear the mantissa."""
    bits = s.contiguous().view(torch.int32)
    exp = (bits >> 23) & 0xFF
    exp = exp + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exp.clamp(1, 254) << 23).view(torch.float32)


def quantize(x: torch.Tensor, tile: tuple[int, int] = ACT, pow2: bool = False, eps: float = EPS) -> Fp8Tensor:
    """Quantize the last two dims of x [..., R, C] to E4M3 with one fp32 scale per (tr x tc) tile."""
    tr, tc = tile
    *lead, R, C = x.shape
    nr, nc = math.ceil(R / tr), math.ceil(C / tc)
    xf = x.float().contiguous()
    if nr * tr != R or nc * tc != C:
        xf = F.pad(xf, (0, nc * tc - C, 0, nr * tr - R))
    blocks = xf.view(*lead, nr, tr, nc, tc)
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., nr, nc]
    # a tensor divisor: CUDA turns division by a Python scalar into a multiply by its (inexact)
    # reciprocal, which would make GPU scales differ from CPU ones (and from IEEE division)
    scale = amax.clamp(min=eps) / torch.full_like(amax, E4M3_MAX)
    if pow2:
        scale = pow2_ceil(scale)
    q = (blocks / scale[..., :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    q = q.view(*lead, nr * tr, nc * tc)
    if nr * tr != R or nc * tc != C:
        q = q[..., :R, :C].contiguous()
    return Fp8Tensor(q, scale, (tr, tc))


def dequantize(q: torch.Tensor, scale: torch.Tensor, tile: tuple[int, int], dtype=torch.float32) -> torch.Tensor:
    """x[..., i, j] = float(q[..., i, j]) * scale[..., i // tr, j // tc] (fp32, one rounding to dtype)."""
    R, C = q.shape[-2:]
    s = scale.float()
    if tile[0] > 1:
        s = s.repeat_interleave(tile[0], dim=-2)[..., :R, :]
    if tile[1] > 1:
        s = s.repeat_interleave(tile[1], dim=-1)[..., :C]
    return (q.float() * s).to(dtype)


def quantize_1x128(x: torch.Tensor, pow2: bool = False) -> Fp8Tensor:
    """Activations / activation gradients: x [..., K] -> one scale per token per 128 channels."""
    return quantize(x.reshape(-1, x.shape[-1]), ACT, pow2)


def quantize_128x128(w: torch.Tensor, pow2: bool = False) -> Fp8Tensor:
    """Weights [..., N, K]: one scale per 128x128 block."""
    return quantize(w, WEIGHT, pow2)


def quantize_128x1(x: torch.Tensor, pow2: bool = False) -> Fp8Tensor:
    """The weight-gradient GEMM's inputs, x [M, K] (M = tokens): one scale per 128 tokens x 1
    channel. Returned in the original orientation: data [M, K], scale [ceil(M/128), K]."""
    return quantize(x, COL, pow2)


ROW_QUANTIZER = None  # optional fused 1x128 quantizer for CUDA tensors (nanoseek.fp8_triton.install())


def _quant(x: torch.Tensor, tile: tuple[int, int], pow2: bool) -> Fp8Tensor:
    if tile == ACT and ROW_QUANTIZER is not None and x.is_cuda and x.dim() == 2:
        return ROW_QUANTIZER(x, pow2)
    return quantize(x, tile, pow2)


# ----------------------------------------------------------------------------------- GEMMs
def _cuda_blockwise_ok(device: torch.device) -> bool:
    return (device.type == "cuda" and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device) == (9, 0))


_SCALED_MM_BROKEN: dict[tuple, str] = {}  # recipe -> why it was turned off (failed self-check)
_SCALED_MM_CHECKED: set = set()
_SCALED_MM_RECIPES = {(ACT, WEIGHT), (WEIGHT, ACT), (ACT, ACT)}  # cuBLASLt: no 128x128 x 128x128


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _pad_rows(t: Fp8Tensor, rows: int) -> Fp8Tensor:
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


def _pad_k(t: Fp8Tensor, K: int) -> Fp8Tensor:
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


def _scaled_mm_blockwise(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """out[M, N] = deq(a) @ deq(b)^T on SM90 through cuBLASLt's DeepSeek-style block scaling.
    a: [M, K] with 1x128 (or 128x128) tiles, b: [N, K] with 128x128 (or 1x128) tiles.
    Layouts (ScaledBlas.cpp): 1x128 scale [M, L] with strides (1, M); 128x128 scale of B^T given
    as [L, N/128] with strides (1, L). Operands are zero-padded (exact) to M, N multiples of 16 and
    K to a multiple of 128, or of 512 with a 128x128 operand: torch 2.11 rejects a 128x128 scale
    whose L = K/128 is not a multiple of 4 (and older cuBLAS paths were silently wrong there)."""
    M, K = a.data.shape
    N = b.data.shape[0]
    kmul = 4 * BLOCK if WEIGHT in (a.tile, b.tile) else BLOCK
    Mp, Np, Kp = _round_up(M, 16), _round_up(N, 16), _round_up(K, kmul)
    a, b = _pad_k(_pad_rows(a, Mp), Kp), _pad_k(_pad_rows(b, Np), Kp)
    L = Kp // BLOCK
    if a.tile == ACT:
        sa = a.scale.t().contiguous().t()  # [Mp, L], strides (1, Mp)
    else:  # 128x128 on A: [Mp/128, L] padded to L4 columns, row-major
        buf = a.scale.new_ones(a.scale.shape[0], _round_up(L, 4))
        buf[:, :L] = a.scale
        sa = buf[:, :L]
    if b.tile == WEIGHT:
        buf = b.scale.new_ones(b.scale.shape[0], _round_up(L, 4))
        buf[:, :L] = b.scale
        sb = buf[:, :L].t()  # [L, N/128], strides (1, L4)
    else:  # 1x128 on B: B^T's scale [Np, L] with strides (1, Np) -> scale_b [L, Np] row-major
        sb = b.scale.t().contiguous()
    out = torch._scaled_mm(a.data, b.data.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype, use_fast_accum=False)
    return out[:M, :N]


def fp8_gemm(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype = torch.float32,
             backend: str = "auto") -> torch.Tensor:
    """out[M, N] = deq(a)[M, K] @ deq(b)[N, K]^T with fp32 accumulation (the "NT" GEMM: both
    operands quantized along K). Backends: "scaled_mm" (SM90), "emulate" (dequantize to fp32,
    fp32 matmul: the exact CPU emulation), "dequant" (dequantize to bf16, bf16 GEMM)."""
    dev = a.data.device
    if backend == "auto":
        backend = "scaled_mm" if _cuda_blockwise_ok(dev) else ("emulate" if dev.type == "cpu" else "dequant")
    recipe = (a.tile, b.tile)
    if backend == "scaled_mm" and (recipe not in _SCALED_MM_RECIPES or recipe in _SCALED_MM_BROKEN):
        backend = "dequant"
    with torch.autocast(dev.type, enabled=False):
        if backend == "scaled_mm":
            try:
                out = _scaled_mm_blockwise(a, b, out_dtype)
            except RuntimeError as e:  # a shape/layout cuBLASLt refuses: fall back for this call only
                warnings.warn(f"fp8: torch._scaled_mm refused {recipe} for {tuple(a.data.shape)} x "
                              f"{tuple(b.data.shape)} ({str(e)[:120]}); dequantize + bf16 GEMM instead")
                return (a.dequantize(torch.bfloat16) @ b.dequantize(torch.bfloat16).t()).to(out_dtype)
            if recipe not in _SCALED_MM_CHECKED:  # one self-check per recipe: layouts are easy to get wrong
                _SCALED_MM_CHECKED.add(recipe)
                ref = a.dequantize() @ b.dequantize().t()
                err = ((out.float() - ref).norm() / ref.norm().clamp(min=1e-30)).item()
                if not err < 1e-2:
                    _SCALED_MM_BROKEN[recipe] = f"relative error {err:.3g} vs emulation"
                    warnings.warn(f"fp8: torch._scaled_mm with tiles {recipe} disagrees with the emulation "
                                  f"({_SCALED_MM_BROKEN[recipe]}); using dequantize + bf16 GEMM instead")
                    return (a.dequantize(torch.bfloat16) @ b.dequantize(torch.bfloat16).t()).to(out_dtype)
            return out
        if backend == "emulate":
            return (a.dequantize() @ b.dequantize().t()).to(out_dtype)
        if backend == "dequant":
            return (a.dequantize(torch.bfloat16) @ b.dequantize(torch.bfloat16).t()).to(out_dtype)
    raise ValueError(f"unknown FP8 GEMM backend {backend!r}")


# ----------------------------------------------------------------------------------- Linear
def _out_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _FP8LinearFn(torch.autograd.Function):
    """y = x W^T with all three GEMMs in FP8 (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, out_dtype, cfg: FP8Config):
        K = x.shape[-1]
        x2 = x.reshape(-1, K)
        xq = _quant(x2, ACT, cfg.pow2_scales)
        wq = quantize(weight, WEIGHT, cfg.pow2_scales)
        y = fp8_gemm(xq, wq, out_dtype, cfg.backend)
        if cfg.cache_fp8:  # x^T in 1x128 tiles along tokens == x in 128x1 tiles, K-major for Wgrad
            xt = _quant(x2.t(), ACT, cfg.pow2_scales)
            ctx.save_for_backward(xt.data, xt.scale, wq.data, wq.scale)
        else:
            ctx.save_for_backward(x2, wq.data, wq.scale)
        ctx.cfg, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = cfg, x.shape, x.dtype, weight.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        cfg = ctx.cfg
        if cfg.cache_fp8:
            xt_data, xt_scale, w_data, w_scale = ctx.saved_tensors
            xt = Fp8Tensor(xt_data, xt_scale, ACT)
        else:
            x2, w_data, w_scale = ctx.saved_tensors
            xt = None
        wq = Fp8Tensor(w_data, w_scale, WEIGHT)
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = None
        if ctx.needs_input_grad[0]:  # Dgrad: dx[M, K] = dy[M, N] @ W[N, K]; B = W^T [K, N], 128x128
            dx = fp8_gemm(_quant(dy2, ACT, cfg.pow2_scales), wq.t(), ctx.x_dtype, cfg.backend)
            dx = dx.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # Wgrad: dW[N, K] = dy^T[N, M] @ x[M, K], both 1x128 along M
            if xt is None:
                xt = _quant(x2.t(), ACT, cfg.pow2_scales)
            dw = fp8_gemm(_quant(dy2.t(), ACT, cfg.pow2_scales), xt, torch.float32, cfg.backend).to(ctx.w_dtype)
        return dx, dw, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, cfg: FP8Config | None = None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """F.linear(x, weight) with FP8 Fprop, Dgrad and Wgrad. Output dtype: the autocast dtype
    when autocast is on, else x's dtype."""
    return _FP8LinearFn.apply(x, weight, out_dtype or _out_dtype(x), cfg or DEFAULT_CONFIG)


class FP8Linear(nn.Linear):
    """nn.Linear whose GEMMs run in FP8. Made by class swap (`convert`), so parameters, hooks
    and state_dict keys are the original module's."""

    fp8_config: FP8Config = DEFAULT_CONFIG

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.fp8_config)
        return y + self.bias.to(y.dtype) if self.bias is not None else y


# ----------------------------------------------------------------------------------- experts
class _FP8GroupedLinearFn(torch.autograd.Function):
    """Per-expert y_e = x_e W_e^T over contiguous token segments (tokens sorted by expert).
    The 1x128 quantizations (x, dy) are per token, so they run once over all tokens; the 128x1
    ones (Wgrad operands) are per expert segment, as in DeepSeek's K-grouped Wgrad GEMM."""

    @staticmethod
    def forward(ctx, x, weight, sizes: list[int], out_dtype, cfg: FP8Config):
        E, N, K = weight.shape
        xq = _quant(x, ACT, cfg.pow2_scales)
        wq = quantize(weight, WEIGHT, cfg.pow2_scales)  # [E, N, K], blocks never cross experts
        y = x.new_empty(x.shape[0], N, dtype=out_dtype)
        xts, start = [], 0
        for e, n in enumerate(sizes):
            if n:
                y[start:start + n] = fp8_gemm(xq.rows(start, start + n), Fp8Tensor(wq.data[e], wq.scale[e], WEIGHT),
                                              out_dtype, cfg.backend)
                xts.append(_quant(x[start:start + n].t(), ACT, cfg.pow2_scales))
            else:
                xts.append(None)
            start += n
        ctx.sizes, ctx.cfg, ctx.x_dtype, ctx.w_dtype = sizes, cfg, x.dtype, weight.dtype
        ctx.xts = xts
        ctx.save_for_backward(wq.data, wq.scale)
        return y

    @staticmethod
    def backward(ctx, dy):
        cfg = ctx.cfg
        w_data, w_scale = ctx.saved_tensors
        dyq = _quant(dy, ACT, cfg.pow2_scales) if ctx.needs_input_grad[0] else None
        dx = dy.new_zeros(dy.shape[0], w_data.shape[2], dtype=ctx.x_dtype) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(w_data.shape, dtype=torch.float32, device=dy.device) if ctx.needs_input_grad[1] else None
        start = 0
        for e, n in enumerate(ctx.sizes):
            if n:
                if dx is not None:
                    wt = Fp8Tensor(w_data[e], w_scale[e], WEIGHT).t()
                    dx[start:start + n] = fp8_gemm(dyq.rows(start, start + n), wt, ctx.x_dtype, cfg.backend)
                if dw is not None:
                    dyt = _quant(dy[start:start + n].t(), ACT, cfg.pow2_scales)
                    dw[e] = fp8_gemm(dyt, ctx.xts[e], torch.float32, cfg.backend)
            start += n
        ctx.xts = None
        return dx, (dw.to(ctx.w_dtype) if dw is not None else None), None, None, None


def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, sizes: list[int], cfg: FP8Config | None = None,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [sum(sizes), K] sorted by expert, weight [E, N, K] -> [sum(sizes), N] (FP8 GEMMs)."""
    return _FP8GroupedLinearFn.apply(x, weight, list(sizes), out_dtype or _out_dtype(x), cfg or DEFAULT_CONFIG)


def _experts_base():
    from .model import Experts
    return Experts


class FP8Experts(_experts_base()):
    """The routed experts with FP8 GEMMs (per-expert loop over the sorted token segments);
    same stacked parameters [E, out, in] as `Experts`, made by class swap. SwiGLU, the gate
    weighting and the combine stay in high precision (fp32 sum, as in `Experts`)."""

    fp8_config: FP8Config = DEFAULT_CONFIG

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        from .model import expert_counts
        N, k = indices.shape
        order = indices.reshape(-1).argsort(stable=True)
        sizes = expert_counts(indices, self.n_experts).tolist()
        dtype = _out_dtype(x)
        xs = x[order // k]  # [N*k, h], grouped by expert; quantized straight from x's dtype
        cfg = self.fp8_config
        hidden = (F.silu(fp8_grouped_linear(xs, self.gate_proj, sizes, cfg, dtype))
                  * fp8_grouped_linear(xs, self.up_proj, sizes, cfg, dtype))
        ys = fp8_grouped_linear(hidden, self.down_proj, sizes, cfg, dtype)
        ys = ys.float() * weights.reshape(-1)[order, None].float()
        unsorted = torch.empty_like(ys)
        unsorted[order] = ys
        return unsorted.view(N, k, -1).sum(dim=1).to(x.dtype)


# ----------------------------------------------------------------------------------- convert
SKIP_REASONS = {
    "embedding": "embedding: a lookup, not a GEMM; kept in high precision (report 3.3.1)",
    "head": "output head: precision-sensitive logits; kept in high precision (report 3.3.1)",
    "router": "MoE router (gating): kept in high precision, fp32 scores (report 3.3.1)",
    "norm": "normalization: kept in high precision (report 3.3.1)",
    "eh_proj": "MTP eh_proj: kept in high precision (not FP8 in the official release)",
    "attention": "attention core (QK^T, softmax, PV): kept in bf16/fp32; its projections are FP8",
}


def convert(model: nn.Module, config: FP8Config | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """Switch every eligible GEMM of `model` to FP8, in place, from outside the model: each
    nn.Linear (attention projections, dense MLP, shared experts) becomes `FP8Linear` and each
    `Experts` becomes `FP8Experts` by class swap (same parameters and state_dict keys; call it
    before torch.compile and before building the optimizer or DDP wrappers, though the latter
    also work since parameters are untouched). Returns (converted module names, [(skipped
    module name, reason)]). Calling it again is harmless (already-converted modules are listed
    as converted)."""
    from .model import MLA, Experts, RMSNorm, Router
    cfg = config or DEFAULT_CONFIG
    converted: list[str] = []
    skipped: list[tuple[str, str]] = []
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(m, nn.Embedding):
            skipped.append((name, SKIP_REASONS["embedding"]))
        elif isinstance(m, Router):
            skipped.append((name, SKIP_REASONS["router"]))
        elif isinstance(m, RMSNorm) or isinstance(m, (nn.LayerNorm,)):
            skipped.append((name, SKIP_REASONS["norm"]))
        elif isinstance(m, MLA):
            skipped.append((name, SKIP_REASONS["attention"]))
        elif isinstance(m, Experts):
            if not isinstance(m, FP8Experts):
                m.__class__ = FP8Experts
            m.fp8_config = cfg
            converted.append(name)
        elif isinstance(m, nn.Linear):
            if leaf == "lm_head" or name.endswith("shared_head.head"):
                skipped.append((name, SKIP_REASONS["head"]))
            elif leaf == "eh_proj":
                skipped.append((name, SKIP_REASONS["eh_proj"]))
            else:
                if not isinstance(m, FP8Linear):
                    m.__class__ = FP8Linear
                m.fp8_config = cfg
                converted.append(name)
    return converted, skipped


def format_report(converted: list[str], skipped: list[tuple[str, str]]) -> str:
    """The converted and skipped lists, every name, grouped by reason (for the training log)."""
    lines = [f"fp8: {len(converted)} modules converted (all GEMMs in E4M3): " + ", ".join(converted)]
    by_reason: dict[str, list[str]] = {}
    for name, why in skipped:
        by_reason.setdefault(why, []).append(name)
    lines.append(f"fp8: {len(skipped)} modules kept in high precision:")
    for why, names in by_reason.items():
        lines.append(f"  {why}: " + ", ".join(names))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- metrics
def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 20 log10(|ref| / |ref - x|) in dB."""
    ref, x = ref.double(), x.double()
    return (20 * torch.log10(ref.norm() / (ref - x).norm().clamp(min=1e-300))).item()
