"""The DeepSeek-V3 architecture in one file (DeepSeek-V3 report, arXiv 2412.19437, section 2).

- RMSNorm; RoPE on interleaved pairs with YaRN frequencies (section 2.1.1 / DeepSeek-V2 report).
- Multi-head Latent Attention (MLA, section 2.1.1): low-rank query, compressed KV latent with its
  norm, a decoupled RoPE key shared by all heads. Two tested-equal paths: `naive` (decompress K/V,
  for training and prefill) and `absorb` (W_UK folded into the query, W_UV into the output; attends
  over the cached latent and rope key only).
- DeepSeekMoE (section 2.1.2): sigmoid router with the auxiliary-loss-free bias (used only for
  choosing experts), group-limited top-k, normalized gate weights times the routed scale, shared
  experts. DeepSeek-V2 routing (softmax, greedy / group-limited greedy) is the same router.
- Multi-token prediction (section 2.2): D sequential modules sharing embedding and output head.
- Where a call's tokens sit (cache offsets as a tensor, cache read length, the one attention mask,
  the MLA path) is one `AttnInputs`, built once per model call; every layer takes
  (x, rope, cache, inputs), as DeepSeek's and gpt-fast's attention take four arguments.

Parameter names follow the Hugging Face DeepSeek-V3 checkpoint (`model.layers.3.self_attn.q_a_proj.weight`
...) with two documented exceptions handled in `checkpoint.py`: routed experts are stacked into
[E, out, in] tensors (`mlp.experts.gate_proj`), and MTP layer `num_hidden_layers + i` lives at
`mtp.<idx>` instead of `model.layers.<idx>`. The model knows nothing of distribution or precision;
layers live in a string-keyed ModuleDict and `forward` tolerates a missing embedding, norm or head
so that a pipeline stage is the same model with parts removed.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint
from .config import ModelConfig
from .sampling import sample_next
from .speculative import generate_speculative


# --------------------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """y = weight * x / rms(x), normalized in fp32 then cast back (Hugging Face's order)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


# --------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Inverse frequencies [qk_rope_head_dim / 2], with YaRN's ramp between interpolation and
    extrapolation when `rope_scaling` is set (formulas of the YaRN paper as DeepSeek uses them)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    inv_freq = 1.0 / pos_freqs
    rs = cfg.rope_scaling
    if not rs:
        return inv_freq
    factor = rs["factor"]
    orig = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(num_rotations):
        return dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 keeps the original (fast) frequency, 0 divides it by `factor`
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + inv_freq * extrapolation


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions, in fp32, times YaRN's cos/sin attention factor."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.attention_factor = cfg.rope_attention_factor
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def reset_parameters(self) -> None:
        self.inv_freq = rope_inv_freq(self.cfg, device=self.inv_freq.device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [T] or [B, T] -> cos, sin [B or 1, T, rope/2]
        angles = positions.float()[..., None] * self.inv_freq
        if angles.dim() == 2:
            angles = angles[None]
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of x [B, T, H, rope] in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))  # [B, T, H, rope/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, rope/2]
    return torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2).to(x.dtype)


# --------------------------------------------------------------------------------------- MLA
class SequenceCache:
    """Per-layer decode cache: tensors [B, max_len, ...] written at each sequence's position."""

    def __init__(self, tensors: tuple[torch.Tensor, ...]):
        self.tensors = tensors

    def rows(self, start: int, end: int) -> "SequenceCache":
        """A view of sequences start..end-1 (shares storage)."""
        return SequenceCache(tuple(t[start:end] for t in self.tensors))

    def move_row(self, src: int, dst: int, length: int) -> None:
        for t in self.tensors:
            t[dst, :length] = t[src, :length]

    def copy_rows(self, src: torch.Tensor, dst: int, length: int) -> None:
        """Rows dst, dst+1, ... take the first `length` positions of rows src [n] (shared prefixes)."""
        for t in self.tensors:
            t[dst:dst + len(src), :length] = t[src, :length]

    @property
    def max_len(self) -> int:
        return self.tensors[0].shape[1]

    def update(self, *new: torch.Tensor, offsets: torch.Tensor, kv_len: int):
        """Write new [B, T, ...] at each row's offset (offsets [B], or [1] for all rows) and return
        the cache's first kv_len positions [B, kv_len, ...]."""
        B, T = new[0].shape[:2]
        rows = torch.arange(B, device=new[0].device)[:, None]
        cols = offsets[:, None] + torch.arange(T, device=new[0].device)[None]  # [B|1, T]
        for t, x in zip(self.tensors, new):
            t[rows, cols] = x.to(t.dtype)
        return tuple(t[:, :kv_len] for t in self.tensors)


class LatentCache(SequenceCache):
    """The MLA decode cache of one layer: the normalized KV latent and the post-RoPE shared key,
    (kv_lora_rank + qk_rope_head_dim) values per token, nothing per head."""

    def __init__(self, batch: int, max_len: int, cfg: ModelConfig, dtype=None, device=None):
        super().__init__((torch.zeros(batch, max_len, cfg.kv_lora_rank, dtype=dtype, device=device),
                          torch.zeros(batch, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device)))

    @property
    def latent(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def k_pe(self) -> torch.Tensor:
        return self.tensors[1]


def sdpa_backends():
    """On GPU, prefer cuDNN attention: it accepts MLA's unequal q/k and v head dims and is the
    fastest there; flash refuses them (benchmarks/RESULTS.md, the model benchmark's profile)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                            SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True)
    except (ImportError, TypeError):
        return nullcontext()


def build_attention_mask(T: int, S: int, offsets: torch.Tensor, key_valid: torch.Tensor | None):
    """Boolean mask [B or 1, 1, T, S], True = may attend: query t of row b sits at key position
    offsets[b] + t (offsets [B], or [1] for all rows) and sees the keys up to it; optional key
    padding ([B, >= S], True = real token). A query always sees its own key, so no row is empty."""
    device = offsets.device
    q_pos = (offsets[:, None] + torch.arange(T, device=device)[None])[:, None, :, None]  # [B|1, 1, T, 1]
    k_pos = torch.arange(S, device=device)[None, None, None, :]
    mask = k_pos <= q_pos
    if key_valid is not None:
        mask = (mask & key_valid[:, None, None, :S].bool()) | (k_pos == q_pos)
    return mask


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask [B, 1, T, T] (True = may attend) for packed sequences: a query
    sees only earlier keys of its own segment ([B, T] ids, one per packed document)."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return (segment_ids[:, None, :, None] == segment_ids[:, None, None, :]) & causal


@dataclass(frozen=True, eq=False)
class AttnInputs:
    """Where one model call's new tokens sit, built once per call (`AttnInputs.build`) and passed
    to every attention layer (what vLLM calls attention metadata; DeepSeek's and gpt-fast's
    `start_pos` / `input_pos` and `mask`). The default is a fresh causal forward without a cache:
    nothing to build, and SDPA takes `is_causal`."""

    offsets: torch.Tensor | None = None  # [B], or [1] for all rows: cache slot of each row's first new token
    kv_len: int | None = None  # S, the cache positions attention reads (a fresh forward: the T new tokens)
    mask: torch.Tensor | None = None  # [B|1, 1, T, S] bool, True = may attend; None: causal over the new tokens
    impl: str | None = None  # "naive" | "absorb"; None: naive for T > 1, absorb for one token

    @classmethod
    def build(cls, T: int, start_pos=0, device=None, *, cache_len: int | None = None, kv_len: int | None = None,
              key_valid: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
              impl: str | None = None) -> "AttnInputs":
        """T new tokens from `start_pos`: an int (every row), or a LongTensor [B] for rows at
        different positions, whose cache read is bounded by `kv_len` (else the whole cache).
        `cache_len`: the cache's length when there is one. The mask joins causality (with the
        rows' offsets), key padding (`key_valid` [B, >= S], True = real token) and packing
        (`segment_ids` [B, T], one id per document)."""
        if isinstance(start_pos, int):
            S = T if cache_len is None else start_pos + T
            if cache_len is not None and S > cache_len:
                raise ValueError(f"KV cache overflow: position {S} exceeds its length {cache_len}")
            offsets = torch.full((1,), start_pos, dtype=torch.long, device=device)
            causal_from_zero = S == T  # a fresh forward: SDPA's is_causal, no mask
            mask_offsets = torch.full((1,), S - T, dtype=torch.long, device=device)
        else:
            S = T if cache_len is None else min(kv_len if kv_len is not None else cache_len, cache_len)
            offsets = mask_offsets = start_pos
            causal_from_zero = False
        mask = None
        if not causal_from_zero or key_valid is not None:
            mask = build_attention_mask(T, S, mask_offsets, key_valid)
        if segment_ids is not None:  # packed sequences' block-diagonal causal mask [B, 1, T, T]
            packing = segment_mask(segment_ids)
            mask = packing if mask is None else mask & packing
        return cls(offsets, S, mask, impl)

    def positions(self, T: int) -> torch.Tensor:
        """Positions [B|1, T] of the new tokens (for RoPE)."""
        return self.offsets[:, None] + torch.arange(T, device=self.offsets.device)[None]


CAUSAL = AttnInputs()  # a fresh causal forward without a cache (training, pipeline stages)


class MLA(nn.Module):
    """Multi-head Latent Attention (HF module `self_attn`); its decode cache is a `LatentCache`."""

    cache_class = LatentCache

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, H = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads = H
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(h, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, h, bias=False)
        self.softmax_scale = cfg.softmax_scale

    def project(self, x, cos, sin):
        """x [B, T, h] -> q_nope [B,T,H,nope], q_pe [B,T,H,rope], latent [B,T,r], k_pe [B,T,rope]."""
        c = self.cfg
        B, T, _ = x.shape
        if c.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.view(B, T, self.n_heads, c.qk_head_dim)
        q_nope, q_pe = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_pe = apply_rope(k_pe[:, :, None, :], cos, sin)[:, :, 0]  # one head, shared by all heads
        return q_nope, q_pe, latent, k_pe

    def forward(self, x, rope, cache: LatentCache | None = None, inputs: AttnInputs = CAUSAL):
        """x [B, T, h], rope (cos, sin) [B|1, T, rope/2] -> [B, T, h]. With a cache, the new latents
        go to `inputs.offsets` and attention reads its first `inputs.kv_len` positions."""
        B, T, _ = x.shape
        q_nope, q_pe, latent, k_pe = self.project(x, *rope)
        if cache is not None:
            latent, k_pe = cache.update(latent, k_pe, offsets=inputs.offsets, kv_len=inputs.kv_len)  # [B, S, r], [B, S, rope]
        impl = inputs.impl or ("naive" if T > 1 else "absorb")
        if impl == "naive":
            o = self._naive(q_nope, q_pe, latent, k_pe, inputs.mask)
        elif impl == "absorb":
            o = self._absorbed(q_nope, q_pe, latent, k_pe, inputs.mask)
        else:
            raise ValueError(f"unknown attention impl {impl!r} (expected 'naive' or 'absorb')")
        return self.o_proj(o.reshape(B, T, -1))

    def _naive(self, q_nope, q_pe, latent, k_pe, mask):
        """Decompress per-head K/V from the latent and run standard attention (SDPA)."""
        c, H = self.cfg, self.n_heads
        B, S, _ = latent.shape
        kv = self.kv_b_proj(latent).view(B, S, H, c.qk_nope_head_dim + c.v_head_dim)
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, S, H, c.qk_rope_head_dim)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        ctx = sdpa_backends() if q.is_cuda else nullcontext()
        with ctx:
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # [B, H, T|S, d]
                attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale)
        return o.transpose(1, 2)  # [B, T, H, v]

    def _absorbed(self, q_nope, q_pe, latent, k_pe, mask):
        """Attend over the latent directly: scores = (q_nope W_UK) . c + q_pe . k_pe, then W_UV."""
        c, H = self.cfg, self.n_heads
        w = self.kv_b_proj.weight.view(H, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        w_uk, w_uv = w[:, :c.qk_nope_head_dim], w[:, c.qk_nope_head_dim:]  # [H, nope, r], [H, v, r]
        q_lat = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)  # [B, T, H, r]
        scores = (torch.einsum("bthr,bsr->bhts", q_lat, latent)
                  + torch.einsum("bthd,bsd->bhts", q_pe, k_pe)) * self.softmax_scale
        if mask is None:  # causal over the new tokens
            T, S = scores.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T)
        scores = scores.float().masked_fill(~mask, float("-inf"))
        p = scores.softmax(dim=-1).to(latent.dtype)  # [B, H, T, S]
        o_lat = torch.einsum("bhts,bsr->bthr", p, latent)  # [B, T, H, r]
        return torch.einsum("bthr,hdr->bthd", o_lat, w_uv)  # [B, T, H, v]


ATTENTION: dict[str, type[nn.Module]] = {"mla": MLA}  # ModelConfig.attention -> the attention module
# (nanoseek/mha.py adds "mha", the standard-attention baseline MLA is measured against)


# --------------------------------------------------------------------------------------- FFN
class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); the dense FFN and the shared experts."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Top-k expert choice (HF module `mlp.gate`).

    V3 (`noaux_tc`): s = sigmoid(x Wg); choose with s + e_score_correction_bias; groups ranked by
    the sum of their top-2 biased scores, the other groups masked with -inf; gate weights are the
    *unbiased* s of the chosen experts, normalized, times routed_scaling_factor.
    V2 (`greedy`, `group_limited_greedy`): softmax scores, groups ranked by their max, no bias.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.uses_bias_routing:
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor):
        """x [N, h] -> weights [N, k] (fp32), indices [N, k], scores [N, E] (fp32)."""
        c = self.cfg
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if c.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if c.topk_method != "greedy" and c.topk_group < c.n_group:
            grouped = choice.detach().view(-1, c.n_group, c.n_routed_experts // c.n_group)
            if c.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
            else:
                group_scores = grouped.amax(dim=-1)
            kept = group_scores.topk(c.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
            keep = keep[:, :, None].expand_as(grouped).reshape_as(choice)
            choice = choice.masked_fill(~keep, float("-inf"))
        indices = choice.topk(c.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, indices)
        if c.norm_topk_prob and c.num_experts_per_tok > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * c.routed_scaling_factor, indices, scores


def expert_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens per expert [E] from indices [N, k], without a device-to-host sync (unlike bincount)."""
    flat = indices.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's GEMMs run in: autocast's for x's device while it is on, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def linear_dtype_device(linear: nn.Module) -> tuple[torch.dtype, torch.device]:
    """A linear layer's weight dtype and device, read without materializing the weight: a quantized
    layer (quant/qlinear.QuantLinear) keeps them as its `dtype` and its blocks' device, where
    reading `.weight` would dequantize the whole matrix."""
    if hasattr(linear, "qweight") and not isinstance(linear, nn.Linear):
        return linear.dtype, linear.qweight.device
    return linear.weight.dtype, linear.weight.device


def sort_by_expert(indices: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """indices [N, k] -> order [N*k] (the token-expert pair slots sorted by expert, stable) and the
    pairs per expert [E]: after x[order // k], expert e's tokens form one contiguous segment."""
    order = indices.reshape(-1).argsort(stable=True)
    return order, expert_counts(indices, n_experts)


def combine(ys: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ys [N*k, h] in expert order, weights [N, k] -> sum_k weights * ys [N, h]: weighted in fp32,
    un-permuted to (token, slot) order, summed over each token's k experts in fp32, cast to dtype."""
    N, k = weights.shape
    ys = ys.float() * weights.reshape(-1)[order, None].float()
    unsorted = torch.empty_like(ys)
    unsorted[order] = ys  # back to (token, slot) order; the backward is a gather
    return unsorted.view(N, k, -1).sum(dim=1).to(dtype)


class Experts(nn.Module):
    """The routed experts as stacked weights (HF keys `mlp.experts.<e>.<proj>.weight` on disk).

    forward = dispatch (sort the token-expert pairs by expert) -> `expert_mlp` (each expert's SwiGLU
    on its contiguous segment) -> combine (weight, un-permute, sum over each token's k experts in
    fp32). The GEMMs go through two seams: `grouped_gemm`, one `torch._grouped_mm` over all segments
    (on GPUs that have it: bf16, Hopper or newer), and `segment_gemm`, one expert's segment (the
    loop over segments everywhere else; same math). Variants override only what differs: FP8
    training `expert_mlp` (quant/fp8.py), FP8-stored weights the two GEMMs (infer/fp8_weights.py), expert
    parallelism `forward` (an all-to-all dispatcher around the same `expert_mlp`,
    parallel/expert_parallel.py). torchtitan's GroupedExperts has the same shape.
    """

    def __init__(self, n_experts: int, hidden: int, inter: int):
        super().__init__()
        self.n_experts = n_experts
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inter, hidden))
        self.up_proj = nn.Parameter(torch.empty(n_experts, inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, inter))
        self.impl = "auto"  # "auto" | "grouped_mm" | "segments"

    def _use_grouped_mm(self, x, dtype) -> bool:
        if self.impl != "auto":
            return self.impl == "grouped_mm"
        return (x.is_cuda and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
                and torch.cuda.get_device_capability(x.device)[0] >= 9)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, h], indices/weights [N, k] -> sum_k weights * expert_k(x)  [N, h]."""
        N, k = indices.shape
        order, counts = sort_by_expert(indices, self.n_experts)
        ys = self.expert_mlp(x[order // k], counts)  # [N*k, h], grouped by expert
        return combine(ys, order, weights, x.dtype)

    def expert_mlp(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [M, h] sorted by expert, counts [E] rows per expert -> down(silu(gate xs) * up xs)
        [M, h], each segment through its own expert, in the compute dtype."""
        dtype = compute_dtype(xs)
        xs = xs.to(dtype)
        w1, w3, w2 = self.gate_proj, self.up_proj, self.down_proj  # read once (they may be computed, e.g. LoRA)
        if self._use_grouped_mm(xs, dtype):
            offs = counts.cumsum(0).to(torch.int32)  # [E] end of each expert's segment
            hidden = F.silu(self.grouped_gemm(xs, w1, offs)) * self.grouped_gemm(xs, w3, offs)  # [M, inter]
            return self.grouped_gemm(hidden, w2, offs)
        outs = []
        for e, seg in enumerate(xs.split(counts.tolist())):
            if seg.shape[0]:
                hdn = F.silu(self.segment_gemm(seg, w1, e)) * self.segment_gemm(seg, w3, e)  # [n_e, inter]
                outs.append(self.segment_gemm(hdn, w2, e))
        return torch.cat(outs) if outs else xs.new_zeros(0, xs.shape[1])

    def grouped_gemm(self, x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """x [M, in] sorted by expert, weight [E, out, in], offs [E] int32 segment ends -> [M, out]:
        each segment times its expert's weight^T, one launch for all experts."""
        return torch._grouped_mm(x, weight.to(x.dtype).transpose(-2, -1), offs=offs)

    def segment_gemm(self, x: torch.Tensor, weight: torch.Tensor, e: int) -> torch.Tensor:
        """x [n_e, in], the segment of expert e -> x weight[e]^T [n_e, out]."""
        return x @ weight[e].t()


class MoE(nn.Module):
    """DeepSeekMoE: routed experts plus always-on shared experts (HF module `mlp`).

    After each forward, `tokens_per_expert` [E] holds how many tokens chose each expert (the
    load that auxiliary-loss-free balancing acts on) and `router_scores` the [N, E] scores."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        self.tokens_per_expert: torch.Tensor | None = None
        self.router_scores: torch.Tensor | None = None
        self.router_indices: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, indices, scores = self.gate(flat)
        self.tokens_per_expert = expert_counts(indices.detach(), self.experts.n_experts)
        self.router_scores, self.router_indices = scores, indices
        out = self.experts(flat, indices, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)


# --------------------------------------------------------------------------------------- blocks
class Block(nn.Module):
    """Pre-norm decoder layer: h += MLA(norm(h)); h += FFN(norm(h))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = ATTENTION[cfg.attention](cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, rope, cache: SequenceCache | None = None, inputs: AttnInputs = CAUSAL):
        """x [B, T, h], rope (cos, sin) of the T positions -> [B, T, h]."""
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, inputs)
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    """The MTP module's output norm; the head itself is the main model's lm_head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(Block):
    """Multi-token prediction module k: h'_i = eh_proj([enorm(emb(t_{i+k})); hnorm(h^{k-1}_i)]),
    then a full decoder block. (The released weights put the embedding first.)"""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, h_prev, emb, rope, cache: SequenceCache | None = None, inputs: AttnInputs = CAUSAL):
        """h_prev [B, T, h] (depth k-1), emb [B, T, h] (tokens i+k) -> h^k [B, T, h]."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        return super().forward(x, rope, cache, inputs)


class Backbone(nn.Module):
    """HF `model.*`: embedding, the decoder layers (ModuleDict keyed by layer index), final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.num_hidden_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# --------------------------------------------------------------------------------------- model
class DeepSeekV3(nn.Module):
    """DeepSeek-V3 (and V2) causal language model. `model(input_ids)` returns logits [B, T, V]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        N = cfg.num_hidden_layers
        self.mtp = nn.ModuleDict({str(N + i): MTPLayer(cfg, N + i) for i in range(cfg.num_nextn_predict_layers)})
        self.rotary = RotaryEmbedding(cfg)

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(cls, cfg: ModelConfig, device=None, dtype=None) -> "DeepSeekV3":
        """Built on the meta device, then given uninitialized storage on `device` (the balancing
        bias kept fp32 whatever `dtype`, as in the release) and its RoPE tables: load weights into
        it, or `init_weights()`."""
        with torch.device("meta"):
            model = cls(cfg)
        if dtype is not None:
            model.to(dtype)
            for m in model.modules():
                if isinstance(m, Router) and m.e_score_correction_bias is not None:
                    m.e_score_correction_bias = m.e_score_correction_bias.float()
        model.to_empty(device=device or "cpu")
        model.rotary.reset_parameters()
        return model

    @classmethod
    def from_config(cls, cfg: ModelConfig, device=None, dtype=None, seed: int | None = None) -> "DeepSeekV3":
        """Build on the meta device, then materialize on `device` and initialize."""
        model = cls.empty(cfg, device=device, dtype=dtype)
        if seed is not None:
            torch.manual_seed(seed)
        model.init_weights()
        return model

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norms, zero router bias;
        output projections scaled by 1/sqrt(2 * layers) as in GPT-2."""
        std = std or self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, (RMSNorm, RotaryEmbedding)):
                module.reset_parameters()
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                s = out_std if name.endswith(("o_proj", "down_proj")) else std
                nn.init.normal_(module.weight, 0.0, s)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, 0.0, std)
                if module.e_score_correction_bias is not None:
                    module.e_score_correction_bias.zero_()
            elif isinstance(module, Experts):
                nn.init.normal_(module.gate_proj, 0.0, std)
                nn.init.normal_(module.up_proj, 0.0, std)
                nn.init.normal_(module.down_proj, 0.0, out_std)

    # ------------------------------------------------------------------ forward
    def make_layer_cache(self, batch: int, max_len: int, dtype=None, device=None) -> SequenceCache:
        """One layer's cache, of the attention's kind: the MLA latent (`MLA.cache_class`)."""
        kind = ATTENTION[self.config.attention].cache_class
        head_dtype, head_device = self.head_dtype_device()
        return kind(batch, max_len, self.config, dtype or head_dtype, device or head_device)

    def head_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        """The head weight's dtype and device (quantized heads are not dequantized to read them)."""
        return linear_dtype_device(self.lm_head)

    def make_cache(self, batch: int, max_len: int, dtype=None, device=None) -> dict[str, SequenceCache]:
        return {i: self.make_layer_cache(batch, max_len, dtype, device) for i in self.model.layers}

    def attn_inputs(self, T: int, start_pos=0, device=None, cache: dict | SequenceCache | None = None,
                    **kw) -> AttnInputs:
        """`AttnInputs.build` for T new tokens at `start_pos`, bounded by `cache` (one layer's cache or
        the dict of them) when there is one; `kw`: kv_len, key_valid, segment_ids, impl."""
        if isinstance(cache, dict):
            cache = next(iter(cache.values()), None)
        return AttnInputs.build(T, start_pos, device, cache_len=cache.max_len if cache is not None else None, **kw)

    def forward(self, input_ids: torch.Tensor, *, start_pos=0, positions: torch.Tensor | None = None,
                cache: dict | None = None, key_valid: torch.Tensor | None = None,
                attn_impl: str | None = None, return_hidden: bool = False, kv_len: int | None = None,
                segment_ids: torch.Tensor | None = None):
        """input_ids [B, T] (or hidden states [B, T, h] when the embedding was removed) -> logits
        [B, T, V]; with `return_hidden`, (logits, final-normed hidden [B, T, h]). Missing norm or
        head return the hidden states instead (pipeline stages). `start_pos` is where the tokens
        go in the cache: an int, or a LongTensor [B] for sequences at different positions (then
        `kv_len` bounds the cache read). Packed sequences (no cache): `segment_ids` [B, T] keeps
        attention inside each document, `positions` [B, T] restart at 0 in each."""
        emb = self.model.embed_tokens
        h = emb(input_ids) if emb is not None else input_ids
        T = h.shape[1]
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed sequences) do not combine with a KV cache")
        inputs = self.attn_inputs(T, start_pos, h.device, cache, kv_len=kv_len, key_valid=key_valid,
                                  segment_ids=segment_ids, impl=attn_impl)  # once for all layers
        rope = self.rotary(inputs.positions(T) if positions is None else positions)
        for name, layer in self.model.layers.items():
            h = layer(h, rope, cache[name] if cache is not None else None, inputs)
        if self.model.norm is None:
            return h
        h = self.model.norm(h)
        if self.lm_head is None:
            return h
        logits = self.lm_head(h)
        return (logits, h) if return_hidden else logits

    def mtp_forward(self, hidden: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                    segment_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Multi-token prediction. hidden [B, T, h] is the main model's final-normed output.
        Returns, for depth k = 1..D, logits [B, T-k, V] where position i predicts token i+k+1.
        Packed sequences pass the same `positions` / `segment_ids` [B, T] as to `forward`
        (targets that cross a document boundary are the caller's to mask)."""
        out, h_prev = [], hidden
        T = input_ids.shape[1]
        for k, layer in enumerate(self.mtp.values(), start=1):
            if T - k <= 0:
                break
            emb = self.model.embed_tokens(input_ids[:, k:])  # token i+k for position i
            inputs = self.attn_inputs(T - k, 0, hidden.device,
                                      segment_ids=segment_ids[:, : T - k] if segment_ids is not None else None)
            rope = self.rotary(inputs.positions(T - k) if positions is None else positions[..., : T - k])
            h_prev = layer(h_prev[:, : T - k], emb, rope, None, inputs)
            out.append(self.lm_head(layer.shared_head.norm(h_prev)))
        return out

    # ------------------------------------------------------------------ utilities
    def moe_layers(self) -> dict[str, MoE]:
        """The MoE FFNs of the main model, keyed by layer index."""
        return {i: layer.mlp for i, layer in self.model.layers.items() if isinstance(layer.mlp, MoE)}

    def num_params(self, include_mtp: bool = False) -> int:
        n = sum(p.numel() for name, p in self.named_parameters() if include_mtp or not name.startswith("mtp."))
        return n

    @classmethod
    def from_pretrained(cls, path: str, dtype=None, device=None, **kw) -> "DeepSeekV3":
        """A Hugging Face DeepSeek-V2/V3 checkpoint directory (nanoseek.checkpoint)."""
        return checkpoint.load_pretrained(path, dtype=dtype, device=device, model_cls=cls, **kw)

    def save_pretrained(self, path: str, **kw) -> None:
        checkpoint.save_pretrained(self, path, **kw)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 eos_token_id: int | None = None, speculative: bool = False) -> torch.Tensor:
        """Prefill (naive attention) then decode with the absorbed path over the latent cache.
        Returns prompt + generated ids [B, T + new] like transformers' `generate`. With
        `speculative` (greedy, batch 1) the MTP module drafts tokens that the model verifies; the
        output is the same, `self.speculative_stats` holds the acceptance rate."""
        if speculative:
            if temperature > 0:
                raise ValueError("speculative decoding is greedy here: use temperature=0")
            ids, self.speculative_stats = generate_speculative(self, input_ids, max_new_tokens, eos_token_id)
            return ids
        B, T = input_ids.shape
        cache = self.make_cache(B, T + max_new_tokens)
        gen = torch.Generator(device=input_ids.device)
        gen.manual_seed(seed if seed is not None else torch.seed() % (2 ** 63))
        logits = self(input_ids, cache=cache)[:, -1]
        out = [input_ids]
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_p, top_k, gen)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            out.append(nxt[:, None])
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            logits = self(nxt[:, None], start_pos=T + step, cache=cache)[:, -1]
        return torch.cat(out, dim=1)
