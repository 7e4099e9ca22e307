"""Expert parallelism vs data parallelism only (DeepSeek-V3 report section 3.2.2), same script,
same processes, same model and per-rank batch.

  dp: every rank holds every expert; gradients all-reduced.
  ep: the routed experts sharded over --ep ranks (all-to-all dispatch and combine), the rest
      replicated; gradients reduced as in `nanoseek train --ep`.

Each step: forward, cross entropy, backward, gradient sync, clipping, AdamW on fp32 master
weights (bf16 autocast on GPU). Reports per mode: tokens/s per GPU (median step), the share of the
step spent in the all-to-alls and in the gradient sync (measured in separate probe steps with a
device sync around each collective), model-state memory (parameters, gradients, AdamW moments) and
peak allocated memory per GPU. Prints a table and a final JSON line.

  torchrun --nproc-per-node 2 -m benchmarks.bench_ep                      # CPU, gloo, `nano`
  torchrun --nproc-per-node 2 -m benchmarks.bench_ep --preset small       # 2 GPUs, NCCL
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.parallel import DataParallel, init_distributed
from nanoseek.parallel import expert_parallel as xp
from nanoseek.parallel.ep_training import ExpertParallelTraining

from .common import environment, print_json, sync


def run_mode(mode: str, cfg: ModelConfig, a, info) -> dict:
    device, world = info.device, info.world
    model = DeepSeekV3.from_config(cfg, device=device, seed=0)
    model.train()
    par = ExpertParallelTraining(model, a.ep, device) if mode == "ep" else DataParallel(model, world)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    gen = torch.Generator().manual_seed(1000 + info.rank)  # the same data in both modes
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync_time = [0.0]

    def step(probe: bool = False) -> float:
        x = torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1), generator=gen).to(device)
        with autocast:
            logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        if probe:
            sync(device)
            t = time.perf_counter()
        par.sync_grads()
        if probe:
            sync(device)
            sync_time[0] += time.perf_counter() - t
        if mode == "ep":
            par.clip_grad_norm_(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    first_loss = float(step())
    for _ in range(a.warmup - 1):
        step()
    times = []
    for _ in range(a.steps):
        sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    # probe steps: the same work with a device sync around every collective, to attribute time
    xp.COMM_STATS.update(timing=True, seconds=0.0, calls=0)
    sync(device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(a.probe):
        step(probe=True)
    sync(device)
    probe_total = time.perf_counter() - t0
    xp.COMM_STATS["timing"] = False
    step_s = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(step_s, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    local = sum(p.numel() for p in model.parameters())
    state_bytes = sum(p.numel() * p.element_size() * 4 for p in model.parameters())  # param, grad, 2 moments
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    out = {
        "mode": mode, "ep": a.ep if mode == "ep" else 1, "tokens_per_s_per_gpu": a.batch * a.seq / float(step_s),
        "step_ms": 1000 * float(step_s), "a2a_share": xp.COMM_STATS["seconds"] / probe_total,
        "a2a_calls_per_step": xp.COMM_STATS["calls"] / a.probe, "grad_sync_share": sync_time[0] / probe_total,
        "params_local": local, "state_gib": state_bytes / 2**30,
        "peak_gib": peak / 2**30 if peak is not None else None, "first_loss": first_loss,
    }
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="default: small on GPU, nano on CPU")
    p.add_argument("--ep", type=int, help="expert-parallel ranks (default: all processes)")
    p.add_argument("--batch", type=int, help="sequences per rank (default 8 on GPU, 4 on CPU)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 2048 on GPU, 128 on CPU)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--probe", type=int, default=3, help="extra steps with synchronized collectives, for the shares")
    p.add_argument("--mtp-depth", type=int, default=0, help="MTP modules (default 0, as in bench_train's speed part)")
    p.add_argument("--modes", default="dp,ep")
    p.add_argument("--rounds", type=int, default=2, help="alternate the modes this many times, keep each one's best")
    p.add_argument("--device", default=None)
    a = p.parse_args()
    info = init_distributed(a.device)
    if not dist.is_initialized():
        raise SystemExit("bench_ep: run under torchrun with 2 or more processes")
    gpu = info.device.type == "cuda"
    a.preset = a.preset or ("small" if gpu else "nano")
    a.batch = a.batch or (8 if gpu else 4)
    a.seq = a.seq or (2048 if gpu else 128)
    a.ep = a.ep or info.world
    cfg = ModelConfig.from_preset(a.preset, num_nextn_predict_layers=a.mtp_depth)
    backend = dist.get_backend()
    modes = a.modes.split(",")
    best: dict[str, dict] = {}
    for _ in range(a.rounds):  # modes alternate; each keeps its fastest round (order effects cancel)
        for m in modes:
            r = run_mode(m, cfg, a, info)
            gc.collect()  # the mode's model and optimizer go before the next one is built
            if gpu:
                torch.cuda.empty_cache()
            if m not in best or r["step_ms"] < best[m]["step_ms"]:
                best[m] = r
    results = [best[m] for m in modes]
    if info.rank != 0:
        dist.destroy_process_group()
        return
    where = torch.cuda.get_device_name(info.device) if gpu else f"CPU ({torch.get_num_threads()} threads/rank)"
    print(f"\n{a.preset}: {info.world} ranks ({backend}) on {where}, {a.batch} x {a.seq} tokens per rank, "
          f"best of {a.rounds} alternating rounds of a median of {a.steps} steps after {a.warmup} warm-up; shares from {a.probe} synchronized probe steps")
    print("| mode | tokens/s per GPU | step ms | all-to-all share | grad sync share | params local | "
          "model state GiB | peak GiB | first loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        name = f"EP {r['ep']}" if r["mode"] == "ep" else "DP only"
        print(f"| {name} | {r['tokens_per_s_per_gpu']:,.0f} | {r['step_ms']:.1f} | {100 * r['a2a_share']:.1f}% | "
              f"{100 * r['grad_sync_share']:.1f}% | {r['params_local'] / 1e6:.2f}M | {r['state_gib']:.3f} | {peak} | "
              f"{r['first_loss']:.4f} |")
    summary = {"preset": a.preset, "world": info.world, "backend": backend, "device": where, **environment(info.device),
               "batch_per_rank": a.batch, "seq": a.seq, "results": results,
               "peak_rss_gib_rank0": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    by = {r["mode"]: r for r in results}
    if "dp" in by and "ep" in by:
        summary["ep_over_dp_tokens_per_s"] = by["ep"]["tokens_per_s_per_gpu"] / by["dp"]["tokens_per_s_per_gpu"]
        summary["ep_over_dp_state_memory"] = by["ep"]["state_gib"] / by["dp"]["state_gib"]
        print(f"EP / DP: tokens/s per GPU {summary['ep_over_dp_tokens_per_s']:.2f}x, "
              f"model-state memory {summary['ep_over_dp_state_memory']:.2f}x")
    print_json(summary)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
