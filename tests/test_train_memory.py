"""Training memory accounting (nanoseek/parallel/memory.py) against what a tiny run holds, the
activation checkpointing policies (the same steps under none / selective / full), and `nanoseek info
--train-memory` for DeepSeek-V2-Lite at its real dimensions."""

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_accounting_matches_a_tiny_run():
    """Weights and AdamW moments counted on the meta device == the bytes a one-process run holds."""
    from nanoseek import DeepSeekV3
    from nanoseek.config import ModelConfig
    from nanoseek.parallel.memory import measured_bytes, train_memory
    from nanoseek.train import TrainArgs
    from nanoseek.train.loop import adamw
    cfg = ModelConfig.from_preset("nano", vocab_size=512)
    model = DeepSeekV3.from_config(cfg, seed=0)
    opt = adamw(model, TrainArgs(lr=1e-3), torch.device("cpu"))
    x = torch.randint(0, 512, (2, 16))
    logits, hidden = model(x, return_hidden=True)
    (logits.float().mean() + sum(lg.float().mean() for lg in model.mtp_forward(hidden, x))).backward()
    opt.step()
    measured = measured_bytes(model, opt)
    counted = train_memory(cfg, seq_len=16, micro_batch=2)
    assert counted.weights == measured["weights"] and counted.optimizer == measured["optimizer"]
    assert counted.grads == sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    # sharded layouts divide the same counts
    fsdp2 = train_memory(cfg, dp=2, fsdp=True, seq_len=16, micro_batch=2)
    assert fsdp2.weights == pytest.approx(counted.weights / 2, rel=1e-9) and fsdp2.gathered > 0
    ep2 = train_memory(cfg, dp=2, ep=2, seq_len=16, micro_batch=2)
    assert counted.weights > ep2.weights > counted.weights / 2  # only the experts are split
    full = train_memory(cfg, seq_len=16, micro_batch=2, policy="full")
    selective = train_memory(cfg, seq_len=16, micro_batch=2, policy="selective")
    assert full.activations < selective.activations < counted.activations


@pytest.mark.parametrize("policy", ["selective", "full"])
def test_activation_checkpointing_policies_give_the_same_steps(tmp_path, text_file, policy):
    from nanoseek.train import TrainArgs, train
    common = dict(data=[text_file], max_steps=2, batch_size=4, seq_len=32, vocab_size=512, eval_batches=1,
                  progress=False, save=False)
    plain = train(TrainArgs(out=str(tmp_path / "plain"), **common))
    recomputed = train(TrainArgs(out=str(tmp_path / policy), ac_policy=policy, **common))

    def steps(run):
        return [r for r in map(json.loads, open(tmp_path / run / "metrics.jsonl")) if "loss" in r]
    a, b = steps("plain"), steps(policy)
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-6)
    assert [r["maxvio_layers"] for r in a] == [r["maxvio_layers"] for r in b]
    assert plain["val_loss"] == pytest.approx(recomputed["val_loss"], rel=1e-6)


def test_ac_policy_is_checked(tmp_path, text_file):
    from nanoseek.train import TrainArgs, train
    with pytest.raises(ValueError, match="--ac-policy"):
        train(TrainArgs(data=[text_file], out=str(tmp_path), max_steps=1, ac_policy="some", progress=False))


def test_info_train_memory_deepseek_v2_lite():
    p = subprocess.run([sys.executable, "-m", "nanoseek", "info", "--train-memory", "deepseek-v2-lite", "--fsdp", "8",
                        "--ep", "8", "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    per_gpu = r["per_gpu"]
    # 15.7B parameters: 16 B each of fp32 weights, gradients and AdamW moments, over 8 ranks
    states = per_gpu["weights"] + per_gpu["grads"] + per_gpu["optimizer"]
    assert 8 * states == pytest.approx(16 * 15.706e9, rel=1e-3)
    assert per_gpu["total"] == sum(v for k, v in per_gpu.items() if k != "total")
    needs = r["gpus_needed"]
    assert needs["data parallel"]["gpus"] is None  # ~250 GB of states on every rank
    assert needs["fsdp x ep 8"]["gpus"] == 8 and needs["fsdp"]["gpus"] <= 8
    assert "fsdp x ep 8" in p.stdout


# DeepSeek-V2-Lite's layout (no q compression, a dense first layer, 2 shared experts, softmax
# routing, no MTP) scaled down; q and v heads of one size, so that CPU attention runs its fused
# kernel, which saves what the GPU kernels save (inputs, output, log-sum-exp)
SCALED_V2_LITE = dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=64,
                      num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=64, qk_nope_head_dim=32,
                      qk_rope_head_dim=16, v_head_dim=48, n_routed_experts=16)


@pytest.mark.parametrize("preset,overrides", [("deepseek-v2-lite", SCALED_V2_LITE),
                                              ("nano", dict(vocab_size=512, qk_nope_head_dim=16))])
@pytest.mark.parametrize("policy", ["none", "selective", "full"])
def test_activation_count_matches_a_measured_run(preset, overrides, policy):
    """The activations the accounting counts == the bytes of the tensors a bf16 forward of the
    training loss keeps for its backward (measured op by op), within 10%: every policy."""
    from nanoseek import DeepSeekV3
    from nanoseek.balance import moe_modules
    from nanoseek.config import ModelConfig
    from nanoseek.parallel import apply_activation_checkpointing
    from nanoseek.parallel.memory import layer_bytes_per_token, train_memory
    from nanoseek.parallel.memory_probe import LiveTensorBytes
    from nanoseek.train.objective import TrainLoss
    cfg = ModelConfig.from_preset(preset, **overrides)
    model = DeepSeekV3.from_config(cfg, seed=0).to(torch.bfloat16)
    apply_activation_checkpointing(model, policy)
    loss = TrainLoss(moe_modules(model), 1e-4, 0.3)
    batch, seq = 1, 128
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, cfg.vocab_size, (batch, seq), generator=g) for _ in range(2))
    probe = LiveTensorBytes()
    with probe:
        total = loss(model, model, x, y, {})[3]
        measured = probe.live()  # what the forward left alive: the tensors saved for the backward
    total.backward()
    counted = train_memory(cfg, seq_len=seq, micro_batch=batch, policy=policy).activations
    if policy != "none":  # the one layer the backward recomputes whole, not alive after the forward
        counted -= batch * seq * max(layer_bytes_per_token(cfg, i, "none") for i in range(cfg.num_hidden_layers))
    assert counted == pytest.approx(measured, rel=0.10)


def test_info_train_memory_medium():
    """`medium` sits between `small` (one GPU) and DeepSeek-V2-Lite: it needs FSDP over 2 to 8 GPUs of 80 GB."""
    from nanoseek.config import ModelConfig
    sizes = {p: ModelConfig.from_preset(p).param_counts()["total_params"] for p in ("small", "medium", "deepseek-v2-lite")}
    assert sizes["small"] < sizes["medium"] < sizes["deepseek-v2-lite"]
    p = subprocess.run([sys.executable, "-m", "nanoseek", "info", "--train-memory", "medium", "--json"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    needs = json.loads(p.stdout.strip().splitlines()[-1])["gpus_needed"]
    assert needs["data parallel"]["gpus"] is None  # past one GPU
    assert 2 <= needs["fsdp"]["gpus"] <= 8 and 2 <= needs["fsdp x ep 8"]["gpus"] <= 8


def test_cpu_offload_accounting():
    """FSDP CPU offload: the GPU sheds the sharded weights, gradients and AdamW states, the host
    holds them; activations and the gathered units stay on the GPU."""
    from nanoseek.config import ModelConfig
    from nanoseek.parallel.memory import gpus_needed, train_memory
    cfg = ModelConfig.from_preset("nano", vocab_size=512)
    kept = train_memory(cfg, dp=2, fsdp=True, seq_len=16, micro_batch=2)
    offloaded = train_memory(cfg, dp=2, fsdp=True, seq_len=16, micro_batch=2, cpu_offload=True)
    states = kept.weights + kept.grads + kept.optimizer
    assert offloaded.total == kept.total - states and offloaded.host == states and kept.host == 0
    assert (offloaded.weights, offloaded.grads, offloaded.optimizer) == (0, 0, 0)
    assert offloaded.activations == kept.activations and offloaded.gathered == kept.gathered
    assert offloaded.as_dict()["host"] == states and "host" not in kept.as_dict()
    assert offloaded.as_dict()["total"] == sum(v for k, v in offloaded.as_dict().items() if k not in ("total", "host"))
    with pytest.raises(ValueError, match="needs fsdp"):
        train_memory(cfg, cpu_offload=True)
    v2_lite = ModelConfig.from_preset("deepseek-v2-lite")  # ~250 GB of states: fewer GPUs once they leave them
    n_kept, _ = gpus_needed(v2_lite, fsdp=True)
    n_off, mem = gpus_needed(v2_lite, fsdp=True, cpu_offload=True)
    assert n_off < n_kept and mem.host > 0


def test_info_train_memory_cpu_offload(capsys):
    from nanoseek.cli import main
    assert main(["info", "--train-memory", "deepseek-v2-lite", "--fsdp", "8", "--cpu-offload", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    per_gpu = r["per_gpu"]
    assert per_gpu["weights"] == per_gpu["grads"] == per_gpu["optimizer"] == 0
    assert 8 * per_gpu["host"] == pytest.approx(16 * 15.706e9, rel=1e-3)  # fp32 weights, grads, AdamW moments
    assert per_gpu["total"] == per_gpu["activations"] + per_gpu["gathered"]  # host bytes are not GPU bytes
    assert r["layout"]["cpu_offload"] is True
    assert r["gpus_needed"]["fsdp + cpu offload"]["gpus"] <= r["gpus_needed"]["fsdp"]["gpus"]
    with pytest.raises(SystemExit, match="--cpu-offload"):
        main(["info", "--train-memory", "deepseek-v2-lite", "--cpu-offload"])
