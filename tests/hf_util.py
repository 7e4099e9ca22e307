"""Tiny random Hugging Face DeepSeek-V2/V3 checkpoints for parity tests (spec section 14)."""

from __future__ import annotations

import torch

V3_KW = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
    routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=163840,
    rms_norm_eps=1e-6, tie_word_embeddings=False, rope_interleave=True,
    num_nextn_predict_layers=0, bos_token_id=0, eos_token_id=1,
    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=40.0,
                         original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                         mscale=1.0, mscale_all_dim=1.0),
)

# Crosses 128-wide FP8 blocks: 576-row kv_a like the real model, partial edge blocks everywhere.
V3_WIDE_KW = {**V3_KW, "hidden_size": 160, "intermediate_size": 300, "moe_intermediate_size": 136,
              "q_lora_rank": 144, "kv_lora_rank": 136, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
              "v_head_dim": 24, "num_attention_heads": 5, "num_key_value_heads": 5}

V2_KW = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, n_group=4, topk_group=2,
    topk_method="group_limited_greedy", routed_scaling_factor=1.5, norm_topk_prob=False,
    max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=1,
    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=40.0,
                         original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                         mscale=0.707, mscale_all_dim=0.707),
)


def randomize_router(model, seed: int = 0) -> None:
    """Spread the router weights and randomize the balancing bias so group routing matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def make_hf_v3(path, seed: int = 0, **overrides):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    torch.manual_seed(seed)
    cfg = DeepseekV3Config(**{**V3_KW, **overrides})
    model = DeepseekV3ForCausalLM(cfg).eval()
    randomize_router(model, seed)
    model.save_pretrained(path)
    return model


def make_hf_v2(path, seed: int = 0, **overrides):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
    torch.manual_seed(seed)
    cfg = DeepseekV2Config(**{**V2_KW, **overrides})
    model = DeepseekV2ForCausalLM(cfg).eval()
    randomize_router(model, seed)
    model.save_pretrained(path)
    return model


# Dense R1-distill students (Llama 3, Qwen2, Qwen3): GQA with 4 query heads on 2 K/V heads.
DENSE_KW = dict(vocab_size=256, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, pad_token_id=0)
# llama3 frequencies with an 8-token original context: a 16-wide head has high, blended and low bands
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)
DENSE_CASES = {
    "llama3": ("llama", dict(rope_parameters=LLAMA3_ROPE)),
    "llama-linear-bias": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
                                        attention_bias=True, mlp_bias=True)),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True, rope_parameters=dict(rope_type="default",
                                                                                 rope_theta=1000000.0))),
    "qwen3": ("qwen3", dict(head_dim=32, rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "qwen3-yarn": ("qwen3", dict(head_dim=32, rope_parameters=dict(rope_type="yarn", rope_theta=1000000.0, factor=4.0,
                                                                   original_max_position_embeddings=64))),
}


def randomize_dense(model, seed: int = 0) -> None:
    """Weights larger than the default init, non-trivial norms and biases, so parity means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)


def make_hf_dense(model_type: str, path=None, seed: int = 0, **overrides):
    """A tiny random transformers Llama / Qwen2 / Qwen3 causal LM, saved to `path` when given."""
    import transformers
    config_cls, model_cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                             "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                             "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[model_type]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(**{**DENSE_KW, **overrides})
    model = getattr(transformers, model_cls)(cfg).eval()
    randomize_dense(model, seed)
    if path is not None:
        model.save_pretrained(path)
    return model
