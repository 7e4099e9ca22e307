"""`nanoseek eval MODEL --task TASK` (or `--bpb --data FILE`): a model's benchmark numbers with the
DeepSeek-R1 report's protocol (section 3, "Evaluation Setup"); the work is nanoseek/evaluation.py."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ..evaluation import FILE_TASK_TOKENS, EvalError, EvalSettings, format_table, run_bpb, run_eval
from ..recipes.quickstart import Recipe


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
    s.add_argument("model", help="a model name in the store or a checkpoint directory")
    s.add_argument("--task", action="append",
                   help="countdown (the quickstart's), arithmetic, gsm8k, math, math500:ids=FILE, svamp, jsonl:PATH, "
                        "or any task spec (countdown:n_numbers=4); repeatable")
    s.add_argument("--task-data", help="the folder of a file task's data (gsm8k, math, math500, svamp)")
    s.add_argument("--split", default="test", help="held-out split: test (default) or val where the task has one")
    s.add_argument("--limit", type=int, help="only the first N problems")
    s.add_argument("--samples", type=int, default=0, help="K samples per problem for pass@1 and pass@k (default 0)")
    s.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (default 0.6, R1's)")
    s.add_argument("--top-p", type=float, default=0.95, help="sampling top-p (default 0.95, R1's)")
    s.add_argument("--max-new-tokens", type=int,
                   help=f"token budget per completion (default: countdown {Recipe.max_new_tokens}, "
                        f"word problems {FILE_TASK_TOKENS}, others 64)")
    s.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="prompt through the chat template (default: for word problems; raw for generated tasks)")
    s.add_argument("--think", action="store_true", help="open each reply inside <think> (R1's enforced thinking)")
    s.add_argument("--seed", type=int, default=0, help="seed of the sampling stream")
    s.add_argument("--batch-size", type=int, default=512, help="sequences decoded together (default 512)")
    s.add_argument("--context", type=int, help="engine context in tokens (default: enough for the longest prompt)")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--threads", type=int, help="CPU threads for torch")
    s.add_argument("--bpb", action="store_true", help="bits per byte on held-out text instead (with --data)")
    s.add_argument("--data", help="with --bpb: a text file, or jsonl with a 'text' field")
    s.add_argument("--out", default="runs/eval", help="folder of the per-problem records (JSONL)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--json", action="store_true", help="print the summary as one JSON object, the last line")
    s.set_defaults(func=cmd_eval)
