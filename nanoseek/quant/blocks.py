"""FP8 blocks: the E4M3 format, block-scaled tiles (1x128 activations, 128x128 weights, 128x1
for the weight-gradient GEMM) and their quantize / dequantize in plain PyTorch, the layouts the
GEMMs and the Triton kernels share (DeepSeek-V3 report, section 3.3.1). A leaf module and the one
block quantizer: the recipe (`fp8.py`), the GEMMs and the reference ops (`gemm.py`), the kernels
(`fp8_triton.py`, whose quantizers are checked bit for bit against this one; `checked.py`) and the
checkpoint format (`checkpoint.py`) all build on it. `stackable` says when several weights can
share one GEMM without a 128x128 block spanning two of them.

Two amax floors, one formula. Online quantization (training, W8A8 inference) floors a tile's amax
at `EPS` = 1e-4, as DeepGEMM does: a zero tile quantizes to zeros with a finite, representable
scale. The saved FP8 checkpoint (`weight_scale_inv`, the release's layout) floors at
`CHECKPOINT_EPS` = 1e-12 and has since its first files: kept so that a saved file stays bit for
bit what it was. The two give the same blocks wherever a block's amax is at least 1e-4.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
EPS = 1e-4  # amax floor (DeepSeek / DeepGEMM): a zero tile quantizes to zeros, never 0/0
CHECKPOINT_EPS = 1e-12  # amax floor of saved FP8 checkpoints (module docstring)
BLOCK = 128
ACT = (1, BLOCK)  # activations, activation gradients
WEIGHT = (BLOCK, BLOCK)  # weights
COL = (BLOCK, 1)  # the weight-gradient GEMM's operands (tiles along the token axis)


# ----------------------------------------------------------------------------------- quantizers
class Fp8Tensor(NamedTuple):
    """E4M3 data [..., R, C], fp32 scales [..., ceil(R/tr), ceil(C/tc)] and the tile (tr, tc)."""
    data: torch.Tensor
    scale: torch.Tensor
    tile: tuple[int, int]

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.data, self.scale, self.tile, dtype)

    def t(self) -> "Fp8Tensor":
        """The transpose (of the last two dims), contiguous; exact (tiles transpose with it)."""
        return Fp8Tensor(self.data.transpose(-2, -1).contiguous(), self.scale.transpose(-2, -1).contiguous(),
                         (self.tile[1], self.tile[0]))

    def rows(self, start: int, stop: int) -> "Fp8Tensor":
        """Rows [start, stop) of a row-tiled (tr == 1) tensor."""
        assert self.tile[0] == 1, "row slicing needs 1xC tiles"
        return Fp8Tensor(self.data[..., start:stop, :], self.scale[..., start:stop, :], self.tile)


def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2 s) for positive normal fp32 s, exactly (bit manipulation, like DeepGEMM's
    ceil_to_ue8m0): bump the exponent when the mantissa is not zero, clear the mantissa."""
    bits = s.contiguous().view(torch.int32)
    exp = (bits >> 23) & 0xFF
    exp = exp + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exp.clamp(1, 254) << 23).view(torch.float32)


def quantize(x: torch.Tensor, tile: tuple[int, int] = ACT, pow2: bool = False, eps: float = EPS) -> Fp8Tensor:
    """Quantize the last two dims of x [..., R, C] to E4M3 with one fp32 scale per (tr x tc) tile."""
    tr, tc = tile
    *lead, R, C = x.shape
    nr, nc = math.ceil(R / tr), math.ceil(C / tc)
    xf = x.float().contiguous()
    if nr * tr != R or nc * tc != C:
        xf = F.pad(xf, (0, nc * tc - C, 0, nr * tr - R))
    blocks = xf.view(*lead, nr, tr, nc, tc)
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., nr, nc]
    # a tensor divisor: CUDA turns division by a Python scalar into a multiply by its (inexact)
    # reciprocal, which would make GPU scales differ from CPU ones (and from IEEE division)
    scale = amax.clamp(min=eps) / torch.full_like(amax, E4M3_MAX)
    if pow2:
        scale = pow2_ceil(scale)
    q = (blocks / scale[..., :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    q = q.view(*lead, nr * tr, nc * tc)
    if nr * tr != R or nc * tc != C:
        q = q[..., :R, :C].contiguous()
    return Fp8Tensor(q, scale, (tr, tc))


def dequantize(q: torch.Tensor, scale: torch.Tensor, tile: tuple[int, int], dtype=torch.float32) -> torch.Tensor:
    """x[..., i, j] = float(q[..., i, j]) * scale[..., i // tr, j // tc] (fp32, one rounding to dtype)."""
    R, C = q.shape[-2:]
    s = scale.float()
    if tile[0] > 1:
        s = s.repeat_interleave(tile[0], dim=-2)[..., :R, :]
    if tile[1] > 1:
        s = s.repeat_interleave(tile[1], dim=-1)[..., :C]
    return (q.float() * s).to(dtype)


def quantize_1x128(x: torch.Tensor, pow2: bool = False) -> Fp8Tensor:
    """Activations / activation gradients: x [..., K] -> one scale per token per 128 channels."""
    return quantize(x.reshape(-1, x.shape[-1]), ACT, pow2)


def quantize_128x128(w: torch.Tensor, pow2: bool = False) -> Fp8Tensor:
    """Weights [..., N, K]: one scale per 128x128 block."""
    return quantize(w, WEIGHT, pow2)


def quantize_128x1(x: torch.Tensor, pow2: bool = False) -> Fp8Tensor:
    """The weight-gradient GEMM's inputs, x [M, K] (M = tokens): one scale per 128 tokens x 1
    channel. Returned in the original orientation: data [M, K], scale [ceil(M/128), K]."""
    return quantize(x, COL, pow2)


# ----------------------------------------------------------------------------------- stacked weights
def stackable(weights) -> bool:
    """Whether weights [..., N_i, K] can run as one GEMM against the same input (SwiGLU's gate and
    up): same K, dtype and device, and every N_i but the last a multiple of 128, so that no
    128x128 block spans two of them and each is quantized exactly as it would be alone."""
    w0 = weights[0]
    return (all(w.shape[:-2] == w0.shape[:-2] and w.shape[-1] == w0.shape[-1] and w.dtype == w0.dtype
                and w.device == w0.device for w in weights)
            and all(w.shape[-2] % BLOCK == 0 for w in weights[:-1]))


def as_weights(weight) -> tuple:
    """A weight, or a list of `stackable` weights, as a tuple (refused by name when not stackable)."""
    weights = (weight,) if isinstance(weight, torch.Tensor) else tuple(weight)
    if len(weights) > 1 and not stackable(weights):
        raise ValueError(f"fp8: weights of shapes {[tuple(w.shape) for w in weights]} cannot share one GEMM "
                         "(same K, dtype and device needed, and each N but the last a multiple of 128)")
    return weights


# ----------------------------------------------------------------------------------- fused-path layouts
class TileMap(NamedTuple):
    """Token segments (the experts' ranges of tokens sorted by expert; one segment for a dense
    Linear) cut into 128-token tiles that never cross a segment, for the fused kernels.
    prog [6, P] int32 (P = n_tiles; per tile: its index, first row, rows, its segment's first tile,
    the segment's tile count, the segment); seg [4, E] int32 (per segment: first row, rows, first
    tile, tiles). sizes and tile_starts are the same on the host."""
    sizes: list[int]
    tile_starts: list[int]
    n_tiles: int
    prog: torch.Tensor
    seg: torch.Tensor


def tile_map(sizes: list[int], device) -> TileMap:
    """The TileMap of contiguous segments of sizes[e] rows (built on the host, one copy to device)."""
    sizes = [int(n) for n in sizes]
    ntiles = [math.ceil(n / BLOCK) for n in sizes]
    starts, tstarts, r, t = [], [], 0, 0
    for n, nt in zip(sizes, ntiles):
        starts.append(r)
        tstarts.append(t)
        r += n
        t += nt
    seg_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(ntiles, dtype=torch.int64))  # [P]
    s_start, s_rows = torch.tensor(starts, dtype=torch.int64), torch.tensor(sizes, dtype=torch.int64)
    s_tstart, s_ntiles = torch.tensor(tstarts, dtype=torch.int64), torch.tensor(ntiles, dtype=torch.int64)
    j = torch.arange(t) - s_tstart[seg_of]  # tile number within its segment
    row0 = s_start[seg_of] + BLOCK * j
    nrow = (s_rows[seg_of] - BLOCK * j).clamp(max=BLOCK)
    prog = torch.stack([torch.arange(t), row0, nrow, s_tstart[seg_of], s_ntiles[seg_of], seg_of])
    seg = torch.stack([s_start, s_rows, s_tstart, s_ntiles])
    if r >= 2**31 or t * BLOCK >= 2**31:
        raise ValueError(f"tile_map: {r} rows is too many for int32 offsets")
    both = torch.cat([prog.flatten(), seg.flatten()]).to(torch.int32).to(device)
    return TileMap(sizes, tstarts, t, both[:prog.numel()].view(6, t), both[prog.numel():].view(4, len(sizes)))


_DENSE_MAPS: dict[tuple, TileMap] = {}


def dense_tile_map(rows: int, device) -> TileMap:
    """The one-segment TileMap of a dense Linear's rows (cached per size and device)."""
    key = (rows, str(device))
    if key not in _DENSE_MAPS:
        if len(_DENSE_MAPS) > 64:
            _DENSE_MAPS.clear()
        _DENSE_MAPS[key] = tile_map([rows], device)
    return _DENSE_MAPS[key]


class SegmentsT(NamedTuple):
    """The 128x1-tile quantization of x [T, C], per segment of a TileMap, stored transposed (the
    Wgrad operand: 1x128 tiles along tokens, K-major): segment e is data[C*128*ts_e : C*128*(ts_e+t_e)]
    viewed [C, 128 t_e] (its tokens zero-padded to whole tiles) with scales scale[ts_e : ts_e+t_e]
    [t_e, C] (one per 128 tokens per channel). data [n_tiles*128*C] E4M3, scale [n_tiles, C] fp32."""
    data: torch.Tensor
    scale: torch.Tensor
    C: int

    def segment(self, tm: TileMap, e: int) -> Fp8Tensor:
        """Segment e as an Fp8Tensor [C, 128 t_e] with 1x128 tiles (scale [C, t_e], M-major)."""
        ts = tm.tile_starts[e]
        nt = math.ceil(tm.sizes[e] / BLOCK)
        data = self.data[self.C * BLOCK * ts:self.C * BLOCK * (ts + nt)].view(self.C, BLOCK * nt)
        return Fp8Tensor(data, self.scale[ts:ts + nt].t(), ACT)
