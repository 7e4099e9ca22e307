"""Per-GPU training memory of a layout (fsdp x ep x pp), from one accounting function: the bytes of
weights, gradients, AdamW states and activations that each rank holds (DeepSeek-V3 report section
3.2, where the layout is chosen so that the model fits without tensor parallelism; ZeRO, Rajbhandari
et al. 2020, for the sharded states). `nanoseek info --train-memory` prints it, and how many 80 GB
GPUs each layout needs.

Counts come from the model built on the meta device (no memory), so they are exact for the
tensors: fp32 master weights and gradients (4 B each), AdamW's two fp32 moments (8 B), each cut by
the layout: a pipeline stage holds its contiguous share of the layers (the first also the
embedding, the last the final norm, the head and the MTP layers), EP divides the routed experts,
FSDP divides everything over the data-parallel ranks. Activations are counted op by op from the
model's code: the tensors each decoder layer saves for its backward, in the compute dtype (bf16)
where the model computes in it and in fp32 where it upcasts (norms, RoPE, router, the experts'
combine), with attention as the fused kernels save it (inputs, output, log-sum-exp); every one
with no activation checkpointing, the matmul and attention outputs and the layer's input with
selective, the layer's input only with full (plus one layer recomputed whole in the backward);
then the final norm, the fp32 log-probabilities of the cross entropy and the MTP layers; times the
micro-batches that 1F1B keeps in flight on the first stage (pp). tests/test_train_memory.py checks
the count against the tensors a scaled-down run keeps (nanoseek/parallel/memory_probe.py). Under
FSDP, two units' gathered compute-dtype weights are in flight (the current and the next). With FSDP
CPU offload the sharded weights, gradients and AdamW states are counted as host bytes instead
(ZeRO-Offload, Ren et al. 2021).
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
    host: int = 0  # offloaded to the CPU (FSDP CPU offload: the sharded weights, gradients and AdamW states)

    @property
    def total(self) -> int:
        """GPU bytes (the host's are apart)."""
        return self.weights + self.grads + self.optimizer + self.activations + self.gathered

    def as_dict(self) -> dict:
        """The GPU's bytes by kind and their total; the host's too when some are offloaded."""
        gpu = {"weights": self.weights, "grads": self.grads, "optimizer": self.optimizer,
               "activations": self.activations, "gathered": self.gathered, "total": self.total}
        return {**gpu, "host": self.host} if self.host else gpu


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


FP32 = 4  # bytes: the norms, RoPE, the router and the experts' combine compute in fp32


def _norm(d: int, c: int, output_saved: bool = True) -> int:
    """RMSNorm over d: its fp32 input copy, the bf16 normalized value the weight multiplies, the
    product when the next op saves it, the fp32 rstd."""
    return (FP32 + c + (c if output_saved else 0)) * d + FP32


def attention_bytes(cfg: ModelConfig, c: int) -> int:
    """Bytes per token that MLA (section 2.1.1) saves for its backward, the input norm included."""
    H, rope = cfg.num_attention_heads, cfg.qk_rope_head_dim
    q_rank = cfg.q_lora_rank or 0
    qk = H * cfg.qk_head_dim
    norms = _norm(cfg.hidden_size, c) + (_norm(q_rank, c) if q_rank else 0) + _norm(cfg.kv_lora_rank, c)
    rope_inputs = FP32 * (H + 1) * rope  # fp32 copies of q_pe and k_pe that the rotation multiplies
    kv_b = c * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # kept whole: v is a view of it
    sdpa = 2 * c * qk + c * H * cfg.v_head_dim + FP32 * H  # q, k (concatenated), output, log-sum-exp
    return norms + rope_inputs + kv_b + sdpa


def ffn_bytes(cfg: ModelConfig, layer: int, c: int) -> int:
    """Bytes per token that layer's FFN saves, its input norm included: SwiGLU keeps gate, up,
    their activation and product; the MoE adds the router (fp32), the dispatched copies of each
    token and the fp32 combine (section 2.1.2)."""
    h = cfg.hidden_size
    swiglu = lambda inter: 4 * c * inter  # noqa: E731
    if not cfg.is_moe_layer(layer):
        return _norm(h, c) + swiglu(cfg.intermediate_size)
    k, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    router = FP32 * (h + E) + FP32 * (4 * k + 2) + 8 * 3 * k  # fp32 input and scores, weights, indices and order
    routed = c * k * h + swiglu(k * cfg.moe_intermediate_size) + FP32 * k * h  # dispatched, SwiGLU, fp32 outputs
    shared = swiglu(cfg.n_shared_experts * cfg.moe_intermediate_size)
    return _norm(h, c) + router + routed + shared


def ffn_matmul_bytes(cfg: ModelConfig, layer: int, c: int) -> int:
    """Bytes per token of the FFN's matmul outputs (what selective checkpointing keeps)."""
    h = cfg.hidden_size
    if not cfg.is_moe_layer(layer):
        return c * (2 * cfg.intermediate_size + h)
    k, mi, E = cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.n_routed_experts
    return FP32 * E + c * k * (2 * mi + h) + c * (2 * cfg.n_shared_experts * mi + h)


def attention_matmul_bytes(cfg: ModelConfig, c: int) -> int:
    """Bytes per token of MLA's matmul and attention outputs (what selective checkpointing keeps)."""
    H = cfg.num_attention_heads
    q = (c * (cfg.q_lora_rank + H * cfg.qk_head_dim)) if cfg.q_lora_rank else c * H * cfg.qk_head_dim
    kv = c * (cfg.kv_lora_rank + cfg.qk_rope_head_dim + H * (cfg.qk_nope_head_dim + cfg.v_head_dim))
    return q + kv + c * H * cfg.v_head_dim + FP32 * H + c * cfg.hidden_size  # + attention output, lse, o_proj


def layer_bytes_per_token(cfg: ModelConfig, layer: int, policy: str, c: int = 2) -> int:
    """Bytes per token decoder layer `layer` keeps from its forward to its backward under an
    activation checkpointing policy: everything it saves (none), its matmul and attention outputs
    and its input (selective), its input only (full)."""
    if policy == "none":
        return attention_bytes(cfg, c) + ffn_bytes(cfg, layer, c)
    if policy == "selective":
        return attention_matmul_bytes(cfg, c) + ffn_matmul_bytes(cfg, layer, c) + c * cfg.hidden_size
    return c * cfg.hidden_size


def layer_fixed_bytes(cfg: ModelConfig, layer: int, policy: str) -> int:
    """Bytes a layer keeps whatever the tokens: the fp32 copy of the router's weight (no policy recomputes it away otherwise)."""
    return FP32 * cfg.n_routed_experts * cfg.hidden_size if policy == "none" and cfg.is_moe_layer(layer) else 0


def head_bytes_per_token(cfg: ModelConfig, policy: str, c: int = 2) -> int:
    """Bytes per token kept after the decoder layers: the final norm and the fp32 log-probabilities
    of the cross entropy, and for each MTP depth (section 2.2) its layer (the embedding and
    hidden norms, their concatenation and a decoder block; under checkpointing its inputs as the
    policy keeps them), its output norm and its log-probabilities."""
    h, V = cfg.hidden_size, cfg.vocab_size
    main = _norm(h, c) + FP32 * V
    layer = cfg.num_hidden_layers  # the MTP layers are numbered after the decoder layers
    if policy == "none":
        mtp_layer = 2 * _norm(h, c, output_saved=False) + 2 * c * h + layer_bytes_per_token(cfg, layer, "none", c)
    elif policy == "selective":
        mtp_layer = c * h + c * h + layer_bytes_per_token(cfg, layer, "selective", c)  # embedding, eh_proj output
    else:
        mtp_layer = c * h  # the embedding of the shifted tokens (the hidden input is the final norm's)
    return main + cfg.num_nextn_predict_layers * (mtp_layer + _norm(h, c) + FP32 * V)


def train_memory(cfg: ModelConfig, *, dp: int = 1, fsdp: bool = False, ep: int = 1, pp: int = 1,
                 micro_batch: int = 1, seq_len: int = 4096, policy: str = "none",
                 compute_bytes: int = 2, cpu_offload: bool = False) -> TrainMemory:
    """Bytes on the busiest rank: W = dp x pp processes, `ep` (dividing dp) of them sharding the
    routed experts, FSDP over the dp ranks when `fsdp`; `micro_batch` sequences of `seq_len` per
    rank and micro-step; `compute_bytes` the dtype FSDP gathers weights in (2: bf16).
    `cpu_offload` (FSDP only): the sharded weights, gradients and AdamW states are host bytes; the
    GPU keeps the activations and the gathered units."""
    if policy not in POLICIES:
        raise ValueError(f"activation checkpointing policy {policy!r}: one of {', '.join(POLICIES)}")
    if cpu_offload and not fsdp:
        raise ValueError("CPU offload moves FSDP's shards to the host: it needs fsdp")
    if dp % ep:
        raise ValueError(f"--ep {ep} must divide the data-parallel ranks ({dp})")
    groups = parameter_groups(cfg)
    layer_names = [str(i) for i in range(cfg.num_hidden_layers)]
    stages = split_layers(layer_names, pp)
    tokens = micro_batch * seq_len
    c = compute_bytes
    dense_div = dp if fsdp else 1
    expert_div = dp if fsdp else ep  # FSDP over the dp / ep ranks holding each EP shard
    busiest = None
    for s, names in enumerate(stages):
        units = list(names) + (["embed"] if s == 0 else []) + (["last"] if s == pp - 1 else [])
        elems = sum(groups[u][0] / dense_div + groups[u][1] / expert_div for u in units if u in groups)
        in_flight = pp - s  # 1F1B: micro-batches whose backward is still to come on stage s
        layers = [int(n) for n in names]
        acts = in_flight * sum(tokens * layer_bytes_per_token(cfg, i, policy, c) + layer_fixed_bytes(cfg, i, policy)
                               for i in layers)
        if policy != "none" and layers:  # the backward recomputes one layer at a time, whole
            acts += tokens * max(layer_bytes_per_token(cfg, i, "none", c) for i in layers)
        if s == pp - 1:
            acts += tokens * head_bytes_per_token(cfg, policy, c)
        gathered = 0
        if fsdp:
            largest = max(groups[u][0] + groups[u][1] / ep for u in units if u in groups)
            gathered = int(2 * largest * compute_bytes)
        states = (int(4 * elems), int(4 * elems), int(8 * elems))  # fp32 weights, gradients, AdamW moments
        on_gpu = (0, 0, 0) if cpu_offload else states
        mem = TrainMemory(*on_gpu, activations=int(acts), gathered=gathered, host=sum(states) if cpu_offload else 0)
        if busiest is None or mem.total > busiest.total:
            busiest = mem
    return busiest


def gpus_needed(cfg: ModelConfig, *, fsdp: bool, ep: int = 1, pp: int = 1, micro_batch: int = 1,
                seq_len: int = 4096, policy: str = "none", max_gpus: int = 1024,
                cpu_offload: bool = False) -> tuple[int | None, TrainMemory | None]:
    """The fewest 80 GB GPUs (dp x pp, dp a power of two and a multiple of ep) on which the layout's
    busiest rank fits, and its memory; (None, None) when none up to max_gpus does."""
    dp = ep
    while dp * pp <= max_gpus:
        mem = train_memory(cfg, dp=dp, fsdp=fsdp, ep=ep, pp=pp, micro_batch=micro_batch, seq_len=seq_len,
                           policy=policy, cpu_offload=cpu_offload)
        if mem.total <= USABLE * GPU_BYTES:
            return dp * pp, mem
        if not fsdp:  # more data-parallel ranks only replicate: nothing per rank shrinks
            break
        dp *= 2
    return None, None


LAYOUTS = [  # (name, fsdp, ep, pp, cpu_offload) that `nanoseek info --train-memory` reports
    ("data parallel", False, 1, 1, False), ("ep 8", False, 8, 1, False), ("fsdp", True, 1, 1, False),
    ("fsdp x ep 8", True, 8, 1, False), ("pp 4 (replicated stages)", False, 1, 4, False),
    ("fsdp + cpu offload", True, 1, 1, True),
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
