"""CPU matmul throughput and error of GGML-quantized weights (nanoseek.quant.qlinear.QuantLinear)
at DeepSeek-V2-Lite shapes: a routed expert's projection (2048 -> 1408) and the dense FFN's
(2048 -> 10944), for 1 token (decode) and 64 tokens (prefill), against the fp32 and bf16 float
matmuls. Each qtype runs its exact path (dequantize the layer into the activations' dtype, then
the GEMM; with fp32 and with bf16 activations) and, for q4_0 / q4_k, the int4 CPU GEMM (torch._weight_int4pack_mm_for_cpu). The error
column is the output's relative RMS error against the fp32 float matmul (quantization plus path);
"vs exact" is the fast path's against the exact path of the same bytes.

    python -m benchmarks.bench_quant [--threads 2] [--iters 5] [--shapes expert,dense] [--tokens 1,64]

Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn as nn

from nanoseek.quant.ggml import quantize
from nanoseek.quant.qlinear import QuantLinear, int4pack_available

from .common import environment, fmt, print_json, table, timed

SHAPES = {"expert": (2048, 1408), "dense": (2048, 10944)}  # (in, out): V2-Lite moe / dense intermediate
QTYPES = ["q8_0", "q6_k", "q5_0", "q4_k", "q4_0"]


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).pow(2).mean() / b.float().pow(2).mean()).sqrt().item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--shapes", default="expert,dense")
    p.add_argument("--tokens", default="1,64")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    rows, results = [], []
    for shape in a.shapes.split(","):
        k, n = SHAPES[shape]
        lin = nn.Linear(k, n, bias=False)
        with torch.no_grad():
            lin.weight.normal_(0.0, 0.02, generator=g)
        w32, w16 = lin.weight.detach(), lin.weight.detach().bfloat16()
        layers = {}
        for q in QTYPES:
            layers[(q, "exact")] = QuantLinear(quantize(w32, q), q, k)
            if q in ("q4_0", "q4_k") and int4pack_available():
                layers[(q, "int4pack")] = QuantLinear(layers[(q, "exact")].qweight, q, k, fast=True)
        for m in map(int, a.tokens.split(",")):
            x = torch.randn(m, k, generator=g)
            ref = x @ w32.t()
            cases = [("fp32", "float", 4.0, lambda: x @ w32.t(), None),
                     ("bf16", "float", 2.0, lambda: x.bfloat16() @ w16.t(), None)]
            for (q, path), layer in layers.items():
                bpw = layer.qweight.numel() / (k * n)
                exact = layers[(q, "exact")] if path != "exact" else None
                cases.append((q, path, bpw, (lambda lay=layer: lay(x)), exact))
                if path == "exact":  # the same bytes dequantized into bf16, GEMM in bf16
                    cases.append((q, "exact bf16", bpw, (lambda lay=layer, xb=x.bfloat16(): lay(xb)), layer))
            with torch.no_grad():
                for name, path, bpw, fn, exact in cases:
                    secs = statistics.median(timed(fn, "cpu", warmup=1, iters=a.iters))
                    y = fn()
                    r = {"shape": shape, "in": k, "out": n, "tokens": m, "qtype": name, "path": path,
                         "bytes_per_weight": bpw, "ms": secs * 1e3, "gflops": 2 * m * k * n / secs / 1e9,
                         "weight_gbps": k * n * bpw / secs / 1e9, "rel_rms_vs_fp32": rel_rms(y, ref),
                         "rel_rms_vs_exact": rel_rms(y, exact(x)) if exact is not None else None}
                    results.append(r)
                    rows.append([shape, m, name, path, fmt(bpw, ".3f"), fmt(r["ms"], ".2f"), fmt(r["gflops"], ".1f"),
                                 fmt(r["weight_gbps"], ".2f"), fmt(r["rel_rms_vs_fp32"], ".2e"),
                                 "" if r["rel_rms_vs_exact"] is None else fmt(r["rel_rms_vs_exact"], ".1e")])
    table(f"CPU matmul, {a.threads} threads (median of {a.iters}; error: relative RMS of the output)",
          ["shape", "tokens", "weights", "path", "B/weight", "ms", "GFLOP/s", "weight GB/s", "err vs fp32",
           "vs exact"], rows)
    print_json({"bench": "quant", "env": environment("cpu"), "threads": a.threads, "results": results})


if __name__ == "__main__":
    main()
