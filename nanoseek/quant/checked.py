"""The FP8 kernels behind a self-check, and what the checks found (DeepSeek-V3 report, arXiv
2412.19437, section 3.3: the block-scaled recipe whose quantizers and GEMMs these kernels compute).

Fast kernels are checked on first use against a reference on the same operands, and a kernel that
disagrees is replaced by the reference for that use from then on: a kernel that miscompiles or
misbehaves on some shapes can cost time, never correctness (a Triton transposed store was once
miscompiled: benchmarks/RESULTS.md).
- `CheckedKernels`: the Triton quantizers (the fused SwiGLU one included), compared bit for bit
  with the PyTorch reference on each new shape specialization (variant "fast", then "safe", then for the weights "copy", then the
  reference), and the Triton grouped GEMMs, compared row by row with the per-expert loop on each new
  GEMM shape.
- `torch._scaled_mm` with block-wise scales is compared with the emulation once per tile recipe
  (by `gemm.fp8_gemm`, through `KernelRegistry.check_scaled_mm`).
- `KernelRegistry` holds all of it: which variant each specialization uses, which checks passed,
  what disagreed and why, the Triton kernels once loaded. `report()` is its public face (which
  kernels are in use, what disagreed), `reset()` forgets the checks. `REGISTRY` is the one the
  FP8 recipe uses; tests make their own.
- NANOSEEK_FP8_CHECK=every: compare every call, not only the first per specialization, use the
  reference where they differ and log each disagreement (a debugging mode: every op runs twice).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .blocks import ACT, BLOCK, Fp8Tensor, SegmentsT, as_weights


# ----------------------------------------------------------------------------------- comparisons
def same_fp8(a: Fp8Tensor | None, b: Fp8Tensor | None) -> bool:
    """Bit-identical data and equal scales (shapes included); NaN never equals."""
    if a is None or b is None:
        return a is None and b is None
    return (a.data.shape == b.data.shape and a.scale.shape == b.scale.shape
            and torch.equal(a.data.contiguous().view(torch.uint8), b.data.contiguous().view(torch.uint8))
            and torch.equal(a.scale, b.scale))


def same_segments(a: SegmentsT | None, b: SegmentsT | None) -> bool:
    """`same_fp8` for the per-segment 128x1 layouts."""
    if a is None or b is None:
        return a is None and b is None
    return a.C == b.C and same_fp8(Fp8Tensor(a.data, a.scale, ACT), Fp8Tensor(b.data, b.scale, ACT))


def worst_row_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max over rows (last dim) of |out - ref| / |ref| (rows of zeros in ref: absolute); NaN when
    out and ref are non-finite at different places: a wrong tile cannot hide in a large average,
    and an overflow both share does not count as a disagreement."""
    out, ref = out.float().flatten(0, -2), ref.float().flatten(0, -2)
    if out.numel() == 0:
        return 0.0
    fo, fr = torch.isfinite(out), torch.isfinite(ref)
    if not torch.equal(fo, fr) or not torch.equal(out[~fo], ref[~fr]):
        return float("nan")
    out, ref = out.where(fo, 0.0), ref.where(fr, 0.0)
    norm = ref.norm(dim=-1)
    return ((out - ref).norm(dim=-1) / norm.clamp(min=1e-30).where(norm > 0, 1.0)).max().item()


def _div16(*ns: int) -> tuple[bool, ...]:
    return tuple(int(n) % 16 == 0 for n in ns)


# ----------------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class KernelReport:
    """A snapshot of a `KernelRegistry`: which kernels are in use and what disagreed."""
    quantizers: dict  # quantizer specialization key -> the variant in use ("fast", "safe", "copy" or "torch")
    quantizer_fallbacks: dict  # specialization key -> why a faster variant is not used
    grouped_checked: set  # (use, N, K[, dtype]) where the Triton grouped GEMM agreed with the loop
    grouped_fallbacks: dict  # use ("fprop", "dgrad", "wgrad") -> why the per-expert loop replaces it
    scaled_mm_checked: set  # tile recipes whose torch._scaled_mm was checked against the emulation
    scaled_mm_fallbacks: dict  # tile recipe -> why dequantize + bf16 GEMM replaces torch._scaled_mm
    check_every: bool  # NANOSEEK_FP8_CHECK=every
    mismatches: int  # per-call disagreements (check_every), all of them
    mismatch_log: list  # the first `KernelRegistry.log_max` of them, one dict each
    triton_error: str  # why the Triton kernels did not load ("" when they did or were not asked for)


class KernelRegistry:
    """The state of every FP8 kernel self-check (module docstring), in one object."""

    log_max = 100

    def __init__(self, check_every: bool | None = None):
        self.check_every = (os.environ.get("NANOSEEK_FP8_CHECK", "") == "every") if check_every is None else check_every
        self.triton = None  # CheckedKernels over nanoseek.quant.fp8_triton once loaded; False when it failed
        self.triton_error = ""
        self.reset()

    def reset(self) -> None:
        """Forget every first-use check, fallback and logged disagreement (a new run in the same
        process makes its own checks and reports only its own fallbacks)."""
        self._quant_choice: dict[tuple, str] = {}
        self._quant_broken: dict[tuple, str] = {}
        self._grouped_checked: set = set()
        self._grouped_broken: dict[str, str] = {}
        self._scaled_mm_checked: set = set()
        self._scaled_mm_broken: dict[tuple, str] = {}
        self._log: list[dict] = []
        self._mismatches = 0

    def report(self) -> KernelReport:
        return KernelReport(dict(self._quant_choice), dict(self._quant_broken), set(self._grouped_checked),
                            dict(self._grouped_broken), set(self._scaled_mm_checked), dict(self._scaled_mm_broken),
                            self.check_every, self._mismatches, list(self._log), self.triton_error)

    def log_mismatch(self, entry: dict) -> None:
        self._mismatches += 1
        if len(self._log) < self.log_max:
            self._log.append(entry)

    # ------------------------------------------------------------------ the Triton kernels
    def triton_kernels(self, reference) -> "CheckedKernels | None":
        """The Triton kernels behind their checks against `reference` (loaded on first call), or
        None where Triton or its E4M3 type is missing (`triton_error` says why)."""
        if self.triton is None:
            try:
                from .fp8_triton import KERNELS  # optional dependency: Triton with E4M3
                self.triton = CheckedKernels(KERNELS, reference, self)
            except Exception as e:  # noqa: BLE001  (no Triton, or one without E4M3)
                self.triton, self.triton_error = False, repr(e)
        return self.triton or None

    # ------------------------------------------------------------------ torch._scaled_mm
    def scaled_mm_verified(self, recipe: tuple) -> bool:
        """torch._scaled_mm passed its check for this tile recipe."""
        return recipe in self._scaled_mm_checked and recipe not in self._scaled_mm_broken

    def scaled_mm_disabled(self, recipe: tuple) -> bool:
        return recipe in self._scaled_mm_broken

    def check_scaled_mm(self, recipe: tuple, out: torch.Tensor, reference) -> bool:
        """On the first torch._scaled_mm result of a tile recipe: compare with reference() (relative
        error below 1e-2) and turn the recipe off when they disagree. False: use the fallback."""
        if recipe in self._scaled_mm_checked:
            return True
        self._scaled_mm_checked.add(recipe)
        ref = reference()
        err = ((out.float() - ref).norm() / ref.norm().clamp(min=1e-30)).item()
        if not err < 1e-2:
            self._scaled_mm_broken[recipe] = f"relative error {err:.3g} vs emulation"
            warnings.warn(f"fp8: torch._scaled_mm with tiles {recipe} disagrees with the emulation "
                          f"({self._scaled_mm_broken[recipe]}); using dequantize + bf16 GEMM instead")
            return False
        return True


REGISTRY = KernelRegistry()


# ----------------------------------------------------------------------------------- checked kernels
class CheckedKernels:
    """`kernels` (the Triton ones) behind first-use checks against `reference` (`TorchKernels`),
    recorded in `registry`. Quantizers: each call whose specialization (dtype, sizes and strides
    divisible by 16 or not, flags) is new is compared bit for bit with the reference on the same
    input; the first variant that agrees ("fast", then "safe": the same kernel compiled without
    size specialization, then for the weights "copy": W^T transposed by PyTorch instead of in the
    kernel) is used for that specialization from then on, and when none agrees the reference is
    (with a warning). Grouped GEMMs: `grouped`."""
    name = "triton"

    def __init__(self, kernels, reference, registry: KernelRegistry):
        self.kernels, self.reference, self.registry = kernels, reference, registry

    def _choose(self, key: tuple, run, ref, same, variants=("fast", "safe")):
        reg = self.registry
        choice = reg._quant_choice.get(key)
        if choice == "torch":
            return ref()
        if choice is not None:
            if not reg.check_every:
                return run(choice)
            got, expect = run(choice), ref()
            if same(expect, got):
                return got
            reg.log_mismatch({"op": key[0], "key": str(key), "variant": choice})
            return expect
        expect = ref()
        why = []
        for variant in variants:
            try:
                got = run(variant)
            except Exception as e:  # noqa: BLE001  (a compile or launch failure: try the next)
                why.append(f"{variant}: {type(e).__name__}: {str(e)[:100]}")
                continue
            if same(expect, got):
                reg._quant_choice[key] = variant
                if why:
                    reg._quant_broken[key] = "; ".join(why)
                    warnings.warn(f"fp8: Triton {key[0]} {'; '.join(why)}; the {variant!r} variant agrees and is "
                                  f"used for this specialization ({key})")
                return got
            why.append(f"{variant}: differs from the PyTorch reference")
        reg._quant_choice[key] = "torch"
        reg._quant_broken[key] = "; ".join(why)
        warnings.warn(f"fp8: Triton {key[0]} disagrees with the PyTorch reference ({'; '.join(why)}); "
                      f"using the PyTorch quantizer for this specialization ({key})")
        return expect

    def quantize_act_dual(self, x: torch.Tensor, tm, pow2: bool = False, rows: bool = True,
                          cols: bool = True):
        if x.stride(-1) != 1:
            x = x.contiguous()
        key = ("quantize_act_dual", x.dtype, _div16(x.shape[0], x.shape[1], tm.n_tiles, x.stride(0)),
               x.data_ptr() % 16 == 0, bool(pow2), bool(rows), bool(cols))

        def same(a, b):
            return same_fp8(a[0], b[0]) and same_segments(a[1], b[1])
        # the kernels' own order of variants where they name one (the tiled kernel, then the first one)
        return self._choose(key, lambda v: self.kernels.quantize_act_dual(x, tm, pow2, rows, cols, variant=v),
                            lambda: self.reference.quantize_act_dual(x, tm, pow2, rows, cols), same,
                            variants=getattr(self.kernels, "act_variants", ("fast", "safe")))

    def swiglu_quantize_dual(self, gate: torch.Tensor, up: torch.Tensor, tm, pow2: bool = False, rows: bool = True,
                             cols: bool = True):
        """The fused SwiGLU quantizer (both tilings of silu(gate) * up), checked like the others
        against PyTorch's silu and mul followed by the checked activation quantizer (itself
        checked against the reference quantizer), which also replaces it where it disagrees (and
        for kernels without it): the unfused values, never the PyTorch quantizer's speed."""
        def unfused():
            return self.quantize_act_dual(F.silu(gate) * up, tm, pow2, rows, cols)
        if not hasattr(self.kernels, "swiglu_quantize_dual"):
            return unfused()
        gate, up = (t if t.stride(-1) == 1 else t.contiguous() for t in (gate, up))
        key = ("swiglu_quantize_dual", gate.dtype, _div16(gate.shape[0], gate.shape[1], tm.n_tiles, gate.stride(0),
                                                          up.stride(0)),
               gate.data_ptr() % 16 == 0, up.data_ptr() % 16 == 0, bool(pow2), bool(rows), bool(cols))

        def same(a, b):
            return same_fp8(a[0], b[0]) and same_segments(a[1], b[1])
        return self._choose(key, lambda v: self.kernels.swiglu_quantize_dual(gate, up, tm, pow2, rows, cols, variant=v),
                            unfused, same)

    def quantize_weight_dual(self, w, pow2: bool = False, transposed: bool = True):
        ws = [wi if wi.stride(-1) == 1 else wi.contiguous() for wi in as_weights(w)]
        K, NT = ws[0].shape[-1], sum(wi.shape[-2] for wi in ws)
        key = ("quantize_weight_dual", ws[0].dtype, ws[0].dim(), len(ws),
               _div16(*[wi.shape[-2] for wi in ws], K, NT, *[wi.stride(0) if wi.dim() == 3 else wi.numel() for wi in ws],
                      *[wi.stride(-2) for wi in ws], math.ceil(NT / BLOCK), math.ceil(K / BLOCK)),
               tuple(wi.data_ptr() % 16 == 0 for wi in ws), bool(pow2), bool(transposed))

        def same(a, b):
            return same_fp8(a[0], b[0]) and same_fp8(a[1], b[1])
        # "copy": W^T by a transpose of W's bytes, the last Triton resort (for an in-kernel
        # transposed store that miscompiles)
        return self._choose(key, lambda v: self.kernels.quantize_weight_dual(ws, pow2, transposed, variant=v),
                            lambda: self.reference.quantize_weight_dual(ws, pow2, transposed), same,
                            variants=("fast", "safe", "copy") if transposed else ("fast", "safe"))

    def grouped(self, use: str, *args):
        """The Triton grouped GEMM for `use` ("fprop", "dgrad": grouped_gemm(a, b, tm, out_dtype);
        "wgrad": grouped_wgrad(a, b, tm)) on args; its first call per use and GEMM shape (N, K: the
        autotuning and specialization key) is compared with the reference's per-expert loop on the
        same operands (every output row within 1e-2 relative error, as for _scaled_mm; a non-finite
        result fails), and a kernel that disagrees is replaced by the loop for that use from then on.
        With check_every: every call."""
        reg = self.registry
        wgrad = use == "wgrad"
        loop = self.reference.grouped_wgrad if wgrad else self.reference.grouped_gemm
        if use in reg._grouped_broken:
            return loop(*args)
        a, b = args[0], args[1]
        key = (use, a.C, b.C) if wgrad else (use, b.data.shape[-2], b.data.shape[-1], args[3])
        try:
            out = (self.kernels.grouped_wgrad if wgrad else self.kernels.grouped_gemm)(*args)
        except Exception as e:  # noqa: BLE001  (a compile or launch failure, e.g. no E4M3 on this GPU)
            if key in reg._grouped_checked:  # it ran before at this shape: not a build problem
                raise
            reg._grouped_broken[use] = f"{type(e).__name__}: {str(e)[:100]}"
            warnings.warn(f"fp8: the Triton grouped {use} GEMM failed ({reg._grouped_broken[use]}); using the loop instead")
            return loop(*args)
        if key not in reg._grouped_checked or reg.check_every:
            first = key not in reg._grouped_checked
            reg._grouped_checked.add(key)
            ref = loop(*args)
            err = worst_row_error(out, ref)
            if not err < 1e-2:
                if not first:  # check_every: log it, keep the kernel, use the reference for this call
                    reg.log_mismatch({"op": f"grouped {use}", "key": str(key), "worst_row_error": err,
                                      "sizes": list(args[2].sizes)})
                    return ref.to(out.dtype)
                reg._grouped_broken[use] = f"relative error {err:.3g} vs the per-expert loop"
                warnings.warn(f"fp8: the Triton grouped {use} GEMM disagrees with the per-expert loop "
                              f"({reg._grouped_broken[use]}); using the loop instead")
                return ref.to(out.dtype)
        return out
