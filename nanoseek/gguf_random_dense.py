"""A dense `llama` / `qwen2` / `qwen3` GGUF of any DenseConfig with random weights written straight
into GGML blocks: `write_random_dense_gguf(path, config, mix)`. It gives the R1-distill models
(DeepSeek-R1 report, arXiv 2501.12948, section 2.4) at their real dimensions, to load, run and
time without a float copy ever existing: each tensor's bytes are drawn one at a time
(nanoseek.gguf_random.random_tensor, the init spread of DenseModel.init_weights) and written out
(gguf_file.write_gguf_file), so memory stays about one tensor and a q4_k_m 8B file is ~5 GB on disk.

- Shapes (`DENSE_SHAPES`): the released config.json values of DeepSeek-R1-Distill-Qwen-1.5B
  (Qwen2.5-1.5B), DeepSeek-R1-0528-Qwen3-8B (Qwen3-8B) and DeepSeek-R1-Distill-Llama-8B
  (Llama-3.1-8B); `dense_shape(name, **changes)` gives one, tiny or not.
- Tensors: the names, layout and per-tensor types of nanoseek.gguf_dense (llama.cpp's
  `--type` rule, `dense_tensor_type`); norms are ones, biases zero, Llama 3's `rope_freqs` the
  llama3 divisors of the config. The q/k rows of `llama` are random, so llama.cpp's row
  permutation needs no applying.
- Tokenizer (`family_tokenizer`): a small byte-level BPE trained on a fixed text with the
  family's pre-tokenizer (Qwen2's split for qwen2 / qwen3, Llama 3's with `ignore_merges` for
  llama), the R1 distills' BOS / EOS texts at the config's ids, the other ids padding
  (gguf_tokenizer writes them UNUSED), as the GGUF of a real distill names them.
"""

from __future__ import annotations

import json

import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

from .dense import DenseModel
from .dense_config import DenseConfig
from .gguf_dense import ROPE_FREQS, check_dense_exportable, dense_gguf_name, dense_tensor_type, llama3_rope_factors
from .gguf_dense import _metadata as dense_metadata
from .gguf_file import FILE_TYPES, PlannedTensor, Q, writable_type, write_gguf_file
from .gguf_random import BOS, EOS, random_tensor
from .gguf_tokenizer import LLAMA3_SPLITS, QWEN2_SPLITS, tokenizer_metadata
from .tokenizer import Tokenizer

# config.json of each release; the model cards:
# https://huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
# https://huggingface.co/deepseek-ai/DeepSeek-R1-0528-Qwen3-8B
# https://huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Llama-8B
DENSE_SHAPES = {
    "qwen2.5-1.5b": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, head_dim=128, rms_norm_eps=1e-6,
        max_position_embeddings=131072, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=151646, eos_token_id=151643),
    "qwen3-8b": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
        max_position_embeddings=131072, rope_theta=1000000.0,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645),
    "llama3.1-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
}
# the text the small tokenizers are trained on: English, code, digits, a little CJK
_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. It's a dog's life, isn't it? We'll see, they'd say.",
    "DeepSeek-R1 distills reasoning into dense models: first think, then answer. <think> step by step </think>",
    "In 2025 there were 1234567 visitors; 3.14159 is pi and 2,000,000 is two million.",
    "def add(x, y):\n    return x + y\n\nfor i in range(10):\n    print(add(i, i * 2))\n",
    "Attention is a weighted sum of values; the weights are a softmax of queries times keys.",
    "中文字符测试，这是一个句子。日本語のカタカナとひらがな。",
    "Hello! How are you today? I am fine, thank you. What is the capital of France? Paris.",
]
_TOKENIZER_VOCAB = 1024  # the trained BPE's size before the special tokens


def dense_shape(name: str, **changes) -> DenseConfig:
    """The DenseConfig of a released R1 distill (`DENSE_SHAPES`), with `changes` (a tiny one for tests)."""
    if name not in DENSE_SHAPES:
        raise ValueError(f"unknown dense shape {name!r}; known: {', '.join(DENSE_SHAPES)}")
    return DenseConfig(**{**DENSE_SHAPES[name], "torch_dtype": "bfloat16", **changes})


def family_tokenizer(cfg: DenseConfig) -> Tokenizer:
    """A byte-level BPE trained on `_TRAINING_TEXT` with the pre-tokenizer of cfg's family and the
    R1 distills' BOS / EOS at the config's ids (module docstring)."""
    llama = cfg.model_type == "llama"
    (split,) = LLAMA3_SPLITS if llama else QWEN2_SPLITS

    def shell(model):
        tk = tokenizers.Tokenizer(model)
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tk.decoder = decoders.ByteLevel()
        return tk

    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else cfg.eos_token_id[0]
    specials = {i: t for i, t in ((cfg.bos_token_id, BOS), (eos, EOS)) if i is not None}
    trained = shell(models.BPE())
    size = min(_TOKENIZER_VOCAB, cfg.vocab_size - len(specials))
    trained.train_from_iterator(_TRAINING_TEXT, trainers.BpeTrainer(
        vocab_size=size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=0, show_progress=False))
    bpe = json.loads(trained.to_str())["model"]
    learned = sorted(bpe["vocab"].items(), key=lambda kv: kv[1])  # ids 0.. in training order
    free = (i for i in range(cfg.vocab_size) if i not in specials)
    vocab = {text: next(free) for text, _ in learned}
    vocab.update({text: i for i, text in specials.items()})
    if len(vocab) > cfg.vocab_size:
        raise ValueError(f"vocab_size {cfg.vocab_size} is too small for the family tokenizer ({len(vocab)} tokens)")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    tk = shell(models.BPE(vocab=vocab, merges=merges, ignore_merges=llama))
    tk.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in specials.values()])
    return Tokenizer(tk, bos_token=BOS if cfg.bos_token_id is not None else None, eos_token=EOS)


def dense_shape_plan(cfg: DenseConfig, mix: str) -> list[PlannedTensor]:
    """The tensors a dense GGUF of `cfg` under `--type mix` holds, as meta tensors (shapes only),
    each with its encoding (gguf_dense.dense_tensor_type)."""
    writable_type(mix, "<plan>")
    check_dense_exportable(cfg, "<plan>")
    with torch.device("meta"):
        model = DenseModel(cfg)
    plan = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        gname = dense_gguf_name(name)
        plan.append(PlannedTensor(gname, t, dense_tensor_type(mix, gname, tuple(t.shape), cfg)))
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":
        plan.append(PlannedTensor(ROPE_FREQS, torch.empty(cfg.head_dim // 2, device="meta"), Q.F32))
    return plan


def random_dense_tensor(p: PlannedTensor, cfg: DenseConfig, seed: int):
    """The GGUF bytes [..., row_bytes] (uint8 numpy) of one planned tensor (module docstring)."""
    if p.name == ROPE_FREQS:
        return llama3_rope_factors(cfg).float().contiguous().view(torch.uint8).numpy()
    if p.name.endswith(".bias"):
        return torch.zeros(tuple(p.tensor.shape)).view(torch.uint8).numpy()
    return random_tensor(p, cfg, seed)  # norms ones; matrices random blocks of the init spread


def write_random_dense_gguf(path: str, config: DenseConfig, mix: str = "q4_k_m", seed: int = 0,
                            name: str = "nanoseek-random-dense") -> list[str]:
    """Write a `llama` / `qwen2` / `qwen3` GGUF of `config` under `--type mix` with random weights
    (module docstring), tensor by tensor; returns the files written."""
    plan = dense_shape_plan(config, mix)
    seeds = {p.name: seed * 1_000_003 + i for i, p in enumerate(plan)}
    tok = family_tokenizer(config)

    def metadata(writer):
        dense_metadata(writer, config, name, FILE_TYPES[mix])
        tokenizer_metadata(writer, tok, config.vocab_size)
    return write_gguf_file(path, config.model_type, metadata, [(p.name, tuple(p.tensor.shape), p.qtype) for p in plan],
                           lambda i: random_dense_tensor(plan[i], config, seeds[plan[i].name]))
