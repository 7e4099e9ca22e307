"""`nanoseek train`: pretraining (DeepSeek-V3 report section 4) from the command line, every
TrainArgs field a flag (nanoseek/cli/args.py), so a new field needs no edit here."""

from __future__ import annotations

from ..train import TrainArgs, train
from ..train.args import TRAIN_HELP
from .args import add_options, options

# TrainArgs fields set by code rather than flags: time budgets and optimizer betas of benchmarks
# and recipes, ModelConfig overrides, and the fine-tuning commands' own settings
NOT_FLAGS = frozenset({"max_seconds", "beta1", "beta2", "overrides", "val_fraction", "eval_at_start"})
REQUIRED = ("data", "out")


def add_train_arguments(s, skip=NOT_FLAGS, required=REQUIRED, helps=None) -> None:
    """The run flags of `train`, shared by the fine-tuning commands built on the same loop."""
    add_options(s, TrainArgs, helps={**TRAIN_HELP, **(helps or {})}, skip=skip, required=required)


def cmd_train(args) -> int:
    train(options(TrainArgs, args))
    return 0


def add_train_command(sub) -> None:
    s = sub.add_parser("train", help="pretrain a DeepSeek-style model on text (torchrun for data parallel)")
    add_train_arguments(s)
    s.set_defaults(func=cmd_train)
