"""The quickstart's story at GPU scale: a ~170M-parameter DeepSeek-V3 (MLA + DeepSeekMoE, 16 routed
experts top-2, one shared) pretrained by us on Countdown worked solutions mixed with English text,
then GRPO with the rule-based verifier, then the control (the same seconds of more supervised
training). Held-out greedy accuracy (lenient / strict), pass@8, sampled accuracy and mean response
length before and after; then rollout tokens/s of the nanoseek engine against transformers'
`generate` on the pretrained checkpoint (benchmarks/bench_grpo.py, same prompts and settings).

    python -m benchmarks.bench_grpo_scale --text .carry/text --out runs/grpo_scale \
        --pretrain-seconds 150 --rl-seconds 240

Budgets are wall-clock seconds (pretraining, GRPO, control), so the run fits a fixed GPU slot.
Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from nanoseek.recipes.quickstart import Recipe, quickstart

from . import bench_grpo
from .common import environment, print_json

# ~168M parameters with a 4,096-token vocabulary: 8 layers (the first dense), width 768, MLA with a
# 256-wide latent, 12 heads; 16 routed experts of width 512, top-2, one shared expert.
SCALE_MODEL = dict(hidden_size=768, intermediate_size=2048, moe_intermediate_size=512, num_attention_heads=12,
                   kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16,
                   num_experts_per_tok=2, num_hidden_layers=8, max_position_embeddings=512)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/grpo_scale")
    p.add_argument("--text", help="English text folder/files mixed into pretraining (default: none)")
    p.add_argument("--n-numbers", type=int, default=4,
                   help="Countdown numbers per problem (3 has only 1,364 distinct training problems, which a "
                        "168M model memorizes: GRPO then sees ~100%% reward and learns nothing; RESULTS.md)")
    p.add_argument("--train-problems", type=int, default=200_000)
    p.add_argument("--pretrain-seconds", type=float, default=150)
    p.add_argument("--rl-seconds", type=float, default=240, help="GRPO seconds (45 s = 43 steps moved nothing; the CPU recipe needed 150+ steps)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--rl-lr", type=float, default=2e-5)
    p.add_argument("--rl-min-lr-ratio", type=float, default=1.0,
                   help="cosine decay of the RL lr to this fraction (1: constant, as in the recorded runs)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--eval-problems", type=int, default=500)
    p.add_argument("--no-control", action="store_true")
    p.add_argument("--no-rollout-bench", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true", help="a tiny model (to check the script on a CPU; give small --pretrain-seconds and --rl-seconds too)")
    a = p.parse_args()
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = dict(SCALE_MODEL)
    if a.tiny:
        model.update(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=2,
                     kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                     num_hidden_layers=2)
    rc = Recipe(n_numbers=a.n_numbers, train_problems=a.train_problems, model=model,
                text=(a.text,) if a.text else (), tokenizer_size=4096 if a.text else 300,
                batch_size=a.batch_size, seq_len=a.seq_len, pretrain_lr=a.pretrain_lr, pretrain_steps=1_000_000,
                pretrain_seconds=a.pretrain_seconds, rl_steps=1_000_000, rl_seconds=a.rl_seconds, rl_lr=a.rl_lr,
                rl_min_lr_ratio=a.rl_min_lr_ratio,
                prompts_per_step=a.prompts, group_size=a.group, eval_context=128)
    t0 = time.time()
    r = quickstart(out=a.out, recipe=rc, control=not a.no_control, eval_problems=a.eval_problems, register=False,
                   progress=False, device=device)
    hw = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    rows = [("after pretraining", r["pretrain_seconds"], "before_rl"), ("after GRPO", r["rl_seconds"], "after_rl")]
    print(f"\nGRPO at scale on {hw}: {r['params'] / 1e6:.1f}M parameters, {r['task']}, {r['eval_problems']} held-out "
          f"problems, text mixed in: {bool(a.text)}")
    print(f"{'stage':<22} {'seconds':>8} {'steps':>7} {'greedy':>7} {'strict':>7} {'pass@8':>7} {'sampled':>8} {'length':>7}")
    for name, secs, key in rows:
        steps = r["pretrain_steps"] if key == "before_rl" else r["rl_steps"]
        print(f"{name:<22} {secs:>8.0f} {steps:>7} {100 * r[f'accuracy_{key}']:>6.1f}% "
              f"{100 * r[f'strict_accuracy_{key}']:>6.1f}% {100 * r[f'pass_at_8_{key}']:>6.1f}% "
              f"{100 * r[f'sampled_accuracy_{key}']:>7.1f}% {r[f'mean_length_{key}']:>7.1f}")
    if "accuracy_control" in r:
        print(f"{'control: more SFT':<22} {r['control_seconds']:>8.0f} {r['control_steps']:>7} "
              f"{100 * r['accuracy_control']:>6.1f}% {100 * r['strict_accuracy_control']:>6.1f}% "
              f"{100 * r['pass_at_8_control']:>6.1f}% {100 * r['sampled_accuracy_control']:>7.1f}%")
    print(f"RL gain {100 * (r['accuracy_after_rl'] - r['accuracy_before_rl']):+.1f} points")
    result = {**environment(device), "hardware": hw, "quickstart": r}
    if not a.no_rollout_bench:
        cmd = [sys.executable, "-m", bench_grpo.__name__, "--model", os.path.join(a.out, "pretrain"),
               "--task", f"countdown:n_numbers={a.n_numbers}", "--prompts", str(a.prompts), "--group", str(a.group),
               "--device", device]
        out = subprocess.run(cmd, capture_output=True, text=True)
        print(out.stdout.rstrip())
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        result["rollouts"] = json.loads(lines[-1]) if lines else {"error": out.stderr[-2000:]}
    result["wall_s"] = round(time.time() - t0, 1)
    print_json(result)


if __name__ == "__main__":
    main()
