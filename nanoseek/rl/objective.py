"""The GRPO objective (DeepSeekMath eq. 3-4) and its variants, as plain tensor functions.

- Advantages: each completion's reward against its group, A_i = (r_i - mean(r)) / (std(r) + eps)
  (unbiased std), or r_i - mean(r) for Dr. GRPO. Groups whose rewards are all equal carry no
  signal; they are reported and left out of the loss.
- Per token: the clipped ratio surrogate min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) with
  rho = pi / pi_old, minus beta times the k3 KL estimate to a frozen reference,
  exp(ref - logp) - (ref - logp) - 1.
- Aggregation, as token weights that sum the per-token losses into one scalar (so micro-batches
  add up to exactly the full-batch loss):
    grpo     1 / (n_seq * |o_i|)      mean over each completion's tokens, then over completions
    dr_grpo  1 / (n_seq * max_len)    a constant normalizer (no length bias)
    dapo     1 / sum_i |o_i|          every token of the batch weighs the same
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards [P, G] -> advantages [P, G], informative [P] (False where every reward is equal)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"group_advantages: rewards must be [prompts, G >= 2], got {tuple(rewards.shape)}")
    r = rewards.double()
    centered = r - r.mean(dim=1, keepdim=True)
    adv = centered / (r.std(dim=1, keepdim=True) + eps) if scale else centered
    informative = (rewards != rewards[:, :1]).any(dim=1)
    return adv.to(rewards.dtype), informative


def token_weights(mask: torch.Tensor, loss_type: str, max_len: int | None = None) -> torch.Tensor:
    """mask [N, T] (1 on completion tokens that count) -> weights [N, T] for the loss sum.
    Rows with no counted token get weight 0 and do not count as sequences."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    mask = mask.float()
    lengths = mask.sum(dim=1)  # [N]
    n_seq = (lengths > 0).sum().clamp(min=1)
    if loss_type == "grpo":
        return mask / (lengths.clamp(min=1)[:, None] * n_seq)
    if loss_type == "dr_grpo":
        return mask / (n_seq * (max_len or mask.shape[1]))
    return mask / mask.sum().clamp(min=1)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor,
                eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0,
                ref_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """logp/old_logp/ref_logp/weights [N, T], advantages [N] -> (loss, stats).

    stats: clip_fraction (weighted share of tokens whose update the clip removed) and kl (weighted
    mean k3 estimate, when beta > 0 or a reference is given)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None].to(logp.dtype)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    w = weights.to(logp.dtype)
    total_w = w.sum().clamp(min=1e-12)
    stats = {"clip_fraction": float(((clipped < unclipped).float() * w).sum() / total_w)}
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        stats["kl"] = float((kl.detach() * w).sum() / total_w)
        if beta:
            per_token = per_token + beta * kl
    return (per_token * w).sum(), stats
