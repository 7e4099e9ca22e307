"""Data parallelism: every rank holds the whole model, sees its slice of the global batch, and
gradients are averaged over ranks before the optimizer step. Equivalent to DDP's math, written
as one bucketed all-reduce so that experts which received no tokens on some rank (and so have
no gradient there) need no special casing."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


class DataParallel:
    def __init__(self, model: nn.Module, world: int):
        self.model = model
        self.world = world
        if world > 1:
            for p in model.parameters():  # start from rank 0's weights
                dist.broadcast(p.data, src=0)
            for b in model.buffers():
                dist.broadcast(b.data, src=0)

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
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.world
            offset = 0
            for p in group:
                n = p.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n
