"""FSDP2 CPU offload (`--fsdp --cpu-offload`, CPUOffloadPolicy: sharded parameters, gradients and
AdamW states in host memory, the optimizer step on the CPU) on 2 CPU processes over gloo, real
torchrun processes. On CPU the offload moves nothing, so the run must give exactly the numbers of
the same run without it; its sharded checkpoint resumes with the numbers of the uninterrupted
run. Flags that cannot offload are refused."""

import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEPS = 4
FLAGS = ["train", "--preset", "nano", "--max-steps", str(STEPS), "--json", "--save-every", "2", "--keep-last", "3",
         "--batch-size", "4", "--seq-len", "32", "--vocab-size", "512", "--eval-batches", "2", "--no-progress"]


def run(n, args, port=None, timeout=300):
    """`nanoseek ARGS` on one process (n = 1) or under torchrun on n; -> its final JSON line."""
    cmd = [sys.executable, "-m", "nanoseek", *args]
    if n > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port", str(port),
               "-m", "nanoseek", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})  # 2 shared cores: no oversubscription
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def metrics(run_dir):
    return {r["step"]: r for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if "loss" in r}


@pytest.fixture(scope="module")
def offload_runs(tmp_path_factory, text_file):
    """--fsdp on 2 processes, with and without --cpu-offload, checkpoints every 2 steps."""
    root = tmp_path_factory.mktemp("cpu_offload")
    plain = run(2, [*FLAGS, "--data", text_file, "--out", str(root / "fsdp2"), "--fsdp"], 29791)
    common = [*FLAGS, "--data", str(root / "fsdp2" / "data"), "--tokenizer", str(root / "fsdp2")]
    offloaded = run(2, [*common, "--out", str(root / "offload"), "--fsdp", "--cpu-offload"], 29792)
    return root, common, plain, offloaded


def test_cpu_offload_gives_the_same_run(offload_runs):
    root, _, plain, offloaded = offload_runs
    ref, got = metrics(root / "fsdp2"), metrics(root / "offload")
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in got:
        for key in ("loss", "mtp_loss", "balance_loss", "grad_norm", "maxvio"):
            assert got[s][key] == ref[s][key], (s, key)
    assert offloaded["val_loss"] == plain["val_loss"]
    assert offloaded["params_local"] == plain["params_local"] < plain["params_total"]
    assert offloaded["optimizer_bytes_local"] == plain["optimizer_bytes_local"]


def test_cpu_offload_checkpoint_resumes(offload_runs):
    root, common, _, _ = offload_runs
    run_dir = root / "offload_resumed"
    shutil.copytree(root / "offload", run_dir)
    shutil.rmtree(run_dir / "checkpoints" / f"step-{STEPS:06d}")
    os.unlink(run_dir / "final.json")
    out = run(2, [*common, "--out", str(run_dir), "--fsdp", "--cpu-offload", "--resume"], 29793)
    assert out["resumed_from_step"] == 2
    ref, got = metrics(root / "offload"), metrics(run_dir)
    for s in range(3, STEPS + 1):
        for key in ("loss", "mtp_loss", "balance_loss", "grad_norm"):
            assert got[s][key] == pytest.approx(ref[s][key], abs=1e-6), (s, key)


def test_cpu_offload_needs_fsdp(tmp_path, text_file):
    from nanoseek.train import TrainArgs, train
    with pytest.raises(ValueError, match="--cpu-offload"):
        train(TrainArgs(data=[text_file], out=str(tmp_path), max_steps=1, cpu_offload=True, progress=False))
