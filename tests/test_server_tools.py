"""Structured output and tool calls against the real `openai` and `ollama` clients on loopback:
JSON-schema output (validated with `jsonschema`) from the fixture model and from a random-weight
one, json_object mode, forced tool-call round trips (request -> tool_calls -> tool message ->
reply) in both APIs, streamed tool-call deltas, bad schemas refused naming the field, and (at the
engine) a constrained request leaving its unconstrained batch neighbour's tokens unchanged."""

import json
import shutil
import threading

import httpx
import jsonschema
import ollama
import openai
import pytest
import torch

from nanoseek import DeepSeekV3
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.infer.grammar import Constraint, grammar_tokenizer, json_schema_grammar
from nanoseek.serve.app import make_server
from nanoseek.infer.store import Store
from nanoseek.tokenizer import Tokenizer
from fixtures.make_fixtures import MEMORIZER

CONTEXT = 1024  # room for the tools section of the prompt
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "member": {"type": "boolean"}},
          "required": ["name", "age", "member"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TOOLS = [WEATHER, {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer", "maximum": 999}},
                                  "required": ["a"], "additionalProperties": False}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tools")
    random_dir = root / "random"
    shutil.copytree(MEMORIZER, random_dir)  # the fixture's tokenizer and config, fresh random weights
    cfg = DeepSeekV3.from_pretrained(MEMORIZER).config
    DeepSeekV3.from_config(cfg, seed=1).save_pretrained(str(random_dir))
    store = Store(str(root / "home"))
    store.create("tiny", MEMORIZER)
    store.create("random", str(random_dir))
    yield store
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def url(home):
    server = make_server("127.0.0.1", 0, store=home, context_length=CONTEXT)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown_all()


@pytest.fixture
def oa(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def ol(url):
    return ollama.Client(host=url, timeout=120)


def schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


@pytest.mark.parametrize("model,temperature", [("tiny", 0.0), ("random", 1.0)])
def test_openai_json_schema_output_validates(oa, model, temperature):
    r = oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "Who are you?"}],
                                   response_format=schema_format(PERSON), temperature=temperature, seed=7,
                                   max_tokens=200, n=2)
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), PERSON)


def test_ollama_format_schema_and_json(ol):
    r = ol.chat(model="random", messages=[{"role": "user", "content": "Who are you?"}], format=PERSON,
                options={"temperature": 1.0, "seed": 3, "num_predict": 200})
    jsonschema.validate(json.loads(r.message.content), PERSON)
    g = ol.generate(model="random", prompt="Who?", format=PERSON, options={"seed": 4, "num_predict": 200})
    jsonschema.validate(json.loads(g.response), PERSON)


def test_openai_json_object_mode(oa):
    r = oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Who are you?"}],
                                   response_format={"type": "json_object"}, temperature=0, max_tokens=300)
    text = r.choices[0].message.content
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":  # a finished output is a whole JSON object
        assert isinstance(json.loads(text), dict)


def test_openai_forced_tool_call_round_trip(oa):
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        r = oa.chat.completions.create(model="random", messages=ASK, tools=TOOLS, tool_choice=choice,
                                       temperature=1.0, seed=5, max_tokens=200)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.tool_calls
        call = c.message.tool_calls[0]
        assert call.type == "function" and call.id
        spec = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
        if choice != "required":
            assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), spec[call.function.name])
    msgs = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                  {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    r2 = oa.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, temperature=0, max_tokens=16)
    assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens  # the call and its result are in the prompt


def test_openai_streamed_tool_call_deltas(oa):
    kw = dict(model="random", messages=ASK, tools=TOOLS, temperature=0, max_tokens=200,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = oa.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    name, args, finish = "", "", None
    for chunk in oa.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                assert d.index == 0
                name += d.function.name or ""
                args += d.function.arguments or ""
            finish = c.finish_reason or finish
    assert (name, args, finish) == (whole.function.name, whole.function.arguments, "tool_calls")


def test_ollama_forced_tool_call_round_trip(url, ol):
    # the Ollama client has no tool_choice: the forcing first turn goes over plain HTTP
    body = {"model": "random", "messages": ASK, "tools": TOOLS, "stream": False,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "options": {"temperature": 1.0, "seed": 2, "num_predict": 200}}
    r = httpx.post(url + "/api/chat", json=body, timeout=120).json()
    call = r["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather"
    jsonschema.validate(call["arguments"], WEATHER["function"]["parameters"])
    msgs = ASK + [{"role": "assistant", "content": "", "tool_calls": [{"function": call}]},
                  {"role": "tool", "content": "sunny, 21 C", "tool_name": "get_weather"}]
    reply = ol.chat(model="tiny", messages=msgs, tools=TOOLS, options={"temperature": 0, "num_predict": 16})
    assert reply.done and reply.prompt_eval_count > 0
    with httpx.stream("POST", url + "/api/chat", json={**body, "stream": True}, timeout=120) as resp:
        streamed = list(resp.iter_lines())
    calls = [json.loads(x)["message"].get("tool_calls") for x in streamed if x]
    assert [c for c in calls if c][0][0]["function"] == call


BAD = [
    ("/v1/chat/completions", {"response_format": schema_format({"type": "nonsense"})},
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "nonsense"}}}], "tool_choice": "required"}, "tools[0].function.parameters"),
    ("/v1/chat/completions", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
     "tools[0].function.name"),
    ("/api/chat", {"format": {"type": "nonsense"}, "stream": False}, "format"),
    ("/api/chat", {"format": 5, "stream": False}, "format"),
]


@pytest.mark.parametrize("path,extra,field", BAD, ids=[b[2] for b in BAD])
def test_bad_schemas_are_400_naming_the_field(url, path, extra, field):
    r = httpx.post(url + path, json={"model": "tiny", "messages": ASK, **extra}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    if path.startswith("/v1"):
        assert err["param"] == field and field in err["message"]
    else:
        assert field in err


def test_constrained_neighbour_leaves_unconstrained_tokens_unchanged():
    model, tok = DeepSeekV3.from_pretrained(MEMORIZER), Tokenizer.from_dir(MEMORIZER)
    engine = Engine(model, tok, max_context=256, max_batch=4)
    grammar = json_schema_grammar(PERSON)
    gtok = grammar_tokenizer(tok, model.config.vocab_size)
    prompts = [tok.encode("hello there"), tok.encode("hello there"), tok.encode("two plus two")]
    plain = [SamplingParams(max_tokens=40, temperature=0), SamplingParams(max_tokens=40, temperature=0.9, seed=11)]
    alone = engine.generate(prompts[:1] + prompts[2:], plain)
    mixed = engine.generate(prompts, [plain[0], SamplingParams(max_tokens=120, temperature=0.9, seed=3,
                                                               constraint=Constraint(grammar, gtok)), plain[1]])
    assert [c.token_ids for c in alone] == [mixed[0].token_ids, mixed[2].token_ids]
    jsonschema.validate(json.loads(mixed[1].text), PERSON)


def test_builtin_template_renders_deepseek_tool_turns():
    from nanoseek.infer.chat import TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END, builtin_template, tool_call_text
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"C"}'}}
    msgs = ASK + [{"role": "assistant", "content": "", "tool_calls": [call]},
                  {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "21 C"}]
    text = builtin_template(msgs, tools=[WEATHER])
    want = (TOOL_CALLS_BEGIN + tool_call_text("get_weather", call["function"]["arguments"]) + TOOL_CALLS_END
            + "<｜end▁of▁sentence｜>" + TOOL_OUTPUTS_BEGIN + TOOL_OUTPUT_BEGIN + "sunny")
    assert want in text and text.endswith("21 C<｜tool▁output▁end｜>" + TOOL_OUTPUTS_END)  # the reply goes on here
    reply = builtin_template(msgs + [{"role": "assistant", "content": "Sunny."}], add_generation_prompt=False)
    assert reply.endswith(TOOL_OUTPUTS_END + "Sunny.<｜end▁of▁sentence｜>")
    assert "## Tools" in text and '"get_weather"' in text
    assert builtin_template(ASK) == builtin_template(ASK, tools=None)  # no tools: the prompt as before


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_tool_call_splitter_matches_parse(step):
    from nanoseek.infer.chat import ToolCallSplitter, parse_tool_calls, tool_call_text
    calls = "<｜tool▁calls▁begin｜>" + tool_call_text("add", '{"a":1}') + "<｜tool▁calls▁end｜>"
    hermes = '<tool_call>{"name":"add","arguments":{"a":2}}</tool_call>'
    for text in ["plain answer <not a call", "Let me check. " + calls, calls, hermes, "<｜tool▁calls▁begin｜>broken"]:
        sp = ToolCallSplitter()
        streamed = "".join(sp.feed(text[i:i + step]) for i in range(0, len(text), step))
        rest, got = sp.finish()
        assert (streamed + rest, got) == parse_tool_calls(text)
