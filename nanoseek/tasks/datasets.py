"""Word-problem datasets read from local files: GSM8K (jsonl, answer after `####`), MATH
(jsonl, answer in the solution's `\\boxed{}`; MATH-500 is the subset named by a file of problem
ids) and SVAMP (a JSON array). Checking is numeric for GSM8K/SVAMP; MATH answers are compared
by math-verify (`checker=math-verify`, the default) or by our normalized-string (or numeric)
comparison (`checker=extract`). Bad lines raise an error naming the file and line."""

from __future__ import annotations

import json
import os
import random

from .base import Problem, Task
from .extract import HASH_RE, boxed_contents, math_equal, numbers_equal, parse_number
from .verify import math_verify_equal

# how a MATH answer is compared with the gold one (`math:checker=NAME`)
MATH_CHECKERS = {"math-verify": math_verify_equal, "extract": math_equal}

INSTRUCTION = ("Think step by step inside <think></think>, then give the final answer inside "
               "<answer></answer>.")


def _prompt(question: str) -> str:
    return f"{question.strip()}\n{INSTRUCTION}\n"


def _read_jsonl(path: str, fields: tuple[str, ...]) -> list[dict]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            missing = [k for k in fields if k not in row]
            if missing:
                raise ValueError(f"{path}:{n}: missing field(s) {', '.join(missing)}")
            rows.append(row)
    return rows


class _FileTask(Task):
    splits: dict[str, str] = {}

    def __init__(self, root: str):
        self.root = root

    def _load(self, split: str) -> list[Problem]:
        raise NotImplementedError

    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
        if split not in self.splits:
            raise ValueError(f"{self.name}: unknown split {split!r} ({' or '.join(self.splits)})")
        out = self._load(split)
        if split == "train":
            held_out = {p.key for p in self._load("test")} if "test" in self.splits else set()
            out = [p for p in out if p.key not in held_out]
            random.Random(seed).shuffle(out)
        return out[:n] if n else out


class GSM8K(_FileTask):
    name = "gsm8k"
    description = "grade-school math word problems (answer after ####)"
    splits = {"train": "train.jsonl", "test": "test.jsonl"}

    def _load(self, split):
        path = os.path.join(self.root, self.splits[split])
        out = []
        for row in _read_jsonl(path, ("question", "answer")):
            m = HASH_RE.findall(row["answer"])
            gold = m[-1].strip().replace(",", "") if m else ""
            steps = row["answer"].split("####")[0].strip()
            out.append(Problem(prompt=_prompt(row["question"]), answer=gold, question=row["question"],
                               solution=f"<think>{steps}</think><answer>{gold}</answer>", key=row["question"].strip()))
        return out

    def answer_correct(self, problem, answer_text, completion):
        return numbers_equal(parse_number(answer_text), parse_number(problem.answer))


class MATH(_FileTask):
    name = "math"
    description = "competition mathematics (answer in \\boxed{})"
    splits = {"train": "train.jsonl", "test": "test.jsonl"}
    checker = "math-verify"  # also for instances made without __init__ (distill's task verifiers)

    def __init__(self, root: str, checker: str = "math-verify"):
        if checker not in MATH_CHECKERS:
            raise ValueError(f"math: unknown checker {checker!r} ({' or '.join(MATH_CHECKERS)})")
        super().__init__(root)
        self.checker = checker

    def _load(self, split):
        path = os.path.join(self.root, self.splits[split])
        out = []
        for row in _read_jsonl(path, ("problem", "solution")):
            boxed = boxed_contents(row["solution"])
            gold = boxed[-1] if boxed else ""
            out.append(Problem(prompt=_prompt(row["problem"]), answer=gold, question=row["problem"],
                               solution=f"<think>{row['solution']}</think><answer>{gold}</answer>",
                               key=row["problem"].strip(), meta={"level": row.get("level"), "type": row.get("type"),
                                                                 "id": row.get("id")}))
        return out

    def answer_correct(self, problem, answer_text, completion):
        return MATH_CHECKERS[self.checker](answer_text, problem.answer)


def read_problem_ids(path: str) -> list[str]:
    """Problem ids, one a line (`test/algebra/1`), or jsonl rows with `unique_id` or `id` (MATH-500's
    `test/algebra/1.json` form is accepted too)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    ids = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                line = str(row.get("unique_id") or row.get("id") or "")
                if not line:
                    raise ValueError(f"{path}:{n}: missing field unique_id (or id)")
            ids.append(line.removesuffix(".json"))
    return ids


class MATH500(MATH):
    """The MATH test problems named by a file of ids (the 500 of "Let's Verify Step by Step", which
    DeepSeek-R1 reports as MATH-500), in the file's order."""
    name = "math500"
    description = "the MATH test problems named by an id file (MATH-500)"
    splits = {"test": "test.jsonl"}

    def __init__(self, root: str, ids: str | None = None, checker: str = "math-verify"):
        if not ids:
            raise ValueError("math500: give the file of problem ids (math500:ids=FILE)")
        super().__init__(root, checker)
        self.ids_path = ids

    def _load(self, split):
        by_id = {p.meta["id"]: p for p in super()._load(split) if p.meta.get("id")}
        wanted = read_problem_ids(self.ids_path)
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise ValueError(f"{self.ids_path}: {len(missing)} id(s) not in {os.path.join(self.root, self.splits[split])}"
                             f", e.g. {missing[0]!r}")
        return [by_id[i] for i in wanted]


class SVAMP(_FileTask):
    name = "svamp"
    description = "simple arithmetic word problems (an evaluation set)"
    splits = {"test": "SVAMP.json"}

    def _load(self, split):
        path = os.path.join(self.root, self.splits[split])
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file")
        try:
            rows = json.load(open(path, encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON array of problems")
        out = []
        for i, row in enumerate(rows):
            missing = [k for k in ("Body", "Question", "Answer") if k not in row]
            if missing:
                raise ValueError(f"{path}: item {i}: missing field(s) {', '.join(missing)}")
            q = f"{row['Body'].strip()} {row['Question'].strip()}"
            ans = row["Answer"]
            gold = str(int(ans)) if float(ans).is_integer() else str(ans)
            out.append(Problem(prompt=_prompt(q), answer=gold, question=q, key=q))
        return out

    def answer_correct(self, problem, answer_text, completion):
        return numbers_equal(parse_number(answer_text), parse_number(problem.answer))
