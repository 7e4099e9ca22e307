"""Model configuration: the `ModelConfig` dataclass, its presets, and conversion from/to a
Hugging Face `config.json` (DeepSeek-V2 and DeepSeek-V3 layouts, old `rope_scaling` and new
`rope_parameters` forms).

Field names follow the Hugging Face DeepSeek-V3 config so that a checkpoint's `config.json`
maps one to one. Routing follows DeepSeek-V3 (sigmoid scores, `noaux_tc` top-k with the
`e_score_correction_bias`) or DeepSeek-V2 (softmax scores, `greedy` or `group_limited_greedy`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from .io import atomic_write_text


class ConfigError(ValueError):
    """A configuration value that nanoseek cannot honour; the message names the field."""


# Keys of a Hugging Face config.json that we read. Everything else is either metadata
# (silently accepted) or a field we do not use (a warning names it).
_METADATA_KEYS = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "id2label", "label2id", "return_dict", "output_attentions", "output_hidden_states",
    "chunk_size_feed_forward", "is_encoder_decoder", "problem_type", "use_cache",
    "pad_token_id", "head_dim", "qk_head_dim", "num_key_value_heads", "attention_dropout",
    "pretraining_tp", "output_router_logits", "num_local_experts", "num_experts",
    "rope_interleave", "attention_bias", "hidden_act", "moe_layer_freq", "quantization_config",
    "num_mtp_layers", "generation_config", "tokenizer_class", "mlp_bias",
}
_IGNORED_KEYS = {  # fields real DeepSeek configs carry that nanoseek does not use
    "auto_map", "aux_loss_alpha", "seq_aux", "ep_size", "max_position_embeddings_original",
    "use_mla", "router_aux_loss_coef",
}

ROUTING_V3 = dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True)
ROUTING_V2 = dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False)


def read_config_json(path) -> tuple[dict, str]:
    """(config.json's object, its file name) of a checkpoint folder or of a config.json file."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file}: no config.json found")
    try:
        with open(file) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config, file


@dataclass
class ModelConfig:
    """Architecture hyper-parameters (Hugging Face DeepSeek-V3 names)."""

    model_type: str = "deepseek_v3"  # "deepseek_v3" or "deepseek_v2": chooses the HF class
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense FFN width (first_k_dense_replace layers)
    moe_intermediate_size: int = 2048  # width of one routed (and one shared) expert
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536  # None: plain q_proj (DeepSeek-V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256  # 0: every layer dense
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    topk_method: str = "noaux_tc"  # "noaux_tc" (V3), "greedy" / "group_limited_greedy" (V2)
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    # None for plain RoPE, else YaRN: factor, original_max_position_embeddings, beta_fast,
    # beta_slow, mscale, mscale_all_dim (and optionally attention_factor).
    rope_scaling: dict | None = field(default_factory=lambda: dict(
        type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32,
        beta_slow=1, mscale=1.0, mscale_all_dim=1.0))
    num_nextn_predict_layers: int = 1  # multi-token prediction depth D (0 disables)
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | list | None = 1
    torch_dtype: str = "bfloat16"
    attention: str = "mla"  # "mla", or "mha": standard attention with the same heads and dims (comparison only)

    def __post_init__(self):
        self.validate()

    # ----------------------------------------------------------------- derived values
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def uses_bias_routing(self) -> bool:
        return self.topk_method == "noaux_tc"

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layers 0..first_k_dense_replace-1 are dense; MTP layers (index >= num_hidden_layers) are MoE."""
        return self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace

    @property
    def yarn_mscale(self) -> float:
        """YaRN's attention-entropy correction m; the softmax scale is multiplied by m**2."""
        rs = self.rope_scaling
        if not rs or not rs.get("mscale_all_dim"):
            return 1.0
        return _yarn_get_mscale(rs["factor"], rs["mscale_all_dim"])

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim ** -0.5 * self.yarn_mscale ** 2

    @property
    def rope_attention_factor(self) -> float:
        """Factor applied to cos/sin (1.0 for every DeepSeek release, which sets mscale == mscale_all_dim)."""
        rs = self.rope_scaling
        if not rs:
            return 1.0
        if rs.get("attention_factor") is not None:
            return float(rs["attention_factor"])
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            return _yarn_get_mscale(rs["factor"], rs["mscale"]) / _yarn_get_mscale(rs["factor"], rs["mscale_all_dim"])
        return _yarn_get_mscale(rs["factor"])

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(cond, fieldname, msg):
            if not cond:
                raise ConfigError(f"config field '{fieldname}': {msg}")

        need(self.model_type in ("deepseek_v3", "deepseek_v2"), "model_type",
             f"unsupported value {self.model_type!r} (expected 'deepseek_v3' or 'deepseek_v2')")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name,
                 f"must be a positive integer, got {getattr(self, name)!r}")
        need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
             f"must be a positive even integer, got {self.qk_rope_head_dim!r}")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank",
             f"must be None (no query compression) or positive, got {self.q_lora_rank!r}")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"must be in [0, num_hidden_layers], got {self.first_k_dense_replace}")
        need(self.scoring_func in ("sigmoid", "softmax"), "scoring_func",
             f"unsupported value {self.scoring_func!r} (expected 'sigmoid' or 'softmax')")
        need(self.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"), "topk_method",
             f"unsupported value {self.topk_method!r} (expected 'noaux_tc', 'greedy' or 'group_limited_greedy')")
        need(self.attention in ("mla", "mha"), "attention", f"unsupported value {self.attention!r} (mla or mha)")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        need(not self.tie_word_embeddings, "tie_word_embeddings", "tied embeddings are not supported by DeepSeek models")
        if self.n_routed_experts > 0:
            need(1 <= self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
                 f"must be in [1, n_routed_experts={self.n_routed_experts}], got {self.num_experts_per_tok}")
            need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0, "n_group",
                 f"n_routed_experts={self.n_routed_experts} must be divisible by n_group={self.n_group}")
            need(1 <= self.topk_group <= self.n_group, "topk_group",
                 f"must be in [1, n_group={self.n_group}], got {self.topk_group}")
            if self.topk_method == "noaux_tc" and self.n_group > 1:
                need(self.n_routed_experts // self.n_group >= 2, "n_group",
                     "noaux_tc scores groups by their top-2 experts, so each group needs >= 2 experts")
            if self.topk_group < self.n_group:
                need(self.num_experts_per_tok <= self.topk_group * (self.n_routed_experts // self.n_group),
                     "num_experts_per_tok", "more experts per token than the kept groups hold")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("type", rs.get("rope_type"))
            need(kind == "yarn", "rope_scaling.type", f"unsupported RoPE scaling {kind!r} (supported: none, 'yarn')")
            need(rs.get("factor") is not None and rs["factor"] >= 1, "rope_scaling.factor", "YaRN needs factor >= 1")
            need(rs.get("original_max_position_embeddings"), "rope_scaling.original_max_position_embeddings",
                 "YaRN needs original_max_position_embeddings")

    # ----------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- Hugging Face config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face DeepSeek-V2/V3 config dict (old or new RoPE form)."""
        d = dict(d)
        model_type = d.get("model_type", "deepseek_v3")
        if model_type not in ("deepseek_v3", "deepseek_v2"):
            raise ConfigError(f"{source}: field 'model_type': unsupported value {model_type!r} "
                              "(expected 'deepseek_v3' or 'deepseek_v2')")

        def bad(key, msg):
            raise ConfigError(f"{source}: field '{key}': {msg}")

        if d.get("hidden_act", "silu") != "silu":
            bad("hidden_act", f"unsupported value {d['hidden_act']!r} (only 'silu')")
        if d.get("moe_layer_freq", 1) != 1:
            bad("moe_layer_freq", f"unsupported value {d['moe_layer_freq']!r} (only 1)")
        if d.get("mlp_bias", False):
            bad("mlp_bias", "biases in FFN projections are not supported")
        if d.get("attention_bias", False):
            bad("attention_bias", "biases in attention projections are not supported")
        if d.get("rope_interleave", True) is False:
            bad("rope_interleave", "DeepSeek checkpoints use interleaved RoPE; False is not supported")
        if d.get("num_key_value_heads") not in (None, d.get("num_attention_heads")):
            bad("num_key_value_heads", "MLA needs num_key_value_heads == num_attention_heads")
        qc = d.get("quantization_config")
        if qc is not None:
            if qc.get("quant_method") != "fp8" or list(qc.get("weight_block_size", [128, 128])) != [128, 128]:
                bad("quantization_config", f"only block-wise fp8 with 128x128 blocks is supported, got {qc}")

        # RoPE: new form `rope_parameters` (transformers 5) or old `rope_theta` + `rope_scaling`.
        rope_theta = d.get("rope_theta", 10000.0)
        scaling = d.get("rope_scaling")
        rp = d.get("rope_parameters")
        if rp:
            rope_theta = rp.get("rope_theta", rope_theta)
            kind = rp.get("rope_type", rp.get("type", "default"))
            scaling = None if kind == "default" else {k: v for k, v in rp.items() if k != "rope_theta"}
        if scaling:
            scaling = dict(scaling)
            kind = scaling.pop("rope_type", None) or scaling.pop("type", None)
            scaling.pop("type", None)
            if kind != "yarn":
                bad("rope_scaling", f"unsupported RoPE scaling type {kind!r} (supported: none, 'yarn')")
            scaling = {"type": "yarn", **scaling}

        q_lora = d.get("q_lora_rank", 1536)
        n_routed = d.get("n_routed_experts", d.get("num_local_experts")) or 0
        defaults = {**ROUTING_V3} if model_type == "deepseek_v3" else {**ROUTING_V2}
        if model_type == "deepseek_v2":
            defaults["topk_method"] = d.get("topk_method") or "greedy"
        mtp = d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 0)) or 0
        kw = dict(
            model_type=model_type,
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            moe_intermediate_size=d.get("moe_intermediate_size", d["intermediate_size"]),
            num_hidden_layers=d["num_hidden_layers"],
            first_k_dense_replace=d.get("first_k_dense_replace", 0),
            num_attention_heads=d["num_attention_heads"],
            q_lora_rank=q_lora if q_lora else None,
            kv_lora_rank=d["kv_lora_rank"], qk_nope_head_dim=d["qk_nope_head_dim"],
            qk_rope_head_dim=d["qk_rope_head_dim"], v_head_dim=d["v_head_dim"],
            n_routed_experts=n_routed,
            n_shared_experts=d.get("n_shared_experts") or 0,
            num_experts_per_tok=d.get("num_experts_per_tok") or 1,
            n_group=d.get("n_group") or 1, topk_group=d.get("topk_group") or 1,
            routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
            scoring_func=d.get("scoring_func", defaults["scoring_func"]),
            topk_method=d.get("topk_method") or defaults["topk_method"],
            norm_topk_prob=bool(d.get("norm_topk_prob", defaults["norm_topk_prob"])),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rope_theta=float(rope_theta), rope_scaling=scaling,
            num_nextn_predict_layers=mtp,
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            initializer_range=d.get("initializer_range", 0.02),
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "bfloat16").replace("torch.", ""),
            attention=d.get("attention", "mla"),
        )
        known = set(kw) | _METADATA_KEYS | {"rope_parameters", "rope_theta", "rope_scaling", "num_local_experts"}
        unused = sorted(k for k in d if k not in known)
        if unused:
            warnings.warn(f"{source}: ignoring config fields nanoseek does not use: {', '.join(unused)}",
                          stacklevel=2)
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """A Hugging Face config.json dict in the official release's (old-RoPE) form."""
        v3 = self.model_type == "deepseek_v3"
        d: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "first_k_dense_replace": self.first_k_dense_replace, "moe_layer_freq": 1,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "q_lora_rank": self.q_lora_rank, "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim, "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "n_routed_experts": self.n_routed_experts or None,
            "n_shared_experts": self.n_shared_experts or None,
            "num_experts_per_tok": self.num_experts_per_tok if self.n_routed_experts else None,
            "n_group": self.n_group, "topk_group": self.topk_group,
            "routed_scaling_factor": self.routed_scaling_factor,
            "scoring_func": self.scoring_func, "topk_method": self.topk_method,
            "norm_topk_prob": self.norm_topk_prob,
            "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta, "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "tie_word_embeddings": False, "attention_bias": False,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "torch_dtype": self.torch_dtype,
        }
        if v3:
            d["rope_interleave"] = True
        if self.attention != "mla":  # a nanoseek-only comparison model, not a DeepSeek layout
            d["attention"] = self.attention
        return d

    @classmethod
    def from_pretrained(cls, path: str) -> "ModelConfig":
        """Read `config.json` from a checkpoint directory (or a path to the file itself)."""
        d, file = read_config_json(path)
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if key not in d:
                raise ConfigError(f"{file}: missing required field '{key}'")
        return cls.from_hf_dict(d, source=file)

    def save(self, directory: str, extra: dict | None = None) -> None:
        d = self.to_hf_dict()
        if extra:
            d.update(extra)
        atomic_write_text(os.path.join(directory, "config.json"), json.dumps(d, indent=2) + "\n")

    # ----------------------------------------------------------------- parameter counts
    def param_counts(self) -> dict[str, int]:
        """Exact parameter counts from the shapes (equal to summing numel of the model)."""
        h, H = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank:
            attn_q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * self.qk_head_dim
        else:
            attn_q = h * H * self.qk_head_dim
        if self.attention == "mla":
            attn = (attn_q + h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
                    + self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)
                    + H * self.v_head_dim * h)
        else:
            attn = attn_q + h * H * self.qk_head_dim + h * H * self.v_head_dim + H * self.v_head_dim * h
        norms = 2 * h
        dense_ffn = 3 * h * self.intermediate_size
        expert = 3 * h * self.moe_intermediate_size
        shared = 3 * h * self.moe_intermediate_size * self.n_shared_experts
        router = self.n_routed_experts * h
        moe_total = self.n_routed_experts * expert + shared + router
        moe_active = self.num_experts_per_tok * expert + shared + router

        n_moe = sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))
        n_dense = self.num_hidden_layers - n_moe
        embed = self.vocab_size * h
        head = self.vocab_size * h
        body_total = self.num_hidden_layers * (attn + norms) + n_dense * dense_ffn + n_moe * moe_total
        body_active = self.num_hidden_layers * (attn + norms) + n_dense * dense_ffn + n_moe * moe_active
        total = embed + body_total + h + head
        # Active per token: everything a token's forward multiplies by; the embedding is a row
        # lookup, so it is left out (DeepSeek-V3: 36.6B of 671B, the report's "37B").
        active = body_active + h + head
        mtp_ffn_total = moe_total if self.n_routed_experts else dense_ffn
        mtp_ffn_active = moe_active if self.n_routed_experts else dense_ffn
        mtp_layer = 2 * h + 2 * h * h + attn + norms + h  # enorm, hnorm, eh_proj, block, shared_head.norm
        mtp = self.num_nextn_predict_layers * (mtp_layer + mtp_ffn_total)
        mtp_active = self.num_nextn_predict_layers * (mtp_layer + mtp_ffn_active)
        return dict(total_params=total, active_params=active, mtp_params=mtp, mtp_active_params=mtp_active,
                    embedding_params=embed, head_params=head)

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> dict[str, int]:
        """MLA caches the latent and the shared rope key; MHA with the same heads caches full K and V."""
        L = self.num_hidden_layers
        mla = L * (self.kv_lora_rank + self.qk_rope_head_dim) * bytes_per_element
        mha = L * self.num_attention_heads * (self.qk_head_dim + self.v_head_dim) * bytes_per_element
        return dict(mla_kv_bytes_per_token=mla, mha_kv_bytes_per_token=mha)


def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


_YARN_40 = dict(type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1)

PRESETS: dict[str, dict[str, Any]] = {
    # CPU toy for the quickstart and the tests: ~6M parameters, V3 routing, MTP on.
    "nano": dict(
        vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=128,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, max_position_embeddings=1024, rope_scaling=None,
        num_nextn_predict_layers=1, torch_dtype="float32"),
    # One-GPU size, fixed so that speed figures compare across time (benchmarks/RESULTS.md).
    "small": dict(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
        num_hidden_layers=12, first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=384,
        kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, max_position_embeddings=4096, rope_scaling=None,
        num_nextn_predict_layers=1),
    # Multi-GPU size: past one GPU's memory, trains with --fsdp on a few (`nanoseek info --train-memory medium`).
    "medium": dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1024,
        num_hidden_layers=20, first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=768,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, max_position_embeddings=4096, rope_scaling=None,
        num_nextn_predict_layers=1),
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, first_k_dense_replace=1,
        num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, n_group=1, topk_group=1, routed_scaling_factor=1.0,
        **ROUTING_V2, max_position_embeddings=163840,
        rope_scaling={**_YARN_40, "mscale": 0.707, "mscale_all_dim": 0.707},
        num_nextn_predict_layers=0, bos_token_id=100000, eos_token_id=100001),
    "deepseek-v2": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=5120, intermediate_size=12288,
        moe_intermediate_size=1536, num_hidden_layers=60, first_k_dense_replace=1,
        num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=160, n_shared_experts=2,
        num_experts_per_tok=6, n_group=8, topk_group=3, routed_scaling_factor=16.0,
        **{**ROUTING_V2, "topk_method": "group_limited_greedy"}, max_position_embeddings=163840,
        rope_scaling={**_YARN_40, "mscale": 0.707, "mscale_all_dim": 0.707},
        num_nextn_predict_layers=0, bos_token_id=100000, eos_token_id=100001),
    "deepseek-v3": dict(),  # the dataclass defaults are DeepSeek-V3 (671B)
}
