"""FP8 kernels for CUDA in Triton: the quantizers and grouped GEMMs of nanoseek/quant/fp8.py's fused path.

Quantizers (same formulas as `nanoseek.quant.blocks.quantize`: s = max(amax, eps) / 448 with IEEE-rounded
division, optional power-of-two round-up, q = e4m3_rne(clamp(x / s, +-448)); bit-identical to the
PyTorch reference, which the GPU benchmark checks before timing, and which the fused path checks on
the first use of every shape specialization, falling back to the unspecialized compilation
(`variant="safe"`) and then to the PyTorch reference: `checked.CheckedKernels`):
- `quantize_rows`: 1x128 tiles along the last dim, the first kernel (kept for comparison; the
  tiled one is `fp8_triton_act.quantize_rows_tiled`).
- `quantize_act_dual`: one read of an activation (or activation gradient) x [T, C] writes both its
  1x128 quantization (for Fprop / Dgrad) and its 128x1 quantization stored transposed, per token
  segment (for Wgrad): no transpose copy, no second pass. Segments are the experts' token ranges
  (tokens sorted by expert) or the whole tensor for a dense Linear; tiles never cross a segment.
  Variants "fast" / "safe": the tiled kernel of `fp8_triton_act`; "v1" / "v1-safe": the first
  kernel (one program per 128x128 tile, transposed in fp32), kept for comparison and as the
  self-checks' last Triton resort.
- Fused producers (`fp8_triton_act`): SwiGLU's output quantized from its inputs (`swiglu_quantize_dual`).
- `quantize_weight_dual`: 128x128 blocks of W [..., N, K] (or of SwiGLU's gate and up, stacked along
  N), writing W's FP8 data and its transpose (the Dgrad operand: same blocks and scales, only the
  layout changes) in one pass.

GEMMs (fp32 accumulation with the scales applied every 128 elements of the contraction, the
DeepSeek promotion scheme: each `tl.dot` covers exactly one 128-wide scale group):
- `grouped_gemm`: out[T, N] = A[T, K] (1x128) x B_e[N, K]^T (128x128) per expert segment
  (Fprop and Dgrad of the routed experts, one launch for all experts).
- `grouped_wgrad`: dW[E, N, K] = dy_e^T x_e, both operands in 128x1 tiles (the K-grouped Wgrad).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .blocks import ACT, BLOCK, E4M3, EPS, WEIGHT, Fp8Tensor, SegmentsT, TileMap
from .fp8_triton_base import INTERPRET as _INTERPRET
from .fp8_triton_base import empty as _empty
from .fp8_triton_base import on_device as _on_device
from .fp8_triton_base import scale_from_amax as _scale_from_amax
from .fp8_triton_base import sentinel_outputs
from .fp8_triton_base import to_e4m3 as _to_e4m3
from .fp8_triton_act import quantize_act_tiled, swiglu_quantize_dual


# ----------------------------------------------------------------------------------- 1x128 rows
@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm,
                       EPS_C: tl.constexpr, POW2: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * ROWS + tl.arange(0, ROWS)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = _scale_from_amax(tl.max(tl.abs(x), axis=1), EPS_C, POW2)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], _to_e4m3(x, s[:, None]), mask=mask)
    # scales M-major ([M, L] with strides (1, M)): what _scaled_mm's 1x128 operand wants
    tl.store(s_ptr + pid_k * M + rows, s, mask=rows < M)


def quantize_rows(x: torch.Tensor, pow2: bool = False) -> Fp8Tensor:
    """1x128 quantization of a 2-D CUDA tensor [M, K] (last dim contiguous): E4M3 data [M, K],
    scales [M, ceil(K/128)] stored M-major."""
    if not (_on_device(x) and x.dim() == 2):
        raise ValueError(f"quantize_rows: needs a 2-D CUDA tensor, got {tuple(x.shape)} on {x.device}")
    if x.stride(1) != 1:
        x = x.contiguous()
    M, K = x.shape
    L = triton.cdiv(K, BLOCK)
    q = _empty(M, K, dtype=E4M3, device=x.device)
    s = _empty(L, M, dtype=torch.float32, device=x.device)
    ROWS = 16
    _quant_rows_kernel[(triton.cdiv(M, ROWS), L)](x, q, s, M, K, x.stride(0), q.stride(0), EPS_C=EPS,
                                                  POW2=pow2, BLOCK_K=BLOCK, ROWS=ROWS, num_warps=4)
    return Fp8Tensor(q, s.t(), ACT)


# ----------------------------------------------------------------------------------- 1x128 + 128x1
def _quant_dual_kernel(x_ptr, qr_ptr, sr_ptr, qc_ptr, sc_ptr, prog_ptr, T, C, P, stride_xm,
                       EPS_C: tl.constexpr, POW2: tl.constexpr, ROWS_OUT: tl.constexpr, COLS_OUT: tl.constexpr):
    p = tl.program_id(0)  # token tile (never crosses a segment)
    cb = tl.program_id(1)  # 128-channel block
    tile = tl.load(prog_ptr + p)  # global tile index == p; rows of the tile:
    row0 = tl.load(prog_ptr + P + p).to(tl.int64)
    nrow = tl.load(prog_ptr + 2 * P + p)
    r = tl.arange(0, 128)
    c = cb * 128 + tl.arange(0, 128)
    rmask = r < nrow
    cmask = c < C
    mask = rmask[:, None] & cmask[None, :]
    rows = row0 + r
    x = tl.load(x_ptr + rows[:, None] * stride_xm + c[None, :], mask=mask, other=0.0).to(tl.float32)  # [128 tok, 128 ch]
    ax = tl.abs(x)
    if ROWS_OUT:  # 1x128: one scale per token per 128 channels; scales stored [L, T] (M-major for _scaled_mm)
        sr = _scale_from_amax(tl.max(ax, axis=1), EPS_C, POW2)
        tl.store(qr_ptr + rows[:, None] * C + c[None, :], _to_e4m3(x, sr[:, None]), mask=mask)
        tl.store(sr_ptr + cb * T + rows, sr, mask=rmask)
    if COLS_OUT:  # 128x1: one scale per channel per 128 tokens, data written transposed [C, 128] per tile
        sc = _scale_from_amax(tl.max(ax, axis=0), EPS_C, POW2)
        qc = _to_e4m3(tl.trans(x), sc[:, None])  # [128 ch, 128 tok] (transposed in fp32); padded tokens -> 0
        # segment e's block: [C, 128 t_e] row-major at C * 128 * ts_e; this tile's columns: 128 (tile - ts_e)
        first = tl.load(prog_ptr + 3 * P + p)  # the segment's first tile ts_e
        ntiles = tl.load(prog_ptr + 4 * P + p)  # t_e
        base = first.to(tl.int64) * 128 * C
        ld = 128 * ntiles.to(tl.int64)
        col0 = 128 * (tile - first)
        tl.store(qc_ptr + base + c[:, None].to(tl.int64) * ld + col0 + r[None, :], qc, mask=cmask[:, None])
        tl.store(sc_ptr + tile.to(tl.int64) * C + c, sc, mask=cmask)


# Two compilations of each quantizer: "fast" (Triton's default specialization: integer arguments
# divisible by 16 get divisibility hints -> 16-byte vector loads/stores, layouts chosen for them)
# and "safe" (no specialization of the sizes and strides). The fused path verifies each new
# specialization against the PyTorch reference on first use and falls back fast -> safe ->
# PyTorch (checked.CheckedKernels): a miscompile costs speed, never correctness. (The one seen: an
# in-kernel transposed store of the weight blocks, wrong only in the fast build; see
# quantize_weight_dual.)
_DUAL_INT_ARGS = ["T", "C", "P", "stride_xm"]
# launch settings and the kernel's shape were chosen by measurement (benchmarks/RESULTS.md, "Sixth H200 run")
DUAL_LAUNCH = {"num_warps": 4}
_quant_dual_fast = triton.jit(_quant_dual_kernel)
_quant_dual_safe = triton.jit(_quant_dual_kernel, do_not_specialize=_DUAL_INT_ARGS)


def quantize_act_dual(x: torch.Tensor, tm: TileMap, pow2: bool = False, rows: bool = True,
                      cols: bool = True, variant: str = "fast") -> tuple[Fp8Tensor | None, SegmentsT | None]:
    """x [T, C] (CUDA, last dim contiguous) -> (1x128 quantization: data [T, C], scale [T, L]
    M-major; 128x1 quantization per segment of `tm`, transposed: `SegmentsT`). Either can be
    skipped (rows / cols False). One launch, one read of x. `variant`: "fast" or "safe" (the tiled
    kernel, `fp8_triton_act.quantize_act_tiled`), "v1" or "v1-safe" (the first kernel, below;
    "safe": see `_quant_dual_safe`)."""
    if variant in ("fast", "safe"):
        return quantize_act_tiled(x, tm, pow2, rows, cols, variant)
    if not (_on_device(x) and x.dim() == 2):
        raise ValueError(f"quantize_act_dual: needs a 2-D CUDA tensor, got {tuple(x.shape)} on {x.device}")
    if x.stride(1) != 1:
        x = x.contiguous()
    T, C = x.shape
    if T != sum(tm.sizes):
        raise ValueError(f"quantize_act_dual: {T} rows but the tile map covers {sum(tm.sizes)}")
    L = triton.cdiv(C, BLOCK)
    P = tm.n_tiles
    dev = x.device
    qr = _empty(T, C, dtype=E4M3, device=dev) if rows else None
    sr = _empty(L, T, dtype=torch.float32, device=dev) if rows else None
    qc = _empty(P * BLOCK * C, dtype=E4M3, device=dev) if cols else None
    sc = _empty(P, C, dtype=torch.float32, device=dev) if cols else None
    if P and (rows or cols):
        dummy = torch.empty(1, dtype=torch.float32, device=dev)
        kernel = {"v1": _quant_dual_fast, "v1-safe": _quant_dual_safe}[variant]
        kernel[(P, L)](x, qr if rows else dummy, sr if rows else dummy, qc if cols else dummy,
                                   sc if cols else dummy, tm.prog, T, C, P, x.stride(0), EPS_C=EPS, POW2=pow2,
                                   ROWS_OUT=rows, COLS_OUT=cols, **DUAL_LAUNCH)
    return (Fp8Tensor(qr, sr.t(), ACT) if rows else None), (SegmentsT(qc, sc, C) if cols else None)


# ----------------------------------------------------------------------------------- 128x128 weights
def _quant_weight_kernel(w_ptr, q_ptr, qt_ptr, s_ptr, N, K, stride_we, stride_wn, n0, NT, nNT, nK,
                         EPS_C: tl.constexpr, POW2: tl.constexpr, T_MODE: tl.constexpr):
    """One 128x128 block of W_i [E, N, K] into the stack [E, NT, K] at row n0 (a multiple of 128).
    T_MODE: 0 W only; 1 also W^T [E, K, NT], the block's E4M3 codes transposed in registers; 2 also
    W^T, the block loaded a second time transposed (no register transpose) and quantized alike."""
    nb = tl.program_id(0)
    kb = tl.program_id(1)
    e = tl.program_id(2).to(tl.int64)
    r = nb * 128 + tl.arange(0, 128)
    c = kb * 128 + tl.arange(0, 128)
    mask = (r[:, None] < N) & (c[None, :] < K)
    r64 = r.to(tl.int64)  # int64 offsets: N * K may pass 2^31 (an output head, a big stacked W)
    w_base = w_ptr + e * stride_we
    w = tl.load(w_base + r64[:, None] * stride_wn + c[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0, keep_dims=True)  # [1]
    s = _scale_from_amax(amax, EPS_C, POW2)  # [1]
    q = _to_e4m3(w, s[:, None])  # [128 n, 128 k]
    rn = n0 + r64  # rows in the stack
    tl.store(q_ptr + e * NT * K + rn[:, None] * K + c[None, :], q, mask=mask)
    tl.store(s_ptr + e * nNT * nK + (n0 // 128 + nb) * nK + kb + tl.arange(0, 1), s)
    mask_t = (c[:, None] < K) & (r[None, :] < N)
    qt_ptrs = qt_ptr + e * K * NT + c[:, None].to(tl.int64) * NT + rn[None, :]  # [128 k, 128 n]
    if T_MODE == 1:
        tl.store(qt_ptrs, tl.trans(q.to(tl.uint8, bitcast=True)).to(tl.float8e4nv, bitcast=True), mask=mask_t)
    if T_MODE == 2:
        wt = tl.load(w_base + r64[None, :] * stride_wn + c[:, None], mask=mask_t, other=0.0).to(tl.float32)
        tl.store(qt_ptrs, _to_e4m3(wt, s[:, None]), mask=mask_t)


_WEIGHT_INT_ARGS = ["N", "K", "stride_we", "stride_wn", "n0", "NT", "nNT", "nK"]
_quant_weight_fast = triton.jit(_quant_weight_kernel)
_quant_weight_safe = triton.jit(_quant_weight_kernel, do_not_specialize=_WEIGHT_INT_ARGS)
# How the kernel writes W^T (T_MODE above): the second, transposed load (2) is bit-exact in both
# compilations; the register transpose (1) is faster but its fast build was seen to write wrong W^T
# bytes (the safe build was right); the "copy" variant writes W alone and transposes its bytes with
# PyTorch, a separate pass. Speeds and the probe: benchmarks/RESULTS.md and dev/LOG.md.
WEIGHT_LAUNCH = {"num_warps": 8, "T_MODE": 2}


def quantize_weight_dual(w, pow2: bool = False, transposed: bool = True, variant: str = "fast"
                         ) -> tuple[Fp8Tensor, Fp8Tensor | None]:
    """W [N, K] or stacked [E, N, K] (CUDA), or a list of such weights W_i [.., N_i, K] stacked along
    N (every N_i but the last a multiple of 128: `blocks.stackable`) -> (128x128 quantization of the
    stack [.., sum N_i, K], that of its transpose [.., K, sum N_i] (same values and scales) or
    None); each W_i is quantized exactly as alone. `variant`: "fast", "safe" (see
    `_quant_dual_safe`) or "copy" (W^T by a PyTorch transpose of W's bytes)."""
    weights = [w] if isinstance(w, torch.Tensor) else list(w)
    w0 = weights[0]
    if not all(_on_device(wi) and wi.dim() == w0.dim() and wi.dim() in (2, 3) for wi in weights):
        raise ValueError(f"quantize_weight_dual: needs 2-D or 3-D CUDA tensors, got "
                         f"{[(tuple(wi.shape), str(wi.device)) for wi in weights]}")
    w3s = [(wi if wi.dim() == 3 else wi.unsqueeze(0)) for wi in weights]
    w3s = [wi if wi.stride(2) == 1 else wi.contiguous() for wi in w3s]
    E, K = w3s[0].shape[0], w3s[0].shape[2]
    if any(wi.shape[0] != E or wi.shape[2] != K for wi in w3s) or any(wi.shape[1] % BLOCK for wi in w3s[:-1]):
        raise ValueError(f"quantize_weight_dual: cannot stack {[tuple(wi.shape) for wi in weights]}")
    NT = sum(wi.shape[1] for wi in w3s)
    nNT, nK = triton.cdiv(NT, BLOCK), triton.cdiv(K, BLOCK)
    t_mode = WEIGHT_LAUNCH["T_MODE"] if transposed and variant != "copy" else 0
    q = _empty(E, NT, K, dtype=E4M3, device=w0.device)
    s = _empty(E, nNT, nK, dtype=torch.float32, device=w0.device)
    qt = _empty(E, K, NT, dtype=E4M3, device=w0.device) if t_mode else None
    kernel = {"fast": _quant_weight_fast, "safe": _quant_weight_safe, "copy": _quant_weight_fast}[variant]
    n0 = 0
    for wi in w3s:
        N = wi.shape[1]
        if E * N * K:
            kernel[(triton.cdiv(N, BLOCK), nK, E)](wi, q, q if qt is None else qt, s, N, K, wi.stride(0), wi.stride(1),
                                                   n0, NT, nNT, nK, EPS_C=EPS, POW2=pow2, T_MODE=t_mode,
                                                   num_warps=WEIGHT_LAUNCH["num_warps"])
        n0 += N
    if transposed and qt is None:
        qt = q.transpose(1, 2).contiguous()  # [E, K, NT]
    return _weight_result(w0, q, qt, s, transposed)


def _weight_result(w, q, qt, s, transposed):
    if w.dim() == 2:
        q, s = q[0], s[0]
        qt = qt[0] if transposed else None
    wq = Fp8Tensor(q, s, WEIGHT)
    return wq, (Fp8Tensor(qt, s.transpose(-2, -1), WEIGHT) if transposed else None)


# ----------------------------------------------------------------------------------- grouped GEMMs
def _gemm_configs():
    cfgs = [triton.Config({"BN": bn, "GROUP_M": 8}, num_warps=w, num_stages=st)
            for bn, w, st in [(128, 8, 3), (128, 4, 4), (64, 4, 4), (256, 8, 3)]]
    return cfgs[:1] if _INTERPRET else cfgs


@triton.autotune(configs=_gemm_configs(), key=["N", "K"])
@triton.jit
def _grouped_gemm_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, prog_ptr, P, N, K,
                         stride_am, stride_sam, stride_sak, stride_be, stride_bn,
                         stride_sbe, stride_sbn, stride_sbk, stride_cm,
                         BN: tl.constexpr, GROUP_M: tl.constexpr):
    """out[rows of tile, :] = A[rows, :] B_e^T with A 1x128-scaled [T, K], B_e 128x128-scaled [N, K]."""
    pid = tl.program_id(0)
    n_n = tl.cdiv(N, BN)
    width = GROUP_M * n_n  # L2-friendly order: GROUP_M token tiles share a sweep over N
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(P - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    e = tl.load(prog_ptr + 5 * P + pid_m).to(tl.int64)  # the tile's segment (expert)
    row0 = tl.load(prog_ptr + P + pid_m).to(tl.int64)
    nrow = tl.load(prog_ptr + 2 * P + pid_m)
    rm = tl.arange(0, 128)
    rows = row0 + rm
    cols = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, 128)
    mmask = rm < nrow
    nmask = cols < N
    a_ptrs = a_ptr + rows[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + e * stride_be + cols[:, None].to(tl.int64) * stride_bn + rk[None, :]
    sa_ptrs = sa_ptr + rows * stride_sam
    sb_ptrs = sb_ptr + e * stride_sbe + (cols // 128) * stride_sbn
    acc = tl.zeros((128, BN), dtype=tl.float32)
    for kb in range(0, (K + 127) // 128):
        kmask = rk < K - kb * 128
        a = tl.load(a_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=nmask[:, None] & kmask[None, :], other=0.0)
        sa = tl.load(sa_ptrs + kb * stride_sak, mask=mmask, other=0.0)
        sb = tl.load(sb_ptrs + kb * stride_sbk, mask=nmask, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * sa[:, None] * sb[None, :]  # fp32 promotion every 128
        a_ptrs += 128
        b_ptrs += 128
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def grouped_gemm(a: Fp8Tensor, b: Fp8Tensor, tm: TileMap, out_dtype: torch.dtype) -> torch.Tensor:
    """out[T, N]: rows of segment e of a [T, K] (1x128) times b[e] [N, K] (128x128)^T, one launch."""
    if a.tile != ACT or b.tile != WEIGHT or b.data.dim() != 3:
        raise ValueError(f"grouped_gemm: needs 1x128 A [T, K] and 128x128 B [E, N, K], got {a.tile} and {b.tile}")
    T, K = a.data.shape
    E, N, Kb = b.data.shape
    if Kb != K or E != len(tm.sizes) or T != sum(tm.sizes):
        raise ValueError(f"grouped_gemm: shapes {tuple(a.data.shape)} x {tuple(b.data.shape)} vs {len(tm.sizes)} segments")
    if a.data.stride(1) != 1 or b.data.stride(2) != 1:
        raise ValueError("grouped_gemm: operands must be contiguous along K")
    out = _empty(T, N, dtype=out_dtype, device=a.data.device)
    P = tm.n_tiles
    if P == 0 or N == 0:
        return out
    sa, sb = a.scale, b.scale
    grid = lambda meta: (P * triton.cdiv(N, meta["BN"]),)  # noqa: E731
    _grouped_gemm_kernel[grid](a.data, sa, b.data, sb, out, tm.prog, P, N, K,
                               a.data.stride(0), sa.stride(0), sa.stride(1), b.data.stride(0), b.data.stride(1),
                               sb.stride(0), sb.stride(1), sb.stride(2), out.stride(0))
    return out


def _wgrad_configs():
    cfgs = [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=st)
            for bn, bk, w, st in [(128, 128, 8, 3), (128, 128, 4, 4), (64, 128, 4, 4), (128, 256, 8, 3)]]
    return cfgs[:1] if _INTERPRET else cfgs


@triton.autotune(configs=_wgrad_configs(), key=["N", "K"])
@triton.jit
def _grouped_wgrad_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, seg_ptr, E, N, K,
                          BN: tl.constexpr, BK: tl.constexpr):
    """dW[e] [N, K] = A_e [N, 128 t_e] B_e [K, 128 t_e]^T over the segment's token tiles, A and B in
    the `SegmentsT` layout (1x128 along tokens, i.e. 128x1 tiles of dy and x)."""
    pid = tl.program_id(0)
    e = tl.program_id(1)
    n_k = tl.cdiv(K, BK)
    pid_n = pid // n_k
    pid_k = pid % n_k
    first = tl.load(seg_ptr + 2 * E + e).to(tl.int64)  # first tile ts_e
    ntiles = tl.load(seg_ptr + 3 * E + e)  # t_e
    ld = tl.multiple_of(128 * ntiles.to(tl.int64), 128)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = pid_k * BK + tl.arange(0, BK)
    rt = tl.arange(0, 128)
    nmask = rn < N
    kmask = rk < K
    a_ptrs = a_ptr + first * 128 * N + rn[:, None].to(tl.int64) * ld + rt[None, :]
    b_ptrs = b_ptr + first * 128 * K + rk[:, None].to(tl.int64) * ld + rt[None, :]
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for j in range(0, ntiles):
        a = tl.load(a_ptrs, mask=nmask[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
        sa = tl.load(sa_ptr + (first + j) * N + rn, mask=nmask, other=0.0)
        sb = tl.load(sb_ptr + (first + j) * K + rk, mask=kmask, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * sa[:, None] * sb[None, :]
        a_ptrs += 128
        b_ptrs += 128
    tl.store(c_ptr + e.to(tl.int64) * N * K + rn[:, None].to(tl.int64) * K + rk[None, :], acc,
             mask=nmask[:, None] & kmask[None, :])


def grouped_wgrad(a: SegmentsT, b: SegmentsT, tm: TileMap) -> torch.Tensor:
    """dW [E, N, K] fp32 = per segment e: a_e [N, tokens] b_e [K, tokens]^T (`SegmentsT` layouts of
    dy and x); a segment without tokens gets zeros. One launch."""
    N, K, E = a.C, b.C, len(tm.sizes)
    out = _empty(E, N, K, dtype=torch.float32, device=a.data.device)
    if E == 0 or N == 0 or K == 0:
        return out
    grid = lambda meta: (triton.cdiv(N, meta["BN"]) * triton.cdiv(K, meta["BK"]), E)  # noqa: E731
    _grouped_wgrad_kernel[grid](a.data, a.scale, b.data, b.scale, out, tm.seg, E, N, K)
    return out


class TritonKernels:
    """The fused path's ops for `nanoseek.quant.fp8` (see `gemm.TorchKernels` for the reference)."""
    name = "triton"
    quantize_act_dual = staticmethod(quantize_act_dual)
    act_variants = ("fast", "safe", "v1-safe")  # the order the self-checks try them (checked.py)
    swiglu_quantize_dual = staticmethod(swiglu_quantize_dual)
    quantize_weight_dual = staticmethod(quantize_weight_dual)
    grouped_gemm = staticmethod(grouped_gemm)
    grouped_wgrad = staticmethod(grouped_wgrad)


KERNELS = TritonKernels()


__all__ = ["quantize_rows", "quantize_act_dual", "quantize_weight_dual", "grouped_gemm", "grouped_wgrad",
           "TritonKernels", "KERNELS", "sentinel_outputs"]
