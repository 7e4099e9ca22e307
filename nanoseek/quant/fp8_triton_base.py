"""What every FP8 Triton kernel module shares (DeepSeek-V3 report, arXiv 2412.19437, section 3.3.1:
online scales s = max(amax, eps) / 448, E4M3 codes): the interpreter switch, the output allocator
with its NaN sentinel (debugging), and the jit functions every quantizer uses, the scale from an
amax and the E4M3 cast, written once so that every kernel rounds exactly as
`nanoseek.quant.blocks.quantize` does.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .blocks import E4M3

if not hasattr(tl, "float8e4nv"):
    raise ImportError("this Triton has no float8e4nv (E4M3) type")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's interpreter runs on CPU tensors
# The interpreter's float narrowing (fp32 -> e4m3 / bf16) truncates the exponent carry and does not
# round to nearest even; under it the kernels round in integer arithmetic instead (`_e4m3_rne`,
# `round_to`), the formulas of the hardware conversions, so that the tests on CPU check the rest
# of each kernel bit for bit. Compiled for a GPU, the kernels use the hardware conversions.
INTERPRET_C = tl.constexpr(INTERPRET)


def on_device(t: torch.Tensor) -> bool:
    """Whether the kernels can run on t: a CUDA tensor, or any tensor under the interpreter."""
    return t.is_cuda or INTERPRET


SENTINEL = False  # debug: fill every output buffer with NaN (E4M3 0x7F) so unwritten regions show


class sentinel_outputs:
    """Context manager: the kernels' outputs start as NaN instead of `torch.empty` garbage (a
    region the kernel never writes stays NaN; no valid quantization is NaN)."""

    def __enter__(self):
        global SENTINEL
        self._old, SENTINEL = SENTINEL, True
        return self

    def __exit__(self, *exc):
        global SENTINEL
        SENTINEL = self._old


def empty(*shape, dtype, device) -> torch.Tensor:
    """torch.empty, or NaN-filled under `sentinel_outputs`."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    if SENTINEL and t.numel():
        if t.dtype == E4M3:
            t.view(torch.uint8).fill_(0x7F)
        else:
            t.fill_(float("nan"))
    return t


@triton.jit
def scale_from_amax(amax, EPS_C: tl.constexpr, POW2: tl.constexpr):
    """s = max(amax, eps) / 448 (IEEE division), optionally 2^ceil(log2 s) by bit manipulation."""
    amax = tl.maximum(amax, EPS_C)
    s = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
    if POW2:
        bits = s.to(tl.int32, bitcast=True)
        exp = (bits >> 23) & 0xFF
        exp = exp + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        exp = tl.minimum(tl.maximum(exp, 1), 254)
        s = (exp << 23).to(tl.float32, bitcast=True)
    return s


@triton.jit
def _e4m3_rne(q):
    """The E4M3 code of finite fp32 q with |q| <= 448, round to nearest even, in integer arithmetic:
    below 2^-6 the subnormal code rint(|q| * 2^9) (exact scaling); above, the fp32 exponent and top 3 mantissa bits
    rounded on the 20 bits cut off (a carry into the exponent is the next binade's code)."""
    bits = q.to(tl.int32, bitcast=True)
    sign = ((bits >> 24) & 0x80).to(tl.int32)
    a = tl.abs(q)
    mag = a.to(tl.int32, bitcast=True)
    m3 = (mag >> 20) & 0x7
    low = mag & 0xFFFFF
    up = ((low > 0x80000) | ((low == 0x80000) & ((m3 & 1) == 1))).to(tl.int32)
    normal = ((((mag >> 23) - 120) << 3) | m3) + up
    sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)  # rint by the fp32 addition's rounding
    code = tl.where(a < 0.015625, sub, normal) | sign
    return code.to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _round_soft(x, dtype: tl.constexpr):
    """Under the interpreter only: x (fp32) to dtype, bf16 rounded to nearest even in integers."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """x (fp32) rounded to dtype, to nearest even (the hardware conversion; `_round_soft` under
    the interpreter)."""
    if INTERPRET_C:
        y = _round_soft(x, dtype)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def exp_f32(x):
    """expf as the CUDA math library computes it (libdevice's __nv_expf, which PyTorch's kernels
    call), not the fast ex2.approx of tl.exp; numpy's exp under the interpreter."""
    if INTERPRET_C:
        y = tl.exp(x)
    else:
        y = libdevice.exp(x)
    return y


@triton.jit
def to_e4m3(x, s):
    """e4m3(clamp(x / s, -448, 448)), round to nearest even; s broadcasts against x."""
    q = tl.math.div_rn(x, s)
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    if INTERPRET_C:
        e = _e4m3_rne(q)
    else:
        e = q.to(tl.float8e4nv)
    return e
