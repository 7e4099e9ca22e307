"""FP8 activation quantizers in Triton, tiled for bandwidth, and the same quantizers fused into their
producers (DeepSeek-V3 report, arXiv 2412.19437, sections 3.3.1-3.3.3: 1x128 activation tiles for
Fprop / Dgrad, 128x1 for Wgrad, the SwiGLU inputs cached and its output recomputed).

Every output is bit-identical to `nanoseek.quant.blocks.quantize` applied to the producer's output
in its own dtype (the fused path checks that on first use: `checked.CheckedKernels`).

- `quantize_rows_tiled`: 1x128 tiles of x [M, K]; each program quantizes BLOCK_M rows x (G x 128)
  channels (autotuned), 32-bit in-tile offsets, 16-byte vector loads where the sizes allow.
- `quantize_act_tiled`: one read of x [T, C] writes its 1x128 quantization and its 128x1
  quantization stored transposed per token segment (`blocks.SegmentsT`); each program handles one
  128-token tile and CB 128-channel blocks (autotuned), each block in two passes of SUB-wide chunks
  (whole rows for the 1x128 scales, whole columns for the 128x1 ones; the second pass re-reads from
  L2), amax taken in x's own dtype (exact), the transpose done on x's 16-bit values. The kernel it
  replaces (`fp8_triton._quant_dual_kernel`) holds the whole 128 x 128 tile in fp32 and transposes
  it there: ptxas gives it 255 registers and about 2.7 KB of spills per thread for sm_90.
- The producers (`PRODUCER`): 0 reads x; 1 computes SwiGLU h = silu(gate) * up from its two
  inputs, rounding as PyTorch does (silu in fp32, rounded to the inputs' dtype, the product in
  fp32, rounded again), so h is never written in 16 bits; 2 computes RMSNorm
  (x * rstd rounded to x's dtype, times the weight, in the output dtype of `RMSNorm.forward`) from
  x and a per-row rstd (`rms_rstd`, one extra read of x).

Where bits may differ from the PyTorch ops: silu's exp (libdevice expf here, the CUDA math
library's expf in PyTorch: the same implementation on CUDA; numpy's under the interpreter, which
agrees with PyTorch's CPU kernel after rounding to bf16, not always in fp32) and RMSNorm's sum of
squares (a different reduction order from `F.rms_norm`'s: rstd agrees to a few ulps, not bit for
bit; given the same rstd the normalized output and its quantization are exact).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .blocks import ACT, BLOCK, E4M3, EPS, Fp8Tensor, SegmentsT, TileMap
from .fp8_triton_base import INTERPRET, empty, on_device, exp_f32, round_to, scale_from_amax, to_e4m3

X_ONLY, SWIGLU, RMSNORM = 0, 1, 2  # PRODUCER: what the kernel reads and computes before quantizing


# ----------------------------------------------------------------------------------- producers
@triton.jit
def _produce(x_ptr, u_ptr, w_ptr, rstd_ptr, r, c, rmask, cmask, stride_xm, stride_um, rows,
             PRODUCER: tl.constexpr, ROUND_Y: tl.constexpr):
    """The [R, W] tile of the activation to quantize, in its own dtype, zero outside the masks
    (r: in-tile row offsets from the pointers' first row, c: channels, rows: the rows' global
    indices, for rstd)."""
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + r[:, None] * stride_xm + c[None, :], mask=mask, other=0.0)
    if PRODUCER == 1:  # SwiGLU: x is the gate, u the up projection (PyTorch: silu then mul, each rounded)
        u = tl.load(u_ptr + r[:, None] * stride_um + c[None, :], mask=mask, other=0.0)
        g = x.to(tl.float32)
        silu = round_to(tl.math.div_rn(g, 1.0 + exp_f32(-g)), x.dtype)
        x = round_to(silu.to(tl.float32) * u.to(tl.float32), x.dtype)
    if PRODUCER == 2:  # RMSNorm: (x * rstd) rounded to x's dtype, times the weight in the output dtype
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        w = tl.load(w_ptr + c, mask=cmask, other=0.0)
        n = round_to(x.to(tl.float32) * rstd[:, None], x.dtype)
        y = n.to(tl.float32) * w.to(tl.float32)[None, :]
        if ROUND_Y:
            y = round_to(y, x.dtype)
        x = y  # zero where masked: x, rstd and the weight load as 0 there
    return x


# ----------------------------------------------------------------------------------- 1x128 rows
def _rows_configs():
    cfgs = [triton.Config({"BLOCK_M": bm, "G": g}, num_warps=w)
            for bm, g, w in [(32, 1, 4), (16, 1, 4), (64, 1, 8), (16, 4, 4), (32, 2, 8), (8, 8, 4)]]
    return cfgs[:1] if INTERPRET else cfgs


def _quant_rows_tiled_kernel(x_ptr, u_ptr, w_ptr, rstd_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_um, stride_qm,
                             EPS_C: tl.constexpr, POW2: tl.constexpr, PRODUCER: tl.constexpr,
                             ROUND_Y: tl.constexpr, BLOCK_M: tl.constexpr, G: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    row0 = pid_m * BLOCK_M
    r = tl.arange(0, BLOCK_M)  # in-tile rows; the row base goes into the pointers in 64 bits
    rows = row0 + r
    rmask = rows < M
    x_base = x_ptr + row0.to(tl.int64) * stride_xm
    u_base = u_ptr + row0.to(tl.int64) * stride_um
    q_base = q_ptr + row0.to(tl.int64) * stride_qm
    for i in tl.static_range(G):
        kb = pid_k * G + i
        c = kb * 128 + tl.arange(0, 128)
        cmask = c < K
        mask = rmask[:, None] & cmask[None, :]
        x = _produce(x_base, u_base, w_ptr, rstd_ptr, r, c, rmask, cmask, stride_xm, stride_um, rows,
                     PRODUCER, ROUND_Y)  # [BLOCK_M, 128]
        s = scale_from_amax(tl.max(tl.abs(x), axis=1).to(tl.float32), EPS_C, POW2)  # [BLOCK_M]
        tl.store(q_base + r[:, None] * stride_qm + c[None, :], to_e4m3(x.to(tl.float32), s[:, None]), mask=mask)
        # scales M-major ([M, L] with strides (1, M)): what _scaled_mm's 1x128 operand wants
        tl.store(s_ptr + kb.to(tl.int64) * M + rows, s, mask=rmask & (kb * 128 < K))


_ROWS_INT_ARGS = ["M", "K", "stride_xm", "stride_um", "stride_qm"]
_quant_rows_tiled_fast = triton.autotune(_rows_configs(), key=["K", "PRODUCER"])(triton.jit(_quant_rows_tiled_kernel))
_quant_rows_tiled_safe = triton.autotune(_rows_configs(), key=["K", "PRODUCER"])(
    triton.jit(_quant_rows_tiled_kernel, do_not_specialize=_ROWS_INT_ARGS))


def _launch_rows(x, u, w, rstd, producer, round_y, pow2, variant):
    M, K = x.shape
    L = triton.cdiv(K, BLOCK)
    q = empty(M, K, dtype=E4M3, device=x.device)
    s = empty(L, M, dtype=torch.float32, device=x.device)
    if M and K:
        kernel = {"fast": _quant_rows_tiled_fast, "safe": _quant_rows_tiled_safe}[variant]
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(L, meta["G"]))  # noqa: E731
        kernel[grid](x, u, w, rstd, q, s, M, K, x.stride(0), u.stride(0), q.stride(0), EPS_C=EPS, POW2=pow2,
                     PRODUCER=producer, ROUND_Y=round_y)
    return Fp8Tensor(q, s.t(), ACT)


def _matrix(t: torch.Tensor, name: str) -> torch.Tensor:
    if not (on_device(t) and t.dim() == 2):
        raise ValueError(f"{name}: needs a 2-D CUDA tensor, got {tuple(t.shape)} on {t.device}")
    return t if t.stride(1) == 1 else t.contiguous()


def quantize_rows_tiled(x: torch.Tensor, pow2: bool = False, variant: str = "fast") -> Fp8Tensor:
    """1x128 quantization of x [M, K] (CUDA): E4M3 data [M, K], scales [M, ceil(K/128)] M-major."""
    x = _matrix(x, "quantize_rows_tiled")
    return _launch_rows(x, x, x, x, X_ONLY, False, pow2, variant)


# ----------------------------------------------------------------------------------- 1x128 + 128x1
def _dual_configs():
    # (CB, SUB, warps): the ones ptxas compiles for sm_90 without spilling registers for every
    # producer come first (the 128 x 128 tile at once spills in the first kernel)
    cfgs = [triton.Config({"CB": cb, "SUB": sub}, num_warps=w)
            for cb, sub, w in [(1, 16, 4), (2, 16, 4), (4, 32, 8), (1, 32, 8), (1, 64, 8), (2, 32, 4)]]
    return [triton.Config({"CB": 1, "SUB": 64}, num_warps=4)] if INTERPRET else cfgs  # fewest interpreted steps


def _quant_act_tiled_kernel(x_ptr, u_ptr, w_ptr, rstd_ptr, qr_ptr, sr_ptr, qc_ptr, sc_ptr, prog_ptr,
                            T, C, P, stride_xm, stride_um, SIZE_CLASS,
                            EPS_C: tl.constexpr, POW2: tl.constexpr, ROWS_OUT: tl.constexpr,
                            COLS_OUT: tl.constexpr, PRODUCER: tl.constexpr, ROUND_Y: tl.constexpr,
                            CB: tl.constexpr, SUB: tl.constexpr):
    """One 128-token tile x CB 128-channel blocks, each block in two passes of SUB-wide chunks: the
    1x128 pass over [SUB tokens, 128 channels] (whole rows: each chunk's row scales are final),
    the 128x1 pass over [128 tokens, SUB channels] (whole columns), so no more than SUB x 128
    values are live at once (the one-shot 128 x 128 tile spills registers). The second pass
    re-reads the block the first just read, from L2: x is read once from memory."""
    p = tl.program_id(0)  # token tile (never crosses a segment)
    tile = tl.load(prog_ptr + p)  # global tile index == p
    row0 = tl.load(prog_ptr + P + p)
    nrow = tl.load(prog_ptr + 2 * P + p)
    x_base = x_ptr + row0.to(tl.int64) * stride_xm  # 64-bit row bases, 32-bit in-tile offsets
    u_base = u_ptr + row0.to(tl.int64) * stride_um
    qr_base = qr_ptr + row0.to(tl.int64) * C
    # segment e's transposed block: [C, 128 t_e] row-major at C * 128 * ts_e; this tile's columns 128 (tile - ts_e)
    first = tl.load(prog_ptr + 3 * P + p)
    ntiles = tl.load(prog_ptr + 4 * P + p)
    qc_base = qc_ptr + first.to(tl.int64) * 128 * C + 128 * (tile - first)
    ld = 128 * ntiles.to(tl.int64)
    for i in range(CB):  # a loop, not unrolled: unrolled blocks share registers and spill
        cb = tl.program_id(1) * CB + i  # 128-channel block
        if ROWS_OUT:  # 1x128: one scale per token per 128 channels; scales [L, T] (M-major for _scaled_mm)
            c = cb * 128 + tl.arange(0, 128)
            cmask = c < C
            for j in range(128 // SUB):
                r = j * SUB + tl.arange(0, SUB)
                rmask = r < nrow
                x = _produce(x_base, u_base, w_ptr, rstd_ptr, r, c, rmask, cmask, stride_xm, stride_um, row0 + r,
                             PRODUCER, ROUND_Y)  # [SUB tok, 128 ch], x's dtype
                sr = scale_from_amax(tl.max(tl.abs(x), axis=1).to(tl.float32), EPS_C, POW2)  # [SUB tok]
                tl.store(qr_base + r[:, None] * C + c[None, :], to_e4m3(x.to(tl.float32), sr[:, None]),
                         mask=rmask[:, None] & cmask[None, :])
                tl.store(sr_ptr + cb.to(tl.int64) * T + row0 + r, sr, mask=rmask & (cb * 128 < C))
        if COLS_OUT:  # 128x1: one scale per channel per 128 tokens, written transposed [SUB ch, 128 tok]
            tok = tl.arange(0, 128)
            tmask = tok < nrow
            for j in range(128 // SUB):
                ch = cb * 128 + j * SUB + tl.arange(0, SUB)
                chmask = ch < C
                xc = _produce(x_base, u_base, w_ptr, rstd_ptr, tok, ch, tmask, chmask, stride_xm, stride_um, row0 + tok,
                              PRODUCER, ROUND_Y)  # [128 tok, SUB ch]; padded tokens are 0 -> 0
                sc = scale_from_amax(tl.max(tl.abs(xc), axis=0).to(tl.float32), EPS_C, POW2)  # [SUB ch]
                xt = tl.trans(xc)  # [SUB ch, 128 tok] in x's dtype (exact)
                tl.store(qc_base + ch[:, None].to(tl.int64) * ld + tok[None, :], to_e4m3(xt.to(tl.float32), sc[:, None]),
                         mask=chmask[:, None])
                tl.store(sc_ptr + tile.to(tl.int64) * C + ch, sc, mask=chmask)


# "fast": Triton's default specialization (sizes divisible by 16 get divisibility hints: 16-byte
# vectors); "safe": no specialization of sizes and strides (fp8_triton explains the pair)
_DUAL_INT_ARGS = ["T", "C", "P", "stride_xm", "stride_um", "SIZE_CLASS"]
_quant_act_tiled_fast = triton.autotune(_dual_configs(), key=["C", "SIZE_CLASS", "PRODUCER", "ROWS_OUT", "COLS_OUT"])(
    triton.jit(_quant_act_tiled_kernel, do_not_specialize=["SIZE_CLASS"]))
_quant_act_tiled_safe = triton.autotune(_dual_configs(), key=["C", "SIZE_CLASS", "PRODUCER", "ROWS_OUT", "COLS_OUT"])(
    triton.jit(_quant_act_tiled_kernel, do_not_specialize=_DUAL_INT_ARGS))


def _launch_dual(x, u, w, rstd, tm: TileMap, producer, round_y, pow2, rows, cols, variant):
    T, C = x.shape
    if T != sum(tm.sizes):
        raise ValueError(f"fp8 activation quantizer: {T} rows but the tile map covers {sum(tm.sizes)}")
    L = triton.cdiv(C, BLOCK)
    P = tm.n_tiles
    dev = x.device
    qr = empty(T, C, dtype=E4M3, device=dev) if rows else None
    sr = empty(L, T, dtype=torch.float32, device=dev) if rows else None
    qc = empty(P * BLOCK * C, dtype=E4M3, device=dev) if cols else None
    sc = empty(P, C, dtype=torch.float32, device=dev) if cols else None
    if P and C and (rows or cols):
        dummy = torch.empty(1, dtype=torch.float32, device=dev)
        kernel = {"fast": _quant_act_tiled_fast, "safe": _quant_act_tiled_safe}[variant]
        grid = lambda meta: (P, triton.cdiv(L, meta["CB"]))  # noqa: E731
        kernel[grid](x, u, w, rstd, qr if rows else dummy, sr if rows else dummy, qc if cols else dummy,
                     sc if cols else dummy, tm.prog, T, C, P, x.stride(0), u.stride(0), P.bit_length(),
                     EPS_C=EPS, POW2=pow2, ROWS_OUT=rows, COLS_OUT=cols, PRODUCER=producer, ROUND_Y=round_y)
    return (Fp8Tensor(qr, sr.t(), ACT) if rows else None), (SegmentsT(qc, sc, C) if cols else None)


def quantize_act_tiled(x: torch.Tensor, tm: TileMap, pow2: bool = False, rows: bool = True, cols: bool = True,
                       variant: str = "fast") -> tuple[Fp8Tensor | None, SegmentsT | None]:
    """x [T, C] (CUDA) -> (1x128 quantization: data [T, C], scale [T, L] M-major; 128x1 quantization
    per segment of `tm`, transposed: `SegmentsT`), either skippable; one launch, one read of x."""
    x = _matrix(x, "quantize_act_dual")
    return _launch_dual(x, x, x, x, tm, X_ONLY, False, pow2, rows, cols, variant)


# ----------------------------------------------------------------------------------- fused SwiGLU
def _swiglu_inputs(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = _matrix(gate, "swiglu_quantize"), _matrix(up, "swiglu_quantize")
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu_quantize: gate {tuple(gate.shape)} {gate.dtype} and up "
                         f"{tuple(up.shape)} {up.dtype} must match")
    return gate, up


def swiglu_quantize_dual(gate: torch.Tensor, up: torch.Tensor, tm: TileMap, pow2: bool = False, rows: bool = True,
                         cols: bool = True, variant: str = "fast") -> tuple[Fp8Tensor | None, SegmentsT | None]:
    """`quantize_act_tiled` of h = silu(gate) * up [T, I] (gate and up: CUDA, same shape and dtype,
    rows may be strided views of one stacked GEMM output), h computed in registers only."""
    gate, up = _swiglu_inputs(gate, up)
    return _launch_dual(gate, up, gate, gate, tm, SWIGLU, False, pow2, rows, cols, variant)


def swiglu_quantize(gate: torch.Tensor, up: torch.Tensor, pow2: bool = False, variant: str = "fast") -> Fp8Tensor:
    """The 1x128 quantization of silu(gate) * up [M, I] (scales M-major), h never written."""
    gate, up = _swiglu_inputs(gate, up)
    return _launch_rows(gate, up, gate, gate, SWIGLU, False, pow2, variant)


# ----------------------------------------------------------------------------------- fused RMSNorm
@triton.jit
def _rms_rstd_kernel(x_ptr, rstd_ptr, M, C, stride_xm, eps, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                     N_CHUNKS: tl.constexpr):
    """rstd[m] = 1 / sqrt(mean(x[m]^2) + eps) in fp32 (sum of squares in BLOCK_C-wide partial sums)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    base = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(N_CHUNKS):  # ceil(C / BLOCK_C)
        c = i * BLOCK_C + tl.arange(0, BLOCK_C)
        x = tl.load(base + c[None, :], mask=rmask[:, None] & (c[None, :] < C), other=0.0).to(tl.float32)
        acc += x * x
    ms = tl.sum(acc, axis=1) / C
    tl.store(rstd_ptr + rows, tl.math.div_rn(tl.full(ms.shape, 1.0, tl.float32), tl.sqrt_rn(ms + eps)), mask=rmask)


def rms_rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / rms(x) per row of x [M, C] (CUDA), fp32 [M]."""
    x = _matrix(x, "rms_rstd")
    M, C = x.shape
    rstd = empty(M, dtype=torch.float32, device=x.device)
    if M:
        _rms_rstd_kernel[(triton.cdiv(M, 4),)](x, rstd, M, C, x.stride(0), eps, BLOCK_M=4, BLOCK_C=512,
                                                 N_CHUNKS=triton.cdiv(C, 512), num_warps=4)
    return rstd


def _rmsnorm_inputs(x, weight):
    x = _matrix(x, "rmsnorm_quantize")
    if weight.shape != (x.shape[1],):
        raise ValueError(f"rmsnorm_quantize: weight {tuple(weight.shape)} for x {tuple(x.shape)}")
    out = torch.promote_types(x.dtype, weight.dtype)  # RMSNorm.forward's output dtype
    if out not in (x.dtype, torch.float32):
        raise ValueError(f"rmsnorm_quantize: x {x.dtype} with weight {weight.dtype} is not supported")
    return x, weight.contiguous(), out != torch.float32


def rmsnorm_quantize_dual(x: torch.Tensor, weight: torch.Tensor, eps: float, tm: TileMap, pow2: bool = False,
                          rows: bool = True, cols: bool = True, variant: str = "fast"
                          ) -> tuple[Fp8Tensor | None, SegmentsT | None, torch.Tensor]:
    """(`quantize_act_tiled` of RMSNorm(x) = (x * rstd).to(x.dtype) * weight, rstd [T] fp32): the
    norm's output is never written in 16 bits; its backward needs x, weight and rstd."""
    x, weight, round_y = _rmsnorm_inputs(x, weight)
    rstd = rms_rstd(x, eps)
    rq, cq = _launch_dual(x, x, weight, rstd, tm, RMSNORM, round_y, pow2, rows, cols, variant)
    return rq, cq, rstd


def rmsnorm_quantize(x: torch.Tensor, weight: torch.Tensor, eps: float, pow2: bool = False,
                     variant: str = "fast") -> tuple[Fp8Tensor, torch.Tensor]:
    """(1x128 quantization of RMSNorm(x) [M, C], rstd [M] fp32)."""
    x, weight, round_y = _rmsnorm_inputs(x, weight)
    rstd = rms_rstd(x, eps)
    return _launch_rows(x, x, weight, rstd, RMSNORM, round_y, pow2, variant), rstd


__all__ = ["quantize_rows_tiled", "quantize_act_tiled", "swiglu_quantize", "swiglu_quantize_dual", "rms_rstd",
           "rmsnorm_quantize", "rmsnorm_quantize_dual"]
