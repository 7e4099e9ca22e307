"""Pipeline parallelism inside `nanoseek train` (`--pp N --schedule {1f1b,dualpipe,dualpipev}
[--chunks M]`), combined with data parallelism: W = pp x dp processes, rank = dp_rank * pp + pp_rank.

Applied from outside to an unchanged model: every rank builds the same full model, then keeps only
its stages (`split_deepseek`). One optimizer step = the schedule's op list over M micro-batches of
this replica's slice of the global batch; gradients of mirrored copies (DualPipe) are summed over
their holders, then averaged over data-parallel replicas. The expert loads for the bias update are
summed over every rank, so mirrored copies get the same update. For validation and checkpoints the
stages are gathered into a full model on rank 0 (Hugging Face layout whatever the layout).

With `--fsdp` (1F1B only) the data-parallel ranks of each stage shard it instead of replicating it
(a 2-D mesh (dp_shard, pp), torchtitan's layout): the stage is FSDP2-sharded over its dp_shard
group before the schedule is built (nanoseek/parallel/fsdp.py `shard_pipeline_stages`), its
gradients are reduce-scattered inside that group during the backward, the gradients shared by
pipeline ranks (the embedding that MTP needs on the last stage) are summed shard by shard, and the
gradient norm sums every rank's shards. Each rank's optimizer file holds its shards.

With `--ep N` (1F1B, no --fsdp) the routed experts of each stage are sharded over groups of N of
its data-parallel ranks (DeepSeek-V3 report section 3.2.2; the all-to-all dispatch of
nanoseek/parallel/expert_parallel.py, inside the stage): a 3-D mesh (replica, ep, pp). The
replicated parameters are averaged over the stage's data-parallel ranks, each expert shard over
the replicas holding it, the gradient norm counts every expert once, and the checkpoint gathers
the experts whole (a pipeline run resumes on the same layout only)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from ..checkpoint import CheckpointError
from ..io import atomic_torch_save
from ..model import MoE
from .data_parallel import DataParallel
from .dims import ParallelDims
from .dist import barrier
from .ep_training import all_reduce_mean
from .expert_parallel import apply_expert_parallel, expert_parallel_modules
from .fsdp import local_optimizer_state, local_shard, shard_pipeline_stages, sharded_optimizer_state
from .interface import Parallel, model_from_state, rank_optimizer_path
from .pipeline import PipelineExecutor, SharedGrads, split_deepseek
from .schedules import ScheduleError, build_schedule, default_chunks


class PipelineGroups:
    """Process groups for pp x dp ranks: pipeline groups are consecutive ranks."""

    def __init__(self, pp: int):
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % pp:
            raise ScheduleError(f"--pp {pp} does not divide the {world} processes")
        self.pp, self.dp = pp, world // pp
        self.pp_rank, self.dp_rank = rank % pp, rank // pp
        self.pp_group = self.dp_group = None
        for d in range(self.dp):  # every rank creates every group, in the same order
            g = dist.new_group(list(range(d * pp, (d + 1) * pp)))
            if d == self.dp_rank:
                self.pp_group = g
        for p in range(pp):
            g = dist.new_group(list(range(p, world, pp)))
            if p == self.pp_rank:
                self.dp_group = g


def moe_names(cfg) -> list[str]:
    """Module paths of every MoE layer of the full model, in a fixed order (main, then MTP)."""
    names = [f"model.layers.{i}.mlp" for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    if cfg.n_routed_experts:
        names += [f"mtp.{cfg.num_hidden_layers + j}.mlp" for j in range(cfg.num_nextn_predict_layers)]
    return names


class PipelineTraining(Parallel):
    """This rank's stages of a pp x dp layout behind the Parallel interface: one step is the
    schedule's op list, clipping uses the norm summed over the pipeline, validation and
    checkpoints see the stages gathered into a whole model on rank 0, and every rank keeps its own
    optimizer file (the stages' parameters differ)."""

    reads_sharded_checkpoints = False  # single-file checkpoints only

    def __init__(self, model, pp: int, schedule: str, chunks: int | None, balance_alpha: float,
                 mtp_lambda: float, device, dims: ParallelDims | None = None, *, fsdp_reshard_after_forward: bool = True,
                 fsdp_param_dtype: torch.dtype | None = None):
        super().__init__(model, dims or ParallelDims(world=dist.get_world_size(), pp=pp), dist.get_rank(), device)
        self.fsdp = self.dims.fsdp
        self.cfg = model.config
        self.groups = PipelineGroups(pp)
        self.chunks = chunks or default_chunks(schedule, pp)
        self.schedule = build_schedule(schedule, pp, self.chunks)  # validates before any communication
        self.schedule_name = schedule
        if self.schedule.num_model_stages > self.cfg.num_hidden_layers:
            raise ScheduleError(f"{self.schedule.num_model_stages} pipeline stages but only "
                                f"{self.cfg.num_hidden_layers} layers")
        self.model = model
        self.device = torch.device(device)
        self.stages, self.criterion = split_deepseek(model, self.schedule, self.groups.pp_rank,
                                                     balance_alpha=balance_alpha, mtp_lambda=mtp_lambda)
        if self.fsdp:  # rank = dp_rank * pp + pp_rank: mesh[d, p] is that rank
            if schedule != "1f1b":
                raise ScheduleError(f"--fsdp does not combine with --pp under --schedule {schedule}: 1f1b only "
                                    f"(DualPipe's mirrored stages and split backward are not FSDP units)")
            self.mesh = init_device_mesh(self.device.type, (self.groups.dp, pp), mesh_dim_names=("dp_shard", "pp"))
            shard_pipeline_stages(self.stages, self.mesh["dp_shard"], reshard_after_forward=fsdp_reshard_after_forward,
                                  param_dtype=fsdp_param_dtype)
        self.ep, self.expert_ids = self.dims.ep, set()
        if self.ep > 1:  # rank = (replica * ep + ep_rank) * pp + pp_rank: mesh[r, e, p] is that rank
            self.ep_mesh = init_device_mesh(self.device.type, (self.groups.dp // self.ep, self.ep, pp),
                                            mesh_dim_names=("replica", "ep", "pp"))
            self.ep_group, self.replica_group = self.ep_mesh.get_group("ep"), self.ep_mesh.get_group("replica")
            apply_expert_parallel(model, self.ep_group)  # this stage's MoE layers, over its data-parallel ranks
            self.ep_modules = expert_parallel_modules(model)
            self.expert_ids = {id(p) for m in self.ep_modules.values() for p in m.parameters()}
        hidden = self.cfg.hidden_size
        self.executor = PipelineExecutor(self.schedule, self.stages, self.criterion, device=device,
                                         boundary=lambda x: ((*x.shape, hidden), torch.float32),
                                         group=self.groups.pp_group)
        self.named = dict(model.named_parameters())
        self.shared = SharedGrads(self.named, group=self.groups.pp_group)
        self.holders = {n: dist.get_world_size(pg) for pg, names in self.shared.groups for n in names}
        self.moe_names = moe_names(self.cfg)
        self.loads = {n: torch.zeros(self.cfg.n_routed_experts, device=device) for n in self.moe_names}
        self._hooks = [m.register_forward_hook(self._count(n)) for n, m in model.named_modules()
                       if isinstance(m, MoE)]
        self.averager = DataParallel(model, self.groups.dp, group=self.groups.dp_group, broadcast=False)

    def _count(self, name):
        def hook(module, inputs, output):
            self.loads[name] += module.tokens_per_expert.float()
        return hook

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward+backward of this replica's batch [b, T]; returns (ce, mtp, balance, total) means
        over the replica's micro-batches (the same on every rank of the pipeline)."""
        if x.shape[0] % self.chunks:
            raise ScheduleError(f"the per-replica batch of {x.shape[0]} sequences does not split into "
                                f"{self.chunks} micro-batches")
        xs, ys = list(x.chunk(self.chunks)), list(y.chunk(self.chunks))
        for st in self.stages.values():
            st.reset_stats()
        self.criterion.parts.clear()
        self.executor.step(xs, list(zip(xs, ys)))
        self.shared.sync()
        # device tensors only (one host read, by the caller, after the step)
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        parts = self.criterion.parts
        ce_mtp = torch.stack([sum((p[0].double() for p in parts), zero), sum((p[1].double() for p in parts), zero)])
        bal = sum((st.balance_sum.double() for st in self.stages.values() if st.balance_sum is not None),
                  sum((p[2].double() for p in parts), zero))[None]  # decoder layers' and MTP layers' balance
        # each micro-batch's CE/MTP lives on one last-stage rank; balance terms on every stage: sum them
        # (mirrored DualPipe copies each ran different micro-batches, so nothing is counted twice)
        parts = torch.cat([ce_mtp, bal])
        dist.all_reduce(parts, group=self.groups.pp_group)
        parts /= self.chunks
        return torch.stack([parts[0], parts[1], parts[2], parts.sum()])

    def take_loads(self) -> dict[str, torch.Tensor]:
        """Tokens per expert of every MoE layer over the global batch (summed over all ranks)."""
        stacked = (torch.stack([self.loads[n] for n in self.moe_names]) if self.moe_names
                   else torch.zeros(0, device=self.device))
        dist.all_reduce(stacked)
        for v in self.loads.values():
            v.zero_()
        return {n: stacked[i] for i, n in enumerate(self.moe_names)}

    def local_sq_norm(self) -> torch.Tensor:
        """Sum of squared gradients, mirrored parameters weighted by 1/holders; summed over the
        pipeline group it is the full model's squared gradient norm (expert shards: summed over
        their EP group first)."""
        by_holders: dict[int, list[torch.Tensor]] = {}
        expert_grads = []
        for n, p in self.named.items():
            if p.grad is not None and id(p) in self.expert_ids:
                expert_grads.append(p.grad)
            elif p.grad is not None:
                by_holders.setdefault(self.holders.get(n, 1), []).append(local_shard(p.grad))
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for h, grads in by_holders.items():  # one fused norm per holder count, no fp64 copies
            norms = torch.stack(torch._foreach_norm(grads)).double()
            total += norms.pow(2).sum() / h
        if expert_grads:  # this rank's experts, the EP group's others: every expert once
            expert_sq = torch.stack(torch._foreach_norm(expert_grads)).double().pow(2).sum()
            dist.all_reduce(expert_sq, group=self.ep_group)
            total += expert_sq
        # sharded stages: every rank holds a shard of its stage, so the squares add up over all ranks
        dist.all_reduce(total, group=None if self.fsdp else self.groups.pp_group)
        return total

    def gather_full_state(self) -> dict | None:
        """The full model's state dict on rank 0 (replica 0's pipeline ranks contribute; sharded
        stages are first gathered whole inside each stage's data-parallel group). Collective."""
        state = self.model.state_dict()
        if self.fsdp:
            state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}
        if self.ep > 1 and self.groups.dp_rank < self.ep:  # replica 0's EP group: its expert shards, whole
            state = {**state, **self._gather_experts()}
        if self.groups.dp_rank != 0:
            return None
        mine = {k: v.detach().cpu() for k, v in state.items()}
        everyone = [None] * self.groups.pp if self.groups.pp_rank == 0 else None
        dist.gather_object(mine, everyone, dst=0, group=self.groups.pp_group)
        if self.groups.pp_rank != 0:
            return None
        full = {}
        for part in everyone:
            full.update(part)
        return full

    @torch.no_grad()
    def _gather_experts(self) -> dict[str, torch.Tensor]:
        """Every expert tensor of this stage [E, ...] on the EP group's first rank (its shards
        [E/ep, ...] concatenated; empty elsewhere). Collective over the EP group."""
        first = dist.get_global_rank(self.ep_group, 0)
        whole = {}
        for name, m in self.ep_modules.items():
            for pname, p in m.named_parameters():
                parts = [torch.empty_like(p) for _ in range(self.ep)] if self.rank == first else None
                dist.gather(p.detach().contiguous(), parts, dst=first, group=self.ep_group)
                if parts is not None:
                    whole[f"{name}.{pname}"] = torch.cat(parts, 0)
        return whole

    @torch.no_grad()
    def _sync_expert_parallel_grads(self) -> None:
        """Mean gradients over the data-parallel ranks of the stage: the replicated parameters
        summed over all of them, each expert shard over the replicas holding it (its backward
        all-to-all has already summed the EP group's contributions); both divided by dp."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        dp = self.groups.dp
        all_reduce_mean([p for p in params if id(p) not in self.expert_ids], self.groups.dp_group, dp)
        all_reduce_mean([p for p in params if id(p) in self.expert_ids],
                        self.replica_group if dp > self.ep else False, dp)

    def layout_state(self) -> dict:
        return {**super().layout_state(), "pipeline_layout": self._layout()}

    def _layout(self) -> dict:
        return {"world": self.dims.world, "fsdp": self.fsdp, "ep": self.ep}

    def check_resume(self, trainer_state: dict, ckpt_dir: str) -> None:
        """Each rank reads its own optimizer file: the same pp, world, --fsdp and --ep only."""
        super().check_resume(trainer_state, ckpt_dir)
        written = trainer_state.get("pipeline_layout", {"world": self.dims.world, "fsdp": False, "ep": 1})
        if written != self._layout():
            raise CheckpointError(f"{ckpt_dir}: a pipeline checkpoint of {written['world']} processes (fsdp "
                                  f"{written['fsdp']}, ep {written['ep']}): resume it on the same layout, not "
                                  f"{self.dims.world} processes (fsdp {self.fsdp}, ep {self.ep})")

    # ------------------------------------------------------------------ the Parallel interface
    def describe(self) -> str:
        dp = f"fsdp {self.groups.dp}" if self.fsdp else f"dp {self.groups.dp}"
        dp += f" (ep {self.ep})" if self.ep > 1 else ""
        return f" (pp {self.groups.pp} x {dp}, {self.schedule_name}, {self.chunks} micro-batches)"

    def forward_backward(self, batches, step, loss, autocast):
        """The schedule over this replica's slice of the global batch (`loss` is unused: the last
        stage's criterion computes the same objective)."""
        x, y = batches.get(step, self.groups.dp_rank, self.groups.dp)
        with autocast:
            sums = self.step(x.to(self.device), y.to(self.device)).to(self.device)
        if self.groups.dp > 1:
            dist.all_reduce(sums, group=self.groups.dp_group)
            sums /= self.groups.dp
        return sums, self.take_loads()

    def sync_grads(self) -> None:
        if self.ep > 1:
            self._sync_expert_parallel_grads()
        elif not self.fsdp:  # FSDP reduce-scattered the gradients in the backward
            self.averager.sync_grads()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        grad_norm = self.local_sq_norm().sqrt().float()
        coef = min(1.0, max_norm / (float(grad_norm) + 1e-6))
        if coef < 1.0 and bool(torch.isfinite(grad_norm)):
            for p in self.model.parameters():
                if p.grad is not None:
                    local_shard(p.grad).mul_(coef)
        return grad_norm

    def eval_model(self):
        """The gathered whole model on rank 0 runs all of validation; the other ranks wait."""
        return self.full_model(), 0, 1

    def reduce_eval(self, total: torch.Tensor) -> None:
        pass

    def full_state(self) -> dict | None:
        return self.gather_full_state()

    def full_model(self):
        return model_from_state(self.full_config, self.gather_full_state(), self.device)

    def save_optimizer(self, opt, ckpt_dir: str) -> dict | None:
        """Rank 0's state goes into trainer.pt, every other rank's into optim-rank{R}.pt beside it."""
        barrier()  # rank 0 has created ckpt_dir
        sd = local_optimizer_state(opt.state_dict()) if self.fsdp else opt.state_dict()
        if not self.main:
            atomic_torch_save(sd, rank_optimizer_path(ckpt_dir, self.rank))
            return None
        return sd

    def load_optimizer(self, opt, saved: dict, ckpt_dir: str) -> None:
        if not self.main:
            saved = torch.load(rank_optimizer_path(ckpt_dir, self.rank), weights_only=True)
        opt.load_state_dict(sharded_optimizer_state(saved, opt) if self.fsdp else saved)
