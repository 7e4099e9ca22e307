"""Which way of writing W^T in the 128x128 weight quantizer is bit-exact on this GPU, and how fast?

fp8_triton.quantize_weight_dual writes W's E4M3 blocks and those of W^T (the Dgrad operand). Its
kernel can transpose each block's codes in registers (T_MODE 1), or load the block a second time
transposed (T_MODE 2); the "copy" variant writes W only and transposes the bytes with PyTorch.
Each way, in both compilations (fast: size-specialized, safe: not), is compared with the PyTorch
reference (fp8.TorchKernels) at shapes divisible by 16 and not, single and stacked (SwiGLU's gate
and up), then timed at DeepSeek-V3 shapes (fp32 master weights).
    PYTHONPATH=. python dev/debug_fp8_weight.py
"""
import json

import torch

from nanoseek import fp8, fp8_triton as ft

from bench_quant_dual import timed  # this folder


def same(out, ref) -> bool:
    return all(fp8._same_fp8(a, b) for a, b in zip(out, ref))


WAYS = [("T1 fast", 1, "fast"), ("T1 safe", 1, "safe"), ("T2 fast", 2, "fast"), ("T2 safe", 2, "safe"),
        ("copy", 1, "copy")]


def main():
    g = torch.Generator(device="cuda").manual_seed(0)
    res, default = {"exact": {}, "ms": {}}, ft.WEIGHT_LAUNCH["T_MODE"]
    cases = [[(18432, 7168)], [(2048, 7168)], [(256, 256)], [(1024, 2048)], [(200, 328)], [(130, 260)],
             [(7168, 1536)], [(8, 2048, 7168)], [(3, 130, 260)], [(2048, 7168), (2048, 7168)],
             [(8, 2048, 7168), (8, 2048, 7168)], [(256, 328), (200, 328)], [(4, 128, 260), (4, 130, 260)]]
    for shapes in cases:
        ws = [torch.randn(*sh, device="cuda", generator=g) * 0.02 for sh in shapes]
        for pow2 in (False, True):
            ref = fp8.TORCH_KERNELS.quantize_weight_dual(ws, pow2)
            row = {}
            for name, mode, variant in WAYS:
                ft.WEIGHT_LAUNCH["T_MODE"] = mode
                with ft.sentinel_outputs():
                    try:
                        row[name] = same(ft.quantize_weight_dual(ws, pow2, variant=variant), ref)
                    except Exception as e:  # noqa: BLE001
                        row[name] = f"error {str(e)[:150]}"
            res["exact"][f"{shapes} pow2={pow2}"] = row
            print(shapes, f"pow2={pow2}", json.dumps(row), flush=True)
    for shapes in ([(18432, 7168)], [(7168, 18432)], [(8, 2048, 7168), (8, 2048, 7168)], [(8, 7168, 2048)]):
        ws = [torch.randn(*sh, device="cuda", generator=g) * 0.02 for sh in shapes]
        n = sum(w.numel() for w in ws)
        row = {"torch ref": timed(lambda: fp8.TORCH_KERNELS.quantize_weight_dual(ws)) * 1e3}
        for name, mode, variant in WAYS:
            ft.WEIGHT_LAUNCH["T_MODE"] = mode
            row[name] = timed(lambda: ft.quantize_weight_dual(ws, variant=variant)) * 1e3
        res["ms"][str(shapes)] = row
        print(shapes, " ".join(f"{k} {v:.3f} ms ({n * 6 / v / 1e6:.0f} GB/s)" for k, v in row.items()), flush=True)
    ft.WEIGHT_LAUNCH["T_MODE"] = default
    print(json.dumps(res))


if __name__ == "__main__":
    main()
