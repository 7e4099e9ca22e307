"""Held-out evaluation of a model on a task: greedy accuracy with strict and lenient checking,
pass@k and mean accuracy of temperature samples (the unbiased pass@k estimator of the Codex
paper, with n samples per problem), and mean completion length. Generation goes through the
batched, KV-cached engine."""

from __future__ import annotations

from math import comb

import torch

from ..chat import render_chat
from ..engine import SamplingParams
from .base import Problem, Task, check_all


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples (drawn from n with c correct) is correct."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def encode_prompts(tokenizer, problems: list[Problem], chat: bool = False) -> list[list[int]]:
    """Token ids of each problem's prompt: raw text after BOS, or the question in the chat template."""
    if not chat:
        return [tokenizer.encode(p.prompt, add_bos=True) for p in problems]
    return [tokenizer.encode(render_chat(tokenizer, [{"role": "user", "content": p.prompt}]), add_bos=False)
            for p in problems]


def evaluate(engine, task: Task, problems: list[Problem], k: int = 8, temperature: float = 1.0,
             max_new_tokens: int = 64, chat: bool = False, seed: int = 0) -> dict:
    """Greedy accuracy (lenient and strict) and, with k > 0, pass@k and mean accuracy over k samples."""
    prompts = encode_prompts(engine.tokenizer, problems, chat)
    greedy = engine.generate(prompts, SamplingParams(max_tokens=max_new_tokens, temperature=0.0))
    scores = [task.check(p, c.text) for p, c in zip(problems, greedy)]
    n = max(1, len(problems))
    out = {"problems": len(problems),
           "accuracy": sum(s.correct for s in scores) / n,
           "accuracy_strict": sum(s.strict for s in scores) / n,
           "format": sum(s.format for s in scores) / n,
           "mean_length": sum(c.completion_tokens for c in greedy) / n}
    if k > 0:
        rep = [p for p in prompts for _ in range(k)]
        torch.manual_seed(seed)  # one stream for the batch (per-request seeds would sample row by row)
        samples = engine.generate(rep, SamplingParams(max_tokens=max_new_tokens, temperature=temperature))
        sampled = check_all(task, [p for p in problems for _ in range(k)], [c.text for c in samples])
        correct = [s.correct for s in sampled]
        per = [sum(correct[i * k:(i + 1) * k]) for i in range(len(problems))]
        out[f"pass_at_{k}"] = sum(pass_at_k(k, c, k) for c in per) / n
        out["pass_at_1_sampled"] = sum(per) / (n * k)
        out["sampled_mean_length"] = sum(c.completion_tokens for c in samples) / max(1, len(samples))
    return out
