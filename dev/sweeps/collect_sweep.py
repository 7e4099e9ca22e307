"""Collect a quickstart sweep's folder (benchmarks/bench_quickstart.py writes one sub-folder and
one log per variant) into OUT/results.json (each variant's quickstart.json, its GRPO curve and
every 25th pretraining step) and OUT/logs.txt (the last 25 lines of each log, progress bars
dropped).

    python -m dev.sweeps.collect_sweep SWEEP_DIR OUT
"""

import argparse
import glob
import json
import os

GRPO_KEYS = ("step", "reward_mean", "accuracy", "completion_length", "step_s", "gen_s", "groups_informative",
             "entropy")


def collect(root: str) -> dict:
    res = {}
    for d in sorted(glob.glob(f"{root}/*/")):
        name = os.path.basename(d.rstrip("/"))
        f = os.path.join(d, "quickstart.json")
        res[name] = json.load(open(f)) if os.path.exists(f) else None
        m = os.path.join(d, "grpo", "metrics.jsonl")
        if os.path.exists(m):
            recs = [json.loads(line) for line in open(m)]
            res[name + "_grpo_curve"] = [{k: r[k] for k in GRPO_KEYS if k in r} for r in recs]
        m = os.path.join(d, "pretrain", "metrics.jsonl")
        if os.path.exists(m):
            recs = [json.loads(line) for line in open(m) if '"loss"' in line]
            res[name + "_pretrain"] = [(r["step"], round(r["loss"], 3), round(r["tokens_per_s"])) for r in recs[::25]]
    return res


def log_digest(root: str) -> str:
    out = []
    for lg in sorted(glob.glob(f"{root}/*.log")):
        lines = [line for line in open(lg, errors="replace").read().replace("\r", "\n").splitlines()
                 if line.strip() and "it/s" not in line and "s/it" not in line]
        out.append(f"== {lg}\n" + "\n".join(lines[-25:]) + "\n")
    return "".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="the sweep's folder")
    p.add_argument("out", help="folder for results.json and logs.txt")
    a = p.parse_args()
    json.dump(collect(a.root), open(os.path.join(a.out, "results.json"), "w"), indent=1)
    with open(os.path.join(a.out, "logs.txt"), "w") as f:
        f.write(log_digest(a.root))


if __name__ == "__main__":
    main()
