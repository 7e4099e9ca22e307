"""A quantized model (GGML blocks, quant/qlinear.py) made ready for decoding on the CPU:
`prepare_cpu_decode(model)`.

Weight-only quantization as llama.cpp runs it (GGUF blocks, ggml-common.h) on the model of the
DeepSeek-V3 report (arXiv 2412.19437, section 2). Each quantized matrix gets the fastest CPU form
that stays within its pinned bound of the exact dequantization path:

- q4_0 / q4_k matrices and expert stacks: the int4 CPU GEMM (quant/int4pack.py; bf16 group scales
  and activations, within the bound tests/test_quant_qlinear.py pins);
- every other quantized matrix (q8_0, q5_0, q6_k, ...): dequantized once into the model's dtype
  and held, so each forward multiplies by the very matrix the exact path rebuilds every time (the
  same outputs bit for bit), where those copies fit in `hold_budget` bytes (by default half of the
  memory available); beyond it they stay on the exact path.

The embedding stays a lookup of the rows it reads. Once the packed and held copies exist, the
memory-mapped GGUF pages they were built from are handed back to the kernel (`drop_file_pages`):
the modules keep their byte views (state_dict, `weight`), which page in again if ever read.
Batch-1 MoE decode skips the dispatch (QuantExperts.forward).
"""

from __future__ import annotations

import mmap

import torch
import torch.nn as nn

from .ggml import QTYPES
from .int4pack import applies
from .qlinear import QuantExperts, QuantLinear


def available_memory() -> int:
    """Bytes of memory available to new allocations (/proc/meminfo's MemAvailable), 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _held_bytes(model: nn.Module) -> int:
    """Bytes that holding every quantized matrix off the int4 GEMM dequantized would take."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear) and not applies(mod.qweight, mod.qtype):
            total += mod.out_features * mod.in_features * mod.dtype.itemsize
        elif isinstance(mod, QuantExperts):
            for proj in mod.PROJS:
                raw = getattr(mod, proj + "_q")
                if not applies(raw, mod.qtypes[proj]):
                    E, N = raw.shape[:2]
                    total += E * N * _row_length(mod, proj) * mod.dtype.itemsize
    return total


def _row_length(experts: QuantExperts, proj: str) -> int:
    """Weights per row of an expert stack's projection (from its bytes per row)."""
    _, block, nbytes = QTYPES[experts.qtypes[proj]]
    return getattr(experts, proj + "_q").shape[-1] // nbytes * block


def drop_file_pages(model: nn.Module) -> int:
    """Hand the resident pages of the model's memory-mapped GGUF file(s) back to the kernel
    (madvise MADV_DONTNEED on the read-only maps: a later read pages them in again); returns the
    bytes of the maps advised."""
    f = getattr(model, "_gguf_file", None)
    advised = 0
    for reader in getattr(f, "readers", ()):
        view = getattr(getattr(reader, "data", None), "_mmap", None)  # numpy.memmap's mmap.mmap
        if isinstance(view, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
            view.madvise(mmap.MADV_DONTNEED)
            advised += len(view)
    return advised


@torch.no_grad()
def prepare_cpu_decode(model: nn.Module, hold_budget: int | None = None, int4: bool = True,
                       drop_pages: bool = True) -> dict[str, int]:
    """Give every quantized Linear and expert stack of a CPU model its fast form (module
    docstring); `hold_budget`: bytes the held dequantized copies may take (None: half of the
    available memory; 0 holds none); `int4`: use the int4 GEMM; `drop_pages`: hand the file's
    pages back once done. Returns counts: int4 (matrices and stacks on the int4 GEMM),
    held (held dequantized), exact (left on the exact path), and the held bytes."""
    if hold_budget is None:
        hold_budget = available_memory() // 2
    counts = {"int4": 0, "held": 0, "exact": 0, "held_bytes": 0}
    for mod in model.modules():
        if isinstance(mod, QuantLinear) and int4 and mod.enable_fast():
            counts["int4"] += 1
        elif isinstance(mod, QuantExperts) and int4:
            counts["int4"] += len(mod.enable_fast())
    hold = _held_bytes(model) <= hold_budget
    for mod in model.modules():
        if isinstance(mod, QuantLinear) and not mod.fast:
            if hold:
                mod.hold_dequantized()
                counts["held_bytes"] += mod.dequantized.nbytes
            counts["held" if hold else "exact"] += 1
        elif isinstance(mod, QuantExperts):
            rest = [p for p in mod.PROJS if p not in mod.fast_projs]
            if hold and rest:
                mod.hold_dequantized()
                counts["held_bytes"] += sum(getattr(mod, p + "_dq").nbytes for p in rest)
            counts["held" if hold else "exact"] += len(rest)
    if drop_pages:
        drop_file_pages(model)
    return counts
