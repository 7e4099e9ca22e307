"""Pipeline bubbles measured on CPU processes with sleep-cost stages (gloo), against the schedule
simulator and the DeepSeek-V3 report's formulas.

Each stage's forward sleeps F; its backward sleeps B - W on the input path and W on the weight
path, so `I` costs B - W, `W` costs W and a full `B` costs B (sleeps use no CPU: 8 processes on 2
cores behave like 8 devices). The executors are nanoseek.parallel.pipeline's; the second of two
steps is measured (per-rank compute intervals, gathered to rank 0). Every stage costs the same in
every schedule (so a DualPipeV rank, holding 2 stages, does twice a 1F1B rank's work).

    python -m benchmarks.bench_pipeline [--times 0.02,0.04,0.02] [--pp 4] [--chunks 8]
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from nanoseek.parallel.pipeline import PipelineExecutor
from nanoseek.parallel.schedules import build_schedule
from nanoseek.parallel.simulator import measured_metrics, plot_timeline, simulate

from .common import environment, print_json


class _SleepInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f, bi):
        time.sleep(f)
        ctx.bi = bi
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        time.sleep(ctx.bi)
        return g, None, None


class _SleepWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, x, bw):
        ctx.bw = bw
        return x.detach() * 0.0 + w * 0.0

    @staticmethod
    def backward(ctx, g):
        time.sleep(ctx.bw)
        return g.sum().reshape(1), None, None


class SleepStage(nn.Module):
    def __init__(self, F: float, B: float, W: float):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.F, self.B, self.W = F, B, W

    def forward(self, x):
        return _SleepInput.apply(x, self.F, self.B - self.W) + _SleepWeight.apply(self.w, x, self.W)


def _worker(rank, world, port, name, chunks, times, steps, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    sched = build_schedule(name, world, chunks)
    stages = {v: SleepStage(*times) for v in sched.stages_of_rank(rank)}
    ex = PipelineExecutor(sched, stages, lambda y, t: y.sum(), boundary=lambda x: (x.shape, x.dtype), timeout=120)
    xs = [torch.zeros(2, 4, requires_grad=True) for _ in range(chunks)]
    for _ in range(steps):
        dist.barrier()
        ex.step(xs, xs)
    tls: list = [None] * world
    dist.all_gather_object(tls, (ex.timeline, ex.comm_wait))
    if rank == 0:
        out.put(tls)
    dist.destroy_process_group()


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(name, pp, chunks, times, steps=2):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=_worker, args=(r, pp, port, name, chunks, times, steps, q)) for r in range(pp)]
    for p in procs:
        p.start()
    tls = q.get(timeout=300)
    for p in procs:
        p.join(60)
    timeline = [tl for tl, _ in tls]
    m = measured_metrics(timeline)
    m["comm_wait_per_rank"] = [w for _, w in tls]
    return m, timeline


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--times", default="0.02,0.04,0.02", help="F,B,W seconds per stage chunk")
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--png", help="folder for measured timeline PNGs")
    a = ap.parse_args()
    F, B, W = (float(x) for x in a.times.split(","))
    rows = []
    for name, pp in (("1f1b", a.pp), ("dualpipe", a.pp), ("dualpipev", max(1, a.pp // 2))):
        m, timeline = measure(name, pp, a.chunks, (F, B, W))
        sim = simulate(build_schedule(name, pp, a.chunks), F, B, W)
        d = sim.as_dict()
        rows.append({"schedule": name, "ranks": pp, "chunks": a.chunks, "step_time": m["step_time"],
                     "bubble": m["bubble"], "bubble_ratio": m["bubble_ratio"],
                     "sim_step_time": d["step_time"], "sim_bubble": d["bubble"], "sim_bubble_ratio": d["bubble_ratio"],
                     "formula_bubble": d["formula_bubble"], "formula_exact": d["formula_exact"],
                     "comm_wait_max": max(m["comm_wait_per_rank"])})
        if a.png:
            os.makedirs(a.png, exist_ok=True)
            plot_timeline(timeline, os.path.join(a.png, f"measured_{name}.png"), f"measured {name} pp={pp}")
    print(f"sleep-cost stages F,B,W = {F},{B},{W} s, {a.chunks} micro-batches, gloo, second step measured")
    print(f"{'schedule':10s} {'ranks':>5s} {'T meas':>8s} {'bubble':>8s} {'ratio':>6s} | {'T sim':>7s} {'bubble':>7s} "
          f"{'ratio':>6s} | {'formula':>7s}")
    for r in rows:
        print(f"{r['schedule']:10s} {r['ranks']:5d} {r['step_time']:8.3f} {r['bubble']:8.3f} {r['bubble_ratio']:6.3f} | "
              f"{r['sim_step_time']:7.3f} {r['sim_bubble']:7.3f} {r['sim_bubble_ratio']:6.3f} | {r['formula_bubble']:7.3f}")
    by = {r["schedule"]: r for r in rows}
    summary = {**environment("cpu"), "rows": rows, "dualpipe_vs_1f1b_bubble": by["dualpipe"]["bubble"] / by["1f1b"]["bubble"]}
    try:
        import torch.distributed.pipelining.schedules as S
        summary["torch_has_ScheduleDualPipeV"] = hasattr(S, "ScheduleDualPipeV")
    except ImportError:
        summary["torch_has_ScheduleDualPipeV"] = False
    print_json(summary)


if __name__ == "__main__":
    main()
