"""MATH-style answer checking with Hugging Face's `math-verify`, the verifier behind open-r1's and
TRL's accuracy rewards: both answers are parsed from LaTeX (or plain expressions) into SymPy and
compared as mathematics, so equivalent forms (\\frac{1}{2}, 0.5, 1/2), sets, intervals, matrices,
equations and answers with units agree. This is the rule-based accuracy reward of the DeepSeek-R1
report (section 2.2.2) for answers that are not a single number.

The gold answer is the content of a MATH solution's last `\\boxed{}`; the prediction is the answer
our extractor took from a completion (`<answer>` tags, `\\boxed{}` or `####`). Each is checked as
if boxed, so only that answer is read, never a number elsewhere in the reasoning.
"""

from __future__ import annotations

import logging
import threading
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

# what is read from the boxed answer: LaTeX first, then a plain expression such as `1/2` or `3.5`
_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
# math-verify's timeouts use SIGALRM, which only the main thread may set; elsewhere (a server's
# worker thread) parsing runs without one
_TIMEOUT_S = 5
logging.getLogger("math_verify").setLevel(logging.ERROR)  # its one-time "timeout disabled" notice


def _timeout() -> int | None:
    return _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=65536)
def _parsed(answer: str) -> tuple:
    """The SymPy forms (and the string form) of one answer, read as if it were boxed."""
    try:
        return tuple(parse(f"\\boxed{{{answer}}}", extraction_config=_CONFIG, parsing_timeout=_timeout()))
    except Exception:  # a parser failure means "not readable", never a crash in a reward
        return ()


def math_verify_equal(pred: str | None, gold: str | None) -> bool:
    """Whether the predicted answer equals the gold answer as mathematics (math-verify)."""
    if pred is None or gold is None or not pred.strip() or not gold.strip():
        return False
    want, got = _parsed(gold.strip()), _parsed(pred.strip())
    if not want or not got:
        return False
    try:
        return bool(verify(list(want), list(got), timeout_seconds=_timeout()))
    except Exception:
        return False
