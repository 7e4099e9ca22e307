"""How close the FP8 grouped GEMMs come to the fp32 emulation on one GPU: the Triton kernels and
the per-expert cuBLAS blockwise `_scaled_mm` on the same FP8 operands (SQNR in dB, max |diff|
relative to max |ref|). Prints one line per size set; the numbers go to dev/LOG.md."""

import torch

from nanoseek.quant import fp8_triton as ft
from nanoseek.quant.blocks import tile_map
from nanoseek.quant.fp8 import sqnr_db
from nanoseek.quant.gemm import TORCH_KERNELS


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(2)
    for sizes in ([300], [0, 1, 127, 128, 129, 0, 513], [64] * 16, [4096] * 8):
        E, N, K = len(sizes), 256, 384 if max(sizes) < 4096 else 2048
        x = torch.randn(sum(sizes), K, device="cuda", generator=g, dtype=torch.bfloat16)
        w = torch.randn(E, N, K, device="cuda", generator=g) * 0.02
        tm = tile_map(sizes, "cuda")
        xq, _ = TORCH_KERNELS.quantize_act_dual(x, tm)
        wq, _ = TORCH_KERNELS.quantize_weight_dual(w)
        ref = TORCH_KERNELS.grouped_gemm(xq, wq, tm, torch.float32, "emulate")
        row = {"sizes": sizes if len(sizes) < 9 else f"{len(sizes)}x{sizes[0]}", "K": K}
        for name, got in (("triton", ft.KERNELS.grouped_gemm(xq, wq, tm, torch.float32)),
                          ("cublas", TORCH_KERNELS.grouped_gemm(xq, wq, tm, torch.float32, "scaled_mm"))):
            row[name] = (round(sqnr_db(ref, got), 1),
                         float(f"{((got - ref).abs().max() / ref.abs().max()).item():.2e}"))
        print(row, flush=True)


if __name__ == "__main__":
    main()
