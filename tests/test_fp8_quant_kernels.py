"""The tiled FP8 activation quantizers and the producers they are fused into (SwiGLU, RMSNorm),
run by Triton's interpreter on CPU tensors: bit for bit the PyTorch reference (the producer's op in
its own dtype, then `blocks.quantize`), for both tilings, pow2 scales, partial tiles and segments,
strided inputs; the old kernels stay selectable and agree too. Skipped without Triton."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

# The kernels run on CPU tensors in Triton's interpreter, which must be chosen before Triton loads
# and for the whole process: `TRITON_INTERPRET=1 pytest tests/test_fp8_quant_kernels.py`. Setting it
# here would send every other test of the same process (the GPU ones too) through the interpreter.
triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run with TRITON_INTERPRET=1 (the kernels in Triton's interpreter)", allow_module_level=True)

from nanoseek.quant import blocks, gemm  # noqa: E402
from nanoseek.quant.blocks import ACT  # noqa: E402
from nanoseek.quant.checked import CheckedKernels, KernelRegistry, same_fp8, same_segments  # noqa: E402

try:
    from nanoseek.quant import fp8_triton, fp8_triton_act  # noqa: E402
except ImportError as e:  # a Triton without E4M3
    pytest.skip(f"Triton kernels unavailable: {e}", allow_module_level=True)

REF = gemm.TORCH_KERNELS


def _x(T, C, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, C, generator=g) * torch.logspace(-3, 2, C).view(1, C)[:, torch.randperm(C, generator=g)]
    x[0, :5] = 0.0  # a partly zero row; a zero tile below
    if T > 130 and C > 128:
        x[128:256, :128] = 0.0
    return x.to(dtype)


def test_e4m3_rounding_is_the_hardware_conversion():
    """The interpreter's integer E4M3 rounding equals torch's cast on every fp32 in a dense sweep
    of [-448, 448]: ties to even, subnormals, the carry into the next binade, signed zero."""
    v = torch.cat([torch.linspace(-448, 448, 200003), torch.linspace(-0.03, 0.03, 100003),
                   torch.tensor([0.0, -0.0, 2.0**-10, 2.0**-9 * 1.5, 2.0**-9 * 2.5, 15.5, 240.0, 248.0, 464.0 - 16])])
    v = v[: v.numel() // 128 * 128].view(-1, 128)
    v[:, 0] = 448.0  # every tile's scale is 1: the codes are the casts of v itself
    q = fp8_triton_act.quantize_rows_tiled(v)
    assert torch.equal(q.scale, torch.ones_like(q.scale))
    assert torch.equal(q.data.view(torch.uint8), v.to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("variant", ["fast", "safe"])
def test_rows_tiled_equals_reference(dtype, pow2, variant):
    x = _x(300, 328, dtype)  # a partial row block and a partial 128-channel block
    q = fp8_triton_act.quantize_rows_tiled(x, pow2, variant=variant)
    assert same_fp8(q, blocks.quantize(x, ACT, pow2))
    assert q.scale.stride() == (1, 300)  # M-major, as _scaled_mm wants
    assert same_fp8(fp8_triton.quantize_rows(x, pow2), q)  # the old kernel, kept for comparison


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("variant", ["fast", "safe", "v1", "v1-safe"])
def test_act_dual_equals_reference_per_segment(pow2, variant):
    """Both tilings of x, segments of 70, 0 and 260 tokens (tiles never cross a segment)."""
    x = _x(330, 328)
    tm = blocks.tile_map([70, 0, 260], "cpu")
    r, c = fp8_triton.quantize_act_dual(x, tm, pow2, variant=variant)
    rr, cc = REF.quantize_act_dual(x, tm, pow2)
    assert same_fp8(r, rr) and same_segments(c, cc)
    r, c = fp8_triton.quantize_act_dual(x, tm, pow2, rows=False, variant=variant)
    assert r is None and same_segments(c, cc)


def test_act_dual_strided_rows():
    """A row-strided view (gate of a stacked gate/up output) quantizes as its contiguous copy."""
    big = _x(200, 512)
    x = big[:, :256]
    tm = blocks.tile_map([200], "cpu")
    r, c = fp8_triton.quantize_act_dual(x, tm)
    rr, cc = REF.quantize_act_dual(x.contiguous(), tm)
    assert same_fp8(r, rr) and same_segments(c, cc)


def _swiglu_ref(g, u):
    return F.silu(g) * u  # what swiglu_hidden computes, in the inputs' dtype


@pytest.mark.parametrize("pow2", [False, True])
def test_swiglu_quantize_equals_silu_mul_then_quantize(pow2):
    """bf16 gate and up (strided halves of one stacked output, as the stacked GEMM gives them):
    silu in fp32 rounded to bf16, the product rounded to bf16, then both tilings: bit for bit."""
    gu = _x(270, 2 * 256, seed=3) * 0.3
    g, u = gu[:, :256], gu[:, 256:]
    h = _swiglu_ref(g, u)
    tm = blocks.tile_map([100, 170], "cpu")
    r, c = fp8_triton_act.swiglu_quantize_dual(g, u, tm, pow2)
    rr, cc = REF.quantize_act_dual(h, tm, pow2)
    assert same_fp8(r, rr) and same_segments(c, cc)
    assert same_fp8(fp8_triton_act.swiglu_quantize(g, u, pow2), blocks.quantize(h, ACT, pow2))


def test_swiglu_quantize_fp32_error_is_pinned():
    """fp32 inputs: h is not rounded, so silu's exp shows (numpy's expf here vs PyTorch's CPU one):
    not bit for bit; the quantization differs from the reference's by at most one E4M3 step on a
    few elements and the scales by at most 2 ulp."""
    g, u = _x(128, 256, torch.float32, seed=4) * 0.3, _x(128, 256, torch.float32, seed=5) * 0.3
    q = fp8_triton_act.swiglu_quantize(g, u)
    ref = blocks.quantize(_swiglu_ref(g, u), ACT)
    assert torch.allclose(q.scale, ref.scale, rtol=2.5e-7, atol=0)
    codes = (q.data.view(torch.uint8).int() - ref.data.view(torch.uint8).int()).abs()
    assert codes.max() <= 1 and (codes > 0).float().mean() < 1e-3


def _rmsnorm_ref(x, w, eps, rstd):
    """RMSNorm.forward with the given rstd: (x * rstd) in fp32, rounded to x's dtype, times w."""
    return (x.float() * rstd[:, None]).to(x.dtype) * w


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
def test_rmsnorm_quantize_equals_norm_then_quantize(wdtype):
    """Given its rstd, the fused RMSNorm's quantization is bit for bit that of RMSNorm.forward's
    output (bf16 or fp32 by the weight's dtype); rstd itself is a different reduction order from
    F.rms_norm's: pinned to a few ulp (relative 1e-6)."""
    x = _x(260, 384, seed=6)
    w = (1 + 0.1 * torch.randn(384, generator=torch.Generator().manual_seed(7))).to(wdtype)
    eps = 1e-6
    tm = blocks.tile_map([260], "cpu")
    r, c, rstd = fp8_triton_act.rmsnorm_quantize_dual(x, w, eps, tm)
    ref_rstd = torch.rsqrt(x.float().pow(2).mean(-1) + eps)
    assert torch.allclose(rstd, ref_rstd, rtol=1e-6, atol=0)
    y = _rmsnorm_ref(x, w, eps, rstd)
    rr, cc = REF.quantize_act_dual(y, tm)
    assert same_fp8(r, rr) and same_segments(c, cc)
    q, rstd2 = fp8_triton_act.rmsnorm_quantize(x, w, eps)
    assert torch.equal(rstd2, rstd) and same_fp8(q, blocks.quantize(y, ACT))
    # against the module itself: equal wherever rstd rounds alike (the norm's output dtype rounding hides most ulps)
    ours = y.float()
    mod = (F.rms_norm(x.float(), (384,), eps=eps).to(x.dtype) * w).float()
    assert (ours != mod).float().mean() < 1e-2


def test_checked_kernels_choose_the_tiled_and_fused_kernels():
    """Behind the first-use checks (checked.CheckedKernels) the real kernels agree with the
    reference: the tiled quantizer and the fused SwiGLU one are chosen ("fast")."""
    registry = KernelRegistry(check_every=False)
    kern = CheckedKernels(fp8_triton.KERNELS, REF, registry)
    tm = blocks.tile_map([100, 170], "cpu")
    x = _x(270, 256)
    r, c = kern.quantize_act_dual(x, tm)
    rr, cc = REF.quantize_act_dual(x, tm)
    assert same_fp8(r, rr) and same_segments(c, cc)
    gu = _x(270, 512, seed=8) * 0.3
    r, c = kern.swiglu_quantize_dual(gu[:, :256], gu[:, 256:], tm)
    rr, cc = REF.swiglu_quantize_dual(gu[:, :256], gu[:, 256:], tm)
    assert same_fp8(r, rr) and same_segments(c, cc)
    report = registry.report()
    assert {k[0]: v for k, v in report.quantizers.items()} == {"quantize_act_dual": "fast", "swiglu_quantize_dual": "fast"}
    assert not report.quantizer_fallbacks


def test_benchmark_quick_runs():
    """benchmarks/bench_fp8_quant.py --quick under the interpreter: every kernel checked against
    its reference, a table and a final JSON line."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-m", "benchmarks.bench_fp8_quant", "--quick"], cwd=root,
                       env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["all_exact"] and res["rows"]
