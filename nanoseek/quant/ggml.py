"""GGML block quantization formats with llama.cpp's exact byte layouts, in plain PyTorch.

Weight-only quantization as GGUF files store it (llama.cpp's ggml-common.h for the block structs,
ggml-quants.c for the reference quantizers, gguf-py's quants.py for the numpy dequantizers):

    q8_0  32 weights: fp16 d, 32 int8 q                        w = d * q
    q4_0  32 weights: fp16 d, 16 bytes of nibbles              w = d * (q - 8)
    q5_0  32 weights: fp16 d, uint32 high bits, 16 bytes       w = d * (q - 16)
    q4_k  256 weights: fp16 d, fp16 dmin, 12 bytes of 6-bit (scale, min) for 8 sub-blocks of 32,
          128 bytes of nibbles                                 w = d * sc * q - dmin * m
    q6_k  256 weights: 128 bytes low nibbles, 64 bytes high 2 bits, 16 int8 scales (sub-blocks
          of 16), fp16 d                                       w = d * sc * (q - 32)
    f32 / f16 / bf16: the plain encodings (bf16 rounded to nearest even, NaN kept quiet).

`quantize(w, qtype)` maps the last axis of w [..., K] to [..., K // block * bytes_per_block]
uint8; `dequantize(raw, qtype)` inverts it. Every op works on all blocks at once (no loop over
blocks); the K-quant searches run over chunks of rows to bound memory. q4_k and q6_k follow
llama.cpp's reference quantizers (quantize_row_q4_K_ref: make_qkx2_quants per sub-block, then
6-bit scales and mins; quantize_row_q6_K_ref: make_qx_quants per 16-wide sub-block, then 8-bit
scales), with the same candidate grids and tie-breaking. q5_0 is here because llama.cpp falls
back to it from q4_k when a row length is not a multiple of 256.
"""

from __future__ import annotations

import torch

QK_K = 256  # super-block of the K-quants
GROUP_MAX_EPS = 1e-15  # llama.cpp: a sub-block below this amax quantizes to zeros

# name -> (ggml type id as in gguf.GGMLQuantizationType, weights per block, bytes per block)
QTYPES: dict[str, tuple[int, int, int]] = {
    "f32": (0, 1, 4),
    "f16": (1, 1, 2),
    "bf16": (30, 1, 2),
    "q4_0": (2, 32, 18),
    "q5_0": (6, 32, 22),
    "q8_0": (8, 32, 34),
    "q4_k": (12, QK_K, 144),
    "q6_k": (14, QK_K, 210),
}

_DEQUANT_WEIGHTS = 1 << 18  # weights per dequantization step (bounds its float32 temporaries)
_CHUNK_BLOCKS = 16384  # super-blocks per step of the K-quant searches (bounds their temporaries)


def _spec(qtype: str) -> tuple[int, int, int]:
    if qtype not in QTYPES:
        raise ValueError(f"unsupported GGML type {qtype!r}; supported: {', '.join(QTYPES)}")
    return QTYPES[qtype]


def row_bytes(k: int, qtype: str) -> int:
    """Bytes of one row of k weights in `qtype` (ValueError if k is not a multiple of its block)."""
    _, block, nbytes = _spec(qtype)
    if k % block:
        raise ValueError(f"{qtype}: row length {k} is not a multiple of its block size {block}")
    return k // block * nbytes


def fits(k: int, qtype: str) -> bool:
    """Whether rows of k weights can be stored in `qtype`."""
    return k % _spec(qtype)[1] == 0


# --------------------------------------------------------------------------------------- helpers
def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [..., 1] -> its fp16 encoding, little-endian uint8 [..., 2]."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def _fp16_value(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] (an fp16, little-endian) -> float32 [..., 1]."""
    return b.contiguous().view(torch.float16).float()


def _nearest_int(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's nearest_int (the 1.5 * 2^23 trick): round half to even, as an int32 tensor."""
    return torch.round(x).to(torch.int32)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf (half away from zero), computed as gguf-py's np_roundf does."""
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1 / d, 0 where d == 0 (the quantizers' `id = d ? 1/d : 0`)."""
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis left to right in float32, as the C loops accumulate (torch.sum's
    pairwise order rounds differently and flips near-ties of the searches below)."""
    acc = x[..., 0]
    for i in range(1, x.shape[-1]):
        acc = acc + x[..., i]
    return acc


def _abs_argmax_value(blocks: torch.Tensor) -> torch.Tensor:
    """blocks [n, b] -> the entry of largest magnitude (the first on ties), keeping its sign [n, 1]."""
    return blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True))


def _nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Two int tensors of 4-bit values -> uint8 lo | hi << 4."""
    return ((lo & 0xF) | ((hi & 0xF) << 4)).to(torch.uint8)


def _unpack_nibbles(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 -> (low nibble, high nibble) as uint8."""
    return b & 0xF, b >> 4


# --------------------------------------------------------------------------------------- 32-blocks
def _quantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """[n, 32] float32 -> [n, 34]: fp16 d = amax / 127, q = roundf(x / d)."""
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    q = _roundf(blocks * _inverse(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([_fp16_bytes(d), q], dim=-1)


def _dequantize_q8_0(raw: torch.Tensor) -> torch.Tensor:
    d = _fp16_value(raw[:, :2])
    return raw[:, 2:].contiguous().view(torch.int8).float() * d


def _quantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """[n, 32] -> [n, 18]: d = (signed max-magnitude) / -8, q = min(15, int(x / d + 8.5))."""
    d = _abs_argmax_value(blocks) / -8
    q = torch.trunc(blocks * _inverse(d) + 8.5).to(torch.int32).clamp(0, 15)
    return torch.cat([_fp16_bytes(d), _nibbles(q[:, :16], q[:, 16:])], dim=-1)


def _dequantize_q4_0(raw: torch.Tensor) -> torch.Tensor:
    d = _fp16_value(raw[:, :2])
    lo, hi = _unpack_nibbles(raw[:, 2:])
    q = torch.cat([lo, hi], dim=-1).to(torch.int8) - 8  # [n, 32]
    return d * q.float()


def _quantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """[n, 32] -> [n, 22]: d = (signed max-magnitude) / -16, q = min(31, int(x / d + 16.5)); the
    fifth bits as one little-endian uint32 (bit j of weight j)."""
    d = _abs_argmax_value(blocks) / -16
    q = torch.trunc(blocks * _inverse(d) + 16.5).to(torch.int32).clamp(0, 31)
    bits = (q >> 4).view(-1, 4, 8)  # [n, 4 bytes, 8 bits]
    qh = (bits << torch.arange(8, dtype=torch.int32)).sum(dim=-1).to(torch.uint8)  # [n, 4]
    return torch.cat([_fp16_bytes(d), qh, _nibbles(q[:, :16], q[:, 16:])], dim=-1)


def _dequantize_q5_0(raw: torch.Tensor) -> torch.Tensor:
    d = _fp16_value(raw[:, :2])
    qh = raw[:, 2:6].to(torch.int32)  # [n, 4]
    high = ((qh[:, :, None] >> torch.arange(8, dtype=torch.int32)) & 1).reshape(-1, 32)  # [n, 32]
    lo, hi = _unpack_nibbles(raw[:, 6:])
    low = torch.cat([lo, hi], dim=-1).to(torch.int32)
    q = (low | (high << 4)).to(torch.int8) - 16
    return d * q.float()


# --------------------------------------------------------------------------------------- Q4_K
def _make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                      nstep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's make_qkx2_quants (squared error) on every sub-block at once.

    x, weights [n, s, b] -> (scale [n, s], the_min [n, s] (>= 0, subtracted), L [n, s, b] int32):
    the affine grid x ~ scale * L + min fitted by weighted least squares. As in the C loop the
    steps run in order and each grid (rmin + rdelta * i + nmax) / (max - min) uses the min of the
    best fit so far, so the loop is over the nstep + 1 steps, each on all sub-blocks."""
    mn = x.amin(dim=-1).clamp(max=0)  # [n, s]
    mx = x.amax(dim=-1)
    sum_w = _sum(weights)
    sum_x = _sum(weights * x)
    flat = mx == mn

    def grid(iscale, mn):  # -> L [n, s, b] on the grid iscale * (x - min)
        return _nearest_int(iscale[..., None] * (x - mn[..., None])).clamp(0, nmax)

    def error(scale, mn, L):
        return _sum(weights * (scale[..., None] * L + mn[..., None] - x) ** 2)

    span = torch.where(flat, torch.ones_like(mx), mx - mn)
    iscale = nmax / span
    scale = 1 / iscale
    L = grid(iscale, mn)
    best = error(scale, mn, L)
    for step in range(nstep + 1):
        factor = torch.tensor(rdelta, dtype=torch.float32) * step + rmin + nmax  # C: rmin + rdelta*is + nmax
        span = torch.where(flat, torch.ones_like(mx), mx - mn)
        La = grid(factor / span, mn)
        Lf = La.float()
        sum_l = _sum(weights * Lf)
        sum_l2 = _sum(weights * Lf * Lf)
        sum_xl = _sum(weights * Lf * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        safe_D = torch.where(ok, D, torch.ones_like(D))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_D
        positive_min = this_min > 0
        this_min = torch.where(positive_min, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(positive_min, sum_xl / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)),
                                 this_scale)
        cur = error(this_scale, this_min, Lf)
        better = ok & (cur < best) & ~flat
        L = torch.where(better[..., None], La, L)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = torch.where(flat[..., None], torch.zeros_like(L), L)
    return scale, -mn, L


def _quantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """[n, 256] -> [n, 144] as quantize_row_q4_K_ref: per 32-wide sub-block an affine fit
    (make_qkx2_quants, weights rms(x) + |x|), then the 8 scales and mins as 6-bit multiples of the
    fp16 super-block d = max scale / 63 and dmin = max min / 63, then the nibbles refit to those."""
    n = blocks.shape[0]
    x = blocks.view(n, 8, 32)
    av_x = (_sum(x * x)[..., None] / 32).sqrt()
    scales, mins, L = _make_qkx2_quants(x, av_x + x.abs(), 15, -1.0, 0.1, 20)  # [n, 8], [n, 8], [n, 8, 32]

    max_scale = scales.clamp(min=0).amax(dim=-1, keepdim=True)  # [n, 1]: the C loop starts at 0
    max_min = mins.clamp(min=0).amax(dim=-1, keepdim=True)
    inv_scale = torch.where(max_scale > 0, 63 / max_scale, torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, 63 / max_min, torch.zeros_like(max_min))
    ls = (_nearest_int(inv_scale * scales) & 0xFF).clamp(max=63)  # [n, 8]: uint8 then MIN(63, .)
    lm = (_nearest_int(inv_min * mins) & 0xFF).clamp(max=63)
    d_bytes, dmin_bytes = _fp16_bytes(max_scale / 63), _fp16_bytes(max_min / 63)

    d = _fp16_value(d_bytes) * ls.float()  # [n, 8]
    dm = _fp16_value(dmin_bytes) * lm.float()
    refit = _nearest_int((x + dm[..., None]) / torch.where(d == 0, torch.ones_like(d), d)[..., None]).clamp(0, 15)
    L = torch.where((d == 0)[..., None], L, refit)  # C skips a zero-scale sub-block, keeping its L

    Lc = L.view(n, 4, 2, 32)  # 64-wide chunks: the first 32 in the low nibbles, the next 32 in the high
    qs = _nibbles(Lc[:, :, 0], Lc[:, :, 1]).view(n, 128)
    return torch.cat([d_bytes, dmin_bytes, pack_q4_k_scale_min(ls, lm), qs], dim=-1)


def pack_q4_k_scale_min(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """6-bit scales and mins [n, 8] (int32) -> the 12 packed bytes [n, 12] of a q4_k block."""
    packed = torch.empty(ls.shape[0], 12, dtype=torch.int32)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return packed.to(torch.uint8)


def _q4_k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes [n, 12] -> 6-bit scales and mins [n, 8] (llama.cpp get_scale_min_k4)."""
    s = scales.to(torch.int32)
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0xF) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _dequantize_q4_k(raw: torch.Tensor) -> torch.Tensor:
    n = raw.shape[0]
    d, dmin = _fp16_value(raw[:, 0:2]), _fp16_value(raw[:, 2:4])  # [n, 1]
    sc, mn = _q4_k_scale_min(raw[:, 4:16])
    lo, hi = _unpack_nibbles(raw[:, 16:].reshape(n, 4, 32))
    q = torch.stack([lo, hi], dim=2).reshape(n, 8, 32).float()  # sub-blocks in order
    return ((d * sc.float())[..., None] * q - (dmin * mn.float())[..., None]).reshape(n, QK_K)


# --------------------------------------------------------------------------------------- Q6_K
def _make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's make_qx_quants with rmse_type 1 (weights x^2) on every sub-block at once.

    x [n, s, b] -> (scale [n, s], L [n, s, b] int32 in [0, 2 nmax)): the symmetric grid
    -(nmax + 0.1 i) / max (max: the signed entry of largest magnitude), i = 0 then -9..9, whose
    least-squares scale maximises sumlx^2 / suml2; the steps run in order with the C loop's test
    sumlx^2 > best * suml2, each on all sub-blocks."""
    amax = x.abs().amax(dim=-1)
    mx = x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))[..., 0]  # [n, s]
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x

    def fit(iscale):  # -> l [n, s, b] in [-nmax, nmax), sumlx, suml2 [n, s]
        l = _nearest_int(iscale[..., None] * x).clamp(-nmax, nmax - 1)
        lf = l.float()
        return l, _sum(w * x * lf), _sum(w * lf * lf)

    L, sumlx, suml2 = fit(-nmax / mx)
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(sumlx))
    best = scale * sumlx
    for i in [i for i in range(-9, 10) if i]:
        offset = torch.tensor(0.1, dtype=torch.float32) * i + nmax  # C: nmax + 0.1f*is
        l, sumlx, suml2 = fit(-offset / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(better[..., None], l, L)
        scale = torch.where(better, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)), scale)
        best = torch.where(better, scale * sumlx, best)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero[..., None], torch.zeros_like(L), L + nmax)
    return scale, L


def _quantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """[n, 256] -> [n, 210] as quantize_row_q6_K_ref: a symmetric 6-bit fit per 16-wide sub-block
    (make_qx_quants), the 16 scales as int8 multiples of the fp16 super-block d = -max scale / 128,
    then the weights refit to those."""
    n = blocks.shape[0]
    x = blocks.view(n, 16, 16)
    scales, L = _make_qx_quants(x, 32)  # [n, 16], [n, 16, 16]
    max_scale = scales.gather(-1, scales.abs().argmax(dim=-1, keepdim=True))  # [n, 1] signed
    empty = max_scale.abs() < GROUP_MAX_EPS
    iscale = -128 / torch.where(empty, torch.ones_like(max_scale), max_scale)
    d_bytes = _fp16_bytes(torch.where(empty, torch.zeros_like(iscale), 1 / iscale))
    sc = _nearest_int(iscale * scales).clamp(max=127)  # [n, 16]
    sc = torch.where(empty, torch.zeros_like(sc), sc)
    d = _fp16_value(d_bytes) * sc.float()  # [n, 16]
    refit = _nearest_int(x / torch.where(d == 0, torch.ones_like(d), d)[..., None]).clamp(-32, 31) + 32
    L = torch.where((d == 0)[..., None], L, refit)
    L = torch.where(empty[..., None], torch.zeros_like(L), L).view(n, 2, 4, 32)  # halves of 128, quarters of 32
    ql = torch.cat([_nibbles(L[:, :, 0], L[:, :, 2]), _nibbles(L[:, :, 1], L[:, :, 3])], dim=-1)  # [n, 2, 64]
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6))
    return torch.cat([ql.reshape(n, 128), qh.to(torch.uint8).reshape(n, 64),
                      sc.to(torch.int8).view(torch.uint8), d_bytes], dim=-1)


def _dequantize_q6_k(raw: torch.Tensor) -> torch.Tensor:
    n = raw.shape[0]
    ql, qh = raw[:, :128].reshape(n, 2, 64), raw[:, 128:192].reshape(n, 2, 32)
    scales = raw[:, 192:208].contiguous().view(torch.int8).float()  # [n, 16]
    d = _fp16_value(raw[:, 208:210])  # [n, 1]
    lo, hi = _unpack_nibbles(ql)  # [n, 2, 64] each: quarters (0, 1) low, (2, 3) high
    low = torch.stack([lo, hi], dim=2).reshape(n, 2, 4, 32).to(torch.int32)
    high = ((qh.to(torch.int32)[:, :, None, :] >> torch.tensor([0, 2, 4, 6], dtype=torch.int32)[:, None]) & 3)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return ((d * scales)[..., None] * q).reshape(n, QK_K)


# --------------------------------------------------------------------------------------- plain types
def _quantize_bf16(blocks: torch.Tensor) -> torch.Tensor:
    """float32 -> bf16 bits, round to nearest even, NaN forced quiet (ggml_compute_fp32_to_bf16)."""
    n = blocks.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    n = torch.where(nan, (n & 0xFFFF0000) | (64 << 16), n)
    n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    return (n & 0xFFFF).to(torch.int32).to(torch.int16).view(torch.uint8)  # int16 wraps like a uint16 cast


_QUANTIZE = {"q8_0": _quantize_q8_0, "q4_0": _quantize_q4_0, "q5_0": _quantize_q5_0,
             "q4_k": _quantize_q4_k, "q6_k": _quantize_q6_k}
_DEQUANTIZE = {"q8_0": _dequantize_q8_0, "q4_0": _dequantize_q4_0, "q5_0": _dequantize_q5_0,
               "q4_k": _dequantize_q4_k, "q6_k": _dequantize_q6_k}


def quantize(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """w [..., K] (any float dtype) -> uint8 [..., K // block * bytes_per_block], llama.cpp's bytes."""
    _, block, nbytes = _spec(qtype)
    if w.dim() == 0 or w.shape[-1] % block:
        raise ValueError(f"{qtype}: cannot quantize a tensor of shape {tuple(w.shape)}: the last "
                         f"dimension must be a multiple of the block size {block}")
    lead, K = w.shape[:-1], w.shape[-1]
    x = w.detach().float().contiguous()
    if qtype == "f32":
        return x.view(torch.uint8)
    if qtype == "f16":
        return x.to(torch.float16).view(torch.uint8)
    if qtype == "bf16":
        return _quantize_bf16(x)
    blocks = x.reshape(-1, block)  # [n, block]
    step = _CHUNK_BLOCKS if block == QK_K else 1 << 20
    out = torch.cat([_QUANTIZE[qtype](blocks[i:i + step]) for i in range(0, blocks.shape[0], step)]) \
        if blocks.shape[0] else blocks.new_zeros(0, nbytes, dtype=torch.uint8)
    return out.reshape(*lead, K // block * nbytes)


def dequantize(raw: torch.Tensor, qtype: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 raw [..., nbytes] -> [..., K] in `dtype` (computed in float32 as gguf-py does)."""
    _, block, nbytes = _spec(qtype)
    if raw.dtype != torch.uint8 or raw.dim() == 0 or raw.shape[-1] % nbytes:
        raise ValueError(f"{qtype}: cannot dequantize a {raw.dtype} tensor of shape {tuple(raw.shape)}: "
                         f"expected uint8 with a last dimension a multiple of {nbytes} bytes")
    lead, nb = raw.shape[:-1], raw.shape[-1]
    K = nb // nbytes * block
    raw = raw.contiguous()
    if qtype in ("f32", "f16", "bf16"):
        stored = raw.view({"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[qtype])
        # the stored values themselves when they already are `dtype` (no copy); else through float32
        out = stored if stored.dtype == dtype else stored.float()
    else:
        blocks = raw.reshape(-1, nbytes)  # [n, nbytes]
        step = _DEQUANT_WEIGHTS // block  # blocks per step: the temporaries stay in cache
        if blocks.shape[0] <= step:
            return _DEQUANTIZE[qtype](blocks).reshape(*lead, K).to(dtype)
        out = torch.empty(blocks.shape[0], block, dtype=dtype, device=raw.device)
        for i in range(0, blocks.shape[0], step):
            out[i:i + step] = _DEQUANTIZE[qtype](blocks[i:i + step])  # float32, then cast: elementwise
    return out.reshape(*lead, K).to(dtype)


def nbytes(shape: tuple[int, ...] | torch.Size, qtype: str) -> int:
    """Stored bytes of a tensor of `shape` in `qtype`."""
    lead = 1
    for s in shape[:-1]:
        lead *= s
    return lead * row_bytes(shape[-1], qtype)
