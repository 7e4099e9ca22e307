"""GGML q4_0 / q4_k blocks as the operands of PyTorch's int4 CPU GEMM
(torch._weight_int4pack_mm_for_cpu, group size 32), in plain PyTorch.

Both formats are 4-bit codes with one scale and offset per 32 weights (q4_0: w = d (q - 8);
q4_k: w = d sc q - dmin m = d sc (q - 8) + (8 d sc - dmin m)), which is that GEMM's layout:
w = (q - 8) * scale + zero per group of 32 along K. The op is fast with bf16 activations and bf16
scales and zeros, so the group scales and zeros are rounded to bf16 and the GEMM runs on bf16
activations: not exact, within a bound of the exact dequantization path that
tests/test_quant_qlinear.py pins. Weight-only quantization with these blocks: llama.cpp's
ggml-common.h; the GEMM is the tinygemm layout of gpt-fast and torchao.

A stack of matrices [E, N, row_bytes] (the routed experts of one projection) is packed in one
call when its rows form whole packing tiles (N a multiple of PACK_TILE_ROWS), which gives the
same bytes as packing each matrix alone (tests/test_quant_int4pack.py checks it).
"""

from __future__ import annotations

from functools import lru_cache

import torch

INT4_GROUP = 32  # weights per scale and zero
INT4_QTYPES = ("q4_0", "q4_k")
PACK_ROW_MULTIPLE = 16  # the packing wants output rows in multiples of 16
PACK_TILE_ROWS = 64  # the widest row tile of the CPU packing (AVX-512); a multiple of every narrower one


@lru_cache(maxsize=None)
def int4pack_available() -> bool:
    """Whether this PyTorch has the int4 CPU GEMM with bf16 activations and scales."""
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        return False
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.zeros(16, 64, dtype=torch.int32), 2)
        torch._weight_int4pack_mm_for_cpu(torch.zeros(1, 64, dtype=torch.bfloat16), packed, INT4_GROUP,
                                          torch.zeros(2, 16, 2, dtype=torch.bfloat16))
        return True
    except (RuntimeError, TypeError, AttributeError, NotImplementedError):
        return False


def applies(raw: torch.Tensor, qtype: str) -> bool:
    """Whether GGML bytes raw [..., N, row_bytes] of `qtype` can run on the int4 CPU GEMM."""
    return (qtype in INT4_QTYPES and raw.device.type == "cpu" and raw.shape[-2] % PACK_ROW_MULTIPLE == 0
            and int4pack_available())


def int4_codes(raw: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q4_0 / q4_k bytes [N, nbytes] -> codes [N, K] int32 in 0..15, scales and zeros [N, K/32]
    float32 with w = (q - 8) * scale + zero."""
    N = raw.shape[0]
    if qtype == "q4_0":
        blocks = raw.reshape(N, -1, 18)  # [N, K/32, 18]
        d = blocks[..., :2].contiguous().view(torch.float16).float()[..., 0]  # [N, K/32]
        q = torch.cat([blocks[..., 2:] & 0xF, blocks[..., 2:] >> 4], dim=-1)  # [N, K/32, 32]
        return q.reshape(N, -1).to(torch.int32), d, torch.zeros_like(d)
    if qtype == "q4_k":
        blocks = raw.reshape(N, -1, 144)  # [N, K/256, 144]
        d = blocks[..., 0:2].contiguous().view(torch.float16).float()  # [N, S, 1]
        dmin = blocks[..., 2:4].contiguous().view(torch.float16).float()
        s = blocks[..., 4:16].to(torch.int32)
        lo, mid, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
        sc = torch.cat([lo & 0x3F, (md & 0xF) | ((lo >> 2) & 0x30)], dim=-1).float()  # [N, S, 8]
        mn = torch.cat([mid & 0x3F, (md >> 4) | ((mid >> 2) & 0x30)], dim=-1).float()
        qs = blocks[..., 16:].reshape(N, -1, 4, 32)
        q = torch.stack([qs & 0xF, qs >> 4], dim=3).reshape(N, -1)  # sub-blocks in order [N, K]
        scale = (d * sc).reshape(N, -1)  # [N, K/32]
        return q.to(torch.int32), scale, 8 * scale - (dmin * mn).reshape(N, -1)
    raise ValueError(f"no int4 fast path for {qtype!r} (only {', '.join(INT4_QTYPES)})")


def pack_int4(raw: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """GGML bytes raw [N, row_bytes] or a stack [E, N, row_bytes] -> the operands of
    torch._weight_int4pack_mm_for_cpu: packed codes [(E,) N, K/2] uint8 and scales_and_zeros
    [(E,) K/32, N, 2] rounded to bf16. A stack whose N is not a multiple of PACK_TILE_ROWS is
    packed matrix by matrix."""
    if raw.dim() == 2:
        q, scale, zero = int4_codes(raw, qtype)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
        return packed, torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    E, N, _ = raw.shape
    if N % PACK_TILE_ROWS:
        packs = [pack_int4(raw[e], qtype) for e in range(E)]
        return torch.stack([p for p, _ in packs]), torch.stack([z for _, z in packs])
    q, scale, zero = int4_codes(raw.reshape(E * N, -1), qtype)  # [E*N, K], [E*N, K/32]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2).view(E, N, -1)
    del q
    scales_zeros = torch.stack([scale.view(E, N, -1).transpose(1, 2), zero.view(E, N, -1).transpose(1, 2)], dim=-1)
    return packed, scales_zeros.to(torch.bfloat16).contiguous()  # [E, K/32, N, 2]


def int4_mm(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """x [M, K] (any float dtype) times the packed weight [N, K/2]^T -> [M, N] in x's dtype."""
    return torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, INT4_GROUP, scales_zeros).to(x.dtype)
