"""Verifiable tasks for reasoning RL and evaluation: generated Countdown and multi-digit
arithmetic, and GSM8K, MATH and SVAMP read from local files. `get_task("countdown:n_numbers=3")`
builds one from a spec string; file tasks need their folder (`gsm8k:root=DIR`)."""

from __future__ import annotations

from .arithmetic import Arithmetic
from .base import Problem, Score, Task
from .countdown import Countdown
from .datasets import GSM8K, MATH, SVAMP
from .evaluate import evaluate, pass_at_k

TASKS: dict[str, type[Task]] = {"countdown": Countdown, "arithmetic": Arithmetic, "gsm8k": GSM8K,
                                "math": MATH, "svamp": SVAMP}


def get_task(spec: str, root: str | None = None) -> Task:
    """`name` or `name:key=value,key=value` (e.g. `countdown:n_numbers=3`, `arithmetic:digits=4`)."""
    name, _, rest = spec.partition(":")
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    kwargs: dict = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"task {spec!r}: expected key=value, got {item!r}")
        kwargs[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    cls = TASKS[name]
    if cls in (GSM8K, MATH, SVAMP):
        root = kwargs.pop("root", root)
        if root is None:
            raise ValueError(f"task {name!r} reads local files: give its folder ({name}:root=DIR or --task-data DIR)")
        kwargs["root"] = root
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"task {spec!r}: {e}") from None


__all__ = ["Task", "Problem", "Score", "Countdown", "Arithmetic", "GSM8K", "MATH", "SVAMP", "TASKS", "get_task",
           "evaluate", "pass_at_k"]
