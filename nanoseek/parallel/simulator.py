"""Replay a schedule's own op lists with per-op times: per-rank timelines, bubble, peak activations.

Times are per chunk (one virtual stage on one micro-batch): F forward, B the whole backward, W its
weight-gradient part (so a deferred-weight backward I costs B - W), FB an overlapped F&B pair
(default F + B, i.e. no overlap), plus an optional latency per cross-rank hop. A rank starts its
next op as soon as the rank is free and the op's inputs exist:
  F(v, mb) needs F(v-1, mb); B/I(v, mb) needs F(v, mb) and B/I(v+1, mb) (the loss on the last
  stage); W follows its I on the same rank; an FB pair needs both and ends both at its end.
bubble_r = makespan - busy_r; `bubble` is the largest, `bubble_ratio` = bubble / makespan.
Peak activations count chunks whose forward ran and whose input-gradient backward has not (an FB
pair counts its forward before its backward frees), per rank, in chunk units.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .schedules import Op, Schedule, build_schedule


class Deadlock(RuntimeError):
    pass


@dataclass
class SimResult:
    schedule: str
    pp: int
    chunks: int
    times: dict
    timeline: list[list[tuple[str, float, float]]]  # per rank: (op, start, end)
    step_time: float
    busy: list[float]
    idle: list[float]
    bubble: float
    bubble_ratio: float
    peak_activations: list[int]
    formula: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"schedule": self.schedule, "pp": self.pp, "chunks": self.chunks, "times": self.times,
                "step_time": self.step_time, "bubble": self.bubble, "bubble_ratio": self.bubble_ratio,
                "idle_per_rank": self.idle, "busy_per_rank": self.busy,
                "peak_activations": max(self.peak_activations), "peak_activations_per_rank": self.peak_activations,
                **self.formula}


def formula(name: str, pp: int, F: float, B: float, W: float, FB: float, chunks: int | None = None) -> dict:
    """The DeepSeek-V3 report's bubble (Table 2) for this layout, and whether it is exact here.

    1F1B: (PP-1)(F+B), exact (for chunks >= PP). DualPipe on PP ranks: (PP/2-1)(F&B+B-3W).
    DualPipeV on N ranks has PP = 2N stages: (N-1)(F&B+B-3W). The DualPipe(V) formula is exact
    when F = B - W (the usual zero-bubble accounting) and W <= F (checked over a grid of times in
    tests/test_pipeline.py; with W > F the replay's bubble is larger), an estimate otherwise."""
    if name == "1f1b":
        return {"formula": "(PP-1)(F+B)", "formula_bubble": (pp - 1) * (F + B),
                "formula_exact": chunks is None or chunks >= pp}
    stages = pp if name == "dualpipe" else 2 * pp
    return {"formula": "(PP/2-1)(F&B+B-3W)", "formula_pp_stages": stages,
            "formula_bubble": (stages / 2 - 1) * (FB + B - 3 * W),
            "formula_exact": abs(F - (B - W)) < 1e-12 and W <= F + 1e-12}


def simulate(s: Schedule, F: float = 1.0, B: float = 2.0, W: float = 1.0, FB: float | None = None,
             latency: float = 0.0) -> SimResult:
    FB = F + B if FB is None else FB
    if not (F >= 0 and B >= W >= 0):
        raise ValueError(f"times need F >= 0 and B >= W >= 0, got F={F} B={B} W={W}")
    dur = {"F": F, "B": B, "I": B - W, "W": W, "FB": FB}
    fdone: dict[tuple[int, int], float] = {}
    bdone: dict[tuple[int, int], float] = {}
    clock = [0.0] * s.pp
    ptr = [0] * s.pp
    timeline: list[list[tuple[str, float, float]]] = [[] for _ in range(s.pp)]

    def ready(r: int, op: Op) -> float | None:
        """Earliest start allowed by the inputs, or None if an input is not produced yet."""
        t = 0.0
        for o in (op.sub if op.kind == "FB" else (op,)):
            deps: list[tuple[dict, tuple[int, int], int]] = []
            if o.kind == "F":
                p = s.prev_stage(o.stage)
                if p is not None:
                    deps.append((fdone, (p, o.mb), s.stage_rank[p]))
            elif o.kind in ("B", "I"):
                deps.append((fdone, (o.stage, o.mb), r))
                nx = s.next_stage(o.stage)
                if nx is not None:
                    deps.append((bdone, (nx, o.mb), s.stage_rank[nx]))
            for table, key, src in deps:
                if key not in table:
                    return None
                t = max(t, table[key] + (latency if src != r else 0.0))
        return t

    remaining = sum(len(o) for o in s.ops)
    while remaining:
        progressed = False
        for r in range(s.pp):
            while ptr[r] < len(s.ops[r]):
                op = s.ops[r][ptr[r]]
                t = ready(r, op)
                if t is None:
                    break
                start = max(clock[r], t)
                end = start + dur[op.kind]
                for o in (op.sub if op.kind == "FB" else (op,)):
                    if o.kind == "F":
                        fdone[(o.stage, o.mb)] = end
                    elif o.kind in ("B", "I"):
                        bdone[(o.stage, o.mb)] = end
                timeline[r].append((str(op), start, end))
                clock[r] = end
                ptr[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: str(s.ops[r][ptr[r]]) for r in range(s.pp) if ptr[r] < len(s.ops[r])}
            raise Deadlock(f"{s.name}: no rank can progress; next ops {stuck}")

    t0 = min(tl[0][1] for tl in timeline if tl)
    T = max(tl[-1][2] for tl in timeline if tl) - t0
    busy = [sum(e - b for _, b, e in tl) for tl in timeline]  # ops on a rank never overlap
    idle = [T - b for b in busy]
    bubble = max(idle)
    peaks = []
    for r in range(s.pp):
        live = peak = 0
        for op in s.ops[r]:
            for o in (op.sub if op.kind == "FB" else (op,)):
                live += 1 if o.kind == "F" else -1 if o.kind in ("B", "I") else 0
                peak = max(peak, live)
        peaks.append(peak)
    times = {"F": F, "B": B, "W": W, "FB": FB, "latency": latency}
    return SimResult(s.name, s.pp, s.chunks, times, timeline, T, busy, idle, bubble, bubble / T if T else 0.0, peaks,
                     formula(s.name, s.pp, F, B, W, FB, s.chunks))


def run_sim(name: str, pp: int, chunks: int, F=1.0, B=2.0, W=1.0, FB=None, latency=0.0) -> SimResult:
    return simulate(build_schedule(name, pp, chunks), F, B, W, FB, latency)


def measured_metrics(timeline: list[list[tuple[str, float, float]]]) -> dict:
    """The same metrics from a measured timeline (per rank: (op, start, end) in seconds): intervals
    on one rank are merged (union) before summing busy time."""
    starts = [b for tl in timeline for _, b, _ in tl]
    ends = [e for tl in timeline for _, _, e in tl]
    t0, T = min(starts), max(ends) - min(starts)
    busy = []
    for tl in timeline:
        total, cur_b, cur_e = 0.0, None, None
        for _, b, e in sorted(tl, key=lambda x: x[1]):
            if cur_e is None or b > cur_e:
                if cur_e is not None:
                    total += cur_e - cur_b
                cur_b, cur_e = b, e
            else:
                cur_e = max(cur_e, e)
        if cur_e is not None:
            total += cur_e - cur_b
        busy.append(total)
    idle = [T - b for b in busy]
    return {"step_time": T, "busy_per_rank": busy, "idle_per_rank": idle, "bubble": max(idle),
            "bubble_ratio": max(idle) / T if T else 0.0, "t0": t0}


def plot_timeline(timeline: list[list[tuple[str, float, float]]], path: str, title: str = "") -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"F": "#4C72B0", "B": "#55A868", "I": "#8DD3A0", "W": "#C44E52", "FB": "#8172B2"}
    n = len(timeline)
    t0 = min(b for tl in timeline for _, b, _ in tl)
    T = max(e for tl in timeline for _, _, e in tl) - t0
    fig, ax = plt.subplots(figsize=(max(8, min(24, 0.5 * sum(len(t) for t in timeline) / n)), 0.6 * n + 1.2))
    for r, tl in enumerate(timeline):
        for name, b, e in tl:
            kind = "FB" if name.startswith("(") else "".join(c for c in name if c.isalpha())
            ax.barh(r, e - b, left=b - t0, color=colors.get(kind, "grey"), edgecolor="black", linewidth=0.4)
            if (e - b) / T > 0.012:
                ax.text((b + e) / 2 - t0, r, name, ha="center", va="center", fontsize=5, color="white")
    ax.set_yticks(range(n), [f"rank {r}" for r in range(n)])
    ax.invert_yaxis()
    ax.set_xlabel("time")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, ["F", "B (full)", "I (input grad)", "W (weight grad)", "F&B pair"], fontsize=7,
              loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=5)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
