"""MTP speculative decoding: acceptance rate and speed-up over plain greedy decoding, on a
checkpoint trained with MTP (DeepSeek-V3 report: 85-90% acceptance of the second token, 1.8x
tokens/s). Prints a table and a final JSON line.

    python -m benchmarks.bench_mtp_speculative --model RUN_DIR --prompts 8 --new 64
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from nanoseek import DeepSeekV3
from nanoseek.data import Batches, TokenShard

from .common import environment, print_json


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="a checkpoint trained with MTP (e.g. a nanoseek train run dir)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    model = DeepSeekV3.from_pretrained(a.model, device=a.device).eval()
    val = os.path.join(a.model, "data", "val.bin")
    if os.path.exists(val):  # prompts from held-out text
        x, _ = Batches(TokenShard(val), a.prompt_len, a.prompts, seed=1).get(0)
    else:
        x = torch.randint(0, model.config.vocab_size, (a.prompts, a.prompt_len))
    x = x.to(a.device)
    plain_t = spec_t = 0.0
    drafted = accepted = 0
    same = True
    for i in range(a.prompts):
        ids = x[i:i + 1]
        t = time.perf_counter()
        ref = model.generate(ids, max_new_tokens=a.new)
        plain_t += time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=a.new, speculative=True)
        spec_t += time.perf_counter() - t
        same &= torch.equal(ref, out)
        drafted += model.speculative_stats.drafted
        accepted += model.speculative_stats.accepted
    res = {"model": a.model, "device": a.device, **environment(a.device), "prompts": a.prompts, "new_tokens": a.new,
           "acceptance_rate": accepted / max(drafted, 1), "plain_tokens_per_s": a.prompts * a.new / plain_t,
           "speculative_tokens_per_s": a.prompts * a.new / spec_t, "speedup": plain_t / spec_t,
           "identical_output": bool(same)}
    print(f"{'decoding':<14}{'tokens/s':>10}")
    print(f"{'plain greedy':<14}{res['plain_tokens_per_s']:>10.1f}")
    print(f"{'MTP drafts':<14}{res['speculative_tokens_per_s']:>10.1f}   acceptance {100 * res['acceptance_rate']:.1f}%, "
          f"speed-up {res['speedup']:.2f}x, identical output: {res['identical_output']}")
    print_json(res)


if __name__ == "__main__":
    main()
