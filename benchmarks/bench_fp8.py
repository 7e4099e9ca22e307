"""FP8 (DeepSeek-V3 block-scaled recipe, nanoseek/fp8.py) vs bf16 on one GPU.

check: the Triton 1x128 quantizer is bit-identical to the PyTorch one; torch._scaled_mm with
       block-wise scales matches the CPU emulation (same FP8 operands); the FP8 layer on GPU vs fp32.
gemm:  GEMM TFLOP/s at DeepSeek-V3, V2-Lite and `small` shapes: bf16 vs FP8 Fprop-type (1x128 by
       128x128) on pre-quantized operands, then with quantization of both operands included
       (eager PyTorch quantizers, and the Triton row quantizer for the activation).
layer: forward+backward of an FP8 Linear, a dense SwiGLU MLP and the routed experts (per-expert
       loop) vs bf16 (autocast over fp32 master weights, grouped_mm for the bf16 experts).

    PYTHONPATH=. python benchmarks/bench_fp8.py [--quick] [--json-out FILE]

Prints tables and a final JSON line. TFLOP/s count 2*M*N*K per GEMM (3 GEMMs for fwd+bwd).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from nanoseek import fp8  # noqa: E402
from nanoseek.fp8 import ACT, WEIGHT, sqnr_db  # noqa: E402
from nanoseek.model import MLP, Experts  # noqa: E402

# (name, M tokens, N out, K in)
GEMM_SHAPES = [
    ("v3 expert up   4096x2048x7168", 4096, 2048, 7168),
    ("v3 expert down 4096x7168x2048", 4096, 7168, 2048),
    ("v3 dense up    16384x18432x7168", 16384, 18432, 7168),
    ("v3 dense down  16384x7168x18432", 16384, 7168, 18432),
    ("v2-lite expert 4096x1408x2048", 4096, 1408, 2048),
    ("small dense    16384x2816x1024", 16384, 2816, 1024),
    ("small expert   1536x512x1024", 1536, 512, 1024),
]


def bench(fn, iters=10, warmup=3) -> float:
    """Median milliseconds of fn() (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def part_check(out: dict) -> None:
    res = {}
    tri = None
    try:
        from nanoseek import fp8_triton
        tri = fp8_triton
    except Exception as e:  # noqa: BLE001
        res["triton_import_error"] = repr(e)
    g = torch.Generator(device="cuda").manual_seed(0)
    if tri is not None:
        exact = {}
        for shape in [(4096, 7168), (200, 328), (8192, 2048)]:
            x = torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16) * 3
            x[0, :128] = 0
            for pow2 in (False, True):
                a, b = fp8.quantize(x, ACT, pow2), tri.quantize_rows(x, pow2)
                same = (torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
                        and torch.equal(a.scale, b.scale))
                mism = (a.data.view(torch.uint8) != b.data.view(torch.uint8)).float().mean().item()
                exact[f"{shape}-pow2={pow2}"] = {"bit_identical": same, "byte_mismatch_frac": mism}
        res["triton_vs_torch_quantizer"] = exact
    gem = {}
    for M, N, K in [(256, 512, 1024), (200, 264, 328), (4096, 2048, 7168)]:
        a = torch.randn(M, K, device="cuda", generator=g, dtype=torch.bfloat16)
        b = torch.randn(N, K, device="cuda", generator=g, dtype=torch.bfloat16)
        ref = a.double() @ b.double().t()
        for ta, tb, name in [(ACT, WEIGHT, "1x128*128x128"), (ACT, ACT, "1x128*1x128")]:
            qa, qb = fp8.quantize(a, ta), fp8.quantize(b, tb)
            try:
                got = fp8.fp8_gemm(qa, qb, torch.float32, backend="scaled_mm")
                emu = fp8.fp8_gemm(qa, qb, torch.float32, backend="emulate")
                gem[f"{M}x{N}x{K} {name}"] = {"sqnr_vs_emulation_db": round(sqnr_db(emu, got), 1),
                                              "sqnr_vs_fp64_db": round(sqnr_db(ref, got), 2)}
            except Exception as e:  # noqa: BLE001
                gem[f"{M}x{N}x{K} {name}"] = {"error": repr(e)[:300]}
    res["scaled_mm_vs_emulation"] = gem
    res["scaled_mm_disabled"] = dict(fp8._SCALED_MM_BROKEN)
    # FP8 Linear on GPU vs fp32
    x = torch.randn(4096, 2048, device="cuda", generator=g)
    w = torch.randn(1024, 2048, device="cuda", generator=g) * 0.02
    dy = torch.randn(4096, 1024, device="cuda", generator=g)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    (xr @ wr.t()).backward(dy)
    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8.fp8_linear(xf, wf)
    y.backward(dy)
    res["linear_sqnr_db"] = {"y": round(sqnr_db(x @ w.t(), y), 2), "dx": round(sqnr_db(xr.grad, xf.grad), 2),
                             "dw": round(sqnr_db(wr.grad, wf.grad), 2)}
    out["check"] = res
    print(json.dumps(res, indent=1), flush=True)


def part_gemm(out: dict, quick: bool) -> None:
    rows = []
    shapes = GEMM_SHAPES[:2] + GEMM_SHAPES[5:] if quick else GEMM_SHAPES
    tri = None
    try:
        from nanoseek import fp8_triton as tri
    except Exception:  # noqa: BLE001
        pass
    print(f"{'shape':34s} {'bf16':>7s} {'fp8':>7s} {'x':>5s} {'fp8+q eager':>12s} {'x':>5s} {'fp8+q triton':>13s} {'x':>5s}  (TFLOP/s)")
    for name, M, N, K in shapes:
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        flops = 2 * M * N * K
        t_bf = bench(lambda: a @ b.t())
        qa, qb = fp8.quantize(a, ACT), fp8.quantize(b, WEIGHT)
        t_f8 = bench(lambda: fp8.fp8_gemm(qa, qb, torch.bfloat16))
        t_q = bench(lambda: fp8.fp8_gemm(fp8.quantize(a, ACT), fp8.quantize(b, WEIGHT), torch.bfloat16))
        t_t = bench(lambda: fp8.fp8_gemm(tri.quantize_rows(a), fp8.quantize(b, WEIGHT), torch.bfloat16)) if tri else float("nan")
        r = {"shape": name, "M": M, "N": N, "K": K, "bf16_tflops": flops / t_bf / 1e9, "fp8_tflops": flops / t_f8 / 1e9,
             "fp8_quant_eager_tflops": flops / t_q / 1e9, "fp8_quant_triton_tflops": flops / t_t / 1e9}
        rows.append(r)
        print(f"{name:34s} {r['bf16_tflops']:7.0f} {r['fp8_tflops']:7.0f} {t_bf / t_f8:5.2f} "
              f"{r['fp8_quant_eager_tflops']:12.0f} {t_bf / t_q:5.2f} {r['fp8_quant_triton_tflops']:13.0f} {t_bf / t_t:5.2f}",
              flush=True)
        del a, b, qa, qb
    # the Wgrad kind (1x128 by 1x128, contraction over tokens) at the V3 expert shape
    M, N, K = 2048, 7168, 4096  # dW[2048, 7168] = dy^T x over 4096 tokens
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    qa, qb = fp8.quantize(a, ACT), fp8.quantize(b, ACT)
    t_bf, t_f8 = bench(lambda: a @ b.t()), bench(lambda: fp8.fp8_gemm(qa, qb, torch.float32))
    wg = {"shape": "wgrad 1x128*1x128 2048x7168x4096", "bf16_tflops": 2 * M * N * K / t_bf / 1e9,
          "fp8_tflops": 2 * M * N * K / t_f8 / 1e9}
    print(f"{wg['shape']:34s} {wg['bf16_tflops']:7.0f} {wg['fp8_tflops']:7.0f} {t_bf / t_f8:5.2f}  (fp32 out)")
    out["gemm"] = rows + [wg]


def _fwd_bwd(module, x, autocast=True):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = module(x)
        y.float().sum().backward() if y.dtype != torch.float32 else y.sum().backward()
    return step


def part_layer(out: dict, quick: bool) -> None:
    rows = []
    tri_ok = False
    try:
        from nanoseek import fp8_triton
        tri_ok = True
    except Exception:  # noqa: BLE001
        pass

    def run(name, make, x_shape, flops, extra_args=None):
        torch.manual_seed(0)
        res = {"name": name}
        for variant in (["bf16", "fp8-eager", "fp8-triton"] if tri_ok else ["bf16", "fp8-eager"]):
            fp8.ROW_QUANTIZER = None
            if variant == "fp8-triton":
                fp8_triton.install()
            m = make().cuda()
            if variant != "bf16":
                fp8.convert(m)
            x = torch.randn(*x_shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            fn = (lambda: _fwd_bwd(lambda t: m(t, *extra_args), x)()) if extra_args else _fwd_bwd(m, x)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t = bench(fn, iters=5, warmup=2)
            res[variant + "_ms"] = t
            res[variant + "_tflops"] = flops / t / 1e9
            res[variant + "_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
            del m, x
            torch.cuda.empty_cache()
        fp8.ROW_QUANTIZER = None
        rows.append(res)
        print(name, {k: round(v, 2) if isinstance(v, float) else v for k, v in res.items() if k != "name"}, flush=True)

    T = 8192
    run("linear 8192x7168->18432 fwd+bwd", lambda: nn.Linear(7168, 18432, bias=False), (T, 7168),
        3 * 2 * T * 7168 * 18432)
    run("dense MLP v3 (7168, 18432) 8192 tok fwd+bwd", lambda: MLP(7168, 18432), (T, 7168), 3 * 3 * 2 * T * 7168 * 18432)
    # routed experts at V3 dims: 8 experts of width 2048, 4096 tokens each (every token picks all 8)
    E, h, inter, N = 8, 7168, 2048, 4096
    idx = torch.arange(E, device="cuda").repeat(N, 1)
    wts = torch.full((N, E), 1.0 / E, device="cuda")

    def make_experts(E=E, h=h, inter=inter):
        ex = Experts(E, h, inter)
        for p in ex.parameters():
            nn.init.normal_(p, 0.0, 0.02)
        return ex
    run("experts v3 (8 x 2048, 4096 tok each) fwd+bwd", make_experts, (N, h), 3 * 3 * 2 * N * E * h * inter,
        extra_args=(idx, wts))
    if not quick:
        # `small`: 64 experts of width 512, 16384 tokens x top-6 -> 1536 per expert (FP8 expected to lose)
        E2, h2, i2, N2, k2 = 64, 1024, 512, 16384, 6
        idx2 = (torch.arange(N2, device="cuda")[:, None] * k2 + torch.arange(k2, device="cuda")) % E2
        wts2 = torch.full((N2, k2), 1.0 / k2, device="cuda")
        run("experts small (64 x 512, 1536 tok each) fwd+bwd", lambda: make_experts(E2, h2, i2), (N2, h2),
            3 * 3 * 2 * N2 * k2 * h2 * i2, extra_args=(idx2, wts2))
    out["layer"] = rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--parts", default="check,gemm,layer")
    p.add_argument("--json-out")
    a = p.parse_args()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d")}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    print(out, flush=True)
    t0 = time.time()
    for part in a.parts.split(","):
        try:
            {"check": lambda: part_check(out), "gemm": lambda: part_gemm(out, a.quick),
             "layer": lambda: part_layer(out, a.quick)}[part]()
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            out[part + "_error"] = repr(e)[:500]
        print(f"[{part} done at {time.time() - t0:.0f}s]", flush=True)
        if a.json_out:
            with open(a.json_out, "w") as f:
                json.dump(out, f, indent=1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
