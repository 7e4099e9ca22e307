"""The `nanoseek` command. Subcommands that measure or report accept `--json` and then print one
JSON object as the last line of their output."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .config import PRESETS, ModelConfig
from .finetune.distill import add_distill_command
from .evaluation import add_eval_command
from .interactive import add_sampling_arguments, cmd_chat, cmd_generate
from .load import is_dense, load_config
from .model import DeepSeekV3
from .parallel.schedules import ScheduleError, build_schedule, default_chunks
from .parallel.simulator import plot_timeline, simulate
from .parallel.memory import GPU_BYTES, LAYOUTS, USABLE, gpus_needed, train_memory
from .recipes.quickstart import add_quickstart_command
from .rl.cli import add_grpo_command
from .serve.app import add_serve_command
from .serve.create import add_modelfile_option
from .finetune.sft import add_sft_command, add_sft_options
from .infer.store import add_store_commands
from .infer.gguf_store import add_gguf_commands
from .train import TrainArgs, train


def _emit_json(obj: dict) -> None:
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
    mem = train_memory(cfg, dp=dp, fsdp=fsdp, ep=args.ep, pp=args.pp, **kw)
    layouts = {}
    for name, lay_fsdp, lay_ep, lay_pp in LAYOUTS:
        n, best = gpus_needed(cfg, fsdp=lay_fsdp, ep=lay_ep, pp=lay_pp, **kw)
        layouts[name] = {"gpus": n, "bytes_per_gpu": best.total if best else None}
    return {"layout": {"dp": dp, "fsdp": fsdp, "ep": args.ep, "pp": args.pp, **kw}, "per_gpu": mem.as_dict(),
            "gpu_bytes": GPU_BYTES, "usable": USABLE, "gpus_needed": layouts}


def _print_train_memory(target: str, r: dict) -> None:
    lay = r["layout"]
    gb = lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
    print(f"{target}: training memory per GPU, dp {lay['dp']}{' (fsdp)' if lay['fsdp'] else ''} x ep {lay['ep']} "
          f"x pp {lay['pp']}, micro-batch {lay['micro_batch']} x {lay['seq_len']}, activation checkpointing "
          f"{lay['policy']}")
    for k in ("weights", "grads", "optimizer", "activations", "gathered", "total"):
        print(f"  {k:12s} {gb(r['per_gpu'][k])}")
    print(f"  GPUs of {r['gpu_bytes'] / 1e9:.0f} GB needed ({100 * r['usable']:.0f}% of each for these tensors):")
    for name, v in r["gpus_needed"].items():
        print(f"    {name:26s} " + (f"{v['gpus']} ({gb(v['bytes_per_gpu'])} each)" if v["gpus"] else "does not fit"))


def cmd_info(args) -> int:
    if args.train_memory:
        r = train_memory_report(ModelConfig.from_preset(args.train_memory) if args.train_memory in PRESETS
                                else _load_config(args.train_memory), args)
        _print_train_memory(args.train_memory, r)
        if args.json:
            _emit_json(r)
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
            _emit_json(r)
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
        _emit_json(r)
    return 0


def cmd_demo(args) -> int:
    """A short CPU tour of the `nano` model: build, check naive == absorbed attention, take a few
    optimizer steps on one batch, save and reload a Hugging Face checkpoint, generate greedily."""
    import tempfile

    import torch
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    t0 = time.time()
    cfg = ModelConfig.from_preset("nano")
    model = DeepSeekV3.from_config(cfg, seed=args.seed)
    print(f"nano: {model.num_params() / 1e6:.2f}M parameters (+{model.num_params(True) / 1e6 - model.num_params() / 1e6:.2f}M MTP)")
    ids = torch.randint(0, cfg.vocab_size, (4, 64))
    with torch.no_grad():
        naive, absorbed = model(ids, attn_impl="naive"), model(ids, attn_impl="absorb")
    diff = (naive - absorbed).abs().max().item()
    print(f"MLA naive vs absorbed attention: max |diff| = {diff:.2e}")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in tqdm(range(args.steps), desc="overfit one batch", disable=args.json):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps")
    model.eval()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        again = DeepSeekV3.from_pretrained(d)
        with torch.no_grad():
            roundtrip = (again(ids) - model(ids)).abs().max().item()
        print(f"saved and reloaded a Hugging Face checkpoint ({sorted(os.listdir(d))}): max |diff| = {roundtrip:.2e}")
    out = model.generate(ids[:1, :8], max_new_tokens=16)
    cont = out[0, 8:].tolist()
    print(f"greedy continuation of the first 8 tokens: {cont}  (training batch: {ids[0, 8:24].tolist()})")
    result = {"params": model.num_params(), "naive_absorb_max_diff": diff, "loss_first": losses[0],
              "loss_last": losses[-1], "roundtrip_max_diff": roundtrip, "seconds": round(time.time() - t0, 2)}
    if args.json:
        _emit_json(result)
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
        _emit_json(d)
    return 0


def cmd_train(args) -> int:
    fields = {f for f in TrainArgs.__dataclass_fields__}
    kw = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    train(TrainArgs(**kw))
    return 0


def add_train_arguments(s: argparse.ArgumentParser) -> None:
    """Run flags shared by `train` (and the fine-tuning commands built on the same loop)."""
    s.add_argument("--data", nargs="+", required=True, help="text files, folders or .jsonl (field 'text')")
    s.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, plots, final model")
    s.add_argument("--preset", default="nano")
    s.add_argument("--model", help="start from this checkpoint directory instead of a preset")
    s.add_argument("--tokenizer", help="directory with a tokenizer.json (default: train one on --data)")
    s.add_argument("--vocab-size", type=int, help="size of the tokenizer to train (default: the preset's)")
    s.add_argument("--max-steps", type=int, default=100)
    s.add_argument("--batch-size", type=int, help="global batch in sequences")
    s.add_argument("--seq-len", type=int)
    s.add_argument("--grad-accum", type=int, default=1)
    s.add_argument("--lr", type=float)
    s.add_argument("--warmup-steps", type=int)
    s.add_argument("--min-lr-ratio", type=float)
    s.add_argument("--weight-decay", type=float)
    s.add_argument("--grad-clip", type=float)
    s.add_argument("--precision", choices=["fp32", "bf16", "fp8"])
    s.add_argument("--fp8-kernels", choices=["off", "auto", "triton", "torch"],
                   help="FP8 quantizers: auto (fused Triton kernels on CUDA, per-op PyTorch elsewhere; the default), "
                        "off (per-op PyTorch), triton (fused, required), torch (the fused layouts in PyTorch)")
    s.add_argument("--fp8-grouped", choices=["auto", "loop", "triton"],
                   help="routed experts' FP8 GEMMs: auto (the default: one Triton launch for all experts when the "
                        "fused Triton kernels run, else one GEMM per expert), triton (required) or loop")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    s.add_argument("--activation-checkpointing", action="store_true", default=None)
    s.add_argument("--ac-policy", choices=["none", "full", "selective"],
                   help="activation checkpointing: full (recompute each block), selective (keep matmul and "
                        "attention outputs, recompute the rest) or none (default: full with "
                        "--activation-checkpointing, else none)")
    s.add_argument("--balance", choices=["bias", "aux", "none"], help="bias: auxiliary-loss-free (default)")
    s.add_argument("--bias-update-speed", type=float, help="gamma of the bias update (default 0.001)")
    s.add_argument("--bias-freeze-step", type=int, help="stop bias updates from this step on")
    s.add_argument("--seq-aux-alpha", type=float, help="complementary sequence-wise loss weight (bias mode)")
    s.add_argument("--aux-alpha", type=float, help="auxiliary loss weight (aux mode)")
    s.add_argument("--mtp-lambda", type=float, help="MTP loss weight (default 0.3)")
    s.add_argument("--mtp-depth", type=int)
    s.add_argument("--eval-every", type=int)
    s.add_argument("--eval-batches", type=int)
    s.add_argument("--save-every", type=int)
    s.add_argument("--keep-last", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--resume", action="store_true", default=None, help="continue from the newest complete checkpoint")
    s.add_argument("--no-save", dest="save", action="store_false", default=None,
                   help="write no checkpoints (benchmarks)")
    s.add_argument("--pp", type=int, help="pipeline ranks (under torchrun; the rest are data-parallel)")
    s.add_argument("--schedule", choices=["1f1b", "dualpipe", "dualpipev"], help="pipeline schedule (default 1f1b)")
    s.add_argument("--chunks", type=int, help="micro-batches per step (default: the schedule's smallest valid)")
    s.add_argument("--ep", type=int, help="expert-parallel ranks (under torchrun; borrowed from the data-parallel "
                   "ranks, must divide them): each holds 1/ep of every MoE layer's routed experts")
    s.add_argument("--fsdp", action="store_true", default=None,
                   help="shard weights, gradients and optimizer states over the data-parallel ranks (FSDP2; "
                        "with --ep the experts are EP-sharded, then FSDP-sharded over the rest)")
    s.add_argument("--fsdp-reshard-after-forward", action=argparse.BooleanOptionalAction, default=None,
                   help="free each block's gathered weights after its forward (default on; off: keep them "
                        "for the backward, more memory, less communication)")
    s.add_argument("--async-save", action="store_true", default=None,
                   help="with --fsdp: write each sharded checkpoint in the background while training goes on; "
                        "it appears in checkpoints/ once every rank has finished writing it")
    s.add_argument("--json", action="store_true", default=None)
    s.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoseek", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="parameter counts and KV-cache sizes of a preset or checkpoint")
    s.add_argument("target", nargs="?",
                   help="a preset name (nano, small, medium, deepseek-v2-lite, deepseek-v2, deepseek-v3) or a checkpoint dir")
    s.add_argument("--json", action="store_true")
    s.add_argument("--train-memory", metavar="PRESET_OR_CONFIG",
                   help="per-GPU training memory of a layout, and the 80 GB GPUs each layout needs")
    s.add_argument("--fsdp", type=int, default=0, help="with --train-memory: FSDP over this many data-parallel ranks")
    s.add_argument("--dp", type=int, help="with --train-memory: replicated data-parallel ranks (without --fsdp)")
    s.add_argument("--ep", type=int, default=1, help="with --train-memory: expert-parallel ranks")
    s.add_argument("--pp", type=int, default=1, help="with --train-memory: pipeline stages")
    s.add_argument("--micro-batch", type=int, default=1, help="with --train-memory: sequences per rank and micro-step")
    s.add_argument("--seq-len", type=int, default=4096, help="with --train-memory: tokens per sequence")
    s.add_argument("--ac-policy", choices=["none", "full", "selective"], default="none",
                   help="with --train-memory: activation checkpointing policy")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("train", help="pretrain a DeepSeek-style model on text (torchrun for data parallel)")
    add_train_arguments(s)
    s.set_defaults(func=cmd_train)

    add_sft_command(sub, add_train_arguments)
    add_distill_command(sub, add_train_arguments, add_sft_options)

    s = sub.add_parser("generate", help="generate a reply to one prompt (streaming)")
    add_sampling_arguments(s)
    s.add_argument("prompt")
    s.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    s.add_argument("--verbose", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="interactive multi-turn chat (/bye to exit, /set to change options)")
    add_sampling_arguments(s)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("pipeline-sim", help="replay a pipeline schedule (1F1B, DualPipe, DualPipeV): bubble, timeline")
    s.add_argument("--schedule", choices=["1f1b", "dualpipe", "dualpipev"], required=True)
    s.add_argument("--pp", type=int, required=True, help="pipeline ranks")
    s.add_argument("--chunks", type=int, help="micro-batches per step (default: the smallest valid, 2 x pp for DualPipe/V)")
    s.add_argument("--times", default="1,2,1", help="F,B,W per chunk: B is the whole backward, W its weight part")
    s.add_argument("--fb", type=float, help="time of an overlapped F&B pair (default F + B: no overlap)")
    s.add_argument("--latency", type=float, default=0.0, help="time per cross-rank hop")
    s.add_argument("--png", help="write the per-rank timeline here")
    s.add_argument("--show-ops", action="store_true", help="print each rank's op list")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_pipeline_sim)

    add_store_commands(sub)  # list, show, rm, create
    add_modelfile_option(sub.choices["create"])  # create NAME -f Modelfile
    add_gguf_commands(sub)  # export; create NAME --from FILE.gguf
    add_serve_command(sub)
    add_grpo_command(sub)
    add_quickstart_command(sub)
    add_eval_command(sub)

    s = sub.add_parser("demo", help="a short CPU tour of the nano model")
    s.add_argument("--steps", type=int, default=30)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
