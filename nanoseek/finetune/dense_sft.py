"""Supervised fine-tuning of a dense Llama / Qwen2 / Qwen3 student (DeepSeek-R1 report, arXiv
2501.12948, section 2.4: the distilled models are the dense ones, fine-tuned on R1's reasoning
traces), in one process.

The fine-tuning task (`sft.SFTTask`: packed chat batches, LoRA, the merged export, its report)
plugs in exactly as it does into `train.train`, with the same AdamW groups (`train.loop.adamw`),
warm-up + cosine schedule (`train.loop.lr_at`), gradient accumulation and clipping, bf16
autocast, masked next-token cross entropy (`train.objective.token_cross_entropy`) and validation
before and after. A dense model has no experts, no balance loss and no MTP; pipeline / expert
parallelism, FP8, resume and torch.compile are the DeepSeek training loop's and are refused here.
Written to OUT: metrics.jsonl, final.json and the fine-tuned model (config, safetensors, tokenizer).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext

import torch

from ..dense import DenseModel
from ..io import atomic_write_text
from ..parallel import batch_on_device
from ..tokenizer import Tokenizer
from ..train.loop import adamw, lr_at
from ..train.metrics import MetricsLog, say
from ..train.objective import token_cross_entropy


def check_dense_args(a) -> None:
    """The run flags a single-process dense fine-tune does not take: a ValueError naming the flag."""
    refused = [("--pp", a.pp not in (None, 1)), ("--ep", getattr(a, "ep", 1) not in (None, 1)),
               ("--precision fp8", a.precision == "fp8"), ("--resume", bool(a.resume)),
               ("--compile", bool(a.compile)), ("--activation-checkpointing", bool(a.activation_checkpointing))]
    for flag, given in refused:
        if given:
            raise ValueError(f"{flag}: not supported for dense (Llama / Qwen) models yet")


@torch.no_grad()
def validation_loss(model, val_batches, micro_batch: int, max_batches, device, autocast) -> float:
    """Mean masked cross entropy over the validation rows (summed over tokens, then divided)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for batch in val_batches.eval_batches(micro_batch, max_batches, 0, 1):
        x, y, extra = batch_on_device(batch, device)
        with autocast:
            logits = model(x, **extra)  # [B, T, V]
        total[0] += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                                      reduction="sum").double().cpu()
        total[1] += (y != -100).sum().cpu()
    model.train()
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


def train_dense(args, finetune) -> dict:
    """Fine-tune the dense checkpoint `args.model` on `finetune`'s batches; the run's summary."""
    a = args.resolved()
    check_dense_args(a)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = a.precision or ("bf16" if device.type == "cuda" else "fp32")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"--precision: unsupported value {precision!r} for dense models (fp32 or bf16)")
    os.makedirs(a.out, exist_ok=True)
    if a.seed is not None:
        torch.manual_seed(a.seed)
    tokenizer = Tokenizer.from_dir(a.tokenizer or a.model)
    micro_global = a.batch_size // a.grad_accum
    batches, val_batches, data_desc = finetune.batches(tokenizer, a, micro_global, True)
    model = DenseModel.from_pretrained(a.model, dtype=torch.float32, device=device)  # fp32 master weights
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}")
    model.train()
    finetune.prepare_model(model, None)
    opt = adamw(model, a, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    params_total = model.num_params()
    say(f"nanoseek sft: {model.config.model_type} {params_total / 1e6:.2f}M parameters, 1 process on {device}, "
        f"{precision}, {data_desc}, batch {a.batch_size} x {a.seq_len}")
    log = MetricsLog(os.path.join(a.out, "metrics.jsonl"), True, 0)
    last = {"loss": float("nan"), "val_loss": float("nan")}
    if a.eval_at_start:
        last["val_loss_start"] = validation_loss(model, val_batches, micro_global, a.eval_batches, device, autocast)
        log.write({"step": 0, "val_loss": last["val_loss_start"]})
    speeds, skipped, step, t_run = [], 0, 0, time.time()
    for step in range(a.max_steps):
        t0 = time.time()
        lr = lr_at(step, a, t0 - t_run)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), dtype=torch.float64)
        for micro in range(a.grad_accum):
            x, y, extra = batch_on_device(batches.get(step * a.grad_accum + micro, 0, 1), device)
            with autocast:
                loss = token_cross_entropy(model(x, **extra), y)
            (loss / a.grad_accum).backward()
            loss_sum += loss.detach().double().cpu() / a.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], a.grad_clip)
        ok = bool(torch.isfinite(loss_sum)) and bool(torch.isfinite(grad_norm))
        if ok:
            opt.step()
        else:
            skipped += 1
            say(f"step {step + 1}: non-finite loss or gradient, update skipped")
        opt.zero_grad(set_to_none=True)
        dt = time.time() - t0
        if step > 0 or a.max_steps == 1:
            speeds.append(a.batch_size * a.seq_len / dt)
        rec = {"step": step + 1, "loss": loss_sum.item(), "lr": lr, "grad_norm": float(grad_norm),
               "tokens_per_s": a.batch_size * a.seq_len / dt}
        log.write(rec | ({} if ok else {"skipped": True}))
        last["loss"] = rec["loss"]
        done = step + 1 == a.max_steps or (a.max_seconds is not None and time.time() - t_run >= a.max_seconds)
        if (a.eval_every and (step + 1) % a.eval_every == 0) or done:
            last["val_loss"] = validation_loss(model, val_batches, micro_global, a.eval_batches, device, autocast)
            log.write({"step": step + 1, "val_loss": last["val_loss"]})
        if done:
            break
    log.close()
    summary = {"step": step + 1 if a.max_steps else 0, "loss": last["loss"], "val_loss": last["val_loss"],
               "tokens_per_s": sum(speeds) / len(speeds) if speeds else 0.0, "resumed_from_step": 0,
               "params_total": params_total, "params_local": params_total, "skipped_steps": skipped,
               "world_size": 1, "precision": precision, "seconds": round(time.time() - t_run, 2), "out": a.out,
               "model_type": model.config.model_type}
    if "val_loss_start" in last:
        summary["val_loss_start"] = last["val_loss_start"]
    summary.update(finetune.summary())
    if a.save:
        finetune.export(model).save_pretrained(a.out)
        tokenizer.save(a.out)
    atomic_write_text(os.path.join(a.out, "final.json"), json.dumps(summary) + "\n")
    say(f"done: step {summary['step']}, loss {summary['loss']:.4f}, val_loss {summary['val_loss']:.4f}"
        + (f"; model in {a.out} (nanoseek.load_model('{a.out}'))" if a.save else ""))
    if a.json:
        print(json.dumps(summary), flush=True)
    return summary
