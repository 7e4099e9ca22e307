"""The task contract shared by every verifiable task: problems with gold answers, a
rule-based check (lenient: the extracted answer is right; strict: the output also keeps the
`<think>...</think><answer>...</answer>` format and, where a task can check them, valid worked
steps) and a scalar reward for reinforcement learning (DeepSeek-R1 report section 2.2.2)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator

from .extract import FORMAT_RE, extract_answer, format_ok

THINK = "<think>"


@dataclass
class Problem:
    prompt: str  # the text a raw (non-chat) model continues
    answer: str  # the gold final answer
    solution: str = ""  # a gold completion in the task's output format, when one is known
    question: str = ""  # the bare question, for chat templates
    key: str = ""  # identity up to the task's symmetries, used to keep held-out problems out of training
    meta: dict = field(default_factory=dict)


@dataclass
class Score:
    correct: bool  # lenient: the final answer is right, however it was marked
    strict: bool  # right, in the exact output format, with valid worked steps where checkable
    format: bool  # `<think>...</think><answer>...</answer>` exactly once each


class Task:
    name = "task"
    description = ""

    # -- problems
    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
        """Held-out ("test", and "val" where the task has one) or training ("train") problems,
        deterministic for a seed."""
        raise NotImplementedError

    def has_split(self, split: str) -> bool:
        return split in ("train", "test")

    def stream(self, seed: int = 0) -> Iterator[Problem]:
        """An endless stream of training problems (never a held-out one)."""
        epoch = 0
        while True:
            pool = self.problems("train", seed=seed + epoch)
            if not pool:
                raise ValueError(f"task {self.name!r} has no training problems")
            yield from pool
            epoch += 1

    def problem_from(self, question: str, answer: str) -> Problem:
        """A problem to check a completion against, from its question text and gold answer."""
        return Problem(prompt=question, answer=str(answer), question=question)

    # -- checking
    def answer_correct(self, problem: Problem, answer_text: str | None, completion: str) -> bool:
        raise NotImplementedError

    def steps_valid(self, problem: Problem, thinking: str) -> bool:
        """Whether the worked steps check out (tasks without checkable steps accept any)."""
        return True

    def check(self, problem: Problem, completion: str) -> Score:
        text = completion
        if problem.prompt.rstrip().endswith(THINK) and THINK not in completion:
            text = THINK + completion  # the prompt opened the thinking block (R1 style)
        correct = self.answer_correct(problem, extract_answer(text), text)
        fmt = format_ok(text)
        strict = False
        if correct and fmt:
            m = FORMAT_RE.fullmatch(text)
            tagged = extract_answer(f"<answer>{m.group(2)}</answer>")  # the tags' content (a box inside allowed)
            strict = self.answer_correct(problem, tagged, text) and self.steps_valid(problem, m.group(1))
        return Score(correct=correct, strict=strict, format=fmt)

    def reward(self, problem: Problem, completion: str, mode: str = "strict", format_weight: float = 0.0) -> float:
        """Accuracy reward (strict or lenient checking) plus an optional format reward."""
        return score_reward(self.check(problem, completion), mode, format_weight)


class GeneratedTask(Task):
    """A task whose problems a generator draws (`_one(rng)`), with two fixed held-out sets: the
    test set (the first `test_size` distinct keys drawn from `test_seed`), then the validation set
    (the next `val_size`), for choosing settings without looking at the test set. Training draws
    skip every held-out key. Settings whose problem space cannot hold both held-out sets and at
    least as many training problems are refused when the task is built."""

    spec = "task"  # the task's settings in `get_task` form, for error messages

    def __init__(self, test_size: int, val_size: int, test_seed: int):
        if test_size < 1 or val_size < 0:
            raise ValueError(f"{self.name}: test_size must be >= 1 and val_size >= 0, got {test_size} and {val_size}")
        self.test_size, self.val_size, self.test_seed = test_size, val_size, test_seed
        self._held_out()  # refuse impossible settings now, not in a training loop

    def _one(self, rng: random.Random) -> Problem | None:
        raise NotImplementedError

    def _train_rng(self, seed: int) -> random.Random:
        return random.Random(f"{self.name}-train-{seed}")

    def _distinct(self, rng: random.Random, n: int, exclude: frozenset, attempts: int) -> list[Problem]:
        out, seen = [], set(exclude)
        for _ in range(attempts):
            p = self._one(rng)
            if p is not None and p.key not in seen:
                seen.add(p.key)
                out.append(p)
                if len(out) == n:
                    break
        return out

    @lru_cache(maxsize=4)
    def _held_out(self) -> tuple[tuple[Problem, ...], tuple[Problem, ...]]:
        need = self.test_size + self.val_size
        drawn = self._distinct(random.Random(self.test_seed), need, frozenset(), 200 * need + 20_000)
        if len(drawn) < need:
            raise ValueError(f"{self.spec}: only {len(drawn)} distinct problems were found in "
                             f"{200 * need + 20_000:,} draws, fewer than test_size={self.test_size} + "
                             f"val_size={self.val_size}; ask for smaller held-out sets or a harder setting")
        keys = frozenset(p.key for p in drawn)
        left = self._distinct(self._train_rng(0), need, keys, 200 * need + 20_000)
        if len(left) < need:
            raise ValueError(f"{self.spec}: the held-out sets (test_size={self.test_size} + val_size={self.val_size}) "
                             f"would leave only {len(left)} distinct problems for training; ask for smaller held-out "
                             f"sets or a harder setting")
        return tuple(drawn[:self.test_size]), tuple(drawn[self.test_size:])

    def held_out_keys(self) -> frozenset:
        test, val = self._held_out()
        return frozenset(p.key for p in test + val)

    def has_split(self, split: str) -> bool:
        return split in ("train", "test") or (split == "val" and self.val_size > 0)

    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
        if split in ("test", "val"):
            if not self.has_split(split):
                raise ValueError(f"{self.spec}: no validation set (val_size=0); build the task with val_size=N")
            return list(self._held_out()[split == "val"][:n])
        if split != "train":
            raise ValueError(f"{self.name}: unknown split {split!r} (train, val or test)")
        rng, held_out, out = self._train_rng(seed), self.held_out_keys(), []
        while len(out) < (n or 4096):  # repeats allowed: training follows the generator's distribution
            p = self._one(rng)
            if p is not None and p.key not in held_out:
                out.append(p)
        return out


def check_all(task: Task, problems: list[Problem], completions: list[str]) -> list[Score]:
    """task.check of each (problem, completion) pair, each distinct pair checked once: the samples
    of one prompt (GRPO's group, pass@k's k) often repeat a completion, and a check is a pure
    function of the pair (repeats share one Score)."""
    seen: dict[tuple[int, str], Score] = {}
    out = []
    for p, text in zip(problems, completions):
        key = (id(p), text)
        if key not in seen:
            seen[key] = task.check(p, text)
        out.append(seen[key])
    return out


def score_reward(s: Score, mode: str = "strict", format_weight: float = 0.0) -> float:
    """The reward of a checked completion: 1 when right (strict or lenient) + format_weight x format."""
    if mode not in ("strict", "lenient"):
        raise ValueError(f"reward mode must be 'strict' or 'lenient', got {mode!r}")
    return float(s.strict if mode == "strict" else s.correct) + format_weight * float(s.format)
