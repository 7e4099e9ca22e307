"""Where does a forward+backward of one FP8 block at DeepSeek-V3 dims spend its GPU time, next to
bf16? The dense SwiGLU MLP (7168 -> 18432, 8192 tokens) and the routed experts (8 x 2048, 4096
tokens each) of benchmarks/bench_fp8.py's layer part, profiled per kernel and per kernel family,
for each launch setting given (fp8_triton.DUAL_LAUNCH / WEIGHT_LAUNCH overrides).
    PYTHONPATH=. python dev/profile_fp8_block.py [--variant '{"weight": {"T_MODE": 2}}' ...]
"""
import argparse
import json
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from profile_fp8_step import time_and_profile  # noqa: E402

from nanoseek import fp8, fp8_triton  # noqa: E402
from nanoseek.model import MLP, Experts  # noqa: E402


def blocks():
    T, E, h, inter, N = 8192, 8, 7168, 2048, 4096
    idx = torch.arange(E, device="cuda").repeat(N, 1)
    wts = torch.full((N, E), 1.0 / E, device="cuda")

    def experts():
        ex = Experts(E, h, inter)
        for p in ex.parameters():
            nn.init.normal_(p, 0.0, 0.02)
        return ex
    return [("dense MLP v3 (7168, 18432), 8192 tok", lambda: MLP(7168, 18432), (T, 7168), ()),
            ("experts v3 (8 x 2048, 4096 tok each)", experts, (N, h), (idx, wts))]


def profile(make, x_shape, args, cfg):
    torch.manual_seed(0)
    m = make().cuda()
    if cfg is not None:
        fp8.convert(m, cfg)
    x = torch.randn(*x_shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(x, *args)
        y.float().sum().backward()
    ms, fams, kernels = time_and_profile(step, warmup=3, iters=10, width=100)
    return {"ms": ms, "gpu_ms": sum(fams.values()), "families_ms": dict(fams.most_common()),
            "top_kernels_ms": dict(kernels.most_common(14))}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", action="append", default=[],
                   help='launch overrides, JSON {"dual": {...}, "weight": {...}}; one profile each')
    a = p.parse_args()
    res = {}
    launches = {"dual": fp8_triton.DUAL_LAUNCH, "weight": fp8_triton.WEIGHT_LAUNCH}
    defaults = {k: dict(v) for k, v in launches.items()}
    for name, make, shape, args in blocks():
        res[name] = {"bf16": profile(make, shape, args, None)}
        for d in [{}] + [json.loads(s) for s in a.variant]:
            for k, launch in launches.items():
                launch.update({**defaults[k], **d.get(k, {})})
            fp8.reset_kernel_checks()
            key = "fp8 " + (json.dumps(d) if d else "default")
            res[name][key] = profile(make, shape, args, fp8.FP8Config(kernels="triton", grouped="loop"))
            res[name][key]["choices"] = {str(k): v for k, v in fp8._QUANT_CHOICE.items()}
        for k, launch in launches.items():
            launch.update(defaults[k])
        bf = res[name]["bf16"]["ms"]
        for k, r in res[name].items():
            print(f"\n== {name}, {k}: {r['ms']:.2f} ms ({bf / r['ms']:.2f}x bf16), GPU kernels {r['gpu_ms']:.2f} ms")
            for f, t in r["families_ms"].items():
                print(f"  {f:28s} {t:8.2f}")
            print("  top kernels:")
            for kn, t in r["top_kernels_ms"].items():
                print(f"    {t:8.2f}  {kn}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
