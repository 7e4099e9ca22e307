"""Where does an FP8 training step of the wide model spend its GPU time, next to bf16?

Builds bench_fp8_train's WIDE model, runs a few forward+backward+AdamW steps in bf16 autocast and
with nanoseek.fp8.convert (fused kernels), profiles two steps of each and prints the GPU time per
kernel family (GEMMs bf16 / FP8, quantizers, attention, elementwise, optimizer...).
    PYTHONPATH=. python dev/profile_fp8_step.py [--batch 8 --seq 2048 --grouped loop]
"""
import argparse
import collections
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

from bench_fp8_train import WIDE  # noqa: E402
from bench_quant_dual import timed  # noqa: E402  (this folder)

from nanoseek import fp8  # noqa: E402
from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.model import DeepSeekV3  # noqa: E402

FAMILIES = [("fp8 gemm (_scaled_mm)", ("f8f8", "e4m3", "fp8_gemm", "scaled_mm", "sm90_xmma_gemm_e4m3")),
            ("triton grouped gemm", ("_grouped_gemm_kernel", "_grouped_wgrad_kernel")),
            ("fp8 quantizers", ("_quant",)),
            ("bf16/fp32 gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "ampere", "cublas")),
            ("attention", ("flash", "fmha", "attention")),
            ("optimizer", ("adam", "multi_tensor")),
            ("moe index/sort/scatter", ("index", "scatter", "gather", "sort", "radix", "cumsum")),
            ("copy/cast", ("copy", "cast", "convert")),
            ("elementwise/reduce", ("elementwise", "reduce", "vectorized", "softmax", "norm"))]


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k.lower() in low for k in keys):
            return fam
    return "other"


def time_and_profile(step, warmup: int = 4, iters: int = 5, width: int = 90):
    """Mean ms of `step` over `iters` calls (CUDA events, after `warmup`), then the GPU ms per call
    by kernel family and by kernel (names cut to `width`) over two profiled calls."""
    for _ in range(warmup - 1):  # (timed makes the last warm-up call)
        step()
    ms = timed(step, reps=iters) * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    fams, kernels = collections.Counter(), collections.Counter()
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if ev.device_type == torch.autograd.DeviceType.CUDA and t > 0:
            fams[family(ev.key)] += t / 2 / 1e3
            kernels[ev.key[:width]] += t / 2 / 1e3
    return ms, fams, kernels


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--kernels", default="auto", help="nanoseek.fp8.FP8Config.kernels of the fp8 model")
    p.add_argument("--grouped", default="auto", help="nanoseek.fp8.FP8Config.grouped (auto, loop, triton)")
    a = p.parse_args()
    res = {}
    for prec in ("bf16", "fp8"):
        torch.manual_seed(0)
        cfg = ModelConfig.from_preset("small", **{**WIDE, "vocab_size": 8192, "num_nextn_predict_layers": 0})
        model = DeepSeekV3.from_config(cfg, device=torch.device("cuda"), seed=0)
        model.train()
        if prec == "fp8":
            fp8.reset_kernel_checks()
            fp8.convert(model, fp8.FP8Config(kernels=a.kernels, grouped=a.grouped))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        x = torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1), device="cuda")

        def step(model=model, opt=opt, x=x):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(x[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step_ms, fams, kernels = time_and_profile(step)
        res[prec] = {"step_ms": step_ms, "families_ms": dict(fams.most_common()),
                     "top_kernels_ms": dict(kernels.most_common(12))}
        print(f"\n== {prec}: {step_ms:.1f} ms per step ({a.batch} x {a.seq} tokens); GPU ms per step by family")
        for f, t in fams.most_common():
            print(f"  {f:28s} {t:8.1f}")
        print("  top kernels:")
        for k, t in kernels.most_common(12):
            print(f"    {t:8.1f}  {k}")
        del model, opt, step
        torch.cuda.empty_cache()
    print(f"\nfp8 / bf16 step time: {res['fp8']['step_ms'] / res['bf16']['step_ms']:.2f}x")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
