"""The quickstart's GRPO stage alone, from a given pretrained checkpoint, then its greedy accuracy
on the validation set (`--split test` for the test set): for comparing GRPO settings at one seed
without pretraining again.

    taskset -c 0 python -m dev.sweeps.rl_variant PRETRAIN_DIR OUT --threads 1 rl_lr=8e-5 rl_min_lr_ratio=0.1

Overrides are Recipe fields (k=v). Prints one RESULT line of JSON (dev/sweeps/sweep_rl.py runs this
per job)."""

import argparse
import json

import torch

from benchmarks.bench_quickstart import parse_overrides
from nanoseek.recipes.quickstart import Recipe, measure, rl_args, task_spec
from nanoseek.rl import grpo
from nanoseek.tasks import get_task


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="val", choices=["val", "test"], help="where to measure (settings are chosen on val)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rc = Recipe(**parse_overrides(",".join(a.overrides)))
    rl = grpo(rl_args(rc, a.model, a.out, a.seed, 500, progress=False, device="cpu"))
    task = get_task(task_spec(rc, 500))
    res = measure(a.out, task, task.problems(a.split), 0, rc.max_new_tokens, "cpu", rc.eval_context)
    print("RESULT " + json.dumps({"overrides": a.overrides, "threads": a.threads, "seconds": rl["seconds"],
                                  "steps": rl["steps"], a.split: res["accuracy"],
                                  f"{a.split}_strict": res["accuracy_strict"]}), flush=True)


if __name__ == "__main__":
    main()
