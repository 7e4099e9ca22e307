"""`nanoseek grpo --model DIR --task NAME ...`: GRPO (DeepSeekMath's group relative policy
optimization, as in the DeepSeek-R1 report section 2.2) from the command line, every GRPOArgs
field a flag."""

from __future__ import annotations

from ..rl import GRPOArgs, grpo
from ..rl.grpo import GRPO_HELP
from .args import add_options, options


def cmd_grpo(args) -> int:
    try:
        grpo(options(GRPOArgs, args))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"nanoseek grpo: {e}") from None
    return 0


def add_grpo_command(sub) -> None:
    s = sub.add_parser("grpo", help="reinforcement learning with GRPO and a rule-based verifier")
    add_options(s, GRPOArgs, helps=GRPO_HELP)
    s.set_defaults(func=cmd_grpo)
