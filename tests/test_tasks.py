"""Verifiable tasks: answer extraction on tricky strings, numeric and MATH normalization, the
format reward, Countdown/arithmetic checking (strict and lenient), held-out disjointness, the
file-backed datasets, and the pass@k estimator."""

import os
import re
import warnings
from fractions import Fraction

import pytest

from conftest import SHARED_DATA
from nanoseek.tasks import Arithmetic, Countdown, get_task, pass_at_k
from nanoseek.tasks.extract import extract_answer, format_reward, math_equal, numbers_equal, parse_number


@pytest.mark.parametrize("text, expected", [
    ("<think>6*7</think><answer>42</answer>", "42"),
    ("<answer> 42 </answer> and again <answer>42</answer>", "42"),  # repeated, not ambiguous
    ("<answer>41</answer><answer>42</answer>", None),  # two different answers: ambiguous
    ("<answer>   </answer>", None),  # empty earns nothing
    ("so the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),  # nested braces
    ("<answer>The result is \\boxed{7}</answer>", "7"),  # boxed inside the tags
    ("\\boxed{3} or maybe \\boxed{4}", None),
    ("Natalia sold 48/2 = 24 clips.\n#### 1,234", "1,234"),
    ("no answer at all", None),
    ("<answer>unterminated", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text, value", [
    ("$1,234.50", Fraction("1234.5")), ("3/4", Fraction(3, 4)), ("\\frac{3}{4}", Fraction(3, 4)),
    ("50%", Fraction(50)), ("12 dollars", Fraction(12)), ("-7", Fraction(-7)), ("(5)", Fraction(5)),
    ("1 or 2", None), ("", None), (None, None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("a, b, equal", [
    ("1000001", "1000000", False), ("123456790", "123456789", False), ("1000000", "1,000,000", True),
    ("0.333333", "1/3", True), ("0.33", "1/3", False), ("2.5", "5/2", True), ("-7", "-7.0", True),
])
def test_numbers_equal_is_exact_for_integers(a, b, equal):
    """Two integers must be equal exactly (a relative tolerance accepted n + 1 for large n);
    a rounded decimal still matches its fraction."""
    assert numbers_equal(parse_number(a), parse_number(b)) is equal


def test_math_equal():
    assert math_equal("\\dfrac{1}{2}", "\\frac12")
    assert math_equal("0.5", "\\frac{1}{2}")
    assert math_equal("x = 5", "5")
    assert math_equal("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})")
    assert not math_equal("2\\sqrt{3}", "2")
    assert not math_equal(None, "2")


def test_format_reward():
    assert format_reward("<think>a</think><answer>b</answer>") == 1.0
    assert format_reward("  <think>a</think>\n<answer>b</answer>\n") == 1.0
    assert format_reward("<answer>b</answer>") == 0.0  # no thinking
    assert format_reward("<think>a</think><answer>b</answer><answer>c</answer>") == 0.0
    assert format_reward("<think>a</think><answer> </answer>") == 0.0
    assert format_reward("<think><think>a</think><answer>b</answer>") == 0.0


def test_countdown_checking():
    task = Countdown(n_numbers=4, test_size=50)
    p = task.problems("train", 1, seed=3)[0]
    nums, target = p.meta["numbers"], p.meta["target"]
    s = task.check(p, p.solution)
    assert s.correct and s.strict and s.format
    expr = p.meta["expression"]
    # the right answer after wrong worked steps: lenient yes, strict no
    bad_steps = task.check(p, f"<think>1+1=3</think><answer>{expr}</answer>")
    assert bad_steps.correct and bad_steps.format and not bad_steps.strict
    # an answer without the format: lenient only
    assert task.check(p, f"<answer>{expr}</answer>").correct
    assert not task.check(p, f"<answer>{expr}</answer>").strict
    # using a number twice, leaving one out, or a different value: wrong
    assert not task.check(p, f"<answer>{target}</answer>").correct or nums.count(target) == 1 and len(nums) == 1
    assert not task.check(p, f"<answer>{expr}+0</answer>").correct
    assert not task.check(p, f"<answer>{expr}+{nums[0]}-{nums[0]}</answer>").correct
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no SyntaxWarning from implicit multiplication
        assert not task.check(p, "<answer>3(4+5)</answer>").correct
    assert not task.check(p, "<answer>__import__('os').getcwd()</answer>").correct
    assert not task.check(p, "<answer>" + "9*" * 300 + "9</answer>").correct


def test_check_all_equals_checking_each_pair():
    from nanoseek.tasks.base import check_all
    task = Countdown(n_numbers=3, test_size=10)
    probs = task.problems("test", 3)
    texts = [probs[0].solution, probs[0].solution, "<answer>1</answer>", probs[1].solution, probs[0].solution, ""]
    pairs = [probs[0], probs[0], probs[0], probs[1], probs[2], probs[2]]  # the same text for another problem differs
    assert check_all(task, pairs, texts) == [task.check(p, t) for p, t in zip(pairs, texts)]


def test_countdown_steps_must_use_the_pool():
    task = Countdown(n_numbers=3, test_size=10)
    p = task.problems("test", 1)[0]
    a, b, c = p.meta["numbers"]
    # each step right, but a number is used twice
    fake = f"{a}+{a}={2 * a},{2 * a}+{b}={2 * a + b}"
    assert not task.steps_valid(p, fake)
    assert task.steps_valid(p, p.solution.split("<think>")[1].split("</think>")[0])


def test_countdown_held_out_is_disjoint_and_fixed():
    task = Countdown(n_numbers=4, test_size=300)
    test = task.problems("test")
    assert len(test) == 300 and len({p.key for p in test}) == 300
    assert [p.key for p in Countdown(n_numbers=4, test_size=300).problems("test")] == [p.key for p in test]
    keys = {p.key for p in test}
    stream = task.stream(seed=5)
    train = [next(stream) for _ in range(5000)]
    assert not keys & {p.key for p in train}
    for p in test[:50]:
        assert task.check(p, p.solution).strict


def canonical(task, p):
    """A problem up to its task's symmetries, computed here rather than by the task's own key:
    Countdown's numbers in any order; arithmetic's `a+b` = `b+a` and `a*b` = `b*a`."""
    m = p.meta
    if isinstance(task, Countdown):
        return tuple(sorted(m["numbers"])), m["target"]
    a, b = (sorted((m["a"], m["b"])) if m["op"] in "+*" else (m["a"], m["b"]))
    return m["op"], a, b


@pytest.mark.parametrize("spec", [
    "countdown:n_numbers=2,test_size=30,val_size=10", "countdown:n_numbers=3,val_size=250",
    "countdown:n_numbers=4,test_size=300,val_size=100", "countdown:n_numbers=3,max_number=20,max_value=200",
    "arithmetic:digits=1,test_size=40,val_size=20", "arithmetic:digits=2,val_size=200", "arithmetic:digits=3",
    "arithmetic:digits=2,ops=*", "arithmetic:digits=2,ops=+-"])
def test_held_out_sets_disjoint_up_to_symmetry(spec):
    """Test, validation and training problems of every generated task share no problem, counting a
    problem and its rearrangements (commuted operands, permuted numbers) as one."""
    task = get_task(spec)
    test = [canonical(task, p) for p in task.problems("test")]
    val = [canonical(task, p) for p in task.problems("val")] if task.has_split("val") else []
    assert len(test) == task.test_size == len(set(test)) and len(val) == task.val_size == len(set(val))
    assert not set(test) & set(val)
    for seed in range(3):
        train = {canonical(task, p) for p in task.problems("train", 3000, seed=seed)}
        assert not train & (set(test) | set(val)), spec
    # the test set does not move when a validation set is added (it is drawn first)
    plain = get_task(re.sub(r",val_size=\d+", "", spec))
    assert [p.prompt for p in plain.problems("test")] == [p.prompt for p in task.problems("test")]


@pytest.mark.parametrize("spec,why", [
    ("countdown:n_numbers=2", "only 125 distinct problems were found"),  # fewer than the 500 held out
    ("arithmetic:digits=1", "only 165 distinct problems were found"),
    ("countdown:n_numbers=2,test_size=100", "would leave only 25 distinct problems for training"),
    ("countdown:n_numbers=3,test_size=0", "test_size must be >= 1"),
    ("countdown:n_numbers=3,max_number=0", "max_number and max_value must be >= 1"),
])
def test_impossible_task_settings_are_refused_when_built(spec, why):
    with pytest.raises(ValueError, match=why):
        get_task(spec)
    with pytest.raises(ValueError, match="no validation set"):
        Countdown(n_numbers=3).problems("val")


def test_arithmetic():
    task = Arithmetic(digits=3, ops="*")
    p = task.problems("test", 1)[0]
    assert task.check(p, p.solution).strict
    wrong = p.solution.replace(f"<answer>{p.answer}</answer>", f"<answer>{int(p.answer) + 1}</answer>")
    assert not task.check(p, wrong).correct
    assert task.check(p, f"the answer is \\boxed{{{int(p.answer):,}}}").correct
    assert not {q.key for q in task.problems("test")} & {q.key for q in task.problems("train", 2000)}
    with pytest.raises(ValueError, match="digits"):
        Arithmetic(digits=0)
    z = Arithmetic(digits=1, ops="*", test_size=10)  # b = 0 has a worked solution too
    p = next(q for q in z.problems("train", 500) if q.meta["b"] == 0)
    assert z.check(p, p.solution).strict


def test_pass_at_k():
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(8, 1, 8) == 1.0
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)


def test_get_task_errors():
    with pytest.raises(ValueError, match="unknown task"):
        get_task("chess")
    with pytest.raises(ValueError, match="reads local files"):
        get_task("gsm8k")
    with pytest.raises(ValueError, match="key=value"):
        get_task("countdown:5")
    assert get_task("countdown:n_numbers=3").n == 3


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "gsm8k")), reason="no GSM8K data")
def test_gsm8k_from_files():
    task = get_task("gsm8k", os.path.join(SHARED_DATA, "gsm8k"))
    test = task.problems("test")
    assert len(test) == 1319
    p = test[0]
    assert p.answer == "18"
    assert task.check(p, p.solution).strict
    assert task.check(p, "She makes $18 a day.\n#### 18").correct
    assert not task.check(p, "<answer>17</answer>").correct
    assert not {q.key for q in test} & {q.key for q in task.problems("train", 500)}


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "math_hendrycks")), reason="no MATH data")
def test_math_from_files():
    task = get_task("math", os.path.join(SHARED_DATA, "math_hendrycks"))
    p = task.problems("test", 1)[0]
    assert p.answer == "2"
    assert task.check(p, "<think>factor</think><answer>\\boxed{2}</answer>").strict
    assert not task.check(p, "<answer>3</answer>").correct


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "svamp")), reason="no SVAMP data")
def test_svamp_from_files(tmp_path):
    task = get_task("svamp", os.path.join(SHARED_DATA, "svamp"))
    test = task.problems("test")
    assert len(test) == 1000 and test[0].answer == "51"
    assert task.check(test[0], "<answer>51.0</answer>").correct
    bad = tmp_path / "SVAMP.json"
    bad.write_text('[{"Body": "x"}]')
    with pytest.raises(ValueError, match="item 0: missing field"):
        get_task("svamp", str(tmp_path)).problems("test")


def test_task_verifiers_for_distillation():
    """`distill --verifier task:NAME` checks completions with the task's own rules."""
    from nanoseek.finetune.distill import PromptRecord, get_verifier, verify
    rec = PromptRecord([{"role": "user", "content": "6,2,1>4|"}], "4", "x:1")
    name, fn = get_verifier("task:countdown", [rec])
    assert name == "task:countdown"
    assert verify(fn, "<think>6-2=4,4*1=4</think><answer>(6-2)*1</answer>", rec)
    assert not verify(fn, "<answer>6-2</answer>", rec)  # 1 left unused
    gsm = PromptRecord([{"role": "user", "content": "How many?"}], "1,234", "x:2")
    _, fn = get_verifier("task:gsm8k", [gsm])
    assert verify(fn, "so 1234 in all\n#### 1234", gsm) and not verify(fn, "<answer>1235</answer>", gsm)
    with pytest.raises(ValueError, match="unknown task"):
        get_verifier("task:chess", [rec])
