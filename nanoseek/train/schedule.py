"""Learning-rate schedules on plain numbers: linear warm-up, then cosine decay to lr * min_ratio
(DeepSeek-V3 report section 4.2 uses warm-up then cosine decay; GRPO, DeepSeekMath section 4.1.2).

Two formulas, kept apart on purpose: pretraining's and GRPO's warm-ups are the same function on
paper, but `lr * (step + 1) / warmup` and `lr * min(1, (step + 1) / warmup)` round differently in
the last bit at some steps, and recorded runs of each loop are reproduced bit for bit by its own.
tests/test_train.py pins both.
"""

from __future__ import annotations

import math


def cosine_factor(progress: float, min_ratio: float) -> float:
    """The cosine schedule's lr multiplier: 1 at progress 0, min_ratio from progress 1 on."""
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def pretrain_lr(step: int, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float,
                time_fraction: float | None = None, least_progress: float = 0.0) -> float:
    """Pretraining's lr at optimizer step `step` (0-based): warm-up over min(warmup_steps,
    max_steps - 1) steps, then cosine decay whose progress is the larger of the steps done, the
    share of the time budget used (`time_fraction`, None: no budget) and `least_progress`."""
    warmup = min(warmup_steps, max(max_steps - 1, 0))
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    if time_fraction is not None:
        progress = max(progress, time_fraction)
    progress = max(progress, least_progress)
    return lr * cosine_factor(progress, min_lr_ratio)


def grpo_lr(step: int, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float,
            time_fraction: float | None = None) -> float:
    """GRPO's lr at step `step` (0-based): warm-up over warmup_steps steps, then constant
    (min_lr_ratio 1) or cosine decay whose progress is the larger of the steps done and the share
    of the time budget used (`time_fraction`, None: no budget)."""
    rate = lr * min(1.0, (step + 1) / max(1, warmup_steps))
    if min_lr_ratio != 1.0 and step >= warmup_steps:
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        if time_fraction is not None:
            progress = max(progress, time_fraction)
        rate = lr * cosine_factor(progress, min_lr_ratio)
    return rate
