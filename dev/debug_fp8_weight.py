"""Which formulation of the 128x128 weight quantizer is bit-exact on this GPU? (W, scales, W^T)

Compares nanoseek.fp8_triton.quantize_weight_dual (fast / safe) and variants of its kernel defined
here against the PyTorch reference (fp8.TorchKernels), at shapes divisible by 16 and not.
    PYTHONPATH=. python dev/debug_fp8_weight.py
"""
import json

import torch
import triton
import triton.language as tl

from nanoseek import fp8, fp8_triton as ft
from nanoseek.fp8 import E4M3, EPS
from nanoseek.fp8_triton import _scale_from_amax, _to_e4m3


@triton.jit
def _to_e4m3_where(x, s):
    y = tl.math.div_rn(x, s)
    y = tl.where(y > 448.0, 448.0, y)
    y = tl.where(y < -448.0, -448.0, y)
    return y.to(tl.float8e4nv)


@triton.jit
def _k(w_ptr, q_ptr, qt_ptr, s_ptr, N, K, stride_wn, nK, EPS_C: tl.constexpr, MODE: tl.constexpr, WRITE_T: tl.constexpr):
    nb = tl.program_id(0)
    kb = tl.program_id(1)
    r = nb * 128 + tl.arange(0, 128)
    c = kb * 128 + tl.arange(0, 128)
    mask = (r[:, None] < N) & (c[None, :] < K)
    w = tl.load(w_ptr + r.to(tl.int64)[:, None] * stride_wn + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if MODE == 0:  # as the product kernel: nested reduction keep_dims, min/max clamp
        amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0, keep_dims=True)
        s = _scale_from_amax(amax, EPS_C, False)
        q = _to_e4m3(w, s[:, None])
    else:  # two scalar reductions, where-clamp
        amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0) + tl.zeros([1], tl.float32)
        s = _scale_from_amax(amax, EPS_C, False)
        q = _to_e4m3_where(w, s[:, None])
    tl.store(s_ptr + nb * nK + kb + tl.arange(0, 1), s)
    tl.store(q_ptr + r.to(tl.int64)[:, None] * K + c[None, :], q, mask=mask)
    if WRITE_T:
        tl.store(qt_ptr + c.to(tl.int64)[:, None] * N + r[None, :], tl.trans(q), mask=(c[:, None] < K) & (r[None, :] < N))


def run_variant(w, mode, write_t, nw):
    N, K = w.shape
    nN, nK = triton.cdiv(N, 128), triton.cdiv(K, 128)
    q = torch.full((N, K), 0x7F, dtype=torch.uint8, device=w.device).view(E4M3)
    qt = torch.full((K, N), 0x7F, dtype=torch.uint8, device=w.device).view(E4M3)
    s = torch.full((nN, nK), float("nan"), device=w.device)
    _k[(nN, nK)](w, q, qt, s, N, K, w.stride(0), nK, EPS_C=EPS, MODE=mode, WRITE_T=write_t, num_warps=nw)
    return q, qt, s


def diff(a, b):
    if a.dtype == E4M3:
        bad = a.view(torch.uint8) != b.contiguous().view(torch.uint8)
    else:
        bad = a != b
    n = int(bad.sum())
    if not n:
        return 0
    idx = bad.nonzero()[0].tolist()
    return {"n": n, "of": bad.numel(), "first": idx}


def main():
    g = torch.Generator(device="cuda").manual_seed(0)
    out = {}
    for shape in [(18432, 7168), (2048, 7168), (256, 256), (1024, 2048), (200, 328), (130, 260), (7168, 1536)]:
        w = torch.randn(*shape, device="cuda", generator=g) * 0.02
        ref = fp8.TorchKernels.quantize_weight_dual(w)
        rq, rs, rqt = ref[0].data, ref[0].scale, ref[1].data
        res = {}
        for v in ("fast", "safe"):
            with ft.sentinel_outputs():
                a, at = ft.quantize_weight_dual(w, variant=v)
                a1, _ = ft.quantize_weight_dual(w, transposed=False, variant=v)
            res[f"product {v}"] = {"q": diff(rq, a.data), "s": diff(rs, a.scale), "qt": diff(rqt, at.data),
                                   "q (no T)": diff(rq, a1.data), "s (no T)": diff(rs, a1.scale)}
        for mode in (0, 1):
            for write_t in (False, True):
                for nw in (4, 8):
                    q, qt, s = run_variant(w, mode, write_t, nw)
                    r = {"q": diff(rq, q), "s": diff(rs, s)}
                    if write_t:
                        r["qt"] = diff(rqt, qt)
                    res[f"mode{mode} T={int(write_t)} warps{nw}"] = r
        out[str(shape)] = res
        ok = {k: all(x == 0 for x in v.values()) for k, v in res.items()}
        print(shape, json.dumps(ok))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
