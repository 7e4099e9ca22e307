"""`nanoseek eval`: the command end to end on a tiny model (CLI, the --json last line, the records
JSONL), the pass@k estimator against brute force, eval == the quickstart's own measurement on the
same model and problems, bits per byte against a direct computation, bad input (unknown task, a
jsonl row without a field reported as file:line while the rest is evaluated, models that cannot
load), MATH-500 ids, math-verify on MATH-style answers, and GSM8K/MATH/SVAMP from the shared data
with --limit (skipped where the data is absent). The full quickstart reproduction is `slow`."""

import itertools
import json
import math
import os

import pytest
import torch

from conftest import SHARED_DATA
from fixtures.make_fixtures import MEMORIZER
from nanoseek import cli
from nanoseek.bpb import bits_per_byte, windows
from nanoseek.evaluation import BARE_TASKS, EvalSettings, TaskRun, evaluate_task, load_model, pass_at_ks, run_eval
from nanoseek.model import DeepSeekV3
from nanoseek.recipes.quickstart import SMOKE, measure
from nanoseek.infer.store import Store
from nanoseek.tasks import Countdown, get_task, pass_at_k
from nanoseek.tasks.verify import math_verify_equal
from nanoseek.tokenizer import Tokenizer

SUMMARY_FIELDS = {"task", "n", "accuracy", "accuracy_strict", "pass_at_1", "pass_at_k", "mean_completion_tokens",
                  "truncated", "seconds", "records"}


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def write_problems(path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_pass_at_k_matches_brute_force():
    """The unbiased estimator equals the fraction of k-subsets of the n samples with a correct one."""
    for n, c in [(4, 0), (4, 1), (5, 2), (6, 6), (8, 3)]:
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    got = pass_at_ks([0, 1, 4], 4)
    assert list(got) == ["1", "2", "4"]
    assert got["1"] == pytest.approx((0 + 0.25 + 1) / 3)
    assert got["2"] == pytest.approx((0 + 0.5 + 1) / 3)
    assert got["4"] == pytest.approx((0 + 1 + 1) / 3)
    assert list(pass_at_ks([1], 6)) == ["1", "2", "4", "6"]


def test_cli_end_to_end_on_a_store_model(tmp_path, monkeypatch, capsys):
    """A store name, a jsonl task with one bad row: the rest evaluated, the bad row named by
    file:line, the --json last line with every field, one record per problem."""
    monkeypatch.setenv("NANOSEEK_HOME", str(tmp_path / "home"))
    Store().create("tiny", MEMORIZER)
    data = write_problems(tmp_path / "aime.jsonl", [
        {"problem": "What is two plus two?", "answer": "4"},
        {"problem": "What is half of one?", "answer": "\\frac{1}{2}"},
        {"problem": "A row without its answer"},
        "",
        {"problem": "What is three times three?", "answer": "9", "id": "p3"},
    ])
    out = tmp_path / "out"
    assert cli.main(["eval", "tiny", "--task", f"jsonl:{data}", "--samples", "3", "--temperature", "1.0",
                     "--max-new-tokens", "6", "--out", str(out), "--no-progress", "--json"]) == 0
    captured = capsys.readouterr()
    assert f"{data}:3: missing field(s) answer" in captured.err
    r = last_json(captured.out)
    assert SUMMARY_FIELDS <= set(r)
    assert r["task"] == f"jsonl:{data}" and r["n"] == 3 and r["skipped"] == [f"{data}:3: missing field(s) answer"]
    assert list(r["pass_at_k"]) == ["1", "2", "3"] and r["pass_at_1"] == r["pass_at_k"]["1"]
    for key in ("accuracy", "accuracy_strict", "pass_at_1", "truncated", *r["pass_at_k"]):
        value = r["pass_at_k"][key] if key in r["pass_at_k"] else r[key]
        assert 0.0 <= value <= 1.0
    assert 0 < r["mean_completion_tokens"] <= 6
    assert "pass@3" in captured.out and "greedy" in captured.out  # the summary table
    recs = [json.loads(line) for line in open(r["records"])]
    assert os.path.dirname(r["records"]) == str(out) and len(recs) == 3
    assert [x["answer"] for x in recs] == ["4", "\\frac{1}{2}", "9"] and recs[2]["id"] == "p3"
    for x in recs:
        assert {"prompt", "question", "answer", "greedy", "samples", "pass_at_1"} <= set(x)
        assert len(x["samples"]) == 3
        assert {"completion", "extracted", "correct", "strict", "tokens", "finish_reason"} <= set(x["greedy"])


class HalfRight(Countdown):
    """Countdown whose checker accepts a completion when its length and the target have the same
    parity: right for some completions and wrong for others, so that equal accuracies say the
    same completions were checked."""

    def answer_correct(self, problem, answer_text, completion):
        return (len(completion) + problem.meta["target"]) % 2 == 0


def test_eval_equals_the_quickstart_measurement():
    """The contract behind `nanoseek eval quickstart --task countdown`: on the same model and
    problems, eval's numbers are those of the quickstart's own measurement (quickstart.measure:
    greedy, and k samples at temperature 1 from seed 0)."""
    task = HalfRight(n_numbers=3, test_size=24, val_size=0)
    problems = task.problems("test")
    q = measure(MEMORIZER, task, problems, k=4, max_new_tokens=10)
    model, tok, _ = load_model(MEMORIZER)
    run = TaskRun("countdown", task, problems, max_new_tokens=10, chat=False)
    e, recs = evaluate_task(model, tok, run, EvalSettings(samples=4, temperature=1.0, top_p=1.0), progress=False)
    assert 0 < q["accuracy"] < 1 and 0 < q["pass_at_1_sampled"] < 1  # the comparison means something
    assert e["accuracy"] == q["accuracy"] and e["accuracy_strict"] == q["accuracy_strict"]
    assert e["mean_completion_tokens"] == q["mean_length"]
    assert e["pass_at_1"] == q["pass_at_1_sampled"] and e["pass_at_k"]["4"] == q["pass_at_4"]
    assert [r["greedy"]["correct"] for r in recs].count(True) == round(q["accuracy"] * len(problems))


def test_bare_countdown_is_the_quickstarts_test_set():
    spec, tokens = BARE_TASKS["countdown"]
    assert tokens == 40
    ours = get_task(spec).problems("test")
    theirs = get_task("countdown:n_numbers=3,test_size=500,val_size=250").problems("test")
    assert [p.prompt for p in ours] == [p.prompt for p in theirs] and len(ours) == 500


def test_bits_per_byte_equals_a_direct_computation(tmp_path):
    tok = Tokenizer.from_dir(MEMORIZER)
    model = DeepSeekV3.from_pretrained(MEMORIZER).eval()
    text = "What is two plus two? Two plus two is four. " * 3
    ids = tok.encode(text)
    assert sum(len(w) - 1 for w in windows(ids, 7, tok.bos_id)) == len(ids)  # each token scored once
    assert sum(len(w) - 1 for w in windows(ids, 7, None)) == len(ids) - 1
    r = bits_per_byte(model, tok, [text], context=len(ids) + 1)
    with torch.no_grad():
        full = torch.tensor([[tok.bos_id] + ids])
        nll = torch.nn.functional.cross_entropy(model(full[:, :-1])[0].float(), full[0, 1:], reduction="sum").item()
    assert r["windows"] == 1 and r["tokens"] == len(ids) and r["bytes"] == len(text.encode())
    assert r["bits_per_byte"] == pytest.approx(nll / (math.log(2) * len(text.encode())), rel=1e-5)
    short = bits_per_byte(model, tok, [text], context=8)  # many windows, less context: worse, same counts
    assert short["tokens"] == len(ids) and short["windows"] > 1 and short["bits_per_byte"] > 0
    path = tmp_path / "held_out.txt"
    path.write_text(text)
    assert cli.main(["eval", MEMORIZER, "--bpb", "--data", str(path), "--context", str(len(ids) + 1),
                     "--no-progress"]) == 0


def test_bpb_cli_json(tmp_path, capsys):
    path = write_problems(tmp_path / "held_out.jsonl", [{"text": "Two plus two is four."}, {"text": "Four."}])
    assert cli.main(["eval", MEMORIZER, "--bpb", "--data", path, "--no-progress", "--json"]) == 0
    r = last_json(capsys.readouterr().out)
    assert r["task"] == "bpb" and r["bits_per_byte"] > 0 and r["bytes"] == len("Two plus two is four.Four.")


@pytest.mark.parametrize("argv, message", [
    (["--task", "chess"], "unknown task 'chess'"),
    (["--task", "gsm8k"], "reads local files"),
    (["--task", "jsonl:/no/such/file.jsonl"], "/no/such/file.jsonl: no such file"),
    (["--task", "math500", "--task-data", "."], "math500:ids=FILE"),
    ([], "give --task"),
    (["--bpb"], "--bpb needs --data"),
])
def test_bad_task_input(argv, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["eval", MEMORIZER, *argv, "--no-progress"])


def test_models_that_cannot_load(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSEEK_HOME", str(tmp_path / "home"))
    data = write_problems(tmp_path / "p.jsonl", [{"problem": "1+1?", "answer": "2"}])
    for model, message in [("model.gguf", "GGUF models are not supported yet"),
                           ("no-such-model", "model 'no-such-model' not found")]:
        with pytest.raises(SystemExit, match=message):
            cli.main(["eval", model, "--task", f"jsonl:{data}", "--no-progress"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(json.load(open(os.path.join(MEMORIZER, "config.json")))))
    with pytest.raises(SystemExit, match="cannot be loaded"):
        cli.main(["eval", str(broken), "--task", f"jsonl:{data}", "--no-progress"])


def test_math500_from_an_id_file(tmp_path):
    root = tmp_path / "math"
    root.mkdir()
    write_problems(root / "test.jsonl", [
        {"id": f"test/algebra/{i}", "problem": f"What is {i} + {i}?", "solution": f"It is $\\boxed{{{2 * i}}}$."}
        for i in range(1, 6)])
    ids = write_problems(tmp_path / "ids.jsonl", [{"unique_id": "test/algebra/4.json"}, "test/algebra/2"])
    task = get_task(f"math500:ids={ids}", str(root))
    assert [p.answer for p in task.problems("test")] == ["8", "4"]
    with pytest.raises(ValueError, match="1 id\\(s\\) not in"):
        get_task(f"math500:ids={write_problems(tmp_path / 'bad.txt', ['test/algebra/9'])}", str(root)).problems("test")


@pytest.mark.parametrize("pred, gold, equal", [
    ("0.5", "\\frac{1}{2}", True), ("1/2", "\\frac12", True), ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
    ("\\{2, 1\\}", "\\{1,2\\}", True), ("(0,1]", "[0,1)", False), ("10\\text{ cm}", "10", True),
    ("(x+1)^2", "x^2+2x+1", True), ("2\\sqrt{3}", "2", False), (None, "2", False), ("3", "", False),
])
def test_math_verify_checks_math_answers(pred, gold, equal):
    assert math_verify_equal(pred, gold) is equal


def test_math_checker_choice(tmp_path):
    root = tmp_path / "math"
    root.mkdir()
    write_problems(root / "test.jsonl", [{"problem": "Half?", "solution": "$\\boxed{\\frac{1}{2}}$"}])
    done = "<think>x</think><answer>1/2</answer>"
    verified = get_task("math", str(root))
    assert verified.checker == "math-verify" and verified.check(verified.problems("test")[0], done).correct
    extract = get_task("math:checker=extract", str(root))
    assert extract.check(extract.problems("test")[0], done).correct  # both agree here
    with pytest.raises(ValueError, match="unknown checker"):
        get_task("math:checker=sympy", str(root))


@pytest.mark.parametrize("name, folder", [("gsm8k", "gsm8k"), ("math", "math_hendrycks"), ("svamp", "svamp")])
def test_word_problems_from_shared_data(name, folder, tmp_path):
    root = os.path.join(SHARED_DATA, folder)
    if not os.path.isdir(root):
        pytest.skip(f"no {folder} data")
    r, = run_eval(MEMORIZER, [f"{name}:root={root}"], EvalSettings(limit=2, max_new_tokens=4), str(tmp_path),
                  progress=False)
    assert r["n"] == 2 and r["mean_completion_tokens"] <= 4
    recs = [json.loads(line) for line in open(r["records"])]
    assert len(recs) == 2 and all(x["answer"] for x in recs)


@pytest.mark.slow
@pytest.mark.parametrize("smoke", [True, False])
def test_eval_reproduces_the_quickstart(smoke, tmp_path, monkeypatch, capsys):
    """`nanoseek eval quickstart --task countdown --json` gives the quickstart's held-out greedy
    accuracy after RL, exactly (--smoke: its 32 problems; else the full run, about 10 minutes), on
    as many threads as the quickstart measured with (half of them when the control ran alongside)."""
    monkeypatch.setenv("NANOSEEK_HOME", str(tmp_path / "home"))
    args = ["quickstart", "--out", str(tmp_path / "run"), "--no-progress", "--json"] + (["--smoke"] if smoke else [])
    assert cli.main(args) == 0
    q = last_json(capsys.readouterr().out)
    threads = torch.get_num_threads()
    after_rl_threads = threads - threads // 2 if q.get("control_alongside_grpo") else threads
    name = "quickstart-smoke" if smoke else "quickstart"
    argv = ["eval", name, "--task", "countdown", "--no-progress", "--json", "--out", str(tmp_path / "eval"),
            "--threads", str(after_rl_threads)]
    if smoke:  # the smoke run's budgets: its 32 problems, its token budget
        argv += ["--limit", str(q["eval_problems"]), "--max-new-tokens", str(SMOKE["max_new_tokens"])]
    try:
        assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    r = last_json(capsys.readouterr().out)
    assert r["n"] == q["eval_problems"]
    assert r["accuracy"] == q["accuracy_after_rl"] and r["accuracy_strict"] == q["strict_accuracy_after_rl"]
    assert r["mean_completion_tokens"] == q["mean_length_after_rl"]
