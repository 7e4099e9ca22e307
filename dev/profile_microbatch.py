"""Why is a forward+backward of a small micro-batch so much slower per token than a big one?
Times `small` (bf16 autocast over fp32 weights, CE + MTP loss) at several batch sizes on one GPU,
then profiles the smallest: top CUDA kernels and top CPU ops, and the host syncs.

    python dev/profile_microbatch.py --batches 2,4,16 --seq-len 1024
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--batches", default="2,4,16")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--device", default="cuda")
    p.add_argument("--accumulate", action="store_true", help="keep .grad between steps (as micro-batches do)")
    a = p.parse_args()
    from nanoseek.config import ModelConfig
    from nanoseek.model import DeepSeekV3

    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cfg = ModelConfig.from_preset(a.preset)
    model = DeepSeekV3.from_config(cfg, device=dev, seed=0)
    params = [q for q in model.parameters() if q.requires_grad]

    def step(b):
        x = torch.randint(0, cfg.vocab_size, (b, a.seq_len + 1), device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()

    for b in map(int, a.batches.split(",")):
        for i in range(5):
            if not a.accumulate:
                for q in params:
                    q.grad = None
            sync()
            t0 = time.perf_counter()
            step(b)
            sync()
            dt = time.perf_counter() - t0
        print(f"batch {b:3d} x {a.seq_len}: {1000 * dt:8.1f} ms  {b * a.seq_len / dt:10,.0f} tok/s", flush=True)

    b = int(a.batches.split(",")[0])
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step(b)
        sync()
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total", row_limit=20, max_name_column_width=60))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
