"""Pipeline schedules as plain per-rank op lists: 1F1B, DualPipe and DualPipeV.

One source of truth for the order of work: the simulator (`simulator.py`) replays these lists with
per-op times, and the executor (`pipeline.py`) runs exactly these lists over torch.distributed.

Vocabulary
- A *virtual stage* (``Op.stage``) is one link of a micro-batch's chain of stages. Chains have
  ``chain_len`` links; virtual stage ``v`` belongs to chain ``v // chain_len``.
  1F1B: one chain of N stages, stage s on rank s.
  DualPipeV: one chain of 2N stages in a V: stage s on rank s for s < N, else on rank 2N-1-s.
  DualPipe: two chains (directions) over the same N model stages. Direction 0 (micro-batches
  0..M/2-1) enters at rank 0 and its stage s is on rank s; direction 1 (micro-batches M/2..M-1)
  enters at rank N-1 and its stage s is on rank N-1-s. So every model stage lives on two ranks
  (mirrored copies); ``model_stage[v]`` says which model stage a virtual stage runs.
- Ops: ``F`` forward, ``B`` full backward, ``I`` backward for the input only (its weight gradient
  is deferred), ``W`` the deferred weight gradient of an earlier ``I`` (FIFO), ``FB`` an
  overlapped pair (``sub`` = (F op, B op)) whose two chunks have no data dependency.

DualPipe/DualPipeV follow the 8 phases of the DeepSeek schedule (DeepSeek-V3 report, arXiv 2412.19437, section 3.2.1 and figure 5),
written from the phase table: with h the distance from the entry end (DualPipe: min(r, N-1-r),
n = N/2, m = M/2; DualPipeV: h = r, n = N, m = M), each rank runs
  1. 2(n-h-1) x F0          2. (h+1) x [F0, F1]        3. (n-h-1) x [I1, W, F1]
  4. (m-2n+h+1) x [(F0&B1), (F1&B0)]  (the first pair not overlapped on the turning rank(s))
  5. (n-h-1) x [B1, (F1&B0)] 6. (h+1) x [B1, B0], weight deferral switched on halfway
  7. (n-h-1) x [W, I0]      8. (h+1) x W
where phase 0 is the local stage that the rank's nearer pipeline end feeds first.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

SCHEDULES = ("1f1b", "dualpipe", "dualpipev")


class ScheduleError(ValueError):
    """An invalid pipeline setting (raised before any communication)."""


@dataclass(frozen=True)
class Op:
    kind: str  # F, B, I, W or FB
    stage: int = -1  # virtual stage (for FB: -1, see sub)
    mb: int = -1
    sub: tuple | None = None  # FB: (F op, B op)

    def __str__(self) -> str:
        if self.kind == "FB":
            return f"({self.sub[0]};{self.sub[1]})"
        return f"{self.stage}{self.kind}{self.mb}"

    def key(self) -> str:
        return str(self)


@dataclass
class Schedule:
    name: str
    pp: int  # ranks
    chunks: int  # micro-batches per step
    chain_len: int  # stages in one micro-batch's chain
    stage_rank: list[int]  # virtual stage -> rank
    model_stage: list[int]  # virtual stage -> model stage (which weights it runs)
    ops: list[list[Op]] = field(default_factory=list)  # per rank

    @property
    def num_stages(self) -> int:  # virtual stages
        return len(self.stage_rank)

    @property
    def num_model_stages(self) -> int:
        return max(self.model_stage) + 1

    def is_first(self, v: int) -> bool:
        return v % self.chain_len == 0

    def is_last(self, v: int) -> bool:
        return (v + 1) % self.chain_len == 0

    def next_stage(self, v: int) -> int | None:
        return None if self.is_last(v) else v + 1

    def prev_stage(self, v: int) -> int | None:
        return None if self.is_first(v) else v - 1

    def chain_of_mb(self, mb: int) -> int:
        return 0 if self.name != "dualpipe" else int(mb >= self.chunks // 2)

    def first_stage_of_mb(self, mb: int) -> int:
        return self.chain_of_mb(mb) * self.chain_len

    def last_stage_of_mb(self, mb: int) -> int:
        return self.first_stage_of_mb(mb) + self.chain_len - 1

    def stages_of_rank(self, rank: int) -> list[int]:
        return [v for v, r in enumerate(self.stage_rank) if r == rank]

    def mbs_of_stage(self, v: int) -> list[int]:
        c = v // self.chain_len
        return [mb for mb in range(self.chunks) if self.chain_of_mb(mb) == c]

    def flat_ops(self, rank: int) -> list[Op]:
        """Compute ops in execution order with FB pairs expanded (F then B)."""
        out = []
        for op in self.ops[rank]:
            out.extend(op.sub if op.kind == "FB" else (op,))
        return out

    def format(self) -> str:
        return "\n".join(f"rank {r}: " + " ".join(map(str, ops)) for r, ops in enumerate(self.ops))


def validate(name: str, pp: int, chunks: int) -> None:
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r} (choose from {', '.join(SCHEDULES)})")
    if pp < 1:
        raise ScheduleError(f"pipeline ranks must be >= 1, got {pp}")
    if chunks < 1:
        raise ScheduleError(f"micro-batches (chunks) must be >= 1, got {chunks}")
    if name == "dualpipe":
        if pp % 2:
            raise ScheduleError(f"DualPipe needs an even number of pipeline ranks, got {pp}")
        if chunks % 2 or chunks < 2 * pp:
            raise ScheduleError(f"DualPipe needs an even number of micro-batches >= 2 x ranks = {2 * pp}, got {chunks}")
    if name == "dualpipev" and chunks < 2 * pp:
        raise ScheduleError(f"DualPipeV needs micro-batches >= 2 x ranks = {2 * pp} (its stage count), got {chunks}")


def default_chunks(name: str, pp: int) -> int:
    """The smallest valid micro-batch count that fills the pipeline."""
    return pp if name == "1f1b" else 2 * pp


def build_schedule(name: str, pp: int, chunks: int) -> Schedule:
    name = name.lower()
    validate(name, pp, chunks)
    N, M = pp, chunks
    if name == "1f1b":
        s = Schedule(name, N, M, N, list(range(N)), list(range(N)))
        s.ops = [_one_f_one_b(N, M, r) for r in range(N)]
    elif name == "dualpipev":
        s = Schedule(name, N, M, 2 * N, [v if v < N else 2 * N - 1 - v for v in range(2 * N)], list(range(2 * N)))
        s.ops = [_dual(s, r, h=r, n=N, m=M, base=(0, 0), stages=(r, 2 * N - 1 - r), turning=r == N - 1)
                 for r in range(N)]
    else:
        ranks = list(range(N)) + [N - 1 - s for s in range(N)]
        s = Schedule(name, N, M, N, ranks, list(range(N)) * 2)
        s.ops = []
        for r in range(N):
            own = (r, N + (N - 1 - r))  # (direction-0 stage, direction-1 stage) held by rank r
            second_half = r >= N // 2
            stages = (own[1], own[0]) if second_half else own
            base = (M // 2, 0) if second_half else (0, M // 2)
            h = min(r, N - 1 - r)
            s.ops.append(_dual(s, r, h=h, n=N // 2, m=M // 2, base=base, stages=stages, turning=h == N // 2 - 1))
    check_counts(s)
    return s


def _one_f_one_b(N: int, M: int, r: int) -> list[Op]:
    warm = min(N - r - 1, M)
    ops = [Op("F", r, i) for i in range(warm)]
    f, b = warm, 0
    for _ in range(M - warm):
        ops.append(Op("F", r, f))
        f += 1
        ops.append(Op("B", r, b))
        b += 1
    ops += [Op("B", r, i) for i in range(b, M)]
    return ops


def _dual(s: Schedule, rank: int, h: int, n: int, m: int, base: tuple[int, int], stages: tuple[int, int],
          turning: bool) -> list[Op]:
    ops: list[Op] = []
    nf, nb = [0, 0], [0, 0]
    wq: deque[Op] = deque()

    def F(p):
        op = Op("F", stages[p], base[p] + nf[p])
        nf[p] += 1
        return op

    def B(p, zb=False):
        op = Op("I" if zb else "B", stages[p], base[p] + nb[p])
        nb[p] += 1
        if zb:
            wq.append(op)
        return op

    def W():
        i = wq.popleft()
        return Op("W", i.stage, i.mb)

    for _ in range(2 * (n - h - 1)):                       # 1: nF0
        ops.append(F(0))
    for _ in range(h + 1):                                 # 2: nF0F1
        ops += [F(0), F(1)]
    for _ in range(n - h - 1):                             # 3: nB1W1F1
        ops.append(B(1, zb=True))
        ops += [W(), F(1)]
    for i in range(m - 2 * n + h + 1):                     # 4: main loop, nF0B1F1B0
        if i == 0 and turning:
            ops += [F(0), B(1)]
        else:
            f = F(0)
            ops.append(Op("FB", sub=(f, B(1))))
        f = F(1)
        ops.append(Op("FB", sub=(f, B(0))))
    for _ in range(n - h - 1):                             # 5: nB1F1B0
        ops.append(B(1))
        f = F(1)
        ops.append(Op("FB", sub=(f, B(0))))
    zb, half = False, (h + 1) // 2                         # 6: nB1B0, zero bubble from halfway
    for i in range(h + 1):
        if i == half and h % 2 == 1:
            zb = True
        ops.append(B(1, zb))
        if i == half and h % 2 == 0:
            zb = True
        ops.append(B(0, zb))
    for _ in range(n - h - 1):                             # 7: nWB0
        ops.append(W())
        ops.append(B(0, zb=True))
    for _ in range(h + 1):                                 # 8: nW
        ops.append(W())
    if wq:
        raise AssertionError(f"rank {rank}: weight-gradient queue not empty at the end")
    return ops


def check_counts(s: Schedule) -> None:
    """Every (stage, micro-batch) gets exactly one F, one backward (B, or I + W) on its rank."""
    for r in range(s.pp):
        seen: dict[str, int] = {}
        for op in s.flat_ops(r):
            if s.stage_rank[op.stage] != r:
                raise AssertionError(f"rank {r} runs {op} of a stage it does not hold")
            seen[op.key()] = seen.get(op.key(), 0) + 1
        for v in s.stages_of_rank(r):
            for mb in s.mbs_of_stage(v):
                f, b, i, w = (seen.get(f"{v}{k}{mb}", 0) for k in "FBIW")
                if f != 1 or not ((b == 1 and i == w == 0) or (b == 0 and i == w == 1)):
                    raise AssertionError(f"rank {r}, stage {v}, micro-batch {mb}: F={f} B={b} I={i} W={w}")
