"""Distillation (DeepSeek-R1 report, section 2.4: small models fine-tuned on a stronger model's
reasoning traces, kept by rejection sampling against a verifier as in section 2.3.3):

1. the teacher answers every prompt through the inference engine (`engine.py`), thinking kept;
2. when the prompts carry gold answers, a verifier keeps the correct completions only, and the
   teacher's pass rate is reported;
3. the student is fine-tuned on the kept completions with the SFT path (`sft.run_sft`, full or LoRA):
   a DeepSeek-architecture model, or a dense Llama / Qwen2 / Qwen3 one as in the R1 report.

Prompt records (.jsonl / .json): {"prompt": "..." (or a list of messages), "answer": "..."},
{"messages": [...]} (a trailing assistant turn is dropped) or Alpaca {"instruction", "input"};
a .txt file holds one prompt a line. `answer` is optional (no verification without it).
Written under OUT/distill/: completions.jsonl (every completion and its verdict) and train.jsonl
(the kept ones as chat records); the fine-tuned student is the checkpoint at OUT's root.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import time
from dataclasses import dataclass

from ..infer.chat import THINK_OPEN, render_chat, split_thinking
from ..data import DataError
from ..infer.engine import Engine, SamplingParams
from ..io import atomic_write_text
from ..load import load_model
from .sft import BadRecord, DataReport, SFTOptions, _check_messages, _text, iter_records, run_sft
from ..tasks import TASKS
from ..tasks.extract import ANSWER_RE
from ..tokenizer import Tokenizer
from ..train import TrainArgs

NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class PromptRecord:
    messages: list[dict]  # the conversation to answer (ends with a user turn)
    answer: str | None  # gold final answer, when known
    where: str


# ------------------------------------------------------------------------------ prompts
def _prompt_messages(obj) -> tuple[list[dict], str | None]:
    if not isinstance(obj, dict):
        raise BadRecord("bad field type", f"expected a JSON object, got {type(obj).__name__}")
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise BadRecord("bad field type", f"field 'answer' is {type(answer).__name__}, expected a string or number")
    if "messages" in obj:
        msgs = obj["messages"]
        if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]
        msgs = _check_messages(msgs, "messages")
    elif "prompt" in obj:
        p = obj["prompt"]
        msgs = _check_messages(p if isinstance(p, list) else [{"role": "user", "content": _text(obj, "prompt")}],
                               "prompt")
    elif "instruction" in obj:
        instruction, extra = _text(obj, "instruction"), _text(obj, "input", required=False)
        msgs = [{"role": "user", "content": instruction + (f"\n\n{extra}" if extra.strip() else "")}]
    else:
        raise BadRecord("missing field", "no 'prompt', 'messages' or 'instruction' field "
                                         f"(fields: {', '.join(list(obj)[:10])})")
    if not any(m["role"] == "user" and m["content"].strip() for m in msgs):
        raise BadRecord("missing field", "no non-empty user turn to answer")
    return msgs, (None if answer is None else str(answer))


def load_prompts(path: str) -> tuple[list[PromptRecord], DataReport]:
    """The usable prompt records of one file, and the report of the bad ones (skipped)."""
    report = DataReport()
    out = []
    if os.path.splitext(path)[1].lower() in (".txt", ".text"):
        try:
            lines = open(path, encoding="utf-8").read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read as UTF-8 text ({e})") from None
        for k, line in enumerate(lines, 1):
            if line.strip():
                report.records += 1
                out.append(PromptRecord([{"role": "user", "content": line.strip()}], None, f"{path}:{k}"))
    else:
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file")
        for where, obj in iter_records(path):
            report.records += 1
            try:
                if isinstance(obj, BadRecord):
                    raise obj
                msgs, answer = _prompt_messages(obj)
            except BadRecord as e:
                report.bad(where, e.reason, str(e))
                continue
            out.append(PromptRecord(msgs, answer, where))
    report.examples = len(out)
    if not out:
        raise DataError(f"{path}: no usable prompts\n{report.format()}")
    return out, report


# ------------------------------------------------------------------------------ verifiers
def final_answer(completion: str) -> str:
    """The answer part of a completion: after </think>, inside <answer>...</answer> when present."""
    _, answer = split_thinking(completion)
    m = ANSWER_RE.search(answer)
    return (m.group(1) if m else answer).strip()


def _norm(s: str) -> str:
    return " ".join(s.lower().split()).rstrip(".")


def verify_exact(completion: str, gold: str) -> bool:
    return _norm(final_answer(completion)) == _norm(gold)


def verify_number(completion: str, gold: str) -> bool:
    found = NUMBER_RE.findall(final_answer(completion))
    want = NUMBER_RE.fullmatch(gold.strip())
    return bool(found) and want is not None and float(found[-1]) == float(gold.strip())


def verify_contains(completion: str, gold: str) -> bool:
    return _norm(gold) in _norm(final_answer(completion))


VERIFIERS = {"exact": verify_exact, "number": verify_number, "contains": verify_contains}


class TaskVerifier:
    """A nanoseek task's lenient check as a verifier; it also reads the question (Countdown's
    numbers and target live in the prompt)."""

    def __init__(self, task):
        self.task = task

    def __call__(self, completion: str, gold: str, question: str = "") -> bool:
        return self.task.check(self.task.problem_from(question, gold), completion).correct


def verify(fn, completion: str, rec: "PromptRecord") -> bool:
    """Run a verifier on one completion of `rec` (task verifiers also get the question)."""
    if isinstance(fn, TaskVerifier):
        question = next((m["content"] for m in reversed(rec.messages) if m["role"] == "user"), "")
        return fn(completion, rec.answer, question)
    return bool(fn(completion, rec.answer))


def get_verifier(spec: str | None, records: list[PromptRecord]):
    """(name, fn(completion, gold) -> bool) or (None, None). 'auto': 'number' when every gold
    answer is a number, else 'exact'; none when the prompts carry no answers. 'module:function'
    imports a custom one."""
    golds = [r.answer for r in records if r.answer is not None]
    if spec in (None, "auto"):
        if not golds:
            return None, None
        spec = "number" if all(NUMBER_RE.fullmatch(g.strip()) for g in golds) else "exact"
    if spec == "none":
        return None, None
    if not golds:
        raise ValueError(f"--verifier {spec}: the prompts carry no 'answer' field to check against")
    if spec in VERIFIERS:
        return spec, VERIFIERS[spec]
    if spec.startswith("task:"):  # a task's own checker (nanoseek.tasks), e.g. task:gsm8k, task:countdown
        name = spec[5:]
        if name not in TASKS:
            raise ValueError(f"--verifier {spec}: unknown task {name!r}; available: {', '.join(TASKS)}")
        return spec, TaskVerifier(TASKS[name].__new__(TASKS[name]))  # checking needs no data or generator settings
    mod, _, fn = spec.partition(":")
    if not fn:
        raise ValueError(f"--verifier: unknown verifier {spec!r} (exact, number, contains, none, or module:function)")
    try:
        return spec, getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--verifier {spec}: cannot load it ({e})") from None


# ------------------------------------------------------------------------------ generation
def prompt_ids(tokenizer, rec: PromptRecord, think: bool) -> list[int]:
    return tokenizer.encode(render_chat(tokenizer, rec.messages, add_generation_prompt=True, think=think))


def generate(model, tokenizer, records: list[PromptRecord], max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, samples: int = 1, seed: int = 0, think: bool = False) -> list[list[tuple[str, str]]]:
    """For each record, `samples` (completion text, finish reason) from the engine. With `think`
    the prompt opens the reply inside <think>, and the text is given back with that opening."""
    ids = [prompt_ids(tokenizer, r, think) for r in records]
    max_ctx = max(len(i) for i in ids) + max_new_tokens + 1
    engine = Engine(model, tokenizer, max_context=max_ctx, max_batch=min(32, len(ids) * samples))
    try:
        params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 seed=seed + 7919 * j if temperature > 0 else None) for j in range(samples)]
        comps = engine.generate([i for i in ids for _ in range(samples)], params * len(ids))
    finally:
        engine.close()
    opening = THINK_OPEN + "\n" if think else ""
    return [[(opening + c.text, c.finish_reason) for c in comps[k * samples:(k + 1) * samples]]
            for k in range(len(ids))]


def accuracy(model, tokenizer, records: list[PromptRecord], verifier, max_new_tokens: int = 64,
             think: bool = False) -> float:
    """Share of the records whose greedy completion the verifier accepts."""
    outs = generate(model, tokenizer, records, max_new_tokens, think=think)
    return sum(verify(verifier, o[0][0], r) for o, r in zip(outs, records)) / max(1, len(records))


# ------------------------------------------------------------------------------ the run
def distill(teacher: str, student: str, prompts: str, out: str, train_args=None, sft_options=None,
            verifier: str | None = "auto", samples: int = 1, max_new_tokens: int = 256, temperature: float | None = None,
            top_p: float = 1.0, think: bool = False, device: str | None = None, say=print) -> dict:
    """Teacher completions -> verified -> SFT of the student (see the module docstring). Returns the
    SFT run's summary with a "distill" section (pass rate and counts)."""
    import dataclasses

    import torch

    for name, path in (("--teacher", teacher), ("--student", student)):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{name} {path}: not a checkpoint directory (no config.json)")
    if samples < 1:
        raise ValueError(f"--samples: must be >= 1, got {samples}")
    records, report = load_prompts(prompts)
    vname, vfn = get_verifier(verifier, records)
    if report.skipped:
        say(report.format())
    temperature = (0.0 if samples == 1 else 0.7) if temperature is None else temperature
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    model = load_model(teacher, device=device)  # DeepSeek-V2/V3 or a dense Llama / Qwen teacher
    tok = Tokenizer.from_dir(teacher)
    say(f"teacher {teacher}: {len(records)} prompts x {samples} sample(s), up to {max_new_tokens} new tokens, "
        f"temperature {temperature}" + (f", verifier {vname}" if vname else ", no verifier"))
    outs = generate(model, tok, records, max_new_tokens, temperature, top_p, samples, seed=0, think=think)
    del model
    gen_s = time.time() - t0
    os.makedirs(os.path.join(out, "distill"), exist_ok=True)
    kept, n_total, n_unfinished, n_checked, n_passed = [], 0, 0, 0, 0
    solved = 0
    with open(os.path.join(out, "distill", "completions.jsonl"), "w", encoding="utf-8") as f:
        for rec, row in zip(records, outs):
            seen, any_pass = set(), False
            for text, finish in row:
                n_total += 1
                finished = finish == "stop" and bool(final_answer(text) or split_thinking(text)[0])
                passed = None
                if vfn is not None and rec.answer is not None:
                    n_checked += 1
                    passed = verify(vfn, text, rec)
                    n_passed += passed
                    any_pass |= passed
                n_unfinished += not finished
                f.write(json.dumps({"where": rec.where, "messages": rec.messages, "completion": text, "finish": finish,
                                    "answer": rec.answer, "passed": passed}, ensure_ascii=False) + "\n")
                if finished and passed is not False and text not in seen:
                    seen.add(text)
                    kept.append({"messages": rec.messages + [{"role": "assistant", "content": text}]})
            solved += any_pass
    data = os.path.join(out, "distill", "train.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for r in kept:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    stats = {"prompts": len(records), "bad_prompts": sum(report.skipped.values()), "completions": n_total,
             "unfinished": n_unfinished, "verifier": vname, "verified": n_checked, "passed": n_passed,
             "pass_rate": (n_passed / n_checked) if n_checked else None,
             "prompts_solved": (solved / len(records)) if vfn is not None else None,
             "kept": len(kept), "generate_seconds": round(gen_s, 2)}
    rate = f"pass rate {100 * stats['pass_rate']:.1f}% ({n_passed}/{n_checked})" if n_checked else "not verified"
    say(f"teacher completions: {n_total}, unfinished {n_unfinished}, {rate}; kept {len(kept)} for the student "
        f"-> {data}")
    if not kept:
        raise ValueError("distill: no teacher completion was kept (all unfinished or rejected by the verifier); "
                         "raise --max-new-tokens or --samples")
    a = train_args or TrainArgs()
    a = dataclasses.replace(a, data=[data], out=out, model=student, tokenizer=a.tokenizer or student, json=False)
    summary = run_sft(a, sft_options or SFTOptions())
    summary["distill"] = stats
    atomic_write_text(os.path.join(out, "final.json"), json.dumps(summary) + "\n")
    return summary
