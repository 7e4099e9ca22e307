"""`nanoseek serve --speculative` against the real `openai` client on loopback: greedy output
identical with and without MTP drafts (plain and streamed, several prompts at once), the drafts
counted in /metrics, and a model without MTP layers served plainly."""

import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from nanoseek import DeepSeekV3
from nanoseek.infer.store import Store
from nanoseek.serve.app import make_server
from fixtures.make_fixtures import MEMORIZER, QUESTION, REPLY

QUESTIONS = [QUESTION, "Hello there, who are you?", "Count: one two three", "x"]


def with_mtp(src: str, dst: str) -> str:
    """The memorizer fixture with one MTP layer (random weights) added: the same main model, so its
    greedy replies are unchanged, and drafts to verify."""
    base = DeepSeekV3.from_pretrained(src, dtype=torch.float32)
    model = DeepSeekV3.from_config(base.config.replace(num_nextn_predict_layers=1), seed=0)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("mtp.") for k in missing)
    model.save_pretrained(dst)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, name), dst)
    return dst


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model beside the HTTP threads (tests/test_server.py)
    store = Store(str(tmp_path_factory.mktemp("home")))
    store.create("drafting", with_mtp(MEMORIZER, str(tmp_path_factory.mktemp("mtp"))))
    store.create("plain", MEMORIZER)  # no MTP layers
    running = {}
    for speculative in (False, True):
        s = make_server("127.0.0.1", 0, store=store, context_length=256, speculative=speculative)
        threading.Thread(target=s.serve_forever, daemon=True).start()
        running[speculative] = s
    yield {k: f"http://127.0.0.1:{s.server_address[1]}" for k, s in running.items()}
    for s in running.values():
        s.shutdown_all()
    torch.set_num_threads(threads)


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(url, model, question, stream=False, max_tokens=40):
    kw = dict(model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=max_tokens,
              logprobs=True)
    if not stream:
        r = client(url).chat.completions.create(**kw)
        c = r.choices[0]
        return c.message.content, c.finish_reason, r.usage.completion_tokens, [t.logprob for t in c.logprobs.content]
    parts = list(client(url).chat.completions.create(stream=True, **kw))
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    return text, [p.choices[0].finish_reason for p in parts if p.choices][-1]


def test_greedy_output_identical_with_and_without_speculative(servers):
    for model in ("drafting", "plain"):
        with ThreadPoolExecutor(len(QUESTIONS)) as pool:  # concurrent requests share decode steps
            outs = {spec: list(pool.map(lambda q, u=url: chat(u, model, q), QUESTIONS))
                    for spec, url in servers.items()}
        for (a_text, a_reason, a_n, a_lp), (b_text, b_reason, b_n, b_lp) in zip(outs[False], outs[True]):
            assert (b_text, b_reason, b_n) == (a_text, a_reason, a_n)
            assert b_lp == pytest.approx(a_lp, abs=1e-4)
        for q in QUESTIONS[:2]:
            assert chat(servers[True], model, q, stream=True) == chat(servers[False], model, q, stream=True)
    # the memorizer's reply (its thinking and answer) comes back whole through drafts too
    text, reason, _, _ = chat(servers[True], "drafting", QUESTION)
    assert reason == "stop" and REPLY.endswith(text)


def test_metrics_count_the_drafts(servers):
    chat(servers[True], "drafting", QUESTIONS[1], max_tokens=12)
    body = httpx.get(servers[True] + "/metrics").text
    lines = {line.split(" ")[0]: float(line.split(" ")[1]) for line in body.splitlines() if line.startswith("nanoseek_spec")}
    drafted = lines['nanoseek_speculative_drafted_tokens_total{model="drafting:latest"}']
    accepted = lines['nanoseek_speculative_accepted_tokens_total{model="drafting:latest"}']
    assert drafted >= 11 and 0 <= accepted <= drafted
    assert lines['nanoseek_speculative_acceptance_rate{model="drafting:latest"}'] == pytest.approx(accepted / drafted)
    assert not any("plain" in k for k in lines)  # served without drafts: no MTP layers
    assert "nanoseek_speculative" not in httpx.get(servers[False] + "/metrics").text
