"""The checked settings of a training run: the precision (DeepSeek-V3 report section 3.3: bf16, or
the FP8 recipe), the activation checkpointing policy and the layout over processes, every flag
combination that cannot run refused before any model is built."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..parallel import ParallelDims, resolve_policy
from ..quant.fp8 import FP8Config
from .args import TrainArgs


@dataclass(frozen=True)
class RunSettings:
    precision: str  # fp32 | bf16 | fp8
    fp8_config: FP8Config
    ac_policy: str  # none | selective | full
    dims: ParallelDims


def check_settings(a: TrainArgs, world: int, device: torch.device, follows: bool) -> RunSettings:
    """`a`'s settings on `world` processes of `device`, or a ValueError naming the flags that do not
    combine. `follows`: the run's lr schedule follows another job's progress."""
    precision = a.precision or ("bf16" if device.type == "cuda" else "fp32")
    if precision not in ("fp32", "bf16", "fp8"):
        raise ValueError(f"--precision: unsupported value {precision!r} (fp32, bf16 or fp8)")
    fp8_config = FP8Config(kernels=a.fp8_kernels, grouped=a.fp8_grouped)  # checks --fp8-kernels / --fp8-grouped
    if precision == "fp8" and a.fp8_grouped == "triton" and (a.fp8_kernels not in ("auto", "triton")
                                                              or device.type != "cuda"):
        raise ValueError(f"--fp8-grouped triton needs the fused Triton kernels (--fp8-kernels auto or triton on "
                         f"CUDA), not --fp8-kernels {a.fp8_kernels} on {device.type}")
    dims = ParallelDims(world=world, pp=a.pp, ep=a.ep, fsdp=a.fsdp)
    if follows and world > 1:
        raise ValueError("train(follow=...): a followed schedule needs a single process (ranks could read "
                         "different progress)")
    ac_policy = resolve_policy(a.ac_policy if a.ac_policy is not None else a.activation_checkpointing)
    dims.check(compile=a.compile, activation_checkpointing=ac_policy != "none", fp8=precision == "fp8",
               grad_accum=a.grad_accum, batch_size=a.batch_size, schedule=a.schedule)
    if a.async_save and not (a.fsdp and world > 1):
        raise ValueError("--async-save writes sharded checkpoints in the background: it needs --fsdp on 2 or more "
                         "processes")
    if a.async_save and a.pp > 1:
        raise ValueError("--async-save writes sharded (DCP) checkpoints: a pipeline (--pp) writes one optimizer file "
                         "per rank instead")
    if a.cpu_offload and not (a.fsdp and world > 1 and a.pp == 1):
        raise ValueError("--cpu-offload keeps FSDP's shards in host memory: it needs --fsdp on 2 or more processes, "
                         "without --pp")
    if a.balance not in ("bias", "aux", "none"):
        raise ValueError(f"--balance: unsupported value {a.balance!r} (bias, aux or none)")
    return RunSettings(precision, fp8_config, ac_policy, dims)
