"""The settings of a training run (`nanoseek train`'s flags; fine-tuning fills the same), with the
per-preset defaults that any flag overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

# Default recipes per preset (any flag overrides them).
RECIPES = {
    "nano": dict(batch_size=16, seq_len=256, lr=3e-3, warmup_steps=10, eval_every=50, eval_batches=8),
    "small": dict(batch_size=32, seq_len=2048, lr=6e-4, warmup_steps=200, eval_every=250, eval_batches=16),
}
DEFAULT_RECIPE = dict(batch_size=16, seq_len=1024, lr=3e-4, warmup_steps=100, eval_every=250, eval_batches=16)


@dataclass
class TrainArgs:
    data: list[str] = field(default_factory=list)
    out: str = "runs/nano"
    preset: str = "nano"
    model: str | None = None  # start from a checkpoint directory instead of a preset
    tokenizer: str | None = None  # a directory with tokenizer.json; default: train one on the data
    max_steps: int = 100
    max_seconds: float | None = None  # also stop (and finish the schedule) when the loop has run this long
    batch_size: int | None = None  # global, in sequences per optimizer step
    seq_len: int | None = None
    grad_accum: int = 1
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16", "fp8"] | None = None  # fp32 | bf16 | fp8 (default: bf16 on GPU, fp32 on CPU)
    fp8_kernels: Literal["off", "auto", "triton", "torch"] = "auto"  # fp8 quantizers: auto (fused Triton on CUDA) | off (per-op PyTorch) | triton | torch (nanoseek.quant.fp8.FP8Config)
    fp8_grouped: Literal["auto", "loop", "triton"] = "auto"  # fp8 routed-expert GEMMs: auto (grouped Triton when the Triton kernels run, else loop) | triton | loop
    device: str | None = None
    compile: bool = False
    activation_checkpointing: bool = False
    ac_policy: Literal["none", "full", "selective"] | None = None  # default: full with activation_checkpointing, else none
    balance: Literal["bias", "aux", "none"] = "bias"  # bias (auxiliary-loss-free) | aux (classic auxiliary loss) | none
    bias_update_speed: float = 1e-3  # gamma
    bias_freeze_step: int | None = None  # gamma -> 0 from this step on
    seq_aux_alpha: float = 1e-4  # complementary sequence-wise loss (bias mode)
    aux_alpha: float = 1e-3  # classic auxiliary loss weight (aux mode; the loss-free paper's baseline)
    mtp_lambda: float = 0.3
    mtp_depth: int | None = None  # override the preset's MTP depth (0 disables)
    overrides: dict | None = None  # ModelConfig fields to change on the preset (e.g. for ablations)
    eval_every: int | None = None
    eval_batches: int | None = None
    save_every: int | None = None
    keep_last: int = 2
    save: bool = True  # benchmarks may skip checkpoints; a normal run always saves at the last step
    seed: int = 0
    resume: bool = False
    pp: int = 1  # pipeline ranks (world = pp x data-parallel ranks)
    schedule: Literal["1f1b", "dualpipe", "dualpipev"] = "1f1b"  # 1f1b | dualpipe | dualpipev
    chunks: int | None = None  # micro-batches per step and replica (default: the schedule's smallest valid)
    ep: int = 1  # expert-parallel ranks, borrowed from the data-parallel ones (--ep divides them)
    fsdp: bool = False  # FSDP2: shard weights, gradients and optimizer states over the data-parallel ranks
    fsdp_reshard_after_forward: bool = True  # free each unit's gathered weights after its forward (ZeRO-3)
    async_save: bool = False  # write the sharded checkpoints (--fsdp) in the background while training goes on
    cpu_offload: bool = False  # FSDP2 CPU offload: sharded parameters, gradients and AdamW states in host memory
    json: bool = False
    progress: bool = True
    val_fraction: float = 0.05
    eval_at_start: bool = False  # also measure validation loss before the first step (fine-tuning)
    vocab_size: int | None = None  # tokenizer size to train (default: the preset's vocab)

    def resolved(self) -> "TrainArgs":
        recipe = RECIPES.get(self.preset, DEFAULT_RECIPE)
        changes = {k: v for k, v in recipe.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **changes)


# `nanoseek train`'s help for each field (nanoseek/cli/args.py shows the defaults beside it)
TRAIN_HELP = {
    "data": "text files, folders or .jsonl (field 'text')",
    "out": "run directory: checkpoints, metrics.jsonl, plots, final model",
    "preset": "model preset (nanoseek info PRESET shows its size)",
    "model": "start from this checkpoint directory instead of a preset",
    "tokenizer": "directory with a tokenizer.json (default: train one on --data)",
    "vocab_size": "size of the tokenizer to train (default: the preset's)",
    "max_steps": "optimizer steps",
    "batch_size": "global batch in sequences (default: the preset's recipe)",
    "seq_len": "tokens per sequence (default: the preset's recipe)",
    "grad_accum": "micro-batches accumulated per optimizer step",
    "lr": "peak learning rate (default: the preset's recipe)",
    "warmup_steps": "linear warm-up steps (default: the preset's recipe)",
    "min_lr_ratio": "cosine decay of the lr to lr x this at the end",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "clip the gradient norm to this",
    "precision": "fp32, bf16 or fp8 (default: bf16 on GPU, fp32 on CPU)",
    "fp8_kernels": "FP8 quantizers: auto (fused Triton kernels on CUDA, per-op PyTorch elsewhere), off (per-op "
                   "PyTorch), triton (fused, required), torch (the fused layouts in PyTorch)",
    "fp8_grouped": "routed experts' FP8 GEMMs: auto (one Triton launch for all experts when the fused Triton "
                   "kernels run, else one GEMM per expert), triton (required) or loop",
    "device": "cpu or cuda (default: cuda when available)",
    "compile": "torch.compile the model",
    "activation_checkpointing": "recompute each block's activations in the backward pass",
    "ac_policy": "activation checkpointing: full (recompute each block), selective (keep matmul and attention "
                 "outputs, recompute the rest) or none (default: full with --activation-checkpointing, else none)",
    "balance": "bias: auxiliary-loss-free, aux: the classic auxiliary loss, none",
    "bias_update_speed": "gamma of the bias update",
    "bias_freeze_step": "stop bias updates from this step on",
    "seq_aux_alpha": "complementary sequence-wise loss weight (bias mode)",
    "aux_alpha": "auxiliary loss weight (aux mode)",
    "mtp_lambda": "MTP loss weight",
    "mtp_depth": "MTP modules (default: the preset's; 0 disables)",
    "eval_every": "validation loss every N steps (default: the preset's recipe)",
    "eval_batches": "validation batches per evaluation (default: the preset's recipe)",
    "save_every": "checkpoint every N steps (default: only at the end)",
    "keep_last": "checkpoints kept",
    "save": "write checkpoints (--no-save: none, for benchmarks)",
    "seed": "seed of the initialization and of the data order",
    "resume": "continue from the newest complete checkpoint",
    "pp": "pipeline ranks (under torchrun; the rest are data-parallel)",
    "schedule": "pipeline schedule",
    "chunks": "micro-batches per step (default: the schedule's smallest valid)",
    "ep": "expert-parallel ranks (under torchrun; borrowed from the data-parallel ranks, must divide them): "
          "each holds 1/ep of every MoE layer's routed experts",
    "fsdp": "shard weights, gradients and optimizer states over the data-parallel ranks (FSDP2; with --ep the "
            "experts are EP-sharded, then FSDP-sharded over the rest)",
    "fsdp_reshard_after_forward": "free each block's gathered weights after its forward (off: keep them for the "
                                  "backward, more memory, less communication)",
    "async_save": "with --fsdp: write each sharded checkpoint in the background while training goes on; it "
                  "appears in checkpoints/ once every rank has finished writing it",
    "cpu_offload": "with --fsdp: keep the sharded parameters, gradients and AdamW states in host memory (the "
                   "optimizer step runs on the CPU; each block is copied to the GPU for its all-gather)",
    "json": "print the summary as one JSON line",
    "progress": "show a progress bar",
    "val_fraction": "share of examples held out for validation",
}
