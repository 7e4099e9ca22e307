"""What every benchmark repeats: device sync, timing with warm-up (median of repeats), the measured
matmul and copy peaks beside the spec peak of nanoseek/perf.py, the one MFU/MBU definition, a
plain-text table, the environment a run records, the JSON line printed last, the model the
one-GPU speed benchmarks build, a throwaway tokenizer and the reader of a run's metrics.jsonl.

MFU follows PaLM (appendix B) as nanoseek/perf.py defines it: model FLOPs per second over the dense
bf16 spec peak, with the share of the matmul peak measured in the same run beside it. MBU divides
bytes read per second by the measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.model import MoE
from nanoseek.perf import mbu, measure_copy_bandwidth, measure_matmul_peak, mfu, spec_peak_flops
from nanoseek.tokenizer import Tokenizer, train_bpe

__all__ = ["bench_config", "build_model", "dtype_of", "environment", "fmt", "log", "mbu", "measured_peaks",
           "median_cuda_ms", "mfu", "mfu_pair", "pangram_tokenizer", "print_json", "read_metrics", "spec_peak_flops",
           "sync", "table", "timed"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def served(home: str, flags: list[str], threads: int):
    """`nanoseek serve` on a free loopback port over the store at `home`, its torch threads set;
    yields the base URL and stops the server on exit."""
    cmd = [sys.executable, "-m", "nanoseek", "serve", "--port", "0", "--quiet", *flags]
    env = dict(os.environ, NANOSEEK_HOME=home, OMP_NUM_THREADS=str(threads))
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        m = re.search(r"on (http://\S+?) ", line)
        if not m:
            raise SystemExit(f"the server did not start: {line!r}")
        yield m.group(1)
    finally:
        server.terminate()
        server.wait(30)


def log(*parts) -> None:
    print(*parts, flush=True)


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so host clocks time finished work."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, iters: int) -> list[float]:
    """`warmup` untimed calls of fn(), then the seconds of each of `iters` calls, each between two
    device syncs. Callers report the median (and min/max) of the list."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def median_cuda_ms(fn, iters: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of fn() on the current CUDA device, timed by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measured_peaks(device) -> tuple[float, float]:
    """(matmul FLOP/s, copy bytes/s) measured now on `device`: an 8192^3 bf16 matmul and a 2 GiB
    copy on a GPU; on CPU small fp32 sizes (a smoke test: the numbers mean nothing)."""
    if torch.device(device).type != "cuda":
        return (measure_matmul_peak(device, n=512, dtype=torch.float32, iters=3),
                measure_copy_bandwidth(device, nbytes=64 * 2**20, iters=3))
    return measure_matmul_peak(device), measure_copy_bandwidth(device)


def mfu_pair(tokens_per_s: float, flops_per_token: float, spec_flops: float, measured_flops: float) -> tuple[float, float]:
    """(MFU against the spec peak, share of the measured matmul peak): the two figures every
    training table prints side by side."""
    return mfu(tokens_per_s, flops_per_token, spec_flops), mfu(tokens_per_s, flops_per_token, measured_flops)


def fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def table(title: str, header: list, rows: list[list]) -> None:
    """Print `title`, then header and rows right-aligned in columns."""
    log(f"\n== {title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    log("  ".join(str(h).rjust(n) for h, n in zip(header, widths)))
    for r in rows:
        log("  ".join(str(x).rjust(n) for x, n in zip(r, widths)))


def git_commit() -> str | None:
    """The checkout's commit (with '+dirty' for uncommitted changes), None outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device=None) -> dict:
    """What a result needs to be read later: hardware, torch, Python, the commit and the date."""
    on_gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    hardware = torch.cuda.get_device_name(device) if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    return {"hardware": hardware, "torch": torch.__version__, "python": sys.version.split()[0],
            "commit": git_commit(), "date": time.strftime("%Y-%m-%d")}


def print_json(results: dict) -> None:
    """The final line of every benchmark: all its numbers as one JSON object."""
    print(json.dumps(results, default=float), flush=True)


# ------------------------------------------------------------------ the model the speed benchmarks build
def bench_config(quick: bool) -> ModelConfig:
    """`small`, or with `quick` the `nano` preset: tiny but the same structure (dense first layer,
    grouped routing, MTP)."""
    if quick:
        return ModelConfig.from_preset("nano", torch_dtype="bfloat16")
    return ModelConfig.from_preset("small")


def build_model(cfg: ModelConfig, device, dtype, experts_impl: str) -> DeepSeekV3:
    """nanoseek's DeepSeekV3 at seed 0 with every routed-experts module (MoE layers and MTP) on
    `experts_impl` ("segments" or "grouped_mm")."""
    model = DeepSeekV3.from_config(cfg, device=device, dtype=dtype, seed=0)
    for moe in model.moe_layers().values():
        moe.experts.impl = experts_impl
    for layer in model.mtp.values():
        if isinstance(layer.mlp, MoE):
            layer.mlp.experts.impl = experts_impl
    return model


def dtype_of(name: str) -> torch.dtype:
    return torch.bfloat16 if name == "bf16" else torch.float32


def pangram_tokenizer(vocab_size: int = 300) -> Tokenizer:
    """A byte-level BPE trained on one repeated sentence: enough for speed runs on random token ids,
    where the engine needs a tokenizer but no text is read."""
    return train_bpe(["the quick brown fox jumps over the lazy dog. " * 50], vocab_size)


def read_metrics(run_dir: str) -> list[dict]:
    """The records of a training run's metrics.jsonl (nanoseek.train writes one per step or eval)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
