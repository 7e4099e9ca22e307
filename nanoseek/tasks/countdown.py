"""Countdown: combine the given numbers with + - * to reach the target, every number used once
(the TinyZero task, generated here so it is always solvable and needs no download).

Problems come from forward generation: combine a random pair (larger first) with a random
operation until one number is left; that is the target, and the steps are a gold worked
solution. A problem whose intermediate values leave [1, max_value] is rejected. Text format::

    prompt    5,2,7,9>9|
    solution  <think>9-5=4,7-2=5,5+4=9</think><answer>7-2+9-5</answer>

Held-out problems are a fixed set; training problems whose key (sorted numbers, target) is in it
are rejected, so every test problem is unseen.
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter

from .base import GeneratedTask, Problem

OPS = "+-*"
STEP_RE = re.compile(r"(\d+)([+\-*])(\d+)=(\d+)")
EXPR_CHARS = re.compile(r"[\d+\-*() ]+")
PREC = {"+": 1, "-": 1, "*": 2}


def _combine(a: tuple[str, int], op: str, b: tuple[str, int]) -> tuple[str, int]:
    """Join two (expression, precedence) pairs with as few parentheses as the operation needs."""
    (ea, pa), (eb, pb) = a, b
    p = PREC[op]
    if pa < p:
        ea = f"({ea})"
    if pb < p or (op == "-" and pb == p):
        eb = f"({eb})"
    return f"{ea}{op}{eb}", p


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def safe_eval(expr: str) -> tuple[int, list[int]] | None:
    """Value and literal numbers of an integer + - * expression, or None if it is anything else."""
    if not expr or len(expr) > 200 or not EXPR_CHARS.fullmatch(expr):
        return None
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        return None
    nums: list[int] = []

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            nums.append(node.value)
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            left, right = ev(node.left), ev(node.right)
            if left is None or right is None:
                return None
            return left + right if isinstance(node.op, ast.Add) else left - right if isinstance(node.op, ast.Sub) else left * right
        return None

    value = ev(tree.body)
    return None if value is None else (value, nums)


class Countdown(GeneratedTask):
    name = "countdown"
    description = "reach the target with + - * using each given number once"

    def __init__(self, n_numbers: int = 4, max_number: int = 9, max_value: int = 99, test_size: int = 500,
                 test_seed: int = 1234, val_size: int = 0):
        if not 2 <= n_numbers <= 6:
            raise ValueError(f"countdown: n_numbers must be in 2..6, got {n_numbers}")
        if max_number < 1 or max_value < 1:
            raise ValueError(f"countdown: max_number and max_value must be >= 1, got {max_number} and {max_value}")
        self.n, self.max_number, self.max_value = n_numbers, max_number, max_value
        self.spec = f"countdown:n_numbers={n_numbers},max_number={max_number},max_value={max_value}"
        super().__init__(test_size, val_size, test_seed)

    # -- generation
    def _one(self, rng: random.Random) -> Problem | None:
        nums = [rng.randint(1, self.max_number) for _ in range(self.n)]
        pool = [(n, (str(n), 3)) for n in nums]  # value, (expression, precedence)
        steps = []
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            (va, ea), (vb, eb) = pool[i], pool[j]
            if va < vb:
                (va, ea), (vb, eb) = (vb, eb), (va, ea)
            op = rng.choice(OPS)
            v = _apply(va, op, vb)
            if not 1 <= v <= self.max_value:
                return None
            steps.append(f"{va}{op}{vb}={v}")
            pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [(v, _combine(ea, op, eb))]
        target, (expr, _) = pool[0]
        prompt = ",".join(map(str, nums)) + f">{target}|"
        return Problem(prompt=prompt, answer=str(target), question=prompt,
                       solution=f"<think>{','.join(steps)}</think><answer>{expr}</answer>",
                       key=f"{sorted(nums)}>{target}", meta={"numbers": nums, "target": target, "expression": expr})

    def __hash__(self):
        return hash((self.n, self.max_number, self.max_value, self.test_size, self.val_size, self.test_seed))

    def __eq__(self, other):
        return isinstance(other, Countdown) and hash(self) == hash(other)

    def problem_from(self, question: str, answer: str) -> Problem:
        """Numbers and target read back from a prompt such as `5,2,7>9|` (anywhere in the text)."""
        m = re.search(r"(\d+(?:,\d+)+)>(\d+)\|", question)
        if not m:
            raise ValueError(f"countdown: no 'a,b,c>target|' problem in {question[:80]!r}")
        nums, target = [int(v) for v in m.group(1).split(",")], int(m.group(2))
        return Problem(prompt=question, answer=str(target), question=question,
                       key=f"{sorted(nums)}>{target}", meta={"numbers": nums, "target": target})

    # -- checking
    def answer_correct(self, problem: Problem, answer_text: str | None, completion: str) -> bool:
        got = safe_eval((answer_text or "").replace(" ", ""))
        if got is None:
            return False
        value, used = got
        return value == problem.meta["target"] and Counter(used) == Counter(problem.meta["numbers"])

    def steps_valid(self, problem: Problem, thinking: str) -> bool:
        """Every `x op y=z` is right and uses numbers still in the pool; the last value is the target."""
        pool = Counter(problem.meta["numbers"])
        parts = [s for s in thinking.strip().split(",") if s]
        if len(parts) != len(problem.meta["numbers"]) - 1:
            return False
        for part in parts:
            m = STEP_RE.fullmatch(part.strip())
            if not m:
                return False
            a, op, b, z = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            need = Counter([a, b])
            if _apply(a, op, b) != z or any(pool[v] < c for v, c in need.items()):
                return False
            pool -= need
            pool[z] += 1
        return list(pool.elements()) == [problem.meta["target"]]
