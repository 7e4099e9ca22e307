"""Parallelism applied from outside an unchanged model (DeepSeek-V3 report section 3.2): process
groups, data parallelism, expert parallelism (routed experts sharded, all-to-all dispatch) and
pipeline parallelism (1F1B, DualPipe, DualPipeV), fully sharded data parallelism (FSDP2). `parallelize(model, dims)` is the one entry
point of training: it returns the model laid out behind the `Parallel` interface."""

from __future__ import annotations

import torch

from .activation_checkpointing import apply_activation_checkpointing, resolve_policy
from .data_parallel import DataParallel, DataParallelTraining
from .dims import ParallelDims
from .dist import DistInfo, all_reduce_sum, barrier, init_distributed, is_main
from .ep_training import ExpertParallelTraining
from .fsdp import FSDPTraining
from .interface import Parallel, SingleProcess, batch_on_device, local_numel
from .pipeline_train import PipelineTraining


def parallelize(model, dims: ParallelDims, rank: int, device, *, grad_accum: int = 1, schedule: str = "1f1b",
                chunks: int | None = None, balance_alpha: float = 0.0, mtp_lambda: float = 0.3,
                activation_checkpointing: bool | str = False, compile: bool = False, fsdp_reshard_after_forward: bool = True,
                fsdp_param_dtype: torch.dtype | None = None, async_save: bool = False,
                cpu_offload: bool = False) -> Parallel:
    """Lay `model` out over the run's processes: keep only this rank's pipeline stages (pp > 1),
    shard the routed experts over EP groups (ep > 1), shard everything (fsdp, with or without EP),
    or replicate it (one process: nothing to do); then activation checkpointing and torch.compile,
    where asked (fsdp with pp > 1: every pipeline stage sharded over its data-parallel ranks).
    `balance_alpha` and `mtp_lambda` are the loss weights the pipeline's last stage
    needs; `activation_checkpointing` a policy (none, full, selective; True: full);
    `fsdp_param_dtype` the dtype FSDP computes in (None: the parameters' own); `async_save` writes
    the sharded checkpoints in the background (fsdp only); `cpu_offload` keeps the sharded
    parameters, gradients and optimizer states in host memory (fsdp without pp)."""
    if dims.pp > 1:  # with fsdp: each stage sharded over its data-parallel ranks
        par = PipelineTraining(model, dims.pp, schedule, chunks, balance_alpha, mtp_lambda, device, dims,
                               fsdp_reshard_after_forward=fsdp_reshard_after_forward, fsdp_param_dtype=fsdp_param_dtype)
    elif dims.fsdp and dims.world > 1:
        par = FSDPTraining(model, dims, rank, device, grad_accum, reshard_after_forward=fsdp_reshard_after_forward,
                           param_dtype=fsdp_param_dtype, async_save=async_save, cpu_offload=cpu_offload)
    elif dims.ep > 1:
        par = ExpertParallelTraining(model, dims.ep, device, dims, grad_accum)
    elif dims.world > 1:
        par = DataParallelTraining(model, dims, rank, device, grad_accum)
    else:
        par = SingleProcess(model, dims, rank, device, grad_accum)
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        par.forward_model = torch.compile(model)
    return par


__all__ = ["DistInfo", "init_distributed", "barrier", "is_main", "all_reduce_sum", "DataParallel",
           "DataParallelTraining", "ExpertParallelTraining", "FSDPTraining", "PipelineTraining", "Parallel", "ParallelDims",
           "SingleProcess", "apply_activation_checkpointing", "resolve_policy", "batch_on_device", "local_numel", "parallelize"]
