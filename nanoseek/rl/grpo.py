"""GRPO trainer (DeepSeekMath section 4.1.2 and Algorithm 1; DeepSeek-R1 section 2.2): for each
prompt, G completions sampled by the batched KV-cache engine, scored by a task's rule-based
verifier; group-relative advantages; the clipped-ratio objective for mu inner iterations with an
optional k3 KL penalty to a frozen reference; no value network.

Per step it logs reward mean/std, rollout accuracy, KL, clip fraction, completion length,
entropy, informative and zero-variance groups and truncations to metrics.jsonl, and draws
grpo.png. `--max-seconds` bounds the loop's wall time (evaluations excluded), so a run can be
compared with the same time spent another way.

`GRPOTrainer` holds the run's state (policy, sampler, optimizer, problem stream, counters) and
has one method per phase, TRL's shape: `rollout(step, problems)` samples and scores a batch,
`update(batch, step)` is the policy update on it. nanoseek/rl/overlap.py schedules them: one
after the other, or with `--overlap` (CPU) the next step's rollouts sampled during this step's
update from a copy of the weights one step old (one-step off-policy); the importance ratio then
uses the log-probs the sampler drew each token with (temperature applied) as pi_old, so the
clipped objective corrects for the lag.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from ..infer.engine import Engine, SamplingParams
from ..io import atomic_write_text
from ..model import DeepSeekV3
from ..tasks import Task, evaluate, get_task
from ..tasks.base import check_all, score_reward
from ..tasks.evaluate import encode_prompts
from ..tokenizer import Tokenizer
from ..train.checkpointing import load_trainer_state, resume_point, save_checkpoint
from ..train.metrics import MetricsLog, plot_grpo, say
from ..train.schedule import grpo_lr
from .objective import LOSS_TYPES, group_advantages, policy_loss, token_weights
from .overlap import run_steps


@dataclass
class GRPOArgs:
    model: str  # checkpoint directory with its tokenizer
    task: str = "countdown"  # a spec for tasks.get_task, or a Task object
    task_data: str | None = None  # folder of a file task (gsm8k, math, svamp)
    out: str = "runs/grpo"
    max_steps: int = 200
    max_seconds: float | None = None  # stop when the loop has run this long (evaluations excluded)
    prompts_per_step: int = 32
    group_size: int = 8  # G
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 64
    lr: float = 5e-5
    warmup_steps: int = 10
    min_lr_ratio: float = 1.0  # after warm-up, cosine decay to lr * this at the end (1: constant lr)
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mu: int = 1  # optimizer steps per rollout batch
    eps: float = 0.2
    eps_high: float | None = None  # default: 0.28 for dapo (clip-higher), eps otherwise
    beta: float = 0.0  # KL penalty weight (0: no reference model)
    loss: str = "dapo"  # grpo | dr_grpo | dapo
    scale_rewards: bool = True  # divide by the group's std (off for Dr. GRPO's advantage)
    reward: str = "strict"  # strict | lenient
    format_weight: float = 0.0
    mask_truncated: bool = True
    micro_batch: int = 256  # at most this many sequences per forward/backward (equal chunks)
    eval_every: int = 0
    eval_problems: int = 500
    chat: bool = False  # wrap prompts in the chat template
    seed: int = 0
    device: str | None = None
    precision: str | None = None  # fp32 | bf16 (default: bf16 on GPU, fp32 on CPU)
    save: bool = True
    save_every: int = 0  # also checkpoint (model, optimizer, counters) every N steps; 0: only the final model
    keep_last: int = 2
    resume: bool = False  # continue from the newest checkpoint in out/checkpoints (exact: same rollouts)
    overlap: bool = False  # CPU: sample step t+1's rollouts during step t's update (one step off-policy)
    json: bool = False
    progress: bool = True

    def validate(self) -> "GRPOArgs":
        if self.loss not in LOSS_TYPES:
            raise ValueError(f"--loss: must be one of {', '.join(LOSS_TYPES)}, got {self.loss!r}")
        if self.group_size < 2:
            raise ValueError(f"--group-size: GRPO needs at least 2 completions per prompt, got {self.group_size}")
        if self.save_every < 0:
            raise ValueError(f"--save-every: must be >= 0, got {self.save_every}")
        for name in ("prompts_per_step", "max_new_tokens", "mu", "micro_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if self.reward not in ("strict", "lenient"):
            raise ValueError(f"--reward: strict or lenient, got {self.reward!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio: between 0 and 1, got {self.min_lr_ratio}")
        if self.beta < 0:
            raise ValueError(f"--beta: must be >= 0, got {self.beta}")
        if self.overlap and self.resume:
            raise ValueError("--resume with --overlap: the batch sampled ahead during the last update is not in the "
                             "checkpoint, so a resumed run would differ from an uninterrupted one; resume without "
                             "--overlap, or start again")
        if self.overlap and self.top_p < 1.0:
            raise ValueError("--overlap: the importance ratio needs the sampler's full tempered distribution; "
                             f"use --top-p 1 (got {self.top_p})")
        return self


# `nanoseek grpo`'s help for each field (nanoseek/cli/args.py shows the defaults beside it)
GRPO_HELP = {
    "model": "checkpoint directory (with its tokenizer) to start from", "task": "countdown, arithmetic, gsm8k, math, "
    "svamp; options as name:key=value (e.g. countdown:n_numbers=3)", "task_data": "folder of a file task's data",
    "out": "run directory: metrics.jsonl, grpo.png, the final model", "max_seconds": "stop after this much loop time",
    "group_size": "completions per prompt (G)", "mu": "optimizer steps per rollout batch",
    "min_lr_ratio": "after the warm-up, cosine decay of the lr to lr x this at the end (1: constant)",
    "eps_high": "upper clip (default 0.28 for dapo, else --eps)", "beta": "k3 KL penalty weight to the start model",
    "loss": "grpo (sequence mean), dr_grpo (constant normalizer) or dapo (token mean)",
    "scale_rewards": "divide advantages by the group std (turn off for Dr. GRPO)",
    "reward": "strict (format and worked steps checked) or lenient (answer only)",
    "format_weight": "weight of the format reward added to the accuracy reward",
    "mask_truncated": "leave completions cut at --max-new-tokens out of the loss",
    "eval_every": "greedy held-out accuracy every N steps (0: never)",
    "save_every": "also write a resumable checkpoint every N steps (0: only the final model)",
    "resume": "continue from the newest checkpoint in --out (the same rollouts as an uninterrupted run; "
    "refused with --overlap, whose batch sampled ahead is not in the checkpoint)",
    "chat": "wrap prompts in the chat template",
    "overlap": "CPU, fp32, 2+ threads: sample the next step's rollouts during this step's update, half of the "
    "threads each (one step off-policy, corrected by the importance ratio)",
    "json": "print the summary as one JSON line", "progress": "show a progress bar",
    "save": "write the final model and checkpoints (--no-save: neither, for benchmarks)",
}


def completion_logprobs(model, seqs: torch.Tensor, temperature: float, autocast,
                        entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """seqs [N, T] -> log-probs of tokens 1..T-1 under the (tempered) model [N, T-1] and, with
    `entropy`, the entropy of each predicting distribution [N, T-1] (else None)."""
    with autocast:
        logits = model(seqs[:, :-1])
    logp_all = torch.log_softmax(logits.float() / max(temperature, 1e-6), dim=-1)  # [N, T-1, V]
    logp = logp_all.gather(-1, seqs[:, 1:, None])[..., 0]
    ent = -(logp_all.detach().exp() * logp_all.detach()).sum(-1) if entropy else None
    return logp, ent


def build_batch(prompts: list[list[int]], completions, eos_id: int, pad_id: int, mask_truncated: bool):
    """Prompt + completion rows, right-padded: seqs [N, T], mask [N, T-1] (1 where the target is a
    completion token that counts: EOS included, padding and masked truncations excluded)."""
    rows = [list(p) + list(c.token_ids) + ([eos_id] if c.finish_reason == "stop" else [])
            for p, c in zip(prompts, completions)]
    T = max(len(r) for r in rows)
    seqs = torch.tensor([r + [pad_id] * (T - len(r)) for r in rows], dtype=torch.long)  # one tensor, not one per row
    start = torch.tensor([len(p) for p in prompts])[:, None]  # the first completion token
    end = torch.tensor([len(r) for r in rows])[:, None]
    truncated = torch.tensor([c.finish_reason == "length" for c in completions])
    target = torch.arange(1, T)[None]  # target position t predicts token t + 1
    mask = ((target >= start) & (target < end)).float()
    if mask_truncated:
        mask[truncated] = 0.0
    return seqs, mask, truncated


def sampler_logprobs(prompts: list[list[int]], completions, width: int) -> torch.Tensor:
    """The log-prob each completion token (and its EOS) was sampled with, laid out like build_batch's
    mask: [N, width], row i's token t + 1 at position t, 0 elsewhere."""
    old = torch.zeros(len(prompts), width)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if c.finish_reason == "stop" and c.stop_logprob is None:
            raise ValueError("sampler_logprobs: a completion ended by a stop string has no EOS log-prob "
                             "(GRPO's rollouts end at EOS or the token limit)")
        lps = list(c.logprobs) + ([c.stop_logprob] if c.finish_reason == "stop" else [])
        old[i, len(p) - 1:len(p) - 1 + len(lps)] = torch.tensor(lps)
    return old


@dataclass
class Rollouts:
    """One step's sampled completions, their rewards and the training batch built from them."""
    problems: list
    comps: list
    scores: list
    rewards: torch.Tensor  # [P, G]
    informative: torch.Tensor  # [P] groups whose rewards differ
    seqs: torch.Tensor  # [N, T] prompt + completion rows
    mask: torch.Tensor  # [N, T-1] completion targets that count (uninformative groups zeroed)
    truncated: torch.Tensor  # [N]
    weights: torch.Tensor  # [N, T-1] the loss variant's token weights
    adv: torch.Tensor  # [N]
    rows: list[int]  # the rows that enter the update (a masked truncation carries no gradient)
    old: torch.Tensor | None  # [N, T-1] the sampler's log-probs (overlap mode), else None
    gen_s: float


class GRPOTrainer:
    """One GRPO run's state and its phases. Built from `args` (and optionally a model and tokenizer
    already in memory); resumes from the newest checkpoint in args.out when args.resume."""

    def __init__(self, args: GRPOArgs, model=None, tokenizer=None):
        a = self.args = args.validate()
        device = self.device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        precision = a.precision or ("bf16" if device.type == "cuda" else "fp32")
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
        self.threads = torch.get_num_threads()
        if a.overlap and (device.type != "cpu" or precision != "fp32" or self.threads < 2):
            raise ValueError(f"--overlap: for CPU runs in fp32 on 2+ threads (rollouts and updates on separate cores, "
                             f"the sampler's log-probs as pi_old); got {device.type}, {precision}, {self.threads} thread(s)")
        torch.manual_seed(a.seed)
        self.resume_dir = resume_point(a.out, a.resume, quiet=not a.progress)
        if model is None:
            model = DeepSeekV3.from_pretrained(a.model, dtype=torch.float32, device=device)
        self.model = model
        self.tokenizer = tokenizer = tokenizer or Tokenizer.from_dir(a.model)
        self.task = a.task if isinstance(a.task, Task) else get_task(a.task, a.task_data)
        self.eps_high = a.eps_high if a.eps_high is not None else (0.28 if a.loss == "dapo" else a.eps)
        self.ref = copy.deepcopy(model).eval().requires_grad_(False) if a.beta > 0 else None  # the starting policy
        state = self.resumed = load_trainer_state(self.resume_dir) if self.resume_dir else None
        if self.resume_dir:
            model.load_state_dict(DeepSeekV3.from_pretrained(self.resume_dir, dtype=torch.float32,
                                                             device=device).state_dict())
        os.makedirs(a.out, exist_ok=True)

        self.stream = self.task.stream(seed=a.seed)
        for _ in range(state["step"] * a.prompts_per_step if state else 0):  # the problems already trained on
            next(self.stream)
        self.pending = [next(self.stream) for _ in range(a.prompts_per_step)]
        longest = max(len(p) for p in encode_prompts(tokenizer, self.pending, a.chat))
        # overlap: the sampler works on its own copy of the weights, refreshed after every update
        self.sampler = copy.deepcopy(model).eval().requires_grad_(False) if a.overlap else model
        self.engine = Engine(self.sampler, tokenizer, max_context=2 * longest + a.max_new_tokens + 8,
                             max_batch=a.prompts_per_step * a.group_size, device=device)
        self.eval_split = "val" if self.task.has_split("val") else "test"  # settings are compared on val where there is one
        self.eval_set = self.task.problems(self.eval_split, a.eval_problems) if a.eval_every else []

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=a.lr, betas=(a.beta1, a.beta2), weight_decay=a.weight_decay,
                                     fused=device.type == "cuda")
        if state:
            self.opt.load_state_dict(state["optimizer"])
        self.log = MetricsLog(os.path.join(a.out, "metrics.jsonl"), True, state["step"] if state else 0)
        self.step, self.loop_s = 0, 0.0
        self.totals = {"zero_variance_groups": 0, "skipped_steps": 0, "rollout_tokens": 0, "gen_s": 0.0}
        if state:
            self.loop_s, self.step, self.totals = state["loop_s"], state["step"], dict(state["totals"])

    # ------------------------------------------------------------------ phases
    def next_problems(self) -> list:
        """The next step's prompts from the task's stream (the first batch was drawn at start-up)."""
        problems, self.pending = self.pending or [next(self.stream) for _ in range(self.args.prompts_per_step)], None
        return problems

    def rollout(self, step: int, problems: list) -> Rollouts:
        """P x G completions from the engine, scored by the verifier, as a training batch."""
        a, tokenizer = self.args, self.tokenizer
        t0 = time.time()
        prompts = encode_prompts(tokenizer, problems, a.chat)
        self.sampler.eval()
        torch.manual_seed(a.seed * 1_000_003 + step)
        rep = [p for p in prompts for _ in range(a.group_size)]
        comps = self.engine.generate(rep, SamplingParams(max_tokens=a.max_new_tokens, temperature=a.temperature,
                                                          top_p=a.top_p,
                                                          logprob_mode="sampled" if a.overlap else "raw"))
        gen_s = time.time() - t0
        scores = check_all(self.task, [p for p in problems for _ in range(a.group_size)], [c.text for c in comps])
        rewards = torch.tensor([score_reward(s, a.reward, a.format_weight)
                                for s in scores]).view(a.prompts_per_step, a.group_size)
        adv, informative = group_advantages(rewards, scale=a.scale_rewards)
        keep = informative.repeat_interleave(a.group_size)  # [P*G]
        seqs, mask, truncated = build_batch(rep, comps, tokenizer.eos_id, tokenizer.pad_id or 0, a.mask_truncated)
        mask = mask * keep[:, None].float()
        return Rollouts(problems, comps, scores, rewards, informative, seqs, mask, truncated,
                        token_weights(mask, a.loss, max_len=a.max_new_tokens + 1), adv.reshape(-1),
                        mask.any(1).nonzero()[:, 0].tolist(),  # informative rows with a counted token
                        sampler_logprobs(rep, comps, mask.shape[1]) if a.overlap else None, gen_s)

    def lr(self, step: int) -> float:
        a = self.args
        return grpo_lr(step, a.lr, a.warmup_steps, a.max_steps, a.min_lr_ratio,
                       self.loop_s / a.max_seconds if a.max_seconds else None)

    def update(self, batch: Rollouts, step: int) -> tuple[dict, float, float]:
        """The policy update(s) on one batch of rollouts -> (stats of the first pass, grad norm, lr)."""
        a, model, device, autocast = self.args, self.model, self.device, self.autocast
        model.train()
        lr = self.lr(step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        stats = {"clip_fraction": 0.0, "kl": 0.0, "entropy": float("nan"), "loss": 0.0}
        grad_norm = float("nan")
        rows = batch.rows
        if not rows:
            self.totals["skipped_steps"] += 1
            return stats, grad_norm, lr
        seqs_d, mask_d, w_d, adv_d = (batch.seqs[rows].to(device), batch.mask[rows].to(device),
                                      batch.weights[rows].to(device), batch.adv[rows].to(device))
        n_chunks = -(-len(rows) // a.micro_batch)  # equal chunks: no small tail pass paying full per-op costs
        bounds = [len(rows) * j // n_chunks for j in range(n_chunks + 1)]
        chunks = [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]
        with torch.no_grad():
            if batch.old is not None:  # off-policy: pi_old is the sampler that drew the tokens
                old = [batch.old[rows][c].to(device) for c in chunks]
            else:  # on-policy: pi_old is the policy before this batch's first optimizer step
                old = ([completion_logprobs(model, seqs_d[c], a.temperature, autocast)[0] for c in chunks]
                       if a.mu > 1 else None)
            refs = ([completion_logprobs(self.ref, seqs_d[c], a.temperature, autocast)[0] for c in chunks]
                    if self.ref is not None else None)
        for it in range(a.mu):
            acc = {"clip_fraction": 0.0, "kl": 0.0, "entropy": 0.0, "loss": 0.0}
            wsum = float(w_d.sum())
            for j, c in enumerate(chunks):
                logp, ent = completion_logprobs(model, seqs_d[c], a.temperature, autocast, entropy=it == 0)
                old_lp = old[j] if old is not None else logp.detach()
                loss, st = policy_loss(logp, old_lp, adv_d[c], w_d[c], a.eps, self.eps_high, a.beta,
                                       refs[j] if refs is not None else None)
                loss.backward()
                share = float(w_d[c].sum()) / max(wsum, 1e-12)
                acc["clip_fraction"] += st["clip_fraction"] * share
                acc["kl"] += st.get("kl", 0.0) * share
                if ent is not None:
                    acc["entropy"] += float((ent * mask_d[c]).sum())
                acc["loss"] += loss.item()
            acc["entropy"] /= max(float(mask_d.sum()), 1.0)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, a.grad_clip))
            if math.isfinite(grad_norm):
                self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if it == 0:
                stats = acc
        return stats, grad_norm, lr

    @torch.no_grad()
    def refresh_sampler(self) -> None:
        """Overlap: the sampler moves to the updated weights (for the step after next)."""
        for dst, src in zip(self.sampler.state_dict().values(), self.model.state_dict().values()):
            dst.copy_(src)

    # ------------------------------------------------------------------ bookkeeping
    def record(self, batch: Rollouts, stats: dict, grad_norm: float, lr: float, dt: float) -> dict:
        """Count the finished step and write its metrics line."""
        self.loop_s += dt
        self.step += 1
        comps, scores, informative = batch.comps, batch.scores, batch.informative
        n_tokens = sum(c.completion_tokens for c in comps)
        self.totals["rollout_tokens"] += n_tokens
        self.totals["gen_s"] += batch.gen_s
        self.totals["zero_variance_groups"] += int((~informative).sum())
        rec = {"step": self.step, "reward_mean": float(batch.rewards.mean()), "reward_std": float(batch.rewards.std()),
               "accuracy": sum(s.correct for s in scores) / len(scores),
               "accuracy_strict": sum(s.strict for s in scores) / len(scores),
               "format": sum(s.format for s in scores) / len(scores),
               "completion_length": n_tokens / len(comps), "truncated": float(batch.truncated.float().mean()),
               "groups_informative": int(informative.sum()), "groups_zero_variance": int((~informative).sum()),
               "kl": stats["kl"], "clip_fraction": stats["clip_fraction"], "entropy": stats["entropy"],
               "loss": stats["loss"], "grad_norm": grad_norm, "lr": lr,
               "gen_s": batch.gen_s, "step_s": dt, "rollout_tokens_per_s": n_tokens / max(batch.gen_s, 1e-9),
               "elapsed_s": self.loop_s}
        self.log.write(rec)
        return rec

    def progress(self) -> float:
        """The share of the run done: of its steps, or of its time budget if that is further along."""
        a = self.args
        return max(self.step / a.max_steps, self.loop_s / a.max_seconds if a.max_seconds else 0.0)

    def evaluate_held_out(self) -> None:
        """Greedy held-out accuracy, logged at the current step."""
        self.model.eval()
        res = evaluate(self.engine, self.task, self.eval_set, k=0, max_new_tokens=self.args.max_new_tokens,
                       chat=self.args.chat)
        self.log.write({"step": self.step, "eval_split": self.eval_split, "eval_accuracy": res["accuracy"],
                        "eval_accuracy_strict": res["accuracy_strict"]})

    def save(self) -> None:
        """A resumable checkpoint: model, optimizer, the clock and the counters."""
        save_checkpoint(self.args.out, self.step, self.model, self.opt, self.tokenizer,
                        {"loop_s": self.loop_s, "totals": self.totals}, self.args.keep_last)

    def finish(self) -> dict:
        """Close the engine and the log, save the final model and plot; the run's summary."""
        a = self.args
        self.engine.close()
        self.model.eval()
        self.log.close()
        summary = {"steps": self.step, "seconds": round(self.loop_s, 2), "task": self.task.name, "loss_type": a.loss,
                   "rollout_tokens_per_s": self.totals["rollout_tokens"] / max(self.totals["gen_s"], 1e-9),
                   "zero_variance_groups": self.totals["zero_variance_groups"],
                   "skipped_steps": self.totals["skipped_steps"],
                   "resumed_from_step": self.resumed["step"] if self.resumed else 0,
                   "out": a.out}
        recs = [json.loads(line) for line in open(os.path.join(a.out, "metrics.jsonl")) if line.strip()]
        last = [r for r in recs if "reward_mean" in r][-10:]
        if last:
            summary["reward_mean_last10"] = sum(r["reward_mean"] for r in last) / len(last)
        if a.save:
            self.model.save_pretrained(a.out)
            self.tokenizer.save(a.out)
        summary["plots"] = plot_grpo(a.out)
        atomic_write_text(os.path.join(a.out, "final.json"), json.dumps(summary) + "\n")
        if a.json:
            print(json.dumps(summary), flush=True)
        return summary


def grpo(args: GRPOArgs, model=None, tokenizer=None, on_step: Callable[[float], None] | None = None) -> dict:
    """Run GRPO from args.model (or the given model/tokenizer); returns the final summary.
    `on_step(progress)` is called after every step with the share of the run done (e.g. for a job
    that follows this one's clock)."""
    trainer = GRPOTrainer(args, model, tokenizer)
    a = trainer.args
    half = trainer.threads // 2  # overlap: the sampler's threads; the update keeps the rest
    say(f"nanoseek grpo: {trainer.model.num_params() / 1e6:.2f}M parameters on {trainer.device}, task {a.task}, "
        f"{a.prompts_per_step} prompts x {a.group_size} samples, loss {a.loss}, lr {a.lr:g}, beta {a.beta:g}, "
        f"T {a.temperature:g}, reward {a.reward}"
        + (f"; rollouts overlapped with updates ({half} + {trainer.threads - half} threads)" if a.overlap else ""),
        quiet=not a.progress)
    pbar = None
    if a.progress:
        from tqdm import tqdm
        pbar = tqdm(total=a.max_steps, desc="grpo", dynamic_ncols=True, file=sys.stderr, disable=None)
    if trainer.resumed:
        say(f"resumed from {trainer.resume_dir} (step {trainer.step})", quiet=not a.progress)
        if pbar is not None:
            pbar.update(trainer.step)

    def after_step(rec: dict) -> None:
        if on_step is not None:
            on_step(trainer.progress())
        if pbar is not None:
            pbar.update(1)
            pbar.set_postfix(reward=f"{rec['reward_mean']:.3f}", acc=f"{rec['accuracy']:.2f}",
                             len=f"{rec['completion_length']:.0f}", kept=rec["groups_informative"])
        if a.eval_every and trainer.step % a.eval_every == 0:
            trainer.evaluate_held_out()
        if a.save and a.save_every and trainer.step % a.save_every == 0:
            trainer.save()

    run_steps(trainer, after_step, rollout_threads=half if a.overlap else None)
    if pbar is not None:
        pbar.close()
    return trainer.finish()


