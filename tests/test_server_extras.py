"""`nanoseek serve`'s Ollama extras, metrics, robustness and load, against the real `openai` and
`ollama` clients: embeddings, Modelfile create (server and CLI), copy, pull, think levels,
keep_alive unload and /api/ps memory, Prometheus /metrics, chunked bodies under the body cap,
1,000 fuzzed requests without a 5xx, and 64 concurrent streaming clients."""

import json
import math
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import ollama
import openai
import pytest
import torch

from nanoseek import DeepSeekV3
from nanoseek.infer.chat import render_chat
from nanoseek.cli import main as cli_main
from nanoseek.serve.app import make_server
from nanoseek.serve.embed import pooled_embeddings
from nanoseek.serve.modelfile import ModelfileError, parse_modelfile
from nanoseek.serve.protocol import MAX_BODY
from nanoseek.infer.store import Store
from nanoseek.tokenizer import Tokenizer
from fixtures.make_fixtures import ANSWER, MEMORIZER, QUESTION, REPLY, THINKING

CONTEXT = 256


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    store = Store(str(tmp_path_factory.mktemp("home")))
    store.create("tiny", MEMORIZER)
    yield store
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(home):
    s = make_server("127.0.0.1", 0, store=home, context_length=CONTEXT, max_batch=16)
    threading.Thread(target=s.serve_forever, daemon=True).start()
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


GREEDY = {"temperature": 0, "num_predict": 24}


# ------------------------------------------------------------------------------------ embeddings
def test_embeddings_ollama_and_openai(ol, oa):
    texts = ["What is two plus two?", "An unrelated sentence about boats.", "What is two plus two?"]
    r = ol.embed(model="tiny", input=texts)
    emb = torch.tensor(r.embeddings)
    hidden = DeepSeekV3.from_pretrained(MEMORIZER).config.hidden_size
    assert emb.shape == (3, hidden)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(emb[0], emb[2]) and not torch.allclose(emb[0], emb[1])
    assert r.prompt_eval_count > 0
    # the pooling: mean of the final-normed hidden states, L2-normalized
    model, tok = DeepSeekV3.from_pretrained(MEMORIZER).eval(), Tokenizer.from_dir(MEMORIZER)
    ids = tok.encode(texts[1])
    with torch.inference_mode():
        _, h = model(torch.tensor([ids]), return_hidden=True)
    want = torch.nn.functional.normalize(h[0].float().mean(0), dim=-1)
    assert torch.allclose(emb[1], want, atol=1e-5)
    assert torch.allclose(pooled_embeddings(model, [ids])[0], want)
    single = ol.embed(model="tiny", input=texts[1]).embeddings
    assert len(single) == 1 and torch.allclose(torch.tensor(single[0]), emb[1], atol=1e-6)
    legacy = ol.embeddings(model="tiny", prompt=texts[1]).embedding
    assert torch.allclose(torch.tensor(legacy), emb[1], atol=1e-6)
    short = torch.tensor(ol.embed(model="tiny", input=texts[1], dimensions=8).embeddings[0])
    assert short.shape == (8,) and math.isclose(float(short.norm()), 1.0, rel_tol=1e-5)
    # OpenAI: the client asks for base64 by default and decodes it; float on request
    o = oa.embeddings.create(model="tiny", input=texts)
    assert [d.index for d in o.data] == [0, 1, 2] and o.usage.prompt_tokens == r.prompt_eval_count
    assert torch.allclose(torch.tensor([d.embedding for d in o.data]), emb, atol=1e-6)
    f = oa.embeddings.create(model="tiny", input=[ids], encoding_format="float")
    assert torch.allclose(torch.tensor(f.data[0].embedding), emb[1], atol=1e-6)
    with pytest.raises(openai.BadRequestError, match="input"):
        oa.embeddings.create(model="tiny", input=[])
    with pytest.raises(ollama.ResponseError, match="not found"):
        ol.embed(model="nope", input="x")


# ------------------------------------------------------------------------------------ Modelfiles
def test_parse_modelfile():
    mf = parse_modelfile('FROM tiny\n# a comment\nsystem """Be\nterse."""\nPARAMETER temperature 0.5\n'
                         'PARAMETER stop "<a>"\nPARAMETER stop ###\nMESSAGE user hi\nMESSAGE assistant "hello"\n')
    assert mf == {"from": "tiny", "system": "Be\nterse.", "parameters": {"temperature": 0.5, "stop": ["<a>", "###"]},
                  "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    for bad, what in [("SYSTEM x", "FROM"), ("FROM a\nPARAMETER top_k x", "integer"),
                      ("FROM a\nPARAMETER nope 1", "nope"), ("FROM a\nMESSAGE tool x", "role"),
                      ("FROM a\nFOO x", "FOO"), ('FROM a\nSYSTEM """x', "unterminated")]:
        with pytest.raises(ModelfileError, match=what):
            parse_modelfile(bad)


def test_create_copy_pull(ol, url, home):
    system = "You answer arithmetic."
    ol.create(model="arith", from_="tiny", system=system, parameters={"temperature": 0, "num_predict": 6})
    names = [m.model for m in ol.list().models]
    assert "arith:latest" in names
    shown = ol.show("arith")
    assert f"SYSTEM {json.dumps(system)}" in shown.modelfile and "FROM" in shown.modelfile
    assert "num_predict 6" in shown.parameters
    assert httpx.post(url + "/api/show", json={"model": "arith"}).json()["system"] == system
    # the entry's defaults are applied: the same reply as sending the system prompt and options by hand
    by_hand = ol.chat(model="tiny", messages=[{"role": "system", "content": system},
                                              {"role": "user", "content": QUESTION}],
                      options={"temperature": 0, "num_predict": 6})
    r = ol.chat(model="arith", messages=[{"role": "user", "content": QUESTION}])
    assert r.eval_count == 6 == by_hand.eval_count
    assert (r.message.thinking, r.message.content) == (by_hand.message.thinking, by_hand.message.content)
    # a request's own options win over the defaults
    assert ol.chat(model="arith", messages=[{"role": "user", "content": QUESTION}],
                   options={"num_predict": 2}).eval_count == 2
    # a Modelfile's text (older clients) with MESSAGE turns
    mf = f'FROM tiny\nPARAMETER num_predict 3\nMESSAGE user "{QUESTION}"\nMESSAGE assistant "{ANSWER}"\n'
    resp = httpx.post(url + "/api/create", json={"model": "withturns", "modelfile": mf, "stream": False})
    assert resp.status_code == 200 and resp.json() == {"status": "success"}
    assert ol.generate(model="withturns", prompt="x").eval_count == 3
    assert httpx.post(url + "/api/create", json={"model": "x", "from": "missing"}).status_code == 404
    bad = httpx.post(url + "/api/create", json={"model": "x", "from": "tiny", "parameters": {"top_k": "a"}})
    assert bad.status_code == 400 and "parameters.top_k" in bad.json()["error"]
    assert httpx.post(url + "/api/create", json={"model": "../x", "from": "tiny"}).status_code == 400
    # copy keeps the defaults
    ol.copy("arith", "arith2")
    assert httpx.post(url + "/api/show", json={"model": "arith2"}).json()["system"] == system
    with pytest.raises(ollama.ResponseError, match="not found"):
        ol.copy("nope", "x")
    # pull: nothing to fetch offline
    assert ol.pull("tiny").status == "success"
    with pytest.raises(ollama.ResponseError, match="registry") as e:
        ol.pull("llama3.2")
    assert e.value.status_code == 404
    for n in ("arith", "arith2", "withturns"):
        ol.delete(n)


def test_cli_create_from_modelfile(tmp_path, monkeypatch, home):
    monkeypatch.setenv("NANOSEEK_HOME", home.root)
    mf = tmp_path / "Modelfile"
    mf.write_text(f'FROM {MEMORIZER}\nSYSTEM "Be brief."\nPARAMETER temperature 0\nPARAMETER stop "###"\n')
    assert cli_main(["create", "brief", "-f", str(mf)]) == 0
    m = home.manifest("brief")
    assert m["defaults"] == {"system": "Be brief.", "parameters": {"temperature": 0.0, "stop": ["###"]}}
    mf.write_text("FROM tiny\nPARAMETER top_k many\n")
    with pytest.raises(SystemExit, match="integer"):
        cli_main(["create", "bad", "-f", str(mf)])
    with pytest.raises(SystemExit, match="--from"):
        cli_main(["create", "bad"])
    home.rm("brief")


# ------------------------------------------------------------------------------------ think, keep_alive, ps
def test_think_levels_keep_alive_and_ps(ol):
    msgs = [{"role": "user", "content": QUESTION}]
    for level in ("low", "medium", "high"):
        r = ol.chat(model="tiny", messages=msgs, options={"temperature": 0, "num_predict": 48}, think=level)
        assert (r.message.thinking, r.message.content) == (THINKING, ANSWER)
    assert ol.chat(model="tiny", messages=msgs, options=GREEDY, think=False).message.thinking is None
    ol.chat(model="tiny", messages=[])  # load
    ps = ol.ps().models
    assert [m.model for m in ps] == ["tiny:latest"] and ps[0].size > 0 and ps[0].size_vram == 0
    r = ol.chat(model="tiny", messages=[], keep_alive=0)
    assert r.done_reason == "unload" and ol.ps().models == []


# ------------------------------------------------------------------------------------ metrics
def parse_metrics(text: str) -> dict:
    """The text exposition format: {(name, frozenset(labels)): value}, with # TYPE lines checked."""
    out, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE"):
            _, _, name, kind = line.split()
            types[name] = kind
            continue
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, _, labels = head.partition("{")
        pairs = frozenset(tuple(p.split("=", 1)) for p in labels.rstrip("}").split(",") if p) if labels else frozenset()
        out[(name, frozenset((k, v.strip('"')) for k, v in pairs))] = float(value)
        assert any(name == t or name.startswith(t + "_") for t in types), name
    return out


def test_metrics(ol, url):
    ol.chat(model="tiny", messages=[{"role": "user", "content": QUESTION}], options=GREEDY)
    httpx.get(url + "/no/such/page")
    resp = httpx.get(url + "/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = parse_metrics(resp.text)
    key = lambda name, **labels: (name, frozenset(labels.items()))  # noqa: E731
    assert m[key("nanoseek_requests_total", endpoint="/api/chat", method="POST", status="200")] >= 1
    assert m[key("nanoseek_requests_total", endpoint="other", method="GET", status="404")] >= 1
    assert m[key("nanoseek_generation_tokens_total", model="tiny:latest")] >= 1
    assert m[key("nanoseek_prompt_tokens_total", model="tiny:latest")] >= 1
    count = m[key("nanoseek_time_to_first_token_seconds_count", model="tiny:latest")]
    assert count >= 1 and m[key("nanoseek_time_to_first_token_seconds_bucket", model="tiny:latest", le="+Inf")] == count
    assert m[key("nanoseek_queue_depth")] == 0 and m[key("nanoseek_active_requests")] == 0


# ------------------------------------------------------------------------------------ robustness
def test_chunked_bodies_under_the_cap(url):
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "stream": False,
                       "options": {"temperature": 0, "num_predict": 48}}).encode()

    def chunks(data, n=7):
        for i in range(0, len(data), n):
            yield data[i:i + n]

    r = httpx.post(url + "/api/chat", content=chunks(body), headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["message"]["content"] == ANSWER
    big = b" " * (MAX_BODY + 1)
    r = httpx.post(url + "/v1/chat/completions", content=chunks(big, 1 << 16))
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    assert httpx.get(url + "/api/version").status_code == 200


# the store-changing endpoints (create, copy, delete) are left out: fuzzing them would delete the
# model the other requests use; test_create_copy_pull gives them bad input
PATHS = ["/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show", "/api/pull", "/api/tags", "/api/ps", "/v1/chat/completions", "/v1/completions",
         "/v1/embeddings", "/v1/models", "/v1/models/tiny", "/metrics", "/", "/nope", "/api/%00", "/v1/models/%2e%2e"]
FIELDS = ["model", "messages", "prompt", "input", "options", "stream", "max_tokens", "temperature", "top_p",
          "n", "stop", "seed", "logprobs", "top_logprobs", "echo", "keep_alive", "think", "format", "from",
          "system", "parameters", "source", "destination", "dimensions", "encoding_format", "num_predict",
          "context", "raw", "top_k", "suffix", "modelfile"]


def fuzz_value(rng: random.Random, depth: int = 0):
    pool = [None, True, False, 0, -1, 1, 2 ** 70, -2 ** 70, 1e308, -0.0, 0.5, "", "tiny", "tiny:latest",
            "../../etc", "\u202e\U0001F600\x00", "x" * 3000, "5m", "high", [], {}, [1, 2], ["a"],
            [{"role": "user", "content": "hi"}], [{"role": 3}], {"temperature": "hot"}, {"num_predict": 2}]
    if depth < 2 and rng.random() < 0.2:
        return {rng.choice(FIELDS): fuzz_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    if depth < 2 and rng.random() < 0.1:
        return [fuzz_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return rng.choice(pool)


def fuzz_request(rng: random.Random) -> tuple[str, str, bytes]:
    method = rng.choice(["GET", "POST", "POST", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"])
    body = {k: fuzz_value(rng) for k in rng.sample(FIELDS, rng.randint(0, 6))}
    if rng.random() < 0.6:
        body["model"] = "tiny"
    # bounded work: a request that happens to be valid generates a few tokens, not the context
    body.update(max_tokens=2, options={"num_predict": 2, **(body["options"] if isinstance(body.get("options"), dict)
                                                            else {})})
    raw = json.dumps(body).encode()
    kind = rng.random()
    if kind < 0.1:
        raw = raw[: rng.randint(0, len(raw))]  # truncated
    elif kind < 0.15:
        raw = b"{\"model\": \"tiny\", " + bytes(rng.randrange(256) for _ in range(20))  # malformed
    elif kind < 0.2:
        raw = json.dumps(fuzz_value(rng)).encode()  # not an object
    return method, rng.choice(PATHS), raw


def test_fuzzed_requests_give_no_5xx(url):
    rng = random.Random(0)
    reqs = [fuzz_request(rng) for _ in range(1000)]
    t0 = time.perf_counter()
    local = threading.local()

    def send(req):
        method, path, raw = req
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=30)
        r = local.client.request(method, url + path, content=raw, headers={"Content-Type": "application/json"})
        return r.status_code, method, path, raw[:200]

    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(send, reqs))
    fives = [s for s in statuses if s[0] >= 500]
    assert not fives, fives[:5]
    assert len({s[0] for s in statuses}) > 3  # a spread of answers, not one refusal
    assert time.perf_counter() - t0 < 60
    r = ollama.Client(host=url, timeout=60).chat(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                                 options={"temperature": 0, "num_predict": 48})
    assert r.message.content == ANSWER  # still serving, still right


# ------------------------------------------------------------------------------------ load
def test_64_concurrent_streaming_clients(url):
    tok = Tokenizer.from_dir(MEMORIZER)
    prompt = render_chat(tok, [{"role": "user", "content": QUESTION}])
    results, errors = [None] * 64, []

    def client(i):
        try:
            oa = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
            if i % 3 == 0:
                parts = list(ollama.Client(host=url, timeout=300).chat(
                    model="tiny", messages=[{"role": "user", "content": QUESTION}], stream=True,
                    options={"temperature": 0, "num_predict": 48}))
                results[i] = ("".join(p.message.thinking or "" for p in parts),
                              "".join(p.message.content or "" for p in parts))
            elif i % 3 == 1:
                s = oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                               temperature=0, max_tokens=48, stream=True)
                th, ct = [], []
                for c in s:
                    d = c.choices[0].delta if c.choices else None
                    if d is not None:
                        th.append(getattr(d, "reasoning_content", None) or "")
                        ct.append(d.content or "")
                results[i] = ("".join(th), "".join(ct))
            else:
                s = oa.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=48, stream=True)
                results[i] = ("text", "".join(c.choices[0].text for c in s))
        except Exception as e:  # noqa: BLE001
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors[:3]
    for i, r in enumerate(results):  # the memorized reply, whole, for every client
        assert r == (("text", REPLY) if i % 3 == 2 else (THINKING, ANSWER)), (i, r)


def test_modelfile_num_predict_on_openai_endpoints(ol, oa):
    """A Modelfile's num_predict bounds an OpenAI request that gives no max_tokens; one that does wins."""
    ol.create(model="short", from_="tiny", parameters={"temperature": 0, "num_predict": 3})
    msgs = [{"role": "user", "content": QUESTION}]
    assert oa.chat.completions.create(model="short", messages=msgs).usage.completion_tokens == 3
    assert oa.chat.completions.create(model="short", messages=msgs, max_tokens=5).usage.completion_tokens == 5
    assert oa.completions.create(model="short", prompt="x", extra_body={"ignore_eos": True}).usage.completion_tokens == 3
    assert oa.completions.create(model="short", prompt="x", max_tokens=2, extra_body={"ignore_eos": True}).usage.completion_tokens == 2


def test_modelfile_sampling_on_openai_completions(ol, oa):
    """/v1/completions takes a Modelfile's sampling PARAMETERs (temperature, stop) where the
    request sets none, as chat does; a request's own value wins."""
    plain = oa.completions.create(model="tiny", prompt=QUESTION, max_tokens=8, temperature=0).choices[0].text
    assert len(plain) > 2
    stop = plain[1:3]
    ol.create(model="greedy-stop", from_="tiny", parameters={"temperature": 0, "stop": [stop]})
    got = oa.completions.create(model="greedy-stop", prompt=QUESTION, max_tokens=8)
    assert got.choices[0].text == plain[:plain.index(stop)] and got.choices[0].finish_reason == "stop"
    own = oa.completions.create(model="greedy-stop", prompt=QUESTION, max_tokens=8, stop=["\u0000"])
    assert own.choices[0].text == plain


def test_chat_command_applies_the_store_defaults(ol, home):
    """`nanoseek chat NAME` uses the entry's SYSTEM prompt and PARAMETERs as the server does: the
    same reply as the plain entry given that system prompt and those settings by hand; a
    command-line flag wins over a PARAMETER."""
    system = "You answer arithmetic."
    ol.create(model="chatty", from_="tiny", system=system, parameters={"temperature": 0, "num_predict": 6})
    env = {**os.environ, "NANOSEEK_HOME": home.root}

    def chat(name, text, *flags):
        p = subprocess.run([sys.executable, "-m", "nanoseek", "chat", name, *flags], input=text,
                           capture_output=True, text=True, timeout=120, env=env)
        assert p.returncode == 0, p.stderr
        return p.stdout

    by_hand = chat("tiny", f"/set system {system}\n{QUESTION}\n", "--temperature", "0", "--max-tokens", "6")
    assert by_hand.startswith("Set 'system")
    reply = chat("chatty", QUESTION + "\n")
    assert reply == by_hand.split("\n", 1)[1] and reply.strip()
    assert len(chat("chatty", QUESTION + "\n", "--max-tokens", "2")) < len(reply)
