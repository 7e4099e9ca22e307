"""Expert load balancing for DeepSeekMoE (DeepSeek-V3 report section 2.1.2; Wang et al.,
"Auxiliary-Loss-Free Load Balancing", arXiv 2408.15664).

- Auxiliary-loss-free: after each optimizer step, b_i += gamma * sign(mean load - load_i) for every
  routed expert i of every MoE layer, with the load counted over the whole global batch. The bias
  only chooses experts; gate weights never see it.
- Complementary sequence-wise balance loss: L = alpha * sum_i f_i P_i per sequence, with
  f_i = E / (K T) * #tokens of the sequence routed to i and P_i = mean_t s'_{i,t}, s' the scores
  normalized over experts. DeepSeek-V3 uses a tiny alpha (1e-4) next to the bias method; the classic
  auxiliary-loss method uses the same loss with a larger alpha and no bias updates.
- MaxVio = max_i load_i / mean load - 1, the balance metric of the loss-free paper.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .model import MoE


def moe_modules(model: nn.Module) -> dict[str, MoE]:
    """Every MoE layer, main model and MTP, keyed by its module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


def sequence_balance_loss(moe: MoE, batch: int, alpha: float) -> torch.Tensor:
    """alpha * mean over sequences of sum_i f_i P_i, from the router outputs of the last forward."""
    scores, indices = moe.router_scores, moe.router_indices  # [B*T, E], [B*T, K]
    N, E = scores.shape
    K = indices.shape[1]
    T = N // batch
    s = scores / scores.sum(dim=-1, keepdim=True)  # s' (identity for softmax routers)
    P = s.view(batch, T, E).mean(dim=1)  # [B, E]
    counts = torch.zeros(batch, E, device=scores.device, dtype=scores.dtype)
    counts.scatter_add_(1, indices.view(batch, T * K), torch.ones(batch, T * K, device=scores.device, dtype=scores.dtype))
    f = counts * E / (K * T)  # [B, E], no gradient
    return alpha * (f * P).sum(dim=-1).mean()


@torch.no_grad()
def update_bias(moe: MoE, load: torch.Tensor, gamma: float) -> None:
    """Sign rule: raise the bias of under-loaded experts, lower it for over-loaded ones."""
    bias = moe.gate.e_score_correction_bias
    if bias is None or gamma == 0:
        return
    load = load.float()
    bias += gamma * torch.sign(load.mean() - load)


def max_violation(load: torch.Tensor) -> float:
    load = load.float()
    mean = load.mean()
    return float(load.max() / mean - 1) if mean > 0 else 0.0
