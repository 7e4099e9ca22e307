"""Inference with the weights of an FP8 checkpoint kept in FP8 (DeepSeek-V3 report section 3.3; the
release's layout: e4m3 weights with one fp32 `weight_scale_inv` per 128x128 block).

`load_fp8_weights(path)` loads a checkpoint written with `save_pretrained(..., fp8=True)` (or the
official release's layout) and keeps every FP8-stored Linear and routed-expert weight as its e4m3
bytes and block scales, read straight from the files: 1 byte per weight instead of 2 (bf16) or 4
(fp32). Each forward dequantizes the weight it needs (`checkpoint.fp8_dequantize`, the same formula
the normal loader applies once) and runs the GEMM in the activations' dtype, so the outputs equal
those of the model loaded the usual way, bit for bit. With `w8a8=True` the Linears instead quantize
their input in 1x128 tiles and run the FP8 x FP8 block-scaled GEMM of DeepSeek's own inference code
(`quant.gemm.fp8_gemm`: `torch._scaled_mm` on Hopper, an exact emulation on CPU); outputs then
carry the activation quantization error (benchmarks/RESULTS.md). The swap is applied from outside the model:
FP8 Linears become `FP8WeightLinear`, routed experts `FP8WeightExperts`; the rest (embedding, head,
router, norms) stays as loaded. Inference only: the FP8 weights are buffers, not parameters.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import EXPERT_PROJ, CheckpointError, _ShardSet, fp8_dequantize, hf_keys_for
from ..model import DeepSeekV3, Experts, compute_dtype
from ..quant.blocks import WEIGHT, Fp8Tensor, quantize_1x128
from ..quant.gemm import fp8_gemm


class FP8WeightLinear(nn.Module):
    """y = x W^T with W [N, K] held as e4m3 bytes `weight_fp8` and `weight_scale_inv`
    [ceil(N/128), ceil(K/128)]. `weight` reads as the dequantized matrix in `compute_dtype` (MLA's
    absorbed attention reads kv_b_proj's weight directly)."""

    def __init__(self, weight: torch.Tensor, scale_inv: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype, w8a8: bool = False):
        super().__init__()
        self.register_buffer("weight_fp8", weight)
        self.register_buffer("weight_scale_inv", scale_inv)
        self.bias = bias
        self.compute_dtype, self.w8a8 = compute_dtype, w8a8
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        return fp8_dequantize(self.weight_fp8, self.weight_scale_inv, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        if not self.w8a8:
            return F.linear(x, fp8_dequantize(self.weight_fp8, self.weight_scale_inv, dtype), self.bias)
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        y = fp8_gemm(quantize_1x128(x2), Fp8Tensor(self.weight_fp8, self.weight_scale_inv, WEIGHT), dtype)  # [M, N]
        y = y.view(*x.shape[:-1], self.out_features)
        return y + self.bias.to(dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=e4m3 + 128x128 scales"


class FP8WeightExperts(Experts):
    """Routed experts whose stacked weights [E, out, in] are held as e4m3 bytes (`<proj>_fp8`) with
    per-expert 128x128 block scales [E, ceil(out/128), ceil(in/128)] (`<proj>_scale_inv`).
    `gate_proj` / `up_proj` / `down_proj` read as those (bytes, scales) pairs, and the GEMM seams
    dequantize (in `compute_dtype`) what they multiply by: the per-segment loop only the experts that
    got tokens, the grouped GEMM the whole stack (no host sync, so CUDA graphs still capture it)."""

    def __init__(self, experts: Experts, stacks: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        nn.Module.__init__(self)  # not Experts.__init__: the weights are e4m3 buffers, not parameters
        self.n_experts, self.impl = experts.n_experts, experts.impl
        self.compute_dtype = experts.gate_proj.dtype
        for proj, (q, s) in stacks.items():
            self.register_buffer(proj + "_fp8", q)
            self.register_buffer(proj + "_scale_inv", s)

    @property
    def gate_proj(self) -> Fp8Tensor:
        return Fp8Tensor(self.gate_proj_fp8, self.gate_proj_scale_inv, WEIGHT)

    @property
    def up_proj(self) -> Fp8Tensor:
        return Fp8Tensor(self.up_proj_fp8, self.up_proj_scale_inv, WEIGHT)

    @property
    def down_proj(self) -> Fp8Tensor:
        return Fp8Tensor(self.down_proj_fp8, self.down_proj_scale_inv, WEIGHT)

    def _expert(self, weight: Fp8Tensor, e: int) -> torch.Tensor:
        return fp8_dequantize(weight.data[e], weight.scale[e], self.compute_dtype)  # [out, in]

    def grouped_gemm(self, x: torch.Tensor, weight: Fp8Tensor, offs: torch.Tensor) -> torch.Tensor:
        stack = torch.stack([self._expert(weight, e) for e in range(weight.data.shape[0])])  # [E, out, in]
        return super().grouped_gemm(x, stack, offs)

    def segment_gemm(self, x: torch.Tensor, weight: Fp8Tensor, e: int) -> torch.Tensor:
        return x @ self._expert(weight, e).t()


def load_fp8_weights(path: str, dtype=None, device=None, w8a8: bool = False) -> tuple[nn.Module, dict]:
    """The checkpoint at `path` with its FP8-stored weights kept in FP8 (module docstring; `w8a8`:
    the Linears' GEMMs in FP8 with 1x128-quantized inputs).
    Returns (model, report) where report has `fp8_modules`, `fp8_weight_bytes` and
    `dense_weight_bytes` (what the same weights take in `dtype`)."""
    model = DeepSeekV3.from_pretrained(path, dtype=dtype, device=device)
    shards = _ShardSet(path)
    cfg = model.config
    dev = next(model.parameters()).device
    report = {"fp8_modules": 0, "fp8_weight_bytes": 0, "dense_weight_bytes": 0}

    def fp8_pair(key: str):
        if key not in shards.weight_map or key + "_scale_inv" not in shards.weight_map:
            return None
        w = shards.get(key)
        if w.dtype != torch.float8_e4m3fn:
            return None
        return w.to(dev), shards.get(key + "_scale_inv").float().to(dev)

    for name, mod in list(model.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(mod, nn.Linear):
            (hf_key, _), = hf_keys_for(name + ".weight", mod.weight, cfg)
            pair = fp8_pair(hf_key)
            if pair is None:
                continue
            report["dense_weight_bytes"] += mod.weight.numel() * mod.weight.element_size()
            new = FP8WeightLinear(*pair, mod.bias, mod.weight.dtype, w8a8)
            setattr(parent, attr, new)
        elif isinstance(mod, Experts) and not isinstance(mod, FP8WeightExperts):
            stacks = {}
            for proj in EXPERT_PROJ:
                t = getattr(mod, proj)
                pairs = [fp8_pair(k) for k, _ in hf_keys_for(f"{name}.{proj}", t, cfg)]
                if any(p is None for p in pairs):
                    break
                stacks[proj] = (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]), t)
            if len(stacks) < len(EXPERT_PROJ):
                continue
            for _, _, t in stacks.values():
                report["dense_weight_bytes"] += t.numel() * t.element_size()
            setattr(parent, attr, FP8WeightExperts(mod, {proj: (q, s) for proj, (q, s, _) in stacks.items()}))
        else:
            continue
        report["fp8_modules"] += 1
    for m in model.modules():
        for bname, b in m.named_buffers(recurse=False):
            if b.dtype == torch.float8_e4m3fn or bname.endswith("_scale_inv"):
                report["fp8_weight_bytes"] += b.numel() * b.element_size()
    if report["fp8_modules"] == 0:
        raise CheckpointError(f"{path}: no FP8 weights (no e4m3 tensor with a weight_scale_inv); "
                              "write one with save_pretrained(..., fp8=True)")
    return model, report


def fp8_module_names(model: nn.Module) -> list[str]:
    """Names of the modules holding FP8 weights."""
    return [n for n, m in model.named_modules() if isinstance(m, (FP8WeightLinear, FP8WeightExperts))]
