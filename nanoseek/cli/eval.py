"""`nanoseek eval MODEL --task TASK` (or `--bpb --data FILE`): a model's benchmark numbers with the
DeepSeek-R1 report's protocol (section 3, "Evaluation Setup"); the work is nanoseek/evaluation.py, the
flags are EvalOptions' fields."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

import torch

from ..evaluation import FILE_TASK_TOKENS, EvalError, EvalSettings, format_table, run_bpb, run_eval
from ..recipes.quickstart import Recipe
from .args import add_options


@dataclass
class EvalOptions:
    model: str = field(metadata={"positional": True, "help": "a model name in the store or a checkpoint directory"})
    task: list[str] | None = field(default=None, metadata={
        "append": True,
        "help": "countdown (the quickstart's), arithmetic, gsm8k, math, math500:ids=FILE, svamp, jsonl:PATH, "
                "or any task spec (countdown:n_numbers=4); repeatable"})
    task_data: str | None = field(default=None, metadata={
        "help": "the folder of a file task's data (gsm8k, math, math500, svamp)"})
    split: str = field(default="test", metadata={"help": "held-out split: test, or val where the task has one"})
    limit: int | None = field(default=None, metadata={"help": "only the first N problems"})
    samples: int = field(default=0, metadata={"help": "K samples per problem for pass@1 and pass@k"})
    temperature: float = field(default=0.6, metadata={"help": "sampling temperature, R1's"})
    top_p: float = field(default=0.95, metadata={"help": "sampling top-p, R1's"})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": f"token budget per completion (default: countdown {Recipe.max_new_tokens}, "
                f"word problems {FILE_TASK_TOKENS}, others 64)"})
    chat: bool | None = field(default=None, metadata={
        "help": "prompt through the chat template (default: for word problems; raw for generated tasks)"})
    think: bool = field(default=False, metadata={
        "flags": ("--think",), "help": "open each reply inside <think> (R1's enforced thinking)"})
    seed: int = field(default=0, metadata={"help": "seed of the sampling stream"})
    batch_size: int = field(default=512, metadata={"help": "sequences decoded together"})
    context: int | None = field(default=None, metadata={
        "help": "engine context in tokens (default: enough for the longest prompt)"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda when available)"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch"})
    bpb: bool = field(default=False, metadata={
        "flags": ("--bpb",), "help": "bits per byte on held-out text instead (with --data)"})
    data: str | None = field(default=None, metadata={"help": "with --bpb: a text file, or jsonl with a 'text' field"})
    out: str = field(default="runs/eval", metadata={"help": "folder of the per-problem records (JSONL)"})
    no_progress: bool = field(default=False, metadata={"flags": ("--no-progress",)})
    json: bool = field(default=False, metadata={
        "flags": ("--json",), "help": "print the summary as one JSON object, the last line"})


def cmd_eval(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.bpb:
            if not args.data:
                raise EvalError("--bpb needs --data FILE (held-out text)")
            r = run_bpb(args.model, args.data, args.context, device=device, progress=not args.no_progress)
            print(f"{r['data']}: {r['bits_per_byte']:.4f} bits per byte ({r['nats_per_token']:.4f} nats per token, "
                  f"{r['tokens']:,} tokens over {r['bytes']:,} bytes, context {r['context']})", flush=True)
            results = [r]
        else:
            if not args.task:
                raise EvalError("give --task TASK (or --bpb --data FILE)")
            settings = EvalSettings(split=args.split, limit=args.limit, samples=args.samples,
                                    temperature=args.temperature, top_p=args.top_p,
                                    max_new_tokens=args.max_new_tokens, chat=args.chat, think=args.think,
                                    seed=args.seed, batch=args.batch_size)
            results = run_eval(args.model, args.task, settings, args.out, args.task_data, device,
                               not args.no_progress, args.context)
            print(format_table(results), flush=True)
            for r in results:
                print(f"records: {r['records']}", flush=True)
    except EvalError as e:
        raise SystemExit(f"nanoseek eval: {e}") from None
    if args.json:
        sys.stdout.flush()
        sys.stderr.flush()
        print(json.dumps(results[0] if len(results) == 1 else {"tasks": results}), flush=True)
    return 0


def add_eval_command(sub) -> None:
    s = sub.add_parser("eval", help="benchmark a model: greedy accuracy, pass@1 over samples, pass@k; or bits per byte")
    add_options(s, EvalOptions)
    s.set_defaults(func=cmd_eval)
