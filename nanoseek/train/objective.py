"""The pretraining objective of one micro-batch (DeepSeek-V3 report sections 2.1.2 and 2.2):
next-token cross entropy, the multi-token-prediction loss and the balance loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..balance import sequence_balance_loss


def token_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the targets that count (label -100 marks the others, e.g. prompt
    tokens in fine-tuning); 0 when none do. logits [B, T, V], y [B, T]."""
    flat = y.flatten()
    total = F.cross_entropy(logits.float().flatten(0, 1), flat, reduction="sum")
    return total / (flat != -100).sum().clamp(min=1)


def mtp_targets(y: torch.Tensor, k: int, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """Labels of MTP depth k (position i predicts y[i + k]); across a packed document boundary -100."""
    t = y[:, k:]
    if segment_ids is not None:
        t = t.masked_fill(segment_ids[:, k:] != segment_ids[:, :-k], -100)
    return t


class TrainLoss:
    """The loss of one micro-batch: next-token cross entropy + the MTP loss (report section 2.2,
    weight lambda over the depths) + the balance loss of the MoE layers in `moes` (sequence-wise
    in bias mode, section 2.1.2; the classic auxiliary loss in aux mode)."""

    def __init__(self, moes: dict, balance_alpha: float, mtp_lambda: float):
        self.moes, self.balance_alpha, self.mtp_lambda = moes, balance_alpha, mtp_lambda

    def __call__(self, forward_model, model, x, y, extra) -> tuple[torch.Tensor, ...]:
        """x, y [B, T] (+ packing kwargs) -> ce, mtp, balance, total (0-dim tensors)."""
        logits, hidden = forward_model(x, return_hidden=True, **extra)
        ce = token_cross_entropy(logits, y)
        mtp = torch.zeros((), device=x.device)
        if len(model.mtp) and self.mtp_lambda > 0:
            mtp_logits = model.mtp_forward(hidden, x, **extra)
            mtp = self.mtp_lambda / len(model.mtp) * sum(
                token_cross_entropy(lg, mtp_targets(y, k, extra.get("segment_ids")))
                for k, lg in enumerate(mtp_logits, start=1))
        bal = torch.zeros((), device=x.device)
        if self.balance_alpha > 0:
            bal = sum(sequence_balance_loss(m, x.shape[0], self.balance_alpha) for m in self.moes.values())
        return ce, mtp, bal, ce + mtp + bal
