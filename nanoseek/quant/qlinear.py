"""Weight-only quantized layers holding GGML blocks (quant/ggml.py): Linear, Embedding and the
routed experts, and `quantize_model`, which swaps them into a DeepSeekV3 or DenseModel under a
llama.cpp mix (quant/mixes.py).

The packed bytes are buffers (`qweight`, `<proj>_q` for the expert stacks), so state_dict and
safetensors round-trip them; the GGML type of each is the module attribute `qtype` (`qtypes`
for experts). Each forward dequantizes only the weight it multiplies by, into the activations'
compute dtype, and runs the GEMM there: the model is never held in float, one layer's weight
(one expert's, for routed experts) at a time is. This exact path is the default and the reference.

A CPU fast path, `QuantLinear(..., fast=True)` (or `enable_fast()`), runs q4_0 and q4_k on
PyTorch's int4 CPU GEMM (quant/int4pack.py: bf16 group scales and activations, not exact, within
a pinned bound of the exact path, tests/test_quant_qlinear.py; benchmarks/bench_quant.py measures
both); its packed copy is an extra non-persistent buffer. `hold_dequantized()` keeps the matrix
dequantized instead (the exact path's own matrix, so its outputs bit for bit). QuantExperts runs
one token (batch-1 decode) on its k experts without the dispatch, bit for bit the same.
quant/cpu_decode.py picks among these for a whole model.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import Experts, compute_dtype
from .ggml import QTYPES, dequantize, quantize
from .int4pack import INT4_GROUP, PACK_TILE_ROWS, applies, int4_mm, pack_int4
from .int4pack import int4pack_available  # noqa: F401 (re-exported: callers probe it here)
from .mixes import MIXES, role_of, tensor_qtype

# --------------------------------------------------------------------------------------- modules
class QuantLinear(nn.Module):
    """y = x W^T + b with W [out, in] held as GGML blocks `qweight` [out, row_bytes] of type
    `qtype`. `weight` reads as the dequantized matrix in `dtype` (MLA's absorbed attention reads
    kv_b_proj's weight; other code reads the head's dtype and device through it)."""

    def __init__(self, qweight: torch.Tensor, qtype: str, in_features: int, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32, fast: bool = False):
        super().__init__()
        if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] * QTYPES[qtype][1] \
                != in_features * QTYPES[qtype][2]:
            raise ValueError(f"{qtype}: qweight {qweight.dtype} {tuple(qweight.shape)} does not hold rows of "
                             f"{in_features} weights")
        self.register_buffer("qweight", qweight)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if isinstance(bias, torch.Tensor) else None
        self.qtype, self.in_features, self.out_features = qtype, in_features, qweight.shape[0]
        self.dtype = dtype
        self.fast = False
        self.register_buffer("dequantized", None, persistent=False)  # hold_dequantized's copy
        if fast:
            self.enable_fast()

    @classmethod
    def from_linear(cls, linear: nn.Linear, qtype: str, fast: bool = False) -> "QuantLinear":
        w = linear.weight.detach()
        return cls(quantize(w, qtype), qtype, linear.in_features, linear.bias, w.dtype, fast)

    def enable_fast(self) -> bool:
        """Switch to the int4 CPU GEMM where it applies (q4_0 / q4_k, a CPU weight, a PyTorch that
        has it); returns whether it did."""
        if not applies(self.qweight, self.qtype):
            return False
        packed, scales_zeros = pack_int4(self.qweight, self.qtype)
        self.register_buffer("int4_packed", packed, persistent=False)
        self.register_buffer("int4_scales_zeros", scales_zeros, persistent=False)
        self.fast = True
        return True

    def hold_dequantized(self) -> None:
        """Keep the weight dequantized in `dtype` (a non-persistent buffer) instead of rebuilding
        it each forward: the same matrix, so the same outputs bit for bit, at 2 or 4 bytes a weight."""
        self.dequantized = dequantize(self.qweight, self.qtype, self.dtype)

    @property
    def weight(self) -> torch.Tensor:
        if self.dequantized is not None:
            return self.dequantized
        return dequantize(self.qweight, self.qtype, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        if self.fast and x.device.type == "cpu":
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # [M, K]
            y = torch._weight_int4pack_mm_for_cpu(x2, self.int4_packed, INT4_GROUP, self.int4_scales_zeros)
            y = y.to(dtype).view(*x.shape[:-1], self.out_features)
            return y + self.bias.to(dtype) if self.bias is not None else y
        bias = self.bias.to(dtype) if self.bias is not None else None
        held = self.dequantized
        weight = held if held is not None and held.dtype == dtype else dequantize(self.qweight, self.qtype, dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}"
                + (", fast=int4pack" if self.fast else "") + (", held dequantized" if self.dequantized is not None else ""))


class QuantEmbedding(nn.Module):
    """nn.Embedding with the table [V, h] held as GGML blocks: a lookup dequantizes only the rows it reads."""

    def __init__(self, qweight: torch.Tensor, qtype: str, embedding_dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.qtype, self.embedding_dim, self.num_embeddings, self.dtype = qtype, embedding_dim, qweight.shape[0], dtype

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, qtype: str) -> "QuantEmbedding":
        w = emb.weight.detach()
        return cls(quantize(w, qtype), qtype, emb.embedding_dim, w.dtype)

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.qweight, self.qtype, self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight.index_select(0, ids.reshape(-1))  # [N, row_bytes]
        return dequantize(rows, self.qtype, self.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}"


class QuantStack(NamedTuple):
    """One projection of every expert: GGML bytes [E, out, row_bytes], their type, the projection."""
    raw: torch.Tensor
    qtype: str
    proj: str


class QuantExperts(Experts):
    """Routed experts (the same forward as model.Experts) whose stacked weights [E, out, in] are
    GGML blocks, buffers `gate_proj_q` / `up_proj_q` / `down_proj_q` [E, out, row_bytes] with their
    types in `qtypes`. The projections read as QuantStack and the two GEMM seams dequantize what
    they multiply by: `segment_gemm` one expert that got tokens, `grouped_gemm` the whole stack.
    With `fast`, the q4_0 / q4_k projections of a CPU model run each expert's segment through
    the int4 GEMM (QuantLinear's fast path, per expert: `<proj>_int4` / `<proj>_int4_sz`)."""

    PROJS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, stacks: dict[str, torch.Tensor], qtypes: dict[str, str], n_experts: int,
                 dtype: torch.dtype = torch.float32, impl: str = "auto", fast: bool = False):
        nn.Module.__init__(self)  # not Experts.__init__: the weights are byte buffers, not parameters
        self.n_experts, self.impl, self.dtype, self.qtypes = n_experts, impl, dtype, dict(qtypes)
        self.fast_projs: set[str] = set()
        for proj in self.PROJS:
            self.register_buffer(proj + "_q", stacks[proj])
            self.register_buffer(proj + "_dq", None, persistent=False)  # hold_dequantized's copy
        if fast:
            self.enable_fast()

    @classmethod
    def from_experts(cls, experts: Experts, qtypes: dict[str, str], fast: bool = False) -> "QuantExperts":
        stacks = {p: quantize(getattr(experts, p).detach(), qtypes[p]) for p in cls.PROJS}
        return cls(stacks, qtypes, experts.n_experts, experts.gate_proj.dtype, experts.impl, fast)

    def enable_fast(self) -> set[str]:
        """The int4 GEMM for every projection it applies to (q4_0 / q4_k, output rows a multiple
        of 16, CPU); returns those projections. When gate_proj and up_proj both take it in whole
        packing tiles, their codes are one stack `gate_up_int4` [E, 2 inter, in/2] (the two are its
        halves, views) so that one token's SwiGLU input is one GEMM (QuantExperts.forward)."""
        packs = {}
        for proj in self.PROJS:
            raw = getattr(self, proj + "_q")
            if proj not in self.fast_projs and applies(raw, self.qtypes[proj]):
                packs[proj] = pack_int4(raw, self.qtypes[proj])  # the whole stack at once
        if "gate_proj" in packs and "up_proj" in packs and packs["gate_proj"][0].shape[1] % PACK_TILE_ROWS == 0:
            (gate, gate_sz), (up, up_sz) = packs["gate_proj"], packs["up_proj"]
            inter = gate.shape[1]
            fused = torch.cat([gate, up], dim=1)  # [E, 2 inter, in/2]: the packing is per tile of rows
            del gate, up
            packs["gate_proj"], packs["up_proj"] = (fused[:, :inter], gate_sz), (fused[:, inter:], up_sz)
            self.register_buffer("gate_up_int4", fused, persistent=False)
            self.register_buffer("gate_up_int4_sz", torch.cat([gate_sz, up_sz], dim=2), persistent=False)
        for proj, (packed, scales_zeros) in packs.items():
            self.register_buffer(proj + "_int4", packed, persistent=False)
            self.register_buffer(proj + "_int4_sz", scales_zeros, persistent=False)
            self.fast_projs.add(proj)
        return self.fast_projs

    def hold_dequantized(self) -> set[str]:
        """Keep the projections not on the int4 GEMM dequantized in `dtype` ([E, out, in], a
        non-persistent `<proj>_dq`): the same matrices as each forward rebuilds, so the same outputs
        bit for bit. Returns those projections."""
        held = set()
        for proj in self.PROJS:
            if proj not in self.fast_projs:
                setattr(self, proj + "_dq", dequantize(getattr(self, proj + "_q"), self.qtypes[proj], self.dtype))
                held.add(proj)
        return held

    def _held(self, proj: str, dtype: torch.dtype) -> torch.Tensor | None:
        held = getattr(self, proj + "_dq")
        return held if held is not None and held.dtype == dtype else None

    @property
    def gate_proj(self) -> QuantStack:
        return QuantStack(self.gate_proj_q, self.qtypes["gate_proj"], "gate_proj")

    @property
    def up_proj(self) -> QuantStack:
        return QuantStack(self.up_proj_q, self.qtypes["up_proj"], "up_proj")

    @property
    def down_proj(self) -> QuantStack:
        return QuantStack(self.down_proj_q, self.qtypes["down_proj"], "down_proj")

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, h], indices/weights [N, k] -> [N, h]. One token (batch-1 decode) skips the dispatch:
        its k experts run in slot order and are combined as `combine` does, bit for bit the same."""
        if x.shape[0] != 1:
            return super().forward(x, indices, weights)
        k = indices.shape[1]
        dtype = compute_dtype(x)
        xs = x.to(dtype)  # [1, h]
        w1, w3, w2 = self.gate_proj, self.up_proj, self.down_proj
        fused = getattr(self, "gate_up_int4", None) if x.device.type == "cpu" else None
        ys = []
        for e in indices[0].tolist():  # the k chosen experts, in slot order
            if fused is not None:  # gate and up in one int4 GEMM: the same columns as two
                gate, up = int4_mm(xs, fused[e], self.gate_up_int4_sz[e]).chunk(2, dim=-1)  # [1, inter] each
                hidden = F.silu(gate) * up
            else:
                hidden = F.silu(self.segment_gemm(xs, w1, e)) * self.segment_gemm(xs, w3, e)  # [1, inter]
            ys.append(self.segment_gemm(hidden, w2, e))  # [1, h]
        ys = torch.cat(ys).float() * weights.reshape(-1, 1).float()  # [k, h], (token, slot) order
        return ys.view(1, k, -1).sum(dim=1).to(x.dtype)

    def grouped_gemm(self, x: torch.Tensor, weight: QuantStack, offs: torch.Tensor) -> torch.Tensor:
        held = self._held(weight.proj, x.dtype)
        stack = held if held is not None else dequantize(weight.raw, weight.qtype, x.dtype)  # [E, out, in]
        return super().grouped_gemm(x, stack, offs)

    def segment_gemm(self, x: torch.Tensor, weight: QuantStack, e: int) -> torch.Tensor:
        if weight.proj in self.fast_projs and x.device.type == "cpu":
            return int4_mm(x, getattr(self, weight.proj + "_int4")[e], getattr(self, weight.proj + "_int4_sz")[e])
        held = self._held(weight.proj, x.dtype)
        w = held[e] if held is not None else dequantize(weight.raw[e], weight.qtype, x.dtype)  # [out, in]
        return x @ w.t()  # [n_e, in] @ [in, out]

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, " + ", ".join(
            f"{p}={q}" + ("+int4pack" if p in self.fast_projs else "+held" if getattr(self, p + "_dq") is not None
                          else "") for p, q in self.qtypes.items())


# --------------------------------------------------------------------------------------- the swap
def _config_counts(model: nn.Module) -> tuple[int, int]:
    """(blocks including MTP, routed experts or 0) of a DeepSeekV3 or DenseModel."""
    cfg = model.config
    n_layers = cfg.num_hidden_layers + getattr(cfg, "num_nextn_predict_layers", 0)
    return n_layers, getattr(cfg, "n_routed_experts", 0) or 0


def quant_plan(model: nn.Module, mix: str, embedding: bool = False) -> dict[str, str]:
    """The GGML type of every weight `quantize_model` would quantize under `mix`: module name ->
    qtype, expert stacks as `<experts module>.<proj>` (quant/mixes.py states the rule)."""
    if mix not in MIXES:
        raise ValueError(f"unknown quantization mix {mix!r}; available: {', '.join(MIXES)}")
    n_layers, n_experts = _config_counts(model)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    weights: list[tuple[str, int]] = []  # (name, row length) in model order
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            weights.append((name, mod.in_features))
        elif isinstance(mod, nn.Embedding) and embedding:
            weights.append((name, mod.embedding_dim))
        elif isinstance(mod, Experts) and not isinstance(mod, QuantExperts):
            weights += [(f"{name}.{p}", getattr(mod, p).shape[-1]) for p in QuantExperts.PROJS]
    attn_v = [n for n, _ in weights if role_of(n)[0] in ("attn_v", "attn_qkv", "attn_kv_b")]
    plan = {}
    for name, k in weights:
        role, layer = role_of(name)
        if role == "token_embd" and tied:
            role = "output"  # llama.cpp: a tied embedding takes the output type
        elif role == "output" and tied:
            continue  # the head is the embedding: float, or the quantized table shared (quantize_model)
        plan[name] = tensor_qtype(mix, role, k, layer=layer or 0, n_layers=n_layers,
                                  attn_v_index=attn_v.index(name) if name in attn_v else 0,
                                  n_attn_v=max(1, len(attn_v)), n_experts=n_experts)
    return plan


@torch.no_grad()
def quantize_model(model: nn.Module, mix: str | None = None, *, plan: dict[str, str] | None = None,
                   embedding: bool = False, fast: bool = False) -> dict[str, str]:
    """Replace, in place, the nn.Linear, Experts (and with `embedding`, nn.Embedding) modules of a
    DeepSeekV3 or DenseModel by quantized ones, layer by layer (each float weight is dropped once
    its bytes exist). The types come from `plan` (as `quant_plan` returns) or from `mix`'s rule.
    The router, norms, biases and RoPE tables stay as they are. `fast`: the int4 CPU GEMM for the
    q4_0 / q4_k Linears and expert projections. Returns the plan applied."""
    if plan is None:
        if mix is None:
            raise ValueError("quantize_model needs a mix or a plan")
        plan = quant_plan(model, mix, embedding)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, mod in list(model.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(mod, nn.Linear) and name in plan:
            new = QuantLinear.from_linear(mod, plan[name], fast)
        elif isinstance(mod, nn.Embedding) and name in plan:
            new = QuantEmbedding.from_embedding(mod, plan[name])
        elif isinstance(mod, Experts) and not isinstance(mod, QuantExperts) and f"{name}.gate_proj" in plan:
            new = QuantExperts.from_experts(mod, {p: plan[f"{name}.{p}"] for p in QuantExperts.PROJS}, fast)
        else:
            continue
        setattr(parent, attr, new)
    if tied and isinstance(model.model.embed_tokens, QuantEmbedding) and "lm_head" not in plan:
        emb = model.model.embed_tokens
        model.lm_head = QuantLinear(emb.qweight, emb.qtype, emb.embedding_dim, None, emb.dtype, fast)
    return plan


def model_bytes(model: nn.Module) -> dict[str, int]:
    """Stored bytes of the model's state (parameters and persistent buffers, each storage once)
    by kind: a GGML type for quantized weights, the dtype name (e.g. "float32") for the rest, and
    "total"."""
    qtype_of: dict[int, str] = {}
    for mod in model.modules():
        if isinstance(mod, (QuantLinear, QuantEmbedding)):
            qtype_of[id(mod.qweight)] = mod.qtype
        elif isinstance(mod, QuantExperts):
            for p in QuantExperts.PROJS:
                qtype_of[id(getattr(mod, p + "_q"))] = mod.qtypes[p]
    out: dict[str, int] = {}
    seen = set()
    for t in model.state_dict(keep_vars=True).values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()) if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        kind = qtype_of.get(id(t), str(t.dtype).removeprefix("torch."))
        out[kind] = out.get(kind, 0) + t.numel() * t.element_size()
    out["total"] = sum(out.values())
    return out
