"""Supervised fine-tuning (DeepSeek-V3 report section 5.1; the distilled models of the DeepSeek-R1
report, section 2.4, are this step on a teacher's reasoning traces, see `distill.py`).

Chat and instruction records -> the model's chat template -> token ids whose labels count only the
assistant's tokens -> packed rows -> the pretraining loop of `train.py` (the same optimizer,
schedule, checkpoints, resume, progress and metrics), full or with LoRA (`lora.py`); the LoRA is
merged into the final checkpoint at the run's root, a plain Hugging Face-layout checkpoint. A dense
Llama / Qwen2 / Qwen3 checkpoint (the R1-distill students) trains the same way in one process
(`dense_sft.py`).

Records (.jsonl, one JSON object a line, or .json holding a list of them), one of:
  {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": "..."}, ...]}   OpenAI chat
  {"instruction": "...", "input": "..." (optional), "output": "..."}                        Alpaca
  {"prompt": "...", "completion": "..."}                     prompt/completion (or lists of messages)
An assistant message may carry its reasoning inline ("<think>...</think>answer") or in a
`reasoning_content` field; the last assistant turn is trained with its thinking.

Rendering: each assistant turn's prompt is the template's rendering of the conversation before it
with the generation prompt (what the model sees at inference), encoded apart from the turn's own
tokens, which are the labels (the turn's text and the template's end of turn, EOS for the built-in
DeepSeek template); every other label is -100. Earlier assistant turns count as the template renders
them (R1's template drops their thinking) when the template extends earlier renderings.

Packing: examples lie end to end in rows of seq_len tokens; `segment_ids` keep attention inside
each example and positions restart at 0, so a packed row computes what each example would alone.

Bad records (invalid JSON, missing fields, empty assistant turns, unknown roles, over-long
examples) are counted and reported with file:line and the reason; training goes on with the rest.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from ..infer.chat import ROLES, THINK_OPEN, render_chat, split_thinking
from ..data import Batches, DataError, resolve_sources
from .dense_sft import train_dense
from ..load import is_dense, load_config
from .lora import apply_lora, base_weights, has_lora, load_lora_state_dict, lora_state_dict, merge_lora
from ..train import train

IGNORE = -100  # label of tokens that do not count (F.cross_entropy's ignore_index)
SHOW_PROBLEMS = 10  # bad records quoted in the report; the rest are counted
# Fine-tuning defaults (any run flag overrides them)
SFT_RECIPE = dict(batch_size=16, seq_len=512, warmup_steps=10, eval_every=50, eval_batches=1000)
SFT_LR = {"full": 1e-4, "lora": 1e-3}


class BadRecord(ValueError):
    """One unusable record; `reason` is its category in the report."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# ------------------------------------------------------------------------------ records
def iter_records(path: str):
    """(where, object or BadRecord) for each record of a .jsonl / .json file."""
    ext = os.path.splitext(path)[1].lower()
    try:
        raw = open(path, "rb").read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if ext == ".json":
        try:
            items = json.loads(raw.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not a valid JSON file ({e})") from None
        if isinstance(items, dict) and isinstance(items.get("data"), list):
            items = items["data"]
        if not isinstance(items, list):
            raise DataError(f"{path}: a .json data file must hold a list of records, got {type(items).__name__}")
        for k, obj in enumerate(items):
            yield f"{path}: item {k}", obj
        return
    if ext != ".jsonl":
        raise DataError(f"{path}: fine-tuning data must be .jsonl or .json records (messages, "
                        "instruction/output or prompt/completion)")
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
            yield where, json.loads(text)
        except UnicodeDecodeError as e:
            yield where, BadRecord("invalid JSON", f"not UTF-8 text (bad byte at offset {e.start})")
        except json.JSONDecodeError as e:
            yield where, BadRecord("invalid JSON", f"not valid JSON ({e.msg} at column {e.colno})")


def _text(obj: dict, key: str, required: bool = True) -> str:
    if key not in obj or obj[key] is None:
        if required:
            raise BadRecord("missing field", f"no '{key}' field (fields: {', '.join(list(obj)[:10])})")
        return ""
    v = obj[key]
    if not isinstance(v, str):
        raise BadRecord("bad field type", f"field '{key}' is {type(v).__name__}, expected a string")
    return v


def _check_messages(msgs, name: str) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise BadRecord("missing field" if not msgs else "bad field type",
                        f"'{name}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise BadRecord("bad field type", f"{name}[{i}]: expected an object with 'role' and 'content'")
        if "role" not in m:
            raise BadRecord("missing field", f"{name}[{i}]: no 'role' field")
        role = m["role"]
        if role not in ROLES and role != "tool":
            raise BadRecord("unknown role", f"{name}[{i}].role: unknown role {role!r} "
                                            f"(expected one of {', '.join(ROLES)}, tool)")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if content is not None and not isinstance(content, str):
            raise BadRecord("bad field type", f"{name}[{i}].content is {type(content).__name__}, expected a string")
        content = content or ""
        if role == "assistant":
            reasoning = m.get("reasoning_content") or m.get("reasoning")
            if isinstance(reasoning, str) and reasoning.strip() and THINK_OPEN not in content:
                content = f"{THINK_OPEN}\n{reasoning.strip()}\n</think>\n\n{content}"
            if not content.strip():
                raise BadRecord("empty assistant turn", f"{name}[{i}]: empty assistant turn")
        out.append({"role": role, "content": content})
    return out


def record_messages(obj) -> list[dict]:
    """A record in any supported format -> chat messages (validated)."""
    if not isinstance(obj, dict):
        raise BadRecord("bad field type", f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = _check_messages(obj["messages"], "messages")
    elif "instruction" in obj or "output" in obj:
        instruction, extra = _text(obj, "instruction"), _text(obj, "input", required=False)
        output, system = _text(obj, "output"), _text(obj, "system", required=False)
        if not instruction.strip():
            raise BadRecord("missing field", "empty 'instruction'")
        user = instruction + (f"\n\n{extra}" if extra.strip() else "")
        msgs = ([{"role": "system", "content": system}] if system.strip() else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": output}]
        msgs = _check_messages(msgs, "record")
    elif "prompt" in obj or "completion" in obj:
        if "prompt" not in obj or "completion" not in obj:
            missing = "prompt" if "prompt" not in obj else "completion"
            raise BadRecord("missing field", f"no '{missing}' field (fields: {', '.join(list(obj)[:10])})")
        p, c = obj["prompt"], obj["completion"]
        prompt = p if isinstance(p, list) else [{"role": "user", "content": _text(obj, "prompt")}]
        completion = c if isinstance(c, list) else [{"role": "assistant", "content": _text(obj, "completion")}]
        msgs = _check_messages(list(prompt) + list(completion), "prompt+completion")
    else:
        raise BadRecord("missing field", "no 'messages', 'instruction'/'output' or 'prompt'/'completion' field "
                                         f"(fields: {', '.join(list(obj)[:10])})")
    if not any(m["role"] == "assistant" for m in msgs):
        raise BadRecord("no assistant turn", "no assistant turn to learn from")
    return msgs


# ------------------------------------------------------------------------------ rendering
def render_pieces(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The conversation as (text, is_label) pieces, up to its last assistant turn."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    last = turns[-1]
    pieces: list[tuple[str, bool]] = []
    done = ""  # the text the pieces cover so far
    for i in turns:
        prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        full = render_chat(tokenizer, messages[:i + 1], add_generation_prompt=False)
        if i == last:  # the final turn exactly as the model should write it: thinking included
            content = messages[i]["content"]
            suffix = getattr(tokenizer, "eos_token", None) or ""
            _, answer = split_thinking(content)
            if full.startswith(prompt) and answer.strip():
                rendered = full[len(prompt):]
                k = rendered.rfind(answer)
                if k >= 0:
                    suffix = rendered[k + len(answer):]  # the template's end of turn
            target = content + suffix
        elif full.startswith(prompt):
            target = full[len(prompt):]
        else:  # this template does not extend the prompt: the turn stays context only
            continue
        if not prompt.startswith(done):  # the template re-renders history differently: restart here
            pieces, done = [], ""
        pieces += [(prompt[len(done):], False), (target, True)]
        done = prompt + target
    return [(t, lab) for t, lab in pieces if t]


def encode_example(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids [n] and, per token, whether it is an assistant token (trained)."""
    ids: list[int] = []
    mask: list[bool] = []
    for text, is_label in render_pieces(tokenizer, messages):
        t = tokenizer.encode(text)
        ids += t
        mask += [is_label] * len(t)
    return ids, mask


@dataclass
class Example:
    x: np.ndarray  # [n] input ids
    y: np.ndarray  # [n] next-token labels, IGNORE where the target is not an assistant token

    def __len__(self) -> int:
        return len(self.x)


def make_example(ids: list[int], mask: list[bool]) -> Example:
    t = np.asarray(ids, dtype=np.int64)
    y = np.where(np.asarray(mask[1:], dtype=bool), t[1:], IGNORE)
    return Example(t[:-1], y)


@dataclass
class DataReport:
    records: int = 0
    examples: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    train: int = 0
    val: int = 0
    train_rows: int = 0
    val_rows: int = 0
    label_tokens: int = 0
    fill: float = 0.0

    def bad(self, where: str, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        if len(self.problems) < SHOW_PROBLEMS:
            self.problems.append(f"{where}: {detail} (skipped)")

    def format(self) -> str:
        lines = [f"fine-tuning data: {self.records} records -> {self.examples} examples "
                 f"({self.train} train, {self.val} validation), {self.label_tokens:,} trained tokens; "
                 f"{self.train_rows} train rows, {100 * self.fill:.0f}% filled"]
        if self.truncated:
            lines.append(f"  truncated {self.truncated} over-long examples to the sequence length")
        n_bad = sum(self.skipped.values())
        if n_bad:
            counts = ", ".join(f"{n} {r}" for r, n in self.skipped.most_common())
            lines.append(f"  skipped {n_bad} bad records: {counts}")
            lines += [f"  {p}" for p in self.problems]
            if n_bad > len(self.problems):
                lines.append(f"  ... and {n_bad - len(self.problems)} more")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"records": self.records, "examples": self.examples, "train_examples": self.train,
                "val_examples": self.val, "skipped": sum(self.skipped.values()),
                "skipped_by_reason": dict(self.skipped), "truncated": self.truncated,
                "train_rows": self.train_rows, "val_rows": self.val_rows,
                "label_tokens": self.label_tokens, "packing_fill": round(self.fill, 4)}


def load_examples(data, tokenizer, seq_len: int, overlong: str = "skip") -> tuple[list[Example], DataReport]:
    """Every usable example of the data files (in order), and the report of what was dropped.
    An example longer than seq_len + 1 tokens is skipped, or with overlong='truncate' cut to fit
    (kept only if assistant tokens remain)."""
    if overlong not in ("skip", "truncate"):
        raise ValueError(f"--overlong: expected skip or truncate, got {overlong!r}")
    report = DataReport()
    examples = []
    for path in resolve_sources(data):
        for where, obj in iter_records(path):
            report.records += 1
            try:
                if isinstance(obj, BadRecord):
                    raise obj
                ids, mask = encode_example(tokenizer, record_messages(obj))
                if len(ids) > seq_len + 1:
                    if overlong == "skip":
                        raise BadRecord("over-long", f"{len(ids)} tokens, more than --seq-len {seq_len} + 1")
                    ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
                    if not any(mask[1:]):
                        raise BadRecord("over-long", f"no assistant token left after truncating to {seq_len + 1}")
                    report.truncated += 1
            except BadRecord as e:
                report.bad(where, e.reason, str(e))
                continue
            except ValueError as e:  # e.g. the chat template refused the conversation
                report.bad(where, "template error", str(e))
                continue
            ex = make_example(ids, mask)
            if not (ex.y != IGNORE).any():
                report.bad(where, "empty assistant turn", "no assistant tokens after rendering")
                continue
            examples.append(ex)
    report.examples = len(examples)
    if not examples:
        raise DataError(f"{', '.join(map(str, data if isinstance(data, (list, tuple)) else [data]))}: no usable "
                        f"fine-tuning examples\n{report.format()}")
    return examples, report


def split_examples(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded random `val_fraction` of the examples (at least one when there are two or more)."""
    n = len(examples)
    n_val = 0 if val_fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    order = np.random.default_rng([seed, 1]).permutation(n)
    val = set(order[:n_val].tolist())
    return [e for i, e in enumerate(examples) if i not in val], [e for i, e in enumerate(examples) if i in val]


# ------------------------------------------------------------------------------ packing
def pack(examples: list[Example], seq_len: int, pad_id: int, packing: bool = True, seed: int = 0,
         lookback: int = 64) -> dict[str, np.ndarray]:
    """Rows {"x", "y", "pos", "seg"} each [R, seq_len]: examples placed (in a seeded order) into
    the first of the last `lookback` rows with room, else a new row (one example a row without
    `packing`). seg numbers the examples of a row from 1 (0 = padding); pos restarts at 0 in each."""
    order = np.random.default_rng([seed, 2]).permutation(len(examples)) if examples else []
    rows: list[list[Example]] = []
    room: list[int] = []
    for i in order:
        ex = examples[i]
        n = len(ex)
        target = -1
        if packing:
            for r in range(max(0, len(rows) - lookback), len(rows)):
                if room[r] >= n:
                    target = r
                    break
        if target < 0:
            rows.append([])
            room.append(seq_len)
            target = len(rows) - 1
        rows[target].append(ex)
        room[target] -= n
    R = len(rows)
    out = {"x": np.full((R, seq_len), pad_id, np.int64), "y": np.full((R, seq_len), IGNORE, np.int64),
           "pos": np.zeros((R, seq_len), np.int64), "seg": np.zeros((R, seq_len), np.int64)}
    for r, row in enumerate(rows):
        at = 0
        for s, ex in enumerate(row, start=1):
            n = len(ex)
            out["x"][r, at:at + n], out["y"][r, at:at + n] = ex.x, ex.y
            out["pos"][r, at:at + n], out["seg"][r, at:at + n] = np.arange(n), s
            at += n
        out["pos"][r, at:] = np.arange(seq_len - at)  # padding: its own segment 0
    return out


class PackedBatches(Batches):
    """Batches over packed rows, yielding (x, y, positions, segment_ids) [rows, seq_len] each,
    with the sampling of `data.Batches` (global sample i of step s, seeded order per epoch)."""

    def __init__(self, rows: dict[str, np.ndarray], global_batch: int, seed: int = 0):
        self.rows = rows
        self.seq_len = int(rows["x"].shape[1])
        self.global_batch, self.seed = int(global_batch), int(seed)
        self.window = self.seq_len
        self.n_windows = int(rows["x"].shape[0])
        self._perms: dict[int, np.ndarray] = {}

    def _rows(self, windows):
        idx = np.asarray(windows, dtype=np.int64)
        return tuple(torch.from_numpy(self.rows[k][idx]) for k in ("x", "y", "pos", "seg"))


# ------------------------------------------------------------------------------ the run
@dataclass
class SFTOptions:
    lora: int | None = field(default=None, metadata={  # None: full fine-tuning
        "help": "train rank-RANK LoRA adapters (merged on export) instead of all weights", "metavar": "RANK"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA scale numerator (default 2 x rank)"})
    lora_targets: tuple[str, ...] = field(default=("attn", "mlp"), metadata={"help": "attn, mlp or both"})
    packing: bool = field(default=True, metadata={"help": "pack examples into rows (--no-packing: one example per row)"})
    overlong: Literal["skip", "truncate"] = field(default="skip", metadata={
        "help": "what to do with examples longer than --seq-len"})


class SFTTask:
    """What supervised fine-tuning plugs into `train.train`: its batches, LoRA before the
    optimizer, checkpoints that resume exactly, the merged export and its data report."""

    name = "sft"

    def __init__(self, opts: SFTOptions):
        self.opts = opts
        self.report: DataReport | None = None
        self.trainable = 0

    def batches(self, tokenizer, a, micro_global: int, main: bool):
        examples, report = load_examples(a.data, tokenizer, a.seq_len, self.opts.overlong)
        train_ex, val_ex = split_examples(examples, a.val_fraction, a.seed)
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        rows_train = pack(train_ex, a.seq_len, pad, self.opts.packing, a.seed)
        rows_val = pack(val_ex, a.seq_len, pad, self.opts.packing, a.seed)
        report.train, report.val = len(train_ex), len(val_ex)
        report.train_rows, report.val_rows = len(rows_train["x"]), len(rows_val["x"])
        report.label_tokens = int(sum((e.y != IGNORE).sum() for e in train_ex))
        report.fill = sum(len(e) for e in train_ex) / max(1, rows_train["x"].size)
        self.report = report
        if main:
            print(report.format(), flush=True)
        desc = f"{report.train} train / {report.val} val examples in {report.train_rows} rows of {a.seq_len}"
        return PackedBatches(rows_train, micro_global, a.seed), PackedBatches(rows_val, micro_global, a.seed), desc

    def prepare_model(self, model, trainer_state: dict | None) -> None:
        if self.opts.lora:
            apply_lora(model, self.opts.lora, self.opts.lora_alpha, self.opts.lora_targets)
            if trainer_state is not None:
                if "lora" not in trainer_state:
                    raise ValueError("--resume: the checkpoint holds no LoRA adapters; resume without --lora")
                load_lora_state_dict(model, trainer_state["lora"], "checkpoint trainer.pt")
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def saving(self, model):
        return base_weights(model) if has_lora(model) else nullcontext()

    def state(self, model) -> dict:
        return {"lora": lora_state_dict(model)} if has_lora(model) else {}

    def export(self, model):
        return merge_lora(model) if has_lora(model) else model

    def summary(self) -> dict:
        out = {"mode": f"lora-{self.opts.lora}" if self.opts.lora else "full", "params_trainable": self.trainable}
        if self.report is not None:
            out["data"] = self.report.as_dict()
        return {"sft": out}


def sft_args(args, opts: SFTOptions):
    """The run's TrainArgs with the fine-tuning defaults filled in where no flag was given."""
    import dataclasses
    changes = {k: v for k, v in SFT_RECIPE.items() if getattr(args, k) is None}
    if args.lr is None:
        changes["lr"] = SFT_LR["lora" if opts.lora else "full"]
    if args.tokenizer is None:
        changes["tokenizer"] = args.model
    changes["eval_at_start"] = True  # validation loss before and after
    if opts.lora:  # the router stays frozen: no bias updates, no balance loss
        changes["balance"] = "none"
    return dataclasses.replace(args, **changes)


def run_sft(args, opts: SFTOptions | None = None) -> dict:
    """Fine-tune `args.model` (a checkpoint directory) on `args.data` with the training loop."""
    opts = opts or SFTOptions()
    if not args.model:
        raise ValueError("--model: give the checkpoint directory to fine-tune")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise ValueError(f"--model {args.model}: not a checkpoint directory (no config.json)")
    a = sft_args(args, opts)
    if not os.path.isfile(os.path.join(a.tokenizer, "tokenizer.json")):
        raise ValueError(f"{a.tokenizer}: no tokenizer.json; pass --tokenizer DIR")
    if a.pp != 1 or getattr(a, "ep", 1) != 1:
        raise ValueError("nanoseek sft: --pp / --ep > 1 are not supported for fine-tuning yet")
    if opts.lora and a.precision == "fp8":
        raise ValueError("nanoseek sft: --lora does not combine with --precision fp8")
    if is_dense(load_config(a.model)):
        return train_dense(a, SFTTask(opts))
    return train(a, finetune=SFTTask(opts))
