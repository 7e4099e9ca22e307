"""The baseline MLA is measured against: standard multi-head attention with MLA's heads and head
dims (DeepSeek-V2 report, arXiv 2405.04434, section 2.1: MLA's small KV cache against MHA's full
per-head keys and values; DeepSeek-V3 report, arXiv 2412.19437, section 2.1.1).

`ModelConfig(attention="mha")` builds a `DeepSeekV3` whose layers attend with `MHA` and cache in a
`KVCache`: same query path, RoPE, `AttnInputs` and SDPA as MLA, but K and V projected per head
and cached in full, H x (qk_head_dim + v_head_dim) values per token instead of kv_lora_rank +
qk_rope_head_dim. Used by benchmarks/bench_mla_vs_mha.py. Importing this module (the package
does) adds "mha" to `model.ATTENTION`; the DeepSeek model file itself knows only MLA.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .model import ATTENTION, CAUSAL, MLA, AttnInputs, SequenceCache, apply_rope, sdpa_backends


class KVCache(SequenceCache):
    """Standard attention's cache: full per-head keys and values, H x (qk_head_dim + v_head_dim)
    values per token (the comparison MLA is measured against)."""

    def __init__(self, batch: int, max_len: int, cfg: ModelConfig, dtype=None, device=None):
        H = cfg.num_attention_heads
        super().__init__((torch.zeros(batch, max_len, H, cfg.qk_head_dim, dtype=dtype, device=device),
                          torch.zeros(batch, max_len, H, cfg.v_head_dim, dtype=dtype, device=device)))


class MHA(MLA):
    """Standard multi-head attention with MLA's heads and head dims (the same query path, full
    per-head K/V projections and cache): `ModelConfig(attention="mha")`, the baseline that MLA's
    cache saving is measured against. Not a DeepSeek checkpoint layout."""

    cache_class = KVCache

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        del self.kv_a_proj_with_mqa, self.kv_a_layernorm, self.kv_b_proj
        H = cfg.num_attention_heads
        self.k_proj = nn.Linear(cfg.hidden_size, H * cfg.qk_head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, H * cfg.v_head_dim, bias=False)

    def forward(self, x, rope, cache: KVCache | None = None, inputs: AttnInputs = CAUSAL):
        c, H = self.cfg, self.n_heads
        cos, sin = rope
        B, T, _ = x.shape
        q = (self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if c.q_lora_rank else self.q_proj(x))
        q = q.view(B, T, H, c.qk_head_dim)
        k = self.k_proj(x).view(B, T, H, c.qk_head_dim)
        v = self.v_proj(x).view(B, T, H, c.v_head_dim)
        q_nope, q_pe = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        k_nope, k_pe = k.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        q = torch.cat([q_nope, apply_rope(q_pe, cos, sin)], dim=-1)
        k = torch.cat([k_nope, apply_rope(k_pe, cos, sin)], dim=-1)
        if cache is not None:
            k, v = cache.update(k, v, offsets=inputs.offsets, kv_len=inputs.kv_len)  # [B, S, H, qk], [B, S, H, v]
        mask = inputs.mask
        ctx = sdpa_backends() if q.is_cuda else nullcontext()
        with ctx:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


ATTENTION["mha"] = MHA
