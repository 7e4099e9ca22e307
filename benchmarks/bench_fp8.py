"""FP8 (DeepSeek-V3 block-scaled recipe, nanoseek/quant/fp8.py) vs bf16 on one GPU.

check: the Triton quantizers (1x128 rows; the fused 1x128 + per-segment 128x1 one; the 128x128
       weight one writing W and W^T) are bit-identical to the PyTorch reference (gemm.TorchKernels);
       the Triton grouped GEMMs (Fprop/Dgrad kind and the K-grouped Wgrad) match the per-expert
       torch._scaled_mm loop on the same FP8 operands; torch._scaled_mm with block-wise scales
       matches the CPU emulation; the FP8 Linear and experts on GPU (each variant) vs fp32.
gemm:  GEMM TFLOP/s at DeepSeek-V3, V2-Lite and `small` shapes: bf16 vs FP8 Fprop-type (1x128 by
       128x128) on pre-quantized operands, then with quantization of both operands included
       (eager PyTorch quantizers, and the Triton row quantizer for the activation).
layer: forward+backward of an FP8 Linear, a dense SwiGLU MLP and the routed experts vs bf16
       (autocast over fp32 master weights, grouped_mm for the bf16 experts). FP8 variants:
       fp8-eager (per-op PyTorch quantizers, transposes included: FP8Config(kernels="off")),
       fp8-fused (the Triton quantizers; experts: per-expert _scaled_mm loop) and, for the
       experts, fp8-grouped (the Triton quantizers and grouped GEMMs, one launch per GEMM); for
       the SwiGLU blocks each with the default choice between gate and up as one stacked GEMM per
       pass and as two GEMMs (FP8Config.stack_gate_up_below: stacked below width 8192, so the
       experts stack and the dense MLP does not) and, as fused2 / grouped2, the other choice.

    python -m benchmarks.bench_fp8 [--quick] [--json-out FILE]

Prints tables and a final JSON line. TFLOP/s count 2*M*N*K per GEMM (3 GEMMs for fwd+bwd).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch
import torch.nn as nn

from nanoseek.quant import blocks, fp8, gemm
from nanoseek.quant.blocks import ACT, WEIGHT
from nanoseek.quant.checked import REGISTRY
from nanoseek.quant.fp8 import FP8Config, sqnr_db
from nanoseek.model import MLP, Experts

from .common import environment, median_cuda_ms, print_json

# (name, M tokens, N out, K in)
GEMM_SHAPES = [
    ("v3 expert up   4096x2048x7168", 4096, 2048, 7168),
    ("v3 expert gate+up 4096x4096x7168", 4096, 4096, 7168),
    ("v3 expert down 4096x7168x2048", 4096, 7168, 2048),
    ("v3 expert dgrad g+u 4096x7168x4096", 4096, 7168, 4096),
    ("v3 dense up    16384x18432x7168", 16384, 18432, 7168),
    ("v3 dense down  16384x7168x18432", 16384, 7168, 18432),
    ("v2-lite expert 4096x1408x2048", 4096, 1408, 2048),
    ("small dense    16384x2816x1024", 16384, 2816, 1024),
    ("small expert   1536x512x1024", 1536, 512, 1024),
]


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _where(a: torch.Tensor, b: torch.Tensor, block: int = 128) -> dict:
    """Where two same-shape E4M3 / fp32 tensors differ: counts, NaN count in b (a sentinel byte:
    an unwritten region), the first differing index, and (for >= 2-D) the 128x128 blocks hit."""
    if a.shape != b.shape:
        return {"shape": [list(a.shape), list(b.shape)]}
    if a.dtype == torch.float8_e4m3fn:
        bad = a.contiguous().view(torch.uint8) != b.contiguous().view(torch.uint8)
    else:
        bad = ~((a == b) | (torch.isnan(a) & torch.isnan(b)))
    n = int(bad.sum())
    if n == 0:
        return {}
    out = {"bad": n, "of": bad.numel(), "nan_in_triton": int(torch.isnan(b.float()).sum()),
           "first": bad.nonzero()[0].tolist()}
    if b.dim() >= 2 and a.dtype == torch.float8_e4m3fn:
        R, C = bad.shape[-2:]
        nr, nc = -(-R // block), -(-C // block)
        pad = torch.nn.functional.pad(bad.reshape(-1, R, C).float(), (0, nc * block - C, 0, nr * block - R))
        blocks = pad.view(-1, nr, block, nc, block).amax(dim=(2, 4)) > 0
        out["blocks_bad"] = f"{int(blocks.sum())}/{blocks.numel()}"
        out["first_blocks"] = blocks.nonzero()[:4].tolist()
    return out


def _check_kernels(tri, g) -> dict:
    """Triton kernels vs the PyTorch reference of the same layouts (gemm.TorchKernels), every
    output (data, scales, the transposed copies) bit for bit, for both compilations ("fast":
    Triton's default specialization on sizes divisible by 16; "safe": none), with outputs
    pre-filled with NaN (tri.sentinel_outputs) so a region a kernel never writes cannot pass."""
    R = gemm.TORCH_KERNELS
    res, diag = {}, {}
    variants = ("fast", "safe")
    with tri.sentinel_outputs():
        # quantizers: bit-identical data and scales
        for sizes in ([4096], [200], [0, 1000, 77, 4096, 0, 129, 3000], [1536] * 8):
            T = sum(sizes)
            for C, dt in ((7168, torch.bfloat16), (328, torch.bfloat16), (2048, torch.float32)):
                if dt == torch.float32 and len(sizes) > 1 and sizes[0] != 1536:
                    continue
                x = torch.randn(T, C, device="cuda", generator=g, dtype=dt) * 3
                x[:, :2] *= 60
                x[: min(T, 128), :128] = 0
                tm = blocks.tile_map(sizes, "cuda")
                for pow2 in (False, True):
                    r1, c1 = R.quantize_act_dual(x, tm, pow2)
                    for v in variants:
                        r2, c2 = tri.quantize_act_dual(x, tm, pow2, variant=v)
                        d = {k: w for k, w in {"rows.data": _where(r1.data, r2.data), "rows.scale": _where(r1.scale, r2.scale),
                                               "cols.data": _where(c1.data, c2.data),
                                               "cols.scale": _where(c1.scale, c2.scale)}.items() if w}
                        name = f"act_dual {len(sizes)} seg T={T} C={C} {str(dt)[6:]} pow2={pow2} {v}"
                        res[name] = not d
                        if d:
                            diag[name] = d
        # single weights, and SwiGLU's gate and up stacked into one quantization (a list)
        for shape in [(18432, 7168), (200, 328), (8, 2048, 7168), (3, 130, 260), (1024, 2048), (2304, 896),
                      (16, 512, 1024), (7168, 1536), [(8, 2048, 7168)] * 2, [(256, 328), (200, 328)]]:
            w = ([torch.randn(*sh, device="cuda", generator=g) * 0.02 for sh in shape] if isinstance(shape, list)
                 else torch.randn(*shape, device="cuda", generator=g) * 0.02)
            for pow2 in (False, True):
                a, at = R.quantize_weight_dual(w, pow2)
                for v in variants:
                    b, bt = tri.quantize_weight_dual(w, pow2, variant=v)
                    d = {k: x for k, x in {"W.data": _where(a.data, b.data), "W.scale": _where(a.scale, b.scale),
                                           "WT.data": _where(at.data, bt.data),
                                           "WT.scale": _where(at.scale, bt.scale)}.items() if x}
                    if d:  # is W alone right when the kernel does not write W^T?
                        b1, _ = tri.quantize_weight_dual(w, pow2, transposed=False, variant=v)
                        d["W.data (W^T not written)"] = _where(a.data, b1.data) or "identical"
                    name = f"weight_dual {shape} pow2={pow2} {v}"
                    res[name] = not d
                    if d:
                        diag[name] = d
        res["mismatch_details"] = diag
        x = torch.randn(4096, 2048, device="cuda", generator=g, dtype=torch.bfloat16)
        a, b = blocks.quantize(x, ACT), tri.quantize_rows(x)
        res["rows (4096, 2048)"] = _same_bytes(a.data, b.data) and torch.equal(a.scale, b.scale)
        res["grouped_vs_loop_sqnr_db"] = _check_grouped(tri, g)
    return res


def _check_grouped(tri, g) -> dict:
    """Grouped GEMMs vs the per-expert torch._scaled_mm loop on the same operands (quantized by
    the PyTorch reference, so a quantizer bug cannot hide or cause a GEMM result)."""
    R = gemm.TORCH_KERNELS
    gem = {}
    for sizes, N, K in [([0, 1000, 77, 4096, 0, 129, 3000], 2048, 7168), ([1536] * 8, 512, 1024),
                        ([5, 300, 0, 200], 264, 328)]:
        T, E = sum(sizes), len(sizes)
        tm = blocks.tile_map(sizes, "cuda")
        xa = torch.randn(T, K, device="cuda", generator=g, dtype=torch.bfloat16)
        dy = torch.randn(T, N, device="cuda", generator=g, dtype=torch.bfloat16)
        w = torch.randn(E, N, K, device="cuda", generator=g) * 0.02
        xq, xt = R.quantize_act_dual(xa, tm)
        dyq, dyt = R.quantize_act_dual(dy, tm)
        wq, wqt = R.quantize_weight_dual(w)
        wqt = blocks.Fp8Tensor(wqt.data, wqt.scale.transpose(-2, -1).contiguous().transpose(-2, -1), wqt.tile)  # the
        # Triton quantizer's scale layout (a transposed view), what the fused path hands the kernel
        key = f"{E} experts T={T} N={N} K={K}"
        ref = R.grouped_gemm(xq, wq, tm, torch.float32)
        gem[key + " fprop"] = round(sqnr_db(ref, tri.grouped_gemm(xq, wq, tm, torch.float32)), 1)
        ref = R.grouped_gemm(dyq, wqt, tm, torch.float32)
        gem[key + " dgrad"] = round(sqnr_db(ref, tri.grouped_gemm(dyq, wqt, tm, torch.float32)), 1)
        ref = R.grouped_wgrad(dyt, xt, tm)
        got = tri.grouped_wgrad(dyt, xt, tm)
        gem[key + " wgrad"] = round(sqnr_db(ref, got), 1)
        empty = [e for e, n in enumerate(sizes) if n == 0]
        if empty:
            gem[key + " empty experts zero"] = bool((got[empty] == 0).all())
    return gem


def part_check(out: dict) -> None:
    res = {}
    tri = None
    try:
        from nanoseek.quant import fp8_triton
        tri = fp8_triton
    except Exception as e:  # noqa: BLE001
        res["triton_import_error"] = repr(e)
    g = torch.Generator(device="cuda").manual_seed(0)
    if tri is not None:
        res["triton_vs_torch"] = _check_kernels(tri, g)
    gem = {}
    for M, N, K in [(256, 512, 1024), (200, 264, 328), (4096, 2048, 7168)]:
        a = torch.randn(M, K, device="cuda", generator=g, dtype=torch.bfloat16)
        b = torch.randn(N, K, device="cuda", generator=g, dtype=torch.bfloat16)
        ref = a.double() @ b.double().t()
        for ta, tb, name in [(ACT, WEIGHT, "1x128*128x128"), (ACT, ACT, "1x128*1x128")]:
            qa, qb = blocks.quantize(a, ta), blocks.quantize(b, tb)
            try:
                got = gemm.fp8_gemm(qa, qb, torch.float32, backend="scaled_mm")
                emu = gemm.fp8_gemm(qa, qb, torch.float32, backend="emulate")
                gem[f"{M}x{N}x{K} {name}"] = {"sqnr_vs_emulation_db": round(sqnr_db(emu, got), 1),
                                              "sqnr_vs_fp64_db": round(sqnr_db(ref, got), 2)}
            except Exception as e:  # noqa: BLE001
                gem[f"{M}x{N}x{K} {name}"] = {"error": repr(e)[:300]}
    res["scaled_mm_vs_emulation"] = gem
    # FP8 Linear and experts on GPU vs fp32, each variant
    variants = {"eager": FP8Config(kernels="off")}
    if tri is not None:
        variants.update({"fused": FP8Config(kernels="triton", grouped="loop"),
                         "fused2": FP8Config(kernels="triton", grouped="loop", stack_gate_up_below=0),
                         "grouped": FP8Config(kernels="triton", grouped="triton")})
    x = torch.randn(4096, 2048, device="cuda", generator=g)
    w = torch.randn(1024, 2048, device="cuda", generator=g) * 0.02
    dy = torch.randn(4096, 1024, device="cuda", generator=g)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    (xr @ wr.t()).backward(dy)
    lin = {}
    for name, cfg in variants.items():
        if name in ("grouped", "fused2"):
            continue
        xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8.fp8_linear(xf, wf, cfg)
        y.backward(dy)
        lin[name] = {"y": round(sqnr_db(x @ w.t(), y), 2), "dx": round(sqnr_db(xr.grad, xf.grad), 2),
                     "dw": round(sqnr_db(wr.grad, wf.grad), 2)}
    res["linear_sqnr_db"] = lin
    E, h, inter, N, k = 16, 1024, 512, 3000, 4
    torch.manual_seed(0)
    ref = Experts(E, h, inter).cuda()
    for p in ref.parameters():
        nn.init.normal_(p, 0.0, 0.02)
    xe = torch.randn(N, h, device="cuda")
    idx = torch.stack([torch.randperm(E - 1, device="cuda")[:k] for _ in range(N)])  # expert E-1: no tokens
    wts = torch.rand(N, k, device="cuda")
    dye = torch.randn(N, h, device="cuda")
    xr = xe.clone().requires_grad_()
    yr = ref(xr, idx, wts)
    yr.backward(dye)
    exp = {}
    for name, cfg in variants.items():
        ex = Experts(E, h, inter).cuda()
        ex.load_state_dict(ref.state_dict())
        fp8.convert(ex, cfg)
        xf = xe.clone().requires_grad_()
        y = ex(xf, idx, wts)
        y.backward(dye)
        exp[name] = {"y": round(sqnr_db(yr, y), 2), "dx": round(sqnr_db(xr.grad, xf.grad), 2),
                     **{p: round(sqnr_db(getattr(ref, p).grad, getattr(ex, p).grad), 2)
                        for p in ("gate_proj", "up_proj", "down_proj")},
                     "empty_expert_grad_zero": bool((ex.gate_proj.grad[E - 1] == 0).all())}
    res["experts_sqnr_db"] = exp
    kernels = REGISTRY.report()  # what the self-checks found (nanoseek/quant/checked.py)
    res["scaled_mm_disabled"] = {str(k): v for k, v in kernels.scaled_mm_fallbacks.items()}
    res["grouped_triton_disabled"] = dict(kernels.grouped_fallbacks)
    res["quantizer_choice"] = {str(k): v for k, v in kernels.quantizers.items()}  # the fused path's verified picks
    res["quantizer_fallbacks"] = {str(k): v for k, v in kernels.quantizer_fallbacks.items()}
    flat = {k: v for k, v in res.get("triton_vs_torch", {}).items() if isinstance(v, bool)}
    res["triton_quantizers_all_bit_identical"] = all(flat.values()) if flat else None
    for v in ("fast", "safe"):
        sel = [ok for k, ok in flat.items() if k.endswith(" " + v)]
        res[f"triton_quantizers_{v}_all_bit_identical"] = all(sel) if sel else None
    out["check"] = res
    print(json.dumps(res, indent=1), flush=True)


def part_gemm(out: dict, quick: bool) -> None:
    rows = []
    shapes = [r for r in GEMM_SHAPES if not r[0].startswith("v3 dense")] if quick else GEMM_SHAPES
    tri = None
    try:
        from nanoseek.quant import fp8_triton as tri
    except Exception:  # noqa: BLE001
        pass
    print(f"{'shape':34s} {'bf16':>7s} {'fp8':>7s} {'x':>5s} {'fp8+q eager':>12s} {'x':>5s} {'fp8+q triton':>13s} {'x':>5s}  (TFLOP/s)")
    for name, M, N, K in shapes:
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        flops = 2 * M * N * K
        t_bf = median_cuda_ms(lambda: a @ b.t())
        qa, qb = blocks.quantize(a, ACT), blocks.quantize(b, WEIGHT)
        t_f8 = median_cuda_ms(lambda: gemm.fp8_gemm(qa, qb, torch.bfloat16))
        t_q = median_cuda_ms(lambda: gemm.fp8_gemm(blocks.quantize(a, ACT), blocks.quantize(b, WEIGHT), torch.bfloat16))
        t_t = median_cuda_ms(lambda: gemm.fp8_gemm(tri.quantize_rows(a), blocks.quantize(b, WEIGHT), torch.bfloat16)) if tri else float("nan")
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
    qa, qb = blocks.quantize(a, ACT), blocks.quantize(b, ACT)
    t_bf, t_f8 = median_cuda_ms(lambda: a @ b.t()), median_cuda_ms(lambda: gemm.fp8_gemm(qa, qb, torch.float32))
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
    tri_ok = True
    try:
        from nanoseek.quant import fp8_triton  # noqa: F401
    except Exception as e:  # noqa: BLE001
        tri_ok = False
        print(f"no Triton kernels ({e!r}): fp8-eager only", flush=True)

    def run(name, make, x_shape, flops, extra_args=None, experts=False, swiglu_width=0):
        res = {"name": name}
        variants = {"bf16": None, "fp8-eager": FP8Config(kernels="off")}
        if tri_ok:
            variants["fp8-fused"] = FP8Config(kernels="triton", grouped="loop")
            # fused2 / grouped2: the other choice for gate and up (stacked or two GEMMs), side by side
            other = 0 if swiglu_width < FP8Config.stack_gate_up_below else 1 << 30
            if swiglu_width:
                variants["fp8-fused2"] = FP8Config(kernels="triton", grouped="loop", stack_gate_up_below=other)
            if experts:
                variants["fp8-grouped"] = FP8Config(kernels="triton", grouped="triton")
                variants["fp8-grouped2"] = FP8Config(kernels="triton", grouped="triton", stack_gate_up_below=other)
        for variant, cfg in variants.items():
            torch.manual_seed(0)
            m = make().cuda()
            if cfg is not None:
                fp8.convert(m, cfg)
            x = torch.randn(*x_shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            fn = (lambda: _fwd_bwd(lambda t: m(t, *extra_args), x)()) if extra_args else _fwd_bwd(m, x)
            try:
                fn()  # compile / autotune outside the timed region
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t = median_cuda_ms(fn, iters=5, warmup=2)
                res[variant + "_ms"] = t
                res[variant + "_tflops"] = flops / t / 1e9
                res[variant + "_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                res[variant + "_error"] = repr(e)[:300]
            for p in m.parameters():
                p.grad = None
            m = x = fn = None  # free this variant's model and activations before the next
            torch.cuda.empty_cache()
        for variant in variants:
            if variant != "bf16" and variant + "_ms" in res and "bf16_ms" in res:
                res[variant + "_speedup"] = res["bf16_ms"] / res[variant + "_ms"]
        rows.append(res)
        print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items() if k != "name"}, flush=True)

    T = 8192
    run("linear 8192x7168->18432 fwd+bwd", lambda: nn.Linear(7168, 18432, bias=False), (T, 7168),
        3 * 2 * T * 7168 * 18432)
    run("dense MLP v3 (7168, 18432) 8192 tok fwd+bwd", lambda: MLP(7168, 18432), (T, 7168), 3 * 3 * 2 * T * 7168 * 18432,
        swiglu_width=18432)
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
        extra_args=(idx, wts), experts=True, swiglu_width=inter)
    if not quick:
        # `small`: 64 experts of width 512, 16384 tokens x top-6 -> 1536 per expert
        E2, h2, i2, N2, k2 = 64, 1024, 512, 16384, 6
        idx2 = (torch.arange(N2, device="cuda")[:, None] * k2 + torch.arange(k2, device="cuda")) % E2
        wts2 = torch.full((N2, k2), 1.0 / k2, device="cuda")
        run("experts small (64 x 512, 1536 tok each) fwd+bwd", lambda: make_experts(E2, h2, i2), (N2, h2),
            3 * 3 * 2 * N2 * k2 * h2 * i2, extra_args=(idx2, wts2), experts=True, swiglu_width=i2)
    # fused2 / grouped2: gate and up the other way (the experts as two GEMMs, the dense MLP stacked)
    names = [v for v in ("fp8-eager", "fp8-fused", "fp8-fused2", "fp8-grouped", "fp8-grouped2")]
    print(f"\n{'block':48s} {'bf16 ms':>8s} " + " ".join(f"{n + ' ms (x)':>20s}" for n in names)
          + "   peak GiB bf16/" + "/".join(n.split("-")[1] for n in names))
    for r in rows:
        cells = []
        for n in names:
            cells.append(f"{r[n + '_ms']:9.2f} ({r[n + '_speedup']:4.2f}x)" if n + "_ms" in r else f"{'-':>20s}")
        peaks = "/".join(f"{r[n + '_peak_gib']:.2f}" if n + "_peak_gib" in r else "-" for n in ["bf16"] + names)
        print(f"{r['name']:48s} {r.get('bf16_ms', float('nan')):8.2f} " + " ".join(f"{c:>20s}" for c in cells) + "   " + peaks)
    out["layer"] = rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--parts", default="check,gemm,layer")
    p.add_argument("--json-out")
    a = p.parse_args()
    out = {"device": torch.cuda.get_device_name(), **environment("cuda")}
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
            traceback.print_exc()
            out[part + "_error"] = repr(e)[:500]
        print(f"[{part} done at {time.time() - t0:.0f}s]", flush=True)
        if a.json_out:
            with open(a.json_out, "w") as f:
                json.dump(out, f, indent=1)
    print_json(out)


if __name__ == "__main__":
    main()
