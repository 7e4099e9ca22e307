"""Held-out evaluation of a model on a task: greedy accuracy with strict and lenient checking,
pass@k and mean accuracy of temperature samples (the unbiased pass@k estimator of the Codex
paper, with n samples per problem), and mean completion length. Generation goes through the
batched, KV-cached engine; `generate_and_check` keeps every completion and its check (the
per-problem records of `nanoseek eval`), `evaluate` reduces them to the numbers."""

from __future__ import annotations

from dataclasses import dataclass, field
from math import comb
from typing import Callable

import torch

from ..infer.chat import render_chat
from ..infer.engine import Completion, SamplingParams
from .base import THINK, Problem, Score, Task, check_all


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples (drawn from n with c correct) is correct."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def encode_prompts(tokenizer, problems: list[Problem], chat: bool = False, think: bool = False) -> list[list[int]]:
    """Token ids of each problem's prompt: raw text after BOS, or the question in the chat template;
    with `think` the reply opens inside `<think>` (DeepSeek-R1's enforced thinking)."""
    if not chat:
        opened = THINK + "\n" if think else ""
        return [tokenizer.encode(p.prompt + opened, add_bos=True) for p in problems]
    return [tokenizer.encode(render_chat(tokenizer, [{"role": "user", "content": p.prompt}], think=think or None),
                             add_bos=False)
            for p in problems]


@dataclass
class Generations:
    """Every completion of an evaluation and its check: one greedy completion per problem, and k
    samples per problem (problem-major: problem i's samples are samples[i * k:(i + 1) * k])."""
    greedy: list[Completion]
    greedy_scores: list[Score]
    k: int = 0
    samples: list[Completion] = field(default_factory=list)
    sample_scores: list[Score] = field(default_factory=list)


def _batched_generate(engine, prompts: list[list[int]], params: SamplingParams, batch: int | None,
                      on_batch: Callable[[int], None] | None) -> list[Completion]:
    """engine.generate over all prompts at once (batch None) or `batch` prompts at a time."""
    step = batch or max(1, len(prompts))
    out: list[Completion] = []
    for i in range(0, len(prompts), step):
        out += engine.generate(prompts[i:i + step], params)
        if on_batch is not None:
            on_batch(len(prompts[i:i + step]))
    return out


def generate_and_check(engine, task: Task, problems: list[Problem], k: int = 0, temperature: float = 1.0,
                       top_p: float = 1.0, max_new_tokens: int = 64, chat: bool = False, think: bool = False,
                       seed: int = 0, batch: int | None = None,
                       on_batch: Callable[[int], None] | None = None) -> Generations:
    """Greedy completions of every problem and, with k > 0, k temperature samples of each, all
    checked by the task. `batch`: generate that many prompts at a time (None: all in one call);
    `on_batch(n)` is called after each call with the number of completions it made."""
    prompts = encode_prompts(engine.tokenizer, problems, chat, think)
    greedy = _batched_generate(engine, prompts, SamplingParams(max_tokens=max_new_tokens, temperature=0.0),
                               batch, on_batch)
    out = Generations(greedy, [task.check(p, opened_text(c.text, think)) for p, c in zip(problems, greedy)], k)
    if k > 0:
        rep = [p for p in prompts for _ in range(k)]
        torch.manual_seed(seed)  # one stream for the batch (per-request seeds would sample row by row)
        out.samples = _batched_generate(engine, rep, SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                                                    top_p=top_p),
                                        batch and batch * k, on_batch)
        out.sample_scores = check_all(task, [p for p in problems for _ in range(k)],
                                      [opened_text(c.text, think) for c in out.samples])
    return out


def opened_text(completion: str, think: bool) -> str:
    """The completion as checked: prefixed with the `<think>` that the prompt opened, if any."""
    return THINK + "\n" + completion if think and THINK not in completion else completion


def evaluate(engine, task: Task, problems: list[Problem], k: int = 8, temperature: float = 1.0,
             max_new_tokens: int = 64, chat: bool = False, seed: int = 0) -> dict:
    """Greedy accuracy (lenient and strict) and, with k > 0, pass@k and mean accuracy over k samples."""
    gen = generate_and_check(engine, task, problems, k, temperature, max_new_tokens=max_new_tokens, chat=chat,
                             seed=seed)
    greedy, scores = gen.greedy, gen.greedy_scores
    n = max(1, len(problems))
    out = {"problems": len(problems),
           "accuracy": sum(s.correct for s in scores) / n,
           "accuracy_strict": sum(s.strict for s in scores) / n,
           "format": sum(s.format for s in scores) / n,
           "mean_length": sum(c.completion_tokens for c in greedy) / n}
    if k > 0:
        samples = gen.samples
        correct = [s.correct for s in gen.sample_scores]
        per = [sum(correct[i * k:(i + 1) * k]) for i in range(len(problems))]
        out[f"pass_at_{k}"] = sum(pass_at_k(k, c, k) for c in per) / n
        out["pass_at_1_sampled"] = sum(per) / (n * k)
        out["sampled_mean_length"] = sum(c.completion_tokens for c in samples) / max(1, len(samples))
    return out
