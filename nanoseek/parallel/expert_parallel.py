"""Expert parallelism for DeepSeekMoE (DeepSeek-V3 report sections 3.2.2 and 2.1.2).

The routed experts of every MoE layer are split over an expert-parallel (EP) group of ranks: rank
r holds experts [r * E/ep, (r + 1) * E/ep). A token's (token, expert) pairs travel to the ranks
that hold their experts and back, with two all-to-alls per layer and direction:

    route (unchanged Router) -> sort pairs by expert, hence by destination rank
    -> all-to-all the per-expert counts -> all-to-all the tokens (variable splits)
    -> the local experts on what arrived (`Experts.expert_mlp`: grouped GEMM or segment loop)
    -> all-to-all the outputs back -> un-permute, weight, sum over each token's k experts

Gradients flow through both all-to-alls (`_AllToAll`: the backward is the reverse exchange).
Shared experts, the router and everything else stay local. Applied from outside an unchanged
model by `apply_expert_parallel`; the state_dict names stay those of the model (only the expert
tensors' first dimension shrinks to the local slice).

Node-limited routing (report 2.1.2, "each token is sent to at most M nodes") is the model's own
group-limited top-k: with groups aligned to sets of EP ranks (`node_limited_config`), keeping
`topk_group` groups means touching at most `topk_group` nodes, through the same Router code.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import ModelConfig
from ..model import Experts, MoE, combine, compute_dtype, sort_by_expert

# ----------------------------------------------------------------------------- the exchange
# Seconds spent inside all-to-alls (with a device sync around each) while `timing` is on; for
# benchmarks only, since the syncs cost overlap.
COMM_STATS = {"timing": False, "seconds": 0.0, "calls": 0}


def exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """All-to-all with variable splits along dim 0: rows [in_splits[j]] go to rank j of `group`;
    returns the rows received, [sum(out_splits), ...], ordered by source rank. One function for
    both backends: gloo (CPU) and NCCL (GPU) take `all_to_all_single` with uneven splits."""
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    timed = COMM_STATS["timing"]
    if timed:
        _sync(x.device)
        t0 = time.perf_counter()
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    if timed:
        _sync(x.device)
        COMM_STATS["seconds"] += time.perf_counter() - t0
        COMM_STATS["calls"] += 1
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _AllToAll(torch.autograd.Function):
    """`exchange` with autograd: the gradient of the received rows goes back to their senders."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return exchange(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


# ----------------------------------------------------------------------------- the EP experts
class ExpertParallelExperts(Experts):
    """The routed experts of one MoE layer, sharded over an EP group: a dispatcher (all-to-all out,
    all-to-all back) around the unchanged local compute, `Experts.expert_mlp` on what arrived.

    `n_experts` stays the global count E (the MoE counts its load over all experts); the
    parameters `gate_proj`, `up_proj` [E/ep, inter, h] and `down_proj` [E/ep, h, inter] are this
    rank's slice. Every rank of the group must call `forward` together (it communicates).
    """

    def __init__(self, experts: Experts, group=None):
        _, inter, hidden = experts.gate_proj.shape
        with torch.device("meta"):  # the full-size parameters are replaced by this rank's slice below
            super().__init__(experts.n_experts, hidden, inter)
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        if self.n_experts % self.ep_size:
            raise ValueError(f"expert parallel: {self.n_experts} routed experts do not split over {self.ep_size} ranks")
        self.n_local = self.n_experts // self.ep_size
        self.first = self.ep_rank * self.n_local  # global index of the first local expert
        self.impl = experts.impl
        lo, hi = self.first, self.first + self.n_local
        for name in ("gate_proj", "up_proj", "down_proj"):
            full = getattr(experts, name)
            setattr(self, name, nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad))

    def extra_repr(self) -> str:
        return f"experts {self.first}..{self.first + self.n_local - 1} of {self.n_experts}, ep {self.ep_rank}/{self.ep_size}"

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, h], indices/weights [N, k] (global expert ids) -> sum_k weights * expert_k(x) [N, h]."""
        N, k = indices.shape
        ep, El = self.ep_size, self.n_local
        order, counts = sort_by_expert(indices, self.n_experts)  # [N*k] pair slots sorted by expert, so by rank
        counts = counts.view(ep, El)  # [ep, El] pairs per destination expert
        recv_counts = exchange(counts, [1] * ep, [1] * ep, self.group)  # [ep, El] pairs from each rank for my experts
        send = counts.sum(1).tolist()  # pairs to each rank
        recv = recv_counts.sum(1).tolist()  # pairs from each rank
        xs = x[order // k].to(compute_dtype(x))  # [N*k, h] grouped by expert (the send buffer, compute dtype)
        xr = all_to_all(xs, recv, send, self.group)  # [M, h] by (source rank, local expert)
        if xr.shape[0]:
            local_ids = torch.arange(El, device=x.device).repeat(ep).repeat_interleave(recv_counts.reshape(-1))  # [M]
            local_order = local_ids.argsort(stable=True)  # the arrivals sorted by local expert
            ys_local = self.expert_mlp(xr[local_order], recv_counts.sum(0))  # [M, h]
            yr = torch.empty_like(ys_local)
            yr[local_order] = ys_local  # back to arrival order
        else:
            yr = xr  # nothing arrived: an empty tensor that keeps the backward exchange in the graph
        ys = all_to_all(yr, send, recv, self.group)  # [N*k, h], back in `order`
        return combine(ys, order, weights, x.dtype)


def apply_expert_parallel(model: nn.Module, ep_group=None) -> list[str]:
    """Swap the routed experts of every MoE layer (main model and MTP) for their expert-parallel
    version over `ep_group` (a ProcessGroup, a 1-D DeviceMesh, or None for the whole world).
    Every rank must hold the same full weights before the call. Returns the swapped module names."""
    group = ep_group.get_group() if hasattr(ep_group, "get_group") else ep_group
    cfg = getattr(model, "config", None)
    if cfg is not None:
        node_limit(cfg, dist.get_world_size(group))  # validates that E splits over the ranks
    swapped = []
    for name, m in model.named_modules():
        if isinstance(m, MoE) and not isinstance(m.experts, ExpertParallelExperts):
            m.experts = ExpertParallelExperts(m.experts, group)
            swapped.append(f"{name}.experts" if name else "experts")
    return swapped


def expert_parallel_modules(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertParallelExperts)}


# ----------------------------------------------------------------------------- node-limited routing
def node_limit(cfg: ModelConfig, ep: int, ranks_per_node: int = 1) -> int | None:
    """The most nodes a token's experts can span under this config and EP layout: `topk_group`
    when every routing group lies on one node (groups aligned to sets of EP ranks), else None
    (no bound beyond the number of nodes). Raises if the experts do not split over the ranks."""
    E = cfg.n_routed_experts
    if ep < 1 or E % ep:
        raise ValueError(f"expert parallel: {E} routed experts do not split over {ep} ranks")
    if ep % ranks_per_node:
        raise ValueError(f"expert parallel: {ep} ranks do not fill nodes of {ranks_per_node}")
    nodes = ep // ranks_per_node
    if cfg.topk_method == "greedy" or cfg.n_group % nodes:
        return None
    return min(cfg.topk_group, nodes)


def node_limited_config(cfg: ModelConfig, nodes: int, max_nodes: int) -> ModelConfig:
    """Node-limited routing as group-limited routing: one group per node (the node's experts,
    consecutive, as EP places them), at most `max_nodes` groups kept per token."""
    E = cfg.n_routed_experts
    if E % nodes or not 1 <= max_nodes <= nodes:
        raise ValueError(f"node-limited routing: {E} experts over {nodes} nodes, at most {max_nodes} per token")
    method = cfg.topk_method if cfg.topk_method != "greedy" else "group_limited_greedy"
    return cfg.replace(n_group=nodes, topk_group=max_nodes, topk_method=method)


def ranks_per_token(indices: torch.Tensor, n_experts: int, ranks: int) -> torch.Tensor:
    """[N] how many distinct ranks hold each token's chosen experts (indices [N, k])."""
    owner = indices // (n_experts // ranks)  # [N, k]
    hit = torch.zeros(indices.shape[0], ranks, dtype=torch.bool, device=indices.device)
    hit.scatter_(1, owner, True)
    return hit.sum(1)
