"""`nanoseek sft` (supervised fine-tuning, DeepSeek-V3 report section 5.1) and `nanoseek distill`
(a teacher's verified reasoning traces -> SFT of a student, DeepSeek-R1 report section 2.4): the
run flags are `nanoseek train`'s, the fine-tuning ones SFTOptions' fields, distill's own DistillOptions'."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..checkpoint import CheckpointError
from ..data import DataError
from ..finetune.distill import distill
from ..finetune.sft import SFTOptions, run_sft
from ..infer.store import resolve_model_dir
from ..tokenizer import TokenizerError
from ..train import TrainArgs
from .args import add_options, options
from .train import NOT_FLAGS, REQUIRED, add_train_arguments

FINETUNE_NOT_FLAGS = NOT_FLAGS - {"val_fraction"}  # the held-out share of the examples is a flag here
ERRORS = (DataError, TokenizerError, CheckpointError, ValueError)


@dataclass
class DistillOptions:
    """`distill`'s own flags, before the run flags (TrainArgs') and the fine-tuning ones (SFTOptions')."""
    teacher: str = field(metadata={"help": "checkpoint directory (or store name) of the teacher"})
    student: str = field(metadata={"help": "checkpoint directory (or store name) of the student"})
    prompts: str = field(metadata={"help": ".jsonl/.json prompt records (optional 'answer') or .txt lines"})
    verifier: str = field(default="auto", metadata={
        "help": "auto (number or exact when prompts carry answers), exact, number, contains, "
                "task:NAME (a nanoseek task's checker: gsm8k, math, svamp, countdown, arithmetic), "
                "none, or module:function(completion, answer) -> bool (imported and run on the teacher's "
                "output: name only code you trust)"})
    samples: int = field(default=1, metadata={"help": "teacher completions per prompt (rejection sampling)"})
    max_new_tokens: int = 256
    temperature: float | None = field(default=None, metadata={
        "help": "teacher sampling temperature (default 0, or 0.7 with --samples > 1)"})
    top_p: float = 1.0
    think: bool = field(default=False, metadata={
        "flags": ("--think",), "help": "open the teacher's reply inside <think> (R1 style)"})


def sft_options(args) -> SFTOptions:
    return options(SFTOptions, args)


def train_args(args) -> TrainArgs:
    return options(TrainArgs, args)


def fail(command: str, e: Exception) -> SystemExit:
    return SystemExit(f"nanoseek {command}: {e}")


def cmd_sft(args) -> int:
    if not args.model:
        raise SystemExit("nanoseek sft: --model DIR (or a model name in the store) is required")
    args.model = resolve_model_dir(args.model)
    try:
        run_sft(train_args(args), sft_options(args))
    except ERRORS as e:
        raise fail("sft", e) from None
    return 0


def add_sft_command(sub) -> None:
    s = sub.add_parser("sft", help="supervised fine-tuning (full or LoRA) on chat / instruction data")
    add_train_arguments(s, skip=FINETUNE_NOT_FLAGS)
    add_options(s, SFTOptions)
    s.set_defaults(func=cmd_sft)


def cmd_distill(args) -> int:
    for flag, value in (("--data", args.data), ("--model", args.model)):
        if value:  # distill sets both itself: say so rather than drop the user's value
            raise SystemExit(f"nanoseek distill: {flag} is not taken here (the data are the teacher's kept "
                             f"completions, the model is --student)")
    teacher, student = resolve_model_dir(args.teacher), resolve_model_dir(args.student)
    try:
        summary = distill(teacher, student, args.prompts, args.out, train_args(args), sft_options(args),
                          args.verifier, args.samples, args.max_new_tokens, args.temperature, args.top_p,
                          args.think, args.device)
    except ERRORS as e:
        raise fail("distill", e) from None
    if args.json:
        print(json.dumps(summary), flush=True)
    return 0


def add_distill_command(sub) -> None:
    s = sub.add_parser("distill", help="teacher completions (verified) -> supervised fine-tuning of a student")
    add_options(s, DistillOptions)
    # the data are the teacher's completions and the model is the student: refused if given
    refused = "(refused: set by distill)"
    add_train_arguments(s, skip=FINETUNE_NOT_FLAGS, required=tuple(r for r in REQUIRED if r != "data"),
                        helps={"data": refused, "model": refused})
    add_options(s, SFTOptions)
    s.set_defaults(func=cmd_distill)
