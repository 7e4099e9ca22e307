"""Fully sharded data parallelism (`--fsdp`, FSDP2 on CPU over gloo, real torchrun processes):
fsdp 2 and fsdp 2 x ep 2 (and fsdp 2 with selective activation checkpointing) train step by step like one process, each rank holding its share of
the parameters; their sharded (DCP) checkpoints resume at another world size and layout (fsdp 2 ->
1 process, fsdp 2 x ep 2 -> 1 process, fsdp 2 -> fsdp 2 x ep 2) and a one-process checkpoint
resumes at fsdp 2, with the losses of the uninterrupted run; the model at the run's root is the
whole one, in the Hugging Face layout.

Tolerances: losses within 1e-4 (absolute). The gradient norm within 1e-3 relative: the gradients
are equal, but one process's fp32 norm of the head's [V, h] gradient is itself off by ~1e-4
relative, while the sharded run sums its squares in fp64."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEPS = 8
FLAGS = ["train", "--preset", "nano", "--max-steps", str(STEPS), "--json", "--save-every", "4", "--keep-last", "3",
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


def assert_same_run(ref_dir, got_dir, steps):
    ref, got = metrics(ref_dir), metrics(got_dir)
    for s in steps:
        for key in ("loss", "mtp_loss", "balance_loss"):
            assert got[s][key] == pytest.approx(ref[s][key], abs=1e-4), (s, key)
        assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-3), s


def cut_back(root, src, name):
    """Run `src` cut back to its step-4 checkpoint, as if killed after it."""
    run_dir = root / name
    shutil.copytree(root / src, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / f"step-{STEPS:06d}")
    os.unlink(run_dir / "final.json")
    return run_dir


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, text_file):
    """One process and `--fsdp` on 2 processes, 8 steps, checkpoints every 4 steps."""
    root = tmp_path_factory.mktemp("fsdp")
    one = run(1, [*FLAGS, "--data", text_file, "--out", str(root / "one")])
    # later runs reuse its tokenizer and token shards
    common = [*FLAGS, "--data", str(root / "one" / "data"), "--tokenizer", str(root / "one")]
    two = run(2, [*common, "--out", str(root / "fsdp2"), "--fsdp"], 29661)
    return root, common, one, two


def shard_share(model, ranks: int, rank: int = 0) -> int:
    """Elements of `model` that rank `rank` holds when every tensor is split along dim 0 into
    `ranks` chunks (torch.chunk)."""
    total = 0
    for p in model.parameters():
        chunks = torch.chunk(torch.empty(p.shape[0], device="meta"), ranks)
        total += (chunks[rank].numel() if rank < len(chunks) else 0) * (p.numel() // p.shape[0])
    return total


def test_fsdp2_equals_one_process(fsdp_runs):
    from nanoseek import DeepSeekV3
    root, _, one, two = fsdp_runs
    assert sorted(metrics(root / "fsdp2")) == list(range(1, STEPS + 1))
    assert_same_run(root / "one", root / "fsdp2", range(1, STEPS + 1))
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-4)
    whole = DeepSeekV3.from_pretrained(str(root / "one"))
    assert two["world_size"] == 2 and two["params_total"] == one["params_total"]
    assert two["params_local"] == shard_share(whole, 2) and math.isclose(two["params_local"], one["params_total"] / 2,
                                                                         rel_tol=0.01)
    # the memory accounting (nanoseek/parallel/memory.py) counts what rank 0 holds
    from nanoseek.parallel.memory import train_memory
    assert one["weights_bytes_local"] == train_memory(whole.config).weights
    assert two["weights_bytes_local"] == 4 * two["params_local"] and two["optimizer_bytes_local"] == 8 * two["params_local"]
    assert two["weights_bytes_local"] == pytest.approx(train_memory(whole.config, dp=2, fsdp=True).weights, rel=0.01)
    # the model at the run's root is the whole one, in the Hugging Face layout (as `chat` / `serve` load it)
    m1, m2 = whole.state_dict(), DeepSeekV3.from_pretrained(str(root / "fsdp2")).state_dict()
    assert m1.keys() == m2.keys()
    for k in m1:
        assert m2[k].shape == m1[k].shape, k
        assert float((m2[k] - m1[k]).norm() / m1[k].norm().clamp(min=1e-12)) < 1e-4, k
    # its checkpoints hold the sharded state in dcp/, the optimizer nowhere else
    ckpt = root / "fsdp2" / "checkpoints" / "step-000004"
    assert (ckpt / "dcp" / ".metadata").exists() and (ckpt / "model.safetensors").exists()
    assert torch.load(ckpt / "trainer.pt", weights_only=True)["optimizer"] is None
    assert not (root / "fsdp2" / "dcp").exists()  # the exported model is the Hugging Face files only


def test_fsdp2_checkpoint_resumes_on_one_process(fsdp_runs):
    root, common, _, _ = fsdp_runs
    run_dir = cut_back(root, "fsdp2", "fsdp2_to_1")
    out = run(1, [*common, "--out", str(run_dir), "--resume"])
    assert out["resumed_from_step"] == 4 and out["world_size"] == 1 and out["params_local"] == out["params_total"]
    assert_same_run(root / "one", run_dir, range(5, STEPS + 1))


def test_one_process_checkpoint_resumes_at_fsdp2(fsdp_runs):
    root, common, _, _ = fsdp_runs
    run_dir = cut_back(root, "one", "one_to_fsdp2")
    out = run(2, [*common, "--out", str(run_dir), "--resume", "--fsdp"], 29662)
    assert out["resumed_from_step"] == 4 and out["world_size"] == 2 and out["params_local"] < out["params_total"]
    assert_same_run(root / "one", run_dir, range(5, STEPS + 1))


def test_fsdp2_with_selective_activation_checkpointing(fsdp_runs):
    """The recomputation inside FSDP units (weights gathered again for the backward) changes nothing."""
    root, common, _, two = fsdp_runs
    out = run(2, [*common, "--out", str(root / "fsdp2_ac"), "--fsdp", "--ac-policy", "selective", "--no-save"], 29666)
    assert_same_run(root / "one", root / "fsdp2_ac", range(1, STEPS + 1))
    assert out["val_loss"] == pytest.approx(two["val_loss"], abs=1e-6)


@pytest.fixture(scope="module")
def fsdp_ep_run(fsdp_runs):
    root, common, _, _ = fsdp_runs
    return run(4, [*common, "--out", str(root / "fsdp2_ep2"), "--fsdp", "--ep", "2"], 29663)


def test_fsdp2_ep2_equals_one_process(fsdp_runs, fsdp_ep_run):
    """4 processes: experts EP-sharded over pairs of ranks, each EP shard FSDP-sharded over the 2
    ranks that hold it; everything else FSDP-sharded over all 4."""
    from nanoseek import DeepSeekV3
    root, _, one, _ = fsdp_runs
    assert_same_run(root / "one", root / "fsdp2_ep2", range(1, STEPS + 1))
    assert fsdp_ep_run["world_size"] == 4 and fsdp_ep_run["ep"] == 2
    whole = DeepSeekV3.from_pretrained(str(root / "one"))
    assert fsdp_ep_run["params_local"] == shard_share(whole, 4)  # experts: half by EP, then half by FSDP
    from nanoseek.parallel.memory import train_memory
    counted = train_memory(whole.config, dp=4, fsdp=True, ep=2)
    assert fsdp_ep_run["optimizer_bytes_local"] == pytest.approx(counted.optimizer, rel=0.01)
    m1, m2 = whole.state_dict(), DeepSeekV3.from_pretrained(str(root / "fsdp2_ep2")).state_dict()
    for k in m1:  # the experts gathered whole
        assert m2[k].shape == m1[k].shape, k
        assert float((m2[k] - m1[k]).norm() / m1[k].norm().clamp(min=1e-12)) < 1e-4, k


def test_fsdp2_ep2_checkpoint_resumes_on_one_process(fsdp_runs, fsdp_ep_run):
    root, common, _, _ = fsdp_runs
    run_dir = cut_back(root, "fsdp2_ep2", "fsdp2_ep2_to_1")
    out = run(1, [*common, "--out", str(run_dir), "--resume"])
    assert out["resumed_from_step"] == 4 and out["ep"] == 1
    assert_same_run(root / "one", run_dir, range(5, STEPS + 1))


@pytest.mark.slow
def test_fsdp2_checkpoint_resumes_at_fsdp2_ep2(fsdp_runs):
    root, common, _, _ = fsdp_runs
    run_dir = cut_back(root, "fsdp2", "fsdp2_to_ep2")
    out = run(4, [*common, "--out", str(run_dir), "--resume", "--fsdp", "--ep", "2"], 29664)
    assert out["resumed_from_step"] == 4 and out["world_size"] == 4
    assert_same_run(root / "one", run_dir, range(5, STEPS + 1))


def test_fsdp_refusals(fsdp_runs, tmp_path):
    from nanoseek.parallel import ParallelDims
    with pytest.raises(ValueError, match="--fsdp does not combine with --pp"):
        ParallelDims(world=4, pp=2, fsdp=True).check(compile=False, activation_checkpointing=False, fp8=False,
                                                     grad_accum=1, batch_size=4, schedule="dualpipe")
    root, common, _, _ = fsdp_runs
    run_dir = cut_back(root, "fsdp2", "fsdp2_to_ep")  # a sharded checkpoint cannot resume under plain --ep
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        "29665", "-m", "nanoseek", *common, "--out", str(run_dir), "--resume", "--ep", "2"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0 and "a sharded checkpoint" in p.stdout + p.stderr
