"""FP8 training (nanoseek/quant/fp8.py): quantizers bit-exact against an independent float64
reference of the same formulas, emulated GEMM and layer gradients vs fp32 (SQNR), routed experts,
`convert` on `nano`, `train --precision fp8`, checkpoints of a converted model (HF and FP8)."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.quant import blocks, checked, fp8, gemm
from nanoseek.checkpoint import fp8_dequantize, fp8_quantize_blocks
from nanoseek.quant.blocks import ACT, COL, WEIGHT
from nanoseek.quant.checked import CheckedKernels, KernelRegistry, same_fp8, same_segments
from nanoseek.quant.fp8 import FP8Config, FP8Experts, FP8Linear, sqnr_db
from nanoseek.model import MLP, Experts




# ------------------------------------------------------------------ float64 reference
def _e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """Round float64 values (|v| <= 448) to the nearest E4M3 value, ties to even, without
    using torch's float8 cast: 3 mantissa bits, min normal exponent -6 (subnormal step 2^-9)."""
    a = v.abs()
    _, E = torch.frexp(a)  # a = m 2^E, m in [0.5, 1): floor(log2 a) = E - 1 (exact)
    e = torch.clamp(E - 1, min=-6)
    ulp = torch.full_like(a, 2.0) ** (e - 3).double()
    r = torch.round(a / ulp) * ulp  # a / ulp is exact (power-of-two divide); round = half to even
    return torch.where(a == 0, torch.zeros_like(a), torch.copysign(r, v))


def _fp32(t64: torch.Tensor) -> torch.Tensor:
    """Round float64 to float32 and back: where the formula computes in fp32."""
    return t64.float().double()


def reference_quantize(x: torch.Tensor, tile, pow2=False, eps=blocks.EPS):
    """The same formulas in float64 with explicit fp32 roundings: s = fp32(max(amax, eps) / 448),
    pow2: s = 2^ceil(log2 s), q = e4m3(clamp(fp32(x / s), +-448)). Returns (values, scales)."""
    tr, tc = tile
    R, C = x.shape
    nr, nc = math.ceil(R / tr), math.ceil(C / tc)
    x64 = x.double()
    q = torch.empty_like(x64)
    s_all = torch.empty(nr, nc, dtype=torch.float64)
    eps32 = torch.tensor(eps, dtype=torch.float32).double()
    for i in range(nr):
        for j in range(nc):
            blk = x64[i * tr:(i + 1) * tr, j * tc:(j + 1) * tc]
            amax = torch.maximum(blk.abs().max(), eps32)
            s = _fp32(amax / 448.0)
            if pow2:
                m, E = torch.frexp(s)
                s = torch.tensor(2.0, dtype=torch.float64) ** (E - 1 if m == 0.5 else E).double()
            s_all[i, j] = s
            q[i * tr:(i + 1) * tr, j * tc:(j + 1) * tc] = _e4m3_round(_fp32(blk / s).clamp(-448.0, 448.0))
    return q, s_all


def _hard_input(R, C, dtype=torch.float32, seed=0):
    """Gaussian data with the cases that matter: a zero tile, a lone outlier, exact-amax values,
    tiny (subnormal-after-scaling) and huge magnitudes, negative zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, C, generator=g)
    x[:, :3] *= 50.0  # outlier channels
    x[5, 7] = 3e4  # a lone huge value
    x[:128, 128:256] = 0.0 if C > 256 else x[:128, 128:256]  # a zero tile (when it exists)
    x[-1, :] = torch.linspace(-1e-6, 1e-6, C)  # below the eps floor: scale = eps / 448
    x[-2, :] *= 1e-3
    x[1, 1] = -0.0
    return x.to(dtype)


@pytest.mark.parametrize("tile", [ACT, WEIGHT, COL], ids=["1x128", "128x128", "128x1"])
@pytest.mark.parametrize("pow2", [False, True], ids=["fp32-scale", "pow2-scale"])
@pytest.mark.parametrize("shape,dtype", [((256, 384), torch.float32), ((300, 520), torch.float32),
                                         ((131, 77), torch.bfloat16)], ids=["aligned", "partial", "bf16-small"])
def test_quantize_bit_exact_vs_float64_reference(tile, pow2, shape, dtype):
    x = _hard_input(*shape, dtype=dtype)
    got = blocks.quantize(x, tile, pow2)
    ref_q, ref_s = reference_quantize(x.float(), tile, pow2)
    assert got.data.dtype == torch.float8_e4m3fn and got.data.shape == x.shape
    assert got.scale.dtype == torch.float32 and got.scale.shape == ref_s.shape
    assert torch.equal(got.scale.double(), ref_s)
    assert torch.equal(got.data.double(), ref_q)  # every FP8 value, bit for bit (up to the sign of zero)
    assert not torch.isnan(got.data.float()).any()
    if pow2:
        m, _ = torch.frexp(got.scale)
        assert (m == 0.5).all()


def test_quantizer_edge_cases():
    # zero tile -> zeros with the eps scale; 448-range values clamp, never NaN (a plain cast of >= 464 is NaN)
    x = torch.zeros(2, 256)
    x[1, :128] = torch.linspace(-1, 1, 128)
    q = blocks.quantize(x)
    assert torch.equal(q.data.float()[0], torch.zeros(256))
    assert q.scale[0, 0].item() == pytest.approx(blocks.EPS / 448, rel=1e-6)
    assert q.data.float()[1, :128].abs().max().item() == 448.0
    # round trip error of Gaussian data ~ E4M3's 3-bit mantissa (spec: ~2.6 % rms)
    g = torch.randn(512, 1024, generator=torch.Generator().manual_seed(1))
    for tile in (ACT, WEIGHT, COL):
        err = ((blocks.quantize(g, tile).dequantize() - g).norm() / g.norm()).item()
        assert 0.015 < err < 0.035, (tile, err)
    # 3-D weights (stacked experts): blocks never cross the leading dim
    w = torch.randn(3, 200, 130)
    q3 = blocks.quantize(w, WEIGHT)
    for e in range(3):
        qe = blocks.quantize(w[e], WEIGHT)
        assert torch.equal(q3.data[e].float(), qe.data.float()) and torch.equal(q3.scale[e], qe.scale)
    # the 1x128 transpose of x^T is the 128x1 quantization of x
    a = torch.randn(300, 200)
    c, t = blocks.quantize(a, COL), blocks.quantize(a.t(), ACT)
    assert torch.equal(c.data.float(), t.data.float().t()) and torch.equal(c.scale, t.scale.t())


def test_pow2_scales_make_retiling_lossless():
    """Report 3.3 / spec 4.4: with power-of-two scales, re-tiling the 1x128 FP8 copy into 128x1
    tiles changes no value (so caching only one copy is exact); with fp32 scales it does."""
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(2)).bfloat16().float()
    row = blocks.quantize(x, ACT, pow2=True).dequantize()
    retiled = blocks.quantize(row, COL, pow2=True).dequantize()
    assert torch.equal(row, retiled)


def test_weight_quantizer_matches_checkpoint_format():
    """Training's 128x128 weight blocks are the checkpoint's weight_scale_inv blocks (same
    formula; the epsilons differ only for blocks with amax < 1e-4)."""
    w = torch.randn(300, 260) * 0.02
    q = blocks.quantize(w, WEIGHT)
    w8, s = fp8_quantize_blocks(w)
    assert torch.equal(q.scale, s) and torch.equal(q.data.float(), w8.float())
    assert torch.equal(q.dequantize(), fp8_dequantize(w8, s))


# ------------------------------------------------------------------ GEMMs
@pytest.mark.parametrize("M,N,K", [(256, 384, 512), (200, 300, 328)])
def test_emulated_gemm_sqnr(M, N, K):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    ref = a.double() @ b.double().t()
    for ta, tb in [(ACT, WEIGHT), (ACT, ACT)]:  # Fprop/Dgrad ("1D2D") and Wgrad ("1D1D")
        qa, qb = blocks.quantize(a, ta), blocks.quantize(b, tb)
        out = gemm.fp8_gemm(qa, qb, torch.float32)
        assert 25 <= sqnr_db(ref, out) < 32, (ta, tb, sqnr_db(ref, out))  # ~28.6 dB expected
        # the emulation is exact: the fp32 matmul of the dequantized operands
        exact = qa.dequantize().double() @ qb.dequantize().double().t()
        assert sqnr_db(exact, out) > 120


def test_gemm_into_out_rows():
    """fp8_gemm(out=...) writes the result into a slice of a bigger output (the per-expert loop's
    rows) and hands that slice back; a wrong shape or dtype is refused by name."""
    qa, qb = blocks.quantize(torch.randn(70, 256), ACT), blocks.quantize(torch.randn(130, 256), WEIGHT)
    full = torch.full((100, 130), float("nan"))
    got = gemm.fp8_gemm(qa, qb, torch.float32, out=full[20:90])
    assert got.data_ptr() == full[20:90].data_ptr()
    assert torch.equal(full[20:90], gemm.fp8_gemm(qa, qb, torch.float32))
    assert torch.isnan(full[:20]).all() and torch.isnan(full[90:]).all()
    with pytest.raises(ValueError, match=r"fp8_gemm: out \(70, 129\)"):
        gemm.fp8_gemm(qa, qb, torch.float32, out=torch.empty(70, 129))
    with pytest.raises(ValueError, match="bfloat16"):
        gemm.fp8_gemm(qa, qb, torch.float32, out=torch.empty(70, 130, dtype=torch.bfloat16))


@pytest.mark.parametrize("M,N,K", [(200, 264, 328), (7, 130, 1408)])
def test_scaled_mm_operand_padding_is_exact(M, N, K):
    """The CUDA path zero-pads operands (M, N to 16; K to 128, or 512 with a 128x128 operand, and
    the scales with ones to match); checked here on the emulation: same GEMM after cropping."""
    from nanoseek.quant.gemm import pad_k, pad_rows, round_up
    a, b = torch.randn(M, K), torch.randn(N, K)
    for ta, tb in [(ACT, WEIGHT), (ACT, ACT), (WEIGHT, ACT)]:
        qa, qb = blocks.quantize(a, ta), blocks.quantize(b, tb)
        Kp = round_up(K, 512 if WEIGHT in (ta, tb) else 128)
        pa, pb = pad_k(pad_rows(qa, round_up(M, 16)), Kp), pad_k(pad_rows(qb, round_up(N, 16)), Kp)
        assert pa.scale.shape[1] == Kp // ta[1] and pb.scale.shape[1] == Kp // tb[1]
        assert torch.allclose(gemm.fp8_gemm(pa, pb)[:M, :N], gemm.fp8_gemm(qa, qb), rtol=1e-5, atol=1e-4)


def test_fp8_linear_forward_and_grads_vs_fp32():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 96, 320, generator=g)  # 3-D input, K not a multiple of 128
    w = torch.randn(264, 320, generator=g) * 0.05
    dy = torch.randn(4, 96, 264, generator=g)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    (xr @ wr.t()).backward(dy)
    results = {}
    for cache in (True, False):
        xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8.fp8_linear(xf, wf, FP8Config(cache_fp8=cache))
        y.backward(dy)
        assert y.dtype == torch.float32 and xf.grad.shape == x.shape and wf.grad.dtype == torch.float32
        assert sqnr_db(x @ w.t(), y) >= 25
        assert sqnr_db(xr.grad, xf.grad) >= 25
        assert sqnr_db(wr.grad, wf.grad) >= 25
        results[cache] = (y, xf.grad, wf.grad)
    # caching the FP8 128x1 copy is exactly the same computation as quantizing in the backward
    for t0, t1 in zip(results[True], results[False]):
        assert torch.equal(t0, t1)


def test_fp8_linear_module_autocast_and_bias():
    torch.manual_seed(5)
    lin = nn.Linear(256, 128, bias=True)
    ref = nn.Linear(256, 128, bias=True)
    ref.load_state_dict(lin.state_dict())
    lin.__class__ = FP8Linear
    x = torch.randn(64, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    ref(x).sum().backward()
    assert lin.weight.grad.dtype == torch.float32
    assert sqnr_db(ref(x), y.float()) >= 25
    assert sqnr_db(ref.weight.grad, lin.weight.grad) >= 25
    assert sqnr_db(ref.bias.grad, lin.bias.grad) >= 40


def test_fp8_experts_vs_fp32():
    torch.manual_seed(6)
    E, h, inter, N, k = 6, 192, 160, 150, 2
    ref = Experts(E, h, inter)
    for p in ref.parameters():
        nn.init.normal_(p, 0.0, 0.05)
    ex = Experts(E, h, inter)
    ex.load_state_dict(ref.state_dict())
    ex.__class__ = FP8Experts
    x = torch.randn(N, h)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    idx[:, 0] = torch.where(idx[:, 0] == E - 1, 0, idx[:, 0])  # expert E-1 gets fewer tokens
    wts = torch.rand(N, k)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yf = ref(xr, idx, wts), ex(xf, idx, wts)
    dy = torch.randn_like(yr)
    yr.backward(dy)
    yf.backward(dy)
    # a SwiGLU block is three FP8 GEMMs in a row (the errors add up): >= 20 dB (measured ~24)
    assert sqnr_db(yr, yf) >= 20
    assert sqnr_db(xr.grad, xf.grad) >= 20
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert sqnr_db(getattr(ref, name).grad, getattr(ex, name).grad) >= 20, name
    # the grouped function is exactly the per-expert loop of the FP8 Linear over sorted segments
    order = idx.reshape(-1).argsort(stable=True)
    xs = x[order // k]
    counts = torch.bincount(idx.reshape(-1), minlength=E).tolist()
    got = fp8.fp8_grouped_linear(xs, ex.gate_proj.detach(), counts)
    loop = torch.cat([fp8.fp8_linear(seg, ex.gate_proj[e].detach()) for e, seg in enumerate(xs.split(counts)) if len(seg)])
    assert torch.equal(got, loop)
    # an expert no token chose gets a zero gradient, not garbage
    idx0 = torch.randint(0, E - 1, (N, k))
    ex.zero_grad()
    ex(x, idx0, wts).sum().backward()
    assert torch.equal(ex.gate_proj.grad[E - 1], torch.zeros(inter, h))


# ------------------------------------------------------------------ fused path (reference ops on CPU)
def test_tile_map_segments_never_share_a_tile():
    tm = blocks.tile_map([0, 130, 5, 256, 0, 77], "cpu")
    assert tm.n_tiles == 0 + 2 + 1 + 2 + 0 + 1 and tm.tile_starts == [0, 0, 2, 3, 5, 5]
    idx, row0, nrow, first, ntiles, seg = tm.prog.tolist()
    assert idx == list(range(6)) and seg == [1, 1, 2, 3, 3, 5]
    assert row0 == [0, 128, 130, 135, 263, 391] and nrow == [128, 2, 5, 128, 128, 77]
    assert first == [0, 0, 2, 3, 3, 5] and ntiles == [2, 2, 1, 2, 2, 1]
    assert tm.seg.tolist() == [[0, 0, 130, 135, 391, 391], [0, 130, 5, 256, 0, 77], [0, 0, 2, 3, 5, 5],
                               [0, 2, 1, 2, 0, 1]]
    assert blocks.dense_tile_map(300, "cpu").sizes == [300]


@pytest.mark.parametrize("pow2", [False, True], ids=["fp32-scale", "pow2-scale"])
def test_fused_layouts_equal_the_per_op_quantizers(pow2):
    """The fused path's layouts (what the Triton kernels write) hold exactly the per-op values:
    1x128 rows; per segment the 128x1 tiles, transposed and zero-padded to whole tiles; W and W^T."""
    sizes = [0, 130, 5, 256, 0, 77]
    x = _hard_input(sum(sizes), 200, seed=7)
    tm = blocks.tile_map(sizes, "cpu")
    row, col = gemm.TORCH_KERNELS.quantize_act_dual(x, tm, pow2)
    ref = blocks.quantize(x, ACT, pow2)
    assert torch.equal(row.data.float(), ref.data.float()) and torch.equal(row.scale, ref.scale)
    assert row.scale.stride() == (1, x.shape[0])  # M-major, what _scaled_mm wants
    assert col.data.numel() == tm.n_tiles * 128 * 200 and col.scale.shape == (tm.n_tiles, 200)
    start = 0
    for e, n in enumerate(sizes):
        if n:
            seg = col.segment(tm, e)
            want = blocks.quantize(x[start:start + n].t(), ACT, pow2)  # == 128x1 tiles of the segment
            assert seg.data.shape == (200, math.ceil(n / 128) * 128)
            assert torch.equal(seg.data[:, :n].float(), want.data.float()) and torch.equal(seg.scale, want.scale)
            assert not seg.data[:, n:].float().any()
        start += n
    w = torch.randn(3, 200, 300) * 0.02
    wq, wqt = gemm.TORCH_KERNELS.quantize_weight_dual(w, pow2)
    assert torch.equal(wqt.data.float(), wq.data.float().transpose(-2, -1))
    assert torch.equal(wqt.dequantize(), wq.dequantize().transpose(-2, -1))


def test_fused_path_linear_equals_per_op_path():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 150, 320, generator=g)
    w = torch.randn(264, 320, generator=g) * 0.05
    dy = torch.randn(2, 150, 264, generator=g)
    out = {}
    for kernels in ("off", "torch"):
        for cache in (True, False):
            xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
            y = fp8.fp8_linear(xf, wf, FP8Config(kernels=kernels, cache_fp8=cache))
            y.backward(dy)
            out[kernels, cache] = (y, xf.grad, wf.grad)
    for cache in (True, False):
        (y0, dx0, dw0), (y1, dx1, dw1) = out["off", cache], out["torch", cache]
        assert torch.equal(y0, y1) and torch.equal(dx0, dx1)  # same FP8 operands, same GEMM
        assert sqnr_db(dw0, dw1) > 100  # Wgrad: same operands plus zero padding along tokens
    with pytest.raises(RuntimeError, match="needs CUDA tensors and Triton"):
        fp8.fp8_linear(x, w, FP8Config(kernels="triton"))
    with pytest.raises(ValueError, match="unknown value"):
        fp8.fp8_linear(x, w, FP8Config(kernels="fast"))
    with pytest.raises(ValueError, match="grouped: unknown value"):
        FP8Config(grouped="fast")


@pytest.mark.parametrize("kernels", ["off", "torch"])
def test_stacked_gate_and_up_equal_separate_gemms(kernels):
    """Weights stacked along N (SwiGLU's gate and up) run as one GEMM per pass: the same outputs
    and weight gradients as separate GEMMs (each weight quantized alone: N of all but the last a
    multiple of 128), and the input gradient as one GEMM instead of a sum of two; for the Linear,
    the grouped experts and the MLP after `convert`."""
    g = torch.Generator().manual_seed(10)
    cfg = FP8Config(kernels=kernels)
    x = torch.randn(2, 70, 320, generator=g)
    wg, wu = torch.randn(256, 320, generator=g) * 0.05, torch.randn(200, 320, generator=g) * 0.05
    dy = torch.randn(2, 70, 456, generator=g)
    runs = []
    for stacked in (True, False):
        xf, a, b = (t.clone().requires_grad_() for t in (x, wg, wu))
        y = fp8.fp8_linear(xf, [a, b], cfg) if stacked else torch.cat([fp8.fp8_linear(xf, a, cfg),
                                                                       fp8.fp8_linear(xf, b, cfg)], -1)
        y.backward(dy)
        runs.append((y, xf.grad, a.grad, b.grad))
    for t0, t1 in zip(*runs):
        assert sqnr_db(t1, t0) > 100
    with pytest.raises(ValueError, match="cannot share one GEMM"):
        fp8.fp8_linear(x, [wu, wg], cfg)  # 200 rows first: a 128x128 block would span both
    # one weight frozen: no gradient for it, the same one for the other
    a, b = wg.clone().requires_grad_(), wu.clone()
    fp8.fp8_linear(x, [a, b], cfg).backward(dy)
    assert b.grad is None and sqnr_db(runs[1][2], a.grad) > 100
    # grouped experts: 4 experts, one without tokens
    E, h, inter = 4, 192, 256
    W = [torch.randn(E, inter, h, generator=g) * 0.05 for _ in range(2)]
    sizes = [40, 0, 130, 7]
    xs = torch.randn(sum(sizes), h, generator=g)
    dys = torch.randn(sum(sizes), 2 * inter, generator=g)
    runs = []
    for stacked in (True, False):
        xf, a, b = (t.clone().requires_grad_() for t in (xs, *W))
        lin = lambda w: fp8.fp8_grouped_linear(xf, w, sizes, cfg)  # noqa: E731
        y = lin([a, b]) if stacked else torch.cat([lin(a), lin(b)], -1)
        y.backward(dys)
        runs.append((y, xf.grad, a.grad, b.grad))
    for t0, t1 in zip(*runs):
        assert sqnr_db(t1, t0) > 100
    assert torch.equal(runs[0][2][1], torch.zeros(inter, h))
    # the SwiGLU MLP: `convert` makes it an FP8MLP whose stacked path equals its children's forward
    torch.manual_seed(11)
    mlp = nn.Sequential(MLP(320, 256))
    fp8.convert(mlp, cfg)
    assert isinstance(mlp[0], fp8.FP8MLP) and isinstance(mlp[0].gate_proj, FP8Linear)
    grads = []
    for forward in (mlp[0].forward, lambda t: MLP.forward(mlp[0], t)):
        mlp.zero_grad()
        xf = x.clone().requires_grad_()
        y = forward(xf)
        y.backward(torch.ones_like(y))
        grads.append([y, xf.grad] + [p.grad.clone() for p in mlp.parameters()])
    for t0, t1 in zip(*grads):
        assert sqnr_db(t1, t0) > 100


def test_fused_path_experts_equal_per_op_path():
    torch.manual_seed(9)
    E, h, inter, N, k = 6, 192, 160, 150, 2
    ex = Experts(E, h, inter)
    for p in ex.parameters():
        nn.init.normal_(p, 0.0, 0.05)
    ex.__class__ = FP8Experts
    x = torch.randn(N, h)
    idx = torch.randint(0, E - 1, (N, k))  # expert E-1: no tokens
    wts = torch.rand(N, k)
    dy = torch.randn(N, h)
    res = {}
    for kernels in ("off", "torch"):
        ex.fp8_config = FP8Config(kernels=kernels)
        ex.zero_grad()
        xf = x.clone().requires_grad_()
        y = ex(xf, idx, wts)
        y.backward(dy)
        res[kernels] = [y, xf.grad] + [getattr(ex, n).grad.clone() for n in ("gate_proj", "up_proj", "down_proj")]
    for a, b in zip(res["off"], res["torch"]):
        assert sqnr_db(a, b) > 100
    assert torch.equal(res["torch"][2][E - 1], torch.zeros(inter, h))
    with pytest.raises(RuntimeError, match="grouped='triton'"):
        ex.fp8_config = FP8Config(kernels="torch", grouped="triton")
        ex(x, idx, wts)


def _grouped_case(K: int):
    """Three experts (70, 0 and 200 tokens) of width 128 at depth K: tile map, quantized operands
    and the PyTorch reference grouped GEMM."""
    tm = blocks.tile_map([70, 0, 200], "cpu")
    xq, _ = gemm.TORCH_KERNELS.quantize_act_dual(torch.randn(270, K), tm, cols=False)
    wq, _ = gemm.TORCH_KERNELS.quantize_weight_dual(torch.randn(3, 128, K), transposed=False)
    return tm, xq, wq, gemm.TORCH_KERNELS.grouped_gemm(xq, wq, tm, torch.float32)


def _fake_grouped(change):
    """A stand-in for the Triton grouped kernel: the per-expert loop's output passed through
    change(out, b, call number)."""
    class Fake:
        name = "triton"
        calls = 0

        @classmethod
        def grouped_gemm(cls, a, b, tm, out_dtype):
            cls.calls += 1
            return change(gemm.TORCH_KERNELS.grouped_gemm(a, b, tm, out_dtype), b, cls.calls)
    return Fake


@pytest.fixture
def registry():
    """A fresh kernel registry: the checks of one test, seen by that test alone."""
    return KernelRegistry(check_every=False)


def _checked(kern, registry):
    """`kern` behind the self-checks against the PyTorch reference, recorded in `registry`."""
    return CheckedKernels(kern, gemm.TORCH_KERNELS, registry)


def test_grouped_kernel_self_check_falls_back_to_the_loop(registry):
    """A grouped GEMM kernel that disagrees with the per-expert loop on its first call is replaced
    by the loop (with a warning), as torch._scaled_mm's self-check does."""
    Wrong = _checked(_fake_grouped(lambda out, b, call: 2 * out), registry)

    tm, xq, wq, ref = _grouped_case(256)
    with pytest.warns(UserWarning, match="disagrees with the per-expert loop"):
        out = Wrong.grouped("fprop", xq, wq, tm, torch.float32)
    assert torch.equal(out, ref) and "fprop" in registry.report().grouped_fallbacks
    assert torch.equal(Wrong.grouped("fprop", xq, wq, tm, torch.float32), ref)


def test_grouped_kernel_that_fails_to_build_falls_back_to_the_loop(registry):
    """A grouped kernel that raises on its first call at a shape (a GPU without E4M3 support in the
    compiler) is replaced by the loop for that use, with a warning; the step goes on."""
    def no_build(out, b, call):
        raise RuntimeError("fp8e4nv data type is not supported on CUDA arch < 89")
    tm, xq, wq, ref = _grouped_case(256)
    with pytest.warns(UserWarning, match="grouped dgrad GEMM failed"):
        out = _checked(_fake_grouped(no_build), registry).grouped("dgrad", xq, wq, tm, torch.float32)
    assert torch.equal(out, ref) and "arch < 89" in registry.report().grouped_fallbacks["dgrad"]


def test_grouped_kernel_self_check_catches_nan_and_checks_each_shape(registry):
    """A non-finite grouped result fails the check; a kernel checked at one (N, K) is checked
    again at a new one (specializations and autotuning differ per shape)."""
    def nan_on_big(out, b, call):
        if b.data.shape[-1] >= 256:
            out[0, 0] = float("nan")
        return out
    NanOnBig = _checked(_fake_grouped(nan_on_big), registry)

    for K in (128, 256):
        tm, xq, wq, ref = _grouped_case(K)
        if K == 128:
            assert torch.equal(NanOnBig.grouped("dgrad", xq, wq, tm, torch.float32), ref)
            assert not registry.report().grouped_fallbacks
        else:
            with pytest.warns(UserWarning, match="disagrees with the per-expert loop"):
                out = NanOnBig.grouped("dgrad", xq, wq, tm, torch.float32)
            assert torch.equal(out, ref) and "dgrad" in registry.report().grouped_fallbacks


def test_grouped_self_check_is_per_row(registry):
    """One wrong token tile among many rows fails the check although the whole-output relative
    error stays under the threshold (the check compares every output row)."""
    tm = blocks.tile_map([70, 0, 200 + 128 * 60], "cpu")
    T = sum(tm.sizes)
    xq, _ = gemm.TORCH_KERNELS.quantize_act_dual(torch.randn(T, 128), tm, cols=False)
    wq, _ = gemm.TORCH_KERNELS.quantize_weight_dual(torch.randn(3, 128, 128), transposed=False)
    ref = gemm.TORCH_KERNELS.grouped_gemm(xq, wq, tm, torch.float32)

    def one_tile_off(out, b, call):
        out[:70] *= 1.05  # the first expert's only tile, 5 % off
        return out
    OneTileOff = _fake_grouped(one_tile_off)

    wrong = OneTileOff.grouped_gemm(xq, wq, tm, torch.float32)
    assert ((wrong - ref).norm() / ref.norm()).item() < 1e-2  # a whole-output norm would pass it
    with pytest.warns(UserWarning, match="disagrees with the per-expert loop"):
        out = _checked(OneTileOff, registry).grouped("fprop", xq, wq, tm, torch.float32)
    assert torch.equal(out, ref)


def test_check_every_call_logs_and_corrects_a_later_disagreement():
    """NANOSEEK_FP8_CHECK=every: a grouped kernel right on its first call and wrong on a later one
    is caught there (logged in the registry's mismatch log with the segment sizes) and the reference is used."""
    registry = KernelRegistry(check_every=True)

    WrongOnSecondCall = _checked(_fake_grouped(lambda out, b, call: out if call == 1 else out + 1), registry)

    tm, xq, wq, ref = _grouped_case(256)
    assert torch.equal(WrongOnSecondCall.grouped("fprop", xq, wq, tm, torch.float32), ref)
    assert not registry.report().mismatch_log
    assert torch.equal(WrongOnSecondCall.grouped("fprop", xq, wq, tm, torch.float32), ref)
    log = registry.report().mismatch_log
    assert len(log) == 1 and log[0]["sizes"] == [70, 0, 200]
    assert "fprop" not in registry.report().grouped_fallbacks  # logged per call; the kernel stays in use


class _FakeTriton:
    """Stands in for nanoseek.quant.fp8_triton.KERNELS: the PyTorch reference, corrupted for the
    variants listed in `bad` (W^T's first byte, or a NaN row-scale), to test `CheckedKernels`."""
    name = "triton"

    def __init__(self, bad):
        self.bad, self.calls = set(bad), []

    def quantize_act_dual(self, x, tm, pow2=False, rows=True, cols=True, variant="fast"):
        self.calls.append(("act", variant))
        r, c = gemm.TORCH_KERNELS.quantize_act_dual(x, tm, pow2, rows, cols)
        if variant in self.bad and r is not None:
            sc = r.scale.clone()
            sc[0, 0] = float("nan")
            r = blocks.Fp8Tensor(r.data, sc, r.tile)
        return r, c

    def quantize_weight_dual(self, w, pow2=False, transposed=True, variant="fast"):
        self.calls.append(("weight", variant))
        wq, wqt = gemm.TORCH_KERNELS.quantize_weight_dual(w, pow2, transposed)
        if variant in self.bad and wqt is not None:
            data = wqt.data.clone()
            data.view(torch.uint8).view(-1)[0] = 0x7F  # NaN: an unwritten byte
            wqt = blocks.Fp8Tensor(data, wqt.scale, wqt.tile)
        return wq, wqt


@pytest.mark.parametrize("bad, expect, expect_w", [((), "fast", "fast"), (("fast",), "safe", "safe"),
                                                   (("fast", "safe"), "torch", "copy"),
                                                   (("fast", "safe", "copy"), "torch", "torch")])
def test_checked_quantizers_fall_back_per_specialization(registry, bad, expect, expect_w):
    """Every new quantizer specialization is compared bit for bit with the PyTorch reference on
    first use: the fast kernel, else the unspecialized one, else (weights) the kernel without its
    in-kernel transpose, else the PyTorch quantizer (with a warning) is used from then on; the
    result handed back is always the reference's values."""
    fake = _FakeTriton(bad)
    kern = _checked(fake, registry)
    w = torch.randn(256, 384) * 0.02
    ref_w, ref_wt = gemm.TORCH_KERNELS.quantize_weight_dual(w)
    x = torch.randn(300, 256)
    tm = blocks.tile_map([300], "cpu")
    ref_r, ref_c = gemm.TORCH_KERNELS.quantize_act_dual(x, tm)
    import warnings as _w
    with _w.catch_warnings(record=True) as rec:
        _w.simplefilter("always")
        for _ in range(2):
            wq, wqt = kern.quantize_weight_dual(w)
            assert same_fp8(wq, ref_w) and same_fp8(wqt, ref_wt)
            r, c = kern.quantize_act_dual(x, tm)
            assert same_fp8(r, ref_r) and same_segments(c, ref_c)
    assert {k[0]: v for k, v in registry.report().quantizers.items()} == {"quantize_weight_dual": expect_w,
                                                               "quantize_act_dual": expect}
    assert (len(rec) > 0) == bool(bad)
    # after the first call per specialization only the chosen variant runs (no reference)
    n = len(fake.calls)
    kern.quantize_weight_dual(w)
    assert fake.calls[n:] == ([] if expect_w == "torch" else [("weight", expect_w)])
    # a new specialization (sizes not multiples of 16) is checked again
    with _w.catch_warnings():
        _w.simplefilter("ignore")
        kern.quantize_weight_dual(torch.randn(200, 328))
    assert len(registry.report().quantizers) == 3


def test_check_every_call_catches_a_quantizer_that_goes_wrong_later():
    """NANOSEEK_FP8_CHECK=every: after the first-use choice, each call still runs the reference;
    a later disagreement is logged and the reference's values are handed back."""
    registry = KernelRegistry(check_every=True)
    fake = _FakeTriton(())
    kern = _checked(fake, registry)
    w = torch.randn(256, 384) * 0.02
    ref_w, ref_wt = gemm.TORCH_KERNELS.quantize_weight_dual(w)
    kern.quantize_weight_dual(w)
    assert registry.report().quantizers and not registry.report().mismatch_log
    fake.bad = {"fast"}  # the chosen kernel now writes a wrong W^T byte
    wq, wqt = kern.quantize_weight_dual(w)
    assert same_fp8(wq, ref_w) and same_fp8(wqt, ref_wt)
    assert [e["op"] for e in registry.report().mismatch_log] == ["quantize_weight_dual"]

# ------------------------------------------------------------------ convert
def test_convert_nano_every_eligible_layer():
    cfg = ModelConfig.from_preset("nano")
    model = DeepSeekV3.from_config(cfg, seed=0)
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    converted, skipped = fp8.convert(model)
    assert list(model.state_dict()) == keys  # HF layout untouched
    assert all(p is params[n] for n, p in model.named_parameters())  # same parameter objects
    skipped_names = {n for n, _ in skipped}
    expected = []
    for name, m in model.named_modules():
        if isinstance(m, Experts):
            assert isinstance(m, FP8Experts), name
            expected.append(name)
        elif isinstance(m, nn.Linear):
            if name == "lm_head" or name.endswith("eh_proj"):
                assert type(m) is nn.Linear and name in skipped_names, name
            else:
                assert isinstance(m, FP8Linear), name
                expected.append(name)
    assert converted == expected
    # nano: 4 layers x 5 attention projections, 1 dense MLP (3), 3 MoE layers x (experts + 3 shared), MTP layer 5 + 4
    assert len(converted) == 4 * 5 + 3 + 3 * 4 + 5 + 4 == 44
    reasons = dict(skipped)
    assert "embedding" in reasons["model.embed_tokens"] and "head" in reasons["lm_head"]
    assert "router" in reasons["model.layers.1.mlp.gate"] and "eh_proj" in reasons["mtp.4.eh_proj"]
    assert "norm" in reasons["model.norm"] and "attention core" in reasons["model.layers.0.self_attn"]
    assert fp8.convert(model)[0] == converted  # idempotent
    report = fp8.format_report(converted, skipped)
    assert "44 modules converted" in report and "lm_head" in report


def test_convert_module_filter_keeps_what_it_rejects():
    """`module_filter_fn(module, fqn)` decides per eligible Linear / Experts: the rejected ones stay
    in high precision, listed as skipped; without it every eligible module converts."""
    cfg = ModelConfig.from_preset("nano")
    model = DeepSeekV3.from_config(cfg, seed=0)
    everything = fp8.convert(DeepSeekV3.from_config(cfg, seed=0))[0]
    converted, skipped = fp8.convert(model, module_filter_fn=lambda m, fqn: not fqn.startswith("mtp."))
    assert converted == [n for n in everything if not n.startswith("mtp.")]
    filtered = [n for n, why in skipped if "module_filter_fn" in why]
    assert filtered == [n for n in everything if n.startswith("mtp.")] and filtered
    assert all(type(model.get_submodule(n)) in (nn.Linear, Experts) for n in filtered)


def test_kernel_registry_reports_and_resets(registry):
    """The registry's public face: what each check chose and what disagreed, until `reset`."""
    Wrong = _checked(_fake_grouped(lambda out, b, call: 2 * out), registry)
    tm, xq, wq, ref = _grouped_case(128)
    with pytest.warns(UserWarning):
        Wrong.grouped("fprop", xq, wq, tm, torch.float32)
    kern = _checked(_FakeTriton(()), registry)
    kern.quantize_weight_dual(torch.randn(256, 384))
    rep = registry.report()
    assert list(rep.grouped_fallbacks) == ["fprop"] and "vs the per-expert loop" in rep.grouped_fallbacks["fprop"]
    assert [v for v in rep.quantizers.values()] == ["fast"] and not rep.quantizer_fallbacks
    assert rep.mismatches == 0 and not rep.mismatch_log and not rep.check_every
    rep.quantizers.clear()  # a snapshot: changing it changes nothing in the registry
    assert registry.report().quantizers
    registry.reset()
    rep = registry.report()
    assert not (rep.quantizers or rep.grouped_fallbacks or rep.grouped_checked or rep.scaled_mm_checked)


def test_converted_model_trains_and_checkpoints(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("nano", vocab_size=512, num_hidden_layers=2)
    ref = DeepSeekV3.from_config(cfg, seed=0)
    model = DeepSeekV3.from_config(cfg, seed=0)
    fp8.convert(model)
    x = torch.randint(0, cfg.vocab_size, (2, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in model.named_parameters()
               if not n.startswith("mtp.") and "e_score" not in n)
    # HF layout save of the converted model == the unconverted one; reload gives the same weights
    model.save_pretrained(str(tmp_path / "hf"))
    back = DeepSeekV3.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    # FP8 export in the official layout loads back in nanoseek: FP8 weights are exactly our 128x128 blocks
    model.save_pretrained(str(tmp_path / "fp8"), fp8=True)
    conf = json.load(open(tmp_path / "fp8" / "config.json"))
    assert conf["quantization_config"]["weight_block_size"] == [128, 128]
    m8 = DeepSeekV3.from_pretrained(str(tmp_path / "fp8"), dtype=torch.float32)
    w = model.model.layers["0"].self_attn.q_b_proj.weight.detach()
    assert torch.equal(m8.model.layers["0"].self_attn.q_b_proj.weight, blocks.quantize(w, WEIGHT).dequantize())
    e = model.model.layers["1"].mlp.experts.down_proj.detach()
    assert torch.equal(m8.model.layers["1"].mlp.experts.down_proj, blocks.quantize(e, WEIGHT).dequantize())
    assert torch.equal(m8.lm_head.weight, model.lm_head.weight)  # the head stays high precision
    with torch.no_grad():
        assert sqnr_db(ref(x), m8(x)) > 15  # FP8 weights, fp32 compute: close to the original model


# ------------------------------------------------------------------ training


TINY = ["--batch-size", "4", "--seq-len", "32", "--vocab-size", "512", "--eval-batches", "2", "--no-progress"]


def test_cli_train_fp8_tracks_fp32(tmp_path, text_file):
    """`train --precision fp8` (with the fused path's layouts, `--fp8-kernels torch`) tracks fp32."""
    outs = {}
    for prec in ("fp32", "fp8"):
        kernels = ["--fp8-kernels", "torch"] if prec == "fp8" else []
        p = subprocess.run([sys.executable, "-m", "nanoseek", "train", "--preset", "nano", "--data", text_file,
                            "--max-steps", "6", "--out", str(tmp_path / prec), "--precision", prec, "--json", *TINY,
                            *kernels],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        outs[prec] = (p.stdout, json.loads(p.stdout.strip().splitlines()[-1]))
    stdout, res = outs["fp8"]
    assert "fp8: 44 modules converted" in stdout and "kept in high precision" in stdout and "lm_head" in stdout
    assert res["precision"] == "fp8" and res["skipped_steps"] == 0 and math.isfinite(res["loss"])
    ref = outs["fp32"][1]
    assert abs(res["loss"] - ref["loss"]) / ref["loss"] < 0.02, (res["loss"], ref["loss"])
    assert abs(res["val_loss"] - ref["val_loss"]) / ref["val_loss"] < 0.02
    # the run's final checkpoint is a normal HF-layout model
    DeepSeekV3.from_pretrained(str(tmp_path / "fp8"), dtype=torch.float32)


@pytest.mark.slow
def test_fp8_100_steps_tracks_fp32(tmp_path, text_file):
    from nanoseek.train import TrainArgs, train
    res = {}
    for prec in ("fp32", "fp8"):
        res[prec] = train(TrainArgs(data=[text_file], out=str(tmp_path / prec), preset="nano", max_steps=100,
                                    batch_size=8, seq_len=64, vocab_size=512, eval_every=50, eval_batches=4,
                                    precision=prec, progress=False, save=False))
    curves = {p: [json.loads(l) for l in open(tmp_path / p / "metrics.jsonl")] for p in res}
    tr = {p: [r["loss"] for r in c if "loss" in r] for p, c in curves.items()}
    # loss falls and tracks fp32 step by step (mean over windows of 10 steps)
    assert sum(tr["fp8"][-10:]) < sum(tr["fp8"][:10]) * 0.8
    for i in range(0, 100, 10):
        a, b = sum(tr["fp8"][i:i + 10]) / 10, sum(tr["fp32"][i:i + 10]) / 10
        assert abs(a - b) / b < 0.03, (i, a, b)
    assert abs(res["fp8"]["val_loss"] - res["fp32"]["val_loss"]) / res["fp32"]["val_loss"] < 0.02


# ------------------------------------------------------------------ GPU: real FP8 vs the emulation
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("M,N,K", [(256, 512, 1024), (200, 264, 328), (4096, 2048, 7168)])
def test_scaled_mm_matches_emulation(M, N, K):
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(M, K, device="cuda", generator=g, dtype=torch.bfloat16)
    b = torch.randn(N, K, device="cuda", generator=g, dtype=torch.bfloat16)
    for ta, tb in [(ACT, WEIGHT), (ACT, ACT)]:
        qa, qb = blocks.quantize(a, ta), blocks.quantize(b, tb)
        got = gemm.fp8_gemm(qa, qb, torch.float32, backend="scaled_mm")
        emu = gemm.fp8_gemm(qa, qb, torch.float32, backend="emulate")
        assert sqnr_db(emu, got) > 50, (ta, tb)
    assert not checked.REGISTRY.report().scaled_mm_fallbacks
