"""The one definition of speed figures: FLOPs per token, bytes
per decoded token, the peaks, MFU and MBU. Every benchmark uses these.

MFU (model FLOPs utilization, PaLM appendix B): model FLOPs per second over the GPU's dense bf16
spec peak, `spec_peak_flops` (989 TFLOP/s for an H100 or H200 SXM). That is the headline figure in
every table. The measured matmul peak (`measure_matmul_peak`, an 8192^3 bf16 GEMM) is printed
beside it, with the share of it the model reached, as the attainable ceiling on that card."""

from __future__ import annotations

import time

import torch

from .config import ModelConfig


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 x active non-embedding parameters + causal attention (forward + backward):
    3 x 2 x layers x heads x (qk_head_dim + v_head_dim) x T / 2."""
    active = cfg.param_counts()["active_params"]  # excludes the embedding lookup
    attn = 3 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
    return 6 * active + attn


def decode_bytes_per_token(cfg: ModelConfig, context_len: int, batch: int = 1, weight_bytes: int = 2,
                           cache_bytes: int = 2) -> float:
    """Bytes read per generated token at batch `batch`: the weights actually read (one embedding
    row per sequence, the active experts, the head; shared by the batch) plus each sequence's
    MLA latent cache of `context_len` tokens."""
    pc = cfg.param_counts()
    weights = (pc["active_params"] * weight_bytes) / batch + cfg.hidden_size * weight_bytes
    kv = cfg.kv_cache_bytes_per_token(cache_bytes)["mla_kv_bytes_per_token"] * context_len
    return weights + kv


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure_matmul_peak(device="cuda", n: int = 8192, dtype=torch.bfloat16, iters: int = 20) -> float:
    """Achieved FLOP/s of an n^3 matmul on random data (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - t)


def measure_copy_bandwidth(device="cuda", nbytes: int = 2 * 2**30, iters: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), the MBU denominator."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    _sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    _sync(device)
    return 2 * nbytes * iters / (time.perf_counter() - t)


# dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, FLOP/s
SPEC_BF16_DENSE = {"H100 SXM": 989.4e12, "H100 80GB HBM3": 989.4e12, "H200": 989.4e12, "H100 PCIe": 756.0e12,
                   "H100 NVL": 835.0e12, "A100": 312.0e12}


def spec_peak_flops(device="cuda") -> float | None:
    """The dense bf16 spec peak of `device`'s GPU (None when its name is not in SPEC_BF16_DENSE)."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(SPEC_BF16_DENSE, key=len, reverse=True):  # most specific name first
        if all(part in name for part in key.split()):
            return SPEC_BF16_DENSE[key]
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs per second over `peak_flops`: pass `spec_peak_flops()` for MFU as the tables
    report it, the measured matmul peak for the share of the attainable."""
    return tokens_per_s * flops_per_token / peak_flops


def mbu(tokens_per_s: float, bytes_per_token: float, peak_bytes_per_s: float) -> float:
    return tokens_per_s * bytes_per_token / peak_bytes_per_s
