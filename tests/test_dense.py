"""The dense R1-distill students (Llama 3, Qwen2, Qwen3): logit parity with transformers (fp32,
<= 1e-4) including llama3 / linear / yarn RoPE, biases, tied embeddings and q/k norm; RoPE tables
equal to transformers'; cached decode == full forward; greedy generate == transformers' generate;
save -> transformers loads it back equal; `load_model` dispatch and its errors; the engine serves
the dense model exactly as its own generate does."""

import json
import os

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from hf_util import DENSE_CASES, LLAMA3_ROPE, make_hf_dense, make_hf_v2, make_hf_v3
from nanoseek import ConfigError, DeepSeekV3, load_model
from nanoseek.checkpoint import CheckpointError
from nanoseek.dense import DenseModel, GQACache, rope_inv_freq
from nanoseek.dense_config import DenseConfig
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.tokenizer import train_bpe

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
    return request.param, hf, load_model(str(path), dtype=torch.float32)


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
            try:
                ours.rotary.inv_freq, ours.rotary.attention_factor = rope_inv_freq(
                    ours.config.replace(rope_scaling=None))
                assert _max_diff(ours(ids), ref) > TOL, name
            finally:
                ours.rotary.inv_freq, ours.rotary.attention_factor = saved
        if ours.config.qk_norm:
            k_norm = ours.model.layers["0"].self_attn.k_norm
            weight = k_norm.weight.clone()
            try:
                k_norm.weight.fill_(1.0)
                assert _max_diff(ours(ids), ref) > TOL, name
            finally:
                k_norm.weight.copy_(weight)
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
    back = load_model(str(tmp_path))
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


# The config.json files of three released R1-distill students (DeepSeek-R1-Distill-Qwen-1.5B,
# DeepSeek-R1-Distill-Llama-8B, DeepSeek-R1-0528-Qwen3-8B) and their published parameter counts.
RELEASED_CONFIGS = {
    "r1-distill-qwen-1.5b": (1_777_088_000, {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
        "intermediate_size": 8960, "max_position_embeddings": 131072, "max_window_layers": 21,
        "model_type": "qwen2", "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_theta": 10000, "sliding_window": 4096, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.44.0", "use_cache": True, "use_mrope": False,
        "use_sliding_window": False, "vocab_size": 151936}),
    "r1-distill-llama-8b": (8_030_261_248, {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
        "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256}),
    "r1-0528-qwen3-8b": (8_190_735_360, {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 12288,
        "max_position_embeddings": 131072, "max_window_layers": 36, "model_type": "qwen3",
        "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}),
}


@pytest.mark.parametrize("name", list(RELEASED_CONFIGS))
def test_released_configs_read_without_complaint(name, recwarn):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    n_params, d = RELEASED_CONFIGS[name]
    cfg = DenseConfig.from_hf_dict(d)
    assert not [w for w in recwarn if "nanoseek" in str(w.message) or "ignoring" in str(w.message)]
    with torch.device("meta"):
        assert DenseModel(cfg).num_params() == n_params
    if cfg.rope_scaling:
        hf_cfg = transformers.AutoConfig.for_model(**d)
        ref_freq, ref_factor = ROPE_INIT_FUNCTIONS[cfg.rope_scaling["rope_type"]](hf_cfg)
        inv_freq, factor = rope_inv_freq(cfg)
        assert torch.allclose(inv_freq, ref_freq, rtol=1e-6, atol=0) and factor == pytest.approx(ref_factor)


# ------------------------------------------------------------------------------ load_model
def test_load_model_dispatches_on_model_type(tmp_path):
    make_hf_v3(tmp_path / "v3")
    make_hf_v2(tmp_path / "v2")
    make_hf_dense("qwen3", tmp_path / "qwen3", head_dim=32)
    v3, v2 = load_model(str(tmp_path / "v3"), dtype="float32"), load_model(tmp_path / "v2", dtype=torch.float32)
    assert type(v3) is DeepSeekV3 and v3.config.model_type == "deepseek_v3"
    assert type(v2) is DeepSeekV3 and v2.config.model_type == "deepseek_v2"
    dense = load_model(str(tmp_path / "qwen3"), dtype=torch.bfloat16)
    assert type(dense) is DenseModel and dense.lm_head.weight.dtype == torch.bfloat16
    assert dense(_ids((1, 5))).shape == (1, 5, 256)
    # without model_type, the architectures field decides
    cfg_file = tmp_path / "qwen3" / "config.json"
    d = json.loads(cfg_file.read_text())
    del d["model_type"]
    cfg_file.write_text(json.dumps(d))
    again = load_model(str(tmp_path / "qwen3"), dtype=torch.bfloat16)
    assert again.config == dense.config


def _write_config(path, **changes):
    file = os.path.join(path, "config.json")
    with open(file) as f:
        d = json.load(f)
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    with open(file, "w") as f:
        json.dump(d, f)


@pytest.fixture
def llama_dir(tmp_path):
    make_hf_dense("llama", tmp_path / "llama", rope_parameters=LLAMA3_ROPE)
    return str(tmp_path / "llama")


@pytest.mark.parametrize("changes, field, value", [
    (dict(model_type="mistral", architectures=["MistralForCausalLM"]), "'model_type'", "mistral"),
    (dict(architectures=["LlamaForSequenceClassification"]), "'architectures'", "LlamaForSequenceClassification"),
    (dict(model_type=None, architectures=["GPT2LMHeadModel"]), "'model_type' is missing", "GPT2LMHeadModel"),
    (dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)),
     "'rope_parameters.rope_type'", "dynamic"),
    (dict(rope_parameters=None, rope_theta=10000.0, rope_scaling=dict(type="longrope", factor=2.0)),
     "'rope_scaling.rope_type'", "longrope"),
    (dict(rope_parameters=dict(rope_type="llama3", rope_theta=1e4, factor=8.0, low_freq_factor=1.0)),
     "'rope_parameters.high_freq_factor'", "llama3"),
    (dict(use_sliding_window=True, sliding_window=16), "'use_sliding_window'", "sliding-window"),
    (dict(hidden_act="gelu"), "'hidden_act'", "gelu"),
    (dict(use_mrope=True), "'use_mrope'", "multimodal"),
    (dict(num_key_value_heads=3), "'num_key_value_heads'", "multiple"),
    (dict(quantization_config={"quant_method": "gptq"}), "'quantization_config'", "quantized"),
])
def test_load_model_refuses_what_it_does_not_support(llama_dir, changes, field, value):
    _write_config(llama_dir, **changes)
    with pytest.raises(ConfigError) as err:
        load_model(llama_dir)
    assert field in str(err.value) and value in str(err.value) and "config.json" in str(err.value)


def test_load_model_checkpoint_errors(llama_dir, tmp_path):
    weights = os.path.join(llama_dir, "model.safetensors")
    with safe_open(weights, framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    # a missing key, a wrong shape, a non-float tensor: named, before anything is loaded
    save_file({k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}, weights)
    with pytest.raises(CheckpointError, match="missing key 'model.layers.1.mlp.up_proj.weight'"):
        load_model(llama_dir)
    save_file({**state, "model.norm.weight": torch.ones(3)}, weights)
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \(3,\), expected \(64,\)"):
        load_model(llama_dir)
    save_file({**state, "model.norm.weight": torch.ones(64, dtype=torch.int8)}, weights)
    with pytest.raises(CheckpointError, match="'model.norm.weight' has dtype I8"):
        load_model(llama_dir)
    save_file({**state, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, weights)
    with pytest.raises(CheckpointError, match="unexpected key 'model.layers.0.self_attn.q_proj.bias'"):
        load_model(llama_dir)
    # pickles are never read; GGUF is refused by name; no folder, no model
    os.unlink(weights)
    torch.save(state, os.path.join(llama_dir, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match="pickle files are never loaded"):
        load_model(llama_dir)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="GGUF"):
        load_model(str(gguf))
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_model(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------ engine
def test_engine_serves_the_dense_model(tmp_path):
    """The unchanged engine drives the dense model: continuous batching of prompts of different
    lengths (and a repeated prompt) gives each one the model's own greedy generate."""
    tok = train_bpe(["the quick brown fox jumps over the lazy dog. " * 20], 300)
    cfg = DenseConfig(model_type="qwen2", vocab_size=300, hidden_size=64, intermediate_size=112,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      tie_word_embeddings=True, torch_dtype="float32")
    model = DenseModel.from_config(cfg, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)  # sharper logits than the init's, so greedy choices are not near-ties
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [5, 6, 7], [20]]
    eng = Engine(model, tok, max_context=64, max_batch=2)
    try:
        outs = eng.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    finally:
        eng.close()
    for p, o in zip(prompts, outs):
        ref = model.generate(torch.tensor([p]), max_new_tokens=10)[0, len(p):].tolist()
        assert o.token_ids == ref and o.finish_reason == "length"
