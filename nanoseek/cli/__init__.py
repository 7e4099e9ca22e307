"""The `nanoseek` command: `main()` and the table of its subcommands, one module per family
(train, finetune, grpo, serve, store, chat, info, quickstart, eval, demo); the flags of a settings
dataclass are generated from its fields (args.py). Nothing in the library imports this package."""

from __future__ import annotations

import argparse

from .chat import add_chat_command, add_generate_command
from .demo import add_demo_command
from .eval import add_eval_command
from .finetune import add_distill_command, add_sft_command
from .grpo import add_grpo_command
from .info import add_info_command, add_pipeline_sim_command
from .quickstart import add_quickstart_command
from .serve import add_serve_command
from .store import add_export_command, add_store_commands
from .train import add_train_command

DESCRIPTION = ("The `nanoseek` command. Subcommands that measure or report accept `--json` and then print one "
               "JSON object as the last line of their output.")

# each adds its subcommands, in the order `nanoseek --help` lists them
SUBCOMMANDS = (
    add_info_command,          # info
    add_train_command,         # train
    add_sft_command,           # sft
    add_distill_command,       # distill
    add_generate_command,      # generate
    add_chat_command,          # chat
    add_pipeline_sim_command,  # pipeline-sim
    add_store_commands,        # list (ls), show, rm, create
    add_export_command,        # export
    add_serve_command,         # serve
    add_grpo_command,          # grpo
    add_quickstart_command,    # quickstart
    add_eval_command,          # eval
    add_demo_command,          # demo
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoseek", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
