"""The parallel layout of a training run: W processes = pp pipeline ranks x dp data-parallel ranks,
of which groups of ep consecutive data-parallel ranks shard the routed experts (DeepSeek-V3 report
section 3.2: pipeline, expert and data parallelism), the data-parallel ones optionally fully
sharded (`fsdp`: over all of them, or over each pipeline stage's data-parallel ranks when pp > 1).
The combinations the wrappers cannot compose
yet are refused here, in one place (torchtitan's ParallelDims holds the same rules).

Ranks: rank = dp_rank * pp + pp_rank, so a pipeline is pp consecutive ranks; an EP group is ep
consecutive data-parallel ranks of one pipeline stage (dp_rank = replica * ep + ep_rank).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelDims:
    world: int = 1  # processes in the run
    pp: int = 1  # pipeline ranks
    ep: int = 1  # expert-parallel ranks, borrowed from the data-parallel ones
    fsdp: bool = False  # shard weights, gradients and optimizer states over the data-parallel ranks

    def __post_init__(self):
        if self.pp < 1 or self.world % self.pp:
            raise ValueError(f"--pp {self.pp} must divide the number of processes ({self.world})")
        if self.ep < 1 or self.dp % self.ep:
            raise ValueError(f"--ep {self.ep} must divide the data-parallel ranks ({self.dp})")

    @property
    def dp(self) -> int:
        """Data-parallel replicas (each holds a whole model, or a whole pipeline)."""
        return self.world // self.pp

    def dp_rank(self, rank: int) -> int:
        return rank // self.pp

    def check(self, *, compile: bool, activation_checkpointing: bool, fp8: bool, grad_accum: int,
              batch_size: int, schedule: str = "1f1b") -> None:
        """Refuse what does not compose yet, and a global batch that does not split evenly."""
        if self.pp > 1 and (compile or activation_checkpointing or fp8 or grad_accum != 1):
            raise ValueError("--pp > 1 does not combine with --compile, --activation-checkpointing, fp8 or --grad-accum yet")
        if self.fsdp and self.pp > 1 and schedule != "1f1b":
            raise ValueError(f"--fsdp does not combine with --pp under --schedule {schedule}: 1f1b only (DualPipe's "
                             f"mirrored stages and split backward are not FSDP units)")
        if self.fsdp and (compile or fp8):
            raise ValueError("--fsdp does not combine with --compile or fp8 yet")
        if self.ep > 1 and self.pp > 1 and (self.fsdp or schedule != "1f1b"):
            raise ValueError(f"--ep > 1 with --pp runs the 1f1b schedule without --fsdp only, not --schedule {schedule}"
                             f"{' with --fsdp' if self.fsdp else ''} (mirrored DualPipe stages would count their expert "
                             f"shards twice; the pipeline's FSDP units hold no EP shards)")
        if self.fsdp and self.pp > 1:
            raise ValueError("--fsdp does not combine with --pp yet: the stage-sharded 1f1b run can stall in a "
                             "point-to-point wait on 4 gloo processes (a known bug, not yet found)")
        if self.ep > 1 and (compile or activation_checkpointing or fp8):
            raise ValueError("--ep > 1 does not combine with --compile, --activation-checkpointing or fp8 yet")
        if batch_size % (grad_accum * self.dp):
            raise ValueError(f"--batch-size {batch_size} must be divisible by grad_accum x data-parallel ranks = "
                             f"{grad_accum * self.dp}")
