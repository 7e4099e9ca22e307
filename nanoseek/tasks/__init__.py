"""Verifiable tasks for reasoning RL and evaluation: generated Countdown and multi-digit
arithmetic, GSM8K, MATH (and MATH-500) and SVAMP read from local files, and any jsonl file of
problems and answers. `get_task("countdown:n_numbers=3")` builds one from a spec string; file
tasks need their folder (`gsm8k:root=DIR`); `jsonl:PATH` reads PATH."""

from __future__ import annotations

from .arithmetic import Arithmetic
from .base import Problem, Score, Task
from .countdown import Countdown
from .datasets import GSM8K, MATH, MATH500, SVAMP
from .evaluate import evaluate, pass_at_k
from .problem_file import ProblemFile

TASKS: dict[str, type[Task]] = {"countdown": Countdown, "arithmetic": Arithmetic, "gsm8k": GSM8K,
                                "math": MATH, "math500": MATH500, "svamp": SVAMP}


def get_task(spec: str, root: str | None = None) -> Task:
    """`name` or `name:key=value,key=value` (e.g. `countdown:n_numbers=3`, `arithmetic:digits=4`),
    or `jsonl:PATH`."""
    name, _, rest = spec.partition(":")
    if name == ProblemFile.name:
        return ProblemFile(rest)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}, jsonl:PATH")
    kwargs: dict = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"task {spec!r}: expected key=value, got {item!r}")
        kwargs[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    cls = TASKS[name]
    if cls in (GSM8K, MATH, MATH500, SVAMP):
        root = kwargs.pop("root", root)
        if root is None:
            raise ValueError(f"task {name!r} reads local files: give its folder ({name}:root=DIR or --task-data DIR)")
        kwargs["root"] = root
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"task {spec!r}: {e}") from None


__all__ = ["Task", "Problem", "Score", "Countdown", "Arithmetic", "GSM8K", "MATH", "MATH500", "SVAMP",
           "ProblemFile", "TASKS", "get_task",
           "evaluate", "pass_at_k"]
