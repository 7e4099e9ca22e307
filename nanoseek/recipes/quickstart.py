"""The quickstart (`nanoseek quickstart`): the whole DeepSeek-R1 story on a laptop CPU (about 9
minutes on 2 cores).

1. generate Countdown problems (a held-out test set of 500 that training never sees);
2. train a byte-level BPE tokenizer (digits kept apart) on the worked solutions;
3. pretrain a nano-sized DeepSeek-V3 (MLA + DeepSeekMoE with auxiliary-loss-free balancing) on
   them for a fixed time;
4. measure held-out greedy accuracy and pass@8;
5. GRPO with the rule-based verifier only (no demonstrations) for a fixed number of steps; measure
   again;
6. the honest control: more supervised training from the same checkpoint for exactly as long as
   GRPO ran, measured the same way (`--no-control` skips it; `--json` always runs it). On a CPU
   it runs next to GRPO on the other half of the threads, following GRPO's progress through a
   pace file (same wall time, same share of the machine; on 2 cores GRPO and the control get one
   core each, ~140 s faster than one after the other); on a GPU, or with `--control-after`, it
   runs after GRPO on the same device;
7. put the RL model into the local model store and say how to chat with it and serve it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

from ..data import resolve_sources
from ..infer.engine import Engine
from ..io import atomic_write_text
from ..model import DeepSeekV3
from .pace import read_pace, write_pace
from ..rl import GRPOArgs, grpo
from ..infer.store import Store
from ..tasks import evaluate, get_task
from ..tokenizer import BOS, Tokenizer, train_bpe
from ..train import TrainArgs, train

# The quickstart model: the nano preset made narrower so that it trains at ~10K tokens/s on 2 CPU
# cores. Still the full architecture: MLA (latent KV), a dense first layer, then DeepSeekMoE with
# sigmoid routing, a shared expert and the bias-based (auxiliary-loss-free) balancing.
QUICKSTART_MODEL = dict(hidden_size=128, intermediate_size=384, moe_intermediate_size=128, num_attention_heads=4,
                        q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                        n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                        max_position_embeddings=256)
# Chat turns are rendered as the raw task prompt (the model was never taught a dialogue format), so
# `nanoseek chat` and the server's chat endpoints work on it too.
CHAT_TEMPLATE = "{{ bos_token }}{{ (messages | selectattr('role', 'equalto', 'user') | list)[-1]['content'] }}"


@dataclass
class Recipe:
    """The quickstart's fixed budgets (steps, so results do not depend on the machine's speed) and
    the settings of our CPU sweeps (dev/LOG.md): small pretraining batches (the model needs steps
    more than tokens), a constant RL learning rate 40x below the pretraining one, and Countdown with
    3 numbers, where a few minutes of pretraining leave pass@8 far above pass@1. Settings are
    compared on the validation set; the test set is only reported."""
    n_numbers: int = 3
    # a validation set, disjoint from the test set and from training, on which recipes are compared
    # (dev/sweeps/sweep_rl.py); the test set is for the final report alone
    val_problems: int = 250
    train_problems: int = 80_000  # worked solutions written for pretraining (and the control)
    pretrain_steps: int = 800
    batch_size: int = 16
    seq_len: int = 128
    pretrain_lr: float = 2e-3
    rl_steps: int = 200
    # far below the pretraining lr (binary rewards make noisy gradients), constant after the warm-up:
    # chosen on the validation set over a cosine decay from 8e-5 (benchmarks/RESULTS.md, 2026-12-07)
    rl_lr: float = 5e-5
    rl_warmup: int = 10
    rl_min_lr_ratio: float = 1.0  # after the warm-up: cosine decay to rl_lr * this (1: constant)
    rl_mu: int = 1  # optimizer steps per batch of rollouts (2 for the same time lost: dev/LOG.md)
    prompts_per_step: int = 32
    group_size: int = 8
    temperature: float = 0.7
    loss: str = "dapo"
    reward: str = "strict"  # the answer and every worked step checked (lenient: the answer alone)
    # CPU: sample each GRPO step's rollouts during the previous step's update, on half of the threads
    # each (one step off-policy); the control then runs after GRPO, which makes the whole run longer
    # than with the control alongside, so opt-in (benchmarks/RESULTS.md, "--overlap")
    overlap: bool = False
    rl_eval_every: int = 0  # also measure held-out greedy accuracy every N GRPO steps (grpo/metrics.jsonl)
    control_lr: float = 1e-3
    max_new_tokens: int = 40
    dense: bool = False  # dense FFN in every layer instead of DeepSeekMoE (for comparison)
    # scaling the recipe up (benchmarks/bench_grpo_scale.py): a bigger model, English text mixed into
    # pretraining, and wall-clock budgets (the step counts above then act as caps)
    model: dict | None = None  # overrides on QUICKSTART_MODEL (and the nano preset)
    text: tuple[str, ...] = ()  # extra pretraining sources (text files or folders)
    tokenizer_size: int = 300
    pretrain_seconds: float | None = None
    rl_seconds: float | None = None
    eval_context: int = 96


# `nanoseek quickstart --smoke`: every stage of the main job for a few steps (about a minute on 2
# cores), to check an install or a change end to end; its accuracies mean nothing.
SMOKE = dict(train_problems=2000, pretrain_steps=30, rl_steps=3, prompts_per_step=8, group_size=4, max_new_tokens=32)
SMOKE_EVAL_PROBLEMS = 32


def _log(msg: str) -> None:
    print(f"[quickstart] {msg}", file=sys.stderr, flush=True)


def write_task_data(task, path: str, n: int, bos: str) -> int:
    """n training problems as a jsonl of worked solutions (prompt + solution after BOS)."""
    rows, seed = [], 0
    while len(rows) < n:
        rows += [json.dumps({"text": bos + p.prompt + p.solution}) for p in task.problems("train", seed=seed)]
        seed += 1
    atomic_write_text(path, "\n".join(rows[:n]) + "\n")
    return n


def _budget(steps: int, seconds: float | None) -> str:
    return f"{seconds:g} s (at most {steps} steps)" if seconds else f"{steps} steps"


def _text_sample(sources, n_chars: int) -> list[str]:
    """Up to n_chars of the extra pretraining text, in 2,000-character pieces, for the tokenizer."""
    pieces, left = [], n_chars
    for path in resolve_sources(list(sources)) if sources else []:
        text = open(path, encoding="utf-8", errors="replace").read(left)
        pieces += [text[i:i + 2000] for i in range(0, len(text), 2000)]
        left -= len(text)
        if left <= 0:
            break
    return pieces


def measure(model_dir: str, task, problems, k: int, max_new_tokens: int, device: str | None = None,
            max_context: int = 96) -> dict:
    model = DeepSeekV3.from_pretrained(model_dir, device=device)
    engine = Engine(model, Tokenizer.from_dir(model_dir), max_context=max_context, max_batch=512)
    try:
        return evaluate(engine, task, problems, k=k, temperature=1.0, max_new_tokens=max_new_tokens, seed=0)
    finally:
        engine.close()


def task_spec(rc: Recipe, eval_problems: int) -> str:
    """The quickstart's task: Countdown with a test set of `eval_problems` and the validation set."""
    return f"countdown:n_numbers={rc.n_numbers},test_size={eval_problems},val_size={rc.val_problems}"


def rl_args(rc: Recipe, model_dir: str, out: str, seed: int, eval_problems: int, **extra):
    """The quickstart's GRPO settings for `nanoseek.rl.grpo` (extra: GRPOArgs fields)."""
    return GRPOArgs(model=model_dir, task=task_spec(rc, eval_problems), out=out,
                    max_steps=rc.rl_steps, prompts_per_step=rc.prompts_per_step, group_size=rc.group_size,
                    temperature=rc.temperature, max_new_tokens=rc.max_new_tokens, lr=rc.rl_lr,
                    warmup_steps=rc.rl_warmup, min_lr_ratio=rc.rl_min_lr_ratio, mu=rc.rl_mu, loss=rc.loss, beta=0.0,
                    reward=rc.reward, max_seconds=rc.rl_seconds, seed=seed, eval_every=rc.rl_eval_every,
                    eval_problems=eval_problems, **extra)


def control_train(spec: dict) -> dict:
    """The control's training: more supervised training from the pretrained checkpoint (for
    `max_seconds`, or for as long as the job writing `pace_file` runs: its lr schedule follows
    that job's progress and it stops when that reaches 1, nanoseek/recipes/pace.py)."""
    pace_file = spec["pace_file"]
    return train(TrainArgs(data=[spec["data"]], out=spec["out"], model=spec["model"], lr=spec["lr"], warmup_steps=50,
                           min_lr_ratio=0.1, max_steps=100_000, max_seconds=spec.get("max_seconds"),
                           seed=spec["seed"], **spec["common"]),
                 follow=(lambda: read_pace(pace_file)) if pace_file else None)


def _control_job(spec: dict) -> dict:
    """The control (`control_train`), then the same evaluation as GRPO's."""
    ctl = control_train(spec)
    task = get_task(spec["task"])
    c = measure(spec["out"], task, task.problems("test"), spec["k"], spec["max_new"], spec["device"], spec["eval_context"])
    return {**c, "seconds": ctl["seconds"], "steps": ctl["step"]}


def _control_process(spec: dict) -> None:
    """`_control_job` in a child process on `spec["threads"]` threads; output to control/log.txt,
    results to control/result.json."""
    import torch
    os.makedirs(spec["out"], exist_ok=True)
    sys.stdout = sys.stderr = open(os.path.join(spec["out"], "log.txt"), "w", buffering=1)
    torch.set_num_threads(spec["threads"])
    result = _control_job(spec)
    atomic_write_text(os.path.join(spec["out"], "result.json"), json.dumps(result) + "\n")


def _read_control(ctl_dir: str, exitcode: int | None) -> dict:
    path = os.path.join(ctl_dir, "result.json")
    if exitcode != 0 or not os.path.isfile(path):
        log = os.path.join(ctl_dir, "log.txt")
        tail = open(log).read()[-1500:] if os.path.isfile(log) else "(no log)"
        raise RuntimeError(f"quickstart: the control run failed (exit code {exitcode}); {log}:\n{tail}")
    return json.load(open(path))


def train_common(rc: Recipe, tok_dir: str, progress: bool = True, device: str | None = None) -> dict:
    """The TrainArgs that pretraining and the control share."""
    return dict(tokenizer=tok_dir, preset="nano", batch_size=rc.batch_size, seq_len=rc.seq_len, weight_decay=0.1,
                eval_every=0, eval_batches=4, val_fraction=0.01, mtp_depth=0, keep_last=1, progress=progress,
                json=False, device=device)


def pretrain_stage(out: str, rc: Recipe, eval_problems: int, seed: int, progress: bool = True,
                   device: str | None = None) -> dict:
    """Steps 1-3: the task data, the tokenizer and the pretrained model in out/ (pretrain/);
    returns the task, its held-out problems, the pretraining summary and the shared train settings."""
    import torch

    torch.manual_seed(seed)
    task = get_task(task_spec(rc, eval_problems))
    test = task.problems("test")

    # 1-2: data and tokenizer
    data = os.path.join(out, "countdown_train.jsonl")
    write_task_data(task, data, rc.train_problems, BOS)
    docs = [json.loads(line)["text"] for _, line in zip(range(20_000), open(data))]
    docs += _text_sample(rc.text, 8_000_000)
    tok_dir = os.path.join(out, "tokenizer")
    tokenizer = train_bpe(docs, rc.tokenizer_size, split_digits=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save(tok_dir)
    _log(f"{rc.train_problems:,} Countdown problems with worked solutions -> {data}; held out, never trained on: "
         f"{len(test)} test and {rc.val_problems} validation problems; tokenizer -> {tok_dir}")

    # 3: pretraining (supervised, on the worked solutions)
    vocab = tokenizer.vocab_size
    common = train_common(rc, tok_dir, progress, device)
    pre_dir = os.path.join(out, "pretrain")
    _log(f"pretraining a DeepSeek-V3 (MLA + DeepSeekMoE) for {_budget(rc.pretrain_steps, rc.pretrain_seconds)}")
    overrides = {**QUICKSTART_MODEL, **(rc.model or {}), "vocab_size": vocab}
    if rc.dense:
        overrides["first_k_dense_replace"] = overrides.get("num_hidden_layers", 4)
    pre = train(TrainArgs(data=[data, *rc.text], out=pre_dir, overrides=overrides,
                          lr=rc.pretrain_lr, warmup_steps=100, min_lr_ratio=0.1, max_steps=rc.pretrain_steps,
                          max_seconds=rc.pretrain_seconds, seed=seed, **common))
    return dict(task=task, test=test, pre_dir=pre_dir, pre=pre, common=common)


def check_layout(rc: Recipe, control: bool, alongside: bool | None) -> None:
    """Refuse settings that cannot share the machine: `--overlap` gives half of the threads to
    GRPO's rollouts and half to its updates, so no control can run alongside."""
    if control and alongside and rc.overlap:
        raise ValueError("quickstart: --overlap splits the threads between GRPO's rollouts and updates, so the control "
                         "cannot run alongside; use --control-after (the default with --overlap)")


def quickstart(out: str = "runs/quickstart", recipe: Recipe | None = None, control: bool = True,
               eval_problems: int = 500, k: int = 8, seed: int = 0, name: str = "quickstart",
               register: bool = True, progress: bool = True, device: str | None = None,
               alongside: bool | None = None) -> dict:
    """The whole quickstart (module docstring). `alongside`: run the control next to GRPO, each on
    half of torch's threads (default: on a CPU with 2+ threads, unless the recipe overlaps GRPO's
    rollouts with its updates; False: the control after GRPO, on all threads). On 2 cores GRPO then
    runs on one thread, whose floating-point sums (and so rollouts) differ from two threads'
    (both layouts measured in benchmarks/RESULTS.md)."""
    import torch

    rc = recipe or Recipe()
    check_layout(rc, control, alongside)  # before any work
    torch.manual_seed(seed)
    t_all = time.time()
    os.makedirs(out, exist_ok=True)
    stale = [d for d in ("pretrain", "grpo", "control", "grpo.pace") if os.path.exists(os.path.join(out, d))]
    if stale:  # each stage starts from nothing: no earlier checkpoint, pace or result may leak into this run
        _log(f"starting over in {out}: removing the previous run's {', '.join(stale)}")
        for d in stale:
            path = os.path.join(out, d)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    stage = pretrain_stage(out, rc, eval_problems, seed, progress, device)
    task, test, pre_dir, pre, common = (stage[key] for key in ("task", "test", "pre_dir", "pre", "common"))
    max_new = rc.max_new_tokens
    before = measure(pre_dir, task, test, k, max_new, device, rc.eval_context)
    _log(f"before RL: greedy accuracy {before['accuracy']:.3f} (strict {before['accuracy_strict']:.3f}), "
         f"pass@{k} {before[f'pass_at_{k}']:.3f}")

    # 5-6: GRPO from the pretrained model (verifier only), and the control: more supervised training
    # from the same checkpoint for GRPO's time, either after it or (alongside) at the same time on
    # the other half of the threads, following GRPO's clock (nanoseek/recipes/pace.py)
    rl_dir, ctl_dir = os.path.join(out, "grpo"), os.path.join(out, "control")
    threads = torch.get_num_threads()
    on_cpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
    alongside = control and threads >= 2 and (on_cpu and not rc.overlap if alongside is None else alongside)
    ctl_spec = dict(data=os.path.join(pre_dir, "data"), out=ctl_dir, model=pre_dir, lr=rc.control_lr, seed=seed + 1,
                    common={**common, "progress": progress and not alongside}, task=task_spec(rc, eval_problems), k=k,
                    max_new=max_new, device=device, eval_context=rc.eval_context, threads=threads // 2,
                    pace_file=os.path.join(out, "grpo.pace") if alongside else None)
    proc = None
    if alongside:
        _log(f"GRPO for {_budget(rc.rl_steps, rc.rl_seconds)} on {threads - threads // 2} thread(s) (rule-based "
             f"reward, no demonstrations); the control alongside on {threads // 2}: more supervised training "
             f"for the same time")
        import multiprocessing
        proc = multiprocessing.get_context("spawn").Process(target=_control_process, args=(ctl_spec,), daemon=True)
        proc.start()
        torch.set_num_threads(threads - threads // 2)
    overlap = rc.overlap and on_cpu and torch.get_num_threads() >= 2
    if not alongside:
        _log(f"GRPO for {_budget(rc.rl_steps, rc.rl_seconds)} (rule-based reward, no demonstrations"
             + ("; each step's rollouts sampled during the previous update)" if overlap else ")"))
    try:
        pace_file = ctl_spec["pace_file"]  # GRPO's progress after every step, for the control to follow
        rl = grpo(rl_args(rc, pre_dir, rl_dir, seed, eval_problems, progress=progress, device=device, overlap=overlap),
                  on_step=(lambda progress: write_pace(pace_file, progress)) if pace_file else None)
        if proc is not None:
            write_pace(ctl_spec["pace_file"], 1.0)  # the control stops at its next step
            if not proc.is_alive() and proc.exitcode != 0:  # say so now, not after GRPO's evaluation
                _read_control(ctl_dir, proc.exitcode)
        after = measure(rl_dir, task, test, k, max_new, device, rc.eval_context)  # meanwhile the control evaluates
    except BaseException:
        if proc is not None:
            proc.terminate()
            proc.join(timeout=30)
            torch.set_num_threads(threads)
        raise
    _log(f"after RL:  greedy accuracy {after['accuracy']:.3f} (strict {after['accuracy_strict']:.3f}), "
         f"pass@{k} {after[f'pass_at_{k}']:.3f}")

    result = {"task": f"countdown-{rc.n_numbers}", "eval_problems": len(test), "params": pre["params_total"],
              "pretrain_seconds": pre["seconds"], "pretrain_steps": pre["step"], "rl_seconds": rl["seconds"],
              "rl_steps": rl["steps"], "rl_overlapped": overlap,
              "accuracy_before_rl": before["accuracy"], "accuracy_after_rl": after["accuracy"],
              "strict_accuracy_before_rl": before["accuracy_strict"], "strict_accuracy_after_rl": after["accuracy_strict"],
              f"pass_at_{k}_before_rl": before[f"pass_at_{k}"], f"pass_at_{k}_after_rl": after[f"pass_at_{k}"],
              "sampled_accuracy_before_rl": before["pass_at_1_sampled"], "sampled_accuracy_after_rl": after["pass_at_1_sampled"],
              "mean_length_before_rl": before["mean_length"], "mean_length_after_rl": after["mean_length"]}
    if control:
        if proc is not None:
            proc.join()
            torch.set_num_threads(threads)
            c = _read_control(ctl_dir, proc.exitcode)
        else:
            _log(f"control: {rl['seconds']:.0f} s more supervised training instead of GRPO")
            c = _control_job({**ctl_spec, "max_seconds": rl["seconds"]})
        result.update({"accuracy_control": c["accuracy"], "strict_accuracy_control": c["accuracy_strict"],
                       f"pass_at_{k}_control": c[f"pass_at_{k}"], "sampled_accuracy_control": c["pass_at_1_sampled"],
                       "control_seconds": c["seconds"], "control_steps": c["steps"],
                       "control_alongside_grpo": proc is not None})
        _log(f"control ({c['steps']} steps in {c['seconds']:.0f} s): greedy accuracy {c['accuracy']:.3f} "
             f"(strict {c['accuracy_strict']:.3f}), pass@{k} {c[f'pass_at_{k}']:.3f}")

    # 7: into the model store
    if register:
        Store().create(name, rl_dir, force=True)
        result["model"] = name
    result["seconds"] = round(time.time() - t_all, 1)
    result["out"] = out
    atomic_write_text(os.path.join(out, "quickstart.json"), json.dumps(result, indent=2) + "\n")
    return result


def report(r: dict, k: int = 8) -> str:
    gain = 100 * (r["accuracy_after_rl"] - r["accuracy_before_rl"])
    lines = [
        "",
        f"{r['task'].capitalize()}, {r['eval_problems']} held-out problems, greedy decoding (lenient / strict checking):",
        f"  after pretraining ({r['pretrain_seconds']:.0f} s)   {100 * r['accuracy_before_rl']:5.1f}% / "
        f"{100 * r['strict_accuracy_before_rl']:5.1f}%   pass@{k} {100 * r[f'pass_at_{k}_before_rl']:5.1f}%",
        f"  after GRPO ({r['rl_seconds']:.0f} s)           {100 * r['accuracy_after_rl']:5.1f}% / "
        f"{100 * r['strict_accuracy_after_rl']:5.1f}%   pass@{k} {100 * r[f'pass_at_{k}_after_rl']:5.1f}%   "
        f"({gain:+.1f} points from RL alone)",
    ]
    if "accuracy_control" in r:
        lines.append(f"  control: more SFT instead   {100 * r['accuracy_control']:5.1f}% / "
                     f"{100 * r['strict_accuracy_control']:5.1f}%   pass@{k} {100 * r[f'pass_at_{k}_control']:5.1f}%   "
                     f"(RL - control: {100 * (r['accuracy_after_rl'] - r['accuracy_control']):+.1f} points)")
    lines.append(f"total {r['seconds']:.0f} s; run folder {r['out']}")
    if r.get("model"):
        lines += ["", f"The RL model is in your local store as '{r['model']}':",
                  f"  nanoseek chat {r['model']}        (type a Countdown prompt such as 6,2,1>4| )",
                  f"  nanoseek generate {r['model']} '6,2,1>4|' --raw",
                  "  nanoseek serve                   (Ollama and OpenAI APIs on http://127.0.0.1:11434)"]
    return "\n".join(lines)
