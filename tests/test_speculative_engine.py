"""MTP speculative decoding inside the engine (DeepSeek-V3 report section 2.2): greedy output
identical to the plain engine token for token under continuous batching (joining and leaving,
different lengths, stop strings, cancellation, the context end, max_tokens at an accepted draft,
the prefix cache, constrained neighbours); sampled output distributed exactly as the target
model's (the rejection rule, checked against the exact distribution with a bound computed from the
sample size), reproducible per seed, with the target model's log-probs."""

import math

import pytest
import torch

from conftest import randomized_model
from nanoseek import ModelConfig
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.sampling import sampling_logits
from nanoseek.speculative import speculative_sample
from nanoseek.tokenizer import train_bpe

CORPUS = ["the quick brown fox jumps over the lazy dog. " * 20, "a stitch in time saves nine! " * 20]
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [20], [30, 31], [40, 41, 42, 43], [50, 51, 52], [60, 61, 62, 63, 64]]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(CORPUS, 300)


def config(vocab_size=300, **kw):
    return ModelConfig.from_preset("nano", vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                                   moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                                   q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                   v_head_dim=12, num_nextn_predict_layers=1, **kw)


def bigram_model(cfg, layer_scale: float, seed: int = 0):
    """A random model whose residual stream is mostly the token embedding (attention and FFN outputs
    scaled by `layer_scale`), so its next token is mostly a function of the current one, and whose
    MTP layer reads only the embedding of the token after: the MTP draft then mostly equals the
    main model's token after next. `layer_scale` 0 makes every draft right; larger ones mix
    accepted and rejected drafts."""
    model = randomized_model(cfg, seed)
    h = cfg.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                p.mul_(layer_scale)
        for mtp in model.mtp.values():
            mtp.eh_proj.weight.zero_()
            mtp.eh_proj.weight[:, :h] = torch.eye(h)  # [enorm(emb); hnorm(h)] -> enorm(emb)
    return model


@pytest.fixture(scope="module")
def models():
    """Mostly accepted, mixed, and (random MTP weights) mostly rejected drafts."""
    cfg = config()
    return {"accepting": bigram_model(cfg, 1.0), "mixed": bigram_model(cfg, 3.0), "random": randomized_model(cfg)}


def run(model, tok, prompts, params, speculative, **kw):
    eng = Engine(model, tok, max_context=kw.pop("max_context", 64), max_batch=kw.pop("max_batch", 4),
                 speculative=speculative, **kw)
    try:
        return eng.generate(prompts, params), eng
    finally:
        eng.close()


def assert_same(plain, spec):
    for a, b in zip(plain, spec):
        assert b.token_ids == a.token_ids
        assert (b.finish_reason, b.completion_tokens, b.prompt_tokens) == (a.finish_reason, a.completion_tokens,
                                                                           a.prompt_tokens)
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)  # the target model's, as the plain step's
        assert b.text == a.text


@pytest.mark.parametrize("kind", ["accepting", "mixed", "random"])
@pytest.mark.parametrize("max_batch", [1, 4])
def test_greedy_equals_the_plain_engine(models, tok, kind, max_batch):
    """Seven prompts of different lengths and budgets through max_batch rows: requests join as
    others finish; every output equals the plain engine's."""
    model = models[kind]
    params = [SamplingParams(max_tokens=6 + 3 * (i % 4), temperature=0.0, ignore_eos=True) for i in range(len(PROMPTS))]
    plain, _ = run(model, tok, PROMPTS, params, False, max_batch=max_batch)
    spec, eng = run(model, tok, PROMPTS, params, True, max_batch=max_batch)
    assert_same(plain, spec)
    st = eng.speculative_stats
    assert st.drafted == st.main_steps == sum(c.speculative.main_steps for c in spec) > 0
    assert st.accepted == sum(c.speculative.accepted for c in spec)
    rate = {"accepting": (0.6, 1.0), "mixed": (0.05, 0.9), "random": (0.0, 0.3)}[kind]
    assert rate[0] <= st.acceptance_rate <= rate[1], st
    for c in spec:  # fewer main-model steps than tokens where drafts were accepted
        assert c.speculative.main_steps <= c.completion_tokens - 1
        assert c.speculative.tokens_per_step == pytest.approx(1 + c.speculative.acceptance_rate)


def test_max_tokens_exact_when_the_draft_is_accepted_at_the_limit(tok):
    """Every draft accepted (two tokens per step): odd and even budgets, EOS on or off, are met
    exactly, and the context end too."""
    model = bigram_model(config(), 0.0)
    for n in range(1, 8):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        plain, _ = run(model, tok, PROMPTS[:3], params, False)
        spec, eng = run(model, tok, PROMPTS[:3], params, True)
        assert_same(plain, spec)
        assert all(c.completion_tokens == n for c in spec)
        if n > 2:
            assert eng.speculative_stats.acceptance_rate == 1.0
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    for ctx in (12, 13):  # the context end after either token of a step
        plain, _ = run(model, tok, PROMPTS[:2], params, False, max_context=ctx)
        spec, _ = run(model, tok, PROMPTS[:2], params, True, max_context=ctx)
        assert_same(plain, spec)
        assert [c.prompt_tokens + c.completion_tokens for c in spec] == [ctx, ctx]


def test_eos_stop_strings_and_streaming_equal_the_plain_engine(models, tok):
    model = models["accepting"]
    free = SamplingParams(max_tokens=24, temperature=0.0)
    plain, _ = run(model, tok, PROMPTS, free, False)
    spec, _ = run(model, tok, PROMPTS, free, True)
    assert_same(plain, spec)
    # a stop string from the middle of each output: cut at the same place, in the same step
    for a in plain:
        if len(a.text) < 6:
            continue
        stop = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[a.text[3:6]])
        p2, _ = run(model, tok, [PROMPTS[plain.index(a)]], stop, False)
        s2, _ = run(model, tok, [PROMPTS[plain.index(a)]], stop, True)
        assert_same(p2, s2)
        assert s2[0].finish_reason == "stop"
    eng = Engine(model, tok, max_context=64, max_batch=4, speculative=True)
    try:
        params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
        events = list(eng.submit(PROMPTS[1], params))
        assert [e.token_id for e in events] == plain_tokens(model, tok, PROMPTS[1], params)
        assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 9
    finally:
        eng.close()


def plain_tokens(model, tok, prompt, params):
    return run(model, tok, [prompt], params, False)[0][0].token_ids


def test_cancellation_and_joining_a_running_batch(models, tok):
    """A streamed request cancelled mid-way frees its row; requests submitted while others decode
    join the running batch; each output is the plain engine's."""
    model = models["mixed"]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = {i: plain_tokens(model, tok, p, params) for i, p in enumerate(PROMPTS)}
    eng = Engine(model, tok, max_context=64, max_batch=3, speculative=True)
    try:
        doomed = eng.submit([1, 2, 3], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
        first = [eng.submit(p, params) for p in PROMPTS[:2]]
        next(iter(doomed))
        doomed.cancel()
        later = [eng.submit(p, params) for p in PROMPTS[2:]]
        for i, h in enumerate(first + later):
            assert h.completion().token_ids == want[i], i
        assert list(doomed)[-1].finish_reason == "cancelled"
    finally:
        eng.close()


def test_prefix_cache_with_speculative_decoding(models, tok):
    """Prompts sharing a prefix with finished requests reuse their cache rows (the main model's
    and the MTP layer's, all but the last matched position) and decode what the plain engine does."""
    model = models["accepting"]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    base = list(range(3, 40))
    prompts = [base, base + [50, 51], base[:20] + [60], base + [50, 52, 53]]
    eng = Engine(model, tok, max_context=96, max_batch=2, speculative=True, prefix_cache_tokens=4096, prefix_block=8)
    try:
        outs = [eng.generate([p], params)[0] for p in prompts]
    finally:
        eng.close()
    for p, o in zip(prompts, outs):
        assert o.token_ids == plain_tokens(model, tok, p, params)
    assert outs[0].cached_tokens == 0 and all(o.cached_tokens > 0 for o in outs[1:])
    assert outs[1].cached_tokens == len(base) - 1  # the last matched position is prefilled again


class EvenTokensOnly:
    """A stand-in for a grammar constraint: only even token ids may follow."""

    def __init__(self):
        self.accepted = []

    def mask(self, logits):
        out = logits.clone()
        out[1::2] = float("-inf")
        return out

    def accept(self, token):
        self.accepted.append(token)


def test_constrained_request_beside_drafted_ones(models, tok):
    """A constrained request takes one token per step from its masked logits (not drafted); the
    requests beside it keep their drafts and plain-engine outputs."""
    model = models["accepting"]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    c_plain, c_spec = EvenTokensOnly(), EvenTokensOnly()
    plain, _ = run(model, tok, PROMPTS[:3], [params, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True,
                                                                   constraint=c_plain), params], False)
    spec, _ = run(model, tok, PROMPTS[:3], [params, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True,
                                                                  constraint=c_spec), params], True)
    assert_same(plain, spec)
    assert all(t % 2 == 0 for t in spec[1].token_ids) and c_spec.accepted == spec[1].token_ids
    assert spec[1].speculative.drafted == 0 and spec[0].speculative.accepted > 0


def test_refused_without_mtp(tok):
    model = randomized_model(config().replace(num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="MTP"):
        Engine(model, tok, speculative=True)


# ------------------------------------------------------------------ sampling: the exact target distribution
def test_rejection_rule_keeps_the_target_distribution():
    """`speculative_sample` on fixed p, q: the first token's frequencies over many uniform draws
    match p, the acceptance rate matches sum(min(p, q)), and the token after an accepted draft
    follows p_next; bounds of 5 standard errors."""
    g = torch.Generator().manual_seed(0)
    V, n = 7, 400_000
    p = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    p_next = torch.softmax(torch.randn(V, generator=g), -1)
    q = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    q[2], p[5] = 0.0, 0.0  # a token the draft never proposes, one the target never takes
    q, p = q / q.sum(), p / p.sum()
    draft = torch.multinomial(q, n, replacement=True, generator=g)
    u = torch.rand(n, 3, generator=g)
    toks, acc = speculative_sample(p.expand(n, V), p_next.expand(n, V), q.expand(n, V), draft, u)
    freq = torch.bincount(toks[:, 0], minlength=V).double() / n
    se = (p.double() * (1 - p.double()) / n).sqrt()
    assert ((freq - p.double()).abs() <= 5 * se + 1e-12).all(), (freq, p)
    assert freq[5] == 0
    beta = torch.minimum(p, q).sum().double()
    assert abs(acc.double().mean() - beta) <= 5 * math.sqrt(beta * (1 - beta) / n)
    after = torch.bincount(toks[acc, 1], minlength=V).double() / int(acc.sum())
    se_after = (p_next.double() * (1 - p_next.double()) / int(acc.sum())).sqrt()
    assert ((after - p_next.double()).abs() <= 5 * se_after + 1e-12).all()


def tv_bound(probs: torch.Tensor, n: int, delta: float) -> float:
    """A bound that the total variation between the empirical distribution of n draws and probs
    exceeds with probability at most delta: E[TV] <= 1/2 sum sqrt(p (1 - p) / n) (Jensen), plus
    McDiarmid's deviation sqrt(ln(1/delta) / (2n)) (one draw moves TV by at most 1/n)."""
    mean = 0.5 * (probs * (1 - probs) / n).sqrt().sum().item()
    return mean + math.sqrt(math.log(1 / delta) / (2 * n))


@torch.no_grad()
def exact_first_tokens(model, prompt, depth, temperature, top_k):
    """The target's exact joint distribution of the first `depth` sampled tokens after prompt
    (temperature, top-k applied at every step), over all sequences: {tuple: probability}."""
    seqs, probs = [()], [1.0]
    for _ in range(depth):
        ids = torch.tensor([prompt + list(s) for s in seqs])
        lp = torch.log_softmax(sampling_logits(model(ids)[:, -1].double(), temperature, 1.0, top_k), -1)
        nxt_seqs, nxt_probs = [], []
        for s, p, row in zip(seqs, probs, lp.exp().tolist()):
            for t, pt in enumerate(row):
                if pt > 0:
                    nxt_seqs.append(s + (t,))
                    nxt_probs.append(p * pt)
        seqs, probs = nxt_seqs, nxt_probs
    return dict(zip(seqs, probs))


def test_sampled_tokens_follow_the_target_distribution(tok):
    """On a fixed context, the first three sampled tokens (the prefill's, then one verify step's
    draft-or-replacement and, after an accepted draft, the token after it) over many draws: their
    empirical joint distribution is within the sample-size bound of the target's exact one,
    though the drafts (accepted or not, many times each) come from another distribution."""
    cfg = config(vocab_size=32)
    model = bigram_model(cfg, 3.0, seed=1)
    prompt, temperature, top_k = [3, 4, 5], 1.3, 4
    exact = exact_first_tokens(model, prompt, 3, temperature, top_k)
    n = 4000
    # unseeded requests share one sampling call per step (the global generator, seeded once);
    # seeded ones take the same rule one row at a time (test_rejection_rule_..., reproducibility)
    params = SamplingParams(max_tokens=3, temperature=temperature, top_k=top_k, ignore_eos=True)
    torch.manual_seed(0)
    outs, eng = run(model, tok, [prompt] * n, params, True, max_batch=128, max_context=16)
    counts: dict[tuple, int] = {}
    for o in outs:
        counts[tuple(o.token_ids)] = counts.get(tuple(o.token_ids), 0) + 1
    assert set(counts) <= set(exact)
    keys = sorted(exact)
    p = torch.tensor([exact[k] for k in keys], dtype=torch.float64)
    freq = torch.tensor([counts.get(k, 0) / n for k in keys], dtype=torch.float64)
    tv = 0.5 * (freq - p).abs().sum().item()
    st = eng.speculative_stats
    assert 0.1 < st.acceptance_rate < 0.9, st  # both branches of the rule ran, many times
    assert tv <= tv_bound(p, n, 1e-6), (tv, tv_bound(p, n, 1e-6))


def test_sampled_seed_reproducible_and_logprobs_are_the_targets(models, tok):
    """A seeded request gives the same tokens alone and beside others; each reported log-prob is
    the main model's log-softmax at that position (raw), or its sampling distribution's ("sampled")."""
    model = models["mixed"]
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True)
    alone, _ = run(model, tok, [PROMPTS[1]], params, True)
    other = SamplingParams(max_tokens=7, temperature=1.0, ignore_eos=True)
    beside, _ = run(model, tok, [PROMPTS[0], PROMPTS[1], PROMPTS[2]], [other, params, other], True)
    again, _ = run(model, tok, [PROMPTS[1]], params, True)
    assert alone[0].token_ids == beside[1].token_ids == again[0].token_ids
    assert alone[0].logprobs == pytest.approx(beside[1].logprobs, abs=1e-4)
    for mode in ("raw", "sampled"):
        sp = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True, logprob_mode=mode)
        out = run(model, tok, [PROMPTS[1]], sp, True)[0][0]
        seq = PROMPTS[1] + out.token_ids
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0, len(PROMPTS[1]) - 1:-1].float()  # [12, V]
        if mode == "sampled":
            logits = sampling_logits(logits, 0.9, 0.9, 0)
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
        assert out.logprobs == pytest.approx(want.tolist(), abs=1e-4), mode
