"""A task from any jsonl file of {"problem", "answer"} rows (`jsonl:PATH`): the AIME-style sets a
user brings. Every row is a held-out problem (the file is a test set); answers are compared by
math-verify, as MATH's are. A row that is not valid JSON or lacks a field is reported with its
file:line in `skipped` and left out; the other rows are evaluated.
"""

from __future__ import annotations

import json
import os

from .base import Problem, Task
from .datasets import _prompt
from .verify import math_verify_equal

FIELDS = ("problem", "answer")


class ProblemFile(Task):
    name = "jsonl"
    description = "problems and answers from a jsonl file ({\"problem\", \"answer\"} per line)"

    def __init__(self, path: str):
        if not path:
            raise ValueError("jsonl: give the file (jsonl:PATH)")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        self.path = path
        self.skipped: list[str] = []  # "file:line: why" for each row left out
        self._problems = self._load()

    def _load(self) -> list[Problem]:
        out, self.skipped = [], []
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{self.path}:{n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    self.skipped.append(f"{where}: not valid JSON ({e.msg})")
                    continue
                if not isinstance(row, dict):
                    self.skipped.append(f"{where}: expected an object with fields {', '.join(FIELDS)}")
                    continue
                missing = [k for k in FIELDS if k not in row or str(row[k]).strip() == ""]
                if missing:
                    self.skipped.append(f"{where}: missing field(s) {', '.join(missing)}")
                    continue
                question = str(row["problem"])
                out.append(Problem(prompt=_prompt(question), answer=str(row["answer"]).strip(), question=question,
                                   key=question.strip(), meta={"line": n, "id": row.get("id")}))
        return out

    def has_split(self, split: str) -> bool:
        return split == "test"

    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
        if split != "test":
            raise ValueError(f"jsonl: {self.path} is a test set; there is no {split!r} split")
        return self._problems[:n] if n else list(self._problems)

    def answer_correct(self, problem: Problem, answer_text: str | None, completion: str) -> bool:
        return math_verify_equal(answer_text, problem.answer)
