import glob, json, os, sys
root, out = sys.argv[1], sys.argv[2]
res = {}
for d in sorted(glob.glob(f"{root}/*/")):
    name = os.path.basename(d.rstrip("/"))
    f = os.path.join(d, "quickstart.json")
    res[name] = json.load(open(f)) if os.path.exists(f) else None
    m = os.path.join(d, "grpo", "metrics.jsonl")
    if os.path.exists(m):
        recs = [json.loads(l) for l in open(m)]
        res[name + "_grpo_curve"] = [{k: r[k] for k in ("step", "reward_mean", "accuracy", "completion_length", "step_s", "gen_s", "groups_informative", "entropy") if k in r} for r in recs]
    m = os.path.join(d, "pretrain", "metrics.jsonl")
    if os.path.exists(m):
        recs = [json.loads(l) for l in open(m) if '"loss"' in l]
        res[name + "_pretrain"] = [(r["step"], round(r["loss"], 3), round(r["tokens_per_s"])) for r in recs[::25]]
json.dump(res, open(os.path.join(out, "results.json"), "w"), indent=1)
with open(os.path.join(out, "logs.txt"), "w") as f:
    for lg in sorted(glob.glob(f"{root}/*.log")):
        lines = [l for l in open(lg, errors="replace").read().replace("\r", "\n").splitlines() if l.strip() and "it/s" not in l and "s/it" not in l]
        f.write(f"== {lg}\n" + "\n".join(lines[-25:]) + "\n")
