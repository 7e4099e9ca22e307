"""Training forward + backward on one GPU: cross entropy on the logits of the `small` preset in
bf16, nanoseek's DeepSeekV3 (eager, and per-block torch.compile in a side process) against
transformers' DeepseekV3ForCausalLM built from the same config with the same weights (logit
parity checked first); tokens/s, MFU (PaLM appendix B: against the spec peak, the measured matmul
peak beside it), peak memory, and a profile of one eager step. The model is DeepSeek-V3's
architecture (report section 2: MLA, DeepSeekMoE, MTP).
Every row is timed with the machine to itself: the compile side process starts only after the
eager and transformers rows. benchmarks/RESULTS.md holds measured numbers.

    python -m benchmarks.bench_fwd_bwd --json              # GPU
    python -m benchmarks.bench_fwd_bwd --quick --json      # CPU smoke test, tiny config

Prints a table and, with --json, one JSON line with every number last.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from nanoseek.perf import spec_peak_flops, training_flops_per_token

from .bench_experts import pick_experts_impl
from .common import (bench_config, build_model, dtype_of, environment, fmt, log, measured_peaks, mfu_pair,
                     print_json, sync, table, timed)

RESULTS: dict = {}
WORKERS: list = []  # compile side processes we started (killed by handle if a part fails)


def save_partial(args):
    if args.out:
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)


def mem_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if torch.device(device).type == "cuda" else None


def reset_mem(device):
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def build_hf(cfg, ours_sd, device, dtype, attn_impl, experts_impl):
    """transformers' DeepseekV3ForCausalLM from cfg.to_hf_dict(), with our weights copied in."""
    import transformers
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    d = cfg.to_hf_dict()
    d["rope_interleave"] = True
    d.pop("architectures", None)
    hcfg = DeepseekV3Config(**d)
    kw = dict(attn_implementation=attn_impl, dtype=dtype)
    if experts_impl:
        kw["experts_implementation"] = experts_impl
    with torch.device(device):
        try:
            hf = DeepseekV3ForCausalLM._from_config(hcfg, **kw)
        except TypeError:  # an older transformers without one of the keywords
            kw.pop("experts_implementation", None)
            hf = DeepseekV3ForCausalLM._from_config(hcfg, **kw)
    copied, missing = 0, []
    with torch.no_grad():
        for name, t in hf.state_dict().items():
            m = re.fullmatch(r"(.*\.mlp\.experts)\.gate_up_proj", name)
            m2 = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", name)
            if m:
                src = torch.cat([ours_sd[m.group(1) + ".gate_proj"], ours_sd[m.group(1) + ".up_proj"]], dim=1)
            elif m2:
                src = ours_sd[f"{m2.group(1)}.{m2.group(3)}"][int(m2.group(2))]
            elif name in ours_sd:
                src = ours_sd[name]
            else:
                missing.append(name)
                continue
            if tuple(src.shape) != tuple(t.shape):
                raise RuntimeError(f"shape mismatch for {name}: ours {tuple(src.shape)} vs hf {tuple(t.shape)}")
            t.copy_(src)
            copied += 1
    missing = [n for n in missing if not n.endswith(("inv_freq", "original_inv_freq"))]
    if missing:
        raise RuntimeError(f"HF tensors with no nanoseek source: {missing[:8]}")
    info = dict(transformers=transformers.__version__, attn_implementation=hf.config._attn_implementation,
                experts_implementation=getattr(hf.config, "_experts_implementation", None), tensors_copied=copied)
    return hf, info


def make_batch(cfg, B, T, device, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g).to(device)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def train_step_fn(model, ids, tgt, hf=False):
    V = model.config.vocab_size

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, use_cache=False).logits if hf else model(ids)
        loss = F.cross_entropy(logits.float().view(-1, V), tgt.view(-1))
        loss.backward()
        return loss
    return step


def time_training(name, model, ids, tgt, device, args, hf=False):
    step = train_step_fn(model, ids, tgt, hf)
    reset_mem(device)
    base = torch.cuda.memory_allocated(device) / 2**30 if torch.device(device).type == "cuda" else None
    t0 = time.perf_counter()
    loss = step()
    sync(device)
    first = time.perf_counter() - t0
    ts = timed(step, device, warmup=args.warmup_train - 1, iters=args.iters_train)
    B, T = ids.shape
    med = statistics.median(ts)
    r = dict(step_ms=1e3 * med, min_ms=1e3 * min(ts), max_ms=1e3 * max(ts), first_step_s=first,
             tokens_per_s=B * T / med, peak_mem_gib=mem_gib(device), mem_before_step_gib=base,
             loss=float(loss.item()))
    log(f"  {name}: {r['step_ms']:.1f} ms/step (min {r['min_ms']:.1f}), {r['tokens_per_s']:.0f} tok/s, "
        f"peak {fmt(r['peak_mem_gib'])} GiB, loss {r['loss']:.4f}")
    return r


def fit_batch(cfg, device, args, try_fn):
    """Run try_fn(B) at the requested batch, halving on CUDA OOM."""
    B = args.batch
    while B >= 1:
        try:
            return B, try_fn(B)
        except torch.OutOfMemoryError:
            log(f"  OOM at batch {B}; halving")
            torch.cuda.empty_cache()
            B //= 2
    raise RuntimeError("OOM even at batch 1")


def profile_step(model, ids, tgt, device, args):
    """One profiled eager step: where the GPU time goes, and how busy the GPU is."""
    step = train_step_fn(model, ids, tgt)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    step()
    sync(device)
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        step()
        sync(device)
        wall = time.perf_counter() - t
    ka = prof.key_averages()

    def dev_self(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0
    ops = sorted(((e.key, dev_self(e) / 1e3, e.count) for e in ka if e.key.startswith("aten::")),
                 key=lambda r: -r[1])
    total_ms = sum(r[1] for r in ops)
    kernels = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
    kernel_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 if kernels else 0.0
    groups = {"matmul (mm/bmm/addmm/_grouped_mm)": ("mm", "bmm", "addmm", "_grouped_mm", "linear", "matmul"),
              "attention (sdpa kernels)": ("attention", "flash", "cudnn", "efficient"),
              "gather/scatter/sort (routing, permute)": ("index", "scatter", "gather", "sort", "bincount", "topk",
                                                         "embedding", "cumsum"),
              }
    by_group = {g: 0.0 for g in groups}
    by_group["elementwise/other"] = 0.0
    for key, ms, _ in ops:
        op = key[len("aten::"):]
        for g, pats in groups.items():
            if any(p == op or (p in op and p not in ("mm",)) for p in pats):
                by_group[g] += ms
                break
        else:
            by_group["elementwise/other"] += ms
    if args.out:
        with open(os.path.join(args.out, "profile_ours_eager.txt"), "w") as f:
            sort = "self_device_time_total" if kernels else "self_cpu_time_total"
            try:
                f.write(ka.table(sort_by=sort, row_limit=60))
            except Exception as e:  # noqa: BLE001
                f.write(f"table failed: {e}\n")
    top = [dict(op=k, ms=round(ms, 3), calls=c) for k, ms, c in ops[:15]]
    table(f"Profile, nanoseek eager, one step (wall {1e3 * wall:.1f} ms, GPU kernel time {kernel_ms:.1f} ms "
          f"= {100 * kernel_ms / max(1e-9, 1e3 * wall):.0f}% busy)",
          ["aten op (self GPU time)", "ms", "% of op time", "calls"],
          [[t["op"], f"{t['ms']:.2f}", f"{100 * t['ms'] / max(total_ms, 1e-9):.1f}", t["calls"]] for t in top])
    log("  by group: " + ", ".join(f"{g} {ms:.1f} ms ({100 * ms / max(total_ms, 1e-9):.0f}%)" for g, ms in by_group.items()))
    return dict(wall_ms=1e3 * wall, gpu_kernel_ms=kernel_ms, op_gpu_ms=total_ms, top_ops=top,
                by_group_ms={g: round(v, 3) for g, v in by_group.items()})


# ------------------------------------------------------------------------------------ compile worker
def compile_worker(args):
    """Side process: build the model, torch.compile each decoder block, step until warm, say
    'ready', wait for 'go' (so its timed steps have the GPU alone), time, print one JSON line."""
    device, dtype = args.device, dtype_of(args.dtype)
    cfg = bench_config(args.quick)
    res = dict(mode="per-block torch.compile (default mode), eager head + loss")
    try:
        model = build_model(cfg, device, dtype, args.experts_impl)
        for layer in model.model.layers.values():
            layer.compile()
        ids, tgt = make_batch(cfg, args.batch, args.seq, device)
        step = train_step_fn(model, ids, tgt)
        reset_mem(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        res["first_step_s"] = time.perf_counter() - t0  # compiles forward and backward
        open(os.path.join(args.worker_dir, "ready"), "w").close()
        while not os.path.exists(os.path.join(args.worker_dir, "go")):
            time.sleep(0.05)
        ts = timed(step, device, warmup=2, iters=args.iters_train)
        med = statistics.median(ts)
        res.update(ok=True, step_ms=1e3 * med, min_ms=1e3 * min(ts), max_ms=1e3 * max(ts),
                   tokens_per_s=args.batch * args.seq / med, peak_mem_gib=mem_gib(device),
                   loss=float(step().item()))
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        res.update(ok=False, error=f"{type(e).__name__}: {str(e)[:600]}")
        open(os.path.join(args.worker_dir, "ready"), "w").close()
    print("WORKER_JSON " + json.dumps(res), flush=True)


def start_compile_worker(args, experts_impl, batch):
    wdir = os.path.join(args.out or "/tmp", "compile_worker")
    os.makedirs(wdir, exist_ok=True)
    for f in ("ready", "go"):
        if os.path.exists(os.path.join(wdir, f)):
            os.remove(os.path.join(wdir, f))
    cmd = [sys.executable, "-m", __spec__.name, "--worker", "compile", "--worker-dir", wdir,
           "--device", args.device, "--dtype", args.dtype, "--batch", str(batch), "--seq", str(args.seq),
           "--iters-train", str(args.iters_train), "--experts-impl", experts_impl] + (["--quick"] if args.quick else [])
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS=str(max(1, (os.cpu_count() or 2) // 2)),
               PYTHONUNBUFFERED="1")
    logf = open(os.path.join(wdir, "log.txt"), "w")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    WORKERS.append(proc)
    return dict(proc=proc, dir=wdir, log=logf, t0=time.perf_counter())


def finish_compile_worker(w, args):
    deadline = w["t0"] + args.compile_timeout
    ready = os.path.join(w["dir"], "ready")
    while not os.path.exists(ready) and w["proc"].poll() is None and time.perf_counter() < deadline:
        time.sleep(0.2)
    waited = time.perf_counter() - w["t0"]
    if not os.path.exists(ready):
        if w["proc"].poll() is None:
            w["proc"].kill()  # our own child, by its handle
            w["proc"].wait()
            res = dict(ok=False, error=f"not warm within {args.compile_timeout:.0f} s of starting (killed)")
        else:
            res = dict(ok=False, error=f"worker exited with code {w['proc'].returncode} before warm-up")
    else:
        open(os.path.join(w["dir"], "go"), "w").close()
        try:
            w["proc"].wait(timeout=max(60.0, 30.0 * args.iters_train))
        except subprocess.TimeoutExpired:
            w["proc"].kill()
            w["proc"].wait()
        w["log"].flush()
        res = None
        with open(os.path.join(w["dir"], "log.txt")) as f:
            for line in f:
                if line.startswith("WORKER_JSON "):
                    res = json.loads(line[len("WORKER_JSON "):])
        res = res or dict(ok=False, error="worker printed no result")
    res["waited_for_worker_s"] = waited
    w["log"].close()
    if not res.get("ok"):
        with open(os.path.join(w["dir"], "log.txt")) as f:
            tail = f.read()[-3000:]
        log("  compile worker log tail:\n" + tail)
    return res


def part_train(args, cfg, device, dtype, experts_impl, peak_flops, on_gpu, q):
    """Every row of the table; returns the results."""
    log(f"\n-- training fwd+bwd, {'nano (quick)' if q else 'small'} preset, {dtype}, experts={experts_impl}")
    worker = None
    flops_tok = training_flops_per_token(cfg, args.seq)
    spec_flops = spec_peak_flops(device) or peak_flops  # MFU's denominator; the measured peak beside it
    model = build_model(cfg, device, dtype, experts_impl)
    ids, tgt = make_batch(cfg, args.batch, args.seq, device)

    def try_ours(B):
        i, t = make_batch(cfg, B, args.seq, device)
        return time_training("nanoseek eager", model, i, t, device, args)
    B, ours = fit_batch(cfg, device, args, try_ours)
    args.batch = B
    ids, tgt = make_batch(cfg, B, args.seq, device)
    train = dict(batch=B, seq=args.seq, tokens_per_step=B * args.seq, flops_per_token=flops_tok,
                 nanoseek_eager=ours)
    if not args.skip_profile:
        try:
            train["profile_nanoseek_eager"] = profile_step(model, ids, tgt, device, args)
        except Exception as e:  # noqa: BLE001
            log(f"  profile failed: {type(e).__name__}: {e}")
            train["profile_nanoseek_eager"] = dict(error=str(e)[:300])
    # reference logits for the parity check, then park our model on the CPU so peaks compare
    with torch.no_grad():
        pids = make_batch(cfg, 1, min(256, args.seq), device, seed=5)[0]
        ref = model(pids).float()
    model.zero_grad(set_to_none=True)
    sd_cpu_model = model.to("cpu")
    reset_mem(device)
    if not args.skip_hf:
        try:
            sd = {k: v.to(device) for k, v in sd_cpu_model.state_dict().items()}
            hf, hinfo = build_hf(cfg, sd, device, dtype, args.hf_attn, "grouped_mm" if on_gpu else None)
            del sd
            hf.train()
            with torch.no_grad():
                hl = hf(input_ids=pids, use_cache=False).logits.float()
            hinfo["parity_max_abs_logit_diff"] = (hl - ref).abs().max().item()
            hinfo["parity_rel_logit_diff"] = ((hl - ref).norm() / ref.norm()).item()
            hinfo["parity_argmax_agreement"] = (hl.argmax(-1) == ref.argmax(-1)).float().mean().item()
            log(f"  transformers {hinfo['transformers']}: attn={hinfo['attn_implementation']}, "
                f"experts={hinfo['experts_implementation']}; logits vs ours on the same weights: max |diff| "
                f"{hinfo['parity_max_abs_logit_diff']:.3g}, rel {hinfo['parity_rel_logit_diff']:.3g}, "
                f"argmax agree {100 * hinfo['parity_argmax_agreement']:.1f}%")
            try:
                train["transformers"] = {**hinfo, **time_training("transformers", hf, ids, tgt, device, args, hf=True)}
            except torch.OutOfMemoryError:
                train["transformers"] = {**hinfo, "error": f"OOM at batch {B}"}
            del hf
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            train["transformers"] = dict(error=f"{type(e).__name__}: {str(e)[:400]}")
        reset_mem(device)
    del model, sd_cpu_model
    # the compiled run in its own process, started only now: every row is timed with the machine to
    # itself (the compile's CPU threads and its GPU memory were beside the transformers row before)
    if not args.skip_compile:
        worker = start_compile_worker(args, experts_impl, B)
    if worker is not None:
        log(f"  waiting for the compile worker (started {time.perf_counter() - worker['t0']:.0f} s ago)")
        train["nanoseek_compiled"] = finish_compile_worker(worker, args)
    else:
        train["nanoseek_compiled"] = dict(ok=False, error="skipped (--skip-compile)")

    rows = []
    for key, label in (("nanoseek_eager", "nanoseek eager"), ("nanoseek_compiled", "nanoseek torch.compile"),
                       ("transformers", "transformers")):
        r = train.get(key)
        if not r or "tokens_per_s" not in r:
            rows.append([label, "FAIL", "-", "-", "-", "-", (r or {}).get("error", "not run")[:70]])
            continue
        r["mfu"], r["mfu_of_measured_peak"] = mfu_pair(r["tokens_per_s"], flops_tok, spec_flops, peak_flops)
        rows.append([label, f"{r['step_ms']:.1f}", f"{r['tokens_per_s']:.0f}", f"{100 * r['mfu']:.1f}%",
                     f"{100 * r['mfu_of_measured_peak']:.1f}%", fmt(r.get("peak_mem_gib")), ""])
    hf_tps = train.get("transformers", {}).get("tokens_per_s")
    for key in ("nanoseek_eager", "nanoseek_compiled"):
        if hf_tps and "tokens_per_s" in train.get(key, {}):
            train[f"ratio_{key}_over_transformers"] = train[key]["tokens_per_s"] / hf_tps
    table(f"Training fwd+bwd, batch {B} x seq {args.seq}, {dtype} "
          f"({flops_tok / 1e9:.3f} GFLOP/token, median of {args.iters_train})",
          ["model", "ms/step", "tok/s", f"MFU (spec {spec_flops / 1e12:.0f})", "of measured peak", "peak GiB", "note"],
          rows)
    for key in ("nanoseek_eager", "nanoseek_compiled"):
        if f"ratio_{key}_over_transformers" in train:
            log(f"  {key} / transformers: {train[f'ratio_{key}_over_transformers']:.2f}x")
    c = train["nanoseek_compiled"]
    if c.get("ok"):
        log(f"  compile: first step (compiling forward + backward) {c['first_step_s']:.0f} s, in a side "
            f"process started after the eager and transformers rows were timed (every row had the GPU to itself)")
    RESULTS["train"] = train
    save_partial(args)
    return train




def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny config and few iterations (CPU smoke test)")
    ap.add_argument("--json", action="store_true", help="print one JSON line with every number last")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32"])
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--iters-train", type=int, default=None)
    ap.add_argument("--warmup-train", type=int, default=3)
    ap.add_argument("--experts-impl", default="auto", choices=["auto", "grouped_mm", "segments"],
                    help="routed experts of the model (auto: grouped_mm where it runs, else segments)")
    ap.add_argument("--hf-attn", default="sdpa")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--compile-timeout", type=float, default=None, help="seconds from start to warm")
    ap.add_argument("--skip-profile", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for results.json, logs, profile")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    q = args.quick
    d = dict(batch=2 if q else 8, seq=64 if q else 2048, iters_train=3 if q else 10, compile_timeout=600 if q else 200)
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.worker == "compile":
        return compile_worker(args)
    if args.out:
        os.makedirs(args.out, exist_ok=True)

    device, dtype = args.device, dtype_of(args.dtype)
    t_start = time.perf_counter()
    cfg = bench_config(q)
    env = {**environment(device), "device": args.device, "dtype": str(dtype), "quick": q}
    RESULTS["env"] = env
    log(f"bench_fwd_bwd: {env}")

    peak_flops, bw = measured_peaks(device)
    RESULTS["peaks"] = dict(matmul_tflops=peak_flops / 1e12, copy_tb_s=bw / 1e12)
    log(f"measured peaks: matmul {peak_flops / 1e12:.0f} TFLOP/s ({'bf16 8192^3' if on_gpu else 'fp32 small'}), "
        f"copy {bw / 1e12:.2f} TB/s (read+write)")
    experts_impl = pick_experts_impl(device, dtype) if args.experts_impl == "auto" else args.experts_impl
    RESULTS["experts_impl"] = experts_impl
    try:
        part_train(args, cfg, device, dtype, experts_impl, peak_flops, on_gpu, q)
    except Exception as e:  # noqa: BLE001  (recorded in the JSON)
        traceback.print_exc()
        RESULTS["train"] = dict(error=f"{type(e).__name__}: {str(e)[:600]}")
        for proc in WORKERS:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    RESULTS["wall_s"] = time.perf_counter() - t_start
    save_partial(args)
    log(f"\ntotal wall time {RESULTS['wall_s']:.0f} s")
    if args.json:
        print_json(RESULTS)


if __name__ == "__main__":
    main()
