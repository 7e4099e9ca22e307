"""Pipeline parallelism on 2 GPUs with real model stages: nanoseek's executor (1F1B, DualPipe,
DualPipeV) against PyTorch's own `torch.distributed.pipelining` schedules (ScheduleDualPipeV,
Schedule1F1B) on the same stages and micro-batches, and one GPU without a pipeline.

For every global batch size in --batches (sequences of --seq-len tokens, split into --chunks
micro-batches; bf16 autocast, fp32 weights and gradients, CE + MTP + sequence balance loss as in
`nanoseek train`), each run does --warmup untimed steps, then --steps timed steps (forward +
backward + the gradient sum of mirrored/shared parameters; no optimizer), and reports the median
step time and tokens/s. The one-GPU references run on rank 0 alone (rank 1 waits): the whole batch
in one forward/backward (as `nanoseek train` does), and the same micro-batches accumulated.

One more step of nanoseek's executor is timed with CUDA events around every op (F, B, I, W, F&B)
and every communication wait, per rank on one clock (the step starts after an all-reduce), and
drawn as a PNG (one row per rank). From that timeline: the measured bubble ratio (idle / step on
the most idle rank), and the simulator's prediction for the same op lists from the measured mean
F, B, W and F&B times (no latency).

    torchrun --nproc-per-node 2 -m benchmarks.bench_pipeline_gpu --out results/pp   # GPUs, small
    torchrun --nproc-per-node 2 -m benchmarks.bench_pipeline_gpu --preset nano --device cpu \\
        --batches 4 --seq-len 32 --chunks 4 --steps 2 --warmup 1                    # CPU, gloo
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.parallel.pipeline import PipelineExecutor, SharedGrads, split_deepseek
from nanoseek.parallel.schedules import build_schedule
from nanoseek.parallel.simulator import measured_metrics, simulate

from .common import environment, print_json, sync

OURS = ("1f1b", "dualpipe", "dualpipev")
TORCH = ("1f1b", "dualpipev")


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


class Bench:
    def __init__(self, a):
        self.a = a
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if a.device == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        over = {"num_hidden_layers": a.layers} if a.layers else {}
        self.cfg = ModelConfig.from_preset(a.preset, **over)
        dtype = torch.bfloat16 if a.device == "cuda" else None
        self.autocast = (torch.autocast("cuda", dtype=dtype) if dtype is not None
                         else torch.autocast("cpu", enabled=False))

    # ------------------------------------------------------------------ helpers
    def sync(self):
        sync(self.device)

    def model(self):
        return DeepSeekV3.from_config(self.cfg, device=self.device, seed=0).train()

    def data(self, batch: int):
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, self.cfg.vocab_size, (batch, self.a.seq_len + 1), generator=g).to(self.device)
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def timed(self, step, params, n_warm, n_steps, group_sync=True) -> list[float]:
        times = []
        for i in range(n_warm + n_steps):
            for p in params:
                p.grad = None
            self.sync()
            if group_sync:
                dist.barrier()
            t0 = time.perf_counter()
            step()
            self.sync()
            if i >= n_warm:
                times.append(time.perf_counter() - t0)
        return times

    def free(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def peak_mem(self) -> float:
        if self.device.type != "cuda":
            return 0.0
        m = torch.cuda.max_memory_allocated(self.device) / 2**30
        torch.cuda.reset_peak_memory_stats(self.device)
        return m

    # ------------------------------------------------------------------ one GPU
    def reference(self, batch: int) -> dict:
        """Rank 0 alone: the whole model, whole batch at once and the micro-batches accumulated."""
        out = {}
        if self.rank == 0:
            model = self.model()
            stages, crit = split_deepseek(model, build_schedule("1f1b", 1, 1), 0,
                                          balance_alpha=self.a.balance_alpha, loss_scale=1.0)
            stage = stages[0]
            x, y = self.data(batch)
            params = [p for p in model.parameters() if p.requires_grad]

            def run(parts: int):
                def step():
                    for xs, ys in zip(x.chunk(parts), y.chunk(parts)):
                        with self.autocast:
                            loss = crit(stage(xs), (xs, ys)) / parts
                        loss.backward()
                return step

            for key, parts in (("one_gpu", 1), ("one_gpu_micro", self.a.chunks)):
                st = run(parts)
                t = self.timed(st, params, self.a.warmup, self.a.steps, group_sync=False)
                out[key] = {"step_time": statistics.median(t), "tokens_per_s": batch * self.a.seq_len / statistics.median(t),
                            "peak_mem_gib": self.peak_mem()}
        dist.barrier()
        return out

    # ------------------------------------------------------------------ nanoseek executor
    def ours(self, name: str, batch: int) -> tuple[dict, list]:
        a = self.a
        sched = build_schedule(name, self.world, a.chunks)
        model = self.model()
        stages, crit = split_deepseek(model, sched, self.rank, balance_alpha=a.balance_alpha)
        shared = SharedGrads(dict(model.named_parameters()))
        hidden = self.cfg.hidden_size
        ex = PipelineExecutor(sched, stages, crit, boundary=lambda t: ((*t.shape, hidden), torch.float32),
                              device=self.device, timeout=a.timeout)
        x, y = self.data(batch)
        xs, ys = list(x.chunk(a.chunks)), list(y.chunk(a.chunks))
        targets = list(zip(xs, ys))
        params = [p for p in model.parameters() if p.requires_grad]

        def step():
            crit.parts.clear()
            with self.autocast:
                ex.step(xs, targets)
            shared.sync()

        t = self.timed(step, params, a.warmup, a.steps)
        res = {"step_time": statistics.median(t), "tokens_per_s": batch * a.seq_len / statistics.median(t),
               "peak_mem_gib": self.peak_mem()}
        # one more step, every op and wait bracketed by events (CUDA) or host clocks (CPU)
        for p in params:
            p.grad = None
        self.sync()
        dist.barrier()
        cuda = self.device.type == "cuda"
        ex.cuda_timing = cuda
        if cuda:  # the step starts on every GPU when this all-reduce ends: one clock for all ranks
            dist.all_reduce(torch.ones(1, device=self.device))
        t0 = time.perf_counter()
        step()
        host = [(n, b - t0, e - t0) for n, b, e in ex.timeline]
        if cuda:
            ops, waits = ex.device_timeline()
        else:
            ops, waits = host, []
        ex.cuda_timing = False
        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, {"ops": ops, "waits": waits, "host_wait_s": ex.comm_wait,
                                          "host_ops_s": sum(e - b for _, b, e in host),
                                          "host_step_s": host[-1][2] if host else 0.0})
        res["timeline"] = everyone
        return res, sched

    # ------------------------------------------------------------------ torch.distributed.pipelining
    def torch_schedule(self, name: str, batch: int) -> dict:
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining import schedules as S
        a = self.a
        cls = {"1f1b": getattr(S, "Schedule1F1B", None), "dualpipev": getattr(S, "ScheduleDualPipeV", None)}[name]
        if cls is None:
            return {"error": f"torch {torch.__version__} has no {name} schedule"}
        sched = build_schedule(name, self.world, a.chunks)  # the same layout: stage v on rank stage_rank[v]
        model = self.model()
        stages, crit = split_deepseek(model, sched, self.rank, balance_alpha=a.balance_alpha, loss_scale=1.0)
        shared = SharedGrads(dict(model.named_parameters()))
        n = sched.num_stages
        pstages = [PipelineStage(stages[v], v, n, self.device) for v in sorted(stages)]
        if name == "dualpipev":  # rank r runs stages r and 2N-1-r
            pstages.sort(key=lambda s: s.stage_index)

        def loss_fn(out, target):  # target [b, 2, T]: (inputs, labels), needed by the MTP loss
            return crit(out, (target[:, 0], target[:, 1]))

        schedule = cls(pstages if name == "dualpipev" else pstages[0], n_microbatches=a.chunks, loss_fn=loss_fn)
        x, y = self.data(batch)
        target = torch.stack([x, y], dim=1)
        has_first = any(sched.is_first(v) for v in stages)
        has_last = any(sched.is_last(v) for v in stages)
        params = [p for p in model.parameters() if p.requires_grad]

        def step():
            crit.parts.clear()
            with self.autocast:
                kw = {"target": target, "losses": []} if has_last else {}
                if has_first:
                    schedule.step(x, **kw)
                else:
                    schedule.step(**kw)
            shared.sync()

        t = self.timed(step, params, a.warmup, a.steps)
        res = {"step_time": statistics.median(t), "tokens_per_s": batch * a.seq_len / statistics.median(t),
               "peak_mem_gib": self.peak_mem()}
        return res


# ---------------------------------------------------------------------------------------- analysis
def analyse(res: dict, sched) -> dict:
    """Measured bubble from the device timeline, and the simulator's prediction from its op times."""
    tl = res.pop("timeline")
    ops = [r["ops"] for r in tl]
    m = measured_metrics(ops)
    kinds: dict[str, list[float]] = {}
    for rank_ops in ops:
        for name, b, e in rank_ops:
            k = "FB" if name.startswith("(") else "".join(c for c in name if c.isalpha())
            kinds.setdefault(k, []).append(e - b)
    mean = {k: statistics.mean(v) for k, v in kinds.items()}
    Fm = mean.get("F", 0.0)
    Bm = mean.get("B", mean.get("I", 0.0) + mean.get("W", 0.0))
    Wm = min(mean.get("W", 0.0), Bm)
    FBm = mean.get("FB", Fm + Bm)
    sim = simulate(sched, Fm, Bm, Wm, FBm)
    return {**res, "timeline_step_time": m["step_time"], "bubble": m["bubble"], "bubble_ratio": m["bubble_ratio"],
            "idle_per_rank": m["idle_per_rank"],
            # device: the compute stream waiting for transfers (CUDA events); CPU: the host blocked in waits
            "comm_wait_per_rank": [sum(e - b for _, b, e in r["waits"]) if r["waits"] else r["host_wait_s"] for r in tl],
            "host_ops_s_per_rank": [r["host_ops_s"] for r in tl], "host_step_s_per_rank": [r["host_step_s"] for r in tl],
            "mean_op_s": mean, "sim_step_time": sim.step_time, "sim_bubble_ratio": sim.bubble_ratio,
            "_ops": ops, "_waits": [r["waits"] for r in tl]}


def plot(rows: list[dict], path: str, title: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"F": "#4C72B0", "B": "#55A868", "I": "#8DD3A0", "W": "#C44E52", "FB": "#8172B2"}
    fig, axes = plt.subplots(len(rows), 1, figsize=(16, 1.0 + 1.4 * len(rows)), squeeze=False)
    for ax, r in zip(axes[:, 0], rows):
        for rank, (ops, waits) in enumerate(zip(r["_ops"], r["_waits"])):
            for _, b, e in waits:
                ax.barh(rank, (e - b) * 1e3, left=b * 1e3, color="#DDDDDD", edgecolor="#999999", hatch="//",
                        linewidth=0.3, height=0.5)
            for name, b, e in ops:
                kind = "FB" if name.startswith("(") else "".join(c for c in name if c.isalpha())
                ax.barh(rank, (e - b) * 1e3, left=b * 1e3, color=colors.get(kind, "grey"), edgecolor="black",
                        linewidth=0.3)
                if (e - b) / max(r["timeline_step_time"], 1e-12) > 0.025:
                    ax.text((b + e) / 2 * 1e3, rank, name, ha="center", va="center", fontsize=5, color="white")
        ax.set_yticks(range(len(r["_ops"])), [f"rank {i}" for i in range(len(r["_ops"]))])
        ax.invert_yaxis()
        ax.set_title(f"{r['schedule']}: step {r['timeline_step_time'] * 1e3:.1f} ms, bubble ratio measured "
                     f"{r['bubble_ratio']:.3f}, simulated {r['sim_bubble_ratio']:.3f}", fontsize=8)
    axes[-1, 0].set_xlabel("ms")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="#DDDDDD", hatch="//", edgecolor="#999999"))
    fig.legend(handles, ["F", "B (full)", "I (input grad)", "W (weight grad)", "F&B pair", "comm wait"],
               loc="lower center", ncol=6, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--layers", type=int, help="override the preset's decoder layers")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--batches", default="16,32", help="global batch sizes (sequences per step), comma separated")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--chunks", type=int, default=8, help="micro-batches per step")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--balance-alpha", type=float, default=1e-4, help="sequence balance loss weight (train's default)")
    ap.add_argument("--schedules", default=",".join(OURS), help="nanoseek schedules to run")
    ap.add_argument("--torch-schedules", default=",".join(TORCH), help="torch.distributed.pipelining schedules ('' for none)")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--out", default=".", help="folder for the PNGs and results.json")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible (use --device cpu for a gloo run)")
    dist.init_process_group("nccl" if a.device == "cuda" else "gloo", timeout=timedelta(seconds=a.timeout))
    if dist.get_world_size() != 2:
        raise SystemExit(f"run with 2 processes (torchrun --nproc-per-node 2), got {dist.get_world_size()}")
    if a.device == "cpu":
        torch.set_num_threads(1)
    bench = Bench(a)
    os.makedirs(a.out, exist_ok=True)
    batches = [int(b) for b in a.batches.split(",")]
    t_start = time.perf_counter()
    log(f"torch {torch.__version__}, {a.device} x2, preset {a.preset} ({bench.cfg.num_hidden_layers} layers), "
        f"seq {a.seq_len}, {a.chunks} micro-batches, {a.warmup} warm-up + {a.steps} timed steps per run")
    summary = {**environment(bench.device), "device": (torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"),
               "preset": a.preset, "layers": bench.cfg.num_hidden_layers, "seq_len": a.seq_len, "chunks": a.chunks,
               "configs": []}
    def save():  # after every phase, so a run cut short still leaves its numbers
        if bench.rank == 0:
            with open(os.path.join(a.out, "results.json"), "w") as f:
                json.dump(summary, f, indent=1)

    for batch in batches:  # nanoseek's executor and the one-GPU references first
        if batch % a.chunks:
            raise SystemExit(f"batch {batch} does not split into {a.chunks} micro-batches")
        conf = {"batch": batch, "micro_batch": batch // a.chunks, "tokens_per_step": batch * a.seq_len,
                "runs": []}
        ref = bench.reference(batch)
        bench.free()  # the run's locals are gone: release their cached memory
        refs = [None] * 2
        dist.all_gather_object(refs, ref)
        conf["reference"] = refs[0]
        log(f"batch {batch}: one GPU {refs[0]['one_gpu']['tokens_per_s']:,.0f} tok/s (whole batch), "
            f"{refs[0]['one_gpu_micro']['tokens_per_s']:,.0f} tok/s ({a.chunks} accumulated micro-batches)")
        rows = []
        for name in [s for s in a.schedules.split(",") if s]:
            res, sched = bench.ours(name, batch)
            bench.free()
            row = analyse({"impl": "nanoseek", "schedule": name, **res}, sched)
            rows.append(row)
            log(f"  nanoseek {name:9s} {row['tokens_per_s']:>10,.0f} tok/s  step {row['step_time'] * 1e3:7.1f} ms  "
                f"bubble {row['bubble_ratio']:.3f} (sim {row['sim_bubble_ratio']:.3f})")
        if bench.rank == 0 and rows:
            png = plot(rows, os.path.join(a.out, f"timeline_b{batch}.png"),
                       f"measured per-rank timelines, {a.preset}, batch {batch} x {a.seq_len}, {a.chunks} micro-batches")
            conf["png"] = os.path.basename(png)
        conf["runs"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
        summary["configs"].append(conf)
        save()
    for conf in summary["configs"]:  # then PyTorch's schedules on the same stages and micro-batches
        batch = conf["batch"]
        for name in [s for s in a.torch_schedules.split(",") if s]:
            try:
                res = bench.torch_schedule(name, batch)
                bench.free()
            except Exception as e:  # an API difference between torch versions: report, keep going
                res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                bench.free()
                log(f"  torch {name} (batch {batch}): {res['error']}")
            errs = [None] * 2
            dist.all_gather_object(errs, "error" in res)
            if any(errs) and "error" not in res:
                res = {"error": "failed on the other rank"}
            conf["runs"].append({"impl": "torch", "schedule": name, **res})
            if "error" not in res:
                log(f"  torch    {name:9s} (batch {batch}) {res['tokens_per_s']:>10,.0f} tok/s  "
                    f"step {res['step_time'] * 1e3:7.1f} ms")
            save()
    summary["wall_s"] = time.perf_counter() - t_start
    if bench.rank == 0:
        print()
        print(f"{'batch':>5s} {'mb':>3s} {'run':24s} {'tok/s':>10s} {'step ms':>8s} {'x 1 GPU':>7s} "
              f"{'bubble':>6s} {'sim':>6s} {'wait ms':>8s} {'host ms':>8s} {'mem GiB':>7s}")
        for c in summary["configs"]:
            one = c["reference"]["one_gpu"]["tokens_per_s"]
            lines = [("1 GPU, whole batch", c["reference"]["one_gpu"]),
                     (f"1 GPU, {a.chunks} micro-batches", c["reference"]["one_gpu_micro"])]
            lines += [(f"{r['impl']} {r['schedule']}", r) for r in c["runs"]]
            for label, r in lines:
                if "error" in r:
                    print(f"{c['batch']:5d} {c['micro_batch']:3d} {label:24s} error: {r['error']}")
                    continue
                bub = f"{r['bubble_ratio']:6.3f} {r['sim_bubble_ratio']:6.3f}" if "bubble_ratio" in r else f"{'':6s} {'':6s}"
                wait = f"{max(r['comm_wait_per_rank']) * 1e3:8.1f}" if "comm_wait_per_rank" in r else f"{'':8s}"
                host = f"{max(r['host_step_s_per_rank']) * 1e3:8.1f}" if "host_step_s_per_rank" in r else f"{'':8s}"
                print(f"{c['batch']:5d} {c['micro_batch']:3d} {label:24s} {r['tokens_per_s']:10,.0f} "
                      f"{r['step_time'] * 1e3:8.1f} {r['tokens_per_s'] / one:7.2f} {bub} {wait} {host} "
                      f"{r['peak_mem_gib']:7.1f}")
        save()
        print_json(summary)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
