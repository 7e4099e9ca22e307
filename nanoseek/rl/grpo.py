"""GRPO trainer (DeepSeekMath section 4.1.2 and Algorithm 1; DeepSeek-R1 section 2.2): for each
prompt, G completions sampled by the batched KV-cache engine, scored by a task's rule-based
verifier; group-relative advantages; the clipped-ratio objective for mu inner iterations with an
optional k3 KL penalty to a frozen reference; no value network.

Per step it logs reward mean/std, rollout accuracy, KL, clip fraction, completion length,
entropy, informative and zero-variance groups and truncations to metrics.jsonl, and draws
grpo.png. `--max-seconds` bounds the loop's wall time (evaluations excluded), so a run can be
compared with the same time spent another way.

`--overlap` (CPU): the next step's rollouts are sampled on half of the threads while the policy
update runs on the other half, from a copy of the weights one step old (one-step off-policy, as in
asynchronous RL trainers); the importance ratio then uses the log-probs the sampler drew each token
with (temperature applied) as pi_old, so the clipped objective corrects for the lag. A step costs
about max(rollouts, update) instead of their sum.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from ..engine import Engine, SamplingParams
from ..io import atomic_write_text
from ..model import DeepSeekV3
from ..tasks import Task, evaluate, get_task
from ..tasks.base import check_all, score_reward
from ..tasks.evaluate import encode_prompts
from ..tokenizer import Tokenizer
from ..train.checkpointing import load_trainer_state, resume_point, save_checkpoint
from ..train.metrics import MetricsLog, plot_grpo, say as _say
from ..train.schedule import grpo_lr
from .objective import LOSS_TYPES, group_advantages, policy_loss, token_weights


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


def grpo(args: GRPOArgs, model=None, tokenizer=None, on_step: Callable[[float], None] | None = None) -> dict:
    """Run GRPO from args.model (or the given model/tokenizer); returns the final summary.
    `on_step(progress)` is called after every step with the share of the run done (e.g. for a job
    that follows this one's clock)."""
    a = args.validate()
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = a.precision or ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    threads = torch.get_num_threads()
    if a.overlap and (device.type != "cpu" or precision != "fp32" or threads < 2):
        raise ValueError(f"--overlap: for CPU runs in fp32 on 2+ threads (rollouts and updates on separate cores, "
                         f"the sampler's log-probs as pi_old); got {device.type}, {precision}, {threads} thread(s)")
    torch.manual_seed(a.seed)
    resume_dir = resume_point(a.out, a.resume, quiet=not a.progress)
    if model is None:
        model = DeepSeekV3.from_pretrained(a.model, dtype=torch.float32, device=device)
    tokenizer = tokenizer or Tokenizer.from_dir(a.model)
    task = a.task if isinstance(a.task, Task) else get_task(a.task, a.task_data)
    eps_high = a.eps_high if a.eps_high is not None else (0.28 if a.loss == "dapo" else a.eps)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if a.beta > 0 else None  # the starting policy
    state = load_trainer_state(resume_dir) if resume_dir else None
    if resume_dir:
        model.load_state_dict(DeepSeekV3.from_pretrained(resume_dir, dtype=torch.float32, device=device).state_dict())
    os.makedirs(a.out, exist_ok=True)

    stream = task.stream(seed=a.seed)
    for _ in range(state["step"] * a.prompts_per_step if state else 0):  # the problems already trained on
        next(stream)
    first = [next(stream) for _ in range(a.prompts_per_step)]
    longest = max(len(p) for p in encode_prompts(tokenizer, first, a.chat))
    # overlap: the sampler works on its own copy of the weights, refreshed after every update
    sampler = copy.deepcopy(model).eval().requires_grad_(False) if a.overlap else model
    engine = Engine(sampler, tokenizer, max_context=2 * longest + a.max_new_tokens + 8,
                    max_batch=a.prompts_per_step * a.group_size, device=device)
    eval_split = "val" if task.has_split("val") else "test"  # settings are compared on val where there is one
    eval_set = task.problems(eval_split, a.eval_problems) if a.eval_every else []

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(a.beta1, a.beta2), weight_decay=a.weight_decay,
                            fused=device.type == "cuda")
    if state:
        opt.load_state_dict(state["optimizer"])
    log = MetricsLog(os.path.join(a.out, "metrics.jsonl"), True, state["step"] if state else 0)
    half = threads // 2  # overlap: the sampler's threads; the update keeps the rest
    _say(f"nanoseek grpo: {model.num_params() / 1e6:.2f}M parameters on {device}, task {a.task}, "
         f"{a.prompts_per_step} prompts x {a.group_size} samples, loss {a.loss}, lr {a.lr:g}, beta {a.beta:g}, "
         f"T {a.temperature:g}, reward {a.reward}"
         + (f"; rollouts overlapped with updates ({half} + {threads - half} threads)" if a.overlap else ""),
         quiet=not a.progress)
    pbar = None
    if a.progress:
        from tqdm import tqdm
        pbar = tqdm(total=a.max_steps, desc="grpo", dynamic_ncols=True, file=sys.stderr, disable=None)

    def run_eval(step: int) -> None:
        model.eval()
        res = evaluate(engine, task, eval_set, k=0, max_new_tokens=a.max_new_tokens, chat=a.chat)
        log.write({"step": step, "eval_split": eval_split, "eval_accuracy": res["accuracy"],
                   "eval_accuracy_strict": res["accuracy_strict"]})

    def collect(step: int, problems: list) -> Rollouts:
        """Rollouts: P x G completions from the engine, scored, as a training batch."""
        t0 = time.time()
        prompts = encode_prompts(tokenizer, problems, a.chat)
        sampler.eval()
        torch.manual_seed(a.seed * 1_000_003 + step)
        rep = [p for p in prompts for _ in range(a.group_size)]
        comps = engine.generate(rep, SamplingParams(max_tokens=a.max_new_tokens, temperature=a.temperature,
                                                     top_p=a.top_p, logprob_mode="sampled" if a.overlap else "raw"))
        gen_s = time.time() - t0
        scores = check_all(task, [p for p in problems for _ in range(a.group_size)], [c.text for c in comps])
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

    def update(ro: Rollouts, step: int) -> tuple[dict, float, float]:
        """The policy update(s) on one batch of rollouts -> (stats of the first pass, grad norm, lr)."""
        model.train()
        lr = grpo_lr(step, a.lr, a.warmup_steps, a.max_steps, a.min_lr_ratio,
                     loop_s / a.max_seconds if a.max_seconds else None)
        for g in opt.param_groups:
            g["lr"] = lr
        stats = {"clip_fraction": 0.0, "kl": 0.0, "entropy": float("nan"), "loss": 0.0}
        grad_norm = float("nan")
        rows = ro.rows
        if not rows:
            totals["skipped_steps"] += 1
            return stats, grad_norm, lr
        seqs_d, mask_d, w_d, adv_d = (ro.seqs[rows].to(device), ro.mask[rows].to(device),
                                      ro.weights[rows].to(device), ro.adv[rows].to(device))
        n_chunks = -(-len(rows) // a.micro_batch)  # equal chunks: no small tail pass paying full per-op costs
        bounds = [len(rows) * j // n_chunks for j in range(n_chunks + 1)]
        chunks = [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]
        with torch.no_grad():
            if ro.old is not None:  # off-policy: pi_old is the sampler that drew the tokens
                old = [ro.old[rows][c].to(device) for c in chunks]
            else:  # on-policy: pi_old is the policy before this batch's first optimizer step
                old = ([completion_logprobs(model, seqs_d[c], a.temperature, autocast)[0] for c in chunks]
                       if a.mu > 1 else None)
            refs = ([completion_logprobs(ref, seqs_d[c], a.temperature, autocast)[0] for c in chunks]
                    if ref is not None else None)
        for it in range(a.mu):
            acc = {"clip_fraction": 0.0, "kl": 0.0, "entropy": 0.0, "loss": 0.0}
            wsum = float(w_d.sum())
            for j, c in enumerate(chunks):
                logp, ent = completion_logprobs(model, seqs_d[c], a.temperature, autocast, entropy=it == 0)
                old_lp = old[j] if old is not None else logp.detach()
                loss, st = policy_loss(logp, old_lp, adv_d[c], w_d[c], a.eps, eps_high, a.beta,
                                       refs[j] if refs is not None else None)
                loss.backward()
                share = float(w_d[c].sum()) / max(wsum, 1e-12)
                acc["clip_fraction"] += st["clip_fraction"] * share
                acc["kl"] += st.get("kl", 0.0) * share
                if ent is not None:
                    acc["entropy"] += float((ent * mask_d[c]).sum())
                acc["loss"] += loss.item()
            acc["entropy"] /= max(float(mask_d.sum()), 1.0)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, a.grad_clip))
            if math.isfinite(grad_norm):
                opt.step()
            opt.zero_grad(set_to_none=True)
            if it == 0:
                stats = acc
        return stats, grad_norm, lr

    loop_s, step, totals = 0.0, 0, {"zero_variance_groups": 0, "skipped_steps": 0, "rollout_tokens": 0, "gen_s": 0.0}
    if state:
        loop_s, step, totals = state["loop_s"], state["step"], dict(state["totals"])
        _say(f"resumed from {resume_dir} (step {step})", quiet=not a.progress)
        if pbar is not None:
            pbar.update(step)
    pending = first

    def next_problems() -> list:
        nonlocal pending
        problems, pending = pending or [next(stream) for _ in range(a.prompts_per_step)], None
        return problems

    # overlap: one worker thread samples step t+1 on `half` threads while this one updates on step t
    # with the rest. When the loop stops on --max-seconds, the batch sampled ahead goes unused (its
    # time counts in the last step); on an error, shutdown waits for the batch in flight.
    worker = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(half,)) if a.overlap else None
    if worker is not None:
        torch.set_num_threads(threads - half)
    ready: Rollouts | None = None
    try:
        while step < a.max_steps and (a.max_seconds is None or loop_s < a.max_seconds):
            t0 = time.time()
            ro = ready or collect(step, next_problems())
            ahead = worker.submit(collect, step + 1, next_problems()) if worker and step + 1 < a.max_steps else None
            stats, grad_norm, lr = update(ro, step)
            ready = ahead.result() if ahead is not None else None
            if worker is not None:  # the sampler moves to the updated weights for the step after next
                with torch.no_grad():
                    for dst, src in zip(sampler.state_dict().values(), model.state_dict().values()):
                        dst.copy_(src)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0
            loop_s += dt
            step += 1
            comps, scores, informative = ro.comps, ro.scores, ro.informative
            n_tokens = sum(c.completion_tokens for c in comps)
            totals["rollout_tokens"] += n_tokens
            totals["gen_s"] += ro.gen_s
            totals["zero_variance_groups"] += int((~informative).sum())
            rec = {"step": step, "reward_mean": float(ro.rewards.mean()), "reward_std": float(ro.rewards.std()),
                   "accuracy": sum(s.correct for s in scores) / len(scores),
                   "accuracy_strict": sum(s.strict for s in scores) / len(scores),
                   "format": sum(s.format for s in scores) / len(scores),
                   "completion_length": n_tokens / len(comps), "truncated": float(ro.truncated.float().mean()),
                   "groups_informative": int(informative.sum()), "groups_zero_variance": int((~informative).sum()),
                   "kl": stats["kl"], "clip_fraction": stats["clip_fraction"], "entropy": stats["entropy"],
                   "loss": stats["loss"], "grad_norm": grad_norm, "lr": lr,
                   "gen_s": ro.gen_s, "step_s": dt, "rollout_tokens_per_s": n_tokens / max(ro.gen_s, 1e-9),
                   "elapsed_s": loop_s}
            log.write(rec)
            if on_step is not None:
                on_step(max(step / a.max_steps, loop_s / a.max_seconds if a.max_seconds else 0.0))
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(reward=f"{rec['reward_mean']:.3f}", acc=f"{rec['accuracy']:.2f}",
                                 len=f"{rec['completion_length']:.0f}", kept=rec["groups_informative"])
            if a.eval_every and step % a.eval_every == 0:
                run_eval(step)
            if a.save and a.save_every and step % a.save_every == 0:
                save_checkpoint(a.out, step, model, opt, tokenizer, {"loop_s": loop_s, "totals": totals}, a.keep_last)
    finally:
        if worker is not None:
            worker.shutdown(wait=True)
            torch.set_num_threads(threads)
    if pbar is not None:
        pbar.close()
    engine.close()
    model.eval()
    log.close()
    summary = {"steps": step, "seconds": round(loop_s, 2), "task": task.name, "loss_type": a.loss,
               "rollout_tokens_per_s": totals["rollout_tokens"] / max(totals["gen_s"], 1e-9),
               "zero_variance_groups": totals["zero_variance_groups"], "skipped_steps": totals["skipped_steps"],
               "resumed_from_step": state["step"] if state else 0,
               "out": a.out}
    recs = [json.loads(line) for line in open(os.path.join(a.out, "metrics.jsonl")) if line.strip()]
    last = [r for r in recs if "reward_mean" in r][-10:]
    if last:
        summary["reward_mean_last10"] = sum(r["reward_mean"] for r in last) / len(last)
    if a.save:
        model.save_pretrained(a.out)
        tokenizer.save(a.out)
    summary["plots"] = plot_grpo(a.out)
    atomic_write_text(os.path.join(a.out, "final.json"), json.dumps(summary) + "\n")
    if a.json:
        print(json.dumps(summary), flush=True)
    return summary
