"""Pipeline parallelism: the schedule simulator against the report's formulas, and the executors
(1F1B, DualPipe, DualPipeV over gloo, spawned CPU processes) against a single-process run."""

import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from nanoseek.parallel.schedules import ScheduleError, build_schedule, default_chunks
from nanoseek.parallel.simulator import Deadlock, run_sim, simulate


# ------------------------------------------------------------------------------ simulator
@pytest.mark.parametrize("pp", [2, 4, 8])
@pytest.mark.parametrize("times", [(1, 2, 1), (2, 3, 1), (1, 1, 0.5), (1, 3, 0.5)])
def test_1f1b_bubble_formula_exact(pp, times):
    F_, B, W = times
    for chunks in (pp, 2 * pp, 3 * pp + 1):
        r = run_sim("1f1b", pp, chunks, F_, B, W)
        assert r.bubble == pytest.approx((pp - 1) * (F_ + B), abs=1e-9)
        assert r.formula["formula_exact"] and r.formula["formula_bubble"] == pytest.approx(r.bubble)
        assert max(r.peak_activations) == pp


@pytest.mark.parametrize("pp", [2, 4, 6, 8])
@pytest.mark.parametrize("times", [(1, 2, 1, 3), (1, 2, 1, 2.5), (2, 3, 1, 4), (2, 4, 2, 5), (3, 4, 1, 4)])
def test_dualpipe_bubble_formula_exact_when_f_equals_b_minus_w(pp, times):  # F = B - W, W <= F
    F_, B, W, FB = times
    for chunks in (2 * pp, 2 * pp + 2, 4 * pp):
        d = run_sim("dualpipe", pp, chunks, F_, B, W, FB)
        assert d.formula["formula_exact"]
        assert d.bubble == pytest.approx((pp / 2 - 1) * (FB + B - 3 * W), abs=1e-9)
        assert max(d.peak_activations) == pp + 1  # Table 2: PP + 1 activations
        if pp % 2 == 0:  # DualPipeV on pp/2 ranks has the same pp stages and the same bubble
            v = run_sim("dualpipev", pp // 2, chunks, F_, B, W, FB)
            assert v.bubble == pytest.approx(d.bubble, abs=1e-9)


def test_formula_exactness_region():
    """Over a grid with F = B - W and max(F, B) <= F&B <= F + B: exact iff W <= F."""
    for F_ in (1, 2, 3):
        for W in (0.5, 1, 2, 3, 4):
            B = F_ + W
            for FB in (B, B + F_ / 2, F_ + B):
                for pp in (4, 8):
                    r = run_sim("dualpipe", pp, 2 * pp + 2, F_, B, W, FB)
                    exact = abs(r.bubble - r.formula["formula_bubble"]) < 1e-9
                    assert exact == (W <= F_) == r.formula["formula_exact"], (F_, B, W, FB, pp)
                    assert r.bubble >= r.formula["formula_bubble"] - 1e-9


def test_inexact_cases_match_reference_simulation():
    # shared/docs/dualpipe.md 2.2: (F, B, W, F&B) -> DualPipe bubble at PP 8 (sim) vs formula
    for (F_, B, W, FB), sim, formula in [((1, 2, 0.5, 3), 9.5, 10.5), ((1, 1, 0.5, 2), 6, 4.5),
                                         ((1, 2, 1.5, 2.2), 3.6, -0.9)]:
        for name, pp in (("dualpipe", 8), ("dualpipev", 4)):
            r = run_sim(name, pp, 32, F_, B, W, FB)
            assert r.bubble == pytest.approx(sim) and r.formula["formula_bubble"] == pytest.approx(formula)
            assert not r.formula["formula_exact"]


def test_dualpipev_op_list_matches_pytorch_listing():
    # torch 2.13's schedule visualizer for DualPipeV, 4 ranks, 10 micro-batches, rank 0
    ops = [str(o) for o in build_schedule("dualpipev", 4, 10).ops[0]]
    assert ops[:11] == "0F0 0F1 0F2 0F3 0F4 0F5 0F6 7F0 7I0 7W0 7F1".split()
    assert ops[17:19] == ["(0F7;7B3)", "(7F4;0B0)"]
    assert ops[-9:] == "7B9 0I6 0W6 0I7 0W7 0I8 0W8 0I9 0W9".split()


def test_dualpipe_mirrors_and_no_deadlock_with_latency():
    s = build_schedule("dualpipe", 4, 8)
    assert s.model_stage[s.stages_of_rank(0)[0]] == 0 and s.model_stage[s.stages_of_rank(0)[1]] == 3
    assert sorted(s.model_stage[v] for v in s.stages_of_rank(3)) == [0, 3]
    for name, pp in (("1f1b", 4), ("dualpipe", 4), ("dualpipev", 3), ("dualpipev", 1)):
        r = run_sim(name, pp, default_chunks(name, pp) + 2, latency=0.3)
        assert r.step_time > 0


def test_simulator_reports_deadlock():
    s = build_schedule("1f1b", 2, 2)
    s.ops[1] = list(reversed(s.ops[1]))  # backward before forward
    with pytest.raises(Deadlock):
        simulate(s)


@pytest.mark.parametrize("name,pp,chunks,msg", [
    ("dualpipe", 3, 6, "even number of pipeline ranks"), ("dualpipe", 2, 3, "even number of micro-batches"),
    ("dualpipe", 4, 6, ">= 2 x ranks"), ("dualpipev", 2, 3, ">= 2 x ranks"), ("1f1b", 2, 0, ">= 1"),
    ("gpipe", 2, 4, "unknown schedule")])
def test_invalid_schedules(name, pp, chunks, msg):
    with pytest.raises(ScheduleError, match=msg):
        build_schedule(name, pp, chunks)


def test_cli_pipeline_sim_json(tmp_path):
    png = tmp_path / "t.png"
    p = subprocess.run([sys.executable, "-m", "nanoseek", "pipeline-sim", "--schedule", "dualpipe", "--pp", "8",
                        "--chunks", "16", "--png", str(png), "--json"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["bubble"] == 6 and out["formula_bubble"] == 6 and out["peak_activations"] == 9
    assert 0 < out["bubble_ratio"] < 1 and out["step_time"] > 0 and png.stat().st_size > 1000
    p = subprocess.run([sys.executable, "-m", "nanoseek", "pipeline-sim", "--schedule", "1f1b", "--pp", "4",
                        "--times", "1,2,1", "--json"], capture_output=True, text=True, timeout=60)
    assert json.loads(p.stdout.strip().splitlines()[-1])["bubble"] == 9
    p = subprocess.run([sys.executable, "-m", "nanoseek", "pipeline-sim", "--schedule", "dualpipe", "--pp", "3"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "even number" in p.stderr


# ------------------------------------------------------------------------------ executors
def tiny_cfg(layers=4):
    from nanoseek import ModelConfig
    return ModelConfig.from_preset(
        "nano", vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=layers, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
        num_experts_per_tok=2, n_group=2, topk_group=1, num_nextn_predict_layers=1)


def reference(cfg, xs, ys, alpha, mtp_lambda=0.3):
    """Single process: per micro-batch CE + MTP + balance, mean over micro-batches."""
    from nanoseek import DeepSeekV3
    from nanoseek.balance import moe_modules, sequence_balance_loss
    model = DeepSeekV3.from_config(cfg, seed=0)
    moes = moe_modules(model)
    losses = []
    for x, y in zip(xs, ys):
        logits, hidden = model(x, return_hidden=True)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        mtp = mtp_lambda * sum(F.cross_entropy(lg.flatten(0, 1), y[:, k:].flatten())
                               for k, lg in enumerate(model.mtp_forward(hidden, x), 1))
        mtp_bal = sum(sequence_balance_loss(m, x.shape[0], alpha) for n, m in moes.items() if n.startswith("mtp."))
        bal = sum(sequence_balance_loss(m, x.shape[0], alpha) for m in moes.values())
        losses.append(float((ce + mtp + mtp_bal).detach()))
        ((ce + mtp + bal) / len(xs)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, losses


def run_deepseek_case(rank, world, name, chunks, alpha=1e-2, layers=4):
    from nanoseek import DeepSeekV3
    from nanoseek.parallel.pipeline import PipelineExecutor, SharedGrads, all_losses, split_deepseek
    cfg = tiny_cfg(layers)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (chunks * 2, 9), generator=g)
    xs, ys = list(ids[:, :-1].chunk(chunks)), list(ids[:, 1:].chunk(chunks))
    ref_grads, ref_losses = reference(cfg, xs, ys, alpha)

    sched = build_schedule(name, world, chunks)
    model = DeepSeekV3.from_config(cfg, seed=0)
    total = sum(p.numel() for p in model.parameters())
    stages, crit = split_deepseek(model, sched, rank, balance_alpha=alpha)
    named = dict(model.named_parameters())
    shared = SharedGrads(named)
    ex = PipelineExecutor(sched, stages, crit, boundary=lambda x: ((*x.shape, cfg.hidden_size), torch.float32),
                          timeout=30)
    losses = ex.step(xs, list(zip(xs, ys)))
    assert ex.executed == [str(o) for o in sched.ops[rank]]
    got = all_losses(losses, chunks)
    torch.testing.assert_close(got, torch.tensor(ref_losses, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    if name == "dualpipe":  # before the mirror reduction a copy holds one direction's gradient only
        n0 = next(n for n in named if ".layers." in n)
        assert not torch.allclose(named[n0].grad, ref_grads[n0], rtol=1e-4)
    shared.sync()
    for n, p in named.items():
        if n in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name} {n}: {m}")
        else:
            assert p.grad is None or p.grad.abs().max() == 0, n
    local = sum(p.numel() for p in model.parameters())
    if not (name == "dualpipe" and world == 2):  # 2-rank DualPipe: both ranks hold both stages
        assert local < total  # each rank holds its stages only
    if world == 2:
        ex.step(xs, list(zip(xs, ys)))  # a second step: state was reset (grads accumulate)
        shared.sync()


def _worker(rank, world, port, cases):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        for case in cases:
            if case[0] == "deepseek":
                run_deepseek_case(rank, world, *case[1:])
            elif case[0] == "timeout":
                from nanoseek.parallel.pipeline import PipelineExecutor, PipelineTimeout
                sched = build_schedule("1f1b", world, 2)
                stages = {rank: torch.nn.Linear(4, 4)}
                ex = PipelineExecutor(sched, stages, lambda y, t: y.sum(), boundary=lambda x: (x.shape, x.dtype),
                                      timeout=1.5)
                xs = [torch.randn(2, 4) for _ in range(2)]
                if rank == 1:
                    time.sleep(4)  # never joins: rank 0 must time out instead of hanging
                else:
                    t0 = time.time()
                    with pytest.raises(PipelineTimeout, match="timed out|failed"):
                        ex.step(xs, xs)
                    assert time.time() - t0 < 10
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world, cases):
    mp.spawn(_worker, args=(world, _free_port(), cases), nprocs=world, join=True)


def test_executors_match_single_process_2_ranks():
    spawn(2, [("deepseek", "1f1b", 3), ("deepseek", "dualpipe", 4), ("deepseek", "dualpipev", 4),
              ("deepseek", "dualpipev", 6)])


def test_executors_match_single_process_4_ranks():
    """The only topology where DualPipe's two directions live on different ranks (at 2 ranks each
    rank holds both ends): in the default suite (~30 s on 2 cores)."""
    spawn(4, [("deepseek", "1f1b", 4), ("deepseek", "dualpipe", 8), ("deepseek", "dualpipe", 10),
              ("deepseek", "dualpipev", 8, 1e-2, 8)])


def test_dualpipev_single_rank_no_process_group():
    """DualPipeV on one rank: the whole V is local, so it runs without torch.distributed. A
    block-type overlap hook (here: backward first, then forward) gets every F&B pair."""
    from nanoseek import DeepSeekV3
    from nanoseek.parallel import pipeline
    from nanoseek.parallel.pipeline import DeepSeekStage, PipelineExecutor, split_deepseek
    pairs = []

    def backward_first(run_forward, run_backward, f_stage, b_stage):
        pairs.append((f_stage, b_stage))
        run_backward()
        run_forward()

    pipeline.register_overlap(DeepSeekStage, backward_first)
    cfg = tiny_cfg(layers=2)
    ids = torch.randint(0, cfg.vocab_size, (4, 7), generator=torch.Generator().manual_seed(0))
    xs, ys = list(ids[:, :-1].chunk(2)), list(ids[:, 1:].chunk(2))
    ref, ref_losses = reference(cfg, xs, ys, 1e-2)
    sched = build_schedule("dualpipev", 1, 2)
    model = DeepSeekV3.from_config(cfg, seed=0)
    stages, crit = split_deepseek(model, sched, 0, balance_alpha=1e-2)
    ex = PipelineExecutor(sched, stages, crit, boundary=lambda x: ((*x.shape, 32), torch.float32), rank=0)
    try:
        losses = ex.step(xs, list(zip(xs, ys)))
    finally:
        pipeline._OVERLAP.pop(DeepSeekStage)
    assert len(pairs) == sum(o.kind == "FB" for o in sched.ops[0]) > 0
    assert [float(losses[i]) for i in range(2)] == pytest.approx(ref_losses, rel=1e-6)
    for n, p in model.named_parameters():
        if n in ref:
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-7)


class _CountBackward(torch.autograd.Function):
    """Identity whose backward counts its calls (an input-path node)."""
    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        _CountBackward.calls += 1
        return g


@pytest.mark.parametrize("shared_weight", [False, True])
def test_weight_step_reuses_the_input_backward(shared_weight):
    """I then W give the gradients of one full backward, and W runs no input-path node again
    (with a weight used twice, the input path between its two uses is the exception)."""
    from nanoseek.parallel.pipeline import WeightBranches
    torch.manual_seed(0)
    lin1, lin2, norm = torch.nn.Linear(6, 8), torch.nn.Linear(8, 5), torch.nn.LayerNorm(8)
    params = [*lin1.parameters(), *norm.parameters(), *lin2.parameters()]
    x0, g = torch.randn(3, 6), torch.randn(3, 5)

    def fwd(x):
        h = _CountBackward.apply(torch.tanh(lin1(x)))
        h = norm(h)
        if shared_weight:  # lin1.weight [8, 6] used a second time, further down the input path
            h = h + 0.5 * h @ (lin1.weight @ lin1.weight.t())
        return lin2(_CountBackward.apply(h)) + x.sum() * lin2.bias

    x = x0.clone().requires_grad_()
    fwd(x).backward(g)
    ref = [p.grad.clone() for p in params]
    ref_x = x.grad.clone()
    for p in params:
        p.grad = None
    _CountBackward.calls = 0
    x = x0.clone().requires_grad_()
    out = fwd(x)
    wb = WeightBranches(out, x, params)
    gx = wb.input_grad(out, g, x)
    assert _CountBackward.calls == 2 and all(p.grad is None for p in params)
    wb.weight_grads()
    if not shared_weight:
        assert _CountBackward.calls == 2  # the weight step did not re-run the input path
    torch.testing.assert_close(gx, ref_x)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r)


def test_invalid_executor_settings():
    from nanoseek import DeepSeekV3
    from nanoseek.parallel.pipeline import PipelineExecutor, split_deepseek
    cfg = tiny_cfg(layers=3)
    with pytest.raises(ScheduleError, match="4 pipeline stages but only 3 layers"):
        split_deepseek(DeepSeekV3.from_config(cfg, seed=0), build_schedule("dualpipev", 2, 4), 0)
    sched = build_schedule("dualpipev", 1, 2)
    stages, crit = split_deepseek(DeepSeekV3.from_config(cfg, seed=0), sched, 0)
    with pytest.raises(ScheduleError, match="for 2 pipeline ranks"):
        PipelineExecutor(build_schedule("1f1b", 2, 2), stages, crit, lambda x: (x.shape, x.dtype), rank=0)
    ex = PipelineExecutor(sched, stages, crit, boundary=lambda x: ((*x.shape, 32), torch.float32), rank=0)
    x = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ScheduleError, match="share one shape"):
        ex.step([x, torch.zeros(1, 5, dtype=torch.long)], [(x, x), (x, x)])
    with pytest.raises(ScheduleError, match="expected 2 micro-batches"):
        ex.step([x], [(x, x)])


def test_timeout_instead_of_hang():
    spawn(2, [("timeout",)])
