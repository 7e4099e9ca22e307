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
  emulation: dequantize, then matmul in fp32. The forward caches x for the backward in FP8 only
  (its 128x1-tiled copy, the only form the backward needs): 1 byte per element.
- Fused path (CUDA: the Triton kernels of nanoseek.quant.fp8_triton; `TorchKernels` is its plain-PyTorch
  reference): each activation / activation gradient is read once to write its 1x128 copy and its
  128x1 copy (transposed, per token segment, zero-padded to whole tiles); each weight once to write
  W's and W^T's 128x128 blocks (the Dgrad operand: same blocks, only the layout changes); routed
  experts quantize all tokens and all experts in one launch each, then run one grouped GEMM launch
  (or a per-expert loop) for Fprop, Dgrad and the K-grouped Wgrad. CPU keeps the per-op path.
- `convert(model)` swaps modules in place from outside the model (class swap: same parameters,
  same state_dict keys, so checkpoints still save and load in the HF layout). The embedding,
  output head, router, norms, MTP eh_proj and the attention core stay in high precision.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import ACT, BLOCK, COL, E4M3, E4M3_MAX, EPS, Fp8Tensor, SegmentsT, TileMap, WEIGHT, _quant, dense_tile_map, dequantize, pow2_ceil, quantize, quantize_128x1, quantize_128x128, quantize_1x128, tile_map  # noqa: F401 - re-exported
from ..model import MLA, MLP, Experts, RMSNorm, Router



@dataclass
class FP8Config:
    """Options of the recipe. `pow2_scales`: round every scale up to a power of two (exact
    re-tiling, bit-identical across formulas; costs about one binade of headroom).
    `cache_fp8`: save the Linear input for the backward as its FP8 128x1 copy (else keep the
    high-precision tensor and quantize it in the backward). `backend`: "auto" (scaled_mm on
    SM90 CUDA, emulation on CPU, dequantize + bf16 GEMM on other GPUs), "emulate", "dequant",
    "scaled_mm". `kernels`: the quantizers' implementation: "auto" (the default: the fused Triton
    kernels of nanoseek.quant.fp8_triton for CUDA tensors when Triton imports, else "off"; on an H200
    bit-identical to the PyTorch reference at every call of a 150-step training run, and a 1B model
    trained with them lands within the seed-to-seed noise of bf16: benchmarks/RESULTS.md), "off"
    (the per-op PyTorch quantizers, transposes included: the CPU path, 2x slower on GPU),
    "triton" (required; every new shape specialization of a Triton quantizer is checked bit for
    bit against the PyTorch reference on first use and replaced by it if they differ; "auto" uses
    them only on GPUs with E4M3 support in Triton, compute capability 8.9 or newer: see
    `_CheckedKernels`), "torch" (the fused path's data layouts computed in plain PyTorch: the
    reference the Triton kernels are checked against, and how the CPU tests run that path).
    `grouped`: the routed experts' GEMMs on the fused path: "auto" (the default: "triton" with the
    Triton kernels, else "loop"), "triton" (one Triton launch per GEMM for all experts; each use's
    first call per shape is checked against the loop) or "loop" (one `fp8_gemm` per expert: far
    slower with many small experts, competitive with few wide ones; benchmarks/RESULTS.md, FP8).
    `stack_gate_up_below`: SwiGLU's gate and up projections narrower than this many outputs each
    run as one GEMM per pass over their stacked weights where the shapes allow (`stackable`): the
    input is quantized once and its gradient is one GEMM. That pays where the GEMMs are narrow (V3's
    experts) and costs a little for a wide dense MLP whose GEMMs are already at full speed
    (benchmarks/RESULTS.md, "Fifth H200 run"); 0 never stacks."""
    pow2_scales: bool = False
    cache_fp8: bool = True
    backend: str = "auto"
    kernels: str = "auto"
    grouped: str = "auto"
    stack_gate_up_below: int = 8192

    def __post_init__(self):
        if self.kernels not in ("auto", "off", "triton", "torch"):
            raise ValueError(f"FP8Config.kernels: unknown value {self.kernels!r} (auto, off, triton, torch)")
        if self.grouped not in ("auto", "loop", "triton"):
            raise ValueError(f"FP8Config.grouped: unknown value {self.grouped!r} (auto, loop, triton)")


DEFAULT_CONFIG = FP8Config()


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
    def quantize_weight_dual(w, pow2: bool = False, transposed: bool = True) -> tuple[Fp8Tensor, Fp8Tensor | None]:
        """W [..., N, K], or a list of weights stacked along N (`stackable`) -> (128x128
        quantization of W (each stacked weight quantized alone), that of W^T: the same blocks
        transposed)."""
        parts = [quantize(wi, WEIGHT, pow2) for wi in _as_weights(w)]
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
_TRITON_KERNELS = None  # _CheckedKernels(nanoseek.quant.fp8_triton.KERNELS) once imported; False when it failed
_TRITON_ERROR = ""

_QUANT_CHOICE: dict[tuple, str] = {}  # specialization key -> "fast" / "safe" / "torch" (verified on first use)
_QUANT_BROKEN: dict[tuple, str] = {}  # specialization key -> what disagreed with the PyTorch reference
# NANOSEEK_FP8_CHECK=every: compare every fused-kernel call (not only the first of each
# specialization) with the reference, use the reference where they differ, and log each
# disagreement in CHECK_LOG (a debugging mode: it runs every op twice).
CHECK_EVERY = os.environ.get("NANOSEEK_FP8_CHECK", "") == "every"
CHECK_LOG: list[dict] = []  # the first CHECK_LOG_MAX disagreements
CHECK_LOG_MAX = 100
CHECK_COUNT = [0]  # all disagreements


def _log_mismatch(entry: dict) -> None:
    CHECK_COUNT[0] += 1
    if len(CHECK_LOG) < CHECK_LOG_MAX:
        CHECK_LOG.append(entry)


def reset_kernel_checks() -> None:
    """Forget every first-use check, fallback and logged disagreement (a new run in the same
    process makes its own checks and reports only its own fallbacks)."""
    for state in (_QUANT_CHOICE, _QUANT_BROKEN, _GROUPED_CHECKED, _GROUPED_BROKEN, _SCALED_MM_CHECKED,
                  _SCALED_MM_BROKEN, CHECK_LOG):
        state.clear()
    CHECK_COUNT[0] = 0


def _div16(*ns: int) -> tuple[bool, ...]:
    return tuple(int(n) % 16 == 0 for n in ns)


def _same_fp8(a: Fp8Tensor | None, b: Fp8Tensor | None) -> bool:
    """Bit-identical data and equal scales (shapes included); NaN never equals."""
    if a is None or b is None:
        return a is None and b is None
    return (a.data.shape == b.data.shape and a.scale.shape == b.scale.shape
            and torch.equal(a.data.contiguous().view(torch.uint8), b.data.contiguous().view(torch.uint8))
            and torch.equal(a.scale, b.scale))


def _same_segments(a: "SegmentsT | None", b: "SegmentsT | None") -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.C == b.C and _same_fp8(Fp8Tensor(a.data, a.scale, ACT), Fp8Tensor(b.data, b.scale, ACT))


class _CheckedKernels:
    """The Triton kernels behind a first-use check: each quantizer call whose specialization
    (dtype, sizes and strides divisible by 16 or not, flags) is new is compared bit for bit with
    `TorchKernels` on the same input; the first variant that agrees ("fast", then "safe": the same
    kernel compiled without size specialization, then for the weights "copy": W^T transposed by
    PyTorch instead of in the kernel) is used for that specialization from then on, and
    when none agrees the PyTorch reference is (with a warning). So a kernel that miscompiles or
    misbehaves on some shapes can cost time, never correctness. The grouped GEMMs are checked in
    `_grouped_checked`."""
    name = "triton"

    def __init__(self, kern):
        self.kern = kern

    def _choose(self, key: tuple, run, ref, same, variants=("fast", "safe")):
        choice = _QUANT_CHOICE.get(key)
        if choice == "torch":
            return ref()
        if choice is not None:
            if not CHECK_EVERY:
                return run(choice)
            got, expect = run(choice), ref()
            if same(expect, got):
                return got
            _log_mismatch({"op": key[0], "key": str(key), "variant": choice})
            return expect
        expect = ref()
        why = []
        for variant in variants:
            try:
                got = run(variant)
            except Exception as e:  # noqa: BLE001  (a compile or launch failure: try the next)
                why.append(f"{variant}: {type(e).__name__}: {str(e)[:100]}")
                continue
            if same(expect, got):
                _QUANT_CHOICE[key] = variant
                if why:
                    _QUANT_BROKEN[key] = "; ".join(why)
                    warnings.warn(f"fp8: Triton {key[0]} {'; '.join(why)}; the {variant!r} variant agrees and is "
                                  f"used for this specialization ({key})")
                return got
            why.append(f"{variant}: differs from the PyTorch reference")
        _QUANT_CHOICE[key] = "torch"
        _QUANT_BROKEN[key] = "; ".join(why)
        warnings.warn(f"fp8: Triton {key[0]} disagrees with the PyTorch reference ({'; '.join(why)}); "
                      f"using the PyTorch quantizer for this specialization ({key})")
        return expect

    def quantize_act_dual(self, x: torch.Tensor, tm: TileMap, pow2: bool = False, rows: bool = True,
                          cols: bool = True):
        if x.stride(-1) != 1:
            x = x.contiguous()
        key = ("quantize_act_dual", x.dtype, _div16(x.shape[0], x.shape[1], tm.n_tiles, x.stride(0)),
               x.data_ptr() % 16 == 0, bool(pow2), bool(rows), bool(cols))

        def same(a, b):
            return _same_fp8(a[0], b[0]) and _same_segments(a[1], b[1])
        return self._choose(key, lambda v: self.kern.quantize_act_dual(x, tm, pow2, rows, cols, variant=v),
                            lambda: TORCH_KERNELS.quantize_act_dual(x, tm, pow2, rows, cols), same)

    def quantize_weight_dual(self, w, pow2: bool = False, transposed: bool = True):
        ws = [wi if wi.stride(-1) == 1 else wi.contiguous() for wi in _as_weights(w)]
        K, NT = ws[0].shape[-1], sum(wi.shape[-2] for wi in ws)
        key = ("quantize_weight_dual", ws[0].dtype, ws[0].dim(), len(ws),
               _div16(*[wi.shape[-2] for wi in ws], K, NT, *[wi.stride(0) if wi.dim() == 3 else wi.numel() for wi in ws],
                      *[wi.stride(-2) for wi in ws], math.ceil(NT / BLOCK), math.ceil(K / BLOCK)),
               tuple(wi.data_ptr() % 16 == 0 for wi in ws), bool(pow2), bool(transposed))

        def same(a, b):
            return _same_fp8(a[0], b[0]) and _same_fp8(a[1], b[1])
        # "copy": W^T by a transpose of W's bytes, the last Triton resort (the kernel's own
        # transposed store was once miscompiled: RESULTS.md, third H200 run)
        return self._choose(key, lambda v: self.kern.quantize_weight_dual(ws, pow2, transposed, variant=v),
                            lambda: TORCH_KERNELS.quantize_weight_dual(ws, pow2, transposed), same,
                            variants=("fast", "safe", "copy") if transposed else ("fast", "safe"))

    def grouped_gemm(self, *args, **kw):
        return self.kern.grouped_gemm(*args, **kw)

    def grouped_wgrad(self, *args, **kw):
        return self.kern.grouped_wgrad(*args, **kw)


def _kernels(cfg: "FP8Config", x: torch.Tensor):
    """The fused path's ops for this config and device, or None for the per-op path."""
    global _TRITON_KERNELS, _TRITON_ERROR
    if cfg.kernels == "off":
        return None
    if cfg.kernels == "torch":
        return TORCH_KERNELS
    if x.is_cuda and (cfg.kernels == "triton" or torch.cuda.get_device_capability(x.device) >= (8, 9)):
        if _TRITON_KERNELS is None:
            try:
                from .fp8_triton import KERNELS
                _TRITON_KERNELS = _CheckedKernels(KERNELS)
            except Exception as e:  # noqa: BLE001  (no Triton, or one without E4M3)
                _TRITON_KERNELS, _TRITON_ERROR = False, repr(e)
        if _TRITON_KERNELS:
            return _TRITON_KERNELS
    if cfg.kernels == "triton":
        raise RuntimeError(f"FP8Config(kernels='triton') needs CUDA tensors and Triton "
                           f"(device {x.device}{'; ' + _TRITON_ERROR if _TRITON_ERROR else ''})")
    return None


_GROUPED_CHECKED: set = set()  # (use, N, K, dtype): the Triton grouped kernel agreed with the loop there
_GROUPED_BROKEN: dict[str, str] = {}  # use -> why the loop is used instead


def _worst_row_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max over rows (last dim) of |out - ref| / |ref| (rows of zeros in ref: absolute); NaN when
    out and ref are non-finite at different places: a wrong tile cannot hide in a large average,
    and an overflow both share does not count as a disagreement."""
    out, ref = out.float().flatten(0, -2), ref.float().flatten(0, -2)
    if out.numel() == 0:
        return 0.0
    fo, fr = torch.isfinite(out), torch.isfinite(ref)
    if not torch.equal(fo, fr) or not torch.equal(out[~fo], ref[~fr]):
        return float("nan")
    out, ref = out.where(fo, 0.0), ref.where(fr, 0.0)
    norm = ref.norm(dim=-1)
    return ((out - ref).norm(dim=-1) / norm.clamp(min=1e-30).where(norm > 0, 1.0)).max().item()


def _grouped_checked(use: str, kern, *args):
    """The Triton grouped GEMM for `use` ("fprop", "dgrad": kern.grouped_gemm; "wgrad":
    kern.grouped_wgrad) on args; its first call per use and GEMM shape (N, K: the autotuning and
    specialization key) is compared with the per-expert loop on the same operands (every output
    row within 1e-2 relative error, as for _scaled_mm; a non-finite result fails), and a kernel
    that disagrees is replaced by the loop for that use from then on. CHECK_EVERY: every call."""
    loop = TORCH_KERNELS.grouped_wgrad if use == "wgrad" else TORCH_KERNELS.grouped_gemm
    if use in _GROUPED_BROKEN:
        return loop(*args)
    a, b = args[0], args[1]
    key = (use, a.C, b.C) if use == "wgrad" else (use, b.data.shape[-2], b.data.shape[-1], args[3])
    try:
        out = (kern.grouped_wgrad if use == "wgrad" else kern.grouped_gemm)(*args)
    except Exception as e:  # noqa: BLE001  (a compile or launch failure, e.g. no E4M3 on this GPU)
        if key in _GROUPED_CHECKED:  # it ran before at this shape: not a build problem
            raise
        _GROUPED_BROKEN[use] = f"{type(e).__name__}: {str(e)[:100]}"
        warnings.warn(f"fp8: the Triton grouped {use} GEMM failed ({_GROUPED_BROKEN[use]}); using the loop instead")
        return loop(*args)
    if key not in _GROUPED_CHECKED or CHECK_EVERY:
        first = key not in _GROUPED_CHECKED
        _GROUPED_CHECKED.add(key)
        ref = loop(*args)
        err = _worst_row_error(out, ref)
        if not err < 1e-2:
            if not first:  # CHECK_EVERY: log it, keep the kernel, use the reference for this call
                _log_mismatch({"op": f"grouped {use}", "key": str(key), "worst_row_error": err,
                               "sizes": list(args[2].sizes)})
                return ref.to(out.dtype)
            _GROUPED_BROKEN[use] = f"relative error {err:.3g} vs the per-expert loop"
            warnings.warn(f"fp8: the Triton grouped {use} GEMM disagrees with the per-expert loop "
                          f"({_GROUPED_BROKEN[use]}); using the loop instead")
            return ref.to(out.dtype)
    return out


def _grouped_impl(cfg: "FP8Config", kern) -> str:
    if getattr(kern, "name", "") != "triton":
        if cfg.grouped == "triton":
            raise RuntimeError("FP8Config(grouped='triton') needs the Triton kernels (kernels='auto' or 'triton' on CUDA)")
        return "loop"
    return "triton" if cfg.grouped == "auto" else cfg.grouped


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
    if out is not None:
        if out.shape != (a.data.shape[0], b.data.shape[0]) or out.dtype != out_dtype:
            raise ValueError(f"fp8_gemm: out {tuple(out.shape)} {out.dtype}, expected "
                             f"{(a.data.shape[0], b.data.shape[0])} {out_dtype}")
        if not (backend in ("auto", "scaled_mm") and _cuda_blockwise_ok(a.data.device)
                and (a.tile, b.tile) in _SCALED_MM_CHECKED and (a.tile, b.tile) not in _SCALED_MM_BROKEN):
            return out.copy_(fp8_gemm(a, b, out_dtype, backend))
        try:
            with torch.autocast(a.data.device.type, enabled=False):
                return _scaled_mm_blockwise(a, b, out_dtype, out)
        except RuntimeError:  # refused: the checked path below (with its fallbacks), then a copy
            return out.copy_(fp8_gemm(a, b, out_dtype, backend))
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


# ----------------------------------------------------------------------------------- stacked weights
def stackable(weights) -> bool:
    """Whether weights [..., N_i, K] can run as one GEMM against the same input (SwiGLU's gate and
    up): same K, dtype and device, and every N_i but the last a multiple of 128, so that no
    128x128 block spans two of them and each is quantized exactly as it would be alone."""
    w0 = weights[0]
    return (all(w.shape[:-2] == w0.shape[:-2] and w.shape[-1] == w0.shape[-1] and w.dtype == w0.dtype
                and w.device == w0.device for w in weights)
            and all(w.shape[-2] % BLOCK == 0 for w in weights[:-1]))


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


def _as_weights(weight) -> tuple:
    weights = (weight,) if isinstance(weight, torch.Tensor) else tuple(weight)
    if len(weights) > 1 and not stackable(weights):
        raise ValueError(f"fp8: weights of shapes {[tuple(w.shape) for w in weights]} cannot share one GEMM "
                         "(same K, dtype and device needed, and each N but the last a multiple of 128)")
    return weights


# ----------------------------------------------------------------------------------- Linear
def _out_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


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
            xq = _quant(x2, ACT, cfg.pow2_scales)
            wq, _ = _quantize_weights(weights, None, cfg.pow2_scales)
            y = fp8_gemm(xq, wq, out_dtype, cfg.backend)
            if cfg.cache_fp8:  # x^T in 1x128 tiles along tokens == x in 128x1 tiles, K-major for Wgrad
                xt = _quant(x2.t(), ACT, cfg.pow2_scales)
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
            dx = fp8_gemm(_quant(dy2, ACT, cfg.pow2_scales), wq.t(), ctx.x_dtype, cfg.backend)
            dx = dx.view(ctx.x_shape)
        if want_w:  # Wgrad: dW[N, K] = dy^T[N, M] @ x[M, K], both 1x128 along M
            if xt is None:
                xt = _quant(x2.t(), ACT, cfg.pow2_scales)
            dw = fp8_gemm(_quant(dy2.t(), ACT, cfg.pow2_scales), xt, torch.float32, cfg.backend)
        return (dx, None, None) + _weight_grads(dw, ctx, 3)


def fp8_linear(x: torch.Tensor, weight, cfg: FP8Config | None = None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """F.linear(x, weight) with FP8 Fprop, Dgrad and Wgrad; `weight` may be a list of weights
    [N_i, K] (`stackable`), whose outputs come concatenated [..., sum N_i] from one GEMM. Output
    dtype: the autocast dtype when autocast is on, else x's dtype. The FP8 work itself runs with
    autocast off (autocast has no rule for e4m3 tensors)."""
    out_dtype = out_dtype or _out_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        return _FP8LinearFn.apply(x, out_dtype, cfg or DEFAULT_CONFIG, *_as_weights(weight))


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
                y = _grouped_checked("fprop", kern, xq, wq, tm, out_dtype)
            else:
                y = TORCH_KERNELS.grouped_gemm(xq, wq, tm, out_dtype, cfg.backend)
            ctx.tm, ctx.impl = tm, impl
            ctx.save_for_backward(xt.data, xt.scale, wqt.data, wqt.scale)
            return y
        xq = _quant(x, ACT, cfg.pow2_scales)
        wq, _ = _quantize_weights(weights, None, cfg.pow2_scales)  # [E, N, K], blocks never cross experts
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
                dx = (_grouped_checked("dgrad", kern, dyq, wqt, tm, ctx.x_dtype) if ctx.impl == "triton"
                      else TORCH_KERNELS.grouped_gemm(dyq, wqt, tm, ctx.x_dtype, cfg.backend))
            if want_w:  # Wgrad per expert: dW_e = dy_e^T x_e (128x1 tiles within the segment)
                dw = (_grouped_checked("wgrad", kern, dyt, xt, tm) if ctx.impl == "triton"
                      else TORCH_KERNELS.grouped_wgrad(dyt, xt, tm, cfg.backend))
            return (dx, None, None, None, None) + _weight_grads(dw, ctx, 5)
        w_data, w_scale = ctx.saved_tensors
        dyq = _quant(dy, ACT, cfg.pow2_scales) if ctx.needs_input_grad[0] else None
        dx = dy.new_zeros(dy.shape[0], w_data.shape[2], dtype=ctx.x_dtype) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(w_data.shape, dtype=torch.float32, device=dy.device) if want_w else None
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
        return (dx, None, None, None, None) + _weight_grads(dw, ctx, 5)


def fp8_grouped_linear(x: torch.Tensor, weight, sizes: list[int], cfg: FP8Config | None = None,
                       out_dtype: torch.dtype | None = None, tm: TileMap | None = None) -> torch.Tensor:
    """x [sum(sizes), K] sorted by expert, weight [E, N, K] (or a list of `stackable` ones, outputs
    concatenated) -> [sum(sizes), N] (FP8 GEMMs). `tm`: the segments' TileMap when the caller
    shares one between several calls (fused path only). Autocast is off inside, as in `fp8_linear`."""
    out_dtype = out_dtype or _out_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        return _FP8GroupedLinearFn.apply(x, list(sizes), out_dtype, cfg or DEFAULT_CONFIG, tm, *_as_weights(weight))


def swiglu_hidden(linear, gate: torch.Tensor, up: torch.Tensor, stack_below: int) -> torch.Tensor:
    """silu(x gate^T) * (x up^T), where linear(w) applies weight w (or a list of them, stacked) to x:
    one FP8 GEMM per pass for gate and up when each has fewer than `stack_below` outputs and their
    shapes allow (`stackable`), else two."""
    if max(gate.shape[-2], up.shape[-2]) < stack_below and stackable([gate, up]):
        g, u = linear([gate, up]).split([gate.shape[-2], up.shape[-2]], dim=-1)
    else:
        g, u = linear(gate), linear(up)
    return F.silu(g) * u


class FP8Experts(Experts):
    """The routed experts with FP8 GEMMs (one grouped launch or a per-expert loop over the sorted
    token segments: `FP8Config.grouped`); same stacked parameters [E, out, in] as `Experts`, made by
    class swap. Only the expert MLP step differs: dispatch, the gate weighting and the fp32 combine
    are `Experts.forward`'s, and SwiGLU stays in high precision."""

    fp8_config: FP8Config = DEFAULT_CONFIG

    def expert_mlp(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [M, h] sorted by expert (quantized straight from its dtype), counts [E] -> [M, h]."""
        sizes = counts.tolist()
        dtype = _out_dtype(xs)
        cfg = self.fp8_config
        tm = tile_map(sizes, xs.device) if _kernels(cfg, xs) is not None else None  # shared by the 3 GEMMs
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
            cfg = g.fp8_config
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
}


def convert(model: nn.Module, config: FP8Config | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """Switch every eligible GEMM of `model` to FP8, in place, from outside the model: each
    nn.Linear (attention projections, dense MLP, shared experts) becomes `FP8Linear`, each
    `Experts` becomes `FP8Experts` and each SwiGLU `MLP` `FP8MLP` (gate and up as one GEMM)
    by class swap (same parameters and state_dict keys; call it
    before torch.compile and before building the optimizer or DDP wrappers, though the latter
    also work since parameters are untouched). Returns (converted module names, [(skipped
    module name, reason)]). Calling it again is harmless (already-converted modules are listed
    as converted)."""
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
