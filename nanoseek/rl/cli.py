"""`nanoseek grpo --model DIR --task NAME ...`: GRPO from the command line, every GRPOArgs field a flag."""

from __future__ import annotations

import dataclasses

from .grpo import GRPOArgs, grpo

HELP = {
    "model": "checkpoint directory (with its tokenizer) to start from", "task": "countdown, arithmetic, gsm8k, math, "
    "svamp; options as name:key=value (e.g. countdown:n_numbers=3)", "task_data": "folder of a file task's data",
    "out": "run directory: metrics.jsonl, grpo.png, the final model", "max_seconds": "stop after this much loop time",
    "group_size": "completions per prompt (G)", "mu": "optimizer steps per rollout batch",
    "min_lr_ratio": "after the warm-up, cosine decay of the lr to lr x this at the end (1: constant)",
    "eps_high": "upper clip (default 0.28 for dapo, else --eps)", "beta": "k3 KL penalty weight to the start model",
    "loss": "grpo (sequence mean), dr_grpo (constant normalizer) or dapo (token mean)",
    "scale_rewards": "divide advantages by the group std (turn off for Dr. GRPO)",
    "reward": "strict (format and worked steps checked) or lenient (answer only)",
    "format_weight": "weight of the format reward added to the accuracy reward",
    "mask_truncated": "leave completions cut at --max-new-tokens out of the loss",
    "eval_every": "greedy held-out accuracy every N steps (0: never)",
    "save_every": "also write a resumable checkpoint every N steps (0: only the final model)",
    "resume": "continue from the newest checkpoint in --out (the same rollouts as an uninterrupted run; "
    "refused with --overlap, whose batch sampled ahead is not in the checkpoint)",
    "chat": "wrap prompts in the chat template",
    "overlap": "CPU, fp32, 2+ threads: sample the next step's rollouts during this step's update, half of the "
    "threads each (one step off-policy, corrected by the importance ratio)",
}


def add_grpo_command(sub) -> None:
    s = sub.add_parser("grpo", help="reinforcement learning with GRPO and a rule-based verifier")
    for f in dataclasses.fields(GRPOArgs):
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("json", "progress", "save"):
            continue
        if f.type in (bool, "bool"):
            s.add_argument(flag, action="store_true", default=None, help=HELP.get(f.name))
            s.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", help="the opposite")
            continue
        kind = {"int": int, "float": float, "float | None": float, "str | None": str, "str": str}[str(f.type)]
        s.add_argument(flag, type=kind, required=f.name == "model", default=None,
                       help=(HELP.get(f.name, "") + (f" (default {f.default})" if f.name != "model" else "")).strip())
    s.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    s.add_argument("--no-progress", dest="progress", action="store_false", default=True)
    s.add_argument("--no-save", dest="save", action="store_false", default=True)
    s.set_defaults(func=cmd_grpo)


def cmd_grpo(args) -> int:
    names = {f.name for f in dataclasses.fields(GRPOArgs)}
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    try:
        grpo(GRPOArgs(**kw))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"nanoseek grpo: {e}") from None
    return 0
