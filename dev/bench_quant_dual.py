"""How fast is the fused 1x128 + 128x1 activation quantizer (fp8_triton._quant_dual_kernel) per
launch setting (fp8_triton.DUAL_LAUNCH), and with one of its two outputs alone, against the HBM
bandwidth of a plain copy of the same tensor? Every setting's output (E4M3 bytes and scales of
both quantizations) is compared with the PyTorch reference before it is timed.
    PYTHONPATH=. python dev/bench_quant_dual.py
"""
import json

import torch

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


def same(out, ref) -> bool:
    return fp8._same_fp8(out[0], ref[0]) and fp8._same_segments(out[1], ref[1])


SETTINGS = [dict(num_warps=w) for w in (2, 4, 8, 16)]


def main():
    res, default = {}, dict(ft.DUAL_LAUNCH)
    shapes = ((16384, 4096, torch.bfloat16, 8), (32768, 2048, torch.bfloat16, 8), (8192, 18432, torch.bfloat16, 1),
              (8192, 7168, torch.bfloat16, 1), (16384, 4096, torch.float32, 8))
    for T, C, dt, n_seg in shapes:
        x = torch.randn(T, C, device="cuda", dtype=dt)
        tm = fp8.tile_map([T // n_seg] * n_seg, "cuda")
        ref = fp8.TORCH_KERNELS.quantize_act_dual(x, tm)
        byt = T * C * (x.element_size() + 2) + 2 * T * (C // 128) * 4
        row = {"copy_GBps": round(2 * T * C * x.element_size() / timed(lambda: x.clone()) / 1e9)}
        for cfg in SETTINGS:
            ft.DUAL_LAUNCH.update(cfg)
            name = f"{cfg['num_warps']} warps"
            try:
                ok = same(ft.quantize_act_dual(x, tm), ref)
                t = timed(lambda: ft.quantize_act_dual(x, tm))
                row[name] = {"GBps": round(byt / t / 1e9), "ms": round(t * 1e3, 3), "exact": ok}
            except Exception as e:  # a setting this Triton cannot compile
                row[name] = {"error": str(e)[:200]}
        for part, kw in (("rows only", dict(cols=False)), ("cols only", dict(rows=False))):
            ft.DUAL_LAUNCH.update(default)
            t = timed(lambda: ft.quantize_act_dual(x, tm, **kw))
            row[f"default {part}"] = {"ms": round(t * 1e3, 3)}
        ft.DUAL_LAUNCH.update(default)
        res[f"{T}x{C} {str(dt)[6:]} {n_seg} seg"] = row
        print(f"{T}x{C} {dt} ({n_seg} segments): copy {row['copy_GBps']} GB/s; " + ", ".join(
            f"{k} {v.get('GBps', v.get('ms'))}{'' if v.get('exact', True) else ' WRONG'}" if "error" not in v
            else f"{k} error" for k, v in row.items() if k != "copy_GBps"), flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
