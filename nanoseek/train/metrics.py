"""What a run reports: metrics.jsonl (one line per step, validation and evaluation lines apart,
truncated to the checkpoint on resume), the plots drawn from it (pretraining: loss and MaxVio per
MoE layer, the DeepSeek-V3 report's balance measure of section 4.5.2; GRPO: reward, length, KL,
clip fraction, entropy) and the run's console lines.
"""

from __future__ import annotations

import json
import os
import sys

from ..balance import max_violation
from ..io import atomic_write_text


def say(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr if quiet else sys.stdout, flush=True)


class MetricsLog:
    """metrics.jsonl on rank 0: one line per optimizer step, validation lines apart."""

    def __init__(self, path: str, enabled: bool, keep_until_step: int | None):
        self.path, self.enabled = path, enabled
        if enabled:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            lines = []
            if keep_until_step is not None and os.path.exists(path):  # resume: drop what came after the checkpoint
                for line in open(path):
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if rec.get("step", 0) <= keep_until_step:
                        lines.append(line if line.endswith("\n") else line + "\n")
            atomic_write_text(path, "".join(lines))
            self.f = open(path, "a")

    def write(self, rec: dict) -> None:
        if self.enabled:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()

    def close(self):
        if self.enabled:
            self.f.close()


def step_record(step: int, sums, loads: dict, lr: float, grad_norm, tokens: int, seconds: float, ok: bool) -> dict:
    """metrics.jsonl's line for optimizer step `step` (1-based): the losses `sums` (ce, mtp,
    balance, total), lr, gradient norm, throughput, and MaxVio (of each MoE layer's tokens per
    expert in `loads`) per layer and averaged; `skipped` when not `ok`."""
    maxvio_layers = {n: max_violation(v) for n, v in loads.items()}
    rec = {"step": step, "loss": sums[0].item(), "mtp_loss": sums[1].item(), "balance_loss": sums[2].item(),
           "total_loss": sums[3].item(), "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tokens / seconds,
           "maxvio": sum(maxvio_layers.values()) / max(1, len(maxvio_layers)), "maxvio_layers": maxvio_layers}
    if not ok:
        rec["skipped"] = True
    return rec


def plot_run(out: str) -> list[str]:
    """loss.png (train and validation) and expert_load.png (MaxVio per MoE layer) beside the run."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if line.strip()]
    train = [r for r in recs if "loss" in r]
    val = [r for r in recs if "val_loss" in r]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("step"), ax.set_ylabel("cross entropy (nats)"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(os.path.join(out, "loss.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    layered = [r for r in train if r.get("maxvio_layers")]
    if layered:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name in layered[0]["maxvio_layers"]:
            ax.plot([r["step"] for r in layered], [r["maxvio_layers"].get(name, float("nan")) for r in layered],
                    lw=1, label=name.replace("model.layers.", "layer ").replace(".mlp", ""))
        ax.set_xlabel("step"), ax.set_ylabel("MaxVio (max load / mean load - 1)"), ax.set_yscale("symlog")
        ax.legend(fontsize=7), ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(os.path.join(out, "expert_load.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def plot_grpo(out: str) -> list[str]:
    """grpo.png: reward and accuracy, completion length, KL and clip fraction, entropy per step."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if line.strip()]
    tr = [r for r in recs if "reward_mean" in r]
    ev = [r for r in recs if "eval_accuracy" in r]
    if not tr:
        return []
    steps = [r["step"] for r in tr]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6))
    ax = axes[0][0]
    ax.plot(steps, [r["reward_mean"] for r in tr], lw=1, label="reward (mean)")
    ax.plot(steps, [r["accuracy"] for r in tr], lw=1, label="rollout accuracy")
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_accuracy"] for r in ev], "o-", label=f"held-out ({ev[0].get('eval_split', 'test')}) greedy accuracy")
    ax.set_title("reward"), ax.legend(fontsize=7), ax.grid(alpha=0.3)
    axes[0][1].plot(steps, [r["completion_length"] for r in tr], lw=1)
    axes[0][1].set_title("completion length (tokens)"), axes[0][1].grid(alpha=0.3)
    axes[1][0].plot(steps, [r["kl"] for r in tr], lw=1, label="KL (k3)")
    axes[1][0].plot(steps, [r["clip_fraction"] for r in tr], lw=1, label="clip fraction")
    axes[1][0].legend(fontsize=7), axes[1][0].grid(alpha=0.3), axes[1][0].set_xlabel("step")
    axes[1][1].plot(steps, [r["entropy"] for r in tr], lw=1)
    axes[1][1].set_title("entropy (nats/token)"), axes[1][1].grid(alpha=0.3), axes[1][1].set_xlabel("step")
    fig.tight_layout()
    path = os.path.join(out, "grpo.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
