"""The dense decoders DeepSeek-R1 was distilled into, in one file (DeepSeek-R1 report, arXiv
2501.12948, section 2.4): Llama 3/3.1/3.3 (arXiv 2407.21783), Qwen2/2.5 (arXiv 2407.10671,
2412.15115) and Qwen3 (arXiv 2505.09388).

- Pre-norm blocks: h += Attention(RMSNorm(h)); h += SwiGLU(RMSNorm(h)); a final RMSNorm and head,
  the head tied to the embedding where `tie_word_embeddings` (small Qwen2.5 sizes).
- Grouped-query attention: num_key_value_heads K/V heads, each shared by a group of query heads;
  q/k/v biases for Qwen2 (and `attention_bias`), per-head q/k RMSNorm before RoPE for Qwen3.
- RoPE on the two halves of each head (`rotate_half`, the Hugging Face layout of these models, not
  DeepSeek's interleaved pairs) with plain, `linear`, `llama3` or `yarn` frequencies.
- The decode cache keeps post-RoPE keys and values of the K/V heads only: 2 x KV x head_dim values
  per token per layer (`GQACache`), with the interface of DeepSeekV3's latent cache, and `forward`
  takes DeepSeekV3's keywords, so the same engine and generation loop drive either model.

Parameter names are those of the Hugging Face checkpoints (`model.layers.3.self_attn.k_proj.bias`,
...), so a state dict loads as it is; the tied head is stored once, as the embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dense_checkpoint
from .dense_config import DenseConfig
from .model import CAUSAL, AttnInputs, RMSNorm, SequenceCache, linear_dtype_device
from .sampling import sample_next


# --------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(cfg: DenseConfig, device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim / 2] and the factor cos/sin are multiplied by, for plain
    RoPE and the `linear`, `llama3` and `yarn` scalings (the formulas transformers uses)."""
    dim, base = cfg.head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    rs = cfg.rope_scaling
    if not rs:
        return inv_freq, 1.0
    kind, factor = rs["rope_type"], rs["factor"]
    if kind == "linear":  # positions divided by `factor`
        return inv_freq / factor, 1.0
    if kind == "llama3":
        # long wavelengths (beyond the original context / low_freq_factor) slowed by `factor`, short
        # ones (below original / high_freq_factor) kept, a linear blend in between
        orig = rs["original_max_position_embeddings"]
        low, high = rs["low_freq_factor"], rs["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > orig / low, inv_freq / factor, inv_freq)
        smooth = (orig / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= orig / high) & (wavelen <= orig / low)
        return torch.where(medium, blended, scaled), 1.0
    # yarn: a ramp between interpolated (divided by factor) and original frequencies over the dims
    # whose rotations within the original context fall between beta_slow and beta_fast
    orig = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(num_rotations):
        return dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - lo) / (hi - lo)).clamp(0, 1)
    keep = 1 - ramp  # 1: the original frequency, 0: divided by factor
    inv_freq = (inv_freq / factor) * (1 - keep) + inv_freq * keep
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        def mscale(m=1.0):
            return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            attention_factor = mscale(rs["mscale"]) / mscale(rs["mscale_all_dim"])
        else:
            attention_factor = mscale()
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions, in fp32, times the scaling's attention factor."""

    def __init__(self, cfg: DenseConfig):
        super().__init__()
        self.cfg = cfg
        inv_freq, self.attention_factor = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_parameters(self) -> None:
        self.inv_freq = rope_inv_freq(self.cfg, device=self.inv_freq.device)[0]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [T] or [B, T] -> cos, sin [B or 1, T, head_dim/2]
        angles = positions.float()[..., None] * self.inv_freq
        if angles.dim() == 2:
            angles = angles[None]
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i + d/2}) of x [B, T, H, d] (Hugging Face's rotate_half), in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)  # [B, T, H, d/2] each
    c, s = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, d/2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


# --------------------------------------------------------------------------------------- attention
class GQACache(SequenceCache):
    """The grouped-query attention decode cache of one layer: post-RoPE keys and values of the
    K/V heads, 2 x num_key_value_heads x head_dim values per token."""

    def __init__(self, batch: int, max_len: int, cfg: DenseConfig, dtype=None, device=None):
        shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        super().__init__((torch.zeros(shape, dtype=dtype, device=device),
                          torch.zeros(shape, dtype=dtype, device=device)))

    @property
    def k(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def v(self) -> torch.Tensor:
        return self.tensors[1]


class Attention(nn.Module):
    """Grouped-query attention (HF module `self_attn`)."""

    def __init__(self, cfg: DenseConfig):
        super().__init__()
        h, H, KV, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, KV, d
        self.q_proj = nn.Linear(h, H * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, KV * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, KV * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * d, h, bias=cfg.o_bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x, rope, cache: GQACache | None = None, inputs: AttnInputs = CAUSAL):
        """x [B, T, h], rope (cos, sin) [B|1, T, d/2] -> [B, T, h]. With a cache, the new keys and
        values go to `inputs.offsets` and attention reads its first `inputs.kv_len` positions."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:  # Qwen3: RMSNorm over each head's head_dim
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, offsets=inputs.offsets, kv_len=inputs.kv_len)  # [B, S, KV, d] each
        mask = inputs.mask
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # [B, H|KV, T|S, d]
            attn_mask=mask, is_causal=mask is None, scale=self.head_dim ** -0.5,
            enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))  # [B, T, h]


# --------------------------------------------------------------------------------------- blocks
class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (HF module `mlp`)."""

    def __init__(self, hidden: int, inter: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder layer: h += Attention(norm(h)); h += MLP(norm(h))."""

    def __init__(self, cfg: DenseConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(self, x, rope, cache: GQACache | None = None, inputs: AttnInputs = CAUSAL):
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, inputs)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """HF `model.*`: embedding, the decoder layers (ModuleDict keyed by layer index), final norm."""

    def __init__(self, cfg: DenseConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.num_hidden_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# --------------------------------------------------------------------------------------- model
class DenseModel(nn.Module):
    """A Llama / Qwen2 / Qwen3 causal language model. `model(input_ids)` returns logits [B, T, V]."""

    def __init__(self, cfg: DenseConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg)
        self.tie_weights()

    def tie_weights(self) -> None:
        """With `tie_word_embeddings`, the head is the embedding matrix (one parameter)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(cls, cfg: DenseConfig, device=None, dtype=None) -> "DenseModel":
        """Built on the meta device, then given uninitialized storage on `device` and its RoPE
        table: load weights into it, or `init_weights()`."""
        with torch.device("meta"):
            model = cls(cfg)
        if dtype is not None:
            model.to(dtype)
        model.to_empty(device=device or "cpu")
        model.tie_weights()  # to_empty gives the shared parameter one storage again; keep it shared
        model.rotary.reset_parameters()
        return model

    @classmethod
    def from_config(cls, cfg: DenseConfig, device=None, dtype=None, seed: int | None = None) -> "DenseModel":
        """Build on the meta device, then materialize on `device` and initialize."""
        model = cls.empty(cfg, device=device, dtype=dtype)
        if seed is not None:
            torch.manual_seed(seed)
        model.init_weights()
        return model

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Normal(0, initializer_range) for every matrix, zero biases, ones for norms; output
        projections scaled by 1/sqrt(2 * layers) as in GPT-2."""
        std = std or self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, (RMSNorm, RotaryEmbedding)):
                module.reset_parameters()
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, nn.Linear):
                if name == "lm_head" and self.config.tie_word_embeddings:
                    continue  # the embedding, initialized above
                nn.init.normal_(module.weight, 0.0, out_std if name.endswith(("o_proj", "down_proj")) else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ forward
    def head_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        """The head weight's dtype and device, read without materializing it: a quantized head
        (QuantLinear) keeps them as its `dtype` and its blocks' device, where reading `.weight`
        would dequantize the whole [V, h] matrix."""
        return linear_dtype_device(self.lm_head)

    def make_layer_cache(self, batch: int, max_len: int, dtype=None, device=None) -> GQACache:
        """One layer's cache: keys and values of the K/V heads."""
        head_dtype, head_device = self.head_dtype_device()
        return GQACache(batch, max_len, self.config, dtype or head_dtype, device or head_device)

    def make_cache(self, batch: int, max_len: int, dtype=None, device=None) -> dict[str, GQACache]:
        return {i: self.make_layer_cache(batch, max_len, dtype, device) for i in self.model.layers}

    def forward(self, input_ids: torch.Tensor, *, start_pos=0, positions: torch.Tensor | None = None,
                cache: dict | None = None, key_valid: torch.Tensor | None = None,
                attn_impl: str | None = None, return_hidden: bool = False, kv_len: int | None = None,
                segment_ids: torch.Tensor | None = None):
        """input_ids [B, T] -> logits [B, T, V]; with `return_hidden`, (logits, final-normed hidden
        [B, T, h]). The keywords are DeepSeekV3.forward's: `start_pos` is where the tokens go in
        the cache (an int, or a LongTensor [B] with `kv_len` bounding the cache read), `key_valid`
        [B, S] masks padding keys, `segment_ids` / `positions` [B, T] describe packed sequences.
        `attn_impl` is accepted and unused: there is one attention path."""
        h = self.model.embed_tokens(input_ids)  # [B, T, h]
        T = h.shape[1]
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed sequences) do not combine with a KV cache")
        layer_cache = next(iter(cache.values()), None) if cache is not None else None
        inputs = AttnInputs.build(T, start_pos, h.device, cache_len=layer_cache.max_len if layer_cache is not None else None,
                                  kv_len=kv_len, key_valid=key_valid, segment_ids=segment_ids)  # once for all layers
        rope = self.rotary(inputs.positions(T) if positions is None else positions)
        for name, layer in self.model.layers.items():
            h = layer(h, rope, cache[name] if cache is not None else None, inputs)
        h = self.model.norm(h)
        logits = self.lm_head(h)  # [B, T, V]
        return (logits, h) if return_hidden else logits

    # ------------------------------------------------------------------ utilities
    def num_params(self, include_mtp: bool = False) -> int:
        """Parameters, a tied head counted once (`include_mtp` as DeepSeekV3's: there is no MTP here)."""
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(cls, path: str, dtype=None, device=None, **kw) -> "DenseModel":
        """A Hugging Face Llama / Qwen2 / Qwen3 checkpoint directory (nanoseek.dense_checkpoint)."""
        return dense_checkpoint.load_pretrained(path, dtype=dtype, device=device, model_cls=cls, **kw)

    def save_pretrained(self, path: str, **kw) -> None:
        dense_checkpoint.save_pretrained(self, path, **kw)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 eos_token_id: int | None = None) -> torch.Tensor:
        """Prefill, then decode one token at a time over the GQA cache. Returns prompt +
        generated ids [B, T + new] like transformers' `generate`."""
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
