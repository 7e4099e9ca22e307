"""A model's benchmark numbers (`nanoseek eval`, nanoseek/cli/eval.py) with the protocol of the
DeepSeek-R1 report (section 3, "Evaluation Setup"): greedy accuracy, and pass@1 as the mean
correctness of k samples per problem at temperature 0.6 and top-p 0.95, with pass@k by the
unbiased estimator of the Codex paper (Chen et al. 2021). Also the mean completion length, the
fraction of completions cut off by the token budget, and one JSONL record per problem (prompt,
completions, extracted answers, verdicts). `run_bpb` measures bits per byte instead
(nanoseek/bpb.py).

Tasks are `nanoseek.tasks` specs; the bare names are benchmark settings: `countdown` is the
quickstart's Countdown (3 numbers, its 500 held-out problems, 40 new tokens, raw prompts), so
`nanoseek eval quickstart --task countdown` reproduces the quickstart's held-out greedy accuracy.
Generation and checking are `tasks.evaluate.generate_and_check`, the same code the quickstart
and GRPO measure with. This module sits above the engine, the store and the tasks (it loads
models), which is why it is not part of `nanoseek.tasks`.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from .bpb import bits_per_byte, read_documents
from .checkpoint import CheckpointError
from .infer.engine import Engine
from .infer.store import resolve_model_dir
from .io import atomic_write_text
from .load import load_model as load_checkpoint
from .recipes.quickstart import Recipe, task_spec
from .tasks import GSM8K, MATH, SVAMP, ProblemFile, Task, get_task, pass_at_k
from .tasks.base import Problem
from .tasks.evaluate import Generations, encode_prompts, generate_and_check
from .tasks.extract import extract_answer
from .tokenizer import Tokenizer, TokenizerError

# the bare task names as benchmark settings: (task spec, max new tokens)
BARE_TASKS = {"countdown": (task_spec(Recipe(), 500), Recipe.max_new_tokens), "arithmetic": ("arithmetic", 64)}
FILE_TASK_TOKENS = 1024  # default token budget of word problems (reasoning models need far more: --max-new-tokens)


class EvalError(ValueError):
    """Input that cannot be evaluated (task, data file, model); the message says which and why."""


@dataclass
class EvalSettings:
    split: str = "test"
    limit: int | None = None
    samples: int = 0  # k samples per problem (0: greedy only)
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int | None = None  # None: the task's default
    chat: bool | None = None  # None: chat template for word problems, raw prompts for generated tasks
    think: bool = False
    seed: int = 0
    batch: int = 512  # sequences decoded together (the engine's max_batch)


@dataclass
class TaskRun:
    """One task's problems and the settings they are generated with."""
    spec: str
    task: Task
    problems: list[Problem]
    max_new_tokens: int
    chat: bool
    skipped: list[str] = field(default_factory=list)


def load_task(spec: str, settings: EvalSettings, data_dir: str | None = None) -> TaskRun:
    """The task of `spec` with its problems (split, limit) and generation settings. Raises EvalError."""
    full, tokens = BARE_TASKS.get(spec, (spec, None))
    try:
        task = get_task(full, data_dir)
        if not task.has_split(settings.split):
            raise EvalError(f"task {spec!r} has no {settings.split!r} split")
        problems = task.problems(settings.split, settings.limit)
    except (ValueError, FileNotFoundError) as e:
        raise EvalError(str(e)) from None
    if not problems:
        raise EvalError(f"task {spec!r}: no problems to evaluate")
    word_problems = isinstance(task, (GSM8K, MATH, SVAMP, ProblemFile))
    max_new = settings.max_new_tokens or tokens or (FILE_TASK_TOKENS if word_problems else 64)
    chat = settings.chat if settings.chat is not None else word_problems
    return TaskRun(spec, task, problems, max_new, chat, list(getattr(task, "skipped", [])))


def load_model(name: str, device: str | None = None):
    """(model, tokenizer, label) of a store name or a checkpoint folder. Raises EvalError."""
    if name.lower().endswith(".gguf"):
        raise EvalError(f"{name}: GGUF models are not supported yet; give a store name or a checkpoint folder")
    try:
        path = resolve_model_dir(name)
    except SystemExit as e:
        raise EvalError(str(e).removeprefix("nanoseek: ")) from None
    try:
        model = load_checkpoint(path, device=device)
        tokenizer = Tokenizer.from_dir(path)
    except (CheckpointError, TokenizerError, ValueError, OSError, KeyError) as e:
        raise EvalError(f"model '{name}' ({path}) cannot be loaded: {e}") from None
    label = os.path.basename(os.path.normpath(name)) if os.path.isdir(name) else name.replace(":", "-")
    return model, tokenizer, label


def pass_at_ks(correct_per_problem: list[int], n: int) -> dict[str, float]:
    """pass@k for k = 1, 2, 4, ... and n, averaged over problems (n samples each, c correct)."""
    ks = sorted({k for k in (2 ** i for i in range(n.bit_length())) if k <= n} | {n})
    m = max(1, len(correct_per_problem))
    return {str(k): sum(pass_at_k(n, c, k) for c in correct_per_problem) / m for k in ks}


def metrics(run: TaskRun, gen: Generations) -> dict:
    """The summary of one task: greedy accuracy (lenient, strict where the task checks more than
    the answer), pass@1 over samples, pass@k, completion lengths and truncation."""
    n = max(1, len(run.problems))
    out = {"task": run.spec, "n": len(run.problems),
           "accuracy": sum(s.correct for s in gen.greedy_scores) / n,
           "accuracy_strict": sum(s.strict for s in gen.greedy_scores) / n,
           "format": sum(s.format for s in gen.greedy_scores) / n,
           "pass_at_1": None, "pass_at_k": {}, "samples": gen.k,
           "mean_completion_tokens": sum(c.completion_tokens for c in gen.greedy) / n,
           "truncated": sum(c.finish_reason == "length" for c in gen.greedy) / n}
    if gen.k:
        per = [sum(s.correct for s in gen.sample_scores[i * gen.k:(i + 1) * gen.k]) for i in range(len(run.problems))]
        out["pass_at_k"] = pass_at_ks(per, gen.k)
        out["pass_at_1"] = out["pass_at_k"]["1"]
        out["sampled_mean_completion_tokens"] = sum(c.completion_tokens for c in gen.samples) / len(gen.samples)
        out["sampled_truncated"] = sum(c.finish_reason == "length" for c in gen.samples) / len(gen.samples)
    return out


def records(run: TaskRun, gen: Generations, think: bool) -> list[dict]:
    """One record per problem: the prompt, the gold answer, and each completion with its extracted
    answer and verdict."""
    def one(c, s):
        text = c.text if not think or "<think>" in c.text else "<think>\n" + c.text
        return {"completion": c.text, "extracted": extract_answer(text), "correct": s.correct, "strict": s.strict,
                "format": s.format, "tokens": c.completion_tokens, "finish_reason": c.finish_reason}

    out = []
    for i, p in enumerate(run.problems):
        rec = {"index": i, "prompt": p.prompt, "question": p.question, "answer": p.answer,
               "greedy": one(gen.greedy[i], gen.greedy_scores[i])}
        if p.meta.get("id"):
            rec["id"] = p.meta["id"]
        if gen.k:
            rec["samples"] = [one(c, s) for c, s in zip(gen.samples[i * gen.k:(i + 1) * gen.k],
                                                         gen.sample_scores[i * gen.k:(i + 1) * gen.k])]
            rec["pass_at_1"] = sum(s["correct"] for s in rec["samples"]) / gen.k
        out.append(rec)
    return out


def evaluate_task(model, tokenizer, run: TaskRun, settings: EvalSettings, progress: bool = True,
                  context: int | None = None) -> tuple[dict, list[dict]]:
    """Generate and check one task on a fresh engine; returns (summary, per-problem records)."""
    longest = max(len(ids) for ids in encode_prompts(tokenizer, run.problems, run.chat, settings.think))
    ctx = context or min(model.config.max_position_embeddings, longest + run.max_new_tokens + 2)  # + the last token
    engine = Engine(model, tokenizer, max_context=ctx, max_batch=settings.batch)
    t0 = time.time()
    bar = tqdm(total=len(run.problems) * (1 + settings.samples), desc=run.spec, unit="completion",
               disable=not progress, file=sys.stderr)
    try:
        gen = generate_and_check(engine, run.task, run.problems, settings.samples, settings.temperature,
                                 settings.top_p, run.max_new_tokens, run.chat, settings.think, settings.seed,
                                 batch=settings.batch, on_batch=bar.update)
    except ValueError as e:  # a prompt longer than the context
        raise EvalError(f"task {run.spec!r}: {e}") from None
    finally:
        bar.close()
        engine.close()
    summary = metrics(run, gen)
    summary["seconds"] = round(time.time() - t0, 2)
    return summary, records(run, gen, settings.think)


def records_path(out_dir: str, model_label: str, run: TaskRun, split: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model_label}_{run.task.name}_{split}")
    return os.path.join(out_dir, name + ".jsonl")


def format_table(rows: list[dict]) -> str:
    """The summary table, one row per task, fractions as percentages."""
    ks = sorted({k for r in rows for k in r["pass_at_k"]}, key=int)
    head = ["task", "n", "greedy", "strict"] + [f"pass@{k}" for k in ks] + ["tokens", "truncated", "seconds"]

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    body = [[r["task"], str(r["n"]), pct(r["accuracy"]), pct(r["accuracy_strict"])]
            + [pct(r["pass_at_k"].get(k)) for k in ks]
            + [f"{r['mean_completion_tokens']:.1f}", pct(r["truncated"]), f"{r['seconds']:.1f}"] for r in rows]
    widths = [max(len(line[i]) for line in [head] + body) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in [head] + body)


def run_eval(model_name: str, specs: list[str], settings: EvalSettings, out_dir: str = "runs/eval",
             data_dir: str | None = None, device: str | None = None, progress: bool = True,
             context: int | None = None, warn=None) -> list[dict]:
    """Every task of `specs` on one model: the summaries, each with the path of its records file."""
    warn = warn or (lambda msg: print(f"nanoseek eval: {msg}", file=sys.stderr, flush=True))
    runs = [load_task(s, settings, data_dir) for s in specs]  # bad tasks fail before the model loads
    for run in runs:
        for why in run.skipped:
            warn(f"skipped {why}")
    model, tokenizer, label = load_model(model_name, device)
    os.makedirs(out_dir, exist_ok=True)
    results = []
    for run in runs:
        summary, recs = evaluate_task(model, tokenizer, run, settings, progress, context)
        path = records_path(out_dir, label, run, settings.split)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in recs))
        summary["records"] = path
        if run.skipped:
            summary["skipped"] = run.skipped
        results.append(summary)
    return results


def run_bpb(model_name: str, data: str, context: int | None = None, batch: int = 8, device: str | None = None,
            progress: bool = True) -> dict:
    """Bits per byte of the model on the text file (or jsonl "text" rows) `data`."""
    try:
        docs = read_documents(data)
    except (OSError, ValueError) as e:
        raise EvalError(f"--data {data}: {e}") from None
    model, tokenizer, _ = load_model(model_name, device)
    ctx = context or model.config.max_position_embeddings
    t0 = time.time()
    bar = tqdm(desc="bits per byte", unit="window", disable=not progress, file=sys.stderr)
    try:
        r = bits_per_byte(model, tokenizer, docs, min(ctx, model.config.max_position_embeddings), batch, on_window=bar.update)
    except ValueError as e:
        raise EvalError(f"--data {data}: {e}") from None
    finally:
        bar.close()
    return {"task": "bpb", "data": data, **r, "context": min(ctx, model.config.max_position_embeddings),
            "seconds": round(time.time() - t0, 2)}
