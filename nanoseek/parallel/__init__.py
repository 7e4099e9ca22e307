"""Parallelism applied from outside an unchanged model: process groups and data parallelism
(more schedules join here: pipeline, expert parallel)."""

from .dist import DistInfo, barrier, init_distributed, is_main, all_reduce_sum
from .data_parallel import DataParallel

__all__ = ["DistInfo", "init_distributed", "barrier", "is_main", "all_reduce_sum", "DataParallel"]
