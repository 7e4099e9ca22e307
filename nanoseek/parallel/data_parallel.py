"""Data parallelism: every rank holds the whole model, sees its slice of the global batch, and
gradients are averaged over ranks before the optimizer step. Equivalent to DDP's math, written
as one bucketed all-reduce so that experts which received no tokens on some rank (and so have
no gradient there) need no special casing. `DataParallelTraining` is the training loop's view of
it (nanoseek/parallel/interface.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .dims import ParallelDims
from .interface import SingleProcess


class DataParallel:
    def __init__(self, model: nn.Module, world: int, group=None, broadcast: bool = True):
        self.model = model
        self.world = world  # ranks in the data-parallel group
        self.group = group
        if world > 1 and broadcast:
            src = dist.get_global_rank(group, 0) if group is not None else 0
            for p in model.parameters():  # start from the group's first rank's weights
                dist.broadcast(p.data, src=src, group=group)
            for b in model.buffers():
                dist.broadcast(b.data, src=src, group=group)

    @torch.no_grad()
    def sync_grads(self) -> None:
        """Average gradients over ranks (missing grads count as zero)."""
        if self.world == 1:
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in params:
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            flat /= self.world
            offset = 0
            for p in group:
                n = p.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n


class DataParallelTraining(SingleProcess):
    """W replicas of the whole model, each on its slice of the global batch; gradients averaged."""

    def __init__(self, model, dims: ParallelDims, rank: int, device, grad_accum: int = 1):
        super().__init__(model, dims, rank, device, grad_accum)
        self.averager = DataParallel(model, dims.world)

    def sync_grads(self) -> None:
        self.averager.sync_grads()
