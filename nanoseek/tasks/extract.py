"""Answer extraction and normalization for rule-based rewards (DeepSeek-R1 report section 2.2.2:
accuracy rewards from a deterministic checker, and a format reward for
`<think>...</think><answer>...</answer>`).

An answer is taken from, in order: `<answer>...</answer>` tags, `\\boxed{...}`, or a `#### x`
line. Several *different* answers by the same route count as ambiguous, and an ambiguous or
empty answer earns nothing.
"""

from __future__ import annotations

import re
from fractions import Fraction

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
HASH_RE = re.compile(r"####\s*([^\n]*)")
FORMAT_RE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def boxed_contents(text: str) -> list[str]:
    """The contents of every `\\boxed{...}` (or `\\fbox{...}`), nested braces respected."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end():i - 1])
    return out


def _single(candidates: list[str]) -> str | None:
    """The one distinct non-empty candidate, else None (none, or ambiguous)."""
    distinct = {c.strip() for c in candidates if c.strip()}
    return distinct.pop() if len(distinct) == 1 else None


def extract_answer(text: str) -> str | None:
    """The final answer in `text`, or None when there is none or it is ambiguous."""
    for route, finder in enumerate((ANSWER_RE.findall, boxed_contents, HASH_RE.findall)):
        found = finder(text)
        if found:
            inner = _single(found)
            if inner is not None and route == 0:  # a boxed answer inside the tags
                boxed = boxed_contents(inner)
                if boxed:
                    return _single(boxed)
            return inner
    return None


def format_ok(text: str) -> bool:
    """Exactly one `<think>...</think>` followed by exactly one non-empty `<answer>...</answer>`."""
    m = FORMAT_RE.fullmatch(text)
    return bool(m) and m.group(2).strip() != "" and text.count("<think>") == 1 and text.count("<answer>") == 1


def format_reward(text: str) -> float:
    return 1.0 if format_ok(text) else 0.0


def parse_number(s: str | None) -> Fraction | None:
    """A number written as plain text or simple LaTeX ("1,234", "$5", "-3.50", "3/4", "\\frac{3}{4}",
    "50%", "12 dollars"); None when there is no number or more than one."""
    if s is None:
        return None
    t = s.strip().replace("\\!", "").replace("\\,", "").replace("\\$", "").replace("$", "")
    t = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"(\1)/(\2)", t)
    t = re.sub(r"\\[dt]?frac(\d)(\d)", r"\1/\2", t)  # \frac12
    t = re.sub(r"\\text\s*\{[^{}]*\}", "", t).replace("\\%", "").replace("%", "")
    t = re.sub(r"(?<=\d),(?=\d{3}\b)", "", t)  # thousands separators
    t = re.sub(r"\((-?\d+(?:\.\d+)?)\)", r"\1", t).rstrip(". ")
    found = NUMBER_RE.findall(t)
    if len(found) != 1:
        return None
    try:
        return Fraction(found[0])
    except (ValueError, ZeroDivisionError):
        return None


def numbers_equal(a: Fraction | None, b: Fraction | None, rel: float = 1e-6) -> bool:
    """Exact for two integers (a relative tolerance would accept 1000001 for 1000000); otherwise
    equal up to `rel` of b's size, so a rounded decimal (0.333333) matches a fraction (1/3)."""
    if a is None or b is None:
        return False
    if a.denominator == 1 and b.denominator == 1:
        return a == b
    return a == b or abs(float(a) - float(b)) <= rel * max(1.0, abs(float(b)))


def normalize_math(s: str | None) -> str | None:
    """A canonical string for a MATH answer (spacing, \\left/\\right, \\dfrac, units, degrees,
    surrounding $ and a trailing period removed), for exact comparison."""
    if s is None:
        return None
    t = s.strip().strip("$").rstrip(".").strip()
    for old, new in (("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
                     ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""),
                     ("\\displaystyle", "")):
        t = t.replace(old, new)
    t = re.sub(r"\\text\s*\{\s*([^{}]*?)\s*\}", r"\1", t)
    t = re.sub(r"\\mbox\s*\{\s*([^{}]*?)\s*\}", r"\1", t)
    t = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", t)  # \frac12 -> \frac{1}{2}
    t = re.sub(r"\s+", "", t)
    if t.startswith("x=") or t.startswith("y="):
        t = t[2:]
    return t or None


def math_equal(pred: str | None, gold: str | None) -> bool:
    """Equal as numbers when both read as one number, else as normalized strings."""
    a, b = parse_number(pred), parse_number(gold)
    if a is not None and b is not None and _plain_numeric(pred) and _plain_numeric(gold):
        return numbers_equal(a, b)
    na, nb = normalize_math(pred), normalize_math(gold)
    return na is not None and na == nb


def _plain_numeric(s: str) -> bool:
    """True when s is a number and nothing else that matters (so "2\\sqrt{3}" is not 2)."""
    t = normalize_math(s) or ""
    t = re.sub(r"\\frac\{(-?\d+)\}\{(\d+)\}", r"\1/\2", t).replace(",", "")
    return re.fullmatch(r"-?\d+(\.\d+)?(/\d+)?", t) is not None
