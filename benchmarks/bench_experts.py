"""Routed experts on one GPU (DeepSeekMoE, DeepSeek-V3 report section 2.1.2): `Experts`
impl="segments" (a per-expert loop) vs impl="grouped_mm" (one grouped GEMM per projection),
forward + backward at the `small` shapes with the same weights and routing; agreement (max |diff|
and relative norm of the output and every gradient) and time (median of repeats after 3 warm-ups,
TFLOP/s). benchmarks/RESULTS.md holds measured numbers.

    python -m benchmarks.bench_experts --json              # GPU
    python -m benchmarks.bench_experts --quick --json      # CPU smoke test, tiny shapes

Prints a table and, with --json, one JSON line with every number last.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from nanoseek.model import Experts

from .common import dtype_of, environment, log, print_json, table, timed

IMPLS = ("segments", "grouped_mm")
QUICK_SHAPE = dict(experts=8, hidden=256, width=128, top_k=2, tokens=512)
SMALL_SHAPE = dict(experts=64, hidden=1024, width=512, top_k=6, tokens=16384)  # the `small` preset's experts


def experts_problem(shape: dict, device, dtype):
    """Experts with N(0, 1/h) weights, tokens x [N, h], k distinct experts per token and their
    weights [N, k], an output gradient [N, h]; returns (experts, fwd_bwd) where fwd_bwd() runs
    forward + backward from zeroed gradients and returns the output."""
    E, h, inter, k, N = (shape[key] for key in ("experts", "hidden", "width", "top_k", "tokens"))
    torch.manual_seed(0)
    ex = Experts(E, h, inter).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0.0, h ** -0.5)
    x = torch.randn(N, h, device=device, dtype=dtype, requires_grad=True)
    idx = torch.rand(N, E, device=device).topk(k, dim=-1).indices  # [N, k], k distinct experts per token
    w = torch.rand(N, k, device=device) / k
    gy = torch.randn(N, h, device=device, dtype=dtype)

    def fwd_bwd():
        x.grad = None
        for p in ex.parameters():
            p.grad = None
        y = ex(x, idx, w)
        y.backward(gy)
        return y
    return ex, x, fwd_bwd


def pick_experts_impl(device, dtype) -> str:
    """"grouped_mm" where one forward + backward of it runs on `device` (tiny shapes), else
    "segments": the choice the model benchmarks make for their routed experts."""
    ex, _, fwd_bwd = experts_problem(QUICK_SHAPE, device, dtype)
    ex.impl = "grouped_mm"
    try:
        fwd_bwd()
        return "grouped_mm"
    except Exception as e:  # noqa: BLE001  (reported, then the loop is used)
        log(f"experts impl=grouped_mm unavailable ({type(e).__name__}: {str(e)[:200]}); using segments")
        return "segments"


def bench_experts(quick: bool, tokens: int | None, iters: int, device, dtype) -> dict:
    """Experts impl='segments' vs 'grouped_mm', forward + backward, same weights and routing."""
    shape = dict(QUICK_SHAPE if quick else SMALL_SHAPE)
    shape["tokens"] = tokens or shape["tokens"]
    E, h, inter, k, N = (shape[key] for key in ("experts", "hidden", "width", "top_k", "tokens"))
    ex, x, fwd_bwd = experts_problem(shape, device, dtype)
    out, res = {}, dict(shape=dict(shape, dtype=str(dtype)))
    flops = 3 * 2 * 3 * N * k * h * inter  # 3 GEMMs, 2 flop/MAC, fwd + 2x bwd
    for impl in IMPLS:
        ex.impl = impl
        try:
            y = fwd_bwd()
            out[impl] = [y.detach().float(), x.grad.float()] + [p.grad.float() for p in ex.parameters()]
            ts = timed(fwd_bwd, device, warmup=3, iters=iters)
            med = statistics.median(ts)
            res[impl] = dict(ms=1e3 * med, min_ms=1e3 * min(ts), tflops=flops / med / 1e12, ok=True)
        except Exception as e:  # report, don't hide: the model benchmarks fall back to segments
            res[impl] = dict(ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
            log(f"experts impl={impl} FAILED: {res[impl]['error']}")
    if "segments" in out and "grouped_mm" in out:
        names = ["out", "x.grad", "gate.grad", "up.grad", "down.grad"]
        res["max_abs_diff"] = {n: (a - b).abs().max().item() for n, a, b in zip(names, out["segments"], out["grouped_mm"])}
        res["rel_diff"] = {n: ((a - b).norm() / b.norm()).item() for n, a, b in zip(names, out["segments"], out["grouped_mm"])}
        res["speedup_grouped_over_segments"] = res["segments"]["ms"] / res["grouped_mm"]["ms"]
    rows = [[impl, f"{r['ms']:.2f}", f"{r['min_ms']:.2f}", f"{r['tflops']:.1f}"] if r.get("ok") else [impl, "FAIL", "-", "-"]
            for impl, r in ((i, res[i]) for i in IMPLS)]
    table(f"Routed experts fwd+bwd ({N} tokens, {E} experts, h={h}, w={inter}, top-{k}, {dtype})",
          ["impl", "median ms", "min ms", "TFLOP/s"], rows)
    if "max_abs_diff" in res:
        log("  max |segments - grouped_mm|: " + ", ".join(f"{n} {v:.3g}" for n, v in res["max_abs_diff"].items()))
        log("  relative (norm):             " + ", ".join(f"{n} {v:.3g}" for n, v in res["rel_diff"].items()))
        log(f"  grouped_mm speed-up: {res['speedup_grouped_over_segments']:.2f}x")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few iterations (CPU smoke test)")
    ap.add_argument("--json", action="store_true", help="print one JSON line with every number last")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32"])
    ap.add_argument("--iters-experts", type=int, default=None, help="timed repeats (default 20; 3 with --quick)")
    ap.add_argument("--experts-tokens", type=int, default=None)
    args = ap.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = torch.device(device).type == "cuda"
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    dtype = dtype_of(args.dtype)
    iters = args.iters_experts or (3 if args.quick else 20)
    results = {"env": {**environment(device), "device": device, "dtype": str(dtype), "quick": args.quick}}
    log(f"bench_experts: {results['env']}")
    results["experts"] = bench_experts(args.quick, args.experts_tokens, iters, device, dtype)
    if args.json:
        print_json(results)


if __name__ == "__main__":
    main()
