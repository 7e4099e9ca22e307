"""Configuration of the dense decoders that DeepSeek-R1 was distilled into (DeepSeek-R1 report,
arXiv 2501.12948, section 2.4): Llama 3/3.1/3.3 (arXiv 2407.21783), Qwen2/2.5 (arXiv 2407.10671,
2412.15115) and Qwen3 (arXiv 2505.09388), read from and written to a Hugging Face `config.json`.

`DenseConfig` holds the fields the three families share under their Hugging Face names, plus the
switches where they differ: q/k/v biases (Qwen2 always, the others with `attention_bias`), FFN
biases (Llama's `mlp_bias`), per-head q/k RMSNorm (Qwen3) and an explicit `head_dim` (Qwen3's
differs from hidden_size / num_attention_heads). RoPE is plain, `linear`, `llama3` or `yarn`, the
types these checkpoints ship with; anything else, sliding-window attention and pre-quantized
weights are refused with an error that names the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

from .config import ConfigError, read_config_json
from .io import atomic_write_text

DENSE_MODEL_TYPES = ("llama", "qwen2", "qwen3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# Keys each RoPE type reads (as transformers reads them); "factor" is required where listed first.
ROPE_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
             "mscale", "mscale_all_dim", "truncate"),
}
_REQUIRED_ROPE_KEYS = {"linear": ("factor",), "llama3": ROPE_KEYS["llama3"], "yarn": ROPE_KEYS["yarn"][:2]}

# Defaults where a config.json leaves a field out: those of the transformers class of each family.
_FAMILY_DEFAULTS = {
    "llama": dict(max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, head_dim=None,
                  num_key_value_heads=None),
    "qwen2": dict(max_position_embeddings=32768, bos_token_id=None, eos_token_id=None, head_dim=None,
                  num_key_value_heads=32),
    "qwen3": dict(max_position_embeddings=32768, bos_token_id=None, eos_token_id=None, head_dim=128,
                  num_key_value_heads=32),
}
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_METADATA_KEYS = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "id2label", "label2id", "return_dict", "output_attentions", "output_hidden_states",
    "chunk_size_feed_forward", "is_encoder_decoder", "problem_type", "use_cache", "pad_token_id",
    "attention_dropout", "pretraining_tp", "generation_config", "tokenizer_class", "hidden_act",
    "use_sliding_window", "sliding_window", "max_window_layers", "layer_types", "rope_parameters",
    "rope_scaling", "partial_rotary_factor", "quantization_config", "use_mrope",
}


@dataclass
class DenseConfig:
    """Hyper-parameters of a dense GQA decoder (Hugging Face Llama / Qwen2 / Qwen3 names)."""

    model_type: str = "llama"  # "llama", "qwen2" or "qwen3": chooses the transformers class
    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8  # GQA: each K/V head serves num_attention_heads / num_key_value_heads queries
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    rope_theta: float = 500000.0
    # None for plain RoPE, else {"rope_type": "linear" | "llama3" | "yarn", ...its ROPE_KEYS}
    rope_scaling: dict | None = None
    attention_bias: bool = False  # biases on q/k/v/o (Llama, Qwen3); Qwen2 always has q/k/v biases
    mlp_bias: bool = False  # biases on the FFN projections (Llama only)
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix (small Qwen2.5 sizes)
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    torch_dtype: str = "bfloat16"

    def __post_init__(self):
        self.validate()

    # ----------------------------------------------------------------- derived values
    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    @property
    def qk_norm(self) -> bool:
        """Qwen3 RMS-normalizes each query and key head (over head_dim) before RoPE."""
        return self.model_type == "qwen3"

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def param_counts(self) -> dict[str, int]:
        """Exact parameter counts from the shapes (equal to summing numel of the model), under
        ModelConfig.param_counts' keys: a dense model activates all of them and has no MTP."""
        h, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        if self.qkv_bias:
            attn += q + 2 * kv
        if self.o_bias:
            attn += h
        if self.qk_norm:
            attn += 2 * self.head_dim
        ffn = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h if self.mlp_bias else 0)
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        total = embed + self.num_hidden_layers * (attn + ffn + 2 * h) + h + head
        # Active per token as ModelConfig counts it: everything but the embedding lookup (a tied head
        # is the embedding matrix, multiplied by every token, so it stays in).
        active = total - embed + (self.vocab_size * h if self.tie_word_embeddings else 0)
        return {"total_params": total, "mtp_params": 0, "active_params": active, "embedding_params": embed}

    def kv_cache_values_per_token(self) -> int:
        """Values the GQA cache keeps per token per layer: keys and values of the K/V heads."""
        return 2 * self.num_key_value_heads * self.head_dim

    def replace(self, **changes) -> "DenseConfig":
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(cond, fieldname, msg):
            if not cond:
                raise ConfigError(f"config field '{fieldname}': {msg}")

        need(self.model_type in DENSE_MODEL_TYPES, "model_type",
             f"unsupported value {self.model_type!r} (expected one of {', '.join(DENSE_MODEL_TYPES)})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0, name,
                 f"must be a positive integer, got {value!r}")
        need(isinstance(self.head_dim, int) and self.head_dim > 0 and self.head_dim % 2 == 0, "head_dim",
             f"must be a positive even integer (RoPE rotates pairs), got {self.head_dim!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"num_attention_heads={self.num_attention_heads} must be a multiple of it, got {self.num_key_value_heads}")
        need(self.model_type == "llama" or not self.mlp_bias, "mlp_bias", f"{self.model_type} has no FFN biases")
        need(self.model_type != "qwen2" or not self.attention_bias, "attention_bias",
             "qwen2 has q/k/v biases and no o_proj bias whatever this field says; leave it False")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("rope_type")
            need(kind in ROPE_KEYS, "rope_scaling.rope_type",
                 f"unsupported RoPE type {kind!r} (supported: default, {', '.join(ROPE_KEYS)})")
            for key in _REQUIRED_ROPE_KEYS[kind]:
                need(rs.get(key) is not None, f"rope_scaling.{key}", f"RoPE type {kind!r} needs it")
            if rs.get("factor") is not None:
                need(rs["factor"] > 0, "rope_scaling.factor", f"must be positive, got {rs['factor']!r}")
            unknown = sorted(set(rs) - set(ROPE_KEYS[kind]) - {"rope_type"})
            need(not unknown, f"rope_scaling.{unknown[0] if unknown else ''}",
                 f"not a parameter of RoPE type {kind!r} (its parameters: {', '.join(ROPE_KEYS[kind])})")

    # ----------------------------------------------------------------- Hugging Face config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "DenseConfig":
        """Build from a Hugging Face Llama / Qwen2 / Qwen3 config dict (old `rope_theta` +
        `rope_scaling` form, or transformers 5's `rope_parameters`)."""
        d = dict(d)

        def bad(key, msg):
            raise ConfigError(f"{source}: field '{key}': {msg}")

        model_type = d.get("model_type")
        if model_type is None:  # older files: the architectures field names the class
            named = [t for t, a in ARCHITECTURES.items() if a in (d.get("architectures") or [])]
            model_type = named[0] if named else None
        if model_type not in DENSE_MODEL_TYPES:
            bad("model_type", f"unsupported value {model_type!r} (expected one of {', '.join(DENSE_MODEL_TYPES)})")
        for key in _REQUIRED_KEYS:
            if key not in d:
                bad(key, "missing (required)")
        if d.get("hidden_act", "silu") != "silu":
            bad("hidden_act", f"unsupported value {d['hidden_act']!r} (only 'silu')")
        if d.get("quantization_config") is not None:
            bad("quantization_config", "pre-quantized dense checkpoints are not supported; use unquantized weights")
        if d.get("pretraining_tp", 1) not in (None, 1):
            warnings.warn(f"{source}: pretraining_tp={d['pretraining_tp']} only splits matmuls; ignored", stacklevel=2)
        if d.get("use_mrope"):
            bad("use_mrope", "multimodal RoPE (vision-language Qwen2) is not supported")
        if d.get("use_sliding_window"):
            bad("use_sliding_window", "sliding-window attention is not supported (every layer attends to the "
                                      "whole context); set it to false")
        layer_types = d.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            bad("layer_types", f"only 'full_attention' layers are supported, got {sorted(set(layer_types))}")
        if d.get("partial_rotary_factor", 1.0) not in (None, 1.0):
            bad("partial_rotary_factor", "RoPE on part of each head is not supported (only 1.0)")

        rope_theta, rope_scaling = _read_rope(d, bad)
        defaults = _FAMILY_DEFAULTS[model_type]
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or defaults["head_dim"] or d["hidden_size"] // heads
        kv_heads = d.get("num_key_value_heads") or defaults["num_key_value_heads"] or heads
        kw = dict(
            model_type=model_type, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=d.get("max_position_embeddings", defaults["max_position_embeddings"]),
            rope_theta=rope_theta, rope_scaling=rope_scaling,
            attention_bias=bool(d.get("attention_bias", False)) if model_type != "qwen2" else False,
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            initializer_range=d.get("initializer_range", 0.02),
            bos_token_id=d.get("bos_token_id", defaults["bos_token_id"]),
            eos_token_id=d.get("eos_token_id", defaults["eos_token_id"]),
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "bfloat16").replace("torch.", ""),
        )
        unused = sorted(k for k in d if k not in set(kw) | _METADATA_KEYS | {"rope_theta", "head_dim"})
        if unused:
            warnings.warn(f"{source}: ignoring config fields nanoseek does not use: {', '.join(unused)}",
                          stacklevel=2)
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json dict in the released checkpoints' form (`rope_theta` + `rope_scaling`)."""
        d: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.model_type]], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings, "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_word_embeddings, "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "torch_dtype": self.torch_dtype,
        }
        if self.model_type == "llama":
            d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        else:
            d.update(use_sliding_window=False, max_window_layers=self.num_hidden_layers)
            if self.model_type == "qwen3":
                d["attention_bias"] = self.attention_bias
        return d

    @classmethod
    def from_pretrained(cls, path: str) -> "DenseConfig":
        """Read `config.json` from a checkpoint directory (or the file itself)."""
        d, file = read_config_json(path)
        return cls.from_hf_dict(d, source=file)

    def save(self, directory: str, extra: dict | None = None) -> None:
        d = {**self.to_hf_dict(), **(extra or {})}
        atomic_write_text(os.path.join(directory, "config.json"), json.dumps(d, indent=2) + "\n")


def _read_rope(d: dict, bad) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from either RoPE form; `bad(field, msg)` raises."""
    rope_theta = d.get("rope_theta")
    scaling = d.get("rope_scaling")
    field_name = "rope_scaling"
    rp = d.get("rope_parameters")
    if rp:
        if any(isinstance(v, dict) for v in rp.values()):
            bad("rope_parameters", "per-layer-type RoPE parameters are not supported")
        field_name = "rope_parameters"
        rope_theta = rp.get("rope_theta", rope_theta)
        scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
    rope_theta = float(rope_theta if rope_theta is not None else 10000.0)
    if not scaling:
        return rope_theta, None
    scaling = dict(scaling)
    if "partial_rotary_factor" in scaling:
        if scaling.pop("partial_rotary_factor") not in (None, 1.0):
            bad(f"{field_name}.partial_rotary_factor", "RoPE on part of each head is not supported (only 1.0)")
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if kind == "default":
        return rope_theta, None
    if kind not in ROPE_KEYS:
        bad(f"{field_name}.rope_type", f"unsupported RoPE type {kind!r} (supported: default, {', '.join(ROPE_KEYS)})")
    unknown = sorted(set(scaling) - set(ROPE_KEYS[kind]))
    if unknown:  # transformers reads only ROPE_KEYS too and warns about the rest
        warnings.warn(f"field '{field_name}': ignoring keys that RoPE type {kind!r} does not read: "
                      f"{', '.join(unknown)}", stacklevel=3)
        scaling = {k: v for k, v in scaling.items() if k not in unknown}
    if kind in ("llama3", "yarn") and scaling.get("original_max_position_embeddings") is None:
        scaling["original_max_position_embeddings"] = d.get("max_position_embeddings")  # as transformers does
    for key in _REQUIRED_ROPE_KEYS[kind]:
        if scaling.get(key) is None:
            bad(f"{field_name}.{key}", f"RoPE type {kind!r} needs it")
    return rope_theta, {"rope_type": kind, **scaling}
