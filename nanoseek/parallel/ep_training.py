"""Expert parallelism inside `nanoseek train --ep N` (DeepSeek-V3 report section 3.2.2).

EP borrows data-parallel ranks: W processes form a device mesh (W/N replicas) x (N EP ranks);
rank = replica * N + ep_rank, so an EP group is N consecutive ranks. Every rank still sees its own
slice of the global batch (by global sample index), so losses equal one process step by step.

Gradients, for a global loss that is the mean of the W per-rank losses:
- non-expert parameters (replicated everywhere): summed over all W ranks, divided by W;
- expert shards: the backward all-to-all already sums the gradients of the N ranks of an EP group
  on the shard's owner; those are summed over the W/N replicas of the same shard, divided by W.
Clipping uses the global norm (the dense part once, the expert shards summed over an EP group).

Checkpoints stay in the Hugging Face layout whatever the layout: the expert shards (and their
AdamW moments) are gathered on rank 0 to save, and sliced out of the full tensors to load, so a run
resumes at any EP size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from torch.distributed.device_mesh import init_device_mesh

from .dims import ParallelDims
from .expert_parallel import apply_expert_parallel, expert_parallel_modules
from .interface import SingleProcess, model_from_state


class ExpertParallelTraining(SingleProcess):
    """The replicated micro-batch loop of `SingleProcess` over a model whose routed experts are
    sharded; gradients, clipping and checkpoints as the module docstring says."""

    reads_sharded_checkpoints = False  # its expert shards are not DTensors: single-file checkpoints only

    def __init__(self, model: nn.Module, ep: int, device: torch.device, dims: ParallelDims | None = None,
                 grad_accum: int = 1):
        world = dist.get_world_size()
        super().__init__(model, dims or ParallelDims(world=world, ep=ep), dist.get_rank(), device, grad_accum)
        if ep < 1 or world % ep:
            raise ValueError(f"--ep {ep} must divide the number of data-parallel processes ({world})")
        self.model, self.ep, self.world = model, ep, world
        self.mesh = init_device_mesh(torch.device(device).type, (world // ep, ep), mesh_dim_names=("replica", "ep"))
        self.ep_group = self.mesh.get_group("ep")
        self.replica_group = self.mesh.get_group("replica")
        self.replica = dist.get_rank() // ep
        self.swapped = apply_expert_parallel(model, self.ep_group)
        self.ep_modules = expert_parallel_modules(model)
        self.expert_ids = {id(p) for m in self.ep_modules.values() for p in m.parameters()}
        # start from identical weights: dense ones from rank 0, each shard from its first replica
        shard_src = dist.get_global_rank(self.replica_group, 0)
        for p in model.parameters():
            if id(p) in self.expert_ids:
                if world // ep > 1:
                    dist.broadcast(p.data, src=shard_src, group=self.replica_group)
            else:
                dist.broadcast(p.data, src=0)
        for b in model.buffers():
            dist.broadcast(b.data, src=0)

    def is_expert(self, p: torch.Tensor) -> bool:
        return id(p) in self.expert_ids

    # ------------------------------------------------------------------ gradients
    @torch.no_grad()
    def sync_grads(self) -> None:
        """Average gradients to those of the global batch (missing ones count as zero)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        dense = [p for p in params if not self.is_expert(p)]
        experts = [p for p in params if self.is_expert(p)]
        all_reduce_mean(dense, None, self.world)
        all_reduce_mean(experts, self.replica_group if self.world > self.ep else False, self.world)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm (as one process would compute it) and clipping to max_norm."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        dev = params[0].grad.device
        sq = torch.zeros(2, device=dev, dtype=torch.float32)  # dense, local expert shards
        for p in params:
            sq[int(self.is_expert(p))] += torch.linalg.vector_norm(p.grad.float()).square()
        expert_sq = sq[1:].clone()
        dist.all_reduce(expert_sq, group=self.ep_group)
        total = (sq[0] + expert_sq[0]).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(coef.to(p.grad.dtype))
        return total

    # ------------------------------------------------------------------ checkpoints
    def _gather(self, t: torch.Tensor) -> torch.Tensor | None:
        """Concatenate a shard over replica 0's EP group onto rank 0 (call on replica 0 only)."""
        parts = [torch.empty_like(t) for _ in range(self.ep)] if dist.get_rank() == 0 else None
        dist.gather(t.contiguous(), parts, dst=0, group=self.ep_group)
        return torch.cat(parts, 0).cpu() if parts is not None else None

    @torch.no_grad()
    def gather_full_state(self) -> dict | None:
        """The full model's state dict (experts gathered) on rank 0, None elsewhere. Collective
        over the first replica's EP group (every rank may call it)."""
        if self.replica != 0:
            return None
        full = {k: v.detach().cpu() for k, v in self.model.state_dict().items()} if dist.get_rank() == 0 else None
        for name, m in self.ep_modules.items():
            for pname, p in m.named_parameters():
                whole = self._gather(p.detach())
                if full is not None:
                    full[f"{name}.{pname}"] = whole
        return full

    def _indexed_params(self, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
        return [p for g in opt.param_groups for p in g["params"]]  # the order of state_dict indices

    @torch.no_grad()
    def gather_optimizer_state(self, opt: torch.optim.Optimizer) -> dict | None:
        """The optimizer state dict of the full model (expert moments gathered) on rank 0."""
        if self.replica != 0:
            return None
        sd = opt.state_dict()
        for i, p in enumerate(self._indexed_params(opt)):
            if not self.is_expert(p) or i not in sd["state"]:
                continue
            st = dict(sd["state"][i])
            for key in sorted(st):
                v = st[key]
                if torch.is_tensor(v) and v.dim() == p.dim() and v.shape == p.shape:
                    st[key] = self._gather(v)
            sd["state"][i] = st
        return sd if dist.get_rank() == 0 else None

    def shard_optimizer_state(self, sd: dict, opt: torch.optim.Optimizer) -> dict:
        """A full-model optimizer state dict cut down to this rank's expert slices."""
        owner = {id(p): m for m in self.ep_modules.values() for p in m.parameters()}
        state = dict(sd["state"])
        for i, p in enumerate(self._indexed_params(opt)):
            m = owner.get(id(p))
            if m is None or i not in state:
                continue
            st = dict(state[i])
            for key, v in st.items():
                if torch.is_tensor(v) and v.dim() == p.dim() and v.shape[0] == m.n_experts:
                    st[key] = v[m.first:m.first + m.n_local].clone()
            state[i] = st
        return {**sd, "state": state}

    # ------------------------------------------------------------------ the Parallel interface
    def describe(self) -> str:
        return f" (ep {self.ep}: {len(self.swapped)} MoE layers sharded)"

    def full_state(self) -> dict | None:
        return self.gather_full_state()

    def full_model(self) -> nn.Module | None:
        return model_from_state(self.full_config, self.gather_full_state(), self.device)

    def save_optimizer(self, opt: torch.optim.Optimizer, ckpt_dir: str) -> dict | None:
        """Expert moments gathered: the full model's optimizer state (a run resumes at any EP size)."""
        return self.gather_optimizer_state(opt)

    def load_optimizer(self, opt: torch.optim.Optimizer, saved: dict, ckpt_dir: str) -> None:
        opt.load_state_dict(self.shard_optimizer_state(saved, opt))


def all_reduce_mean(params: list[torch.Tensor], group, divisor: int) -> None:
    """grad = (sum over `group` of grad) / divisor, one flat buffer per dtype; group False: no
    communication (a group of one), only the division."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for ps in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        if group is not False:
            dist.all_reduce(flat, group=group)
        flat /= divisor
        offset = 0
        for p in ps:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n
