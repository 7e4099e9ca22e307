"""Prefix reuse: a request served with the prefix cache decodes what it decodes without (greedy
tokens, log-probs to the cached == full tolerance), over chat turns, concurrent requests,
cancellation, eviction under a tiny budget, a prompt that is a strict prefix of a kept sequence;
scored prompts bypass reuse; dense (GQA) and MHA caches too; the trie's partial-block matches and leaf-first LRU eviction."""

import threading
import time

import pytest
import torch

from conftest import randomized_model
from nanoseek import ModelConfig
from nanoseek.dense import DenseModel
from nanoseek.dense_config import DenseConfig
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.infer.prefix_cache import PrefixCache
from nanoseek.tokenizer import train_bpe

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["the quick brown fox jumps over the lazy dog. " * 20, "a stitch in time saves nine! " * 20], 300)


@pytest.fixture(scope="module")
def small_model():
    cfg = ModelConfig.from_preset("nano", vocab_size=300, hidden_size=64, intermediate_size=96,
                                  moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                  v_head_dim=12)
    return randomized_model(cfg)


@pytest.fixture()
def engines(small_model, tok):
    """(with reuse, without): the same model, the second with the prefix cache disabled."""
    made = [Engine(small_model, tok, max_context=160, max_batch=4, prefix_cache_tokens=4096, prefix_block=4),
            Engine(small_model, tok, max_context=160, max_batch=4)]
    yield made
    for e in made:
        e.close()


def same(a, b):
    assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
    assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_chat_turns_reuse_earlier_turns(engines):
    """Each turn's prompt is the last one plus its reply plus a new message: the reply and everything
    before it come from the cache, and the turn decodes what a full prefill does."""
    reuse, plain = engines
    conv = list(range(5, 22))
    for turn in range(4):
        a, b = reuse.generate([conv], GREEDY)[0], plain.generate([conv], GREEDY)[0]
        same(a, b)
        assert b.cached_tokens == 0
        # the kept row holds the prompt and every fed reply token (the last sampled one never was)
        assert a.cached_tokens == (0 if turn == 0 else len(conv) - 3 - 1)
        conv = conv + a.token_ids + [40 + turn, 41, 42]
    assert reuse.prefix_cache.hits == 3 and plain.prefix_cache is None


def test_streamed_requests_report_cached_tokens(engines):
    reuse, plain = engines
    prompt = list(range(30, 50))
    reply = reuse.submit(prompt, GREEDY).completion().token_ids
    nxt = prompt + reply + [7, 8]
    events = list(reuse.submit(nxt, GREEDY))
    ref = plain.submit(nxt, GREEDY).completion()
    assert all(e.cached_tokens == len(prompt) + len(reply) - 1 for e in events)
    assert [e.token_id for e in events if e.token_id is not None] == ref.token_ids
    assert [e.logprob for e in events if e.logprob is not None] == pytest.approx(ref.logprobs, abs=1e-5)


def test_strict_prefix_and_exact_repeat(engines):
    """A prompt that a kept sequence starts with reuses all of it but its last token (whose logits
    are needed); repeating a prompt exactly does the same."""
    reuse, plain = engines
    long = list(range(60, 90))
    reuse.generate([long], GREEDY)
    for prompt in (long[:13], long[:16], long):
        a, b = reuse.generate([prompt], GREEDY)[0], plain.generate([prompt], GREEDY)[0]
        same(a, b)
        assert a.cached_tokens == len(prompt) - 1


def test_concurrent_requests_sharing_a_system_prompt(engines):
    """Requests with a common system prefix, submitted together from threads beside unrelated
    ones, more than the batch holds: each decodes what it does alone without reuse."""
    reuse, plain = engines
    system = list(range(100, 125))
    reuse.generate([system + [1]], GREEDY)
    prompts = [system + [k, k + 1, k + 2][: 1 + k % 3] for k in range(2, 9)] + [[9, 8, 7], [200, 201]]
    out = [None] * len(prompts)

    def run(i):
        out[i] = reuse.submit(prompts[i], GREEDY).completion()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p, a in zip(prompts, out):
        same(a, plain.generate([p], GREEDY)[0])
        assert a.cached_tokens >= (len(system) if p[:len(system)] == system else 0)


def test_cancelled_request_leaves_a_correct_cache(engines):
    """A request cancelled mid-stream keeps the positions it had fed; the next turn built on its
    partial reply still decodes what a full prefill does."""
    reuse, plain = engines
    prompt = list(range(130, 150))
    h = reuse.submit(prompt, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    got = []
    for ev in h.events():
        if ev.token_id is not None:
            got.append(ev.token_id)
        if len(got) == 5:
            h.cancel()
    deadline = time.monotonic() + 10
    while reuse.prefix_cache.tokens == 0 and time.monotonic() < deadline:  # the engine retires it
        time.sleep(0.01)
    nxt = prompt + got[:4] + [3, 4]
    a, b = reuse.generate([nxt], GREEDY)[0], plain.generate([nxt], GREEDY)[0]
    same(a, b)
    assert a.cached_tokens >= len(prompt) + 4


def test_eviction_under_a_tiny_budget(small_model, tok):
    """A budget of a few blocks: the kept tokens never exceed it, and every answer is unchanged."""
    reuse = Engine(small_model, tok, max_context=160, max_batch=2, prefix_cache_tokens=10, prefix_block=4)
    plain = Engine(small_model, tok, max_context=160, max_batch=2)
    try:
        prompts = [list(range(s, s + 11)) for s in (5, 5, 50, 5, 90, 90)]
        for p in prompts:
            same(reuse.generate([p], GREEDY)[0], plain.generate([p], GREEDY)[0])
            assert reuse.prefix_cache.tokens <= 10
        assert reuse.prefix_cache.hits > 0
    finally:
        reuse.close()
        plain.close()


def test_scored_prompts_bypass_reuse(engines):
    """prompt_logprobs need every prompt token's logits: such requests prefill in full, so their
    scores equal the plain engine's exactly, and report nothing cached."""
    reuse, plain = engines
    prompt = list(range(150, 170))
    reuse.generate([prompt], GREEDY)
    for sp in (SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=1),
               SamplingParams(max_tokens=0, prompt_logprobs=0)):
        a, b = reuse.generate([prompt], sp)[0], plain.generate([prompt], sp)[0]
        assert a.cached_tokens == 0 and a.prompt_logprobs == b.prompt_logprobs and a.token_ids == b.token_ids


def test_trie_partial_matches_and_leaf_first_eviction():
    def rows(n, base=0.0):  # two tensor kinds, 2 layers: [2, n, 1]
        x = base + torch.arange(n, dtype=torch.float32)[None, :, None].expand(2, n, 1)
        return x, -x

    pc = PrefixCache(max_tokens=12, block_size=4)
    pc.insert(list(range(10)), rows(10))  # blocks [0..3] [4..7] [8, 9]
    assert pc.tokens == 10 and len(pc) == 3
    n, data = pc.match([0, 1, 2, 3, 4, 5, 99], limit=100)  # a partial block inside [4..7]
    assert n == 6 and data[0][0, :, 0].tolist() == [0, 1, 2, 3, 4, 5] and torch.equal(data[1], -data[0])
    assert pc.match(list(range(10)), limit=9)[0] == 9  # bounded by limit
    assert pc.match([7, 7], limit=2) == (0, None)
    pc.insert([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], rows(12))  # [8..11] replaces the shorter [8, 9]
    assert pc.tokens == 12 and len(pc) == 3
    pc.insert([50, 51, 52, 53, 54], rows(5, 50.0))  # over budget: least recent leaves go first
    assert pc.tokens <= 12
    assert pc.match([50, 51, 52, 53, 54], limit=5)[0] == 5
    assert pc.match(list(range(12)), limit=12)[0] == 4  # its root block stays reachable
    assert PrefixCache(0).insert([1, 2], rows(2)) is None


@pytest.mark.parametrize("kind", ["dense", "mha"])
def test_other_caches_reuse_too(kind, tok):
    """The prefix cache keeps whatever tensors a layer's cache holds: a dense model's GQA keys and
    values, the MHA comparison model's per-head K/V; answers are unchanged."""
    if kind == "dense":
        model = DenseModel.from_config(DenseConfig(model_type="llama", vocab_size=300, hidden_size=64,
                                                   intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                                                   num_key_value_heads=2, head_dim=8), seed=0).eval()
    else:
        model = randomized_model(ModelConfig.from_preset(
            "nano", vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=2, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=12, attention="mha"))
    reuse = Engine(model, tok, max_context=128, max_batch=2, prefix_cache_tokens=1024, prefix_block=4)
    plain = Engine(model, tok, max_context=128, max_batch=2)
    try:
        conv = list(range(5, 20))
        for turn in range(3):
            a, b = reuse.generate([conv], GREEDY)[0], plain.generate([conv], GREEDY)[0]
            same(a, b)
            assert (a.cached_tokens > 0) == (turn > 0)
            conv = conv + a.token_ids + [40 + turn, 41]
    finally:
        reuse.close()
        plain.close()
