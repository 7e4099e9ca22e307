"""FP8 activation quantizers against the HBM copy bandwidth (DeepSeek-V3 report, arXiv 2412.19437,
section 3.3: 1x128 activation tiles, 128x1 for Wgrad, e4m3, fp32 scales).

In one process: the device-to-device copy bandwidth (`perf.measure_copy_bandwidth`, read + write
counted), then at DeepSeek-V3 shapes (tokens 4096..32768 x 7168 and x 2048; the routed experts'
8 segments x 4096 tokens x 2048) the first and the tiled quantizers (1x128 only; 1x128 + 128x1 in
one pass) and the fused producers (SwiGLU, RMSNorm: inputs read, FP8 written) against the 16-bit op
followed by the tiled quantizer. Every kernel's output is compared bit for bit with the PyTorch
reference (`gemm.TORCH_KERNELS`, `blocks.quantize`) before it is timed; RMSNorm against the
reference given the kernel's own rstd (its reduction order differs: fp8_triton_act). Prints a
table (ms, GB/s of the bytes each kernel must move, % of the copy bandwidth) and a JSON line.

    python -m benchmarks.bench_fp8_quant            # CUDA GPU with Triton (a few minutes)
    TRITON_INTERPRET=1 python -m benchmarks.bench_fp8_quant --quick   # CPU smoke test, tiny shapes
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from nanoseek.perf import measure_copy_bandwidth
from nanoseek.quant import blocks, gemm
from nanoseek.quant.checked import same_fp8, same_segments

from .common import environment, median_cuda_ms, print_json, table, timed


def _same(a, b) -> bool:
    """Both tilings (Fp8Tensor / SegmentsT pairs, either may be None) bit for bit."""
    if isinstance(a, blocks.Fp8Tensor):
        return same_fp8(a, b)
    return same_fp8(a[0], b[0]) and same_segments(a[1], b[1])


def _ms(fn, device, quick: bool) -> float:
    if device.type == "cuda":
        return median_cuda_ms(fn, iters=20, warmup=3)
    return 1e3 * sorted(timed(fn, device, 0, 1))[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test, e.g. on CPU under TRITON_INTERPRET=1)")
    args = ap.parse_args()
    from nanoseek.quant import fp8_triton, fp8_triton_act  # needs Triton with E4M3

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    copy_bw = measure_copy_bandwidth(device, nbytes=(16 * 2**20 if device.type != "cuda" else 2 * 2**30),
                                     iters=(2 if device.type != "cuda" else 10))
    ref = gemm.TORCH_KERNELS
    shapes = [(t, c, 1) for t in (4096, 8192, 16384, 32768) for c in (7168, 2048)] + [(8 * 4096, 2048, 8)]
    if args.quick:
        shapes = [(300, 256, 1), (2 * 130, 256, 2)]
    rows, results, all_exact = [], [], True
    for T, C, E in shapes:
        torch.manual_seed(0)
        x = torch.randn(T, C, device=device, dtype=torch.bfloat16)
        gu = torch.randn(T, 2 * C, device=device, dtype=torch.bfloat16)
        g, u = gu[:, :C], gu[:, C:]  # the stacked gate/up GEMM's output halves
        w = (1 + 0.1 * torch.randn(C, device=device)).to(torch.bfloat16)
        tm = blocks.tile_map([T // E] * E, device)
        nb, L = T * C, -(-C // 128)
        act_bytes = 2 * nb  # bf16 read
        rows_out = nb + 4 * T * L  # e4m3 + scales
        dual_out = 2 * nb + 4 * T * L + 4 * tm.n_tiles * C
        h = F.silu(g) * u
        cases = [  # name, kernel, reference result, bytes the kernel must move
            ("rows v1", lambda: fp8_triton.quantize_rows(x), lambda: blocks.quantize(x, blocks.ACT), act_bytes + rows_out),
            ("rows tiled", lambda: fp8_triton_act.quantize_rows_tiled(x), lambda: blocks.quantize(x, blocks.ACT),
             act_bytes + rows_out),
            ("dual v1", lambda: fp8_triton.quantize_act_dual(x, tm, variant="v1"), lambda: ref.quantize_act_dual(x, tm),
             act_bytes + dual_out),
            ("dual tiled", lambda: fp8_triton.quantize_act_dual(x, tm), lambda: ref.quantize_act_dual(x, tm),
             act_bytes + dual_out),
            ("swiglu+dual (bf16 op, quantizer)", lambda: fp8_triton.quantize_act_dual(F.silu(g) * u, tm),
             lambda: ref.quantize_act_dual(h, tm), 2 * act_bytes + dual_out),
            ("swiglu+dual fused", lambda: fp8_triton_act.swiglu_quantize_dual(g, u, tm),
             lambda: ref.quantize_act_dual(h, tm), 2 * act_bytes + dual_out),
        ]
        rq, rc, rstd = fp8_triton_act.rmsnorm_quantize_dual(x, w, 1e-6, tm)
        y = (x.float() * rstd[:, None]).to(x.dtype) * w
        rms_mod = lambda: (F.rms_norm(x.float(), (C,), eps=1e-6).to(x.dtype) * w)  # noqa: E731  (RMSNorm.forward)
        cases += [
            ("rmsnorm+dual (bf16 op, quantizer)", lambda: fp8_triton.quantize_act_dual(rms_mod(), tm),
             lambda: ref.quantize_act_dual(rms_mod(), tm), act_bytes + dual_out),
            ("rmsnorm+dual fused", lambda: fp8_triton_act.rmsnorm_quantize_dual(x, w, 1e-6, tm)[:2],
             lambda: ref.quantize_act_dual(y, tm), act_bytes + dual_out),
        ]
        base = {}
        for name, run, expect, nbytes in cases:
            exact = _same(run(), expect())
            all_exact &= exact
            ms = _ms(run, device, args.quick) if exact else float("nan")
            gbs = nbytes / (ms * 1e-3) / 1e9
            kind = name.split(" ")[0]
            speedup = base[kind] / ms if kind in base else 1.0
            base.setdefault(kind, ms)
            shape = f"{T}x{C}" + (f" ({E} seg)" if E > 1 else "")
            rows.append([shape, name, "yes" if exact else "NO", f"{ms:.3f}", f"{gbs:.0f}",
                         f"{100 * nbytes / (ms * 1e-3) / copy_bw:.0f}", f"{speedup:.2f}"])
            results.append({"tokens": T, "channels": C, "segments": E, "kernel": name, "exact": exact, "ms": ms,
                            "gb_per_s": gbs, "pct_copy_bw": 100 * nbytes / (ms * 1e-3) / copy_bw, "speedup": speedup})
        del x, gu, g, u, h, y
    table(f"FP8 activation quantizers (copy bandwidth {copy_bw / 1e9:.0f} GB/s; bytes: what each must read + write)",
          ["shape", "kernel", "exact", "ms", "GB/s", "% copy", "x first"], rows)
    print_json({"benchmark": "fp8_quant", "env": environment(device), "copy_bw_gb_per_s": copy_bw / 1e9,
                "all_exact": all_exact, "quick": args.quick, "rows": results})


if __name__ == "__main__":
    main()
