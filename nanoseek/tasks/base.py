"""The task contract shared by every verifiable task: problems with gold answers, a
rule-based check (lenient: the extracted answer is right; strict: the output also keeps the
`<think>...</think><answer>...</answer>` format and, where a task can check them, valid worked
steps) and a scalar reward for reinforcement learning (DeepSeek-R1 report section 2.2.2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from .extract import format_ok

THINK = "<think>"


@dataclass
class Problem:
    prompt: str  # the text a raw (non-chat) model continues
    answer: str  # the gold final answer
    solution: str = ""  # a gold completion in the task's output format, when one is known
    question: str = ""  # the bare question, for chat templates
    key: str = ""  # identity used to keep held-out problems out of training
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
        """Held-out ("test") or training ("train") problems, deterministic for a seed."""
        raise NotImplementedError

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
        from .extract import FORMAT_RE, extract_answer
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
