"""math-verify against our extractor's comparison on real MATH and GSM8K answers.

    python -m dev.compare_math_checkers --data ../shared/data --out runs/checkers

Each gold answer of the MATH and GSM8K test sets is checked against rewritings of itself whose
verdict is known: equivalent forms (the answer as written, boxed, in dollars, `\\dfrac` for
`\\frac`, `a/b` and a decimal for a fraction, thousands separators, `x = ` in front, units,
`\\left(`/`\\right)`, a comma list in another order) must be accepted, changed ones (the number
plus one, another problem's answer) refused. Both checkers see the same extracted answer string
(`extract_answer` of `<answer>REWRITING</answer>`):

- ours: `math_equal` for MATH (normalized strings, numbers compared as numbers), and
  `numbers_equal(parse_number(...))` for GSM8K (its task's checker);
- math-verify: `math_verify_equal` (nanoseek/tasks/verify.py).

Writes `disagreements.jsonl` (every case where the two differ, with the expected verdict and so
which one is right) and `summary.json` (counts per rewriting) under --out, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import time
from collections import Counter, defaultdict
from decimal import Decimal
from fractions import Fraction

from nanoseek.tasks import get_task
from nanoseek.tasks.extract import extract_answer, math_equal, numbers_equal, parse_number
from nanoseek.tasks.verify import math_verify_equal

FRAC_RE = re.compile(r"^(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}$")
INT_RE = re.compile(r"^-?\d+$")
DECIMAL_RE = re.compile(r"^-?\d+\.\d+$")


def _decimal(f: Fraction) -> str | None:
    """A terminating decimal for f (denominator 2^a 5^b), else None."""
    d = f.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d != 1:
        return None
    s = f"{float(f):.10f}".rstrip("0").rstrip(".")
    return s if Fraction(s) == f else None


def _thousands(n: int) -> str:
    return f"{n:,}"


def _top_level_commas(s: str) -> list[str] | None:
    """The parts of a comma list outside every bracket, or None when there is no such list."""
    depth, parts, start = 0, [], 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0 and s[i - 1:i] != "\\":  # `\,` is a thin space, not a comma
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return [p.strip() for p in parts] if len(parts) > 1 and all(p.strip() for p in parts) else None


def rewritings(gold: str, other: str) -> list[tuple[str, str, bool]]:
    """(kind, rewritten answer, should be accepted) for one gold answer; `other` is another
    problem's answer (a wrong one unless it is equal)."""
    g = gold.strip()
    out = [("as written", g, True), ("boxed", f"\\boxed{{{g}}}", True), ("in dollars", f"${g}$", True),
           ("spaces around", f"  {g} ", True)]
    if not re.search(r"[a-zA-Z=]", re.sub(r"\\[a-zA-Z]+", "", g)):  # a bare value: the equation x = value names it
        out.append(("x = answer", f"x = {g}", True))
    if "\\frac" in g:
        out.append(("\\dfrac for \\frac", g.replace("\\frac", "\\dfrac"), True))
    m = FRAC_RE.match(g)
    if m:
        sign, a, b = m.group(1), int(m.group(2)), int(m.group(3))
        f = Fraction(a, b) * (-1 if sign else 1)
        out.append(("a/b for \\frac{a}{b}", f"{sign}{a}/{b}", True))
        dec = _decimal(f)
        if dec is not None:
            out.append(("decimal for a fraction", dec, True))
    if INT_RE.match(g):
        n = int(g)
        out += [("n.0 for an integer", f"{n}.0", True), ("the number plus one", str(n + 1), False),
                ("with a unit", f"{n}\\text{{ cm}}", True), ("a dollar sign", f"\\${n}", True)]
        if abs(n) >= 1000:
            out.append(("thousands separators", _thousands(n), True))
    if DECIMAL_RE.match(g):
        out.append(("the number plus one", str(Decimal(g) + 1), False))
    if g.startswith("(") and g.endswith(")") and "\\left" not in g:
        out.append(("\\left( \\right)", "\\left" + g[:-1] + "\\right)", True))
    parts = _top_level_commas(g)
    thousands = re.search(r",(\\!)?\s*\d{3}(?!\d)", g)  # 15,\!000 is one number, not a list
    if parts and len(set(parts)) == len(parts) and not g.startswith(("(", "[")) and not thousands:
        out.append(("comma list reordered", ", ".join(reversed(parts)), True))
    if other.strip() and other.strip() != g:
        out.append(("another problem's answer", other.strip(), False))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.path.join("..", "shared", "data"),
                    help="folder holding math_hendrycks/ and gsm8k/")
    ap.add_argument("--out", default="runs/checkers")
    ap.add_argument("--limit", type=int, help="only the first N problems of each test set")
    args = ap.parse_args()
    sets = []
    math_dir, gsm_dir = os.path.join(args.data, "math_hendrycks"), os.path.join(args.data, "gsm8k")
    if os.path.isdir(math_dir):
        sets.append(("math", get_task("math", math_dir).problems("test", args.limit), math_equal))
    if os.path.isdir(gsm_dir):
        sets.append(("gsm8k", get_task("gsm8k", gsm_dir).problems("test", args.limit),
                     lambda pred, gold: numbers_equal(parse_number(pred), parse_number(gold))))
    if not sets:
        raise SystemExit(f"no MATH or GSM8K data under {args.data}")
    os.makedirs(args.out, exist_ok=True)
    rng = random.Random(0)
    counts: dict[tuple, Counter] = defaultdict(Counter)
    disagreements = []
    t0 = time.time()
    for name, problems, ours_fn in sets:
        golds = [p.answer for p in problems if p.answer.strip()]
        for gold in golds:
            for kind, text, expected in rewritings(gold, rng.choice(golds)):
                pred = extract_answer(f"<answer>{text}</answer>")
                ours, verified = bool(ours_fn(pred, gold)), math_verify_equal(pred, gold)
                c = counts[(name, kind)]
                c["cases"] += 1
                c["ours right"] += ours == expected
                c["math-verify right"] += verified == expected
                if ours != verified:
                    c["disagree"] += 1
                    disagreements.append({"set": name, "kind": kind, "gold": gold, "prediction": pred,
                                          "expected": expected, "ours": ours, "math_verify": verified,
                                          "right": "ours" if ours == expected else "math-verify"})
    fields = ("cases", "ours right", "math-verify right", "disagree")
    summary = [{"set": s, "kind": k, **{f: c[f] for f in fields}} for (s, k), c in sorted(counts.items())]
    with open(os.path.join(args.out, "disagreements.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(d) + "\n" for d in disagreements)
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    head = f"{'set':<6} {'rewriting':<26} {'cases':>6} {'ours ok':>8} {'m-v ok':>8} {'disagree':>8}"
    print(head)
    for r in summary:
        print(f"{r['set']:<6} {r['kind']:<26} {r['cases']:>6} {r['ours right']:>8} {r['math-verify right']:>8} "
              f"{r['disagree']:>8}")
    total = Counter()
    for r in summary:
        total.update({k: r[k] for k in fields})
    print(f"{'all':<6} {'':<26} {total['cases']:>6} {total['ours right']:>8} {total['math-verify right']:>8} "
          f"{total['disagree']:>8}   ({time.time() - t0:.0f} s; {args.out}/disagreements.jsonl)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
