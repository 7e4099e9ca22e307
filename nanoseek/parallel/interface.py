"""The one interface the training loop sees, whatever the layout (torchtitan's `parallelize_fn` /
`model_parts` idea): one optimizer step is `forward_backward` -> `sync_grads` -> `clip_grad_norm_`;
checkpoints go through `full_model` and `save_optimizer` / `load_optimizer`, so they are in the
Hugging Face layout whatever the layout was. `SingleProcess` is the trivial case (and the shared
code of the replicated layouts); data, expert and pipeline parallelism override what differs.

The loss of a micro-batch (`loss(forward_model, model, x, y, extra)` -> ce, mtp, balance, total
as 0-dim tensors, and `loss.moes`, the MoE layers whose expert loads feed the bias update) comes
from the training loop; the pipeline computes the same objective stage by stage instead.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from torch.distributed.tensor import DTensor

from ..checkpoint import CheckpointError
from ..model import DeepSeekV3
from .dims import ParallelDims
from .dist import all_reduce_sum
from .sharded_checkpoint import load_sharded


def batch_on_device(batch, device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(x, y) or (x, y, positions, segment_ids) from a batch source -> x, y and forward kwargs."""
    x, y = batch[0].to(device), batch[1].to(device)
    extra = {}
    if len(batch) > 2:  # packed rows: positions restart and attention stays inside each document
        extra = {"positions": batch[2].to(device), "segment_ids": batch[3].to(device)}
    return x, y, extra


class Parallel:
    """A model laid out over the run's processes. `model` is this rank's part of it (all of it
    unless pipelined), `forward_model` what the loop calls (compiled or not), `full_config` the
    whole model's config."""

    model: nn.Module
    forward_model: nn.Module
    reads_sharded_checkpoints = True  # can resume from a DCP checkpoint (nanoseek/parallel/sharded_checkpoint.py)
    dims: ParallelDims
    rank: int
    device: torch.device

    def __init__(self, model: DeepSeekV3, dims: ParallelDims, rank: int, device, grad_accum: int = 1):
        self.model = self.forward_model = model
        self.full_config = model.config
        self.dims, self.rank, self.device, self.grad_accum = dims, rank, torch.device(device), grad_accum

    @property
    def main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        """The layout, for the run's first line ('' for one process)."""
        return ""

    # ------------------------------------------------------------------ one optimizer step
    def forward_backward(self, batches, step: int, loss, autocast) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of optimizer step `step`'s global batch -> (ce, mtp, balance, total)
        means over it [4] float64, and the tokens per expert of each MoE layer over it."""
        raise NotImplementedError

    def sync_grads(self) -> None:
        """Gradients of this rank's parameters -> those of the global batch's mean loss."""
        raise NotImplementedError

    def train_step(self, batches, step: int, loss, autocast, max_norm: float
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """The gradients of optimizer step `step`, reduced and clipped to max_norm -> (ce, mtp,
        balance, total) means [4], the tokens per expert of each MoE layer, the gradient norm."""
        sums, loads = self.forward_backward(batches, step, loss, autocast)
        self.sync_grads()
        return sums, loads, self.clip_grad_norm_(max_norm)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The whole model's gradient norm (as one process computes it); gradients scaled to max_norm."""
        raise NotImplementedError

    # ------------------------------------------------------------------ validation
    def eval_model(self) -> tuple[nn.Module | None, int, int]:
        """(model to run, this rank's slice, slices) for validation; None: this rank only waits."""
        return self.forward_model, self.rank, self.dims.world

    def reduce_eval(self, total: torch.Tensor) -> None:
        """Sum the validation totals of the ranks that ran (in place)."""
        all_reduce_sum(total)

    # ------------------------------------------------------------------ checkpoints
    def full_state(self) -> dict | None:
        """The whole model's state dict on rank 0 (None elsewhere). Collective."""
        return self.model.state_dict()

    def full_model(self) -> nn.Module | None:
        """The whole model where a checkpoint is written from: rank 0 (the replicated layouts'
        other ranks get their own copy, the sharded ones None). Collective."""
        return self.model

    def layout_state(self) -> dict:
        """What a checkpoint records of the layout, for `check_resume` to compare."""
        return {"pp": self.dims.pp}

    def check_resume(self, trainer_state: dict, ckpt_dir: str) -> None:
        """Refuse a checkpoint this layout cannot read: one of another pipeline depth, or a sharded
        one where the layout reads single-file checkpoints only."""
        written_pp = trainer_state.get("pp", 1)
        if written_pp != self.dims.pp:
            raise CheckpointError(f"{ckpt_dir}: written with --pp {written_pp}; resume with the same --pp")
        if trainer_state.get("optimizer") is None and not self.reads_sharded_checkpoints:
            raise CheckpointError(f"{ckpt_dir}: a sharded checkpoint (written with --fsdp); resume it with --fsdp "
                                  f"or on one process, not with --ep or --pp")

    def save_optimizer(self, opt: torch.optim.Optimizer, ckpt_dir: str) -> dict | None:
        """The optimizer state for rank 0's trainer.pt (None elsewhere); ranks whose state it
        cannot hold write theirs into `ckpt_dir` (the checkpoint's temp folder). Collective."""
        return opt.state_dict() if self.main else None

    def wait_saves(self) -> None:
        """Block until what `save_optimizer` writes in the background (async saves) is on disk on
        this rank; nothing to wait for when it writes in place."""

    def load_optimizer(self, opt: torch.optim.Optimizer, saved: dict | None, ckpt_dir: str) -> None:
        """Load what `save_optimizer` wrote (`saved`: trainer.pt's optimizer state; None: a sharded
        checkpoint, whose model and optimizer state are read from its DCP folder)."""
        if saved is None:
            load_sharded(self.model, opt, ckpt_dir)
        else:
            opt.load_state_dict(saved)


class SingleProcess(Parallel):
    """One process, or the shared code of W replicated ones: each rank runs its slice of the global
    batch (by global sample index) in `grad_accum` micro-batches; the losses and expert loads are
    summed over ranks. With one process every reduction is a no-op."""

    def forward_backward(self, batches, step, loss, autocast):
        loads = {n: torch.zeros(m.experts.n_experts, device=self.device) for n, m in loss.moes.items()}
        sums = torch.zeros(4, device=self.device, dtype=torch.float64)  # ce, mtp, balance, total
        for micro in range(self.grad_accum):
            x, y, extra = batch_on_device(batches.get(step * self.grad_accum + micro, self.rank, self.dims.world),
                                          self.device)
            with autocast:
                ce, mtp, bal, total = loss(self.forward_model, self.model, x, y, extra)
            (total / self.grad_accum).backward()
            for n, m in loss.moes.items():
                loads[n] += m.tokens_per_expert.float()
            sums += torch.stack([ce.detach(), mtp.detach(), bal.detach(), total.detach()]).double() / self.grad_accum
        all_reduce_sum(sums)
        sums /= self.dims.world
        for v in loads.values():
            all_reduce_sum(v)
        return sums, loads

    def sync_grads(self) -> None:
        pass

    def clip_grad_norm_(self, max_norm):
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)


def local_numel(p: torch.Tensor) -> int:
    """Elements this rank holds of a parameter (its shard's, for an FSDP DTensor)."""
    return p.to_local().numel() if isinstance(p, DTensor) else p.numel()


def model_from_state(config, state: dict | None, device) -> DeepSeekV3 | None:
    """A whole model built from a gathered state dict (None where there is none: not rank 0)."""
    if state is None:
        return None
    with torch.device("meta"):
        whole = DeepSeekV3(config)
    whole.to_empty(device=device)
    whole.load_state_dict(state, strict=True)
    whole.rotary.reset_parameters()
    return whole


def rank_optimizer_path(ckpt_dir: str, rank: int) -> str:
    return os.path.join(ckpt_dir, f"optim-rank{rank}.pt")
