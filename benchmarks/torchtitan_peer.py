"""torchtitan's DeepSeek-V3 model (`torchtitan.models.deepseek_v3`, torchtitan 0.3) built at the same
config as a nanoseek `ModelConfig`, for side-by-side training benchmarks.

Same architecture: MLA with the q low-rank path, DeepSeekMoE with sigmoid scores, group-limited
top-k, routed scaling and the load-balancing bias, grouped-GEMM experts (`torch._grouped_mm`),
shared experts, first-k dense layers. Its options on one GPU are its own best ones: attention as
flex (its default) or its SDPA module, each transformer block under `torch.compile(fullgraph=True)`
exactly as its `apply_compile` does, and bf16 autocast over fp32 weights, which is what its trainer
runs when FSDP is off (world size 1).

torchtitan 0.3.0 imports `DataParallelMeshDims` from `torch.distributed.fsdp` and passes
`separate_full_blocks=` to flex's mask builder; torch 2.11 has neither. A placeholder class and a
wrapper that drops the keyword are enough (torch 2.11 builds the full blocks anyway)."""

from __future__ import annotations

import inspect

import torch


def _patch_for_older_torch() -> None:
    import torch.distributed.fsdp as fsdp
    if not hasattr(fsdp, "DataParallelMeshDims"):
        class DataParallelMeshDims:  # noqa: D401 - only a type annotation in torchtitan
            pass
        fsdp.DataParallelMeshDims = DataParallelMeshDims


def _patch_flex_mask() -> None:
    from torch.nn.attention import flex_attention as fa
    import torchtitan.models.common.attention as tta
    if "separate_full_blocks" in inspect.signature(fa.create_block_mask).parameters:
        return
    original = tta.create_attention_mask

    def create_attention_mask(*args, separate_full_blocks=True, **kwargs):  # noqa: ARG001
        return original(*args, **kwargs)
    tta.create_attention_mask = create_attention_mask
    import torchtitan.models.common.decoder as ttd
    ttd.create_attention_mask = create_attention_mask


def build(cfg, attention: str = "flex", device="cuda"):
    """Returns (model, step_forward) with step_forward(tokens [B, T]) -> logits [B, T, V]."""
    _patch_for_older_torch()
    import torchtitan.models.deepseek_v3 as dsv3
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention
    _patch_flex_mask()
    if cfg.rope_scaling:
        raise ValueError("the peer is built for configs without rope scaling (the `small` preset)")
    layers = dsv3._build_dsv3_layers(
        n_layers=cfg.num_hidden_layers, n_dense_layers=cfg.first_k_dense_replace, dim=cfg.hidden_size,
        n_heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank or 0, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, mscale=1.0, dense_hidden_dim=cfg.intermediate_size,
        moe_hidden_dim=cfg.moe_intermediate_size, num_experts=cfg.n_routed_experts,
        num_shared_experts=cfg.n_shared_experts, router_top_k=cfg.num_experts_per_tok,
        router_score_func="sigmoid", router_num_expert_groups=cfg.n_group,
        router_num_limited_groups=cfg.topk_group, router_route_scale=cfg.routed_scaling_factor,
        router_route_norm=cfg.norm_topk_prob, attn_backend="flex", moe_comm_backend="standard",
        non_blocking_capacity_factor=None,
        rope=ComplexRoPE.Config(dim=cfg.qk_rope_head_dim, max_seq_len=cfg.max_position_embeddings,
                                theta=cfg.rope_theta, scaling="none"))
    for layer in layers:  # its RMSNorm default eps is 1e-5; the config's (1e-6 in DeepSeek-V3) everywhere
        for norm in (layer.attention.q_norm, layer.attention.kv_norm, layer.attention_norm, layer.ffn_norm):
            norm.eps = cfg.rms_norm_eps
    if attention == "sdpa":
        for layer in layers:
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
    elif attention != "flex":
        raise ValueError(f"attention must be flex or sdpa, got {attention!r}")
    mcfg = dsv3.DeepSeekV3Model.Config(
        vocab_size=cfg.vocab_size, dim=cfg.hidden_size,
        tok_embeddings=Embedding.Config(num_embeddings=cfg.vocab_size, embedding_dim=cfg.hidden_size,
                                        param_init=dsv3._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=cfg.hidden_size, eps=cfg.rms_norm_eps, param_init=dsv3._NORM_INIT),
        lm_head=Linear.Config(in_features=cfg.hidden_size, out_features=cfg.vocab_size,
                              param_init=dsv3._output_linear_init(cfg.hidden_size)),
        layers=layers, mtp_layers=[])
    with torch.device("meta"):
        model = mcfg.build()
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_states(buffer_device=torch.device(device))
    model.train()

    def step_forward(tokens: torch.Tensor) -> torch.Tensor:
        if attention == "flex":
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
            return model(tokens, positions, model.get_attention_masks(positions))
        return model(tokens)
    return model, step_forward


def compile_blocks(model) -> None:
    """torchtitan's `apply_compile`: each transformer block compiled with fullgraph=True."""
    torch._dynamo.config.capture_scalar_outputs = True
    for _, block in model.layers.named_children():
        block.compile(fullgraph=True)


def update_expert_bias(model, speed: float = 1e-3) -> None:
    """torchtitan's load-balancing hook, run before each optimizer step: bias += speed * sign(mean - load)."""
    with torch.no_grad():
        for block in model.layers.values():
            moe = getattr(block, "moe", None)
            if moe is None or getattr(moe, "expert_bias_E", None) is None:
                continue
            load = moe.tokens_per_expert_E
            moe.expert_bias_E.add_(speed * torch.sign(load.mean() - load))
            load.zero_()


def load_from_nanoseek(model, ours) -> None:
    """Copies a nanoseek DeepSeekV3's weights (HF names) into torchtitan's model, so that both start
    from the same point and their step-0 losses can be compared."""
    src = {**dict(ours.named_parameters()), **dict(ours.named_buffers())}
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    per_layer = {
        "attention.wq_a.weight": "self_attn.q_a_proj.weight", "attention.q_norm.weight": "self_attn.q_a_layernorm.weight",
        "attention.wq_b.weight": "self_attn.q_b_proj.weight", "attention.wq.weight": "self_attn.q_proj.weight",
        "attention.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
        "attention.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
        "attention.wkv_b.weight": "self_attn.kv_b_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
        "attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
        "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
        "feed_forward.w3.weight": "mlp.up_proj.weight", "moe.router.gate.weight": "mlp.gate.weight",
        "moe.expert_bias_E": "mlp.gate.e_score_correction_bias",
        "moe.routed_experts.inner_experts.w1_EFD": "mlp.experts.gate_proj",
        "moe.routed_experts.inner_experts.w2_EDF": "mlp.experts.down_proj",
        "moe.routed_experts.inner_experts.w3_EFD": "mlp.experts.up_proj",
        "moe.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
        "moe.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
        "moe.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    }
    dst = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, t in dst.items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            if rest not in per_layer:
                continue  # RoPE tables and the expert-load counters are computed, not weights
            key = f"model.layers.{i}.{per_layer[rest]}"
        elif name in names:
            key = names[name]
        else:
            continue
        if key not in src:
            raise KeyError(f"torchtitan {name}: no nanoseek tensor {key}")
        if tuple(src[key].shape) != tuple(t.shape):
            raise ValueError(f"torchtitan {name} {tuple(t.shape)} != nanoseek {key} {tuple(src[key].shape)}")
        with torch.no_grad():
            t.copy_(src[key])
