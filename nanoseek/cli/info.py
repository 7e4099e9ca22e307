"""`nanoseek info` (parameter counts and KV-cache sizes of a preset or checkpoint: the MLA cache of
DeepSeek-V2/V3, report section 2.1.1, beside full multi-head attention; a dense model's GQA cache)
and `nanoseek pipeline-sim` (a pipeline schedule replayed on given stage times: 1F1B, DualPipe and
DualPipeV, report section 3.2.1, with its bubble and timeline). The flags of each are the fields of
InfoOptions and PipelineSimOptions."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Literal

from ..config import PRESETS, ModelConfig
from ..load import is_dense, load_config
from ..parallel.memory import GPU_BYTES, LAYOUTS, USABLE, gpus_needed, train_memory
from ..parallel.schedules import ScheduleError, build_schedule, default_chunks
from ..parallel.simulator import plot_timeline, simulate
from .args import add_options

JSON_HELP = "print the report as one JSON object, the last line"


@dataclass
class InfoOptions:
    target: str | None = field(default=None, metadata={
        "positional": True,
        "help": "a preset name (nano, small, medium, deepseek-v2-lite, deepseek-v2, deepseek-v3) or a checkpoint dir"})
    json: bool = field(default=False, metadata={"flags": ("--json",), "help": JSON_HELP})
    train_memory: str | None = field(default=None, metadata={
        "metavar": "PRESET_OR_CONFIG",
        "help": "per-GPU training memory of a layout, and the 80 GB GPUs each layout needs"})
    fsdp: int = field(default=0, metadata={"help": "with --train-memory: FSDP over this many data-parallel ranks"})
    dp: int | None = field(default=None, metadata={
        "help": "with --train-memory: replicated data-parallel ranks (without --fsdp)"})
    ep: int = field(default=1, metadata={"help": "with --train-memory: expert-parallel ranks"})
    pp: int = field(default=1, metadata={"help": "with --train-memory: pipeline stages"})
    micro_batch: int = field(default=1, metadata={"help": "with --train-memory: sequences per rank and micro-step"})
    seq_len: int = field(default=4096, metadata={"help": "with --train-memory: tokens per sequence"})
    ac_policy: Literal["none", "full", "selective"] = field(default="none", metadata={
        "help": "with --train-memory: activation checkpointing policy"})
    cpu_offload: bool = field(default=False, metadata={
        "help": "with --train-memory and --fsdp: sharded weights, gradients and AdamW states in host memory"})


@dataclass
class PipelineSimOptions:
    schedule: Literal["1f1b", "dualpipe", "dualpipev"]
    pp: int = field(metadata={"help": "pipeline ranks"})
    chunks: int | None = field(default=None, metadata={
        "help": "micro-batches per step (default: the smallest valid, 2 x pp for DualPipe/V)"})
    times: str = field(default="1,2,1", metadata={
        "help": "F,B,W per chunk: B is the whole backward, W its weight part"})
    fb: float | None = field(default=None, metadata={
        "help": "time of an overlapped F&B pair (default F + B: no overlap)"})
    latency: float = field(default=0.0, metadata={"help": "time per cross-rank hop"})
    png: str | None = field(default=None, metadata={"help": "write the per-rank timeline here"})
    show_ops: bool = field(default=False, metadata={"flags": ("--show-ops",), "help": "print each rank's op list"})
    json: bool = field(default=False, metadata={"flags": ("--json",), "help": JSON_HELP})


def emit_json(obj: dict) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    print(json.dumps(obj), flush=True)


def _load_config(target: str):
    if target in PRESETS:
        return ModelConfig.from_preset(target)
    if os.path.isdir(target) or target.endswith(".json"):
        return load_config(target)  # ModelConfig, or DenseConfig for a Llama / Qwen checkpoint
    raise SystemExit(f"nanoseek: '{target}' is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory")


def info_report(cfg) -> dict:
    pc = cfg.param_counts()
    kv = cfg.kv_cache_bytes_per_token(2)
    return {
        "model_type": cfg.model_type,
        "total_params": pc["total_params"],
        "mtp_params": pc["mtp_params"],
        "active_params": pc["active_params"],
        "activation_ratio": pc["active_params"] / pc["total_params"],
        "embedding_params": pc["embedding_params"],
        "mla_kv_bytes_per_token": kv["mla_kv_bytes_per_token"],
        "mha_kv_bytes_per_token": kv["mha_kv_bytes_per_token"],
        "kv_cache_reduction": 1 - kv["mla_kv_bytes_per_token"] / kv["mha_kv_bytes_per_token"],
        "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
        "routed_experts": cfg.n_routed_experts, "experts_per_token": cfg.num_experts_per_tok,
        "mtp_depth": cfg.num_nextn_predict_layers,
    }


def dense_info_report(cfg) -> dict:
    """`nanoseek info` of a dense Llama / Qwen model: parameters and its GQA cache beside full MHA."""
    pc = cfg.param_counts()
    gqa = cfg.kv_cache_values_per_token() * cfg.num_hidden_layers * 2  # bf16 bytes per token
    mha = 2 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers * 2
    return {
        "model_type": cfg.model_type, "total_params": pc["total_params"], "mtp_params": 0,
        "active_params": pc["active_params"], "activation_ratio": pc["active_params"] / pc["total_params"],
        "embedding_params": pc["embedding_params"], "gqa_kv_bytes_per_token": gqa, "mha_kv_bytes_per_token": mha,
        "kv_cache_reduction": 1 - gqa / mha, "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
        "attention_heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "context_length": cfg.max_position_embeddings,
    }


def _print_dense_info(target: str, r: dict, g) -> None:
    print(f"{target} ({r['model_type']}, dense): {r['layers']} layers, hidden {r['hidden_size']}, "
          f"GQA {r['attention_heads']} query / {r['kv_heads']} K/V heads of {r['head_dim']}, "
          f"context {r['context_length']}")
    print(f"  parameters   total {g(r['total_params'])}")
    print(f"  KV cache     GQA {r['gqa_kv_bytes_per_token']:,} B/token vs MHA {r['mha_kv_bytes_per_token']:,} "
          f"B/token (bf16): {100 * r['kv_cache_reduction']:.1f}% smaller")


def train_memory_report(cfg, args) -> dict:
    """`nanoseek info --train-memory`: the asked layout's per-GPU bytes, and the fewest 80 GB GPUs
    of each layout (nanoseek/parallel/memory.py, one accounting for both)."""
    fsdp = bool(args.fsdp and args.fsdp > 1)
    dp = args.fsdp if fsdp else max(args.ep, args.dp or 1)
    kw = dict(micro_batch=args.micro_batch, seq_len=args.seq_len, policy=args.ac_policy)
    if args.cpu_offload and not fsdp:
        raise SystemExit("nanoseek info: --cpu-offload moves FSDP's shards to the host; give --fsdp N (N > 1)")
    mem = train_memory(cfg, dp=dp, fsdp=fsdp, ep=args.ep, pp=args.pp, cpu_offload=args.cpu_offload, **kw)
    layouts = {}
    for name, lay_fsdp, lay_ep, lay_pp, lay_offload in LAYOUTS:
        n, best = gpus_needed(cfg, fsdp=lay_fsdp, ep=lay_ep, pp=lay_pp, cpu_offload=lay_offload, **kw)
        layouts[name] = {"gpus": n, "bytes_per_gpu": best.total if best else None}
    return {"layout": {"dp": dp, "fsdp": fsdp, "ep": args.ep, "pp": args.pp, "cpu_offload": args.cpu_offload, **kw},
            "per_gpu": mem.as_dict(),
            "gpu_bytes": GPU_BYTES, "usable": USABLE, "gpus_needed": layouts}


def _print_train_memory(target: str, r: dict) -> None:
    lay = r["layout"]

    def gb(n):
        return f"{n / 1e9:.1f} GB"
    print(f"{target}: training memory per GPU, dp {lay['dp']}{' (fsdp)' if lay['fsdp'] else ''} x ep {lay['ep']} "
          f"x pp {lay['pp']}, micro-batch {lay['micro_batch']} x {lay['seq_len']}, activation checkpointing "
          f"{lay['policy']}")
    for k in ("weights", "grads", "optimizer", "activations", "gathered", "total"):
        print(f"  {k:12s} {gb(r['per_gpu'][k])}")
    if r["per_gpu"].get("host"):
        print(f"  {'host':12s} {gb(r['per_gpu']['host'])} (offloaded weights, gradients, AdamW states)")
    print(f"  GPUs of {r['gpu_bytes'] / 1e9:.0f} GB needed ({100 * r['usable']:.0f}% of each for these tensors):")
    for name, v in r["gpus_needed"].items():
        print(f"    {name:26s} " + (f"{v['gpus']} ({gb(v['bytes_per_gpu'])} each)" if v["gpus"] else "does not fit"))


def cmd_info(args) -> int:
    if args.train_memory:
        r = train_memory_report(_load_config(args.train_memory), args)
        _print_train_memory(args.train_memory, r)
        if args.json:
            emit_json(r)
        return 0
    if args.target is None:
        raise SystemExit("nanoseek info: give a preset or checkpoint (or --train-memory PRESET_OR_CONFIG)")
    cfg = _load_config(args.target)

    def g(n):
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"

    if is_dense(cfg):
        r = dense_info_report(cfg)
        _print_dense_info(args.target, r, g)
        if args.json:
            emit_json(r)
        return 0
    r = info_report(cfg)

    print(f"{args.target} ({r['model_type']}): {r['layers']} layers, hidden {r['hidden_size']}, "
          f"{r['routed_experts']} routed experts (top-{r['experts_per_token']}), MTP depth {r['mtp_depth']}")
    print(f"  parameters   total {g(r['total_params'])} (+{g(r['mtp_params'])} MTP), "
          f"active per token {g(r['active_params'])} ({100 * r['activation_ratio']:.2f}%)")
    print(f"  KV cache     MLA {r['mla_kv_bytes_per_token']:,} B/token vs MHA {r['mha_kv_bytes_per_token']:,} "
          f"B/token (bf16): {100 * r['kv_cache_reduction']:.1f}% smaller, "
          f"{r['mha_kv_bytes_per_token'] / r['mla_kv_bytes_per_token']:.1f}x")
    if args.json:
        emit_json(r)
    return 0


def cmd_pipeline_sim(args) -> int:
    try:
        F, B, W = (float(x) for x in args.times.split(","))
    except ValueError:
        raise SystemExit(f"nanoseek pipeline-sim: --times wants three numbers F,B,W, got {args.times!r}") from None
    chunks = args.chunks or default_chunks(args.schedule, args.pp)
    try:
        sched = build_schedule(args.schedule, args.pp, chunks)
        res = simulate(sched, F, B, W, args.fb, args.latency)
    except (ScheduleError, ValueError) as e:
        raise SystemExit(f"nanoseek pipeline-sim: {e}") from None
    if args.show_ops:
        print(sched.format())
    d = res.as_dict()
    print(f"{args.schedule}: {args.pp} ranks, {sched.num_stages} stage chunks, {chunks} micro-batches, "
          f"F={F:g} B={B:g} W={W:g} F&B={res.times['FB']:g}")
    for r in range(args.pp):
        print(f"  rank {r}: busy {res.busy[r]:g}  idle {res.idle[r]:g}  peak activations {res.peak_activations[r]}")
    exact = "exact here" if d["formula_exact"] else "NOT exact here (F != B - W): an estimate"
    print(f"step time {res.step_time:g}, bubble (max idle) {res.bubble:g}, ratio {res.bubble_ratio:.3f}; "
          f"report formula {d['formula']} = {d['formula_bubble']:g} ({exact})")
    if args.png:
        plot_timeline(res.timeline, args.png, f"{args.schedule} pp={args.pp} chunks={chunks} F,B,W={F:g},{B:g},{W:g}")
        d["png"] = args.png
        print(f"timeline -> {args.png}")
    if args.json:
        emit_json(d)
    return 0


def add_info_command(sub) -> None:
    s = sub.add_parser("info", help="parameter counts and KV-cache sizes of a preset or checkpoint")
    add_options(s, InfoOptions)
    s.set_defaults(func=cmd_info)


def add_pipeline_sim_command(sub) -> None:
    s = sub.add_parser("pipeline-sim", help="replay a pipeline schedule (1F1B, DualPipe, DualPipeV): bubble, timeline")
    add_options(s, PipelineSimOptions)
    s.set_defaults(func=cmd_pipeline_sim)
