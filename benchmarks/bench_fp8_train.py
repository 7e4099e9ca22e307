"""FP8 vs bf16 training end to end through `nanoseek.train.train` on real English text.

(a) Speed and memory: tokens/s (median over the steps after the first two, which include
    compilation and autotuning) and peak GPU memory for a wide model (hidden 4096, a few
    layers, MoE with 8 experts of width 2048, V3-like attention dims; fp32 master weights,
    AdamW) and for the `small` preset, bf16 vs fp8 (`--precision fp8`: nanoseek/quant/fp8.py).
(b) Quality: validation loss after the same tokens, fp8 vs bf16 with the same seed (same
    initialization and data order), next to bf16 vs bf16 with another seed (another
    initialization and data order: the training-randomness noise floor). The DeepSeek-V3
    report claims a relative loss error below 0.25 % for its FP8 recipe. The validation set is
    the same sequential windows of the held-out shard for every run.

    python -m benchmarks.bench_fp8_train [--data .carry/gutenberg] [--json-out FILE]
    python -m benchmarks.bench_fp8_train --model nano --steps 5 --batch-size 2 \\
        --seq-len 64 --speed-steps 0 --eval-batches 2          # a tiny CPU run of the same script

`--data` is a folder prepared by `nanoseek prepare` (meta.json, train.bin, val.bin,
tokenizer.json); when it is missing the script says so and exits 0 without measuring. Prints
a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time

import torch

from nanoseek.quant.checked import REGISTRY
from nanoseek.train import TrainArgs, train

from .common import environment, print_json, read_metrics

# The wide model: `small` with these fields changed (V3-like attention, 8 x 2048 experts, hidden 4096).
WIDE = dict(hidden_size=4096, num_hidden_layers=4, first_k_dense_replace=1, intermediate_size=11008,
            moe_intermediate_size=2048, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
            n_group=4, topk_group=2, num_attention_heads=32, q_lora_rank=1536, kv_lora_rank=512,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)


def run_one(a, tag: str, preset: str, overrides: dict | None, precision: str, seed: int, steps: int,
            batch: int, seq: int, eval_batches: int, mtp_depth: int | None, work: str, kernels: str = "off") -> dict:
    """One training run in this process; returns its summary plus speed and peak memory."""
    out = os.path.join(work, tag)
    REGISTRY.reset()  # each run makes its own first-use checks and reports only its own fallbacks
    cuda = torch.cuda.is_available()
    if cuda:
        gc.collect()  # the previous run's model and optimizer, so that peak memory is this run's own
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    args = TrainArgs(data=[a.data], out=out, preset=preset, overrides=overrides, max_steps=steps,
                     batch_size=batch, seq_len=seq, lr=a.lr, warmup_steps=max(1, round(steps * a.warmup)),
                     eval_every=0, eval_batches=eval_batches, precision=precision, seed=seed,
                     save=False, progress=False, mtp_depth=mtp_depth, fp8_kernels=kernels.split(":")[0],
                     fp8_grouped=(kernels.split(":") + ["auto"])[1])
    s = train(args)
    wall = time.time() - t0
    recs = read_metrics(out)
    steps_recs = [r for r in recs if "loss" in r and "tokens_per_s" in r]
    speeds = [r["tokens_per_s"] for r in steps_recs[2:]] or [r["tokens_per_s"] for r in steps_recs]
    losses = [r["loss"] for r in steps_recs]
    tail = losses[-max(1, len(losses) // 5):]  # mean training loss over the last fifth of the steps
    res = {"tag": tag, "preset": preset, "precision": precision, "seed": seed, "steps": s["step"],
           "fp8_kernels_setting": kernels if precision == "fp8" else None,
           "tokens": s["step"] * batch * seq, "params_total": s["params_total"],
           "tokens_per_s": statistics.median(speeds) if speeds else float("nan"),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "val_loss": s["val_loss"], "train_loss_tail": sum(tail) / len(tail), "skipped_steps": s["skipped_steps"],
           "wall_s": round(wall, 1)}
    if precision == "fp8":  # which fused-path kernels passed their first-use checks (nanoseek/quant/checked.py)
        k = REGISTRY.report()
        res["fp8_kernels"] = {"quantizer_choice": {str(key): v for key, v in k.quantizers.items()},
                              "quantizer_fallbacks": {str(key): v for key, v in k.quantizer_fallbacks.items()},
                              "grouped_fallbacks": dict(k.grouped_fallbacks),
                              "scaled_mm_fallbacks": {str(key): v for key, v in k.scaled_mm_fallbacks.items()},
                              "check_every": k.check_every, "check_mismatches": k.mismatches,
                              "check_first_mismatches": k.mismatch_log[:8]}
    print(f"[{tag}] {json.dumps(res)}", flush=True)
    return res


class _keep:
    """A folder kept after the runs (the `--work` option), used like TemporaryDirectory."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> str:
        os.makedirs(self.path, exist_ok=True)
        return self.path

    def __exit__(self, *exc):
        return False


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=".carry/gutenberg", help="a prepared token folder (meta.json, train.bin, ...)")
    p.add_argument("--model", default="wide", help="'wide' (see WIDE) or a preset name for the quality runs")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of each quality run")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up steps as a fraction of the run")
    p.add_argument("--seeds", type=int, default=1,
                   help="seeds of each fp8 setting (each next to a bf16 run of the same seed; bf16 runs at least 2)")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--speed-preset", default="small", help="second model, speed and memory only")
    p.add_argument("--speed-steps", type=int, default=15, help="0 skips the second model")
    p.add_argument("--speed-batch-size", type=int, default=16)
    p.add_argument("--speed-seq-len", type=int, default=2048)
    p.add_argument("--fp8-kernels", default="auto",
                   help="FP8 quantizers of the fp8 runs (nanoseek.quant.fp8.FP8Config.kernels: off, auto, triton, "
                        "torch), optionally with the experts' GEMMs after a colon (auto:loop; default :auto, the "
                        "grouped Triton GEMMs with the Triton kernels); a comma list runs "
                        "one fp8 run per setting next to the same bf16 runs")
    p.add_argument("--work", help="keep each run's folder (metrics.jsonl, loss curve) here instead of a temporary one")
    p.add_argument("--json-out")
    a = p.parse_args()
    kernel_settings = a.fp8_kernels.split(",")
    bad = [k for k in kernel_settings if k.split(":")[0] not in ("off", "auto", "triton", "torch")
           or k.split(":")[1:] not in ([], ["auto"], ["loop"], ["triton"])
           or (k.endswith(":triton") and k.split(":")[0] not in ("auto", "triton"))]
    if len(set(kernel_settings)) != len(kernel_settings):
        p.error(f"--fp8-kernels: a setting is listed twice ({a.fp8_kernels})")
    if bad:
        p.error(f"--fp8-kernels: unknown setting(s) {bad}; use off, auto, triton or torch (optionally :auto, "
                f":loop, or :triton with auto or triton)")
    if a.seeds < 1:
        p.error(f"--seeds: at least 1, got {a.seeds}")
    if not 0 <= a.warmup <= 1:
        p.error(f"--warmup: a fraction of the run between 0 and 1, got {a.warmup}")
    if not os.path.isfile(os.path.join(a.data, "meta.json")):
        print(f"bench_fp8_train: no prepared data at {a.data} (meta.json missing); nothing measured")
        print_json({"skipped": f"no data at {a.data}"})
        return
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out = {"device": dev, **environment(), "data": a.data, "args": vars(a)}
    print({k: v for k, v in out.items() if k != "args"}, flush=True)
    preset, overrides, mtp = ((a.model, None, None) if a.model != "wide"
                              else ("small", {**WIDE, "vocab_size": 8192}, 0))
    runs = []
    with (tempfile.TemporaryDirectory(prefix="bench_fp8_train_") if not a.work else _keep(a.work)) as work:
        common = dict(steps=a.steps, batch=a.batch_size, seq=a.seq_len, eval_batches=a.eval_batches, mtp_depth=mtp,
                      work=work)
        plan = []
        for seed in range(max(2, a.seeds)):
            plan.append((f"bf16-seed{seed}", "bf16", seed, "off"))
            if seed < a.seeds:
                plan += [(f"fp8-{k}-seed{seed}", "fp8", seed, k) for k in kernel_settings]
        for tag, prec, seed, kern in plan:
            runs.append(run_one(a, f"{a.model}-{tag}", preset, overrides, prec, seed, kernels=kern, **common))
            if a.json_out:
                json.dump({**out, "runs": runs}, open(a.json_out, "w"), indent=1)
        if a.speed_steps > 0:
            for prec, kern in [("bf16", "off"), *(("fp8", k) for k in kernel_settings)]:
                runs.append(run_one(a, f"{a.speed_preset}-{prec}" + (f"-{kern}" if prec == "fp8" else ""),
                                    a.speed_preset, None, prec, 0, steps=a.speed_steps, batch=a.speed_batch_size,
                                    seq=a.speed_seq_len, eval_batches=1, mtp_depth=None, work=work, kernels=kern))
                if a.json_out:
                    json.dump({**out, "runs": runs}, open(a.json_out, "w"), indent=1)
    by = {r["tag"]: r for r in runs}
    b0, b1 = by[f"{a.model}-bf16-seed0"], by[f"{a.model}-bf16-seed1"]
    rel = lambda x, ref: (x - ref) / ref  # noqa: E731
    quality = {"val_loss_bf16_seed0": b0["val_loss"], "val_loss_bf16_seed1": b1["val_loss"],
               "rel_gap_bf16_seed1_vs_seed0": rel(b1["val_loss"], b0["val_loss"]), "tokens_each": b0["tokens"]}
    speed = {}
    for k in kernel_settings:
        f0 = by[f"{a.model}-fp8-{k}-seed0"]
        quality[f"val_loss_fp8_{k}_seed0"] = f0["val_loss"]
        quality[f"rel_gap_fp8_{k}_vs_bf16"] = rel(f0["val_loss"], b0["val_loss"])
        quality[f"rel_gap_train_loss_tail_fp8_{k}_vs_bf16"] = rel(f0["train_loss_tail"], b0["train_loss_tail"])
        for seed in range(1, a.seeds):
            fs, bs = by[f"{a.model}-fp8-{k}-seed{seed}"], by[f"{a.model}-bf16-seed{seed}"]
            quality[f"rel_gap_fp8_{k}_seed{seed}_vs_bf16"] = rel(fs["val_loss"], bs["val_loss"])
        for name, pair in [(a.model, (b0, f0)), (a.speed_preset, (by.get(f"{a.speed_preset}-bf16"),
                                                                  by.get(f"{a.speed_preset}-fp8-{k}")))]:
            if pair[0] and pair[1]:
                speed[f"{name} fp8-{k}"] = {
                    "bf16_tokens_per_s": pair[0]["tokens_per_s"], "fp8_tokens_per_s": pair[1]["tokens_per_s"],
                    "fp8_speedup": pair[1]["tokens_per_s"] / pair[0]["tokens_per_s"],
                    "bf16_peak_gib": pair[0]["peak_gib"], "fp8_peak_gib": pair[1]["peak_gib"]}
    print(f"\n{'run':28s} {'params':>8s} {'tokens':>10s} {'tok/s':>9s} {'peak GiB':>9s} {'val loss':>9s} "
          f"{'train loss (last 1/5)':>22s} {'wall s':>7s}")
    for r in runs:
        peak = f"{r['peak_gib']:9.1f}" if r["peak_gib"] is not None else f"{'-':>9s}"
        print(f"{r['tag']:28s} {r['params_total'] / 1e6:7.0f}M {r['tokens']:10d} {r['tokens_per_s']:9.0f} {peak} "
              f"{r['val_loss']:9.4f} {r['train_loss_tail']:22.4f} {r['wall_s']:7.1f}")
    gaps = ", ".join(f"fp8-{k} {100 * quality[f'rel_gap_fp8_{k}_vs_bf16']:+.3f} %"
                     + "".join(f" (seed {s}: {100 * quality[f'rel_gap_fp8_{k}_seed{s}_vs_bf16']:+.3f} %)"
                               for s in range(1, a.seeds)) for k in kernel_settings)
    print(f"\nval loss, relative to bf16 (same seed): {gaps}; "
          f"bf16 seed 1 vs seed 0 (noise floor) {100 * quality['rel_gap_bf16_seed1_vs_seed0']:+.3f} %; "
          f"the DeepSeek-V3 report: < 0.25 %")
    for name, sp in speed.items():
        print(f"speed {name}: fp8/bf16 tokens/s {sp['fp8_speedup']:.2f}x"
              + (f", peak {sp['bf16_peak_gib']:.1f} -> {sp['fp8_peak_gib']:.1f} GiB" if sp["bf16_peak_gib"] else ""))
    out.update(runs=runs, quality=quality, speed=speed)
    if a.json_out:
        json.dump(out, open(a.json_out, "w"), indent=1)
    print_json(out)


if __name__ == "__main__":
    main()
