"""Async sharded saves (`--fsdp --async-save`, real torchrun processes on CPU over gloo): the run
trains like one process while its checkpoints are written in the background, each one renamed
into place only when every rank has written it, so resuming from one equals the uninterrupted run;
a run killed with SIGKILL while an async save is being written leaves the previous checkpoint
complete, and resuming from it gives the losses of the uninterrupted run.

Tolerances as in tests/test_fsdp.py: losses within 1e-4, the gradient norm within 1e-3 relative."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEPS = 8
FLAGS = ["train", "--preset", "nano", "--max-steps", str(STEPS), "--json", "--save-every", "4", "--keep-last", "3",
         "--batch-size", "4", "--seq-len", "32", "--vocab-size", "512", "--eval-batches", "2", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 shared cores: no oversubscription

# Runs `nanoseek` with the background write of the step-8 checkpoint stalled: each rank leaves a
# marker file once it has started that write, then never finishes it.
STALLED_WRITE = """
import os, sys, time
import nanoseek.parallel.sharded_checkpoint as sharded
real_write = sharded.write_sharded

def stalled_write(state, path, group):
    if "step-000008" in path:
        open(os.path.join(os.environ["STALL_MARKERS"], "rank" + os.environ.get("RANK", "0")), "w").close()
        time.sleep(3600)
    real_write(state, path, group)

sharded.write_sharded = stalled_write
from nanoseek.cli import main
sys.exit(main(sys.argv[1:]))
"""


def torchrun(n, port):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port", str(port)]


def run(n, args, port=None, timeout=300):
    """`nanoseek ARGS` on one process (n = 1) or under torchrun on n; -> its final JSON line."""
    cmd = [*(torchrun(n, port) if n > 1 else [sys.executable]), "-m", "nanoseek", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=ENV)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def metrics(run_dir):
    return {r["step"]: r for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if "loss" in r}


def assert_same_run(ref_dir, got_dir, steps):
    ref, got = metrics(ref_dir), metrics(got_dir)
    for s in steps:
        for key in ("loss", "mtp_loss", "balance_loss"):
            assert got[s][key] == pytest.approx(ref[s][key], abs=1e-4), (s, key)
        assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-3), s


@pytest.fixture(scope="module")
def async_runs(tmp_path_factory, text_file):
    """One process, and `--fsdp --async-save` on 2 processes: 8 steps, checkpoints every 4."""
    root = tmp_path_factory.mktemp("async_save")
    one = run(1, [*FLAGS, "--data", text_file, "--out", str(root / "one")])
    common = [*FLAGS, "--data", str(root / "one" / "data"), "--tokenizer", str(root / "one")]
    two = run(2, [*common, "--out", str(root / "async"), "--fsdp", "--async-save"], 29671)
    return root, common, one, two


def test_async_save_trains_and_resumes_like_one_process(async_runs):
    from nanoseek.train import list_checkpoints
    root, common, one, two = async_runs
    assert_same_run(root / "one", root / "async", range(1, STEPS + 1))
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-4)
    # both checkpoints renamed into place, no temp folder left behind
    assert [s for s, _ in list_checkpoints(str(root / "async"))] == [4, STEPS]
    assert not [n for n in os.listdir(root / "async" / "checkpoints") if n.startswith(".tmp")]
    ckpt = root / "async" / "checkpoints" / "step-000004"
    assert (ckpt / "dcp" / ".metadata").exists() and (ckpt / "model.safetensors").exists()
    # step 4's sharded state, written while steps 5-8 trained, is that of step 4
    run_dir = root / "async_to_1"
    shutil.copytree(root / "async", run_dir)
    shutil.rmtree(run_dir / "checkpoints" / f"step-{STEPS:06d}")
    os.unlink(run_dir / "final.json")
    out = run(1, [*common, "--out", str(run_dir), "--resume"])
    assert out["resumed_from_step"] == 4
    assert_same_run(root / "one", run_dir, range(5, STEPS + 1))


def kill_processes_running(script: str) -> None:
    """SIGKILL every process whose command line names `script` (Linux /proc), and wait until none is left."""
    deadline = time.time() + 30
    while time.time() < deadline:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if script.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                continue
        if not found:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def test_sigkill_during_async_save_leaves_the_previous_checkpoint(async_runs, tmp_path):
    from nanoseek.train import list_checkpoints, load_trainer_state
    root, common, _, _ = async_runs
    run_dir, markers = root / "killed", tmp_path / "markers"
    markers.mkdir()
    driver = tmp_path / "stalled_write.py"
    driver.write_text(STALLED_WRITE)
    with open(tmp_path / "log", "w") as log:
        p = subprocess.Popen([*torchrun(2, 29672), str(driver), *common, "--out", str(run_dir), "--fsdp",
                              "--async-save"], cwd=ROOT, env={**ENV, "STALL_MARKERS": str(markers)},
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 300
            while len(os.listdir(markers)) < 2:  # both ranks are writing step 8's shards
                assert p.poll() is None and time.time() < deadline, (tmp_path / "log").read_text()[-4000:]
                time.sleep(0.2)
        finally:
            os.killpg(p.pid, signal.SIGKILL)  # the launcher
            p.wait()
            kill_processes_running(str(driver))  # the ranks: the launcher starts each in its own session
    # step 8's checkpoint stays in its temp folder; step 4's is complete and loadable
    assert [s for s, _ in list_checkpoints(str(run_dir))] == [4]
    assert (run_dir / "checkpoints" / ".tmp-step-000008").is_dir()
    assert load_trainer_state(str(run_dir / "checkpoints" / "step-000004"))["step"] == 4
    out = run(2, [*common, "--out", str(run_dir), "--resume", "--fsdp", "--async-save"], 29673)
    assert out["resumed_from_step"] == 4
    assert_same_run(root / "one", run_dir, range(5, STEPS + 1))
    assert [s for s, _ in list_checkpoints(str(run_dir))] == [4, STEPS]


def test_async_save_needs_fsdp(tmp_path, text_file):
    from nanoseek.train import TrainArgs, train
    with pytest.raises(ValueError, match="--async-save"):
        train(TrainArgs(data=[text_file], out=str(tmp_path), max_steps=1, async_save=True, progress=False))
