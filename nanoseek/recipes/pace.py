"""Pace files: one job tells another how far along it is, so the second can run alongside it for
the same time (the quickstart's control trains while GRPO runs, on the other CPU core).

The quickstart wires it: GRPO's `on_step` callback writes its progress, a fraction in [0, 1],
after every step; the control's `train(follow=...)` reads it before every step, uses it as the
least progress of its learning-rate schedule (so its cosine decays with the leader's clock) and
stops when it reaches 1. The training loops know nothing of files or sibling processes. Written
atomically (a rename), so a reader never sees half a number.
"""

from __future__ import annotations

from ..io import atomic_write_text


def write_pace(path: str, fraction: float) -> None:
    """Record the leading job's progress (clamped to [0, 1])."""
    atomic_write_text(path, f"{min(max(float(fraction), 0.0), 1.0):.6f}\n")


def read_pace(path: str) -> float:
    """The leader's progress; 0 while the file does not exist yet."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return 0.0
    try:
        return min(max(float(text), 0.0), 1.0)
    except ValueError as e:
        raise ValueError(f"pace file {path}: expected a fraction in [0, 1], got {text[:40]!r}") from e
