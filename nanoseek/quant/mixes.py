"""Which GGML type each weight gets under a quantization mix: llama.cpp's rule
(src/llama-quant.cpp, llama_tensor_get_type_impl and tensor_type_fallback) for the mixes
"q8_0", "q4_0", "q6_k" and "q4_k_m", applied to nanoseek's module names.

A weight is named by its llama.cpp role (the GGUF tensor name without the block prefix):

    model.embed_tokens -> token_embd        lm_head -> output
    self_attn.{q_proj, k_proj, v_proj, o_proj} -> attn_{q, k, v, output}
    self_attn.kv_b_proj -> attn_kv_b        (other MLA projections: attn_q_a, attn_q_b, attn_kv_a_mqa)
    mlp.{gate,up,down}_proj -> ffn_{gate,up,down}; mlp.experts.* -> ffn_*_exps; mlp.shared_experts.* -> ffn_*_shexp

The rule, for a model that is not Falcon and with no imatrix:

  * output: q6_k, except q8_0 under the q8_0 mix (q8_0 when the row length is not a multiple of
    the mix's block). A head tied to the embedding follows it.
  * attn_v, attn_qkv, attn_kv_b (value-carrying projections, counted in model order): under
    q4_k_m q6_k for the `use_more_bits` ones (the first and last eighth, then every third);
    under every mix q8_0 when the model has exactly 8 routed experts (llama.cpp's Mixtral rule).
  * attn_k: q8_0 when the model has exactly 8 routed experts.
  * ffn_down (dense, routed and shared, by layer index over all blocks, MTP included): under
    q4_k_m q6_k in the `use_more_bits` layers.
  * attn_output: under q4_k_m q5_k in models with exactly 8 routed experts; q5_k is not among
    nanoseek's formats, so such a tensor takes q6_k (the next larger K-quant).
  * everything else (embedding included when it is quantized): the mix's base type (q4_k for q4_k_m).
  * then the fallback for row lengths K that are not a multiple of the block: q4_k -> q5_0,
    q6_k -> q8_0, and f16 when even the 32-block does not fit.

Norms, the router (ffn_gate_inp), the balancing bias and the RoPE tables are never quantized.
"""

from __future__ import annotations

from .ggml import fits

MIXES = {"q8_0": "q8_0", "q4_0": "q4_0", "q6_k": "q6_k", "q4_k_m": "q4_k"}  # mix -> base type
_FALLBACK = {"q4_k": "q5_0", "q6_k": "q8_0"}
_ATTN_V = ("attn_v", "attn_qkv", "attn_kv_b")


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers that get more bits: the first and last eighth, and every
    third one in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def fallback(qtype: str, k: int) -> str:
    """A type whose block divides the row length k (llama.cpp tensor_type_fallback)."""
    if fits(k, qtype):
        return qtype
    qtype = _FALLBACK.get(qtype, qtype)
    return qtype if fits(k, qtype) else "f16"


def tensor_qtype(mix: str, role: str, k: int, *, layer: int = 0, n_layers: int = 1,
                 attn_v_index: int = 0, n_attn_v: int = 1, n_experts: int = 0) -> str:
    """The GGML type of a weight with rows of length k under `mix`. `role` is the llama.cpp role
    (module docstring); `layer` / `n_layers` its block and the number of blocks; `attn_v_index` /
    `n_attn_v` its place among the value-carrying projections (attn_v, attn_qkv, attn_kv_b)."""
    if mix not in MIXES:
        raise ValueError(f"unknown quantization mix {mix!r}; available: {', '.join(MIXES)}")
    base = MIXES[mix]
    qtype = base
    if role == "output":
        if not fits(k, base):
            qtype = "q8_0"
        elif base != "q8_0":
            qtype = "q6_k"
    elif role in _ATTN_V:
        if mix == "q4_k_m" and use_more_bits(attn_v_index, n_attn_v):
            qtype = "q6_k"
        if n_experts == 8:
            qtype = "q8_0"
    elif role == "attn_k":
        if n_experts == 8:
            qtype = "q8_0"
    elif role.startswith("ffn_down"):
        if mix == "q4_k_m" and use_more_bits(layer, n_layers):
            qtype = "q6_k"
    elif role == "attn_output":
        if mix == "q4_k_m" and n_experts == 8:
            qtype = "q6_k"  # llama.cpp: q5_k
    return fallback(qtype, k)


_ROLES = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "q_a_proj": "attn_q_a", "q_b_proj": "attn_q_b", "kv_a_proj_with_mqa": "attn_kv_a_mqa",
    "kv_b_proj": "attn_kv_b", "eh_proj": "nextn.eh_proj",
}
_FFN = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def role_of(name: str) -> tuple[str, int | None]:
    """nanoseek module name -> (llama.cpp role, block index or None). Expert stacks are named by
    their Experts module plus the projection: `model.layers.3.mlp.experts.down_proj`."""
    parts = name.split(".")
    if name in ("lm_head", "mtp.shared_head.head") or name.endswith("shared_head.head"):
        return "output", None
    if name.endswith("embed_tokens"):
        return "token_embd", None
    layer = None
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "mtp") and parts[i + 1].isdigit():
            layer = int(parts[i + 1])
            break
    leaf = parts[-1]
    if leaf in _FFN:
        suffix = "_exps" if "experts" in parts[:-1] and "shared_experts" not in parts else \
            "_shexp" if "shared_experts" in parts else ""
        return _FFN[leaf] + suffix, layer
    return _ROLES.get(leaf, leaf), layer
