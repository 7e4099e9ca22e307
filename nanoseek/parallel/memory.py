"""Per-GPU training memory of a layout (fsdp x ep x pp), from one accounting function: the bytes of
weights, gradients, AdamW states and activations that each rank holds (DeepSeek-V3 report section
3.2, where the layout is chosen so that the model fits without tensor parallelism; ZeRO, Rajbhandari
et al. 2020, for the sharded states). `nanoseek info --train-memory` prints it, and how many 80 GB
GPUs each layout needs.

Counts come from the model built on the meta device (no memory), so they are exact for the
tensors: fp32 master weights and gradients (4 B each), AdamW's two fp32 moments (8 B), each cut by
the layout: a pipeline stage holds its contiguous share of the layers (the first also the
embedding, the last the final norm, the head and the MTP layers), EP divides the routed experts,
FSDP divides everything over the data-parallel ranks. Activations are an estimate: the tensors a
decoder layer saves for its backward in bf16 (every one with no activation checkpointing, the
matmul outputs only with selective, the layer's input only with full, plus one layer recomputed),
the logits in fp32, times the micro-batches that 1F1B keeps in flight on the first stage (pp).
Under FSDP, two units' gathered compute-dtype weights are in flight (the current and the next).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..model import DeepSeekV3
from .pipeline import split_layers

GPU_BYTES = 80 * 10**9  # an 80 GB GPU
USABLE = 0.9  # of it, for the tensors counted here (the rest: allocator slack, communication buffers, kernels)
POLICIES = ("none", "selective", "full")


@dataclass(frozen=True)
class TrainMemory:
    """Bytes on the busiest rank of a layout."""

    weights: int
    grads: int
    optimizer: int
    activations: int
    gathered: int  # FSDP's all-gathered units in flight

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.gathered

    def as_dict(self) -> dict:
        return {"weights": self.weights, "grads": self.grads, "optimizer": self.optimizer,
                "activations": self.activations, "gathered": self.gathered, "total": self.total}


def parameter_groups(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(dense elements, routed-expert elements) of each placement unit: 'embed', every decoder layer
    by index, and 'last' (final norm, head, MTP layers)."""
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    groups: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        if name.startswith("model.layers."):
            unit = name.split(".")[2]
        elif name.startswith("model.embed_tokens"):
            unit = "embed"
        else:
            unit = "last"
        dense_expert = groups.setdefault(unit, [0, 0])
        dense_expert[int(".experts." in name)] += p.numel()
    return {k: (v[0], v[1]) for k, v in groups.items()}


def activation_bytes_per_token(cfg: ModelConfig, policy: str) -> tuple[int, int]:
    """(bytes a decoder layer keeps per token until its backward, bytes of one whole layer's saved
    tensors) in bf16, under an activation checkpointing policy."""
    h, H, k = cfg.hidden_size, cfg.num_attention_heads, cfg.num_experts_per_tok
    q = (cfg.q_lora_rank or 0) + H * cfg.qk_head_dim  # q_a, q_b outputs
    kv = cfg.kv_lora_rank + cfg.qk_rope_head_dim + H * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # kv_a, kv_b outputs
    attn_out = H * cfg.v_head_dim
    moe_inter = cfg.moe_intermediate_size
    ffn_matmul = max(2 * cfg.intermediate_size + h,  # the dense FFN: gate, up, down outputs
                     k * (2 * moe_inter + h) + cfg.n_shared_experts * (2 * moe_inter) + h)  # routed + shared
    matmul_outputs = q + kv + attn_out + h + ffn_matmul  # o_proj's output: h
    elementwise = 6 * h + (cfg.q_lora_rank or 0) + cfg.kv_lora_rank + k * h + cfg.n_routed_experts * 2 + \
        max(cfg.intermediate_size, k * moe_inter)  # norms, residuals, rope'd parts, dispatch, router, act
    whole = 2 * (matmul_outputs + elementwise)
    kept = {"none": whole, "selective": 2 * (matmul_outputs + h), "full": 2 * h}[policy]
    return kept, whole


def train_memory(cfg: ModelConfig, *, dp: int = 1, fsdp: bool = False, ep: int = 1, pp: int = 1,
                 micro_batch: int = 1, seq_len: int = 4096, policy: str = "none",
                 compute_bytes: int = 2) -> TrainMemory:
    """Bytes on the busiest rank: W = dp x pp processes, `ep` (dividing dp) of them sharding the
    routed experts, FSDP over the dp ranks when `fsdp`; `micro_batch` sequences of `seq_len` per
    rank and micro-step; `compute_bytes` the dtype FSDP gathers weights in (2: bf16)."""
    if policy not in POLICIES:
        raise ValueError(f"activation checkpointing policy {policy!r}: one of {', '.join(POLICIES)}")
    if dp % ep:
        raise ValueError(f"--ep {ep} must divide the data-parallel ranks ({dp})")
    groups = parameter_groups(cfg)
    layer_names = [str(i) for i in range(cfg.num_hidden_layers)]
    stages = split_layers(layer_names, pp)
    tokens = micro_batch * seq_len
    kept, whole = activation_bytes_per_token(cfg, policy)
    logits = tokens * cfg.vocab_size * (compute_bytes + 4) * (1 + cfg.num_nextn_predict_layers)  # bf16 + fp32 for CE
    dense_div = dp if fsdp else 1
    expert_div = dp if fsdp else ep  # FSDP over the dp / ep ranks holding each EP shard
    busiest = None
    for s, names in enumerate(stages):
        units = list(names) + (["embed"] if s == 0 else []) + (["last"] if s == pp - 1 else [])
        elems = sum(groups[u][0] / dense_div + groups[u][1] / expert_div for u in units if u in groups)
        in_flight = pp - s  # 1F1B: micro-batches whose backward is still to come on stage s
        acts = in_flight * tokens * kept * len(names) + (tokens * whole if policy != "none" else 0)
        if s == pp - 1:
            acts += logits
        gathered = 0
        if fsdp:
            largest = max(groups[u][0] + groups[u][1] / ep for u in units if u in groups)
            gathered = int(2 * largest * compute_bytes)
        mem = TrainMemory(weights=int(4 * elems), grads=int(4 * elems), optimizer=int(8 * elems),
                          activations=int(acts), gathered=gathered)
        if busiest is None or mem.total > busiest.total:
            busiest = mem
    return busiest


def gpus_needed(cfg: ModelConfig, *, fsdp: bool, ep: int = 1, pp: int = 1, micro_batch: int = 1,
                seq_len: int = 4096, policy: str = "none", max_gpus: int = 1024) -> tuple[int | None, TrainMemory | None]:
    """The fewest 80 GB GPUs (dp x pp, dp a power of two and a multiple of ep) on which the layout's
    busiest rank fits, and its memory; (None, None) when none up to max_gpus does."""
    dp = ep
    while dp * pp <= max_gpus:
        mem = train_memory(cfg, dp=dp, fsdp=fsdp, ep=ep, pp=pp, micro_batch=micro_batch, seq_len=seq_len,
                           policy=policy)
        if mem.total <= USABLE * GPU_BYTES:
            return dp * pp, mem
        if not fsdp:  # more data-parallel ranks only replicate: nothing per rank shrinks
            break
        dp *= 2
    return None, None


LAYOUTS = [  # (name, fsdp, ep, pp) that `nanoseek info --train-memory` reports
    ("data parallel", False, 1, 1), ("ep 8", False, 8, 1), ("fsdp", True, 1, 1), ("fsdp x ep 8", True, 8, 1),
    ("pp 4 (replicated stages)", False, 1, 4),
]


def measured_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """What this rank holds of the parameters and of AdamW's moments (its shards, under FSDP)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    weights = sum(t.numel() * t.element_size() for t in local)
    optimizer = 0
    for st in opt.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                t = st[key].to_local() if hasattr(st[key], "to_local") else st[key]
                optimizer += t.numel() * t.element_size()
    return {"weights": weights, "optimizer": optimizer}
