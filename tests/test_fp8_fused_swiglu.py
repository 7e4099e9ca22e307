"""SwiGLU's output quantized straight from gate and up for the down projection
(`FP8Config.fuse_swiglu`, DeepSeek-V3 report 3.3.3: the SwiGLU inputs are kept, its output is
recomputed for the backward): with the plain-PyTorch reference kernels on CPU, outputs and every
gradient are bit for bit those of the unfused fused-path graph (silu * up in 16 bits, then the down
projection's own quantizer), for the routed experts and the dense MLP, bf16 and fp32, stacked and
separate gate/up GEMMs, with and without a down-projection bias; the default CPU path never fuses."""

import pytest
import torch
import torch.nn as nn

from nanoseek.model import MLP, Experts
from nanoseek.quant import fp8
from nanoseek.quant.fp8 import FP8Config, FP8Experts


@pytest.fixture
def fused_calls(monkeypatch):
    """How many times the fused SwiGLU + down projection ran (so a test cannot pass unfused)."""
    calls = []
    real = fp8.fp8_swiglu_down

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(fp8, "fp8_swiglu_down", counted)
    return calls


def _grads(module, params, run):
    module.zero_grad()
    out = run()
    return [out] + [p.grad.clone() for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stack", [8192, 0])
def test_fused_swiglu_experts_bit_identical(dtype, stack, fused_calls):
    torch.manual_seed(3)
    E, h, inter, N, k = 5, 192, 256, 140, 2
    ex = Experts(E, h, inter).to(dtype)
    for p in ex.parameters():
        nn.init.normal_(p, 0.0, 0.05)
    ex.__class__ = FP8Experts
    x = torch.randn(N, h, dtype=dtype)
    idx = torch.randint(0, E - 1, (N, k))  # expert E-1: no tokens
    wts = torch.rand(N, k, dtype=dtype)
    dy = torch.randn(N, h, dtype=dtype)
    res = {}
    for fuse in ("off", "on"):
        ex.fp8_config = FP8Config(kernels="torch", fuse_swiglu=fuse, stack_gate_up_below=stack)
        xf = x.clone().requires_grad_()

        def run():
            y = ex(xf, idx, wts)
            y.backward(dy)
            return y
        res[fuse] = _grads(ex, [ex.gate_proj, ex.up_proj, ex.down_proj], run) + [xf.grad]
        assert len(fused_calls) == (fuse == "on")
    for a, b in zip(res["off"], res["on"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_swiglu_dense_mlp_bit_identical(bias, fused_calls):
    torch.manual_seed(4)
    mlp = MLP(320, 256)
    if bias:
        mlp.down_proj.bias = nn.Parameter(torch.randn(320) * 0.1)
    x = torch.randn(2, 37, 320)
    dy = torch.randn(2, 37, 320)
    res = {}
    for fuse in ("off", "on"):
        m = nn.Sequential(mlp)
        fp8.convert(m, FP8Config(kernels="torch", fuse_swiglu=fuse))
        xf = x.clone().requires_grad_()

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = m(xf)
            y.float().backward(dy)
            return y
        params = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight] + ([mlp.down_proj.bias] if bias else [])
        res[fuse] = _grads(m, params, run) + [xf.grad]
        assert len(fused_calls) == (fuse == "on")
    for a, b in zip(res["off"], res["on"]):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_fuse_swiglu_needs_the_fused_path():
    """Not on the per-op CPU path (kernels="off", the default on CPU) nor without cache_fp8."""
    assert not fp8._fuse_swiglu(FP8Config(), None)
    assert not fp8._fuse_swiglu(FP8Config(kernels="torch"), fp8.TORCH_KERNELS)  # "auto": Triton only
    assert fp8._fuse_swiglu(FP8Config(kernels="torch", fuse_swiglu="on"), fp8.TORCH_KERNELS)
    assert not fp8._fuse_swiglu(FP8Config(kernels="torch", fuse_swiglu="on", cache_fp8=False), fp8.TORCH_KERNELS)
    with pytest.raises(ValueError, match="fuse_swiglu"):
        FP8Config(fuse_swiglu="yes")
