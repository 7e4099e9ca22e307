"""Pipeline parallelism composed with the other layouts, on 4 CPU processes over gloo (real torchrun
processes), against one process on the same global batch:

- pp 2 x fsdp 2 (`--pp 2 --fsdp`): a 2-D mesh (dp_shard 2, pp 2), each 1F1B stage fully sharded over
  its two data-parallel ranks. It trains step by step like one process, each rank holding half a
  stage; its checkpoint (the whole model in the Hugging Face layout, one optimizer shard file per
  rank) resumes with the numbers of the uninterrupted run.
- pp 2 x ep 2 (`--pp 2 --ep 2`): each stage's routed experts sharded over its two data-parallel
  ranks (all-to-all inside the stage), trains like one process too; its model is gathered whole.
- the schedules with mirrored stages are refused with --fsdp or --ep.

Tolerances are those of tests/test_fsdp.py: losses within 1e-4 (absolute), the gradient norm
within 1e-3 relative (the shards' squares are summed in another order than one process's norm)."""

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


def assert_same_run(ref_dir, got_dir, steps):
    ref, got = metrics(ref_dir), metrics(got_dir)
    for s in steps:
        for key in ("loss", "mtp_loss", "balance_loss"):
            assert got[s][key] == pytest.approx(ref[s][key], abs=1e-4), (s, key)
        assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-3), s


@pytest.fixture(scope="module")
def pp_runs(tmp_path_factory, text_file):
    """One process and pp 2 x fsdp 2 on 4 processes, checkpoints every 2 steps."""
    root = tmp_path_factory.mktemp("pp_fsdp")
    one = run(1, [*FLAGS, "--data", text_file, "--out", str(root / "one")])
    common = [*FLAGS, "--data", str(root / "one" / "data"), "--tokenizer", str(root / "one")]
    four = run(4, [*common, "--out", str(root / "pp2_fsdp2"), "--pp", "2", "--fsdp"], 29781)
    return root, common, one, four


@pytest.fixture(scope="module")
def one_run(tmp_path_factory, text_file):
    """One process, checkpoints every 2 steps: the reference of the pp x ep run."""
    root = tmp_path_factory.mktemp("pp_ep")
    one = run(1, [*FLAGS, "--data", text_file, "--out", str(root / "one")])
    return root, [*FLAGS, "--data", str(root / "one" / "data"), "--tokenizer", str(root / "one")], one


def assert_whole_model(ref_dir, got_dir):
    """The model at `got_dir`'s root is the whole one (gathered over stages and shards)."""
    from nanoseek import DeepSeekV3
    m1 = DeepSeekV3.from_pretrained(str(ref_dir)).state_dict()
    m4 = DeepSeekV3.from_pretrained(str(got_dir)).state_dict()
    assert m1.keys() == m4.keys()
    for k in m1:
        assert m4[k].shape == m1[k].shape, k
        assert float((m4[k] - m1[k]).norm() / m1[k].norm().clamp(min=1e-12)) < 1e-4, k


@pytest.mark.skip(reason="--pp with --fsdp is refused: its 1f1b run can stall in a point-to-point wait (dev/LOG.md)")
def test_pp2_fsdp2_equals_one_process(pp_runs):
    root, _, one, four = pp_runs
    assert sorted(metrics(root / "pp2_fsdp2")) == list(range(1, STEPS + 1))
    assert_same_run(root / "one", root / "pp2_fsdp2", range(1, STEPS + 1))
    assert four["val_loss"] == pytest.approx(one["val_loss"], abs=1e-4)
    assert four["world_size"] == 4 and four["params_total"] == one["params_total"]
    # rank 0 holds half of the first stage (the embedding and the first half of the layers)
    assert four["params_local"] < one["params_total"] / 3
    assert four["optimizer_bytes_local"] == 8 * four["params_local"]
    assert_whole_model(root / "one", root / "pp2_fsdp2")
    ckpt = root / "pp2_fsdp2" / "checkpoints" / "step-000002"
    assert sorted(p.name for p in ckpt.glob("optim-rank*.pt")) == ["optim-rank1.pt", "optim-rank2.pt", "optim-rank3.pt"]


@pytest.mark.skip(reason="--pp with --fsdp is refused: its 1f1b run can stall in a point-to-point wait (dev/LOG.md)")
def test_pp2_fsdp2_resumes_like_the_uninterrupted_run(pp_runs):
    root, common, _, _ = pp_runs
    run_dir = root / "pp2_fsdp2_resumed"
    shutil.copytree(root / "pp2_fsdp2", run_dir)
    shutil.rmtree(run_dir / "checkpoints" / f"step-{STEPS:06d}")
    os.unlink(run_dir / "final.json")
    out = run(4, [*common, "--out", str(run_dir), "--pp", "2", "--fsdp", "--resume"], 29782)
    assert out["resumed_from_step"] == 2
    ref, got = metrics(root / "pp2_fsdp2"), metrics(run_dir)
    for s in range(3, STEPS + 1):  # the same layout: the same numbers
        for key in ("loss", "mtp_loss", "balance_loss", "grad_norm"):
            assert got[s][key] == pytest.approx(ref[s][key], rel=1e-6), (s, key)


def test_pp2_ep2_equals_one_process(one_run):
    root, common, one = one_run
    out = run(4, [*common, "--out", str(root / "pp2_ep2"), "--pp", "2", "--ep", "2"], 29783)
    assert out["world_size"] == 4 and out["ep"] == 2
    assert_same_run(root / "one", root / "pp2_ep2", range(1, STEPS + 1))
    assert out["val_loss"] == pytest.approx(one["val_loss"], abs=1e-4)
    assert out["params_local"] < one["params_total"] / 2  # half the stages, half of their experts
    assert_whole_model(root / "one", root / "pp2_ep2")


@pytest.mark.parametrize("schedule", ["dualpipe", "dualpipev"])
def test_pp_refuses_mirrored_schedules_with_fsdp_or_ep(schedule):
    from nanoseek.parallel import ParallelDims
    kw = dict(compile=False, activation_checkpointing=False, fp8=False, grad_accum=1, batch_size=4)
    with pytest.raises(ValueError, match=f"--fsdp does not combine with --pp under --schedule {schedule}"):
        ParallelDims(world=4, pp=2, fsdp=True).check(**kw, schedule=schedule)
    with pytest.raises(ValueError, match=f"--ep > 1 with --pp runs the 1f1b schedule without --fsdp only, not "
                                         f"--schedule {schedule}"):
        ParallelDims(world=4, pp=2, ep=2).check(**kw, schedule=schedule)
    with pytest.raises(ValueError, match="with --fsdp"):
        ParallelDims(world=8, pp=2, ep=2, fsdp=True).check(**kw, schedule="1f1b")
    with pytest.raises(ValueError, match="--fsdp does not combine with --pp yet"):
        ParallelDims(world=4, pp=2, fsdp=True).check(**kw, schedule="1f1b")
    ParallelDims(world=4, pp=2, ep=2).check(**kw, schedule="1f1b")
