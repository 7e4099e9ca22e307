"""`nanoseek serve` against the real `openai` and `ollama` clients on loopback: chat, streaming,
model lists, the thinking split, API keys, continuous batching under 16 concurrent streams, and
every kind of bad input (400/404 in each API's format, and the server keeps serving)."""

import json
import logging
import random
import socket
import threading
import time

import httpx
import ollama  # the [test] extra installs both clients: a missing one is a broken install, not a skip
import openai
import pytest
import torch

from nanoseek import DeepSeekV3
from nanoseek.infer.chat import ThinkSplitter, render_chat, split_thinking
from nanoseek.serve import ollama as ollama_api
from nanoseek.serve.app import make_server
from nanoseek.infer.store import Store
from fixtures.make_fixtures import ANSWER, MEMORIZER, QUESTION, REPLY, THINKING

CONTEXT = 256
KEY = "sk-test-key"


def check_memorizer(path):
    """The fixture's precondition, checked before any test leans on it: its greedy reply to QUESTION
    is REPLY + EOS (tests/fixtures/make_fixtures.py made it with a wide logit margin)."""
    from nanoseek.tokenizer import Tokenizer
    model, tok = DeepSeekV3.from_pretrained(path), Tokenizer.from_dir(path)
    prompt = tok.encode(render_chat(tok, [{"role": "user", "content": QUESTION}]))
    want = tok.encode(REPLY) + [tok.eos_id]
    got = model.generate(torch.tensor([prompt]), max_new_tokens=len(want))[0, len(prompt):].tolist()
    assert got == want, (f"the fixture model {path} did not reproduce its memorized reply: its greedy output "
                         f"was {tok.decode(got)!r}, not {REPLY!r} + EOS")


def start(store, **kw):
    server = make_server("127.0.0.1", 0, store=store, context_length=CONTEXT, **kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    # one intra-op thread: the model is tiny, and oversubscribed cores (other processes, the HTTP
    # threads) make multi-threaded kernels stall
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    check_memorizer(MEMORIZER)
    store = Store(str(tmp_path_factory.mktemp("home")))
    store.create("tiny", MEMORIZER)
    yield store
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(home):
    s = start(home)
    yield s
    s.shutdown_all()


@pytest.fixture(scope="module")
def url(server):
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def oa(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def ol(url):
    return ollama.Client(host=url, timeout=60)


def greedy(**extra):
    return {"temperature": 0, "num_predict": 48, **extra}


# ------------------------------------------------------------------------------------ Ollama
def test_ollama_list_show_ps_version(ol, url):
    models = ol.list().models
    assert [m.model for m in models] == ["tiny:latest"]
    assert models[0].size > 0 and models[0].details.family == "deepseek2"
    shown = ol.show("tiny")
    assert "thinking" in shown.capabilities and "completion" in shown.capabilities
    assert shown.modelinfo["deepseek2.attention.kv_lora_rank"] == 32
    assert httpx.get(url + "/api/version").json()["version"]
    assert httpx.get(url + "/").text == "nanoseek is running"
    ol.chat(model="tiny", messages=[])  # load only
    ps = ol.ps().models
    assert [m.model for m in ps] == ["tiny:latest"] and ps[0].context_length == CONTEXT


def test_ollama_chat_thinking_split(ol):
    msgs = [{"role": "user", "content": QUESTION}]
    r = ol.chat(model="tiny", messages=msgs, options=greedy())
    assert r.message.thinking == THINKING and r.message.content == ANSWER
    assert r.done and r.done_reason == "stop"
    assert r.eval_count == 16  # the reply's tokens (EOS not counted)
    assert r.prompt_eval_count > 0 and r.total_duration >= r.eval_duration > 0 and r.prompt_eval_duration > 0
    assert r.load_duration is not None
    parts = list(ol.chat(model="tiny", messages=msgs, options=greedy(), stream=True))
    assert len(parts) > 3 and parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.thinking or "" for p in parts) == THINKING
    assert "".join(p.message.content or "" for p in parts) == ANSWER
    assert parts[-1].eval_count == r.eval_count
    # think=false: no split, the reply comes back as it is
    r = ol.chat(model="tiny", messages=msgs, options=greedy(), think=False)
    assert r.message.thinking is None
    # multi-turn: an earlier assistant turn (with its thinking) is accepted
    r = ol.chat(model="tiny", messages=msgs + [{"role": "assistant", "content": ANSWER, "thinking": THINKING},
                                               {"role": "user", "content": "And three?"}],
                options=greedy(num_predict=4))
    assert r.done_reason in ("stop", "length")


def test_ollama_generate(ol, home):
    from nanoseek.tokenizer import Tokenizer
    r = ol.generate(model="tiny", prompt=QUESTION, options=greedy())
    assert (r.thinking, r.response, r.done_reason) == (THINKING, ANSWER, "stop")
    assert r.context and len(r.context) == r.prompt_eval_count + r.eval_count
    parts = list(ol.generate(model="tiny", prompt=QUESTION, options=greedy(), stream=True))
    assert "".join(p.response for p in parts) == ANSWER
    assert "".join(p.thinking or "" for p in parts) == THINKING
    # raw: the prompt goes in untemplated, the reply comes back unsplit, no context
    tok_prompt = render_chat(Tokenizer.from_dir(home.path_of("tiny")), [{"role": "user", "content": QUESTION}])
    r = ol.generate(model="tiny", prompt=tok_prompt, raw=True, options=greedy())
    assert r.response == REPLY and r.thinking is None and r.context is None
    # stop strings and num_predict
    r = ol.generate(model="tiny", prompt=QUESTION, options=greedy(stop=[" is"]))
    assert r.done_reason == "stop" and r.thinking == "Two plus two"
    r = ol.generate(model="tiny", prompt=QUESTION, options=greedy(num_predict=3))
    assert r.done_reason == "length" and r.eval_count == 3


# ------------------------------------------------------------------------------------ OpenAI
def test_openai_models(oa):
    ids = [m.id for m in oa.models.list()]
    assert ids == ["tiny:latest"]
    assert oa.models.retrieve("tiny:latest").id == "tiny:latest"
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("missing")


def test_openai_chat_reasoning_and_usage(oa):
    msgs = [{"role": "user", "content": QUESTION}]
    r = oa.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=48)
    c = r.choices[0]
    assert c.message.content == ANSWER and c.message.reasoning_content == THINKING and c.finish_reason == "stop"
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(oa.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=48, stream=True,
                                             stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    body = [ch for ch in chunks if ch.choices]
    assert "".join(ch.choices[0].delta.content or "" for ch in body) == ANSWER
    assert "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in body) == THINKING
    assert body[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # reasoning_effort none: no split
    r = oa.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=48, reasoning_effort="none")
    assert getattr(r.choices[0].message, "reasoning_content", None) is None


def test_openai_n_stop_seed_logprobs(oa):
    msgs = [{"role": "user", "content": QUESTION}]
    r = oa.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=48, n=3,
                                   logprobs=True, top_logprobs=3, stop=[" is"])
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        assert c.finish_reason == "stop" and c.message.reasoning_content == "Two plus two" and c.message.content == ""
        lp = c.logprobs.content
        assert lp and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in lp)
        assert lp[0].token == "<think>" and lp[0].top_logprobs[0].token == "<think>"
    a = oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], temperature=1.5,
                                   max_tokens=12, seed=7, n=2)
    b = oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], temperature=1.5,
                                   max_tokens=12, seed=7, n=2)
    assert [c.message for c in a.choices] == [c.message for c in b.choices]  # seeded: reproducible
    # streaming n=2 interleaves choices, each ends with its finish_reason
    chunks = list(oa.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=48, n=2,
                                             stream=True))
    for i in range(2):
        mine = [ch.choices[0] for ch in chunks if ch.choices and ch.choices[0].index == i]
        assert "".join(c.delta.content or "" for c in mine) == ANSWER and mine[-1].finish_reason == "stop"


def test_openai_completions(oa):
    r = oa.completions.create(model="tiny", prompt="hello world", max_tokens=5, logprobs=2, temperature=0,
                              extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.finish_reason == "length" and r.usage.completion_tokens == 5
    assert len(c.logprobs.tokens) == 5 and all(len(t) == 2 for t in c.logprobs.top_logprobs)
    r = oa.completions.create(model="tiny", prompt=["a", "b"], max_tokens=3, n=2, echo=True,
                              extra_body={"ignore_eos": True})
    assert len(r.choices) == 4 and r.choices[0].text.startswith("a") and r.choices[3].text.startswith("b")
    text = "".join(ch.choices[0].text for ch in oa.completions.create(
        model="tiny", prompt="hello", max_tokens=6, stream=True, temperature=0, extra_body={"ignore_eos": True})
        if ch.choices)
    ref = oa.completions.create(model="tiny", prompt="hello", max_tokens=6, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    assert text == ref


# ------------------------------------------------------------------------------------ API key
def test_api_key(home):
    s = start(home, api_key=KEY)
    base = f"http://127.0.0.1:{s.server_address[1]}"
    try:
        for path in ("/", "/api/tags", "/api/version", "/v1/models"):
            assert httpx.get(base + path).status_code == 401
            assert httpx.get(base + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = httpx.post(base + "/v1/chat/completions", json={"model": "tiny", "messages": []})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = httpx.post(base + "/api/chat", json={"model": "tiny", "messages": []})
        assert r.status_code == 401 and "unauthorized" in r.json()["error"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
        with pytest.raises(ollama.ResponseError) as e:
            ollama.Client(host=base).list()
        assert e.value.status_code == 401
        good = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in good.models.list()] == ["tiny:latest"]
        r = good.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                         temperature=0, max_tokens=48)
        assert r.choices[0].message.content == ANSWER
        ol = ollama.Client(host=base, headers={"Authorization": f"Bearer {KEY}"})
        assert [m.model for m in ol.list().models] == ["tiny:latest"]
    finally:
        s.shutdown_all()


# ------------------------------------------------------------------------------------ concurrency
@pytest.mark.slow  # timing over HTTP on 2 shared cores is noisy (2.9-3.3x measured); so is the engine-level bound (test_engine), also slow-marked
def test_16_concurrent_streams_batch(url):
    """Continuous batching: 16 concurrent streams take at most 3x the time of one. (A plain httpx
    client: this measures the server; the SDKs' streaming is tested above.)"""
    client = httpx.Client(timeout=60)
    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 64, "temperature": 0.8, "stream": True,
            "ignore_eos": True}

    def one():
        t0 = time.perf_counter()
        events = []
        with client.stream("POST", url + "/v1/completions", json=body) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and '"finish_reason": "length"' in events[-2]
        return time.perf_counter() - t0

    def sixteen():
        errors = []

        def worker():
            try:
                one()
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        return time.perf_counter() - t0

    one()  # warm-up
    single, wall = float("inf"), float("inf")
    for _ in range(3):  # interleaved rounds, best of each: robust to other load on a shared machine
        single = min(single, one(), one())
        wall = min(wall, sixteen())
        if wall <= 2.5 * single:
            break
    print(f"one stream {single:.3f} s, 16 concurrent streams {wall:.3f} s ({wall / single:.2f}x)")
    assert wall <= 3 * single, (single, wall)


# ------------------------------------------------------------------------------------ bad input
BAD = [
    # (method, path, body, status, text expected in the error message)
    ("POST", "/api/chat", b"{not json", 400, "malformed JSON"),
    ("POST", "/api/generate", b"[1, 2]", 400, "JSON object"),
    ("POST", "/api/generate", b"", 400, "empty"),
    ("POST", "/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, "malformed JSON"),
    ("POST", "/api/chat", {"model": "nope", "messages": []}, 404, "model 'nope' not found"),
    ("POST", "/api/generate", {"model": "nope:7b", "prompt": "x"}, 404, "model 'nope:7b' not found"),
    ("POST", "/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404,
     "model 'gpt-4' not found"),
    ("POST", "/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model 'nope' not found"),
    ("POST", "/api/show", {"model": "nope"}, 404, "model 'nope' not found"),
    ("POST", "/api/chat", {"model": "../../etc/passwd", "messages": []}, 400, "invalid model name"),
    ("POST", "/api/chat", {"messages": []}, 400, "model"),
    ("POST", "/api/chat", {"model": 5, "messages": []}, 400, "model"),
    ("POST", "/api/chat", {"model": "tiny", "messages": "hi"}, 400, "messages"),
    ("POST", "/api/chat", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role"),
    ("POST", "/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content"),
    ("POST", "/api/chat", {"model": "tiny", "stream": "yes", "messages": []}, 400, "stream"),
    ("POST", "/api/generate", {"model": "tiny", "prompt": 42}, 400, "prompt"),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "options": {"temperature": -1}}, 400,
     "options.temperature"),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "options": {"temperature": "hot"}}, 400,
     "options.temperature"),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "options": {"top_p": 0}}, 400, "options.top_p"),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "options": {"top_p": 1.5}}, 400, "options.top_p"),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "options": {"num_predict": 0}}, 400,
     "options.num_predict"),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "options": {"num_predict": -2}}, 400,
     "options.num_predict"),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "options": {"top_k": -1}}, 400, "options.top_k"),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "options": "fast"}, 400, "options"),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "options": {"stop": [1]}}, 400, "options.stop"),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "think": "very"}, 400, "think"),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "keep_alive": "soon"}, 400, "keep_alive"),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "context": ["a"]}, 400, "context"),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "images": ["aGk="]}, 400, "images"),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "word " * 400}, 400, "exceeds the context limit of 256"),
    ("POST", "/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "word " * 400}]}, 400,
     "exceeds the context limit"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                      "max_tokens": 0}, 400, "max_tokens"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                      "max_completion_tokens": -5}, 400, "max_completion_tokens"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 9},
     400, "n"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 0},
     400, "n"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                      "temperature": -0.5}, 400, "temperature"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                      "top_p": 0}, 400, "top_p"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                      "top_p": 1.01}, 400, "top_p"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                      "max_tokens": "10"}, 400, "max_tokens"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                      "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                      "stop": 5}, 400, "stop"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                      "stream": "true"}, 400, "stream"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 400, "messages[0].content[0]"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "word " * 400}]},
     400, "exceeds the context limit of 256"),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": {"text": "x"}}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": [1, 2, 99999]}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 30}, 400, "logprobs"),
    ("GET", "/api/nothing", None, 404, "no such endpoint"),
    ("GET", "/v1/nothing", None, 404, "no such endpoint"),
]


@pytest.mark.parametrize("method,path,body,status,text", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(url, method, path, body, status, text):
    content = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    r = httpx.request(method, url + path, content=content, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    if path.startswith("/v1"):  # OpenAI format: an object naming the field
        assert text in err["message"] and err["type"] in ("invalid_request_error", "not_found_error")
        if status == 400 and isinstance(body, dict) and text.isidentifier():
            assert err["param"] == text
    else:  # Ollama format: a string
        assert isinstance(err, str) and text in err
    assert httpx.get(url + "/api/tags").status_code == 200  # still serving


def test_bad_input_through_clients(oa, ol):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=-1)
    with pytest.raises(openai.NotFoundError, match="model 'nope' not found"):
        oa.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(ollama.ResponseError, match="model 'nope' not found") as e:
        ol.chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError, match="options.top_p") as e:
        ol.generate(model="tiny", prompt="x", options={"top_p": 2})
    assert e.value.status_code == 400
    with pytest.raises(ollama.ResponseError, match="exceeds the context limit"):
        list(ol.chat(model="tiny", messages=[{"role": "user", "content": "word " * 400}], stream=True))


def test_client_disconnect_mid_stream(server, url, monkeypatch):
    from nanoseek.infer.engine import Engine
    decode_step = Engine._decode_step

    def slow_step(self):  # 240 tokens take >= 1.2 s on any machine: the clients below leave mid-generation
        time.sleep(0.005)
        decode_step(self)

    monkeypatch.setattr(Engine, "_decode_step", slow_step)
    port = server.server_address[1]
    body = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 240, "stream": True,
                       "ignore_eos": True}).encode()
    before = server.app.cancelled_requests
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while got.count(b"data: ") < 3:
        got += sock.recv(4096)
    sock.close()  # gone mid-stream
    deadline = time.time() + 10
    while (server.app.cancelled_requests == before or server.app.active_requests) and time.time() < deadline:
        time.sleep(0.05)
    assert server.app.cancelled_requests == before + 1 and server.app.active_requests == 0
    # same for a non-streaming request that is abandoned while generating
    sock = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"model": "tiny", "prompt": "hi", "stream": False, "max_tokens": 240,
                       "ignore_eos": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: " + str(len(body)).encode()
                 + b"\r\n\r\n" + body)
    time.sleep(0.15)
    sock.close()
    deadline = time.time() + 10
    while (server.app.cancelled_requests < before + 2 or server.app.active_requests) and time.time() < deadline:
        time.sleep(0.05)
    assert server.app.cancelled_requests == before + 2 and server.app.active_requests == 0
    assert httpx.post(url + "/api/generate", json={"model": "tiny", "prompt": QUESTION, "stream": False,
                                                   "options": greedy()}).json()["response"] == ANSWER


def test_internal_fault_is_500_with_traceback(url, monkeypatch, caplog):
    def boom(self):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(ollama_api, "list_tags", boom)
    with caplog.at_level(logging.ERROR, logger="nanoseek.server"):
        r = httpx.get(url + "/api/tags")
        time.sleep(0.05)
    assert r.status_code == 500 and "kaboom" in r.json()["error"]
    assert any("Traceback" in rec.getMessage() and "kaboom" in rec.getMessage() for rec in caplog.records)
    monkeypatch.undo()
    assert httpx.get(url + "/api/tags").status_code == 200


def test_keep_alive_zero_unloads(ol):
    ol.generate(model="tiny", prompt="x", options=greedy(num_predict=1))
    assert [m.model for m in ol.ps().models] == ["tiny:latest"]
    r = ol.generate(model="tiny", prompt="", keep_alive=0)
    assert r.done_reason == "unload"
    deadline = time.time() + 5
    while ol.ps().models and time.time() < deadline:
        time.sleep(0.05)
    assert ol.ps().models == []
    assert ol.generate(model="tiny", prompt=QUESTION, options=greedy()).response == ANSWER  # reloads


# ------------------------------------------------------------------------------------ thinking parser
@pytest.mark.parametrize("text,opened", [
    (REPLY, False), (f"  {REPLY}  ", False), ("no thinking here </think> at all", False),
    ("\nreasoning \n\n</think>\n\nanswer\n", True), ("unclosed <think> reasoning", True),
    ("<think>unclosed", False), ("<thin", False), ("", False), ("", True), ("<think></think>", False),
    ("a</think>b</think>c", True), ("<think> x </thinker> y </think> z", False),
])
def test_think_splitter_matches_split_thinking(text, opened):
    want = split_thinking(text, opened=opened)
    rng = random.Random(0)
    for _ in range(30):
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        sp = ThinkSplitter(opened=opened)
        th, ct = [], []
        for p in pieces:
            a, b = sp.feed(p)
            th.append(a)
            ct.append(b)
        a, b = sp.flush()
        th.append(a)
        ct.append(b)
        got = ("".join(th) if sp.seen else None, "".join(ct))
        assert got == want, (pieces, got, want)


# ------------------------------------------------------------------------------------ who may call
def _raw(port, head: bytes, body: bytes = b"") -> bytes:
    """One raw HTTP exchange; the reply's bytes up to the server closing or 5 s."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(head + body)
        got = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            got += chunk
            if b"\r\n\r\n" in got and b"Content-Length: " in got:
                length = int(got.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                if len(got.split(b"\r\n\r\n", 1)[1]) >= length:
                    break
        return got
    finally:
        sock.close()


def test_key_is_checked_before_the_body_is_read(home):
    """Without the key a request is refused before its body is read: a 1 GiB Content-Length with
    no body sent still gets its 401 at once. With the key, a body over the cap is a 413, unread."""
    s = start(home, api_key=KEY)
    port = s.server_address[1]
    try:
        t0 = time.perf_counter()
        reply = _raw(port, b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1073741824\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 401") and time.perf_counter() - t0 < 5, reply[:200]
        from nanoseek.serve.protocol import MAX_BODY
        reply = _raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                     + KEY.encode() + b"\r\nContent-Length: " + str(MAX_BODY + 1).encode() + b"\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 413") and b"larger than the limit" in reply, reply[:300]
        assert httpx.get(f"http://127.0.0.1:{port}/api/tags", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    finally:
        s.shutdown_all()


def test_dns_rebinding_and_foreign_origins_are_refused(url, home):
    port = int(url.rsplit(":", 1)[1])
    # a page on evil.example whose name now points at 127.0.0.1: its requests carry its Host
    r = httpx.get(url + "/api/tags", headers={"Host": f"evil.example:{port}"})
    assert r.status_code == 403 and "is not this server's" in r.json()["error"]
    r = httpx.delete(url + "/api/delete", headers={"Host": "evil.example"}, timeout=10)
    assert r.status_code == 403 and home.exists("tiny")
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "app.localhost", "127.0.0.2"):
        assert httpx.get(url + "/api/version", headers={"Host": host}).status_code == 200, host
    # a browser page from another origin: refused (JSON error in each API's format), preflight too
    r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": []},
                   headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert "--allow-origin" in r.json()["error"]["message"]
    r = httpx.options(url + "/api/chat", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    # pages on this machine may, and get the CORS headers that let the browser read the reply
    r = httpx.get(url + "/api/tags", headers={"Origin": "http://localhost:3000"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    r = httpx.options(url + "/api/chat", headers={"Origin": "http://127.0.0.1:8080", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 204 and "Authorization" in r.headers["access-control-allow-headers"]
    # requests without an Origin (SDKs, curl) carry no CORS headers
    assert "access-control-allow-origin" not in httpx.get(url + "/api/tags").headers


def test_allow_origin(home):
    s = start(home, allow_origins=("https://*.example.com",))
    base = f"http://127.0.0.1:{s.server_address[1]}"
    try:
        r = httpx.get(base + "/api/tags", headers={"Origin": "https://app.example.com"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example.com"
        assert httpx.get(base + "/api/tags", headers={"Origin": "https://example.org"}).status_code == 403
    finally:
        s.shutdown_all()
    from nanoseek.cli import build_parser
    args = build_parser().parse_args(["serve", "--allow-origin", "https://a.example", "--allow-origin", "*"])
    assert args.allow_origin == ["https://a.example", "*"]


# ------------------------------------------------------------------------------------ scoring
def _prompt_logprobs(model, ids, top):
    """The model's own log-softmax of a prompt: each token's log-prob given the ones before it."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0, :-1].float(), dim=-1)
    return logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist(), logp.topk(top, dim=-1)


def test_completions_echo_scores_the_prompt(oa, home):
    """/v1/completions with echo and logprobs returns every prompt token's log-prob (the first
    null) and its top alternatives, equal to the model's log-softmax of the prompt; max_tokens 0
    scores without generating; token-id prompts and lists of prompts work."""
    from nanoseek.tokenizer import Tokenizer
    model = DeepSeekV3.from_pretrained(home.path_of("tiny")).eval()
    tok = Tokenizer.from_dir(home.path_of("tiny"))
    prompts = [tok.encode("hello world, hello"), tok.encode(QUESTION)]
    r = oa.completions.create(model="tiny", prompt=prompts, max_tokens=0, echo=True, logprobs=3)
    assert len(r.choices) == 2 and r.usage.completion_tokens == 0
    for ids, c in zip(prompts, r.choices):
        want, (top_v, top_i) = _prompt_logprobs(model, ids, 3)
        lp = c.logprobs
        assert c.text == tok.decode(ids) and c.finish_reason == "length"
        assert lp.tokens == [tok.decode([t]) for t in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-5)
        for k, alts in enumerate(lp.top_logprobs[1:]):
            assert list(alts) == [tok.decode([t]) for t in top_i[k].tolist()]
            assert list(alts.values()) == pytest.approx(top_v[k].tolist(), abs=1e-5)
    # a string prompt, scored and continued: prompt entries then the generated ones
    r = oa.completions.create(model="tiny", prompt="hello world", max_tokens=2, echo=True, logprobs=1,
                              temperature=0, extra_body={"ignore_eos": True})
    c, ids = r.choices[0], [tok.bos_id] + tok.encode("hello world")
    assert c.text.startswith("hello world") and len(c.logprobs.tokens) == len(ids) + 2 == r.usage.total_tokens
    assert c.logprobs.token_logprobs[1:len(ids)] == pytest.approx(_prompt_logprobs(model, ids, 1)[0], abs=1e-5)
    assert c.logprobs.text_offset[len(ids)] == len("hello world")
    # streamed: the echo chunk carries the prompt's log-probs
    chunks = [ch.choices[0] for ch in oa.completions.create(model="tiny", prompt=prompts[0], max_tokens=0, echo=True,
                                                            logprobs=0, stream=True) if ch.choices]
    assert chunks[0].text == tok.decode(prompts[0]) and chunks[-1].finish_reason == "length"
    assert chunks[0].logprobs.token_logprobs[1:] == pytest.approx(_prompt_logprobs(model, prompts[0], 1)[0], abs=1e-5)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        oa.completions.create(model="tiny", prompt="hello", max_tokens=0)


# ------------------------------------------------------------------------------ prefix reuse
def test_prefix_reuse_reports_cached_tokens(home):
    """With a prefix cache, a repeated conversation's second turn reuses the first's tokens: the
    reply is unchanged, OpenAI's usage.prompt_tokens_details.cached_tokens and Ollama's
    prompt_eval_count (tokens actually evaluated) say so, and /metrics counts the hits."""
    s = start(home, prefix_cache_tokens=4096)
    base = f"http://127.0.0.1:{s.server_address[1]}"
    try:
        oa = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": QUESTION}]
        first = oa.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=48)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        again = oa.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=48)
        assert again.choices[0].message.content == first.choices[0].message.content
        assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
        r = ollama.Client(host=base, timeout=60).chat(model="tiny", messages=msgs, options=greedy())
        assert r.message.content == ANSWER and r.prompt_eval_count == 1
        text = httpx.get(base + "/metrics").text
        assert 'nanoseek_prefix_cache_hits_total{model="tiny:latest"} 2' in text
        assert f'nanoseek_prefix_cache_hit_tokens_total{{model="tiny:latest"}} {2 * (again.usage.prompt_tokens - 1)}' in text
    finally:
        s.shutdown_all()
