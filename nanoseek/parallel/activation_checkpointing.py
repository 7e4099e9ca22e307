"""Activation checkpointing of the decoder blocks, applied from outside an unchanged model (the
DeepSeek-V3 report, section 3.2.3, recomputes RMSNorm and the MLA up-projections in the backward
instead of storing their outputs; Korthikanti et al. 2022 for selective recomputation).

Policies: `none` stores everything; `full` stores each block's input only and recomputes the whole
block in the backward; `selective` stores the outputs of the matmuls and of attention (the costly
ops) and recomputes the cheap element-wise ones (norms, activations, RoPE, routing weights) around
them. Recomputation reruns the same ops on the same inputs, so the gradients are unchanged.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

POLICIES = ("none", "full", "selective")

_aten = torch.ops.aten
_SAVED_NAMES = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
                "_grouped_mm")
SAVED_OPS = {getattr(_aten, n).default for n in _SAVED_NAMES if hasattr(_aten, n)}  # those this torch has


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def resolve_policy(policy: str | bool | None) -> str:
    """A policy name from a policy, or from the older on/off switch (True: full)."""
    if policy is None or policy is False:
        return "none"
    if policy is True:
        return "full"
    if policy not in POLICIES:
        raise ValueError(f"--ac-policy: unsupported value {policy!r} ({', '.join(POLICIES)})")
    return policy


def apply_activation_checkpointing(model, policy: str | bool = "full") -> None:
    """Checkpoint every decoder block and MTP layer of `model` under `policy` (names unchanged)."""
    policy = resolve_policy(policy)
    if policy == "none":
        return
    extra = {"context_fn": functools.partial(create_selective_checkpoint_contexts, _save_matmuls)} \
        if policy == "selective" else {}
    for block in list(model.model.layers.values()) + list(model.mtp.values()):
        fwd = block.forward
        block.forward = lambda *a, _f=fwd, **k: checkpoint(_f, *a, use_reentrant=False, **extra, **k)
