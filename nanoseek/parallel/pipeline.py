"""Pipeline executor over torch.distributed point-to-point: runs exactly the op lists of
`schedules.py` (1F1B, DualPipe, DualPipeV) on gloo (CPU) or NCCL.

- Stages: `split_deepseek` prunes a DeepSeekV3 in place to the layers this rank's stages run
  (embedding on the first stage; final norm, head, MTP modules and the loss on the last) and wraps
  each stage; `split_sequential` does the same for any nn.Sequential. Model code stays unchanged.
- No host synchronisation inside a step: losses, balance losses and expert loads stay device
  tensors (read once, after the step, by the caller); on NCCL a wait only orders the compute
  stream after the transfer, so the CPU keeps queueing work ahead of the GPU.
- Communication: before each compute op the rank posts, in one `dist.batch_isend_irecv`, the sends
  queued by its previous op and the receives this op needs, and waits on the receives. On gloo the
  wait blocks the CPU (with a timeout) and sends are waited at the end of the step (a gloo send
  completes only when the peer posts its receive, so blocking on it before computing can deadlock
  two ranks); on NCCL every request is waited on the stream (the process group's own timeout
  catches hangs). Receives from a peer are posted in that peer's send order (known from its op
  list), so FIFO matching is right on NCCL as well as gloo.
- Backward split: `B` is a full backward; `I` computes the input gradient only and records, at
  each autograd node where a weight-gradient branch leaves the input path, the gradient flowing
  into it; `W` later runs only those weight branches from the recorded gradients (nothing of the
  input path is recomputed). A stage whose input needs no gradient (the embedding stage) has no
  input path: its `I` does nothing and its `W` is the whole backward.
- `FB` pairs go through an overlap hook (`register_overlap`), keyed by the forward stage's class:
  the default runs the forward then the backward; a block type may interleave them (e.g. to hide
  MoE all-to-all), with the schedule doing all bookkeeping and communication around it.
- Mirrored/shared parameters (DualPipe's two copies of every stage; the embedding that MTP needs
  on the last 1F1B stage) have their gradients summed over their holders by `SharedGrads`.
- Timelines: every op's host interval is kept (`timeline`); with `cuda_timing=True` CUDA events
  also bracket every op and every communication wait, read after the step by `device_timeline()`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from ..balance import sequence_balance_loss
from ..model import MoE
from .schedules import Op, Schedule, ScheduleError

OverlapFn = Callable[[Callable[[], None], Callable[[], None], nn.Module, nn.Module], None]
_OVERLAP: dict[type, OverlapFn] = {}


def register_overlap(stage_type: type, fn: OverlapFn) -> None:
    """fn(run_forward, run_backward, forward_stage, backward_stage) must call both closures once."""
    _OVERLAP[stage_type] = fn


def default_overlap(run_forward, run_backward, f_stage, b_stage) -> None:
    run_forward()
    run_backward()


def split_layers(names: list[str], n_stages: int) -> list[list[str]]:
    """Contiguous, balanced split (earlier stages take the extra layer)."""
    if n_stages > len(names):
        raise ScheduleError(f"{n_stages} pipeline stages but only {len(names)} layers to split")
    q, rem = divmod(len(names), n_stages)
    out, i = [], 0
    for s in range(n_stages):
        k = q + (s < rem)
        out.append(names[i:i + k])
        i += k
    return out


# ------------------------------------------------------------------------------------ stages
class _AddAuxLoss(torch.autograd.Function):
    """Identity on h; the backward feeds d(aux) = scale so an auxiliary loss computed inside a
    stage joins that stage's backward (the MoE balance loss of DeepSeek stages)."""

    @staticmethod
    def forward(ctx, h, aux, scale):
        ctx.scale = scale
        return h.clone()

    @staticmethod
    def backward(ctx, g):
        return g, torch.full((), ctx.scale, dtype=g.dtype, device=g.device), None


class DeepSeekStage(nn.Module):
    """A contiguous run of a DeepSeekV3's decoder layers; the first stage embeds, the last returns
    (logits, final-normed hidden). MoE balance losses of its layers are added in its backward.
    `balance_sum` (a device tensor, no host sync) sums those balance losses over the forwards
    since the last `reset_stats()`."""

    def __init__(self, local, layer_names: list[str], first: bool, last: bool, balance_alpha: float = 0.0,
                 loss_scale: float = 1.0):
        super().__init__()
        self.first, self.last = first, last
        self.embed = local.model.embed_tokens if first else None
        self.blocks = nn.ModuleDict({n: local.model.layers[n] for n in layer_names})
        self.norm = local.model.norm if last else None
        self.head = local.lm_head if last else None
        self.rotary = local.rotary
        if last:  # used by the loss (MTP): registered so that W steps reach their parameters
            self.mtp = local.mtp
            self.mtp_embed = local.model.embed_tokens
        self.balance_alpha, self.loss_scale = balance_alpha, loss_scale
        self.balance_sum: torch.Tensor | None = None  # [] summed over forwards, for reporting
        self.loads: dict[str, torch.Tensor] = {}  # tokens per expert, summed over the step's forwards

    def reset_stats(self) -> None:
        self.balance_sum = None

    def forward(self, x):
        h = self.embed(x) if self.first else x
        rope = self.rotary(torch.arange(h.shape[1], device=h.device))
        bal = None
        for name, layer in self.blocks.items():
            h = layer(h, rope)
            if isinstance(layer.mlp, MoE):
                c = layer.mlp.tokens_per_expert.float()
                self.loads[name] = self.loads[name] + c if name in self.loads else c
                if self.balance_alpha > 0 and torch.is_grad_enabled():
                    b = sequence_balance_loss(layer.mlp, h.shape[0], self.balance_alpha)
                    bal = b if bal is None else bal + b
        if bal is not None:
            b = bal.detach().float()
            self.balance_sum = b if self.balance_sum is None else self.balance_sum + b
            h = _AddAuxLoss.apply(h, bal, self.loss_scale)
        if self.last:
            h = self.norm(h)
            return self.head(h), h
        return h


def deepseek_criterion(local, mtp_lambda: float = 0.3, balance_alpha: float = 0.0):
    """Last-stage loss: CE + MTP loss (+ the balance loss of MTP MoEs). The target of a micro-batch
    is (input_ids, labels); `criterion.parts` keeps detached (ce, mtp, MTP balance) device tensors
    per call for reporting (read after the step: no host sync per micro-batch)."""

    def criterion(out, target):
        logits, hidden = out
        x, y = target
        ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        mtp = torch.zeros((), device=logits.device)
        mtp_bal = torch.zeros((), device=logits.device)
        if len(local.mtp) and mtp_lambda > 0:
            mtp_logits = local.mtp_forward(hidden, x)
            mtp = mtp_lambda / len(local.mtp) * sum(
                F.cross_entropy(lg.float().flatten(0, 1), y[:, k:].flatten()) for k, lg in enumerate(mtp_logits, 1))
            if balance_alpha > 0:
                for m in local.mtp.values():
                    if isinstance(m.mlp, MoE):
                        mtp_bal = mtp_bal + sequence_balance_loss(m.mlp, x.shape[0], balance_alpha)
        criterion.parts.append((ce.detach(), mtp.detach(), mtp_bal.detach()))
        return ce + mtp + mtp_bal

    criterion.parts = []
    return criterion


def split_deepseek(model, schedule: Schedule, rank: int, balance_alpha: float = 0.0, mtp_lambda: float = 0.3,
                   loss_scale: float | None = None):
    """Prune `model` (a DeepSeekV3, identical on every rank) in place to what `rank` runs and return
    (stages {virtual stage: DeepSeekStage}, criterion). The pruned model keeps HF parameter names,
    so `model.named_parameters()` is what `SharedGrads` matches across ranks."""
    S = schedule.num_model_stages
    groups = split_layers(list(model.model.layers.keys()), S)
    held = sorted({schedule.model_stage[v] for v in schedule.stages_of_rank(rank)})
    keep = {n for s in held for n in groups[s]}
    has_first, has_last = 0 in held, S - 1 in held
    for n in list(model.model.layers.keys()):
        if n not in keep:
            del model.model.layers[n]
    if not has_last:
        model.model.norm = None
        model.lm_head = None
        model.mtp = nn.ModuleDict()
    if not has_first and not (has_last and len(model.mtp)):
        model.model.embed_tokens = None
    scale = 1.0 / schedule.chunks if loss_scale is None else loss_scale
    stages = {v: DeepSeekStage(model, groups[schedule.model_stage[v]], schedule.model_stage[v] == 0,
                               schedule.model_stage[v] == S - 1, balance_alpha, scale)
              for v in schedule.stages_of_rank(rank)}
    return stages, deepseek_criterion(model, mtp_lambda, balance_alpha)


def split_sequential(seq: nn.Sequential, schedule: Schedule, rank: int):
    """Stages of an nn.Sequential (contiguous split into the schedule's model stages), and named
    parameters keyed by '<model stage>.<name>' so that mirrored copies match by name."""
    groups = split_layers([str(i) for i in range(len(seq))], schedule.num_model_stages)
    mods = [nn.Sequential(*[seq[int(i)] for i in g]) for g in groups]
    stages = {v: mods[schedule.model_stage[v]] for v in schedule.stages_of_rank(rank)}
    named = {f"{s}.{n}": p for s in sorted({schedule.model_stage[v] for v in stages})
             for n, p in mods[s].named_parameters()}
    return stages, named


# ------------------------------------------------------------------------------------ gradients
class SharedGrads:
    """Sum gradients of parameters held by several pipeline ranks (matched by name) over their
    holders. Built once (one all_gather_object of the names); `sync()` after each backward step."""

    def __init__(self, named_params: dict[str, nn.Parameter], group=None):
        self.params = named_params
        names = sorted(n for n, p in named_params.items() if p.requires_grad)
        world = dist.get_world_size(group)
        everyone: list = [None] * world
        dist.all_gather_object(everyone, names, group=group)
        holders: dict[str, tuple[int, ...]] = defaultdict(tuple)
        for r, ns in enumerate(everyone):
            for n in ns:
                holders[n] += (r,)
        me = dist.get_rank(group)
        self.groups: list[tuple[object, list[str]]] = []
        for hs in sorted({h for h in holders.values() if len(h) > 1}):  # the same order on every rank
            ranks = [dist.get_global_rank(group, r) if group is not None else r for r in hs]
            pg = dist.new_group(ranks)
            if me in hs:
                self.groups.append((pg, sorted(n for n in names if holders[n] == hs)))

    @torch.no_grad()
    def sync(self) -> None:
        """Sum each shared gradient over its holders; of a sharded (FSDP) parameter, this rank's
        shard (the holders shard it alike: the same shape over data-parallel groups of one size)."""
        for pg, names in self.groups:
            ps = [self.params[n] for n in names]
            for p in ps:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in ps]
            if dist.get_backend(pg) == "nccl":  # in place, one request per tensor: no flat copy
                works = [dist.all_reduce(g, group=pg, async_op=True) for g in grads]
                for w in works:
                    w.wait()
                continue
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=pg)
            i = 0
            for g in grads:
                g.copy_(flat[i:i + g.numel()].view_as(g))
                i += g.numel()


# ------------------------------------------------------------------------------------ backward split
def _grad_node(t: torch.Tensor):
    """The autograd node that receives t's gradient (for a leaf, its AccumulateGrad node)."""
    if t.grad_fn is not None:
        return t.grad_fn
    if not t.requires_grad:
        return None
    return t.view_as(t).grad_fn.next_functions[0][0]


class WeightBranches:
    """What an input-only backward (`I`) leaves for its weight step (`W`).

    The stage's autograd graph is walked once from the output. The *input path* is every node whose
    backward lies between the output and the stage input. Walking up from each parameter, the first
    input-path nodes met are where that parameter's weight-gradient branch leaves the input path;
    parameters that meet the same nodes form one group. `input_grad` computes d(out)/d(input) and
    records the gradient flowing into each such node; `weight_grads` then runs, per group, only the
    branch from those nodes to the parameters (no input-path node is executed twice, except between
    two nodes of one group, where each node's recorded gradient is used so nothing counts twice)."""

    def __init__(self, out: torch.Tensor, x: torch.Tensor, params: list[nn.Parameter]):
        from torch.autograd.graph import GradientEdge
        self._edge = GradientEdge
        root, x_node = out.grad_fn, _grad_node(x)
        users: dict = defaultdict(list)  # node -> nodes whose backward feeds it (reverse edges)
        seen, todo = {root}, [root]
        while todo:
            n = todo.pop()
            for child, _ in n.next_functions:
                if child is not None:
                    users[child].append(n)
                    if child not in seen:
                        seen.add(child)
                        todo.append(child)
        on_path, todo = {x_node}, [x_node]  # x_node reaches the root through `users`
        while todo:
            for u in users[todo.pop()]:
                if u not in on_path:
                    on_path.add(u)
                    todo.append(u)
        if root not in on_path:
            raise ScheduleError("stage output does not depend on the stage input")
        groups: list[tuple[set, list]] = []  # (branch points, [(param, its AccumulateGrad node)])
        for p in params:
            pn = _grad_node(p)
            if pn not in seen:
                continue  # unused in this forward: no gradient, as with a full backward
            hit, walked, todo = set(), {pn}, [pn]
            while todo:
                for u in users[todo.pop()]:
                    if u in on_path:
                        hit.add(u)
                    elif u not in walked:
                        walked.add(u)
                        todo.append(u)
            merged = [g for g in groups if g[0] & hit]
            for g in merged:
                groups.remove(g)
                hit |= g[0]
            groups.append((hit, [q for g in merged for q in g[1]] + [(p, pn)]))
        self.groups = [(list(nodes), members) for nodes, members in groups]
        self.recorded: dict = {}

    def input_grad(self, out: torch.Tensor, grad: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        def record(node):
            def hook(grad_outputs):
                self.recorded[node] = grad_outputs
            return hook

        handles = [n.register_prehook(record(n)) for nodes, _ in self.groups for n in nodes]
        try:
            (gx,) = torch.autograd.grad(out, x, grad, retain_graph=True)
        finally:
            for h in handles:
                h.remove()
        return gx

    def weight_grads(self) -> None:
        """Accumulate every parameter's gradient into .grad; frees the recorded state."""
        for nodes, members in self.groups:
            roots, grads, pins = [], [], []
            for n in nodes:
                g = self.recorded.get(n)
                if g is None:
                    continue
                if len(nodes) > 1:  # a node below another of the group: use its own recorded gradient
                    pins.append(n.register_prehook(lambda _, g=g: g))
                for i, gi in enumerate(g):
                    if gi is not None:
                        roots.append(self._edge(n, i))
                        grads.append(gi)
            try:
                if roots:
                    gs = torch.autograd.grad(roots, [self._edge(pn, 0) for _, pn in members], grads,
                                             retain_graph=True, allow_unused=True)
                    with torch.no_grad():
                        for (p, _), g in zip(members, gs):
                            if g is not None:
                                p.grad = g if p.grad is None else p.grad.add_(g)
            finally:
                for h in pins:
                    h.remove()
        self.groups, self.recorded = [], {}


# ------------------------------------------------------------------------------------ executor
class PipelineTimeout(RuntimeError):
    pass


class PipelineExecutor:
    """Runs `schedule.ops[rank]` for one training step.

    stages: {virtual stage: module} for this rank's stages. criterion(output, target) -> scalar on
    last stages. boundary(micro_batch_input) -> (shape, dtype) of the tensor crossing every stage
    boundary for that micro-batch (the receive buffers). Losses are multiplied by `loss_scale`
    (default 1/chunks) before backward, so gradients are those of the mean micro-batch loss.
    cuda_timing: bracket every op and communication wait with CUDA events (see `device_timeline`)."""

    def __init__(self, schedule: Schedule, stages: dict[int, nn.Module], criterion, boundary,
                 device=None, group=None, loss_scale: float | None = None, timeout: float = 120.0,
                 rank: int | None = None, cuda_timing: bool = False):
        self.s = schedule
        self.group = group
        self.rank = dist.get_rank(group) if rank is None else rank
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        if world != schedule.pp:
            raise ScheduleError(f"schedule {schedule.name} is for {schedule.pp} pipeline ranks, process group has {world}")
        mine = set(schedule.stages_of_rank(self.rank))
        if set(stages) != mine:
            raise ScheduleError(f"rank {self.rank} must hold stages {sorted(mine)}, got {sorted(stages)}")
        self.stages, self.criterion, self.boundary = stages, criterion, boundary
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.scale = 1.0 / schedule.chunks if loss_scale is None else loss_scale
        self.timeout = timeout
        self.overlap = default_overlap
        # NCCL: waits order the compute stream (no CPU block); gloo: waits block the CPU, with a timeout
        self.stream_waits = dist.is_initialized() and world > 1 and dist.get_backend(group) == "nccl"
        if cuda_timing and self.device.type != "cuda":
            raise ScheduleError(f"cuda_timing needs a CUDA device, the executor runs on {self.device}")
        self.cuda_timing = cuda_timing
        self.params = {v: [p for p in m.parameters() if p.requires_grad] for v, m in stages.items()}
        # the order in which each peer sends to us: messages (kind, stage, mb) from its op list
        self.incoming: dict[int, list[tuple]] = defaultdict(list)
        for r in range(schedule.pp):
            if r != self.rank:
                for msg, dest in self._sends_of(r):
                    if dest == self.rank:
                        self.incoming[r].append(msg)
        self.timeline: list[tuple[str, float, float]] = []
        self.comm_wait = 0.0
        self.executed: list[str] = []
        self._events: list[tuple[str, object, object]] = []

    def _sends_of(self, r: int):
        s = self.s
        for op in s.flat_ops(r):
            if op.kind == "F" and s.next_stage(op.stage) is not None:
                nx = s.next_stage(op.stage)
                if s.stage_rank[nx] != r:
                    yield ("act", nx, op.mb), s.stage_rank[nx]
            elif op.kind in ("B", "I") and s.prev_stage(op.stage) is not None:
                pv = s.prev_stage(op.stage)
                if s.stage_rank[pv] != r:
                    yield ("grad", pv, op.mb), s.stage_rank[pv]

    # ---------------------------------------------------------------- timing
    def _event(self):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def device_timeline(self) -> tuple[list[tuple[str, float, float]], list[tuple[str, float, float]]]:
        """(ops, communication waits) of the last step as (name, start, end) in seconds on the
        compute stream, relative to the step's first event (synchronizes; call after the step)."""
        if not self.cuda_timing:
            raise ScheduleError("device_timeline needs PipelineExecutor(cuda_timing=True)")
        torch.cuda.synchronize(self.device)
        ops, waits = [], []
        for name, b, e in self._events:
            rec = (name, self._ev0.elapsed_time(b) / 1e3, self._ev0.elapsed_time(e) / 1e3)
            (waits if name.startswith("wait") else ops).append(rec)
        return ops, waits

    # ---------------------------------------------------------------- communication
    def _needs(self, op: Op) -> list[tuple[tuple, int]]:
        s, out = self.s, []
        for o in (op.sub if op.kind == "FB" else (op,)):
            if o.kind == "F" and not s.is_first(o.stage) and s.stage_rank[o.stage - 1] != self.rank:
                out.append((("act", o.stage, o.mb), s.stage_rank[o.stage - 1]))
            if o.kind in ("B", "I") and not s.is_last(o.stage) and s.stage_rank[o.stage + 1] != self.rank:
                out.append((("grad", o.stage, o.mb), s.stage_rank[o.stage + 1]))
        return out

    def _commit(self, op: Op | None) -> None:
        p2p = []
        for t, dest in self._pending:
            p2p.append(dist.P2POp(dist.isend, t, self._peer(dest), self.group))
        self._pending = []
        for msg, src in (self._needs(op) if op is not None else []):
            q = self.incoming[src]
            while msg not in self._recv:
                m = q[self._posted[src]]
                self._posted[src] += 1
                shape, dtype = self.boundary(self._inputs[m[2]])
                buf = torch.empty(shape, dtype=dtype, device=self.device)
                self._recv[m] = buf
                p2p.append(dist.P2POp(dist.irecv, buf, self._peer(src), self.group))
        if not p2p:
            return
        t0 = time.perf_counter()
        ev = self._event() if self.cuda_timing else None
        works = dist.batch_isend_irecv(p2p)
        if self.stream_waits:  # every request: the compute stream waits, the CPU runs on
            for w in works:
                w.wait()
        else:
            n_send = len(p2p) - sum(1 for o in p2p if o.op is dist.irecv)
            if len(works) == len(p2p):  # gloo: one Work per op. Only receives block the compute;
                self._send_works += works[:n_send]  # sends are waited at the end of the step
                works = works[n_send:]
            self._wait(works, op)
        if ev is not None:
            self._events.append((f"wait {op}", ev, self._event()))
        self.comm_wait += time.perf_counter() - t0

    def _wait(self, works, op) -> None:
        for w in works:
            try:
                ok = w.wait(timeout=timedelta(seconds=self.timeout))
            except RuntimeError as e:
                raise PipelineTimeout(f"rank {self.rank}: point-to-point wait before {op} failed or timed out "
                                      f"after {self.timeout:g}s ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
            if ok is False:
                raise PipelineTimeout(f"rank {self.rank}: point-to-point wait before {op} timed out after {self.timeout:g}s")

    def _peer(self, r: int) -> int:
        return dist.get_global_rank(self.group, r) if self.group is not None else r

    def _queue_send(self, t: torch.Tensor, dest: int, stage: int, mb: int) -> None:
        shape, dtype = self.boundary(self._inputs[mb])
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise ScheduleError(f"rank {self.rank}: stage {stage} output for micro-batch {mb} has shape "
                                f"{tuple(t.shape)} {t.dtype}, the stage boundary expects {tuple(shape)} {dtype}")
        self._pending.append((t.detach().contiguous(), dest))

    # ---------------------------------------------------------------- compute
    def _forward(self, v: int, mb: int) -> None:
        s = self.s
        if s.is_first(v):
            x = self._inputs[mb]
        elif s.stage_rank[v - 1] == self.rank:
            x = self._local.pop(("act", v, mb))
        else:
            x = self._recv.pop(("act", v, mb)).requires_grad_()
        y = self.stages[v](x)
        self._in[(v, mb)] = x
        if s.is_last(v):
            loss = self.criterion(y, self._targets[mb])
            self.losses[mb] = loss.detach()  # a device tensor: read after the step
            self._out[(v, mb)] = loss * self.scale
            return
        if not isinstance(y, torch.Tensor):
            raise ScheduleError(f"stage {v} must return one tensor (got {type(y).__name__})")
        self._out[(v, mb)] = y
        nx = v + 1
        if s.stage_rank[nx] == self.rank:
            self._local[("act", nx, mb)] = y.detach().requires_grad_()
        else:
            self._queue_send(y, s.stage_rank[nx], v, mb)

    def _backward(self, v: int, mb: int, input_only: bool) -> None:
        s = self.s
        out = self._out.pop((v, mb))
        if s.is_last(v):
            grad = None
        elif s.stage_rank[v + 1] == self.rank:
            grad = self._local.pop(("grad", v, mb))
        else:
            grad = self._recv.pop(("grad", v, mb))
        x = self._in.pop((v, mb))
        gx = None
        if not input_only:
            torch.autograd.backward(out, grad)
            gx = x.grad if x.requires_grad else None
        elif x.requires_grad:  # input gradient now; the weight branches wait for W
            branches = WeightBranches(out, x, self.params[v])
            gx = branches.input_grad(out, grad, x)
            self._wstash[(v, mb)] = branches
        else:  # no input path (the embedding stage): W is the whole backward
            self._wstash[(v, mb)] = (out, grad)
        if not s.is_first(v):
            if gx is None:
                raise ScheduleError(f"stage {v}: its input received no gradient")
            pv = v - 1
            if s.stage_rank[pv] == self.rank:
                self._local[("grad", pv, mb)] = gx
            else:
                self._queue_send(gx, s.stage_rank[pv], v, mb)

    def _weight(self, v: int, mb: int) -> None:
        w = self._wstash.pop((v, mb))
        if isinstance(w, WeightBranches):
            w.weight_grads()
        else:
            torch.autograd.backward(*w)

    def _run(self, o: Op) -> None:
        if o.kind == "F":
            self._forward(o.stage, o.mb)
        elif o.kind in ("B", "I"):
            self._backward(o.stage, o.mb, o.kind == "I")
        elif o.kind == "W":
            self._weight(o.stage, o.mb)

    def step(self, inputs: list[torch.Tensor], targets: list | None = None) -> dict[int, torch.Tensor]:
        """One step over `inputs` (all micro-batches, every rank; only first stages read them) and
        `targets` (read by last stages). Returns {micro-batch: detached loss, a 0-d device tensor}
        for micro-batches whose chain ends on this rank (no host sync inside the step). Gradients
        accumulate into .grad; call SharedGrads.sync() afterwards."""
        M = self.s.chunks
        if len(inputs) != M or (targets is not None and len(targets) != M):
            raise ScheduleError(f"expected {M} micro-batches of inputs and targets, got {len(inputs)}"
                                f" and {None if targets is None else len(targets)}")
        shapes = {tuple(x.shape) for x in inputs}
        if len(shapes) != 1:
            raise ScheduleError(f"micro-batches must share one shape, got {sorted(shapes)}")
        self._inputs, self._targets = inputs, targets
        self._in, self._out, self._local, self._recv, self._wstash = {}, {}, {}, {}, {}
        self._pending: list = []
        self._send_works: list = []
        self._posted = defaultdict(int)
        self.losses: dict[int, torch.Tensor] = {}
        self.timeline, self.executed, self.comm_wait, self._events = [], [], 0.0, []
        if self.cuda_timing:
            self._ev0 = self._event()
        for op in self.s.ops[self.rank]:
            self._commit(op)
            t0 = time.perf_counter()
            ev = self._event() if self.cuda_timing else None
            if op.kind == "FB":
                f, b = op.sub
                hook = _OVERLAP.get(type(self.stages[f.stage]), self.overlap)
                hook(lambda: self._run(f), lambda: self._run(b), self.stages[f.stage], self.stages[b.stage])
            else:
                self._run(op)
            if ev is not None:
                self._events.append((str(op), ev, self._event()))
            self.timeline.append((str(op), t0, time.perf_counter()))
            self.executed.append(str(op))
        self._commit(None)
        self._wait(self._send_works, "the end of the step (sends)")
        self._send_works = []
        if self._out or self._wstash or self._recv or self._local:
            raise AssertionError(f"rank {self.rank}: state left after the step "
                                 f"{list(self._out)[:3]} {list(self._wstash)[:3]} {list(self._recv)[:3]}")
        return self.losses


def all_losses(losses: dict[int, torch.Tensor | float], chunks: int, group=None, device=None) -> torch.Tensor:
    """Every micro-batch's loss [chunks] (float64) on every rank (each lives on exactly one rank).
    On NCCL pass the rank's CUDA device. No host sync for tensor losses."""
    t = torch.zeros(chunks, dtype=torch.float64, device=device)
    for mb, v in losses.items():
        t[mb] = v.to(t) if isinstance(v, torch.Tensor) else v
    if dist.is_initialized():
        dist.all_reduce(t, group=group)
    return t
