"""GRPO recipe variants over many seeds on a many-core CPU host: pretrain each seed once (2 cores
each, the quickstart's pretraining exactly), then run every (variant, seed) GRPO stage on one core
(one thread by default: the arithmetic of `nanoseek quickstart` on 2 cores, the control alongside) and measure
held-out greedy accuracy before and after.

    python dev/sweep_rl.py --out /tmp/sw --seeds 0-7 -- base '' cos1e-4 'rl_lr=1e-4,rl_min_lr_ratio=0.1'

Variants are Recipe overrides (k=v,...). Prints a table and a final JSON line."""

import argparse
import json
import os
import queue
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_quickstart import parse_overrides  # noqa: E402

PRETRAIN = r"""
import json, sys, torch
torch.set_num_threads(2)
from nanoseek.quickstart import Recipe, measure, pretrain_stage
out, seed = sys.argv[1], int(sys.argv[2])
rc = Recipe(**json.loads(sys.argv[3]))
st = pretrain_stage(out, rc, 500, seed, progress=False, device="cpu")
r = measure(st["pre_dir"], st["task"], st["test"], 0, rc.max_new_tokens, "cpu", rc.eval_context)
print("RESULT " + json.dumps({"accuracy": r["accuracy"], "accuracy_strict": r["accuracy_strict"],
                              "seconds": st["pre"]["seconds"]}), flush=True)
"""

RL_VARIANT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rl_variant.py")  # one GRPO run, then greedy accuracy


def run(args: list[str], cores: list[int], log: str) -> dict:
    """`python ARGS` pinned to `cores`; its last RESULT line as a dict."""
    cmd = ["taskset", "-c", ",".join(map(str, cores)), sys.executable, *args]
    with open(log, "w") as f:  # the RESULT line goes to the log too, so a cut-off sweep keeps what finished
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
    lines = [ln for ln in open(log) if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        return {"error": f"exit {p.returncode}, see {log}"}
    return json.loads(lines[-1][7:])


def slot_list(cores: list[int], width: int) -> list[list[int]]:
    return [cores[i:i + width] for i in range(0, len(cores) - width + 1, width)]


def on_slots(jobs: list, slots: list[list[int]], fn) -> list:
    """fn(job, cores) for every job, as many at once as there are slots; a job holds its slot's
    cores until it ends. Returns [(job, result)] in the jobs' order."""
    free = queue.Queue()
    for slot in slots:
        free.put(slot)

    def one(job):
        slot = free.get()
        try:
            return job, fn(job, slot)
        finally:
            free.put(slot)

    with ThreadPoolExecutor(len(slots)) as pool:
        return list(pool.map(one, jobs))


def seeds_of(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("pairs", nargs="+", help="NAME OVERRIDES pairs (Recipe fields)")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="0-7")
    p.add_argument("--rl-threads", type=int, default=1, help="threads (cores) per GRPO run")
    p.add_argument("--recipe", default="", help="overrides for every run, pretraining included (k=v,...)")
    a = p.parse_args()
    if len(a.pairs) % 2:
        raise SystemExit("sweep_rl: give NAME OVERRIDES pairs ('' for none)")
    variants = dict(zip(a.pairs[::2], a.pairs[1::2]))
    seeds = seeds_of(a.seeds)
    base = parse_overrides(a.recipe)
    cores = sorted(os.sched_getaffinity(0))
    if a.rl_threads > len(cores) or len(cores) < 2:
        raise SystemExit(f"sweep_rl: {len(cores)} core(s) here; pretraining needs 2 and each GRPO run {a.rl_threads}")
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    before = dict(on_slots(seeds, slot_list(cores, 2), lambda s, slot: run(
        ["-c", PRETRAIN, f"{a.out}/s{s}", str(s), json.dumps(base)], slot, f"{a.out}/s{s}.pretrain.log")))
    print(f"pretraining done in {time.time() - t0:.0f} s: {before}", file=sys.stderr, flush=True)
    n = a.rl_threads

    def rl_job(job, slot):
        v, s = job
        overrides = [f"{k}={x}" for k, x in {**base, **parse_overrides(variants[v])}.items()]
        return run([RL_VARIANT, f"{a.out}/s{s}/pretrain", f"{a.out}/s{s}/{v}", *overrides, "--threads", str(n),
                    "--seed", str(s)], slot, f"{a.out}/s{s}.{v}.log")

    results = dict(on_slots([(v, s) for v in variants for s in seeds], slot_list(cores, n), rl_job))
    print("\n| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | mean gain |")
    print("|---|" + "---|" * (len(seeds) + 1))
    summary = {}
    for v in variants:
        gains = []
        cells = []
        for s in seeds:
            r, b = results[(v, s)], before[s]
            if "error" in r or "error" in b:
                cells.append("error")
                continue
            g = 100 * (r["accuracy"] - b["accuracy"])
            gains.append(g)
            cells.append(f"{100 * b['accuracy']:.1f} -> {100 * r['accuracy']:.1f} ({g:+.1f}, {r['seconds']:.0f} s)")
        mean = sum(gains) / max(len(gains), 1)
        summary[v] = {"gains": gains, "mean": mean, "override": variants[v]}
        print(f"| {v} | " + " | ".join(cells) + f" | {mean:+.1f} |")
    print(json.dumps({"before": before, "variants": summary,
                      "runs": {f"{v}/{s}": r for (v, s), r in results.items()}, "seconds": time.time() - t0}))


if __name__ == "__main__":
    main()
