"""GRPO recipe variants over many seeds on a many-core CPU host, chosen on the validation set and
reported once on the test set:

1. pretrain each seed once (2 cores each, the quickstart's pretraining exactly);
2. run every (variant, seed) GRPO stage on one core (one thread by default: the arithmetic of
   `nanoseek quickstart` on 2 cores, the control alongside) and measure greedy accuracy on the
   validation set only;
3. pick the variant with the best mean validation gain (or the one `--fixed NAME` names);
4. for that variant alone: the control (more supervised training from the same checkpoint for
   each seed's GRPO time, on as many threads), then the test set, before RL, after RL and for the
   control.

    python -m dev.sweeps.sweep_rl --out /tmp/sw --seeds 0-7 -- base '' cos1e-4 'rl_lr=1e-4,rl_min_lr_ratio=0.1'

Variants are Recipe overrides (k=v,...). Prints the tables and a final JSON line."""

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.bench_quickstart import parse_overrides
from nanoseek.recipes.quickstart import Recipe, train_common

from . import jobs, rl_variant

JOBS = ["-m", jobs.__name__]  # pretrain / control / evaluate, each in its own pinned process
RL_VARIANT = ["-m", rl_variant.__name__]  # one GRPO run, then greedy accuracy (run from the repository root)


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
    p.add_argument("--fixed", help="report this variant on the test set (default: the best mean validation gain)")
    p.add_argument("--no-control", action="store_true")
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
        [*JOBS, "pretrain", f"{a.out}/s{s}", str(s), json.dumps(base)], slot, f"{a.out}/s{s}.pretrain.log")))
    print(f"pretraining done in {time.time() - t0:.0f} s: {before}", file=sys.stderr, flush=True)
    n = a.rl_threads

    def rl_job(job, slot):
        v, s = job
        overrides = [f"{k}={x}" for k, x in {**base, **parse_overrides(variants[v])}.items()]
        return run([*RL_VARIANT, f"{a.out}/s{s}/pretrain", f"{a.out}/s{s}/{v}", *overrides, "--threads", str(n),
                    "--seed", str(s)], slot, f"{a.out}/s{s}.{v}.log")

    results = dict(on_slots([(v, s) for v in variants for s in seeds], slot_list(cores, n), rl_job))
    print(f"GRPO done at {time.time() - t0:.0f} s", file=sys.stderr, flush=True)

    def pct(x):
        return f"{100 * x:.1f}"

    print(f"\nValidation set ({Recipe(**base).val_problems} problems), greedy accuracy before -> after GRPO (gain):\n")
    print("| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | mean gain | min gain |")
    print("|---|" + "---|" * (len(seeds) + 2))
    summary = {}
    for v in variants:
        gains, cells = [], []
        for s in seeds:
            r, b = results[(v, s)], before[s]
            if "error" in r or "error" in b:
                cells.append("error")
                continue
            g = 100 * (r["val"] - b["val"])
            gains.append(g)
            cells.append(f"{pct(b['val'])} -> {pct(r['val'])} ({g:+.1f})")
        mean = sum(gains) / max(len(gains), 1)
        summary[v] = {"val_gains": gains, "val_mean_gain": mean, "override": variants[v]}
        print(f"| {v} | " + " | ".join(cells) + f" | {mean:+.1f} | {min(gains, default=float('nan')):+.1f} |")
    chosen = a.fixed or max(variants, key=lambda v: (len(summary[v]["val_gains"]), summary[v]["val_mean_gain"]))
    print(f"\nchosen on the validation set: {chosen} ({variants[chosen] or 'the Recipe defaults'})", flush=True)

    rc_chosen = {**base, **parse_overrides(variants[chosen])}
    controls = {}
    if not a.no_control:
        def control_job(s, slot):
            spec = dict(data=f"{a.out}/s{s}/pretrain/data", out=f"{a.out}/s{s}/control", model=f"{a.out}/s{s}/pretrain",
                        lr=Recipe(**rc_chosen).control_lr, seed=s + 1, max_seconds=results[(chosen, s)]["seconds"],
                        pace_file=None, threads=n, common=train_common(Recipe(**rc_chosen), f"{a.out}/s{s}/tokenizer",
                                                                      progress=False, device="cpu"))
            return run([*JOBS, "control", json.dumps(spec)], slot, f"{a.out}/s{s}.control.log")
        controls = dict(on_slots(seeds, slot_list(cores, n), control_job))
        print(f"controls done at {time.time() - t0:.0f} s", file=sys.stderr, flush=True)

    # the test set, once, for the chosen variant only
    kinds = {"before": "pretrain", "grpo": chosen, **({} if a.no_control else {"control": "control"})}
    test = dict(on_slots(seeds, slot_list(cores, 1), lambda s, slot: run(
        [*JOBS, "evaluate", json.dumps(rc_chosen), "test", *[f"{a.out}/s{s}/{d}" for d in kinds.values()]],
        slot, f"{a.out}/s{s}.test.log")))
    print(f"\nTest set (500 problems), {chosen}, greedy accuracy (lenient / strict):\n")
    print("| seed | after pretraining | after GRPO | gain | control | GRPO - control | GRPO s | control steps |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for s in seeds:
        t = test[s]
        if "error" in t:
            print(f"| {s} | error | | | | | | |")
            continue
        acc = {k: t[f"{a.out}/s{s}/{d}"] for k, d in kinds.items()}
        row = {"seed": s, **{k: acc[k]["accuracy"] for k in acc}, **{f"{k}_strict": acc[k]["accuracy_strict"] for k in acc},
               "grpo_seconds": results[(chosen, s)]["seconds"], "control_steps": controls.get(s, {}).get("steps")}
        rows.append(row)
        ctl = acc.get("control", {"accuracy": float("nan"), "accuracy_strict": float("nan")})
        print(f"| {s} | {pct(acc['before']['accuracy'])} / {pct(acc['before']['accuracy_strict'])} | "
              f"{pct(acc['grpo']['accuracy'])} / {pct(acc['grpo']['accuracy_strict'])} | "
              f"{100 * (acc['grpo']['accuracy'] - acc['before']['accuracy']):+.1f} | "
              f"{pct(ctl['accuracy'])} / {pct(ctl['accuracy_strict'])} | "
              f"{100 * (acc['grpo']['accuracy'] - ctl['accuracy']):+.1f} | {row['grpo_seconds']:.0f} | {row['control_steps']} |")
    if rows:
        for key in ("before", "grpo", "control"):
            vals = [100 * r[key] for r in rows if key in r]
            if len(vals) > 1:
                print(f"{key}: mean {statistics.mean(vals):.1f}%, sd {statistics.stdev(vals):.1f}, "
                      f"range {min(vals):.1f}-{max(vals):.1f} over {len(vals)} seeds")
        gains = [100 * (r["grpo"] - r["before"]) for r in rows]
        print(f"gain from GRPO: mean {statistics.mean(gains):+.1f}, sd {statistics.stdev(gains) if len(gains) > 1 else 0:.1f}, "
              f"range {min(gains):+.1f} to {max(gains):+.1f}")
    print(json.dumps({"before_val": before, "variants": summary, "chosen": chosen, "test": rows,
                      "runs": {f"{v}/{s}": r for (v, s), r in results.items()}, "controls": controls,
                      "seconds": time.time() - t0}))


if __name__ == "__main__":
    main()
