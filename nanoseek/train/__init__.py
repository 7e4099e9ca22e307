"""Training: the one loop (loop.py) over a model laid out by nanoseek.parallel, its checked settings
(settings.py), and the parts it shares with fine-tuning and GRPO: checkpoints (checkpointing.py),
metrics and plots (metrics.py), learning-rate schedules (schedule.py), the pretraining objective
(objective.py)."""

from .args import DEFAULT_RECIPE, RECIPES, TrainArgs
from .checkpointing import (CKPT_RE, CheckpointWriter, checkpoint_tmp_dir, list_checkpoints, load_trainer_state, resume_point,
                            save_checkpoint, save_parallel_checkpoint)
from .loop import lr_at, train
from .metrics import MetricsLog, plot_grpo, plot_run, say
from .objective import TrainLoss, mtp_targets, token_cross_entropy
from .schedule import cosine_factor, grpo_lr, pretrain_lr

__all__ = ["DEFAULT_RECIPE", "RECIPES", "TrainArgs", "CKPT_RE", "CheckpointWriter", "checkpoint_tmp_dir", "list_checkpoints",
           "load_trainer_state", "resume_point", "save_checkpoint", "save_parallel_checkpoint", "lr_at", "train",
           "MetricsLog", "plot_grpo", "plot_run", "say", "TrainLoss", "mtp_targets", "token_cross_entropy",
           "cosine_factor", "grpo_lr", "pretrain_lr"]
