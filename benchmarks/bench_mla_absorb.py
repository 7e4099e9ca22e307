"""MLA decode one token at a time over the latent cache (DeepSeek-V3 report section 2.1.1; the
absorption is DeepSeek-V2's, arXiv 2405.04434 section 2.1.2): attn_impl="naive" (keys and values
re-expanded from the latent every step) vs "absorb" (W_UK folded into the query, W_UV into the
output), at batch 1 and 32 of the `small` preset; tokens/s, MBU (nanoseek/perf.py, against the copy bandwidth measured
in the same run), and whether the greedy tokens of the two paths agree (free-running and teacher
forced). benchmarks/RESULTS.md holds measured numbers.

    python -m benchmarks.bench_mla_absorb --json              # GPU
    python -m benchmarks.bench_mla_absorb --quick --json      # CPU smoke test, tiny config

Prints a table and, with --json, one JSON line with every number last.
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback

import torch

from nanoseek.perf import decode_bytes_per_token

from .bench_experts import pick_experts_impl
from .common import (bench_config, build_model, dtype_of, environment, log, mbu, measured_peaks, print_json, sync,
                     table)


@torch.no_grad()
def decode_run(model, prompt, new, impl, device, forced=None):
    """Prefill the prompt (default naive path) into the cache, then `new` single-token steps with
    attn_impl=impl. Returns (greedy tokens [B, new+1], seconds of the decode loop). With `forced`
    [B, >=new], step i feeds forced[:, i] instead of its own previous choice (teacher forcing)."""
    B, T = prompt.shape
    cache = model.make_cache(B, T + new + 1)
    tok = model(prompt, cache=cache)[:, -1].argmax(-1)
    toks = [tok]
    sync(device)
    t = time.perf_counter()
    for i in range(new):
        inp = tok if forced is None else forced[:, i]
        tok = model(inp[:, None], start_pos=T + i, cache=cache, attn_impl=impl)[:, -1].argmax(-1)
        toks.append(tok)
    sync(device)
    return torch.stack(toks, 1), time.perf_counter() - t


def compare_decode(model, cfg, device, args, bw):
    res, rows = {}, []
    g = torch.Generator(device="cpu").manual_seed(2)
    for B in args.decode_batches:
        prompt = torch.randint(0, cfg.vocab_size, (B, args.prompt), generator=g).to(device)
        out = {}
        for impl in ("naive", "absorb"):
            decode_run(model, prompt, args.new_tokens, impl, device)  # warm-up
            times, toks = [], None
            for _ in range(args.decode_repeats):
                toks, s = decode_run(model, prompt, args.new_tokens, impl, device)
                times.append(s)
            med = statistics.median(times)
            tps = B * args.new_tokens / med
            ctx = args.prompt + args.new_tokens / 2  # mean context over the decode
            bpt = decode_bytes_per_token(cfg, int(ctx), batch=B)
            out[impl] = dict(tokens=toks, r=dict(
                tokens_per_s=tps, ms_per_step=1e3 * med / args.new_tokens, seconds=med,
                mbu=mbu(tps, bpt, bw), bytes_per_token=bpt, mean_context=ctx))
        n, a = out["naive"]["tokens"], out["absorb"]["tokens"]
        same = (n == a)
        first_div = [int((~row).nonzero()[0]) if (~row).any() else row.numel() for row in same]
        # teacher-forced: absorbed path fed the naive path's tokens; does it choose the same next token?
        forced, _ = decode_run(model, prompt, args.new_tokens, "absorb", device, forced=n)
        r = dict(naive=out["naive"]["r"], absorb=out["absorb"]["r"],
                 greedy_match_fraction=same.float().mean().item(),
                 greedy_all_equal=bool(same.all()),
                 mean_tokens_before_first_divergence=sum(first_div) / len(first_div),
                 teacher_forced_match_fraction=(forced[:, 1:] == n[:, 1:]).float().mean().item(),
                 absorb_over_naive=out["absorb"]["r"]["tokens_per_s"] / out["naive"]["r"]["tokens_per_s"])
        res[f"batch{B}"] = r
        for impl in ("naive", "absorb"):
            x = r[impl]
            rows.append([B, impl, f"{x['tokens_per_s']:.0f}", f"{x['ms_per_step']:.2f}", f"{100 * x['mbu']:.2f}%"])
        rows.append([B, "absorb/naive", f"{r['absorb_over_naive']:.2f}x", "", ""])
    table(f"Decode, prompt {args.prompt}, {args.new_tokens} new tokens, greedy "
          f"(median of {args.decode_repeats} after 1 warm-up)",
          ["batch", "attn", "tok/s", "ms/step", "MBU"], rows)
    for B in args.decode_batches:
        r = res[f"batch{B}"]
        log(f"  batch {B}: greedy tokens equal naive vs absorb: {100 * r['greedy_match_fraction']:.1f}% of positions "
            f"(all equal: {r['greedy_all_equal']}; mean {r['mean_tokens_before_first_divergence']:.1f} tokens before the "
            f"first divergence); teacher-forced next-token agreement {100 * r['teacher_forced_match_fraction']:.1f}%")
    return res



def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny config and few iterations (CPU smoke test)")
    ap.add_argument("--json", action="store_true", help="print one JSON line with every number last")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32"])
    ap.add_argument("--prompt", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--decode-batches", type=int, nargs="+", default=None)
    ap.add_argument("--decode-repeats", type=int, default=None)
    ap.add_argument("--experts-impl", default="auto", choices=["auto", "grouped_mm", "segments"],
                    help="routed experts of the model (auto: grouped_mm where it runs, else segments)")
    args = ap.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    q = args.quick
    d = dict(prompt=16 if q else 128, new_tokens=8 if q else 256, decode_batches=[1, 4] if q else [1, 32],
             decode_repeats=2 if q else 3)
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    device, dtype = args.device, dtype_of(args.dtype)
    t_start = time.perf_counter()
    cfg = bench_config(q)
    results = {"env": {**environment(device), "device": args.device, "dtype": str(dtype), "quick": q}}
    log(f"bench_mla_absorb: {results['env']}")
    peak_flops, bw = measured_peaks(device)
    results["peaks"] = dict(matmul_tflops=peak_flops / 1e12, copy_tb_s=bw / 1e12)
    log(f"measured peaks: matmul {peak_flops / 1e12:.0f} TFLOP/s ({'bf16 8192^3' if on_gpu else 'fp32 small'}), "
        f"copy {bw / 1e12:.2f} TB/s (read+write)")
    experts_impl = pick_experts_impl(device, dtype) if args.experts_impl == "auto" else args.experts_impl
    results["experts_impl"] = experts_impl
    try:
        model = build_model(cfg, device, dtype, experts_impl).eval()
        results["decode"] = compare_decode(model, cfg, device, args, bw)
    except Exception as e:  # noqa: BLE001  (recorded in the JSON)
        traceback.print_exc()
        results["decode"] = dict(error=f"{type(e).__name__}: {str(e)[:600]}")
    results["wall_s"] = time.perf_counter() - t_start
    log(f"\ntotal wall time {results['wall_s']:.0f} s")
    if args.json:
        print_json(results)


if __name__ == "__main__":
    main()
