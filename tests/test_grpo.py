"""GRPO: advantages and the loss against hand-computed values (clipping, KL, each aggregation,
zero-variance groups), teacher-forced log-probs equal to the engine's sampling log-probs, batch
building (EOS, truncation masks), and short real runs: the quickstart end to end on a toy budget,
and GRPO raising the reward on a toy task."""

import json
import math
import os

import pytest
import torch

from nanoseek.rl.grpo import build_batch, completion_logprobs, sampler_logprobs
from nanoseek.rl.objective import group_advantages, policy_loss, token_weights


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    adv, informative = group_advantages(r)
    std0 = math.sqrt((4 * 0.25) / 3)  # unbiased std of (1, 0, 0, 1)
    a = 0.5 / (std0 + 1e-4)
    assert adv[0].tolist() == pytest.approx([a, -a, -a, a])
    assert adv[1].tolist() == [0.0] * 4  # zero variance: no signal, no NaN
    std2 = math.sqrt((3 * 0.0625 + 0.5625) / 3)
    assert adv[2, 3].item() == pytest.approx(0.75 / (std2 + 1e-4))
    assert informative.tolist() == [True, False, True]
    plain, _ = group_advantages(r, scale=False)  # Dr. GRPO: mean-centred only
    assert plain[2].tolist() == pytest.approx([-0.25, -0.25, -0.25, 0.75])
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))


def test_token_weights_each_variant():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # last row: dropped group
    g = token_weights(mask, "grpo")
    assert g.tolist() == [[0.25, 0.25, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]  # 2 sequences count
    d = token_weights(mask, "dapo")
    assert d.flatten().tolist() == pytest.approx([1 / 3, 1 / 3, 0, 1 / 3, 0, 0, 0, 0, 0])
    dr = token_weights(mask, "dr_grpo", max_len=4)
    assert dr.tolist() == [[0.125, 0.125, 0.0], [0.125, 0.0, 0.0], [0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="loss type"):
        token_weights(mask, "ppo")


def test_policy_loss_clipping_by_hand():
    # token 0: ratio 1.5, A = +1 -> clipped at 1.2; token 1: ratio 0.5, A = -1 -> clipped at 0.8
    # token 2: ratio 1.1, A = +1 -> inside the clip range
    old = torch.zeros(3, 1)
    logp = torch.log(torch.tensor([[1.5], [0.5], [1.1]]))
    adv = torch.tensor([1.0, -1.0, 1.0])
    w = torch.full((3, 1), 1 / 3)
    loss, stats = policy_loss(logp, old, adv, w, eps_low=0.2, eps_high=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 1.1) / 3, abs=1e-6)
    assert stats["clip_fraction"] == pytest.approx(2 / 3)
    # clip-higher: with eps_high 0.6 token 0's ratio 1.5 is inside the clip, so it counts unclipped
    loss_hi, _ = policy_loss(logp, old, adv, w, eps_low=0.2, eps_high=0.6)
    assert loss_hi.item() == pytest.approx((-1.5 + 0.8 - 1.1) / 3, abs=1e-6)


def test_policy_loss_kl_k3_by_hand():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    w = torch.tensor([[0.5, 0.5]])
    loss, stats = policy_loss(logp, logp.detach(), torch.zeros(1), w, beta=0.1, ref_logp=ref)
    d = ref - logp
    k3 = (torch.exp(d) - d - 1)
    assert stats["kl"] == pytest.approx(k3.mean().item(), rel=1e-6)
    assert loss.item() == pytest.approx(0.1 * k3.mean().item(), rel=1e-6)
    assert (k3 >= 0).all()


def test_ratio_one_gives_the_policy_gradient():
    """mu = 1: the loss value is 0 for zero-mean advantages, the gradient is -A * w per token."""
    logp = torch.tensor([[-0.7, -1.2], [-0.3, -2.0]], requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    w = token_weights(torch.ones(2, 2), "dapo")
    loss, _ = policy_loss(logp, logp.detach(), adv, w)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    assert logp.grad.flatten().tolist() == pytest.approx([-0.25, -0.25, 0.25, 0.25])


def test_micro_batches_add_up_to_the_full_loss():
    torch.manual_seed(0)
    logp, old = torch.randn(6, 5) * 0.1 - 1, torch.randn(6, 5) * 0.1 - 1
    adv = torch.randn(6)
    mask = (torch.rand(6, 5) > 0.3).float()
    for kind in ("grpo", "dr_grpo", "dapo"):
        w = token_weights(mask, kind, max_len=5)
        full, _ = policy_loss(logp, old, adv, w)
        parts = sum(policy_loss(logp[s], old[s], adv[s], w[s])[0] for s in (slice(0, 2), slice(2, 6)))
        assert parts.item() == pytest.approx(full.item(), rel=1e-6)


class _C:  # the fields of an engine Completion that build_batch reads
    def __init__(self, ids, finish):
        self.token_ids, self.finish_reason = ids, finish


def test_build_batch_masks():
    seqs, mask, truncated = build_batch([[5, 6], [5, 6, 7]], [_C([10, 11], "stop"), _C([12, 13], "length")],
                                        eos_id=1, pad_id=2, mask_truncated=True)
    assert seqs.tolist() == [[5, 6, 10, 11, 1], [5, 6, 7, 12, 13]]
    # row 0 targets 10, 11, EOS (positions 1..3 of the shifted mask); row 1 truncated: masked out
    assert mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 0]]
    assert truncated.tolist() == [False, True]
    _, mask2, _ = build_batch([[5, 6, 7]], [_C([12, 13], "length")], 1, 2, mask_truncated=False)
    assert mask2.tolist() == [[0, 0, 1, 1]]


def test_teacher_forced_logprobs_match_the_engine(tiny_cfg):
    """The log-probs the loss uses are those the engine sampled with (same model, T = 1)."""
    from conftest import randomized_model
    from nanoseek.infer.engine import Engine, SamplingParams
    from nanoseek.tokenizer import train_bpe
    tok = train_bpe(["0123456789+-*=,|<>" * 20], 280)
    model = randomized_model(tiny_cfg.replace(vocab_size=tok.vocab_size))
    engine = Engine(model, tok, max_context=64, max_batch=4)
    prompts = [[0, 12, 13, 14], [0, 20, 21]]
    comps = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True))
    engine.close()
    seqs, mask, _ = build_batch(prompts, comps, eos_id=1, pad_id=2, mask_truncated=False)
    with torch.no_grad():
        logp, _ = completion_logprobs(model, seqs, 1.0, torch.autocast("cpu", enabled=False))
    for i, c in enumerate(comps):
        got = logp[i][mask[i].bool()][:len(c.logprobs)]
        assert got.tolist() == pytest.approx(c.logprobs, abs=1e-4)


@pytest.mark.parametrize("alongside,overlap", [(True, False), (False, False), (False, True)])
def test_quickstart_toy_budget_end_to_end(tmp_path, monkeypatch, alongside, overlap):
    """Every stage of the quickstart on a tiny budget: data, tokenizer, pretraining, evaluation,
    GRPO (rollouts overlapped with updates or not), the control (after GRPO, or next to it in a
    child process), the model store, the JSON keys the README promises."""
    monkeypatch.setenv("NANOSEEK_HOME", str(tmp_path / "home"))
    from nanoseek.recipes.quickstart import Recipe, quickstart
    from nanoseek.infer.store import Store
    rc = Recipe(n_numbers=2, val_problems=10, train_problems=3000, pretrain_steps=40, seq_len=64, rl_steps=4, prompts_per_step=8,
                group_size=4, max_new_tokens=24, overlap=overlap)
    threads = torch.get_num_threads()
    stale = tmp_path / "qs" / "control" / "checkpoints" / "step-999999"
    stale.mkdir(parents=True)  # an earlier run's: must not become this run's control model
    r = quickstart(out=str(tmp_path / "qs"), recipe=rc, eval_problems=40, progress=False, alongside=alongside)
    assert os.listdir(tmp_path / "qs" / "control" / "checkpoints") == [f"step-{r['control_steps']:06d}"]
    assert torch.get_num_threads() == threads  # restored after GRPO ran on its share
    for key in ("accuracy_before_rl", "accuracy_after_rl", "accuracy_control", "pass_at_8_before_rl",
                "pass_at_8_after_rl", "seconds"):
        assert key in r and (key == "seconds" or 0.0 <= r[key] <= 1.0)
    assert r["rl_steps"] == 4 and r["pretrain_steps"] == 40
    assert r["rl_overlapped"] == (overlap and threads >= 2)
    assert Store().exists("quickstart")
    recs = [json.loads(line) for line in open(tmp_path / "qs" / "grpo" / "metrics.jsonl")]
    assert {"reward_mean", "kl", "clip_fraction", "entropy", "completion_length", "groups_zero_variance"} <= set(recs[0])
    assert (tmp_path / "qs" / "grpo" / "grpo.png").exists()
    assert json.loads((tmp_path / "qs" / "quickstart.json").read_text())["accuracy_after_rl"] == r["accuracy_after_rl"]
    # alongside (2+ threads): the control trains next to GRPO (a child process following GRPO's
    # pace file) and stops within a step of GRPO's end
    assert r["control_alongside_grpo"] == (alongside and torch.get_num_threads() >= 2)
    if r["control_alongside_grpo"]:
        assert r["control_alongside_grpo"] and r["control_steps"] >= 1
        assert (tmp_path / "qs" / "grpo.pace").read_text().strip() == "1.000000"


def test_quickstart_refuses_overlap_with_the_control_alongside(tmp_path):
    """--overlap needs both halves of the threads for GRPO: asked together with the control
    alongside, the quickstart says so before any work (no folder written)."""
    from nanoseek.recipes.quickstart import Recipe, quickstart
    with pytest.raises(ValueError, match="--overlap.*--control-after"):
        quickstart(out=str(tmp_path / "qs"), recipe=Recipe(overlap=True), alongside=True, progress=False)
    assert not (tmp_path / "qs").exists()
    from nanoseek.cli import main
    with pytest.raises(SystemExit, match="--overlap.*--control-after"):  # the command says it in one line
        main(["quickstart", "--overlap", "--control-alongside", "--out", str(tmp_path / "qs")])
    assert not (tmp_path / "qs").exists()


def _pick_one_setup(tmp_path, tiny_cfg):
    """A model that answers "1" or "2" half the time each (supervised on both, then its output rows
    for the two tied so that the coin is exactly fair), and a task that rewards "1"."""
    from nanoseek.model import DeepSeekV3
    from nanoseek.tasks import Problem, Task
    from nanoseek.tokenizer import train_bpe

    class PickOne(Task):
        name = "pick-one"

        def problems(self, split, n=None, seed=0):
            return [Problem(prompt="a|", answer="1", key="a")] * (n or 64)

        def answer_correct(self, problem, answer_text, completion):
            return answer_text == "1"

    tok = train_bpe(["a|<answer>1</answer> a|<answer>2</answer>"] * 20, 270)
    model = DeepSeekV3.from_config(tiny_cfg.replace(vocab_size=tok.vocab_size, num_nextn_predict_layers=0), seed=0)
    rows = [tok.encode(f"a|<answer>{d}</answer>", add_bos=True, add_eos=True) for d in "12" * 16]
    x = torch.tensor(rows)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):  # supervised: the format, with a 50/50 answer
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    one, two = tok.encode("1"), tok.encode("2")
    assert len(one) == len(two) == 1, (one, two)
    with torch.no_grad():  # tied output rows: "1" and "2" equally likely everywhere, by construction
        model.lm_head.weight[two[0]] = model.lm_head.weight[one[0]]
        prefix = torch.tensor([tok.encode("a|<answer>", add_bos=True)])
        p = model(prefix)[0, -1].softmax(-1)
    assert p[one[0]] == p[two[0]] and p[one[0]] + p[two[0]] > 0.9, (
        f"the supervised start did not learn the answer format: P('1') + P('2') after '<answer>' is "
        f"{(p[one[0]] + p[two[0]]).item():.3f}")
    model.save_pretrained(str(tmp_path / "sft"))
    tok.save(str(tmp_path / "sft"))
    return str(tmp_path / "sft"), PickOne()


def test_sampler_logprobs_are_the_tempered_policy(tmp_path, tiny_cfg):
    """Overlap mode's pi_old: the log-probs the engine drew each token and each EOS with, at
    temperature 0.7, laid out like the loss mask, equal the trainer's teacher-forced tempered
    log-probs of the same weights."""
    from nanoseek.infer.engine import Engine, SamplingParams
    from nanoseek.model import DeepSeekV3
    from nanoseek.tokenizer import Tokenizer
    start, _ = _pick_one_setup(tmp_path, tiny_cfg)
    model, tok = DeepSeekV3.from_pretrained(start), Tokenizer.from_dir(start)
    prompts = [tok.encode("a|", add_bos=True)] * 6
    engine = Engine(model, tok, max_context=32, max_batch=8)
    torch.manual_seed(0)
    comps = engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0.7, logprob_mode="sampled"))
    engine.close()
    assert any(c.finish_reason == "stop" for c in comps)
    assert all((c.stop_logprob is not None) == (c.finish_reason == "stop") for c in comps)
    seqs, mask, _ = build_batch(prompts, comps, tok.eos_id, tok.pad_id or 0, mask_truncated=False)
    old = sampler_logprobs(prompts, comps, mask.shape[1])
    with torch.no_grad():
        logp, _ = completion_logprobs(model, seqs, 0.7, torch.autocast("cpu", enabled=False))
    assert torch.equal(old != 0, mask.bool())  # one log-prob per counted target, EOS included
    assert (old - logp)[mask.bool()].abs().max() < 1e-4


@pytest.mark.parametrize("overlap", [False, True])
def test_grpo_raises_reward_on_a_toy_task(tmp_path, tiny_cfg, overlap):
    """A short GRPO run (real engine rollouts, real updates) on the coin-flip model must push the
    rollout reward up; also with rollouts overlapped with updates (one step off-policy)."""
    from nanoseek.rl import GRPOArgs, grpo
    if overlap and torch.get_num_threads() < 2:
        pytest.skip("overlap needs 2+ threads")
    start, task = _pick_one_setup(tmp_path, tiny_cfg)
    out = tmp_path / "grpo"
    # lr 1e-3: at 2e-3 the overlapped run can collapse (dev/LOG.md, 2026-12-07)
    summary = grpo(GRPOArgs(model=start, task=task, out=str(out), max_steps=30,
                            prompts_per_step=4, group_size=8, temperature=1.0, max_new_tokens=6, lr=1e-3,
                            warmup_steps=1, reward="lenient", loss="grpo", progress=False, save=False,
                            overlap=overlap))
    recs = [json.loads(line) for line in open(out / "metrics.jsonl") if "reward_mean" in line]
    first = sum(r["reward_mean"] for r in recs[:4]) / 4
    last = sum(r["reward_mean"] for r in recs[-4:]) / 4
    assert 0.2 < first < 0.8, first  # the start is a fair coin (tied rows), sampled 128 times
    print(f"reward over the first 4 steps {first:.3f}, the last 4 {last:.3f}")
    assert last > first + 0.25 and last > 0.8, (first, last)
    assert summary["steps"] == 30
    if overlap:  # off-policy rows: the ratio differs from 1, so the clip acts on some tokens
        assert any(r["clip_fraction"] > 0 for r in recs)


def test_overlap_with_evaluations_checkpoints_and_a_time_budget(tmp_path, tiny_cfg):
    """Overlap next to the loop's other duties: held-out evaluations and checkpoints between steps
    (the worker idle then), a wall-clock stop that leaves a pre-sampled batch unused, and the
    thread count restored afterwards."""
    from nanoseek.rl import GRPOArgs, grpo
    if torch.get_num_threads() < 2:
        pytest.skip("overlap needs 2+ threads")
    start, task = _pick_one_setup(tmp_path, tiny_cfg)
    threads = torch.get_num_threads()
    out = tmp_path / "grpo"
    s = grpo(GRPOArgs(model=start, task=task, out=str(out), max_steps=1000, max_seconds=3.0, prompts_per_step=4,
                      group_size=8, temperature=1.0, max_new_tokens=6, lr=2e-3, warmup_steps=1, reward="lenient",
                      eval_every=2, eval_problems=8, save_every=2, progress=False, overlap=True))
    assert torch.get_num_threads() == threads
    assert 2 <= s["steps"] < 1000 and s["seconds"] >= 3.0
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in recs if "reward_mean" in r] == list(range(1, s["steps"] + 1))
    assert {r["step"] for r in recs if "eval_accuracy" in r} == set(range(2, s["steps"] + 1, 2))
    last = s["steps"] // 2 * 2  # the newest checkpoint (keep_last 2)
    assert (out / "checkpoints" / f"step-{last:06d}" / "trainer.pt").exists()


def test_overlap_is_refused_where_it_cannot_work(tmp_path):
    """Overlap needs separate CPU threads and fp32 (pi_old from the fp32 sampler): a clear error
    before anything loads, and the thread count left as it was."""
    from nanoseek.rl import GRPOArgs, grpo
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match="--overlap: .*cpu, bf16"):
        grpo(GRPOArgs(model=str(tmp_path / "none"), overlap=True, device="cpu", precision="bf16"))
    torch.set_num_threads(1)
    try:
        with pytest.raises(ValueError, match="--overlap: .*1 thread"):
            grpo(GRPOArgs(model=str(tmp_path / "none"), overlap=True, device="cpu"))
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="--overlap: .*--top-p 1"):
        grpo(GRPOArgs(model=str(tmp_path / "none"), overlap=True, top_p=0.9))


def test_grpo_resume_is_exact(tmp_path, tiny_cfg):
    """Stopped after 3 steps and resumed to 6 == 6 steps in one go: same rollouts, same weights,
    same optimizer state, the same learning rates (warm-up, then cosine decay), the metrics log
    without duplicates (mu 2 and a KL reference included).
    One thread: with two, CPU backward reductions may sum in a different order from run to run
    (gradient norms then differ in the 6th digit even between two uninterrupted runs)."""
    from nanoseek.model import DeepSeekV3
    from nanoseek.rl import GRPOArgs, grpo
    start, task = _pick_one_setup(tmp_path, tiny_cfg)
    common = dict(model=start, task=task, prompts_per_step=4, group_size=8, temperature=1.0, max_new_tokens=6,
                  lr=2e-3, warmup_steps=2, min_lr_ratio=0.1, mu=2, beta=0.05, reward="lenient", progress=False,
                  save_every=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        grpo(GRPOArgs(out=str(tmp_path / "whole"), max_steps=6, **common))
        grpo(GRPOArgs(out=str(tmp_path / "split"), max_steps=3, **common))
        s = grpo(GRPOArgs(out=str(tmp_path / "split"), max_steps=6, resume=True, **common))
    finally:
        torch.set_num_threads(threads)
    assert s["resumed_from_step"] == 3 and s["steps"] == 6
    whole = DeepSeekV3.from_pretrained(str(tmp_path / "whole")).state_dict()
    split = DeepSeekV3.from_pretrained(str(tmp_path / "split")).state_dict()
    assert any(not torch.equal(whole[k], DeepSeekV3.from_pretrained(start).state_dict()[k]) for k in whole)
    for k in whole:
        assert torch.equal(whole[k], split[k]), k
    recs = lambda d: [json.loads(x) for x in open(tmp_path / d / "metrics.jsonl") if "reward_mean" in x]  # noqa: E731
    a, b = recs("whole"), recs("split")
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["reward_mean"] for r in a] == [r["reward_mean"] for r in b]
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 2) / 4)) for step in range(2, 6)]  # 0.23x at step 6 (progress 3/4)
    assert [r["lr"] for r in b] == pytest.approx([1e-3, 2e-3] + [2e-3 * f for f in cosine])
    assert (tmp_path / "split" / "checkpoints" / "step-000006" / "trainer.pt").exists()
    from nanoseek.checkpoint import CheckpointError  # a fresh run there would mix with those checkpoints
    with pytest.raises(CheckpointError, match=r"earlier run's checkpoints \(newest: step 6\).*--resume"):
        grpo(GRPOArgs(out=str(tmp_path / "split"), max_steps=6, **common))
