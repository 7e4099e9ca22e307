"""Sharded checkpoints through torch.distributed.checkpoint (DCP): every rank writes the shards it
holds of the model and of the AdamW moments into one folder, and any layout reads them back,
resharded to its own world size (a run saved at fsdp 2 resumes on 1 process, and one saved on 1
process resumes at fsdp 4). The state is that of `get_state_dict` / `set_state_dict` (FQN-keyed
model and optimizer state, DTensor shards under FSDP2, plain tensors elsewhere), as torchtitan
checkpoints DeepSeek-V3 (arXiv 2412.19437, section 3.2: the parallel layouts).

`save_sharded_async` writes in the background (torchtitan's async checkpointing): the shards are
copied to CPU first, so training goes on changing the live ones, and a background thread runs the
same DCP save over its own gloo process group, which never interleaves with training's collectives.

`relabel` lets a layout restate some tensors before DCP sees them: the expert-parallel FSDP layout
turns its expert shards, local to an EP rank, into DTensors of the whole expert dimension, so that
the folder always holds the tensors of the whole model.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

SHARDED_DIR = "dcp"  # the folder inside a checkpoint that holds the sharded model and optimizer state

Relabel = Callable[[dict], dict]


def sharded_dir(ckpt_dir: str) -> str:
    return os.path.join(ckpt_dir, SHARDED_DIR)


def is_sharded_checkpoint(ckpt_dir: str) -> bool:
    return os.path.isdir(sharded_dir(ckpt_dir))


def _restated(model: nn.Module, opt: torch.optim.Optimizer, relabel: Relabel | None) -> tuple[dict, dict, dict]:
    """(model state, optimizer state, what DCP reads or writes): the last shares storage with the
    first two, so a load in place lands in them."""
    model_state, optim_state = get_state_dict(model, opt)
    state = {"model": model_state, "optim": optim_state}
    return model_state, optim_state, relabel(state) if relabel is not None else state


def save_sharded(model: nn.Module, opt: torch.optim.Optimizer, ckpt_dir: str, relabel: Relabel | None = None) -> None:
    """Every rank's shards of model and optimizer into ckpt_dir/dcp. Collective."""
    path = sharded_dir(ckpt_dir)
    os.makedirs(path, exist_ok=True)
    _, _, state = _restated(model, opt, relabel)
    dcp.save(state, checkpoint_id=path)


def cpu_copy(state):
    """A copy of a (nested) state dict whose tensors live in fresh CPU memory; a DTensor stays a
    DTensor of the same global shape and placements, its local shard copied."""
    if isinstance(state, torch.Tensor):  # a DTensor's copy keeps its mesh and placements, its shard on CPU
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: cpu_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(cpu_copy(v) for v in state)
    return state


def write_sharded(state: dict, path: str, group) -> None:
    """DCP's save of an already restated (and copied) state into `path` over `group`. Collective
    over `group`."""
    dcp.save(state, checkpoint_id=path, process_group=group)


class AsyncShardedSaver:
    """Background DCP saves, one at a time: `save` copies this rank's shards to CPU and hands them
    to a writer thread; `wait` blocks until that write has finished on this rank. A save first
    waits for the previous one. Every rank creates the saver (its process group) at the same point."""

    def __init__(self):
        self.group = dist.new_group(backend="gloo")  # the writer's own: training's collectives run meanwhile
        self.executor = ThreadPoolExecutor(max_workers=1)
        self.pending: Future | None = None

    def save(self, model: nn.Module, opt: torch.optim.Optimizer, ckpt_dir: str, relabel: Relabel | None = None) -> None:
        """Stage every rank's shards of model and optimizer, then write them into ckpt_dir/dcp in
        the background. Collective (the staging is local; the write is collective over its group)."""
        self.wait()
        path = sharded_dir(ckpt_dir)
        os.makedirs(path, exist_ok=True)
        _, _, state = _restated(model, opt, relabel)
        self.pending = self.executor.submit(write_sharded, cpu_copy(state), path, self.group)

    def wait(self) -> None:
        """Block until this rank's last background write has finished (re-raising its error)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()


def load_sharded(model: nn.Module, opt: torch.optim.Optimizer, ckpt_dir: str, relabel: Relabel | None = None) -> None:
    """Model and optimizer state from ckpt_dir/dcp, resharded to this layout. Collective."""
    model_state, optim_state, state = _restated(model, opt, relabel)
    dcp.load(state, checkpoint_id=sharded_dir(ckpt_dir))  # in place, into the tensors of model_state / optim_state
    set_state_dict(model, opt, model_state_dict=model_state, optim_state_dict=optim_state)
