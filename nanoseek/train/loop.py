"""Pretraining loop (DeepSeek-V3 report sections 2.1.2, 2.2 and 4): AdamW with fp32 master
weights, warmup + cosine schedule, gradient clipping and accumulation, bf16 autocast, the
multi-token-prediction loss, auxiliary-loss-free load balancing (or the classic auxiliary loss),
periodic validation with bits per byte, atomic checkpoints with exact resume, a NaN/inf guard,
metrics in JSONL and plots. The layout over processes (data, expert, pipeline parallelism) is
behind one `Parallel` (nanoseek/parallel): the loop does not branch on it.

One code path for 1 or W processes: the global batch and the data order (by global sample index)
do not depend on the world size, so losses agree step by step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F

from ..balance import moe_modules, update_bias
from ..config import ModelConfig
from ..data import Batches, TokenShard, _iter_docs, bits_per_byte, prepare, resolve_sources
from ..quant.fp8 import convert, format_report
from ..io import atomic_write_text
from ..model import DeepSeekV3
from ..parallel import all_reduce_sum, barrier, batch_on_device, init_distributed, local_numel, parallelize
from ..parallel.memory import measured_bytes
from ..tokenizer import Tokenizer, train_bpe
from .args import TrainArgs
from .checkpointing import CheckpointWriter, export_final_model, load_trainer_state, resume_point
from .metrics import MetricsLog, plot_run, say, step_record
from .objective import TrainLoss
from .schedule import pretrain_lr
from .settings import check_settings


def lr_at(step: int, a: TrainArgs, elapsed: float = 0.0, paced: float = 0.0) -> float:
    """The run's lr at step `step`: warm-up, then cosine decay to lr * min_lr_ratio at max_steps (or
    at max_seconds of loop time, or at least at progress `paced`: whichever comes first)."""
    return pretrain_lr(step, a.lr, a.warmup_steps, a.max_steps, a.min_lr_ratio,
                       elapsed / a.max_seconds if a.max_seconds else None, paced)


def load_data(a: TrainArgs, main: bool, resume_dir: str | None, finetune=None):
    """The tokenizer (the checkpoint's, a given one, or one trained on the data) and the train and
    validation batch sources (token shards prepared once, by rank 0, behind a barrier; or the
    fine-tuning task's own) -> (tokenizer, batches, val_batches, val_shard or None, description)."""
    if not a.data:
        raise ValueError("--data: give at least one text file, folder or .jsonl")
    # a folder that `prepare` already filled (meta.json + shards, and its tokenizer) is used as is
    prepared = a.data[0] if len(a.data) == 1 and os.path.isfile(os.path.join(a.data[0], "meta.json")) else None
    tok_dir = resume_dir or a.tokenizer or (a.out if os.path.exists(os.path.join(a.out, "tokenizer.json")) else None)
    if tok_dir is None and prepared and os.path.exists(os.path.join(prepared, "tokenizer.json")):
        tok_dir = prepared
    if tok_dir is None:
        if main:
            cfg0 = ModelConfig.from_pretrained(a.model) if a.model else ModelConfig.from_preset(a.preset)
            vocab = a.vocab_size or cfg0.vocab_size
            say(f"training a byte-level BPE tokenizer ({vocab} tokens) on {', '.join(a.data)}")
            train_bpe(_sample_texts(a.data), vocab).save(a.out)
        barrier()
        tok_dir = a.out
    tokenizer = Tokenizer.from_dir(tok_dir)
    micro_global = a.batch_size // a.grad_accum
    if finetune is not None:  # fine-tuning brings its own batches (packed chat examples), no token shards
        batches, val_batches, data_desc = finetune.batches(tokenizer, a, micro_global, main)
        val_shard = None
    elif prepared:
        info = {"train": os.path.join(prepared, "train.bin"), "val": os.path.join(prepared, "val.bin")}
    else:
        data_dir = os.path.join(a.out, "data")
        if main:
            info = prepare(a.data, data_dir, tokenizer, val_fraction=a.val_fraction)
        barrier()
        if not main:
            info = prepare(a.data, data_dir, tokenizer, val_fraction=a.val_fraction)
    if finetune is None:
        train_shard, val_shard = TokenShard(info["train"]), TokenShard(info["val"])
        batches = Batches(train_shard, a.seq_len, micro_global, seed=a.seed)
        val_batches = Batches(val_shard, a.seq_len, micro_global, seed=a.seed)
        data_desc = f"{len(train_shard):,} train / {len(val_shard):,} val tokens"
    return tokenizer, batches, val_batches, val_shard, data_desc


def build_model(a: TrainArgs, tokenizer, resume_dir: str | None, device) -> DeepSeekV3:
    """The checkpoint to resume, the model to start from, or a fresh preset (its vocabulary grown to
    the tokenizer's), in fp32 master weights."""
    if resume_dir:
        return DeepSeekV3.from_pretrained(resume_dir, dtype=torch.float32, device=device)
    if a.model:
        return DeepSeekV3.from_pretrained(a.model, dtype=torch.float32, device=device)
    overrides = {}
    if a.mtp_depth is not None:
        overrides["num_nextn_predict_layers"] = a.mtp_depth
    cfg = ModelConfig.from_preset(a.preset, **{**(a.overrides or {}), **overrides})
    if tokenizer.vocab_size > cfg.vocab_size:
        cfg = cfg.replace(vocab_size=tokenizer.vocab_size)
    return DeepSeekV3.from_config(cfg, device=device, seed=a.seed)


def adamw(model, a: TrainArgs, device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on vectors and the embedding; the fused
    CUDA kernel where the parameters live on the GPU."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # all, or e.g. LoRA adapters
    decay = [p for n, p in trainable if p.dim() >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in trainable if not (p.dim() >= 2 and "embed_tokens" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=a.lr, betas=(a.beta1, a.beta2),
                             fused=device.type == "cuda" and not a.cpu_offload)  # offloaded: the step runs on the CPU


def validation_loss(par, val_batches, val_shard, micro_global: int, eval_batches: int, autocast,
                    device) -> tuple[float, float | None]:
    """Mean cross entropy over `eval_batches` validation batches of the global batch size, split
    over the ranks that run validation (`par.eval_model()`), and its bits per byte (token shards
    only; None for a fine-tuning task's batches)."""
    net, me, ranks = par.eval_model()
    total = torch.zeros(2, device=device, dtype=torch.float64)  # summed loss, target tokens
    if net is not None:
        net.eval()
        with torch.no_grad():
            for batch in val_batches.eval_batches(micro_global // ranks, eval_batches, me, ranks):
                x, y, extra = batch_on_device(batch, device)
                with autocast:
                    logits = net(x, **extra)  # [b, T, V]
                total[0] += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
                total[1] += (y != -100).sum()
        net.train()
    par.reduce_eval(total)
    val = (total[0] / total[1]).item() if total[1] > 0 else float("nan")
    return val, (bits_per_byte(val, len(val_shard), val_shard.n_bytes) if val_shard is not None else None)


def finished_summary(out: str, start_step: int, a: TrainArgs, main: bool) -> dict | None:
    """final.json of a run that a resume finds already at max_steps (None: there is work left)."""
    final_json = os.path.join(out, "final.json")
    if start_step < a.max_steps or not os.path.exists(final_json):
        return None
    summary = json.load(open(final_json))
    if main:
        say(f"run already finished at step {start_step}; nothing to do")
        if a.json:
            print(json.dumps(summary), flush=True)
    return summary


def train(args: TrainArgs, finetune=None, follow: Callable[[], float] | None = None) -> dict:
    """Pretraining, or fine-tuning when `finetune` (e.g. `sft.SFTTask`) plugs into the same loop:
    `finetune.batches(tokenizer, args, micro_global, main)` -> (train, val, description) batch
    sources yielding (x, y, positions, segment_ids) with y = -100 where nothing is learned;
    `prepare_model(model, trainer_state)` before the optimizer (e.g. LoRA: only adapters train);
    `saving(model)` a context to save checkpoints in; `state(model)` extra trainer state;
    `export(model)` the model written at the run's root; `summary()` extra fields of final.json.
    `follow()`, read before every step, is the least progress of the lr schedule (e.g. another
    job's, so that this run decays and ends with it): the run stops once it reaches 1."""
    a = args.resolved()
    dist_info = init_distributed(a.device)
    rank, world, device = dist_info.rank, dist_info.world, dist_info.device
    main = rank == 0
    run = check_settings(a, world, device, follows=follow is not None)
    precision = run.precision
    os.makedirs(a.out, exist_ok=True)

    # --- resume point
    resume_dir = resume_point(a.out, a.resume, quiet=not main)
    trainer_state = load_trainer_state(resume_dir) if resume_dir else None
    start_step = trainer_state["step"] if trainer_state else 0
    if trainer_state and (summary := finished_summary(a.out, start_step, a, main)) is not None:
        return summary

    tokenizer, batches, val_batches, val_shard, data_desc = load_data(a, main, resume_dir, finetune)
    micro_global = a.batch_size // a.grad_accum
    model = build_model(a, tokenizer, resume_dir, device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}")
    model.train()
    if finetune is not None:
        finetune.prepare_model(model, trainer_state)
    if precision == "fp8":  # FP8 GEMMs (DeepSeek-V3 recipe), swapped in from outside; bf16 autocast for the rest
        fp8_converted, fp8_skipped = convert(model, run.fp8_config)
        if main:
            say(format_report(fp8_converted, fp8_skipped))
    params_total = model.num_params(include_mtp=True)
    alpha = {"bias": a.seq_aux_alpha, "aux": a.aux_alpha, "none": 0.0}[a.balance]
    par = parallelize(model, run.dims, rank, device, grad_accum=a.grad_accum, schedule=a.schedule, chunks=a.chunks,
                      balance_alpha=alpha, mtp_lambda=a.mtp_lambda,
                      activation_checkpointing=run.ac_policy, compile=a.compile,
                      fsdp_reshard_after_forward=a.fsdp_reshard_after_forward,
                      fsdp_param_dtype=torch.bfloat16 if precision == "bf16" and device.type == "cuda" else None,
                      async_save=a.async_save, cpu_offload=a.cpu_offload)
    moes = {n: m for n, m in moe_modules(model).items()  # MTP's experts run only with an MTP loss
            if a.mtp_lambda > 0 or not n.startswith("mtp.")}
    loss_fn = TrainLoss(moes, alpha, a.mtp_lambda)

    opt = adamw(model, a, device)
    if trainer_state:
        par.check_resume(trainer_state, resume_dir)
        par.load_optimizer(opt, trainer_state.get("optimizer"), resume_dir)  # None: a sharded (DCP) checkpoint
        torch.set_rng_state(trainer_state["cpu_rng"])
    skipped_total = trainer_state.get("skipped_steps", 0) if trainer_state else 0

    log = MetricsLog(os.path.join(a.out, "metrics.jsonl"), main, start_step if trainer_state else 0)
    if main:
        say(f"nanoseek train: {params_total / 1e6:.2f}M parameters, {world} process(es){par.describe()} on {device}, "
             f"{precision}, {data_desc}, batch {a.batch_size} x {a.seq_len}, "
             f"balance={a.balance}, MTP depth {par.full_config.num_nextn_predict_layers}"
             + (f", resuming from step {start_step}" if trainer_state else ""))
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision in ("bf16", "fp8") else nullcontext())

    def evaluate() -> tuple[float, float | None]:
        return validation_loss(par, val_batches, val_shard, micro_global, a.eval_batches, autocast, device)

    pbar = None
    if main and a.progress:
        from tqdm import tqdm
        pbar = tqdm(total=a.max_steps, initial=start_step, desc="train", dynamic_ncols=True,
                    file=sys.stderr, disable=None)
    last = {"loss": float("nan"), "val_loss": float("nan"), "val_bpb": float("nan")}
    speeds = []
    tokens_per_step = a.batch_size * a.seq_len
    step = start_step
    if a.eval_at_start and start_step == 0:
        last["val_loss_start"], _ = evaluate()
        log.write({"step": 0, "val_loss": last["val_loss_start"]})
    checkpoints = CheckpointWriter(par, a.out, a.keep_last, asynchronous=a.async_save)
    t_run = time.time()
    for step in range(start_step, a.max_steps):
        t0 = time.time()
        paced = follow() if follow is not None else 0.0
        lr = lr_at(step, a, t0 - t_run, paced)
        for g in opt.param_groups:
            g["lr"] = lr
        sums, loads, grad_norm = par.train_step(batches, step, loss_fn, autocast, a.grad_clip)  # ce, mtp, balance, total
        ok = bool(torch.isfinite(sums).all()) and bool(torch.isfinite(grad_norm))
        if ok:
            opt.step()
            frozen = a.bias_freeze_step is not None and step >= a.bias_freeze_step
            if a.balance == "bias" and not frozen:
                for n, m in moes.items():
                    update_bias(m, loads[n].to(device), a.bias_update_speed)
        else:
            skipped_total += 1
            if main:
                say(f"step {step + 1}: non-finite loss or gradient, update skipped")
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        if step > start_step or a.max_steps - start_step == 1:
            speeds.append(tokens_per_step / dt)
        rec = step_record(step + 1, sums, loads, lr, grad_norm, tokens_per_step, dt, ok)
        log.write(rec)
        last["loss"] = rec["loss"]
        out_of_time = False
        if a.max_seconds is not None:  # every rank stops at the same step
            flag = torch.tensor([float(time.time() - t_run >= a.max_seconds)], device=device)
            all_reduce_sum(flag)
            out_of_time = bool(flag.item() > 0)
        done = step + 1 == a.max_steps or out_of_time or paced >= 1.0
        if (a.eval_every and (step + 1) % a.eval_every == 0) or done:
            last["val_loss"], last["val_bpb"] = evaluate()
            log.write({"step": step + 1, "val_loss": last["val_loss"], "val_bpb": last["val_bpb"]})
        if a.save and ((a.save_every and (step + 1) % a.save_every == 0) or done):
            state = {"skipped_steps": skipped_total, "args": _jsonable(dataclasses.asdict(a)), **par.layout_state()}
            if finetune is not None:
                state.update(finetune.state(model))
            with finetune.saving(model) if finetune is not None else nullcontext():
                checkpoints.save(step + 1, opt, tokenizer, state)
        if pbar is not None:
            pbar.update(1)
            pbar.set_postfix(loss=f"{rec['loss']:.3f}", maxvio=f"{rec['maxvio']:.2f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        if done:
            break
    checkpoints.finish()  # an async save still being written: wait for it, then rename it into place
    if pbar is not None:
        pbar.close()
    log.close()
    summary = {
        "step": step + 1 if a.max_steps > start_step else start_step, "loss": last["loss"], "val_loss": last["val_loss"], "val_bpb": last["val_bpb"],
        "tokens_per_s": (sum(speeds) / len(speeds)) if speeds else 0.0,
        "resumed_from_step": start_step, "params_total": params_total,
        "params_local": sum(local_numel(p) for p in model.parameters()),
        **{f"{k}_bytes_local": v for k, v in measured_bytes(model, opt).items()},  # rank 0's shards
        "skipped_steps": skipped_total, "world_size": world, "ep": a.ep, "precision": precision,
        "seconds": round(time.time() - t_run, 2), "out": a.out,
    }
    if "val_loss_start" in last:
        summary["val_loss_start"] = last["val_loss_start"]
    if finetune is not None:
        summary.update(finetune.summary())
    if main and a.save and finetune is not None:  # e.g. LoRA merged into the weights: a plain checkpoint
        finetune.export(model).save_pretrained(a.out)
        tokenizer.save(a.out)
    elif main and a.save:
        export_final_model(a.out)
    if main:
        summary["plots"] = plot_run(a.out)
        atomic_write_text(os.path.join(a.out, "final.json"), json.dumps(summary) + "\n")
        where = f"; model in {a.out} (DeepSeekV3.from_pretrained('{a.out}'))" if a.save else ""
        say(f"done: step {summary['step']}, loss {summary['loss']:.4f}, val_loss {summary['val_loss']:.4f}, "
             f"{summary['tokens_per_s']:.0f} tok/s{where}")
        if a.json:
            print(json.dumps(summary), flush=True)
    barrier()
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return summary


def _sample_texts(paths: list[str], max_bytes: int = 8 * 2**20):
    """Up to max_bytes of text from the inputs, for tokenizer training."""
    seen = 0
    for path in resolve_sources(paths):
        for doc in _iter_docs(path, "text"):
            yield doc
            seen += len(doc)
            if seen >= max_bytes:
                return


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))
