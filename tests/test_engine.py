"""Inference engine: greedy parity with transformers' generate, continuous batching == one at a
time, exact latent-cache size, stop strings and streaming, context limit, chat template."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import randomized_model
from hf_util import make_hf_v3
from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.infer.chat import render_chat, split_thinking
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.tokenizer import Tokenizer, train_bpe

CORPUS = ["the quick brown fox jumps over the lazy dog. " * 20, "a stitch in time saves nine! " * 20]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(CORPUS, 300)


@pytest.fixture(scope="module")
def small_model():
    cfg = ModelConfig.from_preset("nano", vocab_size=300, hidden_size=64, intermediate_size=96,
                                  moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                  v_head_dim=12)
    return randomized_model(cfg)


def test_greedy_equals_transformers_generate(tmp_path):
    hf = make_hf_v3(tmp_path)
    ours = DeepSeekV3.from_pretrained(str(tmp_path), dtype=torch.float32)
    ids = torch.randint(2, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    ref = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(ids, max_new_tokens=12), ref)


def test_continuous_batching_equals_one_at_a_time(small_model, tok):
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [20], [30, 31], [40, 41, 42, 43], [50, 51, 52]]
    eng = Engine(small_model, tok, max_context=64, max_batch=4)
    try:
        outs = eng.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
        for p, o in zip(prompts, outs):
            ref = small_model.generate(torch.tensor([p]), max_new_tokens=10)[0, len(p):].tolist()
            assert o.token_ids == ref and o.finish_reason == "length" and o.completion_tokens == 10
        # seeded sampling is reproducible whatever else runs beside it
        a = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=8, temperature=1.0, seed=5))[0]
        b = eng.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=8, temperature=1.0, seed=5))[0]
        assert a.token_ids == b.token_ids
    finally:
        eng.close()


def test_repeated_prompts_share_one_prefill(small_model, tok):
    """Identical prompts admitted together prefill once and copy the cache row: each repeat decodes
    exactly what the prompt alone does (greedy tokens, log-probs), in any order and beside others."""
    p1, p2, p3 = [5, 6, 7, 8], [9, 10, 11, 12], [20, 21]
    prompts = [p1, p2, p1, p3, p1, p2, p3]
    eng = Engine(small_model, tok, max_context=64, max_batch=8)
    try:
        params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
        outs = eng.generate(prompts, params)
        for p, o in zip(prompts, outs):
            ref = eng.generate([p], params)[0]
            assert o.token_ids == ref.token_ids
            assert o.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
            assert o.token_ids == small_model.generate(torch.tensor([p]), max_new_tokens=10)[0, len(p):].tolist()
    finally:
        eng.close()


def test_batch_generate_equals_the_streamed_path(small_model, tok):
    """Batch `generate` keeps no per-token events and decodes each text once at the end; with a stop
    string (never matched) it goes through the streamed path. Same seed: the same tokens, text,
    log-probs, finish reasons and counts, also against a background-loop engine's handles."""
    prompts = [tok.encode(t) for t in ("the quick", "a stitch in", "lazy", "the quick")]
    plain = SamplingParams(max_tokens=12, temperature=1.0)
    streamed = SamplingParams(max_tokens=12, temperature=1.0, stop=["@@never@@"])
    outs = []
    for params in (plain, streamed):
        engine = Engine(small_model, tok, max_context=64, max_batch=4)
        torch.manual_seed(3)
        outs.append(engine.generate(prompts, params))
        engine.close()
    a, b = outs
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.text for c in a] == [c.text for c in b] == [tok.decode(c.token_ids) for c in a]
    assert [c.logprobs for c in a] == [c.logprobs for c in b]
    assert [(c.finish_reason, c.prompt_tokens, c.completion_tokens) for c in a] == \
        [(c.finish_reason, c.prompt_tokens, c.completion_tokens) for c in b]
    assert {c.finish_reason for c in a} <= {"stop", "length"} and all(c.token_ids for c in a)


def test_sampled_logprobs_are_the_sampling_distribution():
    """logprob_mode "sampled": the chosen token's log-prob under the distribution it was drawn
    from (temperature, then top-k / top-p renormalized), recomputed here in float64."""
    from nanoseek.sampling import sample_next
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 3
    for T, top_p, top_k in [(0.7, 1.0, 0), (1.3, 1.0, 5), (0.9, 0.8, 0)]:
        tokens, lp = sample_next(logits, T, top_p, top_k, torch.Generator().manual_seed(1), with_logprobs=True)
        z = logits.double() / T
        keep = torch.ones_like(z, dtype=torch.bool)
        if top_k:
            keep &= z >= z.topk(top_k, dim=-1).values[:, -1:]
        if top_p < 1:
            p_sorted, order = z.softmax(-1).sort(dim=-1, descending=True)
            keep_sorted = p_sorted.cumsum(-1) - p_sorted < top_p
            keep &= torch.zeros_like(keep).scatter(-1, order, keep_sorted)
        ref = z.masked_fill(~keep, float("-inf")).log_softmax(-1).gather(1, tokens[:, None])[:, 0]
        assert keep.gather(1, tokens[:, None]).all()
        assert (lp.double() - ref).abs().max() < 1e-5, (T, top_p, top_k)
        # the same draw as without log-probs
        assert torch.equal(tokens, sample_next(logits, T, top_p, top_k, torch.Generator().manual_seed(1)))
    tokens, lp = sample_next(logits, 0.0, with_logprobs=True)
    assert torch.equal(tokens, logits.argmax(-1)) and not lp.any()
    with pytest.raises(ValueError, match="logprob_mode"):
        SamplingParams(logprob_mode="tempered").validate()


def test_cache_is_exactly_the_latent(small_model, tok):
    cfg = small_model.config
    eng = Engine(small_model, tok, max_context=32, max_batch=2)
    try:
        eng.generate([[1, 2]], SamplingParams(max_tokens=2))
        values = sum(c.latent.numel() + c.k_pe.numel() for c in eng._cache.values())
        assert values == 2 * 32 * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    finally:
        eng.close()


def test_streaming_stop_strings_and_limits(small_model, tok):
    eng = Engine(small_model, tok, max_context=16, max_batch=2)
    try:
        full = eng.generate([[3, 4]], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
        assert full.text == tok.decode(full.token_ids)
        stop = full.text[3:5]
        cut = eng.generate([[3, 4]], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, stop=[stop]))[0]
        assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]
        events = list(eng.submit([3, 4], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)))
        assert events[-1].finish_reason == "length" and len(events) == 16 - 2  # ran into the context end
        with pytest.raises(ValueError, match="context limit of 16"):
            eng.submit(list(range(16)), SamplingParams())
        for bad, field in [(dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"),
                           (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(logprobs=99), "logprobs")]:
            with pytest.raises(ValueError, match=field):
                eng.submit([1], SamplingParams(**bad))
        h = eng.submit([1, 2], SamplingParams(max_tokens=1000, ignore_eos=True))
        h.cancel()
        assert eng.generate([[7]], SamplingParams(max_tokens=2))[0].completion_tokens >= 1  # still serving
    finally:
        eng.close()


def test_chat_template_and_thinking(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>greet</think>Hello!"}, {"role": "user", "content": "2+2?"}]
    text = render_chat(tok, msgs, think=True)
    assert text == ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜>"
                    "<｜User｜>2+2?<｜Assistant｜><think>\n")
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and tok.token_to_id("<think>") in ids  # special tokens are single ids
    assert split_thinking("<think>\nadd them\n</think>\n4") == ("add them", "4")
    assert split_thinking("add them</think>4", opened=True) == ("add them", "4")
    assert split_thinking("just 4") == (None, "just 4")
    with pytest.raises(ValueError, match=r"messages\[0\]\.role"):
        render_chat(tok, [{"role": "wizard", "content": "x"}])
    # a checkpoint's own Jinja template wins
    tok2 = Tokenizer(tok.tk, chat_template="{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                                          "{% if add_generation_prompt %}[assistant]{% endif %}")
    assert render_chat(tok2, [{"role": "user", "content": "yo"}]) == "[user]yo[assistant]"
    # a hostile template from a downloaded checkpoint cannot reach Python's internals
    from jinja2.exceptions import SecurityError
    for evil in ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ messages.append(1) }}",
                 "{{ cycler.__init__.__globals__.os.popen('id').read() }}"):
        with pytest.raises((SecurityError, ValueError)):
            render_chat(Tokenizer(tok.tk, chat_template=evil), [{"role": "user", "content": "yo"}])


def test_generate_cli(tmp_path, small_model, tok):
    small_model.save_pretrained(str(tmp_path))
    tok.save(str(tmp_path))
    p = subprocess.run([sys.executable, "-m", "nanoseek", "generate", str(tmp_path), "the quick", "--max-tokens", "5",
                        "--temperature", "0", "--json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["eval_count"] <= 5 and out["prompt_eval_count"] > 2 and out["done_reason"] in ("stop", "length")
    p = subprocess.run([sys.executable, "-m", "nanoseek", "chat", str(tmp_path), "--max-tokens", "4", "--temperature", "0"],
                       input="hello\n/set parameter temperature 0.5\nagain\n/bye\n", capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert "Set 'parameter temperature 0.5'." in p.stdout


@pytest.mark.slow  # a timing bound on 2 shared cores: 1.8-2.4x typical, 4.4x seen once under load
def test_16_concurrent_streams_share_decode_steps(small_model, tok):
    """Continuous batching: 16 concurrent streams take at most 3x the time of one."""
    import threading
    import time
    eng = Engine(small_model, tok, max_context=128, max_batch=16)
    params = SamplingParams(max_tokens=48, temperature=0.8, ignore_eos=True)
    try:
        def one():
            t = time.perf_counter()
            list(eng.submit([5, 6, 7, 8], params))
            return time.perf_counter() - t

        def sixteen():
            handles = [eng.submit([5, 6, 7, 8], params) for _ in range(16)]
            t = time.perf_counter()
            threads = [threading.Thread(target=lambda h=h: list(h)) for h in handles]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            return time.perf_counter() - t

        one()
        single = min(one() for _ in range(3))
        wall = min(sixteen() for _ in range(2))
        assert wall <= 3 * single, (single, wall)
    finally:
        eng.close()


def test_mtp_speculative_equals_plain_greedy(tiny_cfg):
    model = randomized_model(tiny_cfg)  # MTP depth 2: the first MTP layer drafts
    for seed in range(3):
        ids = torch.randint(0, tiny_cfg.vocab_size, (1, 5 + seed), generator=torch.Generator().manual_seed(seed))
        plain = model.generate(ids, max_new_tokens=15)
        spec = model.generate(ids, max_new_tokens=15, speculative=True)
        assert torch.equal(plain, spec), seed
        st = model.speculative_stats
        assert st.drafted >= 1 and 0 <= st.acceptance_rate <= 1
        assert st.main_steps == st.drafted + 1  # one prefill, then one verify per draft
    with pytest.raises(ValueError, match="MTP"):
        randomized_model(tiny_cfg.replace(num_nextn_predict_layers=0)).generate(ids, speculative=True)


def test_mtp_speculative_accepted_path(tiny_cfg):
    """With a head that always prefers one token, every draft is accepted: the accepted branch
    (two tokens per main step) still gives plain greedy's output."""
    model = randomized_model(tiny_cfg)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[3] = 0.0  # all logits equal: argmax is token 0 everywhere
    ids = torch.randint(1, tiny_cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    plain = model.generate(ids, max_new_tokens=11)
    spec = model.generate(ids, max_new_tokens=11, speculative=True)
    assert torch.equal(plain, spec)
    st = model.speculative_stats
    assert st.acceptance_rate == 1.0 and st.main_steps < 11  # two tokens per verify step


def test_draw_follows_the_distribution():
    """The inverse-CDF sampler: empirical frequencies of 200K draws match the probabilities within
    5 standard errors, a zero-probability token is never drawn, and a seeded generator repeats."""
    from nanoseek.sampling import draw
    probs = torch.tensor([0.5, 0.0, 0.25, 1e-3, 0.0, 0.249]).double()
    n = 200_000
    tokens = draw(probs.float().expand(n, -1), torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=6).double() / n
    se = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 5 * se + 1e-12).all(), freq
    assert freq[1] == 0 and freq[4] == 0
    assert torch.equal(tokens[:100], draw(probs.float().expand(100, -1), torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="row 1"):
        draw(torch.tensor([[0.5, 0.5], [float("nan"), 1.0]]))


def test_text_stream_cuts_at_stop_strings_and_holds_back_their_starts(tok):
    """The deltas of a TextStream, fed token by token, join to the decoded text cut before the
    earliest stop string; text that may start a stop string is held back until it is decided."""
    from nanoseek.infer.textstream import TextStream, partial_suffix
    ids = tok.encode("the quick brown fox jumps over the lazy dog.")
    full = tok.decode(ids)
    for stop in (["fox"], ["lazy", "brown"], ["jumps over", "q"], ["@@never@@"]):
        ts = TextStream(tok, stop)
        deltas, stopped = [], False
        for k, t in enumerate(ids):
            d, stopped = ts.push(t, final=k == len(ids) - 1)
            deltas.append(d)
            if stopped:
                break
        cut = min([full.find(s) for s in stop if s in full], default=len(full))
        assert "".join(deltas) == full[:cut] and stopped == (cut < len(full)), stop
    ts = TextStream(tok, ["the lazy"])
    out = "".join(ts.push(t)[0] for t in tok.encode("over the la"))
    assert out == tok.decode(tok.encode("over "))  # "the la" may still become "the lazy"
    assert partial_suffix("abc <th", "<think>") == 3 and partial_suffix("abc", "<think>") == 0


def test_prompt_logprobs_score_the_prompt(small_model, tok):
    """prompt_logprobs: each prompt token's log-prob from the prefill, equal to the model's own
    log-softmax; max_tokens=0 scores without generating; the generated tokens are unchanged."""
    prompts = [[5, 6, 7, 8, 9], [5, 6, 7, 8, 9], [20, 21, 22]]
    eng = Engine(small_model, tok, max_context=64, max_batch=4)
    try:
        plain = eng.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        scored = eng.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                                                      prompt_logprobs=2))
        only = eng.generate(prompts, SamplingParams(max_tokens=0, prompt_logprobs=0))
        for p, a, b, c in zip(prompts, plain, scored, only):
            with torch.no_grad():
                logp = torch.log_softmax(small_model(torch.tensor([p]))[0, :-1].float(), dim=-1)
            want = logp.gather(1, torch.tensor(p[1:])[:, None])[:, 0].tolist()
            assert b.token_ids == a.token_ids and b.prompt_logprobs[0] == (None, None)
            assert [lp for lp, _ in b.prompt_logprobs[1:]] == pytest.approx(want, abs=1e-5)
            assert [t for t, _ in b.prompt_logprobs[1][1]] == logp[0].topk(2).indices.tolist()
            assert c.token_ids == [] and c.finish_reason == "length" and c.completion_tokens == 0
            assert [lp for lp, _ in c.prompt_logprobs[1:]] == pytest.approx(want, abs=1e-5)
        events = list(eng.submit(prompts[0], SamplingParams(max_tokens=0, prompt_logprobs=1)))
        assert len(events) == 1 and events[0].finish_reason == "length" and len(events[0].prompt_logprobs) == 5
    finally:
        eng.close()
