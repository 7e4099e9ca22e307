"""Is every autotuning config of the Triton grouped GEMMs right on every token layout?

Runs nanoseek.fp8_triton's grouped Fprop/Dgrad and Wgrad kernels with each config forced, over
random expert segment layouts (empty, tiny, huge experts), against the per-expert loop
(fp8.TorchKernels); prints the worst row error per config.
    PYTHONPATH=. python dev/debug_fp8_grouped.py
"""
import json
import math

import torch
import triton

from nanoseek import fp8, fp8_triton as ft


def worst(out, ref):
    return fp8._worst_row_error(out, ref)


def worse(a: float, b: float) -> float:
    """max that keeps a NaN (Python's max(0.0, nan) is 0.0)."""
    return float("nan") if math.isnan(a) or math.isnan(b) else max(a, b)


def main():
    g = torch.Generator(device="cuda").manual_seed(0)
    R = fp8.TORCH_KERNELS
    E, res = 8, {}
    layouts = []
    for i in range(12):
        w = torch.rand(E, generator=g, device="cuda") ** 3
        if i % 3 == 0:
            w[torch.randint(0, E, (2,), generator=g, device="cuda")] = 0
        sizes = (w / w.sum() * 32768).floor().long().tolist()
        layouts.append(sizes)
    layouts.append([32768] + [0] * (E - 1))
    layouts.append([1, 127, 128, 129, 255, 256, 4000, 28000 - 896])
    for N, K in ((2048, 4096), (4096, 2048)):
        wts = torch.randn(E, N, K, device="cuda", generator=g) * 0.02
        wq, _ = R.quantize_weight_dual(wts)
        for sizes in layouts:
            T = sum(sizes)
            tm = fp8.tile_map(sizes, "cuda")
            x = torch.randn(T, K, device="cuda", generator=g, dtype=torch.bfloat16)
            dy = torch.randn(T, N, device="cuda", generator=g, dtype=torch.bfloat16)
            xq, xt = R.quantize_act_dual(x, tm)
            _, dyt = R.quantize_act_dual(dy, tm, rows=False)
            ref = R.grouped_gemm(xq, wq, tm, torch.bfloat16)
            refw = R.grouped_wgrad(dyt, xt, tm)
            for cfg in ft._grouped_gemm_kernel.configs:
                out = torch.full((T, N), float("nan"), device="cuda", dtype=torch.bfloat16)
                bn = cfg.kwargs["BN"]
                ft._grouped_gemm_kernel.fn[(tm.n_tiles * triton.cdiv(N, bn),)](
                    xq.data, xq.scale, wq.data, wq.scale, out, tm.prog, tm.n_tiles, N, K,
                    xq.data.stride(0), xq.scale.stride(0), xq.scale.stride(1), wq.data.stride(0), wq.data.stride(1),
                    wq.scale.stride(0), wq.scale.stride(1), wq.scale.stride(2), out.stride(0),
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.kwargs)
                k = f"gemm N={N} K={K} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"
                res[k] = worse(res.get(k, 0.0), worst(out, ref))
            for cfg in ft._grouped_wgrad_kernel.configs:
                out = torch.full((E, N, K), float("nan"), device="cuda")
                bn, bk = cfg.kwargs["BN"], cfg.kwargs["BK"]
                ft._grouped_wgrad_kernel.fn[(triton.cdiv(N, bn) * triton.cdiv(K, bk), E)](
                    dyt.data, dyt.scale, xt.data, xt.scale, out, tm.seg, E, N, K,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.kwargs)
                k = f"wgrad N={N} K={K} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"
                res[k] = worse(res.get(k, 0.0), worst(out, refw))
        torch.cuda.synchronize()
        print(json.dumps({k: round(v, 5) for k, v in res.items()}), flush=True)


if __name__ == "__main__":
    main()
