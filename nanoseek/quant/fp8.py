"""FP8 training with the DeepSeek-V3 recipe (DeepSeek-V3 report, arXiv 2412.19437, section 3.3).

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
  emulation: dequantize, then matmul in fp32 (`gemm.fp8_gemm`). The forward caches x for the
  backward in FP8 only (its 128x1-tiled copy, the only form the backward needs): 1 byte per element.
- Fused path (CUDA: the Triton kernels of nanoseek.quant.fp8_triton behind the self-checks of
  `checked.py`; `gemm.TorchKernels` is its plain-PyTorch reference): each activation / activation
  gradient is read once to write its 1x128 copy and its 128x1 copy (transposed, per token
  segment, zero-padded to whole tiles); each weight once to write
  W's and W^T's 128x128 blocks (the Dgrad operand: same blocks, only the layout changes); routed
  experts quantize all tokens and all experts in one launch each, then run one grouped GEMM launch
  (or a per-expert loop) for Fprop, Dgrad and the K-grouped Wgrad. SwiGLU's output is quantized
  for the down projection straight from gate and up (`FP8Config.fuse_swiglu`; report 3.3.3: the
  SwiGLU inputs are kept, its output recomputed for the backward). CPU keeps the per-op path.
- Where the pieces live: tiles and quantizers in `blocks.py`, the GEMMs and the reference ops in
  `gemm.py`, the kernels' self-checks and what they found in `checked.py`; this module is the
  recipe: `FP8Config`, the autograd functions, `FP8Linear` / `FP8Experts` / `FP8MLP`, `convert`.
- `convert(model)` swaps modules in place from outside the model (class swap: same parameters,
  same state_dict keys, so checkpoints still save and load in the HF layout). The embedding,
  output head, router, norms, MTP eh_proj and the attention core stay in high precision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import MLA, MLP, Experts, RMSNorm, Router, compute_dtype
from .blocks import ACT, WEIGHT, Fp8Tensor, SegmentsT, TileMap, as_weights, dense_tile_map, quantize, stackable, tile_map
from .checked import REGISTRY
from .gemm import TORCH_KERNELS, fp8_gemm


@dataclass
class FP8Config:
    """Options of the recipe (numbers behind the defaults: benchmarks/RESULTS.md, FP8).
    `pow2_scales`: round every scale up to a power of two (exact re-tiling, bit-identical across
    formulas; costs about one binade of headroom).
    `cache_fp8`: save the Linear input for the backward as its FP8 128x1 copy (else keep the
    high-precision tensor and quantize it in the backward).
    `backend`: the GEMMs (`gemm.fp8_gemm`): "auto" (scaled_mm on SM90 CUDA, emulation on CPU,
    dequantize + bf16 GEMM on other GPUs), "emulate", "dequant", "scaled_mm".
    `kernels`: the quantizers: "auto" (the fused Triton kernels of nanoseek.quant.fp8_triton for
    CUDA tensors of compute capability 8.9 or newer when Triton imports, else "off"), "off" (the
    per-op PyTorch quantizers, transposes included: the CPU path), "triton" (required), "torch"
    (the fused path's layouts in plain PyTorch: the reference, and how the CPU tests run that path).
    The Triton quantizers are checked against the reference on first use (`checked.py`).
    `grouped`: the routed experts' GEMMs on the fused path: "auto" ("triton" with the Triton
    kernels, else "loop"), "triton" (one launch per GEMM for all experts, checked against the loop
    on first use per shape) or "loop" (one `fp8_gemm` per expert).
    `stack_gate_up_below`: SwiGLU's gate and up projections narrower than this many outputs each
    run as one GEMM per pass over their stacked weights where the shapes allow (`stackable`): the
    input is quantized once and its gradient is one GEMM; 0 never stacks.
    `fuse_swiglu`: on the fused path with `cache_fp8`, SwiGLU's output silu(gate) * up is quantized
    straight from gate and up for the down projection (never written in 16 bits; the backward keeps
    gate and up and recomputes it, report 3.3.3): "auto" (with the Triton kernels, checked on first
    use), "on" (also with kernels="torch": the reference, how the CPU tests run it), "off"."""
    pow2_scales: bool = False
    cache_fp8: bool = True
    backend: str = "auto"
    kernels: str = "auto"
    grouped: str = "auto"
    stack_gate_up_below: int = 8192
    fuse_swiglu: str = "auto"

    def __post_init__(self):
        if self.fuse_swiglu not in ("auto", "on", "off"):
            raise ValueError(f"FP8Config.fuse_swiglu: unknown value {self.fuse_swiglu!r} (auto, on, off)")
        if self.kernels not in ("auto", "off", "triton", "torch"):
            raise ValueError(f"FP8Config.kernels: unknown value {self.kernels!r} (auto, off, triton, torch)")
        if self.grouped not in ("auto", "loop", "triton"):
            raise ValueError(f"FP8Config.grouped: unknown value {self.grouped!r} (auto, loop, triton)")


DEFAULT_CONFIG = FP8Config()


# ----------------------------------------------------------------------------------- fused-path choices
def _kernels(cfg: FP8Config, x: torch.Tensor):
    """The fused path's ops for this config and device, or None for the per-op path."""
    if cfg.kernels == "off":
        return None
    if cfg.kernels == "torch":
        return TORCH_KERNELS
    if x.is_cuda and (cfg.kernels == "triton" or torch.cuda.get_device_capability(x.device) >= (8, 9)):
        triton = REGISTRY.triton_kernels(TORCH_KERNELS)
        if triton is not None:
            return triton
    if cfg.kernels == "triton":
        raise RuntimeError(f"FP8Config(kernels='triton') needs CUDA tensors and Triton "
                           f"(device {x.device}{'; ' + REGISTRY.triton_error if REGISTRY.triton_error else ''})")
    return None


def _grouped_impl(cfg: "FP8Config", kern) -> str:
    if getattr(kern, "name", "") != "triton":
        if cfg.grouped == "triton":
            raise RuntimeError("FP8Config(grouped='triton') needs the Triton kernels (kernels='auto' or 'triton' on CUDA)")
        return "loop"
    return "triton" if cfg.grouped == "auto" else cfg.grouped


def _fuse_swiglu(cfg: FP8Config, kern) -> bool:
    """Whether SwiGLU's output goes to the down projection quantized straight from gate and up."""
    if kern is None or not cfg.cache_fp8 or cfg.fuse_swiglu == "off":
        return False
    return cfg.fuse_swiglu == "on" or getattr(kern, "name", "") == "triton"


def _quantize_weights(weights, kern, pow2: bool) -> tuple[Fp8Tensor, Fp8Tensor | None]:
    """Each weight's 128x128 quantization stacked along N, and with fused kernels that of the
    stack's transpose: (W [..., sum N_i, K], W^T [..., K, sum N_i] or None), written by one
    kernel per weight straight into the stacks."""
    if kern is not None:
        return kern.quantize_weight_dual(list(weights), pow2, transposed=True)
    return TORCH_KERNELS.quantize_weight_dual(list(weights), pow2, transposed=False)


def _weight_grads(dw: torch.Tensor | None, ctx, first: int) -> tuple:
    """dW of the stacked weights [..., sum N_i, K] (None when no weight needs one) -> one gradient
    per weight, None where that weight (input `first + i` of the autograd function) needs none."""
    if dw is None:
        return (None,) * len(ctx.n_out)
    return tuple(g.to(ctx.w_dtype) if ctx.needs_input_grad[first + i] else None
                 for i, g in enumerate(dw.split(ctx.n_out, dim=-2)))


# ----------------------------------------------------------------------------------- Linear
class _FP8LinearFn(torch.autograd.Function):
    """y = x [W_1; W_2; ...]^T with all three GEMMs in FP8 (module docstring); several weights
    (SwiGLU's gate and up) stack along N into one GEMM per pass, so x is quantized once and the
    input gradient is one GEMM. With fused kernels (`_kernels`): x and dy are each read once to
    produce their 1x128 and (transposed) 128x1 quantizations, and W once for W's and W^T's
    128x128 blocks; else the per-op quantizers (transposes included)."""

    @staticmethod
    def forward(ctx, x, out_dtype, cfg: FP8Config, *weights):
        K = x.shape[-1]
        x2 = x.reshape(-1, K)
        kern = _kernels(cfg, x)
        ctx.kern, ctx.n_out = kern, [w.shape[-2] for w in weights]
        if kern is not None:
            tm = dense_tile_map(x2.shape[0], x.device)
            xq, xt = kern.quantize_act_dual(x2, tm, cfg.pow2_scales, rows=True, cols=cfg.cache_fp8)
            wq, wqt = _quantize_weights(weights, kern, cfg.pow2_scales)
            y = fp8_gemm(xq, wq, out_dtype, cfg.backend)
            saved = (xt.data, xt.scale) if cfg.cache_fp8 else (x2,)
            ctx.save_for_backward(*saved, wqt.data, wqt.scale)  # only W^T is needed (Dgrad)
            ctx.tm = tm
        else:
            xq = quantize(x2, ACT, cfg.pow2_scales)
            wq, _ = _quantize_weights(weights, None, cfg.pow2_scales)
            y = fp8_gemm(xq, wq, out_dtype, cfg.backend)
            if cfg.cache_fp8:  # x^T in 1x128 tiles along tokens == x in 128x1 tiles, K-major for Wgrad
                xt = quantize(x2.t(), ACT, cfg.pow2_scales)
                ctx.save_for_backward(xt.data, xt.scale, wq.data, wq.scale)
            else:
                ctx.save_for_backward(x2, wq.data, wq.scale)
        ctx.cfg, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = cfg, x.shape, x.dtype, weights[0].dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        cfg, kern = ctx.cfg, ctx.kern
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = None
        want_w = any(ctx.needs_input_grad[3:])
        if kern is not None:
            if cfg.cache_fp8:
                xt_data, xt_scale, wt_data, wt_scale = ctx.saved_tensors
                xt = SegmentsT(xt_data, xt_scale, ctx.x_shape[-1])
            else:
                x2, wt_data, wt_scale = ctx.saved_tensors
                xt = None
            tm = ctx.tm
            dyq, dyt = kern.quantize_act_dual(dy2, tm, cfg.pow2_scales, rows=ctx.needs_input_grad[0], cols=want_w)
            if ctx.needs_input_grad[0]:  # Dgrad: dx = dy W; B = W^T [K, N] in 128x128 blocks
                dx = fp8_gemm(dyq, Fp8Tensor(wt_data, wt_scale, WEIGHT), ctx.x_dtype, cfg.backend).view(ctx.x_shape)
            if want_w:  # Wgrad: dW[N, K] = dy^T x, both 1x128 along tokens (zero-padded)
                if xt is None:
                    _, xt = kern.quantize_act_dual(x2, tm, cfg.pow2_scales, rows=False, cols=True)
                dw = fp8_gemm(dyt.segment(tm, 0), xt.segment(tm, 0), torch.float32, cfg.backend)
            return (dx, None, None) + _weight_grads(dw, ctx, 3)
        if cfg.cache_fp8:
            xt_data, xt_scale, w_data, w_scale = ctx.saved_tensors
            xt = Fp8Tensor(xt_data, xt_scale, ACT)
        else:
            x2, w_data, w_scale = ctx.saved_tensors
            xt = None
        wq = Fp8Tensor(w_data, w_scale, WEIGHT)
        if ctx.needs_input_grad[0]:  # Dgrad: dx[M, K] = dy[M, N] @ W[N, K]; B = W^T [K, N], 128x128
            dx = fp8_gemm(quantize(dy2, ACT, cfg.pow2_scales), wq.t(), ctx.x_dtype, cfg.backend)
            dx = dx.view(ctx.x_shape)
        if want_w:  # Wgrad: dW[N, K] = dy^T[N, M] @ x[M, K], both 1x128 along M
            if xt is None:
                xt = quantize(x2.t(), ACT, cfg.pow2_scales)
            dw = fp8_gemm(quantize(dy2.t(), ACT, cfg.pow2_scales), xt, torch.float32, cfg.backend)
        return (dx, None, None) + _weight_grads(dw, ctx, 3)


def fp8_linear(x: torch.Tensor, weight, cfg: FP8Config | None = None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """F.linear(x, weight) with FP8 Fprop, Dgrad and Wgrad; `weight` may be a list of weights
    [N_i, K] (`stackable`), whose outputs come concatenated [..., sum N_i] from one GEMM. Output
    dtype: the autocast dtype when autocast is on, else x's dtype. The FP8 work itself runs with
    autocast off (autocast has no rule for e4m3 tensors)."""
    out_dtype = out_dtype or compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        return _FP8LinearFn.apply(x, out_dtype, cfg or DEFAULT_CONFIG, *as_weights(weight))


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
    ones (Wgrad operands) are per expert segment, as in DeepSeek's K-grouped Wgrad GEMM.
    With fused kernels every quantization is one launch for all experts (x, dy: both tilings in
    one read; W: W and W^T), and the GEMMs are either one grouped launch or a per-expert loop.
    Several weights [E, N_i, K] (gate and up) stack along N as in `_FP8LinearFn`."""

    @staticmethod
    def forward(ctx, x, sizes: list[int], out_dtype, cfg: FP8Config, tm: TileMap | None, *weights):
        N = sum(w.shape[-2] for w in weights)
        kern = _kernels(cfg, x)
        ctx.sizes, ctx.cfg, ctx.x_dtype, ctx.w_dtype, ctx.kern = sizes, cfg, x.dtype, weights[0].dtype, kern
        ctx.n_out = [w.shape[-2] for w in weights]
        if kern is not None:
            tm = tm if tm is not None else tile_map(sizes, x.device)
            impl = _grouped_impl(cfg, kern)
            xq, xt = kern.quantize_act_dual(x, tm, cfg.pow2_scales, rows=True, cols=True)
            wq, wqt = _quantize_weights(weights, kern, cfg.pow2_scales)  # [E, N, K], [E, K, N]
            if impl == "triton":
                y = kern.grouped("fprop", xq, wq, tm, out_dtype)
            else:
                y = TORCH_KERNELS.grouped_gemm(xq, wq, tm, out_dtype, cfg.backend)
            ctx.tm, ctx.impl = tm, impl
            ctx.save_for_backward(xt.data, xt.scale, wqt.data, wqt.scale)
            return y
        xq = quantize(x, ACT, cfg.pow2_scales)
        wq, _ = _quantize_weights(weights, None, cfg.pow2_scales)  # [E, N, K], blocks never cross experts
        y = x.new_empty(x.shape[0], N, dtype=out_dtype)
        xts, start = [], 0
        for e, n in enumerate(sizes):
            if n:
                y[start:start + n] = fp8_gemm(xq.rows(start, start + n), Fp8Tensor(wq.data[e], wq.scale[e], WEIGHT),
                                              out_dtype, cfg.backend)
                xts.append(quantize(x[start:start + n].t(), ACT, cfg.pow2_scales))
            else:
                xts.append(None)
            start += n
        ctx.xts = xts
        ctx.save_for_backward(wq.data, wq.scale)
        return y

    @staticmethod
    def backward(ctx, dy):
        cfg, kern = ctx.cfg, ctx.kern
        want_w = any(ctx.needs_input_grad[5:])
        if kern is not None:
            xt_data, xt_scale, wt_data, wt_scale = ctx.saved_tensors
            tm = ctx.tm
            xt = SegmentsT(xt_data, xt_scale, wt_data.shape[1])
            dyq, dyt = kern.quantize_act_dual(dy.contiguous(), tm, cfg.pow2_scales, rows=ctx.needs_input_grad[0],
                                              cols=want_w)
            dx = dw = None
            if ctx.needs_input_grad[0]:  # Dgrad per expert: dx_e = dy_e W_e; B = W_e^T [K, N], 128x128
                wqt = Fp8Tensor(wt_data, wt_scale, WEIGHT)
                dx = (kern.grouped("dgrad", dyq, wqt, tm, ctx.x_dtype) if ctx.impl == "triton"
                      else TORCH_KERNELS.grouped_gemm(dyq, wqt, tm, ctx.x_dtype, cfg.backend))
            if want_w:  # Wgrad per expert: dW_e = dy_e^T x_e (128x1 tiles within the segment)
                dw = (kern.grouped("wgrad", dyt, xt, tm) if ctx.impl == "triton"
                      else TORCH_KERNELS.grouped_wgrad(dyt, xt, tm, cfg.backend))
            return (dx, None, None, None, None) + _weight_grads(dw, ctx, 5)
        w_data, w_scale = ctx.saved_tensors
        dyq = quantize(dy, ACT, cfg.pow2_scales) if ctx.needs_input_grad[0] else None
        dx = dy.new_zeros(dy.shape[0], w_data.shape[2], dtype=ctx.x_dtype) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(w_data.shape, dtype=torch.float32, device=dy.device) if want_w else None
        start = 0
        for e, n in enumerate(ctx.sizes):
            if n:
                if dx is not None:
                    wt = Fp8Tensor(w_data[e], w_scale[e], WEIGHT).t()
                    dx[start:start + n] = fp8_gemm(dyq.rows(start, start + n), wt, ctx.x_dtype, cfg.backend)
                if dw is not None:
                    dyt = quantize(dy[start:start + n].t(), ACT, cfg.pow2_scales)
                    dw[e] = fp8_gemm(dyt, ctx.xts[e], torch.float32, cfg.backend)
            start += n
        ctx.xts = None
        return (dx, None, None, None, None) + _weight_grads(dw, ctx, 5)


def fp8_grouped_linear(x: torch.Tensor, weight, sizes: list[int], cfg: FP8Config | None = None,
                       out_dtype: torch.dtype | None = None, tm: TileMap | None = None) -> torch.Tensor:
    """x [sum(sizes), K] sorted by expert, weight [E, N, K] (or a list of `stackable` ones, outputs
    concatenated) -> [sum(sizes), N] (FP8 GEMMs). `tm`: the segments' TileMap when the caller
    shares one between several calls (fused path only). Autocast is off inside, as in `fp8_linear`."""
    out_dtype = out_dtype or compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        return _FP8GroupedLinearFn.apply(x, list(sizes), out_dtype, cfg or DEFAULT_CONFIG, tm, *as_weights(weight))


def swiglu_inputs(linear, gate: torch.Tensor, up: torch.Tensor, stack_below: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x gate^T, x up^T), where linear(w) applies weight w (or a list of them, stacked) to x: one
    FP8 GEMM per pass for gate and up when each has fewer than `stack_below` outputs and their
    shapes allow (`stackable`), else two."""
    if max(gate.shape[-2], up.shape[-2]) < stack_below and stackable([gate, up]):
        g, u = linear([gate, up]).split([gate.shape[-2], up.shape[-2]], dim=-1)
    else:
        g, u = linear(gate), linear(up)
    return g, u


def swiglu_hidden(linear, gate: torch.Tensor, up: torch.Tensor, stack_below: int) -> torch.Tensor:
    """silu(x gate^T) * (x up^T), the GEMMs as in `swiglu_inputs`."""
    g, u = swiglu_inputs(linear, gate, up, stack_below)
    return F.silu(g) * u


class _FP8SwiGLUDownFn(torch.autograd.Function):
    """y = (silu(gate) * up) W^T on the fused path, the hidden h = silu(gate) * up produced already
    quantized (both tilings, one kernel: `swiglu_quantize_dual`) so it is never written in 16 bits;
    the backward keeps gate and up (the SwiGLU inputs, report 3.3.3) and recomputes h's gradient
    through PyTorch's silu and mul, the ops and the order of the unfused graph. The GEMMs are those
    of `_FP8LinearFn` (sizes None: a dense W [N, I]) or `_FP8GroupedLinearFn` (W [E, N, I] over the
    segments of `tm`)."""

    @staticmethod
    def forward(ctx, gate, up, sizes, out_dtype, cfg: FP8Config, tm: TileMap, kern, weight):
        I = gate.shape[-1]
        g2, u2 = gate.reshape(-1, I), up.reshape(-1, I)
        hq, ht = kern.swiglu_quantize_dual(g2, u2, tm, cfg.pow2_scales, rows=True, cols=True)
        wq, wqt = _quantize_weights((weight,), kern, cfg.pow2_scales)
        ctx.impl = _grouped_impl(cfg, kern) if sizes is not None else None
        if ctx.impl is None:
            y = fp8_gemm(hq, wq, out_dtype, cfg.backend)
        elif ctx.impl == "triton":
            y = kern.grouped("fprop", hq, wq, tm, out_dtype)
        else:
            y = TORCH_KERNELS.grouped_gemm(hq, wq, tm, out_dtype, cfg.backend)
        ctx.save_for_backward(gate, up, ht.data, ht.scale, wqt.data, wqt.scale)
        ctx.cfg, ctx.kern, ctx.tm, ctx.h_dtype, ctx.w_dtype = (cfg, kern, tm, torch.promote_types(gate.dtype, up.dtype),
                                                                     weight.dtype)
        ctx.n_out = [weight.shape[-2]]
        return y.view(*gate.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        cfg, kern, tm = ctx.cfg, ctx.kern, ctx.tm
        gate, up, ht_data, ht_scale, wt_data, wt_scale = ctx.saved_tensors
        want_h = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        want_w = ctx.needs_input_grad[7]
        dy2 = dy.reshape(-1, dy.shape[-1])
        if ctx.impl is not None:
            dy2 = dy2.contiguous()
        dyq, dyt = kern.quantize_act_dual(dy2, tm, cfg.pow2_scales, rows=want_h, cols=want_w)
        dgate = dup = dw = None
        if want_h:  # Dgrad: dh = dy W, then through SwiGLU as autograd does (silu and mul, recomputed)
            wqt = Fp8Tensor(wt_data, wt_scale, WEIGHT)
            if ctx.impl is None:
                dh = fp8_gemm(dyq, wqt, ctx.h_dtype, cfg.backend)
            elif ctx.impl == "triton":
                dh = kern.grouped("dgrad", dyq, wqt, tm, ctx.h_dtype)
            else:
                dh = TORCH_KERNELS.grouped_gemm(dyq, wqt, tm, ctx.h_dtype, cfg.backend)
            with torch.enable_grad():
                g, u = gate.detach().requires_grad_(), up.detach().requires_grad_()
                dgate, dup = torch.autograd.grad(F.silu(g) * u, (g, u), dh.view(gate.shape))
        if want_w:  # Wgrad: dW = dy^T h, both in 128x1 tiles along tokens (h's from the forward)
            ht = SegmentsT(ht_data, ht_scale, gate.shape[-1])
            if ctx.impl is None:
                dw = fp8_gemm(dyt.segment(tm, 0), ht.segment(tm, 0), torch.float32, cfg.backend)
            elif ctx.impl == "triton":
                dw = kern.grouped("wgrad", dyt, ht, tm)
            else:
                dw = TORCH_KERNELS.grouped_wgrad(dyt, ht, tm, cfg.backend)
        return (dgate if ctx.needs_input_grad[0] else None, dup if ctx.needs_input_grad[1] else None,
                None, None, None, None, None) + _weight_grads(dw, ctx, 7)


def fp8_swiglu_down(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, kern, cfg: FP8Config,
                    out_dtype: torch.dtype, sizes: list[int] | None = None, tm: TileMap | None = None) -> torch.Tensor:
    """(silu(gate) * up) weight^T with SwiGLU's output quantized from gate and up (`_FP8SwiGLUDownFn`):
    dense (weight [N, I], gate [..., I]) or, with `sizes` and their `tm`, per expert segment
    (weight [E, N, I]). Autocast is off inside, as in `fp8_linear`."""
    if tm is None:
        tm = dense_tile_map(gate.numel() // gate.shape[-1], gate.device)
    with torch.autocast(gate.device.type, enabled=False):
        return _FP8SwiGLUDownFn.apply(gate, up, sizes, out_dtype, cfg, tm, kern, weight)


class FP8Experts(Experts):
    """The routed experts with FP8 GEMMs (one grouped launch or a per-expert loop over the sorted
    token segments: `FP8Config.grouped`); same stacked parameters [E, out, in] as `Experts`, made by
    class swap. Only the expert MLP step differs: dispatch, the gate weighting and the fp32 combine
    are `Experts.forward`'s, and SwiGLU stays in high precision."""

    fp8_config: FP8Config = DEFAULT_CONFIG

    def expert_mlp(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [M, h] sorted by expert (quantized straight from its dtype), counts [E] -> [M, h]."""
        sizes = counts.tolist()
        dtype = compute_dtype(xs)
        cfg = self.fp8_config
        kern = _kernels(cfg, xs)
        tm = tile_map(sizes, xs.device) if kern is not None else None  # shared by the 3 GEMMs
        if _fuse_swiglu(cfg, kern):
            g, u = swiglu_inputs(lambda w: fp8_grouped_linear(xs, w, sizes, cfg, dtype, tm), self.gate_proj,
                                 self.up_proj, cfg.stack_gate_up_below)
            return fp8_swiglu_down(g, u, self.down_proj, kern, cfg, dtype, sizes, tm)
        hidden = swiglu_hidden(lambda w: fp8_grouped_linear(xs, w, sizes, cfg, dtype, tm), self.gate_proj, self.up_proj,
                               cfg.stack_gate_up_below)
        return fp8_grouped_linear(hidden, self.down_proj, sizes, cfg, dtype, tm)


class FP8MLP(MLP):
    """The SwiGLU MLP (dense FFN, shared experts) whose gate and up projections, once both are
    `FP8Linear` without bias, run as one stacked FP8 GEMM per pass (`swiglu_hidden`); made by
    class swap, the children keep their parameters and names. Otherwise the children's forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj, self.up_proj
        if (type(g) is FP8Linear and type(u) is FP8Linear and g.bias is None and u.bias is None
                and g.fp8_config is u.fp8_config):
            cfg, down = g.fp8_config, self.down_proj
            kern = _kernels(cfg, x)
            if type(down) is FP8Linear and down.fp8_config is cfg and _fuse_swiglu(cfg, kern):
                gate, up = swiglu_inputs(lambda w: fp8_linear(x, w, cfg), g.weight, u.weight, cfg.stack_gate_up_below)
                y = fp8_swiglu_down(gate, up, down.weight, kern, cfg, compute_dtype(gate))
                return y + down.bias.to(y.dtype) if down.bias is not None else y
            hidden = swiglu_hidden(lambda w: fp8_linear(x, w, cfg), g.weight, u.weight, cfg.stack_gate_up_below)
            return self.down_proj(hidden)
        return super().forward(x)


# ----------------------------------------------------------------------------------- convert
SKIP_REASONS = {
    "embedding": "embedding: a lookup, not a GEMM; kept in high precision (report 3.3.1)",
    "head": "output head: precision-sensitive logits; kept in high precision (report 3.3.1)",
    "router": "MoE router (gating): kept in high precision, fp32 scores (report 3.3.1)",
    "norm": "normalization: kept in high precision (report 3.3.1)",
    "eh_proj": "MTP eh_proj: kept in high precision (not FP8 in the official release)",
    "attention": "attention core (QK^T, softmax, PV): kept in bf16/fp32; its projections are FP8",
    "filter": "excluded by module_filter_fn: kept in high precision",
}


def convert(model: nn.Module, config: FP8Config | None = None,
            module_filter_fn: Callable[[nn.Module, str], bool] | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """Switch every eligible GEMM of `model` to FP8, in place, from outside the model: each
    nn.Linear (attention projections, dense MLP, shared experts) becomes `FP8Linear`, each
    `Experts` becomes `FP8Experts` and each SwiGLU `MLP` `FP8MLP` (gate and up as one GEMM)
    by class swap (same parameters and state_dict keys; call it
    before torch.compile and before building the optimizer or DDP wrappers, though the latter
    also work since parameters are untouched). Returns (converted module names, [(skipped
    module name, reason)]). Calling it again is harmless (already-converted modules are listed
    as converted). `module_filter_fn(module, fqn)`: where given, an eligible Linear or `Experts`
    is converted only when it returns True, else kept and listed as skipped (the filter of
    torchao's and nanochat's `convert_to_float8_training`)."""
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
        elif type(m) in (MLP, FP8MLP):  # (not a subclass: it keeps its own forward)
            m.__class__ = FP8MLP  # its Linear children are converted (and listed) below
        elif type(m) in (Experts, FP8Experts) and not (module_filter_fn is None or module_filter_fn(m, name)):
            skipped.append((name, SKIP_REASONS["filter"]))
        elif type(m) in (Experts, FP8Experts):  # (not other subclasses: they keep their own storage or dispatch)
            if type(m) is Experts:
                m.__class__ = FP8Experts
            m.fp8_config = cfg
            converted.append(name)
        elif isinstance(m, nn.Linear):
            if leaf == "lm_head" or name.endswith("shared_head.head"):
                skipped.append((name, SKIP_REASONS["head"]))
            elif leaf == "eh_proj":
                skipped.append((name, SKIP_REASONS["eh_proj"]))
            elif not (module_filter_fn is None or module_filter_fn(m, name)):
                skipped.append((name, SKIP_REASONS["filter"]))
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
