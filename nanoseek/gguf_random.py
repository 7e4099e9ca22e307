"""A `deepseek2` GGUF of any ModelConfig with random weights written straight into GGML blocks:
`write_random_gguf(path, config, mix)`. It gives a model of real dimensions (DeepSeek-V2-Lite,
15.7B parameters, arXiv 2405.04434; the DeepSeek-V3 report's architecture, arXiv 2412.19437
section 2) to load, run and time without a float copy ever existing: each tensor's block bytes
are drawn one tensor at a time (an expert stack expert by expert) and written out
(gguf_file.write_planned), so memory stays about one tensor and a q4_k_m V2-Lite is ~9 GB on disk.

The blocks are random but valid: random codes with scales chosen so the weights have the spread
of DeepSeekV3.init_weights (normal(0, initializer_range); the output projections o_proj and
down_proj scaled by 1/sqrt(2 * layers)), zero mean (a random sign on each block's scale where the
format's codes are offset), so activations stay finite through every layer. Per format, with q
uniform over its codes:

    q8_0  w = d q,             q in -127..127            q4_0  w = d (q - 8),   q in 0..15
    q5_0  w = d (q - 16),      q in 0..31                q6_k  w = d sc (q - 32), sc in +-64..127
    q4_k  w = d sc q - dmin m, sc in 32..63, dmin = 8 d, m = round(15 sc / 16), so w ~ d sc (q - 7.5)

Norm weights are ones, the router normal in f32, the balancing bias zero; a plain type (f32, f16,
bf16) holds normal values. The tokenizer is byte-level BPE: the 256 byte symbols, a few merges,
BOS/EOS at the config's ids, the other ids unused.
"""

from __future__ import annotations

import math

import numpy as np
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers

from .config import ModelConfig
from .gguf_file import GGML_NAMES, PlannedTensor, shape_plan, write_planned
from .quant.ggml import QTYPES, pack_q4_k_scale_min
from .tokenizer import Tokenizer

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
_OUT_ROLES = ("attn_output", "ffn_down")  # scaled by 1/sqrt(2 * layers), as init_weights does
# root mean square of the code term of each format, q uniform over its codes: the scale d that
# gives weights of spread std is std / (this * rms of the sub-block scale)
_CODE_RMS = {"q8_0": math.sqrt((255 ** 2 - 1) / 12), "q4_0": math.sqrt((16 ** 2 - 1) / 12 + 0.25),
             "q5_0": math.sqrt((32 ** 2 - 1) / 12 + 0.25), "q4_k": math.sqrt((16 ** 2 - 1) / 12),
             "q6_k": math.sqrt((64 ** 2 - 1) / 12 + 0.25)}
_Q4K_SC = (32, 64)  # q4_k sub-block scales drawn from this range (6 bits)
_Q6K_SC = (64, 128)  # |q6_k sub-block scales| drawn from this range (int8)


def _rms_uniform(lo: int, hi: int) -> float:
    """Root mean square of an integer uniform over lo..hi-1."""
    n = hi - lo
    mean = (lo + hi - 1) / 2
    return math.sqrt(mean ** 2 + (n ** 2 - 1) / 12)


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [n, 1] -> fp16 little-endian bytes [n, 2]."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def _signs(n: int, g: torch.Generator) -> torch.Tensor:
    """n random signs, float32 [n, 1]."""
    return torch.randint(0, 2, (n, 1), generator=g).float() * 2 - 1


def random_blocks(n: int, qtype: str, std: float, g: torch.Generator) -> torch.Tensor:
    """n random blocks of GGML type `qtype` whose weights have mean 0 and spread `std`: uint8 [n, bytes]."""
    _, _, nbytes = QTYPES[qtype]
    codes = torch.randint(0, 256, (n, nbytes), dtype=torch.uint8, generator=g)  # [n, bytes]
    if qtype == "q8_0":
        q = torch.randint(-127, 128, (n, 32), dtype=torch.int8, generator=g)
        codes[:, 2:] = q.view(torch.uint8)
        codes[:, :2] = _fp16_bytes(torch.full((n, 1), std / _CODE_RMS[qtype]))
    elif qtype in ("q4_0", "q5_0"):  # the codes' offset mean cancels over blocks of either sign
        codes[:, :2] = _fp16_bytes(_signs(n, g) * std / _CODE_RMS[qtype])
    elif qtype == "q4_k":
        sc = torch.randint(*_Q4K_SC, (n, 8), dtype=torch.int32, generator=g)
        mins = torch.round(sc.float() * 15 / 16).to(torch.int32)  # dmin m = 8 d m ~ 7.5 d sc
        d = torch.full((n, 1), std / (_CODE_RMS[qtype] * _rms_uniform(*_Q4K_SC)))
        codes[:, 0:2], codes[:, 2:4] = _fp16_bytes(d), _fp16_bytes(8 * d)
        codes[:, 4:16] = pack_q4_k_scale_min(sc, mins)
    elif qtype == "q6_k":
        sc = torch.randint(*_Q6K_SC, (n, 16), dtype=torch.int32, generator=g) * _signs(n * 16, g).view(n, 16).int()
        codes[:, 192:208] = sc.to(torch.int8).view(torch.uint8)
        codes[:, 208:210] = _fp16_bytes(torch.full((n, 1), std / (_CODE_RMS[qtype] * _rms_uniform(*_Q6K_SC))))
    else:
        raise ValueError(f"no random blocks for GGML type {qtype!r}")
    return codes


def _plain(shape: tuple[int, ...], qtype: str, std: float, g: torch.Generator) -> torch.Tensor:
    """Normal(0, std) values [..., n] in a plain encoding as its bytes [..., n * size] (uint8)."""
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[qtype]
    values = (torch.randn(shape, generator=g) * std).to(dtype)
    return values.view(torch.uint8)


def _std(p: PlannedTensor, cfg: ModelConfig) -> float:
    """The init spread of the planned tensor (DeepSeekV3.init_weights)."""
    role = p.name.split(".")[2] if p.name.startswith("blk.") else p.name
    std = cfg.initializer_range
    return std / math.sqrt(2 * cfg.num_hidden_layers) if role.startswith(_OUT_ROLES) else std


def random_tensor(p: PlannedTensor, cfg: ModelConfig, seed: int) -> np.ndarray:
    """The GGUF bytes [..., row_bytes] (uint8) of one planned tensor, random as the module says."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(p.tensor.shape)
    if p.name.endswith("_norm.weight"):
        return torch.ones(shape).view(torch.uint8).numpy()
    if p.name.endswith("exp_probs_b.bias"):
        return torch.zeros(shape).view(torch.uint8).numpy()
    qtype = GGML_NAMES[p.qtype]
    std = _std(p, cfg)
    if qtype in ("f32", "f16", "bf16"):
        return _plain(shape, qtype, std, g).numpy()
    _, block, nbytes = QTYPES[qtype]
    rows = shape[:-1]
    out = np.empty((*rows, shape[-1] // block * nbytes), dtype=np.uint8)
    flat = out.reshape(-1, shape[-1] // block * nbytes)  # [rows, row_bytes]
    step = max(1, (1 << 22) // shape[-1])  # rows per draw: ~4M weights of temporaries
    for i in range(0, flat.shape[0], step):
        n = min(step, flat.shape[0] - i)
        flat[i:i + n] = random_blocks(n * shape[-1] // block, qtype, std, g).view(n, -1).numpy()
    return out


def byte_tokenizer(cfg: ModelConfig) -> Tokenizer:
    """A byte-level BPE of the 256 byte symbols and a few merges, BOS / EOS at the config's ids."""
    reserved = {i for i in (cfg.bos_token_id, cfg.eos_token_id) if isinstance(i, int)}
    free = (i for i in range(cfg.vocab_size) if i not in reserved)
    symbols = pre_tokenizers.ByteLevel.alphabet()
    vocab = {s: next(free) for s in sorted(symbols)}
    merges = [("t", "h"), ("Ġ", "t"), ("e", "r"), ("i", "n")]
    for a, b in merges:
        vocab[a + b] = next(free)
    specials = []
    for token, i in ((BOS, cfg.bos_token_id), (EOS, cfg.eos_token_id)):
        if isinstance(i, int):
            vocab[token] = i
            specials.append(tokenizers.AddedToken(token, special=True, normalized=False))
    if len(vocab) > cfg.vocab_size:
        raise ValueError(f"vocab_size {cfg.vocab_size} is too small for a byte-level tokenizer ({len(vocab)} tokens)")
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(specials)
    return Tokenizer(tk, bos_token=BOS if cfg.bos_token_id is not None else None, eos_token=EOS)


def write_random_gguf(path: str, config: ModelConfig, mix: str = "q4_k_m", seed: int = 0,
                      name: str = "nanoseek-random") -> list[str]:
    """Write a `deepseek2` GGUF of `config` under `--type mix` with random weights (module
    docstring), tensor by tensor; returns the files written (one, unless the writer splits)."""
    cfg = config.replace(num_nextn_predict_layers=0)
    plan = shape_plan(cfg, mix)
    seeds = {p.name: seed * 1_000_003 + i for i, p in enumerate(plan)}
    return write_planned(path, cfg, byte_tokenizer(cfg), mix, plan,
                         lambda p: random_tensor(p, cfg, seeds[p.name]), name)
