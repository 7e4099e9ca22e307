"""Reinforcement learning from rule-based rewards: GRPO (DeepSeekMath section 4.1, DeepSeek-R1
section 2.2) with the Dr. GRPO and DAPO loss variants."""

from .grpo import GRPOArgs, GRPOTrainer, grpo
from .objective import group_advantages, policy_loss, token_weights

__all__ = ["GRPOArgs", "GRPOTrainer", "grpo", "group_advantages", "policy_loss", "token_weights"]
