"""Quickstart recipe variants side by side: each variant is a full `nanoseek quickstart` run
(pretrain, evaluate, GRPO, evaluate, optional control) in its own process pinned to 2 CPU cores,
all at once, so a machine with many cores measures several recipes (or seeds) in one go.

    python -m benchmarks.bench_quickstart --out runs/sweep \
        --control base -- base '' lr1e-4 'rl_lr=1e-4' seed1 'seed=1'

Prints a table and a final JSON line with every variant's results."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from .common import environment, print_json

WORKER = r"""
import json, sys, torch
torch.set_num_threads(2)
from nanoseek.recipes.quickstart import Recipe, quickstart
spec = json.loads(sys.argv[1])
seed = spec.pop("seed", 0)
control = spec.pop("control", False)
alongside = bool(spec.pop("alongside", 0))  # 1: the control next to GRPO, one thread each; 0: after it
evals = spec.pop("eval_problems", 500)
r = quickstart(out=spec.pop("out"), recipe=Recipe(**spec), control=control or alongside, eval_problems=evals,
               seed=seed, register=False, progress=False, device="cpu",
               alongside=alongside)
print("RESULT " + json.dumps(r), flush=True)
"""


def _value(v: str):
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def parse_overrides(text: str) -> dict:
    pairs = (item.partition("=") for item in filter(None, text.split(",")))
    return {k.strip(): _value(v.strip()) for k, _, v in pairs}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("pairs", nargs="+", help="NAME OVERRIDES pairs (OVERRIDES: k=v,k=v of Recipe fields or seed)")
    p.add_argument("--out", default="runs/quickstart-sweep")
    p.add_argument("--control", nargs="*", default=[], help="variants that also run the control")
    p.add_argument("--eval-problems", type=int, default=500)
    a = p.parse_args()
    if len(a.pairs) % 2:
        raise SystemExit("give NAME OVERRIDES pairs")
    variants = dict(zip(a.pairs[::2], a.pairs[1::2]))
    ncpu = len(os.sched_getaffinity(0))
    if 2 * len(variants) > ncpu:
        raise SystemExit(f"{len(variants)} variants need {2 * len(variants)} cores, {ncpu} available")
    procs = {}
    t0 = time.time()
    for i, (name, ov) in enumerate(variants.items()):
        spec = {**parse_overrides(ov), "out": os.path.join(a.out, name), "control": name in a.control,
                "eval_problems": a.eval_problems}
        cores = f"{2 * i},{2 * i + 1}"
        env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
        os.makedirs(a.out, exist_ok=True)
        log = open(os.path.join(a.out, f"{name}.log"), "w")
        procs[name] = (subprocess.Popen(["taskset", "-c", cores, sys.executable, "-c", WORKER, json.dumps(spec)],
                                        stdout=subprocess.PIPE, stderr=log, text=True, env=env), spec)
    results = {}
    for name, (proc, spec) in procs.items():
        out, _ = proc.communicate()
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        results[name] = json.loads(line[-1][7:]) if line else {"error": f"exit {proc.returncode}"}
        results[name]["overrides"] = variants[name]
    print(f"{'variant':<14} {'overrides':<28} {'pre s':>6} {'acc0':>6} {'acc RL':>7} {'gain':>6} {'strict RL':>9} "
          f"{'p@8 0':>6} {'p@8 RL':>7} {'RL s':>6} {'ctl':>6} {'total s':>8}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<14} {r['overrides']:<28} {r['error']}")
            continue
        print(f"{name:<14} {r['overrides']:<28} {r['pretrain_seconds']:>6.0f} {100 * r['accuracy_before_rl']:>6.1f} "
              f"{100 * r['accuracy_after_rl']:>7.1f} {100 * (r['accuracy_after_rl'] - r['accuracy_before_rl']):>+6.1f} "
              f"{100 * r['strict_accuracy_after_rl']:>9.1f} {100 * r['pass_at_8_before_rl']:>6.1f} "
              f"{100 * r['pass_at_8_after_rl']:>7.1f} {r['rl_seconds']:>6.0f} "
              f"{100 * r.get('accuracy_control', float('nan')):>6.1f} {r['seconds']:>8.0f}")
    print_json({**environment("cpu"), "wall_s": round(time.time() - t0, 1), "cores": ncpu, "variants": results})


if __name__ == "__main__":
    main()
