"""Contracts of the model: naive == absorbed attention, cached decode == full forward, grouped
experts == a per-expert loop, router semantics, parameter counts, config round trips, MTP."""

import pytest
import torch
import torch.nn.functional as F

from conftest import randomized_model
from nanoseek import PRESETS, DeepSeekV3, ModelConfig
from nanoseek.model import MoE


def test_naive_equals_absorbed(tiny_cfg):
    model = randomized_model(tiny_cfg)
    ids = torch.randint(0, tiny_cfg.vocab_size, (2, 17))
    with torch.no_grad():
        a, b = model(ids, attn_impl="naive"), model(ids, attn_impl="absorb")
    assert (a - b).abs().max().item() < 1e-5


def test_cached_decode_equals_full_forward(tiny_cfg):
    model = randomized_model(tiny_cfg)
    ids = torch.randint(0, tiny_cfg.vocab_size, (2, 14))
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(2, 14)
        steps = [model(ids[:, :6], cache=cache)]  # prefill (naive)
        for t in range(6, 14):  # decode (absorbed) one token at a time
            steps.append(model(ids[:, t:t + 1], start_pos=t, cache=cache))
        # a chunked prefill (several tokens at an offset) through the naive path too
        cache2 = model.make_cache(2, 14)
        chunked = torch.cat([model(ids[:, :5], cache=cache2), model(ids[:, 5:], start_pos=5, cache=cache2)], 1)
    cached = torch.cat(steps, dim=1)
    assert (cached - full).abs().max().item() < 1e-5
    assert (chunked - full).abs().max().item() < 1e-5
    # the cache holds exactly kv_lora_rank + qk_rope_head_dim values per token per layer
    c = cache["0"]
    assert c.latent.shape[-1] + c.k_pe.shape[-1] == tiny_cfg.kv_lora_rank + tiny_cfg.qk_rope_head_dim
    assert len(cache) == tiny_cfg.num_hidden_layers


def _loop_experts(experts, x, indices, weights):
    """Reference: for each expert, the tokens that chose it, accumulated with index_add."""
    out = torch.zeros_like(x)
    for e in range(experts.n_experts):
        tok, slot = torch.where(indices == e)
        if tok.numel() == 0:
            continue
        h = F.silu(x[tok] @ experts.gate_proj[e].t()) * (x[tok] @ experts.up_proj[e].t())
        out = out.index_add(0, tok, (h @ experts.down_proj[e].t()) * weights[tok, slot, None])
    return out


def test_grouped_experts_equal_per_expert_loop(tiny_cfg):
    torch.manual_seed(0)
    model = randomized_model(tiny_cfg)
    moe = next(iter(model.moe_layers().values()))
    x = torch.randn(40, tiny_cfg.hidden_size)
    w, idx, _ = moe.gate(x)
    w, idx = w.detach(), idx.clone()
    idx[0] = torch.tensor([0, 1, 2])  # make sure some expert gets nothing: route nobody to 7
    idx[idx == 7] = 6
    results = []
    for fn in (lambda: moe.experts(x, idx, w), lambda: _loop_experts(moe.experts, x, idx, w)):
        moe.zero_grad()
        out = fn()
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in moe.experts.parameters()]))
    (a, ga), (b, gb) = results
    assert (a - b).abs().max().item() < 1e-6
    for p, q in zip(ga, gb):
        assert (p - q).abs().max().item() < 1e-6
    assert ga[0][7].abs().sum() == 0  # expert with no tokens gets zero gradient


def test_router_v3_semantics():
    cfg = ModelConfig.from_preset("nano", n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2)
    model = DeepSeekV3.from_config(cfg, seed=0)
    gate = next(iter(model.moe_layers().values())).gate
    x = torch.randn(64, cfg.hidden_size)
    with torch.no_grad():
        gate.e_score_correction_bias.copy_(torch.tensor([5.0, 0, 0, 0, 0, 0, 0, 5.0]))
        w, idx, s = gate(x)
    # the bias forces experts 0 and 7 (in two different groups) but does not enter the weights
    assert (idx.sort(dim=1).values == torch.tensor([0, 7])).all()
    sel = s.gather(1, idx)
    assert torch.allclose(w, sel / sel.sum(1, keepdim=True) * cfg.routed_scaling_factor)
    # group limit: chosen experts come from at most topk_group groups
    with torch.no_grad():
        gate.e_score_correction_bias.zero_()
        gate.e_score_correction_bias[0] = -2.0  # negative biased scores: -inf masking still excludes dropped groups
        w, idx, s = gate(x)
    groups = idx // (cfg.n_routed_experts // cfg.n_group)
    assert all(len(set(g.tolist())) <= cfg.topk_group for g in groups)


def test_router_reports_expert_load(tiny_cfg):
    model = randomized_model(tiny_cfg)
    ids = torch.randint(0, tiny_cfg.vocab_size, (2, 10))
    with torch.no_grad():
        model(ids)
    for moe in model.moe_layers().values():
        assert isinstance(moe, MoE)
        assert moe.tokens_per_expert.sum().item() == 20 * tiny_cfg.num_experts_per_tok


@pytest.mark.parametrize("preset", list(PRESETS))
def test_param_counts_match_meta_model(preset):
    cfg = ModelConfig.from_preset(preset)
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    pc = cfg.param_counts()
    assert model.num_params() == pc["total_params"]
    assert model.num_params(include_mtp=True) - model.num_params() == pc["mtp_params"]


def test_deepseek_v3_headline_numbers():
    pc = ModelConfig.from_preset("deepseek-v3").param_counts()
    assert 670e9 < pc["total_params"] < 672e9
    assert 36e9 < pc["active_params"] < 38e9
    assert ModelConfig.from_preset("deepseek-v3").kv_cache_bytes_per_token()["mla_kv_bytes_per_token"] == 70272
    small = ModelConfig.from_preset("small").param_counts()
    assert abs(small["total_params"] / 1e9 - 1.25) < 0.01 and abs(small["active_params"] / 1e6 - 215) < 1


@pytest.mark.parametrize("preset", list(PRESETS))
def test_config_round_trip(preset):
    cfg = ModelConfig.from_preset(preset)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_init_on_meta_then_materialize(tiny_cfg):
    model = DeepSeekV3.from_config(tiny_cfg, seed=1, dtype=torch.bfloat16)
    assert all(p.device.type == "cpu" for p in model.parameters())
    bias = next(iter(model.moe_layers().values())).gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and model.lm_head.weight.dtype == torch.bfloat16
    out = model(torch.randint(0, tiny_cfg.vocab_size, (1, 5)))
    assert out.shape == (1, 5, tiny_cfg.vocab_size) and torch.isfinite(out.float()).all()


def test_mtp_shapes_and_gradients(tiny_cfg):
    model = randomized_model(tiny_cfg).train()
    ids = torch.randint(0, tiny_cfg.vocab_size, (2, 12))
    logits, hidden = model(ids, return_hidden=True)
    mtp = model.mtp_forward(hidden, ids)
    assert [m.shape for m in mtp] == [(2, 11, tiny_cfg.vocab_size), (2, 10, tiny_cfg.vocab_size)]
    loss = sum(F.cross_entropy(m[:, :-1].flatten(0, 1), ids[:, k + 2:].flatten()) for k, m in enumerate(mtp))
    loss.backward()
    assert model.mtp["4"].eh_proj.weight.grad.abs().sum() > 0
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_generate_greedy_equals_argmax_loop(tiny_cfg):
    model = randomized_model(tiny_cfg)
    ids = torch.randint(0, tiny_cfg.vocab_size, (2, 6))
    out = model.generate(ids, max_new_tokens=8, temperature=0.0)
    seq = ids
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    a = model.generate(ids, max_new_tokens=5, temperature=1.0, top_p=0.9, top_k=20, seed=7)
    b = model.generate(ids, max_new_tokens=5, temperature=1.0, top_p=0.9, top_k=20, seed=7)
    assert torch.equal(a, b)


def test_pipeline_stage_is_model_with_parts_removed(tiny_cfg):
    model = randomized_model(tiny_cfg)
    ids = torch.randint(0, tiny_cfg.vocab_size, (1, 7))
    with torch.no_grad():
        full = model(ids)
        h = model.model.embed_tokens(ids)
        stage = randomized_model(tiny_cfg)
        stage.load_state_dict(model.state_dict())
        stage.model.embed_tokens = None
        del stage.model.layers["0"]
        h0 = model.model.layers["0"](h, model.rotary(torch.arange(7)))
        assert (stage(h0) - full).abs().max().item() < 1e-5


def test_mha_comparison_model(tiny_cfg):
    """attention='mha': same heads and dims, full per-head K/V cache; cached decode == full forward."""
    from nanoseek.infer.engine import Engine, SamplingParams
    from nanoseek.tokenizer import train_bpe
    cfg = tiny_cfg.replace(attention="mha")
    model = randomized_model(cfg)
    with torch.device("meta"):
        assert DeepSeekV3(cfg).num_params() == cfg.param_counts()["total_params"]
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(2, 10)
        steps = [model(ids[:, :4], cache=cache)] + [model(ids[:, t:t + 1], start_pos=t, cache=cache) for t in range(4, 10)]
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5
    k, v = cache["0"].tensors
    assert k[0, 0].numel() + v[0, 0].numel() == cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    eng = Engine(model, train_bpe(["abc def " * 20], 300), max_context=32, max_batch=2)
    try:
        outs = eng.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
        for p, o in zip([[1, 2, 3], [4, 5]], outs):
            assert o.token_ids == model.generate(torch.tensor([p]), max_new_tokens=5)[0, len(p):].tolist()
    finally:
        eng.close()
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()).attention == "mha"
