"""Fully sharded data parallelism inside `nanoseek train --fsdp` (ZeRO-3; DeepSeek-V3 report
section 3.2 trains with data parallelism over the ranks of a node, and ZeRO-1-style sharded
optimizer state; here weights, gradients and optimizer states are all sharded, through PyTorch's
FSDP2 `fully_shard` as torchtitan trains DeepSeek-V3).

Applied from outside an unchanged model: every decoder block and MTP layer is one FSDP unit (its
parameters all-gathered just before its forward and backward, resharded after), the MTP layers'
output norms are units of their own (the model calls them outside the layers' forward), and the
root unit holds the embedding, the final norm and the head. Each rank keeps 1/W of every tensor.
Gradients are reduce-scattered as the mean over the W ranks, which see their slices of the global
batch (by global sample index), so losses equal one process step by step.

With `--ep N` (N divides W) the routed experts are first sharded by expert parallelism over groups
of N consecutive ranks (the all-to-all dispatch of nanoseek/parallel/expert_parallel.py); each EP
shard is then FSDP-sharded over the W/N ranks that hold the same experts, with its gradient divided
by W as well (the backward all-to-all has already summed the EP group's contributions). Everything
else is sharded over all W ranks.

Activation checkpointing composes: a checkpointed block recomputes inside its FSDP unit, whose
weights the unit gathers again for the backward.

Mixed precision (MixedPrecisionPolicy): bf16 parameters for compute with fp32 gradient reduction
on GPU under `--precision bf16`; fp32 everywhere else (CPU). Checkpoints: the sharded model and
optimizer through torch.distributed.checkpoint (nanoseek/parallel/sharded_checkpoint.py), plus the
whole model in the Hugging Face layout, gathered tensor by tensor onto rank 0's CPU. With
`async_save` the sharded state is written in the background while training goes on (`wait_saves`
blocks until this rank's write has finished).

CPU offload (`cpu_offload`, FSDP2's CPUOffloadPolicy, as ZeRO-Offload, Ren et al. 2021): the
sharded parameters and gradients live in host memory, so AdamW's states do too and the optimizer
step runs on the CPU; each unit is copied to the device for its all-gather, its reduce-scattered
gradient copied back. On a CPU run it moves nothing, and changes no number.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from .dims import ParallelDims
from .expert_parallel import apply_expert_parallel, expert_parallel_modules
from .interface import SingleProcess, model_from_state
from .sharded_checkpoint import AsyncShardedSaver, load_sharded, save_sharded


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become FSDP units below the root, innermost first: each MTP layer's output
    norm (called by the model outside the layer), then every decoder block and MTP layer."""
    blocks = list(model.model.layers.values()) + list(model.mtp.values())
    norms = [m.shared_head.norm for m in model.mtp.values()]
    return norms + blocks


def set_gradient_divisor(module: nn.Module, divisor: int) -> None:
    """Reduced gradients of an FSDP unit = sum over its mesh / divisor, through a plain sum and a
    separate scaling (gloo has no pre-multiplied sum)."""
    module.set_gradient_divide_factor(float(divisor))
    module.set_force_sum_reduction_for_comms(True)


def shard_pipeline_stages(stages: dict[int, nn.Module], mesh: DeviceMesh, *, reshard_after_forward: bool = True,
                          param_dtype: torch.dtype | None = None) -> None:
    """FSDP2 inside each pipeline stage (torchtitan's layout: shard the stage, then build the
    schedule): every decoder block, MTP layer and MTP output norm of the stage is one unit over
    `mesh` (the stage's data-parallel ranks), the stage itself the root unit of the rest
    (embedding, final norm, head), kept gathered from its forward to its backward as the MTP loss
    reuses the embedding and the head. Gradients are reduce-scattered as the mean over the mesh.
    A stage that feeds another sends fp32 activations whatever the compute dtype."""
    for stage in stages.values():
        policy = MixedPrecisionPolicy(param_dtype=param_dtype,
                                      reduce_dtype=torch.float32 if param_dtype is not None else None)
        mtp = getattr(stage, "mtp", None) or {}
        units = [m.shared_head.norm for m in mtp.values()] + list(stage.blocks.values()) + list(mtp.values())
        for unit in units:
            fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
        root_policy = policy if stage.last or param_dtype is None else MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=torch.float32, output_dtype=torch.float32)
        fully_shard(stage, mesh=mesh, reshard_after_forward=False, mp_policy=root_policy)


def local_optimizer_state(sd: dict) -> dict:
    """An optimizer state dict with every DTensor replaced by this rank's shard (a plain tensor
    file that loads with weights_only)."""
    state = {i: {k: local_shard(v) if isinstance(v, DTensor) else v for k, v in st.items()} for i, st in sd["state"].items()}
    return {**sd, "state": state}


def sharded_optimizer_state(sd: dict, opt: torch.optim.Optimizer) -> dict:
    """`local_optimizer_state`'s shards back into DTensors laid out like their parameters."""
    params = [p for g in opt.param_groups for p in g["params"]]  # the order of state_dict indices
    state = {}
    for i, st in sd["state"].items():
        p = params[i]
        state[i] = {k: DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                          stride=p.stride())
                    if isinstance(p, DTensor) and torch.is_tensor(v) and v.dim() else v for k, v in st.items()}
    return {**sd, "state": state}


class FSDPTraining(SingleProcess):
    """The micro-batch loop of `SingleProcess` over a fully sharded model; gradients are reduced by
    FSDP itself during the backward, clipping uses the norm summed over the shards, checkpoints as
    the module docstring says."""

    reads_sharded_checkpoints = True

    def __init__(self, model: nn.Module, dims: ParallelDims, rank: int, device, grad_accum: int = 1, *,
                 reshard_after_forward: bool = True, param_dtype: torch.dtype | None = None,
                 async_save: bool = False, cpu_offload: bool = False):
        super().__init__(model, dims, rank, device, grad_accum)
        self.saver = AsyncShardedSaver() if async_save else None
        world, ep, kind = dims.world, dims.ep, self.device.type
        self.mesh = init_device_mesh(kind, (world,), mesh_dim_names=("dp_shard",))
        policy = MixedPrecisionPolicy(param_dtype=param_dtype,
                                      reduce_dtype=torch.float32 if param_dtype is not None else None)
        self.cpu_offload = cpu_offload
        # sharded parameters, gradients (and so AdamW's states) on the host; pinned where there is a GPU to copy to
        offload = CPUOffloadPolicy(pin_memory=kind == "cuda") if cpu_offload else OffloadPolicy()
        self.ep, self.ep_modules, self.expert_mesh = ep, {}, None
        if ep > 1:  # experts: EP over consecutive ranks, then FSDP over the ranks holding the same shard
            self.expert_mesh = init_device_mesh(kind, (world // ep, ep), mesh_dim_names=("replica", "ep"))
            apply_expert_parallel(model, self.expert_mesh.get_group("ep"))
            self.ep_modules = expert_parallel_modules(model)
            # the same ranks, EP first: an expert tensor over it is Shard(0) by EP, then by replica
            self.whole_expert_mesh = DeviceMesh(kind, self.expert_mesh.mesh.t().contiguous(),
                                                mesh_dim_names=("ep", "replica"))
            for m in self.ep_modules.values():
                fully_shard(m, mesh=self.expert_mesh["replica"], reshard_after_forward=reshard_after_forward,
                            mp_policy=policy, offload_policy=offload)
                set_gradient_divisor(m, world)
        for unit in shard_units(model):
            fully_shard(unit, mesh=self.mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy,
                        offload_policy=offload)
        # the root (embedding, final norm, head) stays gathered from its forward to its backward: the
        # model's MTP forward reuses the embedding and the head after the main forward has returned
        fully_shard(model, mesh=self.mesh, reshard_after_forward=False, mp_policy=policy, offload_policy=offload)
        self.expert_names = {f"{name}.{p}" for name, m in self.ep_modules.items() for p, _ in m.named_parameters()}

    def describe(self) -> str:
        experts = f", experts ep {self.ep} x fsdp {self.dims.world // self.ep}" if self.ep > 1 else ""
        offload = ", states on the CPU" if self.cpu_offload else ""
        return f" (fsdp {self.dims.world}{experts}{offload})"

    # ------------------------------------------------------------------ gradients
    def sync_grads(self) -> None:
        """Nothing left to do: FSDP reduce-scattered the gradients in the backward."""

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The whole model's gradient norm (every element lives on exactly one rank: the local
        squares summed over all ranks) and clipping to max_norm, as one process does. The squares
        add up in fp64: one process's fp32 norm of a large tensor (the head) is itself off by ~1e-4
        relative, so the two agree to that, while the gradients themselves are equal."""
        grads = [local_shard(p.grad) for p in self.model.parameters() if p.grad is not None]
        sq = torch.zeros((), device=self.device, dtype=torch.float64)  # fp64: shards of a large tensor sum exactly
        for g in grads:
            sq += torch.linalg.vector_norm(g, dtype=torch.float64).square()
        dist.all_reduce(sq)
        total = sq.sqrt().float()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:  # offloaded gradients live on the host
            g.mul_(coef.to(g.device, g.dtype))
        return total

    # ------------------------------------------------------------------ checkpoints
    def _gather_experts(self, t: torch.Tensor) -> torch.Tensor | None:
        """An EP shard [E/ep, ...] (whole over its replicas) -> all experts [E, ...] on rank 0;
        called on the first replica's EP group only."""
        group = self.expert_mesh.get_group("ep")
        parts = [torch.empty_like(t) for _ in range(self.ep)] if dist.get_rank() == 0 else None
        dist.gather(t.contiguous(), parts, dst=0, group=group)
        return torch.cat(parts, 0).cpu() if parts is not None else None

    @torch.no_grad()
    def gather_full_state(self) -> dict | None:
        """The whole model's state dict on rank 0's CPU (None elsewhere), gathered one tensor at a
        time, so no rank ever holds more than one whole tensor on its device. Collective."""
        full = {} if self.main else None
        first_replica = self.expert_mesh is None or self.expert_mesh.get_local_rank("replica") == 0
        for key, value in self.model.state_dict().items():
            if isinstance(value, DTensor) and value.device != self.device:  # offloaded: gathered on the mesh's device
                value = value.to(self.device)
            whole = value.full_tensor() if isinstance(value, DTensor) else value.detach()
            if key in self.expert_names:
                if not first_replica:
                    continue
                whole = self._gather_experts(whole)
            if full is not None:
                full[key] = whole.cpu()
        return full

    def expert_tensors_whole(self, state: dict) -> dict:
        """`get_state_dict`'s model and optimizer state with every EP expert shard restated as a
        DTensor of all E experts (Shard(0) by EP rank, then by replica) for DCP; the restated
        tensors share storage with the shards."""
        if not self.expert_names:
            return state

        def whole(t: DTensor) -> DTensor:  # [E/ep, ...] sharded over replicas -> [E, ...] over (ep, replica)
            shape = torch.Size((t.shape[0] * self.ep, *t.shape[1:]))
            return DTensor.from_local(t.to_local(), self.whole_expert_mesh, (Shard(0), Shard(0)), run_check=False,
                                      shape=shape, stride=torch.empty(shape, device="meta").stride())

        model_state = {k: whole(v) if k in self.expert_names else v for k, v in state["model"].items()}
        optim = state["optim"]
        optim_state = {}
        for k, st in optim["state"].items():
            if k in self.expert_names:
                st = {n: whole(v) if isinstance(v, DTensor) else v for n, v in st.items()}
            optim_state[k] = st
        return {"model": model_state, "optim": {**optim, "state": optim_state}}

    def full_state(self) -> dict | None:
        return self.gather_full_state()

    def full_model(self) -> nn.Module | None:
        return model_from_state(self.full_config, self.gather_full_state(), "cpu")

    def save_optimizer(self, opt: torch.optim.Optimizer, ckpt_dir: str) -> dict | None:
        """Model and optimizer shards through DCP into ckpt_dir/dcp (in the background with
        async saves); trainer.pt holds no optimizer."""
        dist.barrier()  # rank 0 has created ckpt_dir
        if self.saver is not None:
            self.saver.save(self.model, opt, ckpt_dir, self.expert_tensors_whole)
        else:
            save_sharded(self.model, opt, ckpt_dir, self.expert_tensors_whole)
        return None

    def wait_saves(self) -> None:
        if self.saver is not None:
            self.saver.wait()

    def load_optimizer(self, opt: torch.optim.Optimizer, saved: dict | None, ckpt_dir: str) -> None:
        """From a sharded checkpoint (any world size), or from the whole optimizer state of a
        single-file one (each tensor cut down to this rank's shard)."""
        if saved is None:
            load_sharded(self.model, opt, ckpt_dir, self.expert_tensors_whole)
            return
        params = [p for g in opt.param_groups for p in g["params"]]  # the order of state_dict indices
        owners = {id(p): m for m in self.ep_modules.values() for p in m.parameters()}
        state = {}
        for i, st in saved["state"].items():
            p = params[i]
            st = dict(st)
            for key, v in st.items():
                if torch.is_tensor(v) and v.dim() and isinstance(p, DTensor):
                    m = owners.get(id(p))
                    if m is not None:  # the whole expert dimension -> this EP rank's experts
                        v = v[m.first:m.first + m.n_local]
                    st[key] = _shard_like(v, p)
            state[i] = st
        opt.load_state_dict({**saved, "state": state})


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def _shard_like(full: torch.Tensor, param: DTensor) -> DTensor:
    """The slice of a whole tensor that `param`'s shard covers, as a DTensor laid out like it."""
    mesh = param.device_mesh
    (placement,) = param.placements
    n, me = mesh.size(), mesh.get_local_rank()
    chunks = torch.chunk(full, n, dim=placement.dim)
    local = (chunks[me] if me < len(chunks) else full.narrow(placement.dim, 0, 0)).to(param.device)
    return DTensor.from_local(local.clone(), mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())
