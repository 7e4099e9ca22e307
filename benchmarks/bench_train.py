"""Pretraining benchmarks (one script, side by side in one run).

speed: full training steps (forward, backward, AdamW with fp32 master weights, bf16 autocast) of
       the `small` preset through `nanoseek.train`, against torchtitan's DeepSeek-V3 model
       (benchmarks/torchtitan_peer.py) and transformers' DeepseekV3ForCausalLM of the same config,
       from the same starting weights, on the same batches, with the same recipe; tokens/s, MFU
       (nanoseek/perf.py), peak memory, parameter counts and step-0 losses.
alflb: the auxiliary-loss-free balancing claim (DeepSeek-V3 report 2.1.2): the same ~150M MoE on
       the same real English text, same seed and data order, aux loss vs bias update, equal
       tokens; validation loss and MaxVio curves, plus a second seed of the bias arm as the noise
       floor. Writes alflb.png.

    python -m benchmarks.bench_train --data DIR_PREPARED --part all --out OUT [--quick]

DIR_PREPARED is a folder filled by `nanoseek.data.prepare` (train.bin, val.bin, meta.json,
tokenizer.json). Prints tables and a final JSON line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from nanoseek import ModelConfig
from nanoseek.data import Batches, TokenShard
from nanoseek.model import DeepSeekV3
from nanoseek.perf import measure_matmul_peak, training_flops_per_token
from nanoseek.train import TrainArgs, train

from .common import environment, mfu_pair, print_json, read_metrics, spec_peak_flops, sync

# ~150M-parameter MoE for the balancing comparison (overrides on the `small` preset)
MOE_150M = dict(vocab_size=8192, hidden_size=768, intermediate_size=2048, moe_intermediate_size=384,
                num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=12, q_lora_rank=256,
                kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
                num_nextn_predict_layers=1)
QUICK = dict(vocab_size=8192, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
             num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=64,
             kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
             n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
             num_nextn_predict_layers=1)


def steady_tokens_per_s(run_dir, skip):
    recs = [r for r in read_metrics(run_dir) if "loss" in r][skip:]
    return statistics.median(r["tokens_per_s"] for r in recs)


def peer_batches(data_dir: str, batch: int, seq: int):
    """The batches our loop draws (same shard, same seed, same order), for the peers."""
    return Batches(TokenShard(os.path.join(data_dir, "train.bin")), seq, batch, seed=0)


def start_weights(cfg: ModelConfig, device) -> DeepSeekV3:
    """The initial model our loop builds for `small` (seed 0), which the peers copy."""
    return DeepSeekV3.from_config(cfg, device=device, seed=0)


def time_peer(label: str, model, forward, batches, steps: int, device, compiled: bool, before_step=None) -> tuple[float, float]:
    """Full training steps of a peer, the recipe of ours: bf16 autocast, cross-entropy in fp32,
    clipping at 1.0, fused AdamW; median step after the first 2 (5 compiled), as ours. Returns
    (tokens/s, loss of the first step)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    times, first_loss = [], float("nan")
    for step in range(steps):
        x, y = (t.to(device, non_blocking=True) for t in batches.get(step))
        sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = forward(x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if before_step is not None:
            before_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t)
        if step == 0:
            first_loss = loss.item()
    tps = x.numel() / statistics.median(times[5 if compiled else 2:])
    print(f"  {label}: {tps:,.0f} tok/s, step-0 loss {first_loss:.4f}")
    return tps, first_loss


def hf_train_speed(cfg: ModelConfig, batches, steps: int, device, compiled: bool = False,
                   bf16_weights: bool = False) -> tuple[float, float, int]:
    """transformers' DeepseekV3ForCausalLM from our starting weights (the same names), SDPA attention
    and its grouped-GEMM experts (`experts_implementation="grouped_mm"`, its fastest), no KV cache
    (`use_cache=False`), eager or under torch.compile. Under torch.compile transformers runs
    grouped_mm only on bf16 weights (with fp32 ones it falls back to a per-expert loop), so
    `bf16_weights` times its fastest compiled setting too: bf16 parameters and AdamW states, a
    different recipe from ours. Returns (tokens/s, step-0 loss, parameters)."""
    label = hf_label(compiled, bf16_weights)
    try:
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
        d = cfg.to_hf_dict()
        for k in ("architectures", "model_type", "torch_dtype"):
            d.pop(k, None)
        d["num_nextn_predict_layers"] = 0
        hcfg = DeepseekV3Config(**d)
        with torch.device(device):
            model = DeepseekV3ForCausalLM._from_config(hcfg, attn_implementation="sdpa",
                                                       experts_implementation="grouped_mm").train()
        missing, unexpected = model.load_state_dict(hf_state(model, start_weights(cfg, device)), strict=False)
        if [k for k in missing if "rotary" not in k] or unexpected:
            raise KeyError(f"weights not shared: missing {missing[:4]}, unexpected {unexpected[:4]}")
        if bf16_weights:
            model = model.to(torch.bfloat16)
        step_model = torch.compile(model) if compiled else model
        n_params = sum(p.numel() for p in model.parameters())
        tps, loss0 = time_peer(label, model, lambda x: step_model(x, use_cache=False).logits, batches, steps,
                               device, compiled)
        del model, step_model
        return tps, loss0, n_params
    except Exception as e:  # noqa: BLE001
        print(f"  {label} failed: {type(e).__name__}: {str(e)[:200]}")
        return 0.0, float("nan"), 0
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def hf_state(hf_model, ours) -> dict:
    """Our state dict in the model's names (the same HF names; newer transformers fuse each MoE
    layer's gate and up projections into one `gate_up_proj` [E, 2F, D])."""
    state = dict(ours.state_dict())
    target = dict(hf_model.named_parameters())
    for name in [n for n in target if n.endswith("experts.gate_up_proj")]:
        prefix = name[: -len("gate_up_proj")]
        state[name] = torch.cat([state.pop(prefix + "gate_proj"), state.pop(prefix + "up_proj")], dim=1)
    return state


def hf_label(compiled: bool, bf16_weights: bool = False) -> str:
    return "transformers " + ("compiled" if compiled else "eager") + (", bf16 weights" if bf16_weights else "")


def torchtitan_train_speed(cfg: ModelConfig, batches, steps: int, device, compiled: bool,
                           attention: str) -> tuple[float, float, int]:
    """torchtitan's DeepSeek-V3 model (benchmarks/torchtitan_peer.py) from our starting weights, its
    flex or SDPA attention, per-block compile as its trainer does, its expert-bias update before each
    optimizer step. Returns (tokens/s, step-0 loss, parameters)."""
    label = f"torchtitan {'compiled' if compiled else 'eager'} ({attention})"
    try:
        from . import torchtitan_peer
        model, forward = torchtitan_peer.build(cfg, attention, device)
        torchtitan_peer.load_from_nanoseek(model, start_weights(cfg, device))
        if compiled:
            torchtitan_peer.compile_blocks(model)
        n_params = sum(p.numel() for p in model.parameters())
        tps, loss0 = time_peer(label, model, forward, batches, steps, device, compiled,
                               before_step=lambda: torchtitan_peer.update_expert_bias(model))
        del model
        return tps, loss0, n_params
    except Exception as e:  # noqa: BLE001
        print(f"  {label} failed: {type(e).__name__}: {str(e)[:300]}")
        return 0.0, float("nan"), 0
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def part_speed(a, results):
    """One table, one run: nanoseek (eager, compiled), torchtitan (eager and compiled, flex and SDPA
    attention), transformers (eager, compiled, compiled on bf16 weights), all from the same starting
    weights on the same batches; the parameter counts and step-0 losses are printed to show that."""
    overrides = {**(QUICK if a.quick else {}), "num_nextn_predict_layers": 0}
    cfg = ModelConfig.from_preset("small", **overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = measure_matmul_peak(device)
    spec = spec_peak_flops(device) or peak  # MFU against the spec peak; the measured one beside it
    fpt = training_flops_per_token(cfg, a.speed_seq)
    batches = peer_batches(a.data, a.speed_batch, a.speed_seq)
    n_ours = sum(p.numel() for p in start_weights(cfg, "cpu").parameters())
    rows = []

    def add(label, tps, loss0, n_params):
        mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        vs_spec, vs_measured = mfu_pair(tps, fpt, spec, peak)
        rows.append(dict(label=label, tokens_per_s=tps, mfu=vs_spec, mfu_of_measured_peak=vs_measured, peak_gib=mem,
                         step0_loss=loss0, params=n_params))

    def wanted(label, compiled):
        return not (compiled and a.no_compile or a.only and label not in a.only)

    for label, compiled in (("nanoseek eager", False), ("nanoseek compiled", True)):
        if not wanted(label, compiled):
            continue
        run = os.path.join(a.out, "speed-" + label.split()[1])
        reset_peak(device)
        try:
            train(TrainArgs(data=[a.data], out=run, preset="small", overrides=QUICK if a.quick else None, mtp_depth=0,
                            max_steps=a.speed_steps, batch_size=a.speed_batch, seq_len=a.speed_seq,
                            precision="bf16", eval_every=0, eval_batches=1, save=False, progress=False,
                            compile=compiled, device=device.type))
            tps = steady_tokens_per_s(run, skip=5 if compiled else 3)
            loss0 = [r for r in read_metrics(run) if "loss" in r][0]["loss"]
        except Exception as e:  # noqa: BLE001
            print(f"  {label} failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        print(f"  {label}: {tps:,.0f} tok/s, step-0 loss {loss0:.4f}")
        add(label, tps, loss0, n_ours)
    for compiled, attention in ((False, "sdpa"), (True, "flex"), (True, "sdpa")):
        label = f"torchtitan {'compiled' if compiled else 'eager'} ({attention})"
        if wanted(label, compiled) and not a.no_torchtitan:
            reset_peak(device)
            tps, loss0, n = torchtitan_train_speed(cfg, batches, a.speed_steps, device, compiled, attention)
            if tps:
                add(label, tps, loss0, n)
    for compiled, bf16_weights in ((False, False), (True, False), (True, True)):
        label = hf_label(compiled, bf16_weights)
        if wanted(label, compiled) and not a.no_hf:
            reset_peak(device)
            tps, loss0, n = hf_train_speed(cfg, batches, a.speed_steps, device, compiled, bf16_weights)
            if tps:
                add(label, tps, loss0, n)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\nTraining step speed, `small`{' (quick overrides)' if a.quick else ''} (MTP off), bf16 autocast + fp32 "
          f"AdamW, batch {a.speed_batch} x {a.speed_seq}, {name}; the same starting weights and batches for all; "
          f"MFU against the dense bf16 spec peak {spec / 1e12:.0f} TFLOP/s, beside it the share of the measured "
          f"matmul peak {peak / 1e12:.0f} TFLOP/s")
    print(f"{'implementation':<34}{'params':>12}{'step-0 loss':>12}{'tokens/s':>12}{'MFU':>8}{'of measured':>13}"
          f"{'peak GiB':>10}")
    for r in rows:
        print(f"{r['label']:<34}{r['params']:>12,}{r['step0_loss']:>12.4f}{r['tokens_per_s']:>12,.0f}"
              f"{100 * r['mfu']:>7.1f}%{100 * r['mfu_of_measured_peak']:>12.1f}%{r['peak_gib']:>10.1f}")
    by = {r["label"]: r["tokens_per_s"] for r in rows}
    ratios = {}
    for peer in ("torchtitan", "transformers"):
        best = max((v for k, v in by.items() if k.startswith(peer)), default=0)
        for kind in ("eager", "compiled"):
            ours = by.get(f"nanoseek {kind}")
            theirs = max((v for k, v in by.items() if k.startswith(f"{peer} {kind}")), default=0)
            if ours and theirs:
                ratios[f"nanoseek {kind} / {peer} {kind} (its fastest)"] = ours / theirs
        if best and by.get("nanoseek compiled"):
            ratios[f"nanoseek compiled / {peer} fastest row"] = by["nanoseek compiled"] / best
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}x")
    results["speed"] = {"peak_tflops": peak / 1e12, "spec_peak_tflops": spec / 1e12, "flops_per_token": fpt,
                        "rows": rows, "ratios": ratios}


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def part_alflb(a, results):
    cfg = QUICK if a.quick else MOE_150M
    arms = [("bias", 0), ("aux", 0), ("bias", 1)]
    curves = {}
    for balance, seed in arms:
        name = f"{balance}-seed{seed}"
        run = os.path.join(a.out, "alflb-" + name)
        t = time.time()
        s = train(TrainArgs(data=[a.data], out=run, preset="small", overrides=cfg, max_steps=a.alflb_steps,
                            batch_size=a.alflb_batch, seq_len=a.alflb_seq, lr=a.alflb_lr, warmup_steps=a.alflb_steps // 10,
                            balance=balance, seed=seed, eval_every=a.alflb_eval_every, eval_batches=a.alflb_eval_batches,
                            save=False, progress=False, compile=a.alflb_compile))
        recs = read_metrics(run)
        train_recs = [r for r in recs if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
        tail = train_recs[-max(1, len(train_recs) // 10):]
        curves[name] = {
            "val": val, "maxvio": [(r["step"], r["maxvio"]) for r in train_recs],
            "final_val_loss": s["val_loss"], "final_val_bpb": s["val_bpb"],
            "maxvio_last10pct": sum(r["maxvio"] for r in tail) / len(tail),
            "maxvio_mean": sum(r["maxvio"] for r in train_recs) / len(train_recs),
            "tokens": a.alflb_steps * a.alflb_batch * a.alflb_seq, "seconds": time.time() - t,
            "params": s["params_total"],
        }
    print(f"\nLoad balancing, same MoE ({curves['bias-seed0']['params'] / 1e6:.0f}M params), same text and data order, "
          f"{curves['bias-seed0']['tokens'] / 1e6:.1f}M tokens per arm")
    print(f"{'arm':<14}{'val loss':>10}{'val bpb':>9}{'MaxVio (last 10%)':>19}{'MaxVio (mean)':>15}{'seconds':>9}")
    for name, c in curves.items():
        print(f"{name:<14}{c['final_val_loss']:>10.4f}{c['final_val_bpb']:>9.4f}{c['maxvio_last10pct']:>19.3f}"
              f"{c['maxvio_mean']:>15.3f}{c['seconds']:>9.0f}")
    gap = curves["aux-seed0"]["final_val_loss"] - curves["bias-seed0"]["final_val_loss"]
    noise = abs(curves["bias-seed1"]["final_val_loss"] - curves["bias-seed0"]["final_val_loss"])
    print(f"val loss aux - bias = {gap:+.4f} (seed-to-seed noise of the bias arm: {noise:.4f})")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for name, c in curves.items():
            ax1.plot(*zip(*c["val"]), "o-", label=name, ms=3)
            steps, mv = zip(*c["maxvio"])
            ax2.plot(steps, mv, label=name, lw=0.8)
        ax1.set_xlabel("step"), ax1.set_ylabel("validation loss"), ax1.legend(), ax1.grid(alpha=0.3)
        ax2.set_xlabel("step"), ax2.set_ylabel("MaxVio (mean over MoE layers)"), ax2.set_yscale("log")
        ax2.legend(), ax2.grid(alpha=0.3)
        fig.suptitle("Auxiliary-loss-free balancing (bias) vs auxiliary loss")
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, "alflb.png"), dpi=110)
    except ImportError:
        pass
    results["alflb"] = {k: {kk: vv for kk, vv in v.items() if kk not in ("maxvio",)} for k, v in curves.items()}
    results["alflb"]["val_loss_aux_minus_bias"] = gap
    results["alflb"]["seed_noise"] = noise


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", default=os.environ.get("OUT", "runs/bench_train"))
    p.add_argument("--part", choices=["speed", "alflb", "all"], default="all")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU check)")
    p.add_argument("--speed-steps", type=int, default=12)
    p.add_argument("--speed-batch", type=int, default=16)
    p.add_argument("--speed-seq", type=int, default=2048)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-torchtitan", action="store_true", help="leave out the torchtitan rows")
    p.add_argument("--no-hf", action="store_true", help="leave out the transformers rows")
    p.add_argument("--only", nargs="*", help="time only these rows of the speed table (by label)")
    p.add_argument("--alflb-steps", type=int, default=400)
    p.add_argument("--alflb-batch", type=int, default=32)
    p.add_argument("--alflb-seq", type=int, default=1024)
    p.add_argument("--alflb-lr", type=float, default=1.5e-3)
    p.add_argument("--alflb-eval-every", type=int, default=50)
    p.add_argument("--alflb-eval-batches", type=int, default=8)
    p.add_argument("--alflb-compile", action="store_true")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", **environment()}
    if a.part in ("speed", "all") and (torch.cuda.is_available() or a.quick):
        part_speed(a, results)
    if a.part in ("alflb", "all"):
        part_alflb(a, results)
    print_json(results)


if __name__ == "__main__":
    main()
