"""GGUF files <-> DeepSeek models: ModelConfig, tensors and tokenizer in llama.cpp's `deepseek2`
layout (llama.cpp's convert_hf_to_gguf.py `DeepseekV2Model`, gguf-py `constants.py`, and
src/models/deepseek2.cpp, which reads them).

- Metadata: the DeepSeek-V3 report's (arXiv 2412.19437) section 2 hyper-parameters under llama.cpp's
  key names. MLA is written as llama.cpp runs it, an MQA over the latent (head_count_kv 1,
  key_length = kv_lora_rank + qk_rope_head_dim, value_length = kv_lora_rank) with the per-head sizes
  in key_length_mla / value_length_mla. DeepSeekMoE (section 2.1.2): expert counts, shared experts,
  leading dense layers, gating function (sigmoid for V3), group-limited routing, expert weight
  normalization and scale; the auxiliary-loss-free bias is the tensor `exp_probs_b`.
- YaRN: llama.cpp's deepseek2 takes mscale == mscale_all_dim and derives the cos/sin factor and
  softmax scale from `yarn_log_multiplier` (stored as 0.1 * mscale_all_dim); `yarn_factors` turns our
  two factors into that key plus `attn_factor`, and `yarn_from_gguf` reads them back.
- Tensors: `kv_b_proj` is written as `attn_k_b` (transposed per head) and `attn_v_b`, as llama.cpp's
  absorbed MLA wants; on reading, either those or the older `attn_kv_b` are accepted. Routed experts
  are the stacked `ffn_{gate,up,down}_exps`, shared experts `*_shexp`. The multi-token prediction
  module (section 2.2) is not written (llama.cpp's converter drops it too) and is skipped on reading.
- Tokenizer: our byte-level BPE as `tokenizer.ggml.model` "gpt2" (tokens, token types, merges,
  pre-tokenizer name, BOS/EOS/PAD ids, chat template), read back into a `Tokenizer`: the keys are
  nanoseek.gguf_tokenizer's.
- Tensor encodings go through `encode_tensor` / `decode_tensor` only: nanoseek.quant.ggml's block formats
  (llama.cpp's byte layouts), gguf-py's numpy dequantizers for the types ggml lacks, on read.
  `--type` q4_k_m / q6_k / q4_0 / q8_0 picks each weight's type by llama.cpp's quantizer rule
  (nanoseek.quant.mixes); f32 / f16 / bf16 store every matrix in that type. Reading memory-maps the
  file and dequantizes one tensor at a time into the model's dtype; `read_gguf(quantized=True)`
  instead keeps each matrix as the file's bytes (QuantLinear / QuantExperts / QuantEmbedding over
  the memory map, no copy), float only for norms, router, balancing bias and MLA's kv_b_proj.

Every error names the file and the key or tensor (`GGUFError`).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass

import gguf
import numpy as np
import torch
import torch.nn as nn

from .config import ConfigError, ModelConfig
from .gguf_tokenizer import GGUFError, read_tokenizer, tokenizer_metadata
from .io import atomic_write
from .model import DeepSeekV3, Experts, Router
from .quant import ggml
from .quant.mixes import MIXES, tensor_qtype
from .quant.qlinear import QuantEmbedding, QuantExperts, QuantLinear
from .tokenizer import Tokenizer

ARCH = "deepseek2"
Q = gguf.GGMLQuantizationType
PLAIN_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}  # every matrix in this one encoding
WRITABLE_TYPES = (*PLAIN_TYPES, *MIXES)  # `--type`: a plain encoding or a llama.cpp mix
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
              "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}
GGML_NAMES = {Q(type_id): name for name, (type_id, _, _) in ggml.QTYPES.items()}  # GGML type -> ggml's name
READABLE_TYPES = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K,
                  Q.Q5_K, Q.Q6_K, Q.Q8_K}
SPLIT_PART = re.compile(r"(.*)-(\d{5})-of-(\d{5})\.gguf$")


# ---------------------------------------------------------------------------- the encoding seam
def encode_tensor(array: np.ndarray, qtype: Q) -> np.ndarray:
    """float32 [..., n] -> the GGUF bytes [..., nbytes] (uint8) of `qtype` (nanoseek.quant.ggml)."""
    return ggml.quantize(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), GGML_NAMES[qtype]).numpy()


def decode_tensor(raw: np.ndarray, qtype: Q) -> np.ndarray:
    """GGUF bytes (or typed data) of `qtype`, numpy shape [..., nbytes] -> float32 [..., n]: through
    nanoseek.quant.ggml where it has the type, else gguf-py's numpy dequantizer."""
    if qtype not in GGML_NAMES:
        return gguf.quants.dequantize(raw, qtype)
    raw = np.ascontiguousarray(raw).view(np.uint8)  # typed f32 / f16 / bf16 data as its bytes
    with warnings.catch_warnings():  # a read-only memory map, only read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return ggml.dequantize(torch.from_numpy(raw), GGML_NAMES[qtype]).numpy()


# ---------------------------------------------------------------------------- names
_LAYER = {  # our per-layer parameter (after "model.layers.<i>.") -> llama.cpp's (after "blk.<i>.")
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.experts.gate_proj": "ffn_gate_exps.weight",
    "mlp.experts.up_proj": "ffn_up_exps.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_KV_B = "self_attn.kv_b_proj.weight"
_KEEP_F32 = ("_norm.weight", "exp_probs_b.bias", "ffn_gate_inp.weight")  # llama-quantize keeps these unquantized


def gguf_name(name: str) -> str | None:
    """Our state-dict name -> the llama.cpp tensor name (None for kv_b_proj, which splits in two)."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER:
        return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}"
    return None


def split_kv_b(w: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj [H*(nope+v), r] -> attn_k_b [H, r, nope] (transposed per head), attn_v_b [H, v, r]."""
    H, nope = cfg.num_attention_heads, cfg.qk_nope_head_dim
    kv = w.view(H, nope + cfg.v_head_dim, cfg.kv_lora_rank)
    return kv[:, :nope].transpose(1, 2).contiguous(), kv[:, nope:].contiguous()


def join_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """attn_k_b [H, r, nope], attn_v_b [H, v, r] -> kv_b_proj [H*(nope+v), r]."""
    return torch.cat([k_b.transpose(1, 2), v_b], dim=1).flatten(0, 1)


# ---------------------------------------------------------------------------- what deepseek2 can express
def yarn_factors(cfg: ModelConfig) -> tuple[float, float]:
    """(yarn_log_multiplier, attn_factor) with which llama.cpp's deepseek2 computes our RoPE cos/sin
    factor R and softmax scale M**2 / sqrt(qk_head_dim) (M = `cfg.yarn_mscale`). llama.cpp: with a
    log multiplier L != 0, cos/sin get attn_factor and the softmax (attn_factor * (1 + 0.1 L ln f))**2;
    with L == 0 both get attn_factor * (1 + 0.1 ln f)."""
    f = cfg.rope_scaling["factor"]
    R, M = cfg.rope_attention_factor, cfg.yarn_mscale
    ln = math.log(f) if f > 1 else 0.0
    if ln == 0.0:
        if abs(M - R) > 1e-6 * max(1.0, abs(R)):
            raise GGUFError("config field 'rope_scaling': with factor 1 llama.cpp's deepseek2 cannot give the "
                            f"cos/sin factor {R} and the softmax mscale {M} differently")
        return 0.0, R
    L = (M / R - 1) / (0.1 * ln)
    if abs(L) < 1e-6:  # no multiplier: both factors are attn_factor * (1 + 0.1 ln f)
        return 0.0, R / (1 + 0.1 * ln)
    return L, R


def yarn_from_gguf(factor: float, orig: int, beta_fast: float, beta_slow: float, log_mul: float,
                   attn_factor: float) -> dict:
    """Our rope_scaling dict that computes what llama.cpp's deepseek2 computes from these keys."""
    factor, beta_fast, beta_slow, log_mul, attn_factor = map(_f32_value, (factor, beta_fast, beta_slow, log_mul,
                                                                          attn_factor))
    rs = dict(type="yarn", factor=factor, original_max_position_embeddings=orig, beta_fast=beta_fast,
              beta_slow=beta_slow)
    ln = math.log(factor) if factor > 1 else 0.0
    if log_mul != 0.0 and attn_factor == 1.0:  # DeepSeek's releases: mscale == mscale_all_dim
        return {**rs, "mscale": log_mul, "mscale_all_dim": log_mul}
    R = attn_factor if log_mul != 0.0 else attn_factor * (1 + 0.1 * ln)
    M = R * (1 + 0.1 * log_mul * ln)
    if ln == 0.0:
        return {**rs, "attention_factor": R}
    return {**rs, "attention_factor": R, "mscale_all_dim": (M - 1) / (0.1 * ln)}


def _f32_value(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (its 7 significant digits)."""
    return float(f"{x:.7g}")


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse (GGUFError naming the field) what llama.cpp's deepseek2 would compute differently."""
    def refuse(field, why):
        raise GGUFError(f"config field '{field}': {why}; llama.cpp's deepseek2 cannot express it")

    if cfg.attention != "mla":
        refuse("attention", f"{cfg.attention!r} is a comparison model, not MLA")
    if cfg.n_routed_experts and not cfg.n_shared_experts:
        refuse("n_shared_experts", "0 (llama.cpp requires the shared-expert tensors in every MoE layer)")
    if (cfg.n_routed_experts and cfg.topk_method == "group_limited_greedy" and cfg.topk_group < cfg.n_group):
        refuse("topk_method", "'group_limited_greedy' ranks groups by their best expert, llama.cpp by the sum "
                              "of their best two (DeepSeek-V3's noaux_tc)")
    lite = cfg.num_hidden_layers in (26, 27) or (cfg.num_hidden_layers == 48 and cfg.vocab_size == 128256)
    if cfg.q_lora_rank and lite:
        refuse("q_lora_rank", f"llama.cpp takes a {cfg.num_hidden_layers}-layer deepseek2 for a 'lite' model "
                              "without query compression and would not read q_lora_rank")
    if cfg.rope_scaling:
        yarn_factors(cfg)


# ---------------------------------------------------------------------------- writing
@dataclass
class PlannedTensor:
    """One tensor of a GGUF to write: its llama.cpp name, the values (a meta tensor where only the
    shape is known), its encoding."""
    name: str
    tensor: torch.Tensor  # numpy order [..., n]
    qtype: Q


def tensor_type(mix: str, name: str, shape: tuple[int, ...], cfg: ModelConfig) -> Q:
    """The encoding of GGUF tensor `name` [..., k] under `--type mix`: norms, the router and its bias
    stay f32; a plain type (f32/f16/bf16) for every matrix; a mix by llama.cpp's quantizer rule
    (nanoseek.quant.mixes, the tensor named by its llama.cpp role), with its fallbacks for short rows."""
    if name.endswith(_KEEP_F32) or len(shape) == 1:
        return Q.F32
    if mix in PLAIN_TYPES:
        return PLAIN_TYPES[mix]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)\.weight", name)
    role, layer = (m.group(2), int(m.group(1))) if m else (name.removesuffix(".weight"), 0)
    qtype = tensor_qtype(mix, role, shape[-1], layer=layer, n_layers=cfg.num_hidden_layers,
                         n_experts=cfg.n_routed_experts)
    return Q(ggml.QTYPES[qtype][0])


def _plan(model: DeepSeekV3, mix: str) -> list[PlannedTensor]:
    """Every tensor to write, in llama.cpp's order, with its encoding (`tensor_type`)."""
    cfg = model.config
    state = model.state_dict()
    out: list[PlannedTensor] = []

    def add(name, t):
        t = t.detach()
        out.append(PlannedTensor(name, t, tensor_type(mix, name, tuple(t.shape), cfg)))

    add("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for ours, theirs in _LAYER.items():
            if prefix + ours in state:
                add(f"blk.{i}.{theirs}", state[prefix + ours])
            if ours == "self_attn.kv_a_layernorm.weight":
                k_b, v_b = split_kv_b(state[prefix + _KV_B], cfg)
                add(f"blk.{i}.attn_k_b.weight", k_b)
                add(f"blk.{i}.attn_v_b.weight", v_b)
    add("output_norm.weight", state["model.norm.weight"])
    add("output.weight", state["lm_head.weight"])
    return out


def _encoded(p: PlannedTensor) -> np.ndarray:
    """The GGUF bytes of a planned tensor: [..., nbytes] uint8."""
    if p.tensor.dim() < 3:
        return encode_tensor(p.tensor.float().cpu().numpy(), p.qtype)
    out = np.empty(gguf.quant_shape_to_byte_shape(tuple(p.tensor.shape), p.qtype), dtype=np.uint8)
    for e in range(p.tensor.shape[0]):  # [E, out, in]: one expert's float32 copy at a time
        out[e] = encode_tensor(p.tensor[e].float().cpu().numpy(), p.qtype)
    return out


def _metadata(w: gguf.GGUFWriter, cfg: ModelConfig, name: str, ftype: int) -> None:
    w.add_type("model")
    w.add_name(name)
    w.add_file_type(int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)  # MLA runs as MQA over the latent
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace if cfg.n_routed_experts else cfg.num_hidden_layers)
    w.add_q_lora_rank(cfg.q_lora_rank or 0)  # 0: plain q_proj (llama.cpp then reads attn_q)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts if cfg.n_routed_experts else 0)
    if cfg.n_routed_experts:
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        grouped = cfg.topk_method != "greedy" and cfg.topk_group < cfg.n_group
        w.add_expert_group_count(cfg.n_group if grouped else 1)
        w.add_expert_group_used_count(cfg.topk_group if grouped else 1)
        # ours normalizes only when it picks more than one expert
        w.add_expert_weights_norm(bool(cfg.norm_topk_prob and cfg.num_experts_per_tok > 1))
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid"
                             else gguf.ExpertGatingFuncType.SOFTMAX)
    rs = cfg.rope_scaling
    if rs:
        log_mul, attn_factor = yarn_factors(cfg)
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rs["factor"])
        w.add_rope_scaling_orig_ctx_len(rs["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(float(rs.get("beta_fast") or 32))
        w.add_rope_scaling_yarn_beta_slow(float(rs.get("beta_slow") or 1))
        if log_mul:
            w.add_rope_scaling_yarn_log_mul(0.1 * log_mul)  # llama.cpp divides by 0.1 again
        if attn_factor != 1.0:
            w.add_float32(gguf.Keys.Rope.SCALING_ATTN_FACTOR.format(arch=ARCH), attn_factor)


def writable_type(qtype: str, path: str) -> str:
    """`--type qtype` checked: a plain encoding or a llama.cpp mix, else a GGUFError naming the choices."""
    if qtype not in WRITABLE_TYPES:
        raise GGUFError(f"{path}: unsupported --type {qtype!r} (writable: {', '.join(WRITABLE_TYPES)})")
    return qtype


@torch.no_grad()
def write_gguf(model: DeepSeekV3, tokenizer: Tokenizer, path: str, qtype: str = "f16", name: str = "nanoseek",
               split_max_size: int = 0) -> list[str]:
    """Write `model` and `tokenizer` as a `deepseek2` GGUF (`qtype` one of WRITABLE_TYPES); with
    `split_max_size` (bytes), as parts `<stem>-00001-of-0000N.gguf`. Each file is written beside its
    target and renamed into place. Returns the paths written. MTP layers are not written."""
    writable_type(qtype, path)
    cfg = model.config
    check_exportable(cfg)
    if cfg.num_nextn_predict_layers:
        warnings.warn(f"{path}: the {cfg.num_nextn_predict_layers} MTP layer(s) are not written "
                      "(llama.cpp's deepseek2 runs the main model only)", stacklevel=2)
    return write_planned(path, cfg, tokenizer, qtype, _plan(model, qtype), _encoded, name, split_max_size)


def shape_plan(cfg: ModelConfig, qtype: str) -> list[PlannedTensor]:
    """The tensors a `deepseek2` GGUF of `cfg` under `--type qtype` holds, in llama.cpp's order, as
    meta tensors (shapes only, no storage): what a writer that makes each tensor's bytes itself
    (a random or a streamed model) fills in."""
    writable_type(qtype, "<plan>")
    check_exportable(cfg)
    with torch.device("meta"):
        model = DeepSeekV3(cfg.replace(num_nextn_predict_layers=0))
    return _plan(model, qtype)


def write_planned(path: str, cfg: ModelConfig, tokenizer: Tokenizer, qtype: str, plan: list[PlannedTensor],
                  encoded, name: str = "nanoseek", split_max_size: int = 0) -> list[str]:
    """Write the GGUF of `plan` (as `_plan` or `shape_plan` give it): the metadata of `cfg` and
    `tokenizer`, then each tensor's bytes `encoded(planned)` [..., row_bytes] uint8, asked for one
    tensor at a time, so the file never exists in memory. Written beside `path` and renamed into place."""
    def metadata(writer):
        _metadata(writer, cfg, name, FILE_TYPES[qtype])
        tokenizer_metadata(writer, tokenizer, cfg.vocab_size)
    return write_gguf_file(path, ARCH, metadata, [(p.name, tuple(p.tensor.shape), p.qtype) for p in plan],
                           lambda i: encoded(plan[i]), split_max_size)


def write_gguf_file(path: str, arch: str, metadata, tensors: list[tuple[str, tuple[int, ...], Q]], encoded,
                    split_max_size: int = 0) -> list[str]:
    """The one GGUF file writer: `metadata(writer)` adds the key/values, `tensors` lists (name, shape,
    GGML type) in file order and `encoded(i)` gives tensor i's bytes [..., row_bytes] uint8, asked for
    one at a time. Each part is written beside its target, fsynced and renamed into place; returns
    the paths written."""
    final = os.path.abspath(path)
    tmp_dir = os.path.dirname(final)
    os.makedirs(tmp_dir, exist_ok=True)
    prefix = f".tmp-{os.getpid()}-"
    writer = gguf.GGUFWriter(os.path.join(tmp_dir, prefix + os.path.basename(final)), arch,
                             split_max_size=split_max_size)
    metadata(writer)
    byte_shapes = [tuple(gguf.quant_shape_to_byte_shape(shape, q)) for _, shape, q in tensors]
    for (tname, _, q), byte_shape in zip(tensors, byte_shapes):
        writer.add_tensor_info(tname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=q)
    temps = [str(t) for t in writer.format_shard_names(writer.path)]
    finals = [os.path.join(tmp_dir, os.path.basename(t)[len(prefix):]) for t in temps]
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, ((tname, _, _), want) in enumerate(zip(tensors, byte_shapes)):  # one tensor in memory at a time
            data = encoded(i)
            if data.dtype != np.uint8 or tuple(data.shape) != want:
                raise GGUFError(f"{path}: tensor '{tname}' encoded as {data.dtype} {list(data.shape)}, "
                                f"expected uint8 {list(want)}")
            writer.write_tensor_data(data)
            del data
        writer.close()
        for t, f in zip(temps, finals):  # fsync + rename each part (io.atomic_write's order)
            atomic_write(f, lambda dst, src=t: os.replace(src, dst), suffix=".gguf")
    finally:
        for t in temps:
            if os.path.exists(t):
                os.unlink(t)
    return finals


# ---------------------------------------------------------------------------- reading
def gguf_parts(path: str) -> list[str]:
    """The files of a GGUF model: one file, the first part of a split (`-00001-of-0000N.gguf`, its
    siblings found beside it), or a folder holding the parts of one split."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if not files:
            raise GGUFError(f"{path}: no .gguf file in this folder")
        if len(files) == 1:
            return [os.path.join(path, files[0])]
        stems = {m.group(1) for m in map(SPLIT_PART.fullmatch, files) if m}
        if len(stems) != 1 or not all(SPLIT_PART.fullmatch(f) for f in files):
            raise GGUFError(f"{path}: holds several GGUF files that are not the parts of one split: {', '.join(files)}")
        path = os.path.join(path, files[0])
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such file")
    m = SPLIT_PART.fullmatch(path)
    if not m:
        return [path]
    n = int(m.group(3))
    parts = [f"{m.group(1)}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    for p in parts:
        if not os.path.isfile(p):
            raise GGUFError(f"{p}: part {parts.index(p) + 1} of {n} of the split is missing")
    return parts


class GGUFModelFile:
    """The metadata and tensors of a GGUF model (one file or the parts of a split), memory-mapped."""

    def __init__(self, path: str):
        self.parts = gguf_parts(path)
        self.path = self.parts[0]
        self.readers = []
        for p in self.parts:
            try:
                self.readers.append(gguf.GGUFReader(p))
            except Exception as e:  # gguf-py raises ValueError, KeyError, IndexError... on bad bytes
                raise GGUFError(f"{p}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})") from None
        self.fields = self.readers[0].fields
        self.tensors = {}
        for p, r in zip(self.parts, self.readers):
            size = os.path.getsize(p)
            for t in r.tensors:
                if t.data_offset + t.n_bytes > size:
                    raise GGUFError(f"{p}: tensor '{t.name}' runs past the end of the file (truncated)")
                if t.name in self.tensors:
                    raise GGUFError(f"{p}: tensor '{t.name}' appears twice in the split")
                self.tensors[t.name] = (p, t)
        count = self.get("split.count", 1)
        if count != len(self.parts):
            raise GGUFError(f"{self.path}: key 'split.count' says {count} parts, found {len(self.parts)}")

    def get(self, key: str, default=None, required: bool = False):
        field = self.fields.get(key)
        if field is None:
            if required:
                raise GGUFError(f"{self.path}: missing key '{key}'")
            return default
        try:
            value = field.contents()
        except Exception as e:
            raise GGUFError(f"{self.path}: key '{key}' cannot be read ({e})") from None
        return value

    def arch_key(self, key: str, default=None, required: bool = False):
        return self.get(f"{ARCH}.{key}", default, required)

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape in numpy (row-major) order, the reverse of GGUF's ne."""
        return tuple(int(d) for d in reversed(self.tensors[name][1].shape.tolist()))

    def qtype(self, name: str) -> str | None:
        """nanoseek.quant.ggml's name for the tensor's encoding, None where ggml lacks it."""
        return GGML_NAMES.get(self.tensors[name][1].tensor_type) if name in self.tensors else None

    def raw(self, name: str, want: tuple[int, ...]) -> torch.Tensor:
        """Tensor `name` [..., k] (checked against `want`) as its bytes [..., row_bytes] (uint8), a
        view of the read-only memory map: no copy."""
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: missing tensor '{name}'")
        part, t = self.tensors[name]
        got = self.shape(name)
        if got != tuple(want):
            raise GGUFError(f"{part}: tensor '{name}' has shape {list(got)}, the metadata say {list(want)}")
        data = np.asarray(t.data).view(np.uint8)
        data = data.reshape(*got[:-1], ggml.row_bytes(got[-1], self.qtype(name)))
        with warnings.catch_warnings():  # read only: the quantized layers never write their bytes
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(data)

    def read(self, name: str, want: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Tensor `name` dequantized into `dtype`, checked against the shape the metadata implies."""
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: missing tensor '{name}'")
        part, t = self.tensors[name]
        got = self.shape(name)
        if got != tuple(want):
            raise GGUFError(f"{part}: tensor '{name}' has shape {list(got)}, the metadata say {list(want)}")
        if t.tensor_type not in READABLE_TYPES:
            raise GGUFError(f"{part}: tensor '{name}' has type {t.tensor_type.name}, which nanoseek cannot read "
                            f"(readable: {', '.join(q.name for q in sorted(READABLE_TYPES))})")
        values = decode_tensor(np.asarray(t.data), t.tensor_type).reshape(got)
        return torch.from_numpy(np.array(values, dtype=np.float32)).to(dtype)  # a copy: the map is read-only


def tensor_types(f: GGUFModelFile) -> dict[str, dict[str, int]]:
    """Per GGML type of the file's tensors: {"tensors": count, "bytes": stored bytes}."""
    out: dict[str, dict[str, int]] = {}
    for _, t in f.tensors.values():
        row = out.setdefault(t.tensor_type.name.lower(), {"tensors": 0, "bytes": 0})
        row["tensors"] += 1
        row["bytes"] += int(t.n_bytes)
    return out


def file_type_name(f: GGUFModelFile) -> str:
    """The file's general.file_type as llama.cpp names it (e.g. "Q4_K_M")."""
    ftype = f.get("general.file_type")
    try:
        return gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"file type {ftype}"


def _int(f: GGUFModelFile, key: str, default=None):
    value = f.arch_key(key, default, required=default is None)
    if isinstance(value, (list, tuple)):  # per-layer arrays: deepseek2 has one value for all layers
        if len(set(value)) != 1:
            raise GGUFError(f"{f.path}: key '{ARCH}.{key}' varies per layer ({value[:4]}...), which nanoseek cannot express")
        value = value[0]
    return int(value)


def read_config(f: GGUFModelFile) -> ModelConfig:
    """The ModelConfig that computes what llama.cpp's deepseek2 computes from the file's metadata."""
    arch = f.get("general.architecture", required=True)
    if arch != ARCH:
        raise GGUFError(f"{f.path}: key 'general.architecture' is {arch!r}; nanoseek reads only {ARCH!r} (DeepSeek-V2/V3)")
    n_tokens = len(f.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in f.fields else None
    vocab = _int(f, "vocab_size", n_tokens if n_tokens is not None else None)
    nextn = _int(f, "nextn_predict_layers", 0)
    layers = _int(f, "block_count") - nextn
    heads = _int(f, "attention.head_count")
    rope_dim = _int(f, "rope.dimension_count")
    k_mla = _int(f, "attention.key_length_mla", 0) or _int(f, "attention.key_length")
    v_mla = _int(f, "attention.value_length_mla", 0) or _int(f, "attention.value_length")
    n_experts = _int(f, "expert_count", 0)
    gating = _int(f, "expert_gating_func", int(gguf.ExpertGatingFuncType.SOFTMAX))
    if gating not in (1, 2):
        raise GGUFError(f"{f.path}: key '{ARCH}.expert_gating_func' is {gating}; nanoseek has softmax (1) and sigmoid (2)")
    n_group = _int(f, "expert_group_count", 1) or 1
    topk_group = _int(f, "expert_group_used_count", n_group) or n_group
    dense = min(_int(f, "leading_dense_block_count", 0), layers)
    has_bias = n_experts > 0 and dense < layers and f"blk.{dense}.exp_probs_b.bias" in f.tensors
    # llama.cpp ranks groups by the sum of their best two (biased) scores whatever the gating
    method = "noaux_tc" if has_bias or (n_group > 1 and topk_group < n_group) else "greedy"
    scale = float(f.arch_key("expert_weights_scale", 0.0))
    rope_scaling = None
    kind = f.arch_key("rope.scaling.type", "none")
    if kind == "yarn":
        ext = float(f.arch_key("rope.scaling.yarn_ext_factor", 1.0))
        if ext != 1.0:
            raise GGUFError(f"{f.path}: key '{ARCH}.rope.scaling.yarn_ext_factor' is {ext}; nanoseek's YaRN has 1.0")
        rope_scaling = yarn_from_gguf(
            float(f.arch_key("rope.scaling.factor", required=True)),
            _int(f, "rope.scaling.original_context_length"),
            float(f.arch_key("rope.scaling.yarn_beta_fast", 32.0)), float(f.arch_key("rope.scaling.yarn_beta_slow", 1.0)),
            float(f.arch_key("rope.scaling.yarn_log_multiplier", 0.0)) / 0.1,
            float(f.arch_key("rope.scaling.attn_factor", 1.0)))
    elif kind != "none":
        raise GGUFError(f"{f.path}: key '{ARCH}.rope.scaling.type' is {kind!r}; nanoseek reads 'none' and 'yarn'")
    used = _int(f, "expert_used_count", 1)
    if n_experts and used == 1 and f.arch_key("expert_weights_norm", False):
        raise GGUFError(f"{f.path}: key '{ARCH}.expert_weights_norm' is set with one expert per token: llama.cpp "
                        "then weighs the expert 1, nanoseek by its score (norm_topk_prob applies from two experts)")
    q_lora = _int(f, "attention.q_lora_rank", 0)
    kw = dict(
        model_type="deepseek_v3" if gating == 2 else "deepseek_v2", vocab_size=vocab,
        hidden_size=_int(f, "embedding_length"), intermediate_size=_int(f, "feed_forward_length"),
        moe_intermediate_size=_int(f, "expert_feed_forward_length"), num_hidden_layers=layers,
        first_k_dense_replace=dense, num_attention_heads=heads, q_lora_rank=q_lora or None,
        kv_lora_rank=_int(f, "attention.kv_lora_rank"), qk_nope_head_dim=k_mla - rope_dim,
        qk_rope_head_dim=rope_dim, v_head_dim=v_mla, n_routed_experts=n_experts,
        n_shared_experts=_int(f, "expert_shared_count", 0), num_experts_per_tok=used,
        n_group=n_group, topk_group=topk_group, routed_scaling_factor=scale if scale else 1.0,
        scoring_func="sigmoid" if gating == 2 else "softmax", topk_method=method,
        norm_topk_prob=bool(f.arch_key("expert_weights_norm", False)),
        rms_norm_eps=float(f.arch_key("attention.layer_norm_rms_epsilon", required=True)),
        max_position_embeddings=_int(f, "context_length"), rope_theta=float(f.arch_key("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling, num_nextn_predict_layers=0,
        bos_token_id=f.get("tokenizer.ggml.bos_token_id"), eos_token_id=f.get("tokenizer.ggml.eos_token_id"),
        torch_dtype="float32")
    try:
        return ModelConfig(**kw)
    except ConfigError as e:
        raise GGUFError(f"{f.path}: the metadata make no valid model: {e}") from None


def _held_quantized(f: GGUFModelFile, model: DeepSeekV3, dtype: torch.dtype) -> None:
    """Swap, in place, every Linear / Experts / Embedding of a meta-device `model` whose file
    tensor ggml can read for a quantized module over the file's bytes; then give what stays
    float (norms, router, bias, kv_b_proj, RoPE tables, types ggml lacks) empty CPU storage."""
    tied = "output.weight" not in f.tensors
    for name, mod in list(model.named_modules()):
        if name.startswith("mtp.") or name.endswith("kv_b_proj"):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(mod, nn.Linear):
            src = "token_embd.weight" if name == "lm_head" and tied else gguf_name(name + ".weight")
            if f.qtype(src) is None or src.endswith(_KEEP_F32):
                continue
            raw = f.raw(src, (mod.out_features, mod.in_features))
            setattr(parent, attr, QuantLinear(raw, f.qtype(src), mod.in_features, None, dtype))
        elif isinstance(mod, nn.Embedding) and f.qtype("token_embd.weight") is not None:
            raw = f.raw("token_embd.weight", (mod.num_embeddings, mod.embedding_dim))
            setattr(parent, attr, QuantEmbedding(raw, f.qtype("token_embd.weight"), mod.embedding_dim, dtype))
        elif isinstance(mod, Experts):
            srcs = {p: gguf_name(f"{name}.{p}") for p in QuantExperts.PROJS}
            if any(f.qtype(s) is None for s in srcs.values()):
                continue
            stacks = {p: f.raw(s, tuple(getattr(mod, p).shape)) for p, s in srcs.items()}
            setattr(parent, attr, QuantExperts(stacks, {p: f.qtype(s) for p, s in srcs.items()}, mod.n_experts,
                                               dtype, mod.impl))
    for mod in model.modules():  # what stays float: CPU storage, filled by read_gguf
        for key, t in list(mod._parameters.items()):
            if t is not None and t.is_meta:
                mod._parameters[key] = nn.Parameter(torch.empty(t.shape, dtype=t.dtype), requires_grad=t.requires_grad)
        for key, t in list(mod._buffers.items()):
            if t is not None and t.is_meta:
                mod._buffers[key] = torch.empty(t.shape, dtype=t.dtype)
    model.rotary.reset_parameters()


@torch.no_grad()
def read_gguf(path: str, dtype: torch.dtype | None = None, device=None,
              quantized: bool = False) -> tuple[DeepSeekV3, Tokenizer]:
    """A `deepseek2` GGUF (file, first split part, or folder of parts) -> (model, tokenizer). Each
    tensor is dequantized from the memory map into `dtype` as it is copied in; `dtype` defaults to
    the file's (float32 for f32, float16 for f16, bfloat16 for bf16 and the block formats).
    `quantized`: the matrices stay the file's bytes (a CPU model; `dtype` is then that of the
    float parts and of the dequantized weights' reads), never a float copy of the whole model."""
    f = GGUFModelFile(path)
    cfg = read_config(f)
    tok = read_tokenizer(f)
    if dtype is None:
        ftype = f.get("general.file_type", 1)
        dtype = {0: torch.float32, 1: torch.float16}.get(ftype, torch.bfloat16)
    cfg = cfg.replace(torch_dtype=str(dtype).replace("torch.", ""))
    if quantized:
        if device is not None and torch.device(device).type != "cpu":
            raise GGUFError(f"{f.path}: a quantized import is a CPU model (the bytes stay memory-mapped)")
        with torch.device("meta"):
            model = DeepSeekV3(cfg)
        model.to(dtype)
        for m in model.modules():
            if isinstance(m, Router) and m.e_score_correction_bias is not None:
                m.e_score_correction_bias = m.e_score_correction_bias.float()
        _held_quantized(f, model, dtype)
        model._gguf_file = f  # the memory maps live as long as the model
    else:
        model = DeepSeekV3.empty(cfg, device=device, dtype=dtype)
    tied = "output.weight" not in f.tensors  # llama.cpp then uses token_embd as the head
    for name, dst in model.state_dict(keep_vars=True).items():
        if name.startswith("mtp.") or dst.dtype == torch.uint8:  # quantized bytes: already the file's
            continue
        if name.endswith(_KV_B):
            i = name.split(".")[2]
            if f"blk.{i}.attn_kv_b.weight" in f.tensors:
                src = f.read(f"blk.{i}.attn_kv_b.weight", tuple(dst.shape), dst.dtype)
            else:
                H, r = cfg.num_attention_heads, cfg.kv_lora_rank
                k_b = f.read(f"blk.{i}.attn_k_b.weight", (H, r, cfg.qk_nope_head_dim), dst.dtype)
                v_b = f.read(f"blk.{i}.attn_v_b.weight", (H, cfg.v_head_dim, r), dst.dtype)
                src = join_kv_b(k_b, v_b)
        elif name.endswith("e_score_correction_bias") and gguf_name(name) not in f.tensors:
            src = torch.zeros(dst.shape)  # no bias in the file: llama.cpp chooses on the plain scores
        elif name == "lm_head.weight" and tied:
            src = f.read("token_embd.weight", tuple(dst.shape), dst.dtype)
        else:
            src = f.read(gguf_name(name), tuple(dst.shape), dst.dtype)
        dst.copy_(src)
    return model, tok
