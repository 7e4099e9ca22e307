"""One GRPO variant of the quickstart's RL stage from a given pretrained checkpoint, then the
quickstart's held-out evaluation: for comparing GRPO settings at one seed without re-pretraining.

    taskset -c 0 python dev/rl_variant.py PRETRAIN_DIR OUT --threads 1 temperature=1.0 ...

Overrides are GRPOArgs fields (k=v). Prints one JSON line."""

import argparse
import json
import sys

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--k", type=int, default=0, help="pass@k samples in the final evaluation (0: greedy only)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    sys.path.insert(0, ".")
    from benchmarks.bench_quickstart import parse_overrides
    from nanoseek.quickstart import Recipe, measure
    from nanoseek.rl import GRPOArgs, grpo
    from nanoseek.tasks import Countdown
    rc = Recipe()
    args = dict(model=a.model, task=f"countdown:n_numbers={rc.n_numbers},test_size=500", out=a.out,
                max_steps=rc.rl_steps, prompts_per_step=rc.prompts_per_step, group_size=rc.group_size,
                temperature=rc.temperature, max_new_tokens=rc.max_new_tokens, lr=rc.rl_lr, warmup_steps=rc.rl_warmup,
                mu=rc.rl_mu, loss=rc.loss, beta=0.0, reward=rc.reward, seed=0, progress=False, device="cpu")
    args.update(parse_overrides(",".join(a.overrides)))
    rl = grpo(GRPOArgs(**args))
    task = Countdown(n_numbers=rc.n_numbers, test_size=500)
    res = measure(a.out, task, task.problems("test"), a.k, rc.max_new_tokens, "cpu", rc.eval_context)
    print(json.dumps({"overrides": a.overrides, "threads": a.threads, "rl_seconds": rl["seconds"], "steps": rl["steps"],
                      "accuracy": res["accuracy"], "accuracy_strict": res["accuracy_strict"]}), flush=True)


if __name__ == "__main__":
    main()
