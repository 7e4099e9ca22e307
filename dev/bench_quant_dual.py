"""How fast is the fused 1x128 + 128x1 activation quantizer (fp8_triton._quant_dual_kernel) per
launch setting, against the HBM bandwidth of a plain copy of the same tensor?
    PYTHONPATH=. python dev/bench_quant_dual.py
"""
import json

import torch
import triton

from nanoseek import fp8, fp8_triton as ft


def timed(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps / 1e3


def main():
    res = {}
    for T, C, dt in ((16384, 4096, torch.bfloat16), (32768, 2048, torch.bfloat16), (16384, 11008, torch.bfloat16),
                     (16384, 4096, torch.float32), (32768, 2048, torch.float32)):
        x = torch.randn(T, C, device="cuda", dtype=dt)
        tm = fp8.tile_map([T // 8] * 8, "cuda")
        ref = fp8.TORCH_KERNELS.quantize_act_dual(x, tm)
        byt = T * C * (x.element_size() + 2) + 2 * T * (C // 128) * 4
        t_copy = timed(lambda: x.clone())
        row = {"copy_GBps": round(2 * T * C * x.element_size() / t_copy / 1e9)}
        for w in (2, 4, 8, 16):
            for st in (1, 2, 3):
                L, P = triton.cdiv(C, 128), tm.n_tiles
                qr = torch.empty(T, C, dtype=ft.E4M3, device="cuda")
                sr = torch.empty(L, T, dtype=torch.float32, device="cuda")
                qc = torch.empty(P * 128 * C, dtype=ft.E4M3, device="cuda")
                sc = torch.empty(P, C, dtype=torch.float32, device="cuda")

                def run():
                    ft._quant_dual_fast[(P, L)](x, qr, sr, qc, sc, tm.prog, T, C, P, x.stride(0), EPS_C=ft.EPS,
                                                POW2=False, ROWS_OUT=True, COLS_OUT=True, num_warps=w, num_stages=st)
                t = timed(run)
                ok = (torch.equal(qr.view(torch.uint8), ref[0].data.view(torch.uint8))
                      and torch.equal(qc.view(torch.uint8), ref[1].data.view(torch.uint8))
                      and torch.equal(sr.t(), ref[0].scale) and torch.equal(sc, ref[1].scale))
                row[f"w{w}s{st}"] = {"GBps": round(byt / t / 1e9), "ms": round(t * 1e3, 3), "exact": ok}
        res[f"{T}x{C} {str(dt)[6:]}"] = row
        print(f"{T}x{C} {dt}: copy {row['copy_GBps']} GB/s; " + ", ".join(
            f"{k} {v['GBps']} GB/s{'' if v['exact'] else ' WRONG'}" for k, v in row.items() if k != "copy_GBps"),
            flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
