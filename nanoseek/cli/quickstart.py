"""`nanoseek quickstart`: the DeepSeek-R1 story on a laptop CPU (pretraining, then GRPO with a
rule-based verifier, and the supervised control; nanoseek/recipes/quickstart.py), its options
declared once in QuickstartOptions."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..recipes.quickstart import SMOKE, SMOKE_EVAL_PROBLEMS, Recipe, check_layout, quickstart, report
from .args import add_options

FULL_EVAL_PROBLEMS = 500


@dataclass
class QuickstartOptions:
    out: str | None = field(default=None, metadata={
        "help": "run folder (default runs/quickstart, with --smoke runs/quickstart-smoke)"})
    smoke: bool = field(default=False, metadata={
        "help": "every stage for a few steps (about a minute): checks the install end to end, its accuracies "
                "mean nothing"})
    pretrain_steps: int | None = field(default=None, metadata={"help": f"default {Recipe.pretrain_steps}"})
    rl_steps: int | None = field(default=None, metadata={"help": f"default {Recipe.rl_steps}"})
    control: bool = field(default=True, metadata={
        "help": "run the control (more supervised training for the same time; --no-control skips it)"})
    alongside: bool | None = field(default=None, metadata={
        "flags": ("--control-alongside", "--control-after"),
        "help": "run the control next to GRPO on half of the CPU threads each (the default on a CPU), or after "
                "GRPO, each on all threads (the default on a GPU)"})
    overlap: bool | None = field(default=None, metadata={
        "help": "sample each GRPO step's rollouts during the previous update, half of the CPU threads each (one "
                "step off-policy; the control then runs after GRPO)"})
    eval_problems: int | None = field(default=None, metadata={
        "help": f"held-out problems (default {FULL_EVAL_PROBLEMS}, with --smoke {SMOKE_EVAL_PROBLEMS})"})
    seed: int = 0
    name: str | None = field(default=None, metadata={
        "help": "name in the local model store (default quickstart, with --smoke quickstart-smoke)"})
    register: bool = field(default=True, metadata={"help": "add the model to the store"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    json: bool = field(default=False, metadata={"help": "also print the results as one JSON line (runs the control)"})


def cmd_quickstart(args) -> int:
    given = {k: getattr(args, k) for k in ("pretrain_steps", "rl_steps", "overlap") if getattr(args, k) is not None}
    rc = Recipe(**{**(SMOKE if args.smoke else {}), **given})
    eval_problems = args.eval_problems or (SMOKE_EVAL_PROBLEMS if args.smoke else FULL_EVAL_PROBLEMS)
    out = args.out or ("runs/quickstart-smoke" if args.smoke else "runs/quickstart")
    name = args.name or ("quickstart-smoke" if args.smoke else "quickstart")
    control = args.control or args.json
    try:
        check_layout(rc, control, args.alongside)
    except ValueError as e:
        raise SystemExit(f"nanoseek {e}") from None
    r = quickstart(out=out, recipe=rc, control=control, eval_problems=eval_problems, seed=args.seed,
                   name=name, register=args.register, progress=args.progress, alongside=args.alongside)
    print(report(r), flush=True)
    if args.json:
        print(json.dumps(r), flush=True)
    return 0


def add_quickstart_command(sub) -> None:
    s = sub.add_parser("quickstart", help="pretrain a nano DeepSeek-V3 on Countdown, then GRPO; ~5 min on 2 CPU cores")
    add_options(s, QuickstartOptions)
    s.set_defaults(func=cmd_quickstart)
