"""Multi-digit arithmetic (+, -, *), generated locally with the difficulty set by the number of
digits. Multiplication comes with a worked solution of partial products, which the strict check
verifies::

    prompt    347*26=
    solution  <think>347*6=2082,347*20=6940,2082+6940=9022</think><answer>9022</answer>
"""

from __future__ import annotations

import random
import re

from .base import GeneratedTask, Problem
from .extract import numbers_equal, parse_number

STEP_RE = re.compile(r"(-?\d+)([+\-*])(-?\d+)=(-?\d+)")


def _worked_steps(a: int, op: str, b: int) -> list[str]:
    if op != "*":
        return [f"{a}{op}{b}={a + b if op == '+' else a - b}"]
    parts, steps = [], []
    for place, digit in enumerate(reversed(str(b))):
        if digit != "0":
            term = int(digit) * 10 ** place
            parts.append(a * term)
            steps.append(f"{a}*{term}={a * term}")
    if not parts:  # b == 0
        return [f"{a}*0=0"]
    total = parts[0]
    for p in parts[1:]:
        steps.append(f"{total}+{p}={total + p}")
        total += p
    return steps


class Arithmetic(GeneratedTask):
    name = "arithmetic"
    description = "multi-digit addition, subtraction and multiplication"

    def __init__(self, digits: int = 3, ops: str = "+-*", test_size: int = 500, test_seed: int = 4321,
                 val_size: int = 0):
        if not 1 <= digits <= 12:
            raise ValueError(f"arithmetic: digits must be in 1..12, got {digits}")
        if not ops or set(ops) - set("+-*"):
            raise ValueError(f"arithmetic: ops must be made of + - *, got {ops!r}")
        self.digits, self.ops = digits, ops
        self.spec = f"arithmetic:digits={digits},ops={ops}"
        super().__init__(test_size, val_size, test_seed)

    def _one(self, rng: random.Random) -> Problem:
        lo, hi = 10 ** (self.digits - 1) if self.digits > 1 else 0, 10 ** self.digits - 1
        a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice(self.ops)
        if op == "-" and b > a:
            a, b = b, a
        value = a + b if op == "+" else a - b if op == "-" else a * b
        prompt = f"{a}{op}{b}="
        key = f"{min(a, b)}{op}{max(a, b)}" if op in "+*" else prompt  # a+b and b+a are one problem
        return Problem(prompt=prompt, answer=str(value), question=f"What is {a} {op} {b}?", key=key,
                       solution=f"<think>{','.join(_worked_steps(a, op, b))}</think><answer>{value}</answer>",
                       meta={"a": a, "b": b, "op": op})

    def __hash__(self):
        return hash((self.digits, self.ops, self.test_size, self.val_size, self.test_seed))

    def __eq__(self, other):
        return isinstance(other, Arithmetic) and hash(self) == hash(other)

    def answer_correct(self, problem: Problem, answer_text: str | None, completion: str) -> bool:
        return numbers_equal(parse_number(answer_text), parse_number(problem.answer))

    def steps_valid(self, problem: Problem, thinking: str) -> bool:
        """Each written step is right and the last one ends on the answer."""
        steps = [s for s in thinking.strip().split(",") if s]
        last = None
        for s in steps:
            m = STEP_RE.fullmatch(s.strip())
            if not m:
                return False
            a, op, b, z = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            if (a + b if op == "+" else a - b if op == "-" else a * b) != z:
                return False
            last = z
        return last is not None and str(last) == problem.answer
