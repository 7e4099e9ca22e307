"""lm-evaluation-harness against `nanoseek serve`: its `local-completions` model scores a local
multiple-choice task through /v1/completions (echo + logprobs, the prompt-scoring contract), and its
`local-chat-completions` model runs a generate_until task through /v1/chat/completions.

The loglikelihoods the harness reports must be distinct and equal to the fixture model's own
log-softmax sums over each continuation's tokens. The tasks live in tests/harness/ (no download).
Needs the `harness` extra (pip install -c constraints.txt -e '.[test,harness]')."""

import glob
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from nanoseek import DeepSeekV3
from nanoseek.tokenizer import Tokenizer
from fixtures.make_fixtures import ANSWER, MEMORIZER

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (the `harness` extra: "
                    "pip install -c constraints.txt -e '.[test,harness]')")

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(REPO, "tests", "harness")
CHOICE_DATA = os.path.join(TASKS, "tiny_choice.jsonl")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: str) -> dict:
    # one intra-op thread per process: the model is tiny and the cores are shared
    return {**os.environ, "NANOSEEK_HOME": home, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`nanoseek serve` on a loopback port, its store holding the fixture model as `tiny`."""
    home = str(tmp_path_factory.mktemp("home"))
    nanoseek = [sys.executable, "-m", "nanoseek"]
    subprocess.run(nanoseek + ["create", "tiny", "--from", MEMORIZER], env=_env(home), check=True,
                   capture_output=True)
    port = _free_port()
    proc = subprocess.Popen(nanoseek + ["serve", "--port", str(port), "--device", "cpu", "--context-length", "256",
                                        "--quiet"], env=_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"nanoseek serve did not come up: {proc.stderr.read().decode(errors='replace')}")
        time.sleep(0.5)
    yield url, home
    proc.terminate()
    proc.wait(timeout=30)


def lm_eval(home: str, out: str, *args: str) -> list[dict]:
    """Runs the `lm_eval` command line from the repository root and returns its logged samples."""
    cmd = [sys.executable, "-m", "lm_eval", "--include_path", TASKS, "--log_samples", "--output_path", out, *args]
    run = subprocess.run(cmd, cwd=REPO, env=_env(home), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"lm_eval failed:\n{run.stdout[-4000:]}\n{run.stderr[-8000:]}"
    files = glob.glob(os.path.join(out, "**", "samples_*.jsonl"), recursive=True)
    assert len(files) == 1, files
    with open(files[0], encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def continuation_logprob(model, tok, context: str, continuation: str) -> float:
    """The model's log-prob of `continuation` after `context`: the sum of its tokens' log-softmax,
    with the harness's split (the context's tokens, then the rest of the whole text's)."""
    context_ids, whole = tok.encode(context), tok.encode(context + continuation)
    assert whole[:len(context_ids)] == context_ids and len(whole) > len(context_ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole]))[0, :-1].float(), dim=-1)  # (T-1, vocab)
    targets = torch.tensor(whole[len(context_ids):])  # (continuation tokens,)
    return logp[len(context_ids) - 1:].gather(1, targets[:, None]).sum().item()


def test_local_completions_loglikelihoods(served, tmp_path):
    url, home = served
    samples = lm_eval(home, str(tmp_path), "--model", "local-completions", "--tasks", "nanoseek_tiny_choice",
                      "--model_args", f"model=tiny,base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                      f"tokenizer={MEMORIZER},tokenized_requests=True,num_concurrent=1,max_retries=1")
    with open(CHOICE_DATA, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    assert len(samples) == len(docs)
    model, tok = DeepSeekV3.from_pretrained(MEMORIZER).eval(), Tokenizer.from_dir(MEMORIZER)
    got, want = [], []
    for s in samples:
        doc = docs[s["doc_id"]]
        assert [a["arg_1"] for a in s["arguments"].values()] == [" " + c for c in doc["choices"]]
        for arg, resp in zip(s["arguments"].values(), s["resps"]):
            got.append(float(resp[0][0]))
            want.append(continuation_logprob(model, tok, arg["arg_0"], arg["arg_1"]))
    assert len(set(got)) == len(got), f"the loglikelihoods are not distinct: {got}"
    assert got == pytest.approx(want, abs=1e-4)


def test_local_chat_completions_generate_until(served, tmp_path):
    url, home = served
    samples = lm_eval(home, str(tmp_path), "--model", "local-chat-completions", "--tasks", "nanoseek_tiny_reply",
                      "--apply_chat_template", "--model_args",
                      f"model=tiny,base_url={url}/v1/chat/completions,num_concurrent=1,max_retries=1")
    assert len(samples) == 1
    assert samples[0]["filtered_resps"] == [ANSWER] and samples[0]["exact_match"] == 1.0
