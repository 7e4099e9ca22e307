"""Fine-tuning benchmarks (one script, side by side in one run).

speed:   supervised fine-tuning through `nanoseek sft`'s code path (packed instruction data, loss on
         the assistant's tokens), full vs LoRA, same model, batch and data: tokens/s (packed row
         tokens, padding included, and the share of them that are trained) and peak memory (GPU:
         max allocated; CPU: peak resident set of the arm's own process), and the instruction set's
         validation loss before and after each run. The base model is the preset at random init
         with a BPE tokenizer trained on the instruction set (no pretrained checkpoint needed).
distill: DeepSeek-R1-style distillation on a toy verifiable task (shift each letter one step along
         a..h): a teacher trained on worked solutions (<think>trace</think>answer) answers new
         prompts through the engine, the verifier keeps the right ones (pass rate), a student is
         fine-tuned on them; a control student is fine-tuned on the gold answers of the same
         prompts. Student accuracy on held-out prompts before and after, greedy decoding.

    python -m benchmarks.bench_sft --out OUT [--preset small|nano] [--part speed|distill|all]

Default preset: `small` on a GPU, `nano` on CPU. Prints tables and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

import torch

from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.finetune.distill import PromptRecord, accuracy, distill, verify_exact
from nanoseek.finetune.sft import SFTOptions, run_sft
from nanoseek.tokenizer import Tokenizer, train_bpe
from nanoseek.train import TrainArgs

from .common import environment, print_json, read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
INSTRUCT = os.path.join(HERE, "..", "..", "shared", "data", "instruct_rasbt", "instruction-data.json")
RECIPES = {  # per preset: batch x seq_len, steps, lr (full, LoRA)
    "small": dict(batch=32, seq=1024, steps=60, lr_full=3e-4, lr_lora=2e-3),
    "nano": dict(batch=8, seq=256, steps=30, lr_full=1e-3, lr_lora=3e-3),
}


def make_base(out: str, preset: str, data: str) -> str:
    """The preset at random init (seed 0) + a BPE tokenizer trained on the instruction set."""
    base = os.path.join(out, f"base-{preset}")
    if os.path.exists(os.path.join(base, "config.json")):
        return base
    cfg = ModelConfig.from_preset(preset)
    recs = json.load(open(data))
    tok = train_bpe([" ".join(str(v) for v in r.values()) for r in recs], min(cfg.vocab_size, 4096))
    DeepSeekV3.from_config(cfg, seed=0).save_pretrained(base)
    tok.save(base)
    return base


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_arm(a) -> dict:
    """One fine-tuning run in this process (called as a subprocess per arm)."""
    r = RECIPES[a.preset]
    lora = a.lora_rank if a.arm == "lora" else None
    run = os.path.join(a.out, f"sft-{a.preset}-{a.arm}")
    summary = run_sft(TrainArgs(data=[a.data], model=a.base, out=run, max_steps=a.steps or r["steps"],
                                batch_size=a.batch_size or r["batch"], seq_len=a.seq_len or r["seq"],
                                lr=r["lr_lora"] if lora else r["lr_full"], warmup_steps=5, eval_every=0,
                                save=False, progress=False, precision=a.precision),
                      SFTOptions(lora=lora))
    steps = read_metrics(run)
    speeds = [s["tokens_per_s"] for s in steps if "loss" in s][3:]
    d = summary["sft"]["data"]
    return {"arm": a.arm, "tokens_per_s": statistics.median(speeds), "peak_memory_gib": round(peak_memory_gib(), 3),
            "val_loss_before": summary["val_loss_start"], "val_loss_after": summary["val_loss"],
            "params_trainable": summary["sft"]["params_trainable"], "params_total": summary["params_total"],
            "trained_token_share": d["label_tokens"] / max(1, d["train_rows"] * (a.seq_len or r["seq"])),
            "packing_fill": d["packing_fill"], "steps": summary["step"], "precision": summary["precision"]}


def part_speed(a) -> dict:
    if not os.path.exists(a.data):
        print(f"speed: {a.data} not found, skipped")
        return {}
    base = make_base(a.out, a.preset, a.data)
    rows = {}
    for arm in ("full", "lora"):
        cmd = [sys.executable, "-m", __spec__.name, "--arm", arm, "--base", base, "--out", a.out,
               "--preset", a.preset, "--data", a.data, "--lora-rank", str(a.lora_rank)]
        for flag in ("steps", "batch_size", "seq_len", "precision"):
            if getattr(a, flag) is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            print(f"  {arm} failed:\n{p.stderr[-3000:]}")
            continue
        rows[arm] = json.loads(p.stdout.strip().splitlines()[-1])
    r = RECIPES[a.preset]
    print(f"\nSFT speed, preset {a.preset}, batch {a.batch_size or r['batch']} x {a.seq_len or r['seq']}, "
          f"{a.steps or r['steps']} steps, {'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")
    print(f"{'arm':<10}{'tok/s':>10}{'peak GiB':>10}{'trainable':>14}{'val before':>12}{'val after':>11}")
    for arm, x in rows.items():
        name = f"lora-{a.lora_rank}" if arm == "lora" else arm
        print(f"{name:<10}{x['tokens_per_s']:>10,.0f}{x['peak_memory_gib']:>10.2f}{x['params_trainable']:>14,}"
              f"{x['val_loss_before']:>12.3f}{x['val_loss_after']:>11.3f}")
    if len(rows) == 2:
        print(f"LoRA / full: speed {rows['lora']['tokens_per_s'] / rows['full']['tokens_per_s']:.2f}x, "
              f"memory {rows['lora']['peak_memory_gib'] / rows['full']['peak_memory_gib']:.2f}x; "
              f"{100 * rows['full']['trained_token_share']:.0f}% of row tokens are trained (assistant) tokens")
    return {"preset": a.preset, **{arm: x for arm, x in rows.items()}}


# ------------------------------------------------------------------------------ distillation (toy task)
ALPHA = "abcdefgh"


def shift_record(letters, think: bool) -> dict:
    answer = " ".join(ALPHA[(ALPHA.index(c) + 1) % len(ALPHA)] for c in letters)
    trace = ", ".join(f"{c} {ALPHA[(ALPHA.index(c) + 1) % len(ALPHA)]}" for c in letters)
    return {"prompt": "shift " + " ".join(letters), "answer": answer,
            "completion": (f"<think>{trace}</think>" if think else "") + answer}


def part_distill(a) -> dict:
    d = os.path.join(a.out, "distill-toy")
    os.makedirs(d, exist_ok=True)
    g = random.Random(0)
    combos = [(x, y, z) for x in ALPHA for y in ALPHA for z in ALPHA]
    g.shuffle(combos)
    teach, prompts, test = combos[:300], combos[300:450], combos[450:]
    tok = train_bpe(["shift " + " ".join(ALPHA) + ", " + ", ".join(ALPHA)] * 10, 300)
    cfg = ModelConfig.from_preset("nano", vocab_size=300, hidden_size=64, intermediate_size=128,
                                  moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                  v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                  max_position_embeddings=256)

    def model_dir(name, seed):
        path = os.path.join(d, name)
        DeepSeekV3.from_config(cfg, seed=seed).save_pretrained(path)
        tok.save(path)
        return path

    def write(name, recs):
        path = os.path.join(d, name)
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
        return path

    common = dict(batch_size=16, seq_len=128, lr=3e-3, warmup_steps=10, eval_every=0, progress=False)
    t0 = time.time()
    teacher_data = write("teacher.jsonl", [{k: r[k] for k in ("prompt", "completion")}
                                           for r in (shift_record(t, True) for t in teach)])
    run_sft(TrainArgs(data=[teacher_data], model=model_dir("teacher-init", 0), out=os.path.join(d, "teacher"),
                      max_steps=150, **common), SFTOptions())
    t_teacher = time.time() - t0
    held = [PromptRecord([{"role": "user", "content": r["prompt"]}], r["answer"], "")
            for r in (shift_record(t, False) for t in test)]

    def acc(path):
        return accuracy(DeepSeekV3.from_pretrained(path), Tokenizer.from_dir(path), held, verify_exact, 40)

    student = model_dir("student-init", 1)
    before, teacher_acc = acc(student), acc(os.path.join(d, "teacher"))
    pfile = write("prompts.jsonl", [{"prompt": r["prompt"], "answer": r["answer"]}
                                    for r in (shift_record(t, False) for t in prompts)])
    s = distill(os.path.join(d, "teacher"), student, pfile, os.path.join(d, "distilled"),
                TrainArgs(max_steps=150, **common), SFTOptions(), max_new_tokens=40)
    gold = write("gold.jsonl", [{k: r[k] for k in ("prompt", "completion")}
                                for r in (shift_record(t, False) for t in prompts)])
    run_sft(TrainArgs(data=[gold], model=student, out=os.path.join(d, "control"), max_steps=150, **common),
            SFTOptions())
    res = {"teacher_accuracy": teacher_acc, "teacher_pass_rate": s["distill"]["pass_rate"],
           "kept": s["distill"]["kept"], "student_before": before, "student_distilled": acc(os.path.join(d, "distilled")),
           "student_gold_control": acc(os.path.join(d, "control")), "teacher_train_seconds": round(t_teacher, 1),
           "held_out_prompts": len(held)}
    print("\nDistillation, toy task (shift letters a..h), held-out accuracy, greedy")
    print(f"teacher {res['teacher_accuracy']:.2f} (pass rate on the distillation prompts "
          f"{res['teacher_pass_rate']:.2f}, {res['kept']} kept; trained in {t_teacher:.0f} s)")
    print(f"student before {before:.2f} -> distilled {res['student_distilled']:.2f}; "
          f"gold-answer control {res['student_gold_control']:.2f}")
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench_sft")
    p.add_argument("--part", choices=["speed", "distill", "all"], default="all")
    p.add_argument("--preset", default=None, help="default: small on GPU, nano on CPU")
    p.add_argument("--data", default=INSTRUCT)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--precision", choices=["fp32", "bf16"])
    p.add_argument("--arm", choices=["full", "lora"], help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.preset = a.preset or ("small" if torch.cuda.is_available() else "nano")
    os.makedirs(a.out, exist_ok=True)
    if a.arm:  # one arm, in its own process (so its peak memory is its own)
        print(json.dumps(run_arm(a)), flush=True)
        return
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              **environment(), "threads": torch.get_num_threads()}
    if a.part in ("speed", "all"):
        result["speed"] = part_speed(a)
    if a.part in ("distill", "all"):
        result["distill"] = part_distill(a)
    print_json(result)


if __name__ == "__main__":
    main()
