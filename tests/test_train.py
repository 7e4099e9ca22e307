"""Pretraining: loss falls on real text, exact resume after a kill, 2-process data parallel ==
1 process, the bias update balances a skewed router, MTP loss trained, NaN guard, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import SHARED_DATA
from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.balance import max_violation, update_bias
from nanoseek.checkpoint import CheckpointError
from nanoseek.train import TrainArgs, lr_at, train

SHAKESPEARE = os.path.join(SHARED_DATA, "tinyshakespeare", "input.txt")

TINY = ["--batch-size", "4", "--seq-len", "32", "--vocab-size", "512", "--eval-batches", "2", "--no-progress"]




def cli(*args, env=None, timeout=300):
    p = subprocess.run([sys.executable, "-m", "nanoseek", *args], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, **(env or {})})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_train_json_contract_and_load(tmp_path, text_file):
    out = last_json(cli("train", "--preset", "nano", "--data", text_file, "--max-steps", "4",
                        "--out", str(tmp_path), "--json", *TINY))
    for key in ("step", "loss", "val_loss", "tokens_per_s", "resumed_from_step", "params_total", "params_local"):
        assert key in out, key
    assert out["step"] == 4 and out["resumed_from_step"] == 0 and out["params_local"] == out["params_total"]
    recs = metrics(tmp_path)
    train_lines = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4]
    assert all("loss" not in r for r in recs if "val_loss" in r)
    assert all(r["mtp_loss"] > 0 for r in train_lines)  # the MTP loss is present
    model = DeepSeekV3.from_pretrained(str(tmp_path))  # the final model sits at the run's root
    assert os.path.exists(tmp_path / "tokenizer.json") and os.path.exists(tmp_path / "loss.png")
    assert model.config.vocab_size == 4096
    # --resume on a finished run prints the final JSON again
    again = last_json(cli("train", "--preset", "nano", "--data", text_file, "--max-steps", "4",
                          "--out", str(tmp_path), "--json", "--resume", *TINY))
    assert again == out
    # a fresh run into the same folder would mix its checkpoints with these (and prune its own)
    from nanoseek.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match=r"earlier run's checkpoints \(newest: step 4\).*--resume"):
        train(TrainArgs(data=[text_file], out=str(tmp_path), preset="nano", max_steps=4, progress=False))


def test_resume_after_kill_equals_uninterrupted(tmp_path, text_file):
    common = ["train", "--preset", "nano", "--data", text_file, "--max-steps", "12", "--json", *TINY]
    cli(*common, "--out", str(tmp_path / "ref"))
    ref = {r["step"]: r["loss"] for r in metrics(tmp_path / "ref") if "loss" in r}

    run = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "nanoseek", *common, "--out", str(run), "--save-every", "2"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not os.path.exists(run / "checkpoints" / "step-000004"):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    # a half-written checkpoint left by a crash is never picked up
    (run / "checkpoints" / ".tmp-step-000099-1").mkdir(parents=True)
    out = last_json(cli(*common, "--out", str(run), "--save-every", "2", "--resume"))
    assert 4 <= out["resumed_from_step"] < 12  # killed mid-run, so it really resumed
    got = {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}
    assert sorted(got) == list(range(1, 13))
    for s in range(1, 13):
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=1e-6), s
    assert len([d for d in os.listdir(run / "checkpoints") if d.startswith("step-")]) == 2  # keep_last


def test_two_process_data_parallel_equals_one(tmp_path, text_file):
    common = ["--preset", "nano", "--data", text_file, "--max-steps", "4", "--json", *TINY]
    one = last_json(cli("train", *common, "--out", str(tmp_path / "one")))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
                        "-m", "nanoseek", "train", *common, "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    two = last_json(p.stdout)
    assert two["world_size"] == 2
    a = [r["loss"] for r in metrics(tmp_path / "one") if "loss" in r]
    b = [r["loss"] for r in metrics(tmp_path / "two") if "loss" in r]
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=1e-5)
    assert one["val_loss"] == pytest.approx(two["val_loss"], rel=1e-5)


def test_bias_update_balances_skewed_router():
    cfg = ModelConfig.from_preset("nano", n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1)
    model = DeepSeekV3.from_config(cfg, seed=0)
    moe = next(iter(model.moe_layers().values()))
    x = torch.randn(512, cfg.hidden_size)
    with torch.no_grad():
        moe.gate.weight[0] += 0.3 * x.mean(0) / x.mean(0).norm()  # experts 0 and 1 attract most tokens
        moe.gate.weight[1] += 0.2 * x.mean(0) / x.mean(0).norm()
        moe(x[None])
        before = max_violation(moe.tokens_per_expert)
        for _ in range(200):
            moe(x[None])
            update_bias(moe, moe.tokens_per_expert, 1e-3)
        after = max_violation(moe.tokens_per_expert)
    assert before > 0.5 and after < before / 4, (before, after)
    assert moe.gate.e_score_correction_bias[0] < 0 < moe.gate.e_score_correction_bias[5]


def test_mtp_loss_trained_and_nan_guard(tmp_path, text_file, monkeypatch):
    import nanoseek.train.loop as tr
    real = tr.F.cross_entropy
    calls = {"n": 0}

    def flaky(*a, **k):  # the main loss of optimizer step 3 is NaN
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(tr.F, "cross_entropy", flaky)
    args = TrainArgs(data=[text_file], out=str(tmp_path), max_steps=12, batch_size=4, seq_len=32, vocab_size=512,
                     eval_batches=2, eval_every=100, lr=3e-3, progress=False)
    summary = train(args)
    recs = [r for r in metrics(tmp_path) if "loss" in r]
    assert [r.get("skipped", False) for r in recs].count(True) == 1 and recs[2].get("skipped")
    assert summary["skipped_steps"] == 1
    assert all(r["mtp_loss"] > 0 for r in recs)
    assert recs[-1]["mtp_loss"] < recs[0]["mtp_loss"]


def test_corrupt_checkpoint_and_bad_data(tmp_path, text_file):
    cli("train", "--preset", "nano", "--data", text_file, "--max-steps", "2", "--out", str(tmp_path), *TINY)
    trainer = tmp_path / "checkpoints" / "step-000002" / "trainer.pt"
    trainer.write_bytes(trainer.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="trainer.pt"):
        train(TrainArgs(data=[text_file], out=str(tmp_path), max_steps=4, resume=True, batch_size=4, seq_len=32,
                        progress=False))
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(Exception, match="nope.txt"):
        train(TrainArgs(data=[missing], out=str(tmp_path / "x"), max_steps=2, batch_size=4, seq_len=32,
                        vocab_size=512, progress=False))
    for kernels in ("off", "auto"):  # off: no Triton kernels; auto: none on a CPU either
        with pytest.raises(ValueError, match="--fp8-grouped triton needs the fused Triton kernels"):
            train(TrainArgs(data=[text_file], out=str(tmp_path / "y"), max_steps=2, batch_size=4, seq_len=32,
                            vocab_size=512, precision="fp8", fp8_kernels=kernels, fp8_grouped="triton",
                            progress=False, device="cpu"))


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="../shared/data/tinyshakespeare absent")
def test_loss_falls_on_tiny_shakespeare(tmp_path):
    out = last_json(cli("train", "--preset", "nano", "--data", SHAKESPEARE, "--max-steps", "40", "--out", str(tmp_path),
                        "--batch-size", "8", "--seq-len", "128", "--vocab-size", "1024", "--eval-every", "20",
                        "--eval-batches", "4", "--no-progress", "--json"))
    recs = [r for r in metrics(tmp_path) if "loss" in r]
    first = sum(r["loss"] for r in recs[:3]) / 3
    last = sum(r["loss"] for r in recs[-3:]) / 3
    assert last < first - 1.5, (first, last)
    assert out["val_loss"] < first - 1.0


def _torchrun(args, port, timeout=300):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
                        "-m", "nanoseek", *args], capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return last_json(p.stdout)


def test_pipeline_schedules_train_like_one_process(tmp_path, text_file):
    """`--pp 2` with each schedule gives the single-process losses; a pipelined run resumes exactly."""
    common = ["train", "--preset", "nano", "--data", text_file, "--max-steps", "4", "--json", *TINY]
    cli(*common, "--out", str(tmp_path / "one"))
    ref = [r["loss"] for r in metrics(tmp_path / "one") if "loss" in r]
    for i, schedule in enumerate(["1f1b", "dualpipe", "dualpipev"]):
        run = tmp_path / schedule
        extra = ["--save-every", "2"] if schedule == "1f1b" else []
        out = _torchrun([*common, "--out", str(run), "--pp", "2", "--schedule", schedule, *extra], 29541 + i)
        got = [r["loss"] for r in metrics(run) if "loss" in r]
        assert got == pytest.approx(ref, rel=1e-5), schedule
        if schedule != "dualpipe":  # DualPipe on 2 ranks mirrors: both ranks hold both stages
            assert out["params_local"] < out["params_total"]
    # resume the 1F1B run from its step-2 checkpoint: steps 3 and 4 come out the same
    import shutil
    run = tmp_path / "1f1b"
    shutil.rmtree(run / "checkpoints" / "step-000004")
    os.unlink(run / "final.json")
    out = _torchrun([*common, "--out", str(run), "--pp", "2", "--schedule", "1f1b", "--save-every", "2", "--resume"],
                    29545)
    assert out["resumed_from_step"] == 2
    assert [r["loss"] for r in metrics(run) if "loss" in r] == pytest.approx(ref, rel=1e-5)
    assert DeepSeekV3.from_pretrained(str(run)).num_params(include_mtp=True) == out["params_total"]


def test_activation_checkpointing_gives_the_same_step(tmp_path, text_file):
    common = dict(data=[text_file], max_steps=2, batch_size=4, seq_len=32, vocab_size=512, eval_batches=1,
                  progress=False, save=False)
    plain = train(TrainArgs(out=str(tmp_path / "plain"), **common))
    ckpt = train(TrainArgs(out=str(tmp_path / "ckpt"), activation_checkpointing=True, **common))
    a = [r["loss"] for r in metrics(tmp_path / "plain") if "loss" in r]
    b = [r["loss"] for r in metrics(tmp_path / "ckpt") if "loss" in r]
    assert a == pytest.approx(b, rel=1e-6) and plain["val_loss"] == pytest.approx(ckpt["val_loss"], rel=1e-6)
    # the expert loads feeding the bias update are not double counted by the recomputation
    la = [r["maxvio_layers"] for r in metrics(tmp_path / "plain") if "loss" in r]
    lb = [r["maxvio_layers"] for r in metrics(tmp_path / "ckpt") if "loss" in r]
    assert la == lb


def test_pace_file_drives_the_schedule_and_stops_training(tmp_path, text_file):
    """A run following a pace file: its cosine uses the leader's progress and it stops (and saves)
    once the leader reports 1; without the file it behaves as before (progress 0)."""
    from nanoseek.recipes.pace import read_pace, write_pace
    pace = str(tmp_path / "leader.pace")
    assert read_pace(pace) == 0.0
    a = TrainArgs(data=[text_file], lr=1e-3, warmup_steps=0, max_steps=1000, min_lr_ratio=0.1)
    assert lr_at(0, a, 0.0, paced=0.0) == pytest.approx(1e-3, rel=1e-3)
    assert lr_at(0, a, 0.0, paced=1.0) == pytest.approx(1e-4)
    assert lr_at(0, a, 0.0, paced=0.5) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    write_pace(pace, 1.0)
    s = train(TrainArgs(data=[text_file], out=str(tmp_path / "run"), max_steps=1000, batch_size=2, seq_len=32,
                        vocab_size=512, eval_batches=1, progress=False), follow=lambda: read_pace(pace))
    assert s["step"] == 1  # the leader was done before the first step ended
    (tmp_path / "bad.pace").write_text("half\n")
    with pytest.raises(ValueError, match="bad.pace"):
        read_pace(str(tmp_path / "bad.pace"))


def test_the_two_lr_schedules_are_pinned():
    """Pretraining's and GRPO's warm-up + cosine formulas, each at its own steps, exactly: the same
    function on paper, rounded differently in the last bit at some steps (both kept, so recorded
    runs of each loop reproduce bit for bit)."""
    import math
    from nanoseek.train.schedule import cosine_factor, grpo_lr, pretrain_lr
    lr, warm, total, ratio = 3e-3, 7, 20, 0.1
    for step in range(total):
        if step < warm:
            want = lr * (step + 1) / warm
        else:
            want = lr * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * min((step - warm) / (total - warm), 1.0))))
        assert pretrain_lr(step, lr, warm, total, ratio) == want, step
        g = lr * min(1.0, (step + 1) / warm)
        if step >= warm:
            g = lr * cosine_factor((step - warm) / (total - warm), ratio)
        assert grpo_lr(step, lr, warm, total, ratio) == g, step
    differ = [s for s in range(warm) if pretrain_lr(s, lr, warm, total, ratio) != grpo_lr(s, lr, warm, total, ratio)]
    assert differ  # the reason both formulas are kept
    assert grpo_lr(3, lr, warm, total, 1.0) == lr * min(1.0, 4 / warm) and grpo_lr(15, lr, warm, total, 1.0) == lr
    # the larger of step progress, the time budget's share and a followed job's progress
    assert pretrain_lr(8, lr, warm, total, ratio, time_fraction=0.5) == lr * cosine_factor(0.5, ratio)
    assert pretrain_lr(8, lr, warm, total, ratio, time_fraction=0.2, least_progress=0.7) == lr * cosine_factor(0.7, ratio)
    assert grpo_lr(8, lr, warm, total, ratio, time_fraction=0.6) == lr * cosine_factor(0.6, ratio)
    assert pretrain_lr(0, lr, 100, 1, ratio) == lr * cosine_factor(0.0, ratio)  # max_steps 1: no warm-up
