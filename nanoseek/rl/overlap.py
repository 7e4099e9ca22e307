"""The GRPO step scheduler: rollouts and updates one after the other, or overlapped (CPU): the
next step's rollouts are sampled on a worker thread with their own share of the threads while
this step's update runs on the rest, from a copy of the weights one step old (one-step
off-policy, as in asynchronous RL trainers; the objective's importance ratio corrects for the
lag). A step then costs about max(rollouts, update) instead of their sum.

It sees a trainer only through `next_problems()`, `rollout(step, problems)`, `update(batch,
step)`, `refresh_sampler()`, `record(...)` and its `step`, `loop_s` and `args` (max_steps,
max_seconds): nanoseek/rl/grpo.py's GRPOTrainer.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch


def run_steps(trainer, after_step: Callable[[dict], None], rollout_threads: int | None = None) -> None:
    """Steps until max_steps (or the loop time reaches max_seconds); `after_step(record)` after each
    (outside the loop's clock). `rollout_threads`: overlap, with the rollouts on that many threads.

    Overlapped, when the loop stops on max_seconds the batch sampled ahead goes unused (its time
    counts in the last step); on an error, shutdown waits for the batch in flight."""
    a = trainer.args
    threads = torch.get_num_threads()
    worker = (ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(rollout_threads,))
              if rollout_threads is not None else None)
    if worker is not None:
        torch.set_num_threads(threads - rollout_threads)
    ready = None
    try:
        while trainer.step < a.max_steps and (a.max_seconds is None or trainer.loop_s < a.max_seconds):
            step = trainer.step
            t0 = time.time()
            batch = ready or trainer.rollout(step, trainer.next_problems())
            ahead = (worker.submit(trainer.rollout, step + 1, trainer.next_problems())
                     if worker and step + 1 < a.max_steps else None)
            stats, grad_norm, lr = trainer.update(batch, step)
            ready = ahead.result() if ahead is not None else None
            if worker is not None:  # the sampler moves to the updated weights for the step after next
                trainer.refresh_sampler()
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            rec = trainer.record(batch, stats, grad_norm, lr, time.time() - t0)
            after_step(rec)
    finally:
        if worker is not None:
            worker.shutdown(wait=True)
            torch.set_num_threads(threads)
