"""Expert parallelism (CPU, gloo, 2 and 4 processes): the EP MoE forward/backward equals the
single-process MoE (outputs and every gradient, fp32), experts and whole ranks that receive no
tokens included; node-limited routing; `--ep 2` training equals one process step by step; a run
saved at EP 2 resumes at EP 1 and at EP 4 with the same losses.

The multi-process checks run this file as a torchrun worker (`python -m torch.distributed.run
... tests/test_expert_parallel.py CHECK`)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY = ["--batch-size", "4", "--seq-len", "32", "--vocab-size", "512", "--eval-batches", "2", "--no-progress"]
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32; only summation orders differ (per-rank partial sums)


# ----------------------------------------------------------------------------- worker side
def moe_config(**kw):
    from nanoseek import ModelConfig
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=16,
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2,
                num_nextn_predict_layers=0, rope_scaling=None)
    return ModelConfig.from_preset("nano", **{**base, **kw})


def make_moe(cfg, seed=0, dead=()):
    """A random MoE in fp32 whose router spreads tokens unevenly; experts in `dead` get a
    prohibitive bias so that no token ever reaches them."""
    from nanoseek.model import MoE
    torch.manual_seed(seed)
    with torch.device("meta"):
        moe = MoE(cfg)
    moe.to_empty(device="cpu")
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        if moe.gate.e_score_correction_bias is not None:
            moe.gate.e_score_correction_bias.normal_(0, 0.1)
            for e in dead:
                moe.gate.e_score_correction_bias[e] = -1e3
    return moe


def run_and_grads(moe, x, g):
    """Forward x [B, T, h], loss = sum(out * g); returns out, x.grad, {name: grad or zeros}."""
    x = x.clone().requires_grad_(True)
    out = moe(x)
    (out * g).sum().backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone() for n, p in moe.named_parameters()}
    return out.detach(), x.grad.clone(), grads


def check_ep_equals_single(cfg, ref_cfg=None, dead=(), seed=0, max_ranks=None):
    """Every rank builds the same MoE and the same global batch; the single-process reference runs
    the whole batch, the EP version each rank's slice. Compares outputs, input gradients, summed
    dense gradients and each rank's expert-slice gradients."""
    import torch.distributed as dist
    from nanoseek.parallel.expert_parallel import apply_expert_parallel, ranks_per_token
    rank, world = dist.get_rank(), dist.get_world_size()
    ref = make_moe(ref_cfg or cfg, seed, dead)
    ep = make_moe(cfg, seed, dead)
    ep.load_state_dict(ref.state_dict())
    swapped = apply_expert_parallel(ep)
    assert swapped == ["experts"], swapped
    torch.manual_seed(100 + seed)
    B, T = 2 * world, 5
    x = torch.randn(B, T, cfg.hidden_size)
    g = torch.randn(B, T, cfg.hidden_size)
    out_ref, dx_ref, gr_ref = run_and_grads(ref, x, g)
    mine = slice(rank * 2, rank * 2 + 2)
    out, dx, gr = run_and_grads(ep, x[mine], g[mine])
    torch.testing.assert_close(out, out_ref[mine], **TOL)
    torch.testing.assert_close(dx, dx_ref[mine], **TOL)
    El = cfg.n_routed_experts // world
    for name, grad in gr.items():
        if name.startswith("experts."):  # the owner already holds the sum over all ranks' tokens
            expect = gr_ref[name][rank * El:(rank + 1) * El]
        else:  # replicated: the data-parallel sum
            dist.all_reduce(grad)
            expect = gr_ref[name]
        torch.testing.assert_close(grad, expect, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    loads = ep.tokens_per_expert.clone()
    dist.all_reduce(loads)
    torch.testing.assert_close(loads, ref.tokens_per_expert)
    for e in dead:
        assert loads[e] == 0 and gr_ref["experts.gate_proj"][e].abs().sum() == 0
    if max_ranks is not None:
        assert int(ranks_per_token(ep.router_indices, cfg.n_routed_experts, world).max()) <= max_ranks
    return {"pairs": int(loads.sum()), "expected_pairs": B * T * cfg.num_experts_per_tok,
            "zero_experts": int((loads == 0).sum())}


def worker_moe():
    """All the MoE-level checks, in one launch (2 or 4 processes)."""
    import torch.distributed as dist
    from nanoseek.parallel.expert_parallel import node_limit, node_limited_config
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    torch.set_num_threads(1)
    report = {}
    cfg = moe_config()
    report["group_limited"] = check_ep_equals_single(cfg)
    # experts with no tokens; with 4 ranks the dead pair 2, 3 is the whole of rank 1's slice
    report["dead_experts"] = check_ep_equals_single(cfg, dead=(2, 3, 6), seed=1)
    assert report["dead_experts"]["zero_experts"] >= 3
    # V2-style softmax routing, no bias, group-limited greedy
    v2 = moe_config(scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False)
    report["v2_routing"] = check_ep_equals_single(v2, seed=2)
    # node-limited routing: one group per rank ("node"), all groups kept == plain top-k routing
    plain = moe_config(n_group=1, topk_group=1, num_experts_per_tok=2)  # 2 experts fit on one rank of 4
    full = node_limited_config(plain, nodes=world, max_nodes=world)
    assert node_limit(full, world) == world
    report["node_limited_full"] = check_ep_equals_single(full, ref_cfg=plain, seed=3)
    # and at most one node per token: still exact, and no token's experts span two ranks
    one = node_limited_config(plain, nodes=world, max_nodes=1)
    assert node_limit(one, world) == 1
    report["node_limited_1"] = check_ep_equals_single(one, seed=4, max_ranks=1)
    if dist.get_rank() == 0:
        print(json.dumps(report), flush=True)
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- test side
def torchrun(n, args, port, timeout=300, module=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port", str(port)]
    cmd += ["-m", "nanoseek", *args] if module else args
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def cli(*args, timeout=300):
    p = subprocess.run([sys.executable, "-m", "nanoseek", *args], capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})  # 2 shared cores: no oversubscription
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def losses(run):
    return {r["step"]: r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if "loss" in r}


@pytest.mark.parametrize("n,port", [(2, 29631), (4, 29632)])
def test_ep_moe_equals_single_process(n, port):
    report = torchrun(n, [os.path.abspath(__file__), "moe"], port, module=False)
    assert set(report) == {"group_limited", "dead_experts", "v2_routing", "node_limited_full", "node_limited_1"}
    assert report["dead_experts"]["zero_experts"] >= 3
    assert all(r["pairs"] == r["expected_pairs"] for r in report.values())  # every (token, expert) pair once


def test_node_limit_alignment():
    from nanoseek.parallel.expert_parallel import node_limit, node_limited_config
    cfg = moe_config(n_routed_experts=16, n_group=8, topk_group=4)
    assert node_limit(cfg, ep=8) == 4  # one group per rank: at most topk_group ranks
    assert node_limit(cfg, ep=16, ranks_per_node=2) == 4  # one group per node of 2 ranks
    assert node_limit(cfg, ep=16, ranks_per_node=1) is None  # a group straddles two ranks
    assert node_limit(cfg, ep=4) == 4  # two groups per rank: still at most topk_group ranks
    assert node_limit(moe_config(n_group=1, topk_group=1), ep=2) is None
    with pytest.raises(ValueError, match="do not split"):
        node_limit(cfg, ep=3)
    nl = node_limited_config(cfg, nodes=4, max_nodes=2)
    assert (nl.n_group, nl.topk_group) == (4, 2) and node_limit(nl, ep=8, ranks_per_node=2) == 2


@pytest.fixture(scope="module")
def ep2_runs(tmp_path_factory, text_file):
    """One process and `--ep 2` on 2 processes, 4 steps, checkpoints every 2 steps."""
    root = tmp_path_factory.mktemp("ep")
    flags = ["train", "--preset", "nano", "--max-steps", "4", "--json", "--save-every", "2", "--keep-last", "3", *TINY]
    one = cli(*flags, "--data", text_file, "--out", str(root / "one"))
    # later runs reuse its tokenizer and token shards (the same data, without preparing it again)
    common = [*flags, "--data", str(root / "one" / "data"), "--tokenizer", str(root / "one")]
    two = torchrun(2, [*common, "--out", str(root / "ep2"), "--ep", "2"], 29633)
    return root, common, one, two


def test_ep2_training_equals_one_process(ep2_runs):
    from nanoseek import DeepSeekV3
    root, _, one, two = ep2_runs
    a, b = losses(root / "one"), losses(root / "ep2")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        for key in ("loss", "mtp_loss", "balance_loss", "grad_norm"):
            assert b[s][key] == pytest.approx(a[s][key], rel=1e-5), (s, key)
        assert b[s]["maxvio_layers"] == pytest.approx(a[s]["maxvio_layers"], rel=1e-6)  # global loads
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    assert two["world_size"] == 2 and two["ep"] == 2 and two["params_total"] == one["params_total"]
    cfg = DeepSeekV3.from_pretrained(str(root / "one")).config
    n_expert = 3 * cfg.n_routed_experts * cfg.hidden_size * cfg.moe_intermediate_size
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace + cfg.num_nextn_predict_layers
    assert two["params_local"] == one["params_total"] - moe_layers * n_expert // 2  # half the experts each
    # the saved model is the full one, in the Hugging Face layout, equal to the one-process model
    # (relative error per tensor: AdamW turns fp32 rounding in near-zero gradients into lr-sized
    # steps on a few elements; a misplaced expert shard would be off by ~100%)
    m1 = DeepSeekV3.from_pretrained(str(root / "one")).state_dict()
    m2 = DeepSeekV3.from_pretrained(str(root / "ep2")).state_dict()
    assert m1.keys() == m2.keys()
    for k in m1:
        assert m2[k].shape == m1[k].shape, k
        assert float((m2[k] - m1[k]).norm() / m1[k].norm().clamp(min=1e-12)) < 1e-4, k


def _resumable_copy(root, name):
    """The EP-2 run cut back to its step-2 checkpoint."""
    run = root / name
    shutil.copytree(root / "ep2", run)
    shutil.rmtree(run / "checkpoints" / "step-000004")
    os.unlink(run / "final.json")
    return run


def test_save_at_ep2_resume_at_ep1(ep2_runs):
    root, common, _, _ = ep2_runs
    run = _resumable_copy(root, "ep1")
    out = cli(*common, "--out", str(run), "--resume")
    assert out["resumed_from_step"] == 2 and out["ep"] == 1 and out["params_local"] == out["params_total"]
    ref, got = losses(root / "one"), losses(run)
    assert [got[s]["loss"] for s in (1, 2, 3, 4)] == pytest.approx([ref[s]["loss"] for s in (1, 2, 3, 4)], rel=1e-5)


def test_save_at_ep2_resume_at_ep4(ep2_runs):
    root, common, _, _ = ep2_runs
    run = _resumable_copy(root, "ep4")
    out = torchrun(4, [*common, "--out", str(run), "--resume", "--ep", "4"], 29634)
    assert out["resumed_from_step"] == 2 and out["ep"] == 4 and out["params_local"] < out["params_total"]
    ref, got = losses(root / "one"), losses(run)
    assert [got[s]["loss"] for s in (1, 2, 3, 4)] == pytest.approx([ref[s]["loss"] for s in (1, 2, 3, 4)], rel=1e-5)
    assert got[4]["grad_norm"] == pytest.approx(ref[4]["grad_norm"], rel=1e-5)


def test_ep2_with_two_replicas(ep2_runs):
    """4 processes, --ep 2: two replicas of each expert shard (their gradients averaged too)."""
    root, common, _, _ = ep2_runs
    run = _resumable_copy(root, "ep2x2")
    out = torchrun(4, [*common, "--out", str(run), "--resume", "--ep", "2"], 29635)
    assert out["resumed_from_step"] == 2 and out["ep"] == 2 and out["world_size"] == 4
    ref, got = losses(root / "one"), losses(run)
    for s in (3, 4):
        for key in ("loss", "grad_norm"):
            assert got[s][key] == pytest.approx(ref[s][key], rel=1e-5), (s, key)


def test_ep_flag_checks(tmp_path, text_file):
    from nanoseek.train import TrainArgs, train
    with pytest.raises(ValueError, match="--ep 2 must divide"):
        train(TrainArgs(data=[text_file], out=str(tmp_path), max_steps=1, ep=2, progress=False))


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    {"moe": worker_moe}[sys.argv[1]]()
