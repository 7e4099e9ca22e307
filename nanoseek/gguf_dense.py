"""GGUF files <-> the dense R1-distill models (DeepSeek-R1 report, arXiv 2501.12948, section 2.4):
DenseModel and DenseConfig in llama.cpp's `llama`, `qwen2` and `qwen3` layouts (llama.cpp's
convert_hf_to_gguf.py `LlamaModel`, `Qwen2Model`, `Qwen3Model`; src/models/llama.cpp, qwen2.cpp,
qwen3.cpp, which read them).

- Metadata: `{arch}.block_count`, embedding_length, feed_forward_length, attention.head_count(_kv),
  attention.key_length / value_length (head_dim), rope.dimension_count, rope.freq_base,
  attention.layer_norm_rms_epsilon, context_length, vocab_size. Biases (Qwen2's q/k/v, Llama's
  `attention_bias` / `mlp_bias`) are tensors `*.bias`; Qwen3's per-head q/k norms are
  `attn_q_norm` / `attn_k_norm`; a tied head is the absence of `output.weight`.
- RoPE scaling: `linear` and `yarn` (the transformers default attention factor 1 + 0.1 ln factor,
  which llama.cpp computes for these architectures) as `rope.scaling.*` keys; Llama 3's `llama3`
  frequencies as the tensor `rope_freqs.weight` (one divisor per frequency), from which reading
  recovers the llama3 parameters and checks that they give the file's divisors back.
- `llama` runs RoPE on interleaved pairs, the Hugging Face checkpoints on halves: llama.cpp's
  converter permutes the rows of q_proj / k_proj (and their biases) per head
  (LlamaModel.permute); writing applies that permutation and reading undoes it. Qwen2 / Qwen3 use
  NeoX RoPE, the Hugging Face layout, and are stored as they are.
- Tensors are encoded as in nanoseek.gguf_file (nanoseek.quant.ggml's llama.cpp byte layouts):
  f32 / f16 / bf16 for every matrix, or q8_0 / q4_0 / q6_k / q4_k_m typed per tensor by llama.cpp's
  rule (nanoseek.quant.mixes). `read_dense_gguf(quantized=True)` keeps each matrix as the file's
  bytes (QuantLinear / QuantEmbedding over the memory map; the permuted q/k rows of `llama` are a
  reordered copy), float only for norms and biases.
- Tokenizer: the byte-level BPE of the file's tokenizer.ggml.* keys, read and written by
  nanoseek.gguf_tokenizer: the R1 distills' Qwen2.5 / Qwen3 ('qwen2', 'deepseek-r1-qwen') and Llama 3
  ('llama-bpe') pre-tokenizers as well as 'gpt-2' and 'deepseek-v3'; for any other a tokenizer
  folder must be given.

Every error names the file and the key or tensor (`GGUFError`).
"""

from __future__ import annotations

import math
import os
import re

import gguf
import torch
import torch.nn as nn

from .config import ConfigError
from .dense import DenseModel, rope_inv_freq
from .dense_config import DenseConfig
from .gguf_file import (FILE_TYPES, PLAIN_TYPES, GGUFModelFile, Q, encode_tensor, read_config, read_gguf,
                        writable_type, write_gguf_file)
from .gguf_tokenizer import GGUFError, read_tokenizer, tokenizer_metadata
from .quant import ggml
from .quant.mixes import tensor_qtype
from .quant.qlinear import QuantEmbedding, QuantLinear
from .tokenizer import Tokenizer

DENSE_ARCHS = ("llama", "qwen2", "qwen3")  # GGUF general.architecture == nanoseek model_type
ROPE_FREQS = "rope_freqs.weight"

_LAYER = {  # our per-layer parameter (after "model.layers.<i>.") -> llama.cpp's (after "blk.<i>.")
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight", "mlp.down_proj.bias": "ffn_down.bias",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def dense_gguf_name(name: str) -> str | None:
    """Our state-dict name -> the llama.cpp tensor name."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER:
        return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}"
    return None


def is_dense_gguf(f: GGUFModelFile) -> bool:
    """Whether the file's general.architecture is one of the dense families."""
    return f.get("general.architecture") in DENSE_ARCHS


# ---------------------------------------------------------------------------- llama's q/k row order
def _heads_of(name: str, cfg: DenseConfig) -> int | None:
    """The head count whose rows llama.cpp's `llama` permutes in this tensor (q: query heads,
    k: K/V heads), None where nothing is permuted."""
    if cfg.model_type != "llama":
        return None
    if re.search(r"(self_attn\.q_proj|attn_q)\.(weight|bias)$", name):
        return cfg.num_attention_heads
    if re.search(r"(self_attn\.k_proj|attn_k)\.(weight|bias)$", name):
        return cfg.num_key_value_heads
    return None


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face rows [n_head * d, ...] (rotate-half pairs i, i + d/2) -> llama.cpp's
    (interleaved pairs 2i, 2i + 1), convert_hf_to_gguf.py's LlamaModel.permute."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_rows`: llama.cpp's q/k rows [n_head * d, ...] -> Hugging Face's."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------- RoPE
def llama3_rope_factors(cfg: DenseConfig) -> torch.Tensor:
    """The `rope_freqs` divisors [head_dim / 2] of llama3 scaling: base frequency / scaled one."""
    plain = rope_inv_freq(cfg.replace(rope_scaling=None))[0]
    return plain / rope_inv_freq(cfg)[0]


def _decimal(x: float) -> float:
    """A float32 value as the decimal it was written from (its 7 significant digits)."""
    return float(f"{x:.7g}")


def llama3_from_factors(f: GGUFModelFile, cfg: DenseConfig, factors: torch.Tensor) -> dict:
    """The llama3 rope_scaling that gives the file's `rope_freqs` divisors (within float32).
    The divisor is 1 for short wavelengths, `factor` for long ones and 1 / ((1 - s) / factor + s) in
    between, s = (orig / wavelength - low) / (high - low) linear in the frequency: with low_freq_factor
    1 (every Llama 3 release), two blended frequencies fix orig and high_freq_factor."""
    inv_freq = rope_inv_freq(cfg)[0].double()
    div = factors.double()
    factor = _decimal(div.max().item())
    blended = (div > 1 + 1e-6) & (div < factor * (1 - 1e-6))
    candidates = []
    if factor > 1 and int(blended.sum()) >= 2:
        s = (1 / div[blended] - 1 / factor) / (1 - 1 / factor)  # s = a * inv_freq + b
        x = inv_freq[blended]
        a = ((x - x.mean()) * (s - s.mean())).sum() / ((x - x.mean()) ** 2).sum()
        b = s.mean() - a * x.mean()
        high = 1 - 1 / b.item()  # b = -low / (high - low) with low = 1
        orig = a.item() * 2 * math.pi * (high - 1)
        candidates.append(dict(factor=factor, low_freq_factor=1.0, high_freq_factor=_decimal(high),
                               original_max_position_embeddings=int(round(orig))))
    candidates.append(dict(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192))  # Llama 3.1 / 3.2 / 3.3
    for params in candidates:
        try:
            trial = cfg.replace(rope_scaling={"rope_type": "llama3", **params})
        except ConfigError:
            continue
        if torch.allclose(llama3_rope_factors(trial).double(), div, rtol=1e-5, atol=0):
            return trial.rope_scaling
    raise GGUFError(f"{f.path}: tensor '{ROPE_FREQS}' holds RoPE divisors that no llama3 scaling gives "
                    f"(first ones {[round(v, 4) for v in div[:4].tolist()]}); nanoseek reads llama3 frequencies only")


def _rope_scaling(f: GGUFModelFile, arch: str) -> dict | None:
    """rope_scaling from the `rope.scaling.*` keys ('none', 'linear', 'yarn'); llama3 comes later,
    from the `rope_freqs` tensor."""
    def key(name, default=None):
        return f.get(f"{arch}.{name}", default)

    kind = key("rope.scaling.type", "none")
    if kind == "none":
        return None
    factor = key("rope.scaling.factor")
    if factor is None:
        raise GGUFError(f"{f.path}: key '{arch}.rope.scaling.type' is {kind!r} without '{arch}.rope.scaling.factor'")
    if kind == "linear":
        return {"rope_type": "linear", "factor": _decimal(factor)}
    if kind == "yarn":
        for k, default in (("rope.scaling.attn_factor", 1.0), ("rope.scaling.yarn_attn_factor", 1.0),
                           ("rope.scaling.yarn_log_multiplier", 0.0), ("rope.scaling.yarn_ext_factor", 1.0)):
            if float(key(k, default)) != default:
                raise GGUFError(f"{f.path}: key '{arch}.{k}' is {key(k)}; nanoseek reads {arch}'s YaRN with the "
                                f"default attention factor only ({k} {default})")
        orig = key("rope.scaling.original_context_length")
        if orig is None:
            raise GGUFError(f"{f.path}: missing key '{arch}.rope.scaling.original_context_length'")
        rs = {"rope_type": "yarn", "factor": _decimal(factor), "original_max_position_embeddings": int(orig)}
        for ours, theirs in (("beta_fast", "rope.scaling.yarn_beta_fast"), ("beta_slow", "rope.scaling.yarn_beta_slow")):
            if key(theirs) is not None:  # else llama.cpp's defaults, transformers' too (32, 1)
                rs[ours] = _decimal(key(theirs))
        return rs
    raise GGUFError(f"{f.path}: key '{arch}.rope.scaling.type' is {kind!r}; nanoseek reads 'none', 'linear' and 'yarn'")


# ---------------------------------------------------------------------------- reading
def read_dense_config(f: GGUFModelFile) -> DenseConfig:
    """The DenseConfig that computes what llama.cpp's `llama` / `qwen2` / `qwen3` computes from the
    file's metadata and tensor table."""
    arch = f.get("general.architecture", required=True)
    if arch not in DENSE_ARCHS:
        raise GGUFError(f"{f.path}: key 'general.architecture' is {arch!r}; the dense reader takes "
                        f"{', '.join(map(repr, DENSE_ARCHS))}")

    def num(key, default=None):
        value = f.get(f"{arch}.{key}", default, required=default is None)
        if isinstance(value, (list, tuple)):  # per-layer arrays
            if len(set(value)) != 1:
                raise GGUFError(f"{f.path}: key '{arch}.{key}' varies per layer ({list(value)[:4]}...), which "
                                "nanoseek cannot express")
            value = value[0]
        return value

    hidden, heads = int(num("embedding_length")), int(num("attention.head_count"))
    head_dim = int(num("attention.key_length", hidden // heads))
    if int(num("attention.value_length", head_dim)) != head_dim:
        raise GGUFError(f"{f.path}: key '{arch}.attention.value_length' differs from key_length {head_dim}; "
                        "nanoseek's dense attention has one head_dim")
    if int(num("rope.dimension_count", head_dim)) != head_dim:
        raise GGUFError(f"{f.path}: key '{arch}.rope.dimension_count' is {num('rope.dimension_count')}, not the "
                        f"head size {head_dim}; RoPE on part of each head is not supported")
    if "token_embd.weight" not in f.tensors:
        raise GGUFError(f"{f.path}: missing tensor 'token_embd.weight'")
    vocab = f.shape("token_embd.weight")[0]
    def has(tensor):  # a tensor of the first block: biases are all-or-none per model
        return f"blk.0.{tensor}" in f.tensors

    eos = f.get("tokenizer.ggml.eos_token_id")
    kw = dict(
        model_type=arch, vocab_size=vocab, hidden_size=hidden, intermediate_size=int(num("feed_forward_length")),
        num_hidden_layers=int(num("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(num("attention.head_count_kv", heads)), head_dim=head_dim,
        rms_norm_eps=_decimal(num("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(num("context_length")), rope_theta=_decimal(num("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(f, arch),
        attention_bias=arch != "qwen2" and has("attn_q.bias"), mlp_bias=arch == "llama" and has("ffn_gate.bias"),
        tie_word_embeddings="output.weight" not in f.tensors,
        bos_token_id=f.get("tokenizer.ggml.bos_token_id"), eos_token_id=eos, torch_dtype="float32")
    try:
        cfg = DenseConfig(**kw)
    except ConfigError as e:
        raise GGUFError(f"{f.path}: the metadata make no valid model: {e}") from None
    if ROPE_FREQS in f.tensors:
        if arch != "llama" or cfg.rope_scaling:
            raise GGUFError(f"{f.path}: tensor '{ROPE_FREQS}' (per-frequency RoPE divisors) is read for `llama` "
                            "files without rope.scaling keys only (Llama 3's llama3 frequencies)")
        factors = f.read(ROPE_FREQS, (head_dim // 2,), torch.float32)
        if not torch.all(factors == 1):
            cfg = cfg.replace(rope_scaling=llama3_from_factors(f, cfg, factors))
    return cfg


def dense_tokenizer(f: GGUFModelFile, tokenizer_dir: str | None = None) -> Tokenizer:
    """The tokenizer in the file's metadata, or the one in `tokenizer_dir` where given."""
    if tokenizer_dir is not None:
        return Tokenizer.from_dir(tokenizer_dir)
    try:
        return read_tokenizer(f)
    except GGUFError as e:
        raise GGUFError(f"{e}. nanoseek cannot rebuild this tokenizer from the GGUF metadata: give the model's "
                        "Hugging Face tokenizer folder (tokenizer.json): tokenizer_dir, or "
                        "`nanoseek create NAME --from FILE.gguf --tokenizer DIR`") from None


def _quantized_modules(f: GGUFModelFile, model: DenseModel, dtype: torch.dtype) -> None:
    """Swap, in place, every Linear / Embedding of a meta-device `model` for a quantized module
    over the file's bytes (llama's q/k rows reordered into a copy); then give what stays float
    (norms, biases, RoPE table) empty CPU storage."""
    cfg = model.config
    for name, mod in list(model.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(mod, nn.Linear):
            src = "token_embd.weight" if name == "lm_head" and cfg.tie_word_embeddings else dense_gguf_name(name + ".weight")
            qtype = f.qtype(src)
            if qtype is None:
                continue
            raw = f.raw(src, (mod.out_features, mod.in_features))
            if (heads := _heads_of(src, cfg)) is not None:
                raw = unpermute_rows(raw, heads).contiguous()
            bias = None
            if mod.bias is not None:
                bias = f.read(dense_gguf_name(name + ".bias"), (mod.out_features,), dtype)
                if heads is not None:
                    bias = unpermute_rows(bias, heads)
            setattr(parent, attr, QuantLinear(raw, qtype, mod.in_features, bias, dtype))
        elif isinstance(mod, nn.Embedding) and f.qtype("token_embd.weight") is not None:
            raw = f.raw("token_embd.weight", (mod.num_embeddings, mod.embedding_dim))
            setattr(parent, attr, QuantEmbedding(raw, f.qtype("token_embd.weight"), mod.embedding_dim, dtype))
    for mod in model.modules():  # what stays float: CPU storage, filled by read_dense_gguf
        for key, t in list(mod._parameters.items()):
            if t is not None and t.is_meta:
                mod._parameters[key] = nn.Parameter(torch.empty(t.shape, dtype=t.dtype), requires_grad=t.requires_grad)
        for key, t in list(mod._buffers.items()):
            if t is not None and t.is_meta:
                mod._buffers[key] = torch.empty(t.shape, dtype=t.dtype)
    if cfg.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):
        model.tie_weights()  # a float embedding (a type ggml lacks): the head shares its new storage
    model.rotary.reset_parameters()


@torch.no_grad()
def read_dense_gguf(path: str, dtype: torch.dtype | None = None, device=None, quantized: bool = False,
                    tokenizer_dir: str | None = None) -> tuple[DenseModel, Tokenizer]:
    """A `llama` / `qwen2` / `qwen3` GGUF (file, first split part, or folder of parts) -> (DenseModel,
    tokenizer). The tokenizer is `tokenizer_dir`'s where given (or a folder `path`'s tokenizer.json), else
    the file's metadata (`dense_tokenizer`). `dtype` defaults to the file's (float32 for f32, float16 for f16, bfloat16 otherwise);
    `quantized` keeps the matrices as the file's bytes on the CPU (`dtype` is then that of the float
    parts and of the dequantized weights' reads)."""
    f = GGUFModelFile(path)
    cfg = read_dense_config(f)
    if tokenizer_dir is None and os.path.isfile(os.path.join(path, "tokenizer.json")):
        tokenizer_dir = path  # a store entry: the tokenizer kept beside the file
    tok = dense_tokenizer(f, tokenizer_dir)
    if dtype is None:
        dtype = {0: torch.float32, 1: torch.float16}.get(f.get("general.file_type", 1), torch.bfloat16)
    cfg = cfg.replace(torch_dtype=str(dtype).replace("torch.", ""))
    if quantized:
        if device is not None and torch.device(device).type != "cpu":
            raise GGUFError(f"{f.path}: a quantized import is a CPU model (the bytes stay memory-mapped)")
        with torch.device("meta"):
            model = DenseModel(cfg)
        model.to(dtype)
        _quantized_modules(f, model, dtype)
        model._gguf_file = f  # the memory maps live as long as the model
    else:
        model = DenseModel.empty(cfg, device=device, dtype=dtype)
    held = tuple(n + "." for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding)))
    for name, dst in model.state_dict(keep_vars=True).items():
        if name.startswith(held) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue  # quantized bytes and their biases (read already), or the tied head (the embedding)
        src = dense_gguf_name(name)
        values = f.read(src, tuple(dst.shape), dst.dtype)
        if (heads := _heads_of(src, cfg)) is not None:
            values = unpermute_rows(values, heads)
        dst.copy_(values)
    return model, tok


def read_any_gguf(path: str, dtype: torch.dtype | None = None, device=None, quantized: bool = False,
                  tokenizer_dir: str | None = None):
    """(model, tokenizer) of a GGUF of any architecture nanoseek reads: the dense families here,
    `deepseek2` through nanoseek.gguf_file; `tokenizer_dir`, where given, supplies the tokenizer."""
    if is_dense_gguf(GGUFModelFile(path)):
        return read_dense_gguf(path, dtype=dtype, device=device, quantized=quantized, tokenizer_dir=tokenizer_dir)
    model, tok = read_gguf(path, dtype=dtype, device=device, quantized=quantized)
    return model, Tokenizer.from_dir(tokenizer_dir) if tokenizer_dir is not None else tok


def read_any_config(f: GGUFModelFile):
    """The config (DenseConfig, or deepseek2's ModelConfig) of a GGUF file's metadata."""
    return read_dense_config(f) if is_dense_gguf(f) else read_config(f)


# ---------------------------------------------------------------------------- writing
def check_dense_exportable(cfg: DenseConfig, path: str) -> None:
    """Refuse (GGUFError naming the field) what llama.cpp's dense architectures would compute differently."""
    rs = cfg.rope_scaling or {}
    if rs.get("rope_type") == "yarn":
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if rs.get(key) is not None:
                raise GGUFError(f"{path}: config field 'rope_scaling.{key}': llama.cpp's {cfg.model_type} computes "
                                "YaRN's default attention factor (1 + 0.1 ln factor) only")
        if rs.get("truncate") is False:
            raise GGUFError(f"{path}: config field 'rope_scaling.truncate': llama.cpp rounds YaRN's correction "
                            "range to whole dimensions (truncate true)")
    if rs.get("rope_type") == "llama3" and cfg.model_type != "llama":
        raise GGUFError(f"{path}: config field 'rope_scaling.rope_type': llama3 frequencies are written for "
                        f"`llama` only, not {cfg.model_type!r}")


def dense_tensor_type(mix: str, name: str, shape: tuple[int, ...], cfg: DenseConfig) -> Q:
    """The encoding of GGUF tensor `name` [..., k] under `--type mix`: norms, biases and rope_freqs
    f32; a plain type for every matrix; a mix by llama.cpp's rule (the value projection and
    ffn_down counted per layer; a tied token_embd takes the output type; a 70B model's attn_v one
    K-quant step up)."""
    if len(shape) == 1:
        return Q.F32
    if mix in PLAIN_TYPES:
        return PLAIN_TYPES[mix]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)\.weight", name)
    role, layer = (m.group(2), int(m.group(1))) if m else (name.removesuffix(".weight"), 0)
    if role == "token_embd" and cfg.tie_word_embeddings:
        role = "output"
    qtype = tensor_qtype(mix, role, shape[-1], layer=layer, n_layers=cfg.num_hidden_layers,
                         attn_v_index=layer, n_attn_v=cfg.num_hidden_layers)
    if role == "attn_v" and qtype == "q4_k" and is_70b(cfg):
        qtype = "q6_k"  # llama.cpp: q5_k, which nanoseek lacks; the next larger K-quant stands in
    return Q(ggml.QTYPES[qtype][0])


def is_70b(cfg: DenseConfig) -> bool:
    """llama.cpp's LLM_TYPE_70B (80 blocks: Llama with GQA, Qwen2), whose attn_v gets more bits."""
    return cfg.num_hidden_layers == 80 and (
        cfg.model_type == "qwen2" or (cfg.model_type == "llama" and cfg.num_key_value_heads != cfg.num_attention_heads))


def _plan(model: DenseModel, mix: str) -> list[tuple[str, torch.Tensor, Q]]:
    """Every tensor to write: (GGUF name, float tensor in numpy order, encoding)."""
    cfg = model.config
    out = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        gname = dense_gguf_name(name)
        if gname is None:
            raise GGUFError(f"state-dict entry '{name}' has no llama.cpp {cfg.model_type} tensor")
        t = t.detach().float().cpu()
        if (heads := _heads_of(gname, cfg)) is not None:
            t = permute_rows(t, heads)
        out.append((gname, t, dense_tensor_type(mix, gname, tuple(t.shape), cfg)))
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":
        out.append((ROPE_FREQS, llama3_rope_factors(cfg), Q.F32))
    return out


def _metadata(w: gguf.GGUFWriter, cfg: DenseConfig, name: str, ftype: int) -> None:
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
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rs = cfg.rope_scaling or {}
    if rs.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rs["factor"])
    elif rs.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rs["factor"])
        w.add_rope_scaling_orig_ctx_len(rs["original_max_position_embeddings"])
        if rs.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(float(rs["beta_fast"]))
        if rs.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(float(rs["beta_slow"]))


@torch.no_grad()
def write_dense_gguf(model: DenseModel, tokenizer: Tokenizer, path: str, qtype: str = "f16", name: str = "nanoseek",
                     split_max_size: int = 0) -> list[str]:
    """Write a DenseModel and its tokenizer as a `llama` / `qwen2` / `qwen3` GGUF (`qtype` one of
    nanoseek.gguf_file.WRITABLE_TYPES); with `split_max_size` (bytes), as parts. Each file is
    written beside its target and renamed into place. Returns the paths written."""
    writable_type(qtype, path)
    cfg = model.config
    check_dense_exportable(cfg, path)
    plan = _plan(model, qtype)

    def metadata(writer):
        _metadata(writer, cfg, name, FILE_TYPES[qtype])
        tokenizer_metadata(writer, tokenizer, cfg.vocab_size)
    return write_gguf_file(path, cfg.model_type, metadata, [(g, tuple(t.shape), q) for g, t, q in plan],
                           lambda i: encode_tensor(plan[i][1].numpy(), plan[i][2]), split_max_size)
