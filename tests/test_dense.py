"""The dense R1-distill students (Llama 3, Qwen2, Qwen3): logit parity with transformers (fp32,
<= 1e-4) including llama3 / linear / yarn RoPE, biases, tied embeddings and q/k norm; RoPE tables
equal to transformers'; cached decode == full forward; greedy generate == transformers' generate;
save -> transformers loads it back equal."""

import json

import pytest
import torch
import transformers
from safetensors import safe_open

from hf_util import DENSE_CASES, LLAMA3_ROPE, make_hf_dense
from nanoseek.dense import DenseModel, GQACache, rope_inv_freq
from nanoseek.dense_config import DenseConfig

TOL = 1e-4


def _ids(shape=(2, 40), seed=0, low=0):
    return torch.randint(low, 256, shape, generator=torch.Generator().manual_seed(seed))


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module", params=list(DENSE_CASES))
def pair(request, tmp_path_factory):
    """(case name, transformers model, our model loaded from its checkpoint folder)."""
    model_type, kw = DENSE_CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf = make_hf_dense(model_type, path, **kw)
    return request.param, hf, DenseModel.from_pretrained(str(path), dtype=torch.float32)


# ------------------------------------------------------------------------------ parity
def test_logits_equal_transformers(pair):
    name, hf, ours = pair
    assert isinstance(ours, DenseModel)
    ids = _ids()
    with torch.no_grad():
        assert _max_diff(ours(ids), hf(ids).logits) <= TOL, name


def test_parity_depends_on_what_it_tests(pair):
    """The features each case exercises really change the logits, so the parity above covers them."""
    name, hf, ours = pair
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
        if ours.config.rope_scaling:
            saved = ours.rotary.inv_freq, ours.rotary.attention_factor
            plain = ours.config.replace(rope_scaling=None)
            ours.rotary.inv_freq, ours.rotary.attention_factor = rope_inv_freq(plain)
            assert _max_diff(ours(ids), ref) > TOL, name
            ours.rotary.inv_freq, ours.rotary.attention_factor = saved
        if ours.config.qk_norm:
            attn = ours.model.layers["0"].self_attn
            weight = attn.k_norm.weight.clone()
            attn.k_norm.weight.fill_(1.0)
            assert _max_diff(ours(ids), ref) > TOL, name
            attn.k_norm.weight.copy_(weight)
        if ours.config.tie_word_embeddings:
            assert ours.lm_head.weight is ours.model.embed_tokens.weight
        assert _max_diff(ours(ids), ref) <= TOL


@pytest.mark.parametrize("rope", [
    dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=8192),
    LLAMA3_ROPE,
    dict(rope_type="linear", rope_theta=10000.0, factor=2.5),
    dict(rope_type="yarn", rope_theta=1000000.0, factor=4.0, original_max_position_embeddings=32768),
    dict(rope_type="yarn", rope_theta=10000.0, factor=16.0, original_max_position_embeddings=64, beta_fast=16,
         beta_slow=2, mscale=0.9, mscale_all_dim=0.7, truncate=False),
    dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
         attention_factor=0.8),
], ids=["llama3.1", "llama3-tiny", "linear", "yarn-qwen3", "yarn-mscale-untruncated", "yarn-attention-factor"])
def test_rope_tables_equal_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf_cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=131072,
                                      rope_parameters=dict(rope))
    ref_freq, ref_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg)
    cfg = DenseConfig.from_hf_dict(hf_cfg.to_dict())
    inv_freq, factor = rope_inv_freq(cfg)
    assert cfg.head_dim == 128 and inv_freq.shape == ref_freq.shape
    assert torch.allclose(inv_freq, ref_freq, rtol=1e-6, atol=0) and factor == pytest.approx(ref_factor, rel=1e-12)


def test_cached_decode_equals_full_forward(pair):
    name, _, ours = pair
    ids = _ids((2, 14), seed=3)
    with torch.no_grad():
        full = ours(ids)
        cache = ours.make_cache(2, 14)
        steps = [ours(ids[:, :6], cache=cache)] + [ours(ids[:, t:t + 1], start_pos=t, cache=cache)
                                                   for t in range(6, 14)]
        assert _max_diff(torch.cat(steps, 1), full) < 1e-5, name
        # engine style: rows at different positions, one token each, per-sequence start_pos and kv_len
        cache = ours.make_cache(2, 14)
        ours(ids[:1, :5], cache={k: c.rows(0, 1) for k, c in cache.items()})
        ours(ids[1:, :8], cache={k: c.rows(1, 2) for k, c in cache.items()})
        start = torch.tensor([5, 8])
        step = ours(torch.stack([ids[0, 5:6], ids[1, 8:9]]), start_pos=start, kv_len=9, cache=cache)
        assert _max_diff(step[0, 0], full[0, 5]) < 1e-5 and _max_diff(step[1, 0], full[1, 8]) < 1e-5, name
    # the cache holds post-RoPE K and V of the K/V heads only: 2 x KV x head_dim values per token
    c = cache["0"]
    assert isinstance(c, GQACache) and len(cache) == ours.config.num_hidden_layers
    assert c.k.shape == c.v.shape == (2, 14, ours.config.num_key_value_heads, ours.config.head_dim)


def test_greedy_generate_equals_transformers(pair):
    name, hf, ours = pair
    ids = _ids((2, 7), seed=1, low=2)
    ref = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ref.shape == (2, 19)
    assert torch.equal(ours.generate(ids, max_new_tokens=12), ref), name


# ------------------------------------------------------------------------------ saving
def test_save_then_transformers_loads_equal(pair, tmp_path):
    name, _, ours = pair
    ours.save_pretrained(str(tmp_path))
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) == (not ours.config.tie_word_embeddings)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(theirs).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                     "qwen3": "Qwen3ForCausalLM"}[ours.config.model_type]
    ids = _ids()
    with torch.no_grad():
        assert _max_diff(ours(ids), theirs(ids).logits) <= TOL, name


def test_sharded_save_loads_back_identical(tmp_path):
    cfg = DenseConfig(model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=112,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      tie_word_embeddings=True, torch_dtype="float32")
    model = DenseModel.from_config(cfg, seed=0)
    model.save_pretrained(str(tmp_path), max_shard_size=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "model.safetensors").exists()
    back = DenseModel.from_pretrained(str(tmp_path))
    assert back.lm_head.weight.dtype == torch.float32 and back.lm_head.weight is back.model.embed_tokens.weight
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


def test_config_round_trip():
    cfg = DenseConfig(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                      rope_scaling={k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"},
                      attention_bias=True, eos_token_id=[1, 2])
    assert DenseConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    qwen3 = DenseConfig.from_hf_dict({"model_type": "qwen3", "vocab_size": 10, "hidden_size": 64,
                                      "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 4,
                                      "num_key_value_heads": 2})
    assert qwen3.head_dim == 128 and qwen3.qk_norm  # transformers' Qwen3 default, not hidden / heads
