"""MLA vs standard multi-head attention with the same heads and head dims, in the same engine
(DeepSeek-V2 report: MLA's small KV cache is what lets larger batches and longer contexts fit).
Reports cache bytes per token (exact), the longest context and the largest batch that fit in the
free GPU memory, and decode throughput at a large batch with a long prompt. Table + JSON line.

    python -m benchmarks.bench_mla_vs_mha --batch 64 --context 4096 --new 64
"""

from __future__ import annotations

import argparse
import time

import torch

from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.infer.engine import Engine

from .bench_decode import run_engine
from .common import environment, pangram_tokenizer, print_json


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tok = pangram_tokenizer(300)
    rows = []
    for attention in ("mla", "mha"):
        cfg = ModelConfig.from_preset(a.preset, attention=attention)
        per_token = cfg.kv_cache_bytes_per_token(2)["mla_kv_bytes_per_token" if attention == "mla" else "mha_kv_bytes_per_token"]
        model = DeepSeekV3.from_config(cfg, device=device, dtype=dtype, seed=0).eval()
        free = torch.cuda.mem_get_info()[0] * 0.9 if device.type == "cuda" else None
        engine = Engine(model, tok, max_context=a.context + a.new + 8, max_batch=a.batch)
        prompts = torch.randint(0, cfg.vocab_size, (a.batch, a.context), generator=torch.Generator().manual_seed(0)).tolist()
        t = time.perf_counter()
        run_engine(engine, prompts, 4)  # warm-up (and CUDA-graph capture at this batch)
        ttft, tps = run_engine(engine, prompts, a.new)
        row = {"attention": attention, "kv_bytes_per_token": per_token, "batch": a.batch, "context": a.context,
               "ttft_s": ttft, "decode_tokens_per_s": tps, "seconds": time.perf_counter() - t}
        if free:
            row["max_context_at_batch_1"] = int(free // per_token)
            row[f"max_batch_at_context_{a.context}"] = int(free // (per_token * (a.context + a.new)))
        rows.append(row)
        print(row, flush=True)
        engine.close()
        del engine, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    mla, mha = rows
    print(f"\n{a.preset}: MLA vs MHA (same heads and dims), batch {a.batch}, prompt {a.context}, {a.new} new tokens")
    print(f"{'attention':<10}{'KV B/token':>12}{'decode tok/s':>14}{'TTFT s':>9}")
    for r in rows:
        print(f"{r['attention']:<10}{r['kv_bytes_per_token']:>12,}{r['decode_tokens_per_s']:>14,.0f}{r['ttft_s']:>9.2f}")
    res = {"rows": rows, "cache_ratio": mha["kv_bytes_per_token"] / mla["kv_bytes_per_token"],
           "decode_speedup": mla["decode_tokens_per_s"] / mha["decode_tokens_per_s"],
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", **environment(device)}
    print(f"MHA cache / MLA cache: {res['cache_ratio']:.1f}x; MLA decode speed-up: {res['decode_speedup']:.2f}x")
    print_json(res)


if __name__ == "__main__":
    main()
