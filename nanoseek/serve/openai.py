"""The OpenAI API (`/v1/*`; SSE streaming ending with `data: [DONE]`), after OpenAI's API reference
for chat completions, the legacy completions and models:

    POST /v1/chat/completions   messages, max_tokens / max_completion_tokens, temperature (1.0),
         top_p, n (1..8), stop, seed, logprobs / top_logprobs (0..20), stream, stream_options.
         include_usage; extras top_k, ignore_eos, reasoning_effort ("none" = no thinking),
         chat_template_kwargs {thinking | enable_thinking}, thinking {type} (DeepSeek's API).
         Thinking goes to `reasoning_content`. tools / tool_choice (auto, none, required, a named
         function; required and named are grammar-constrained), answered as `tool_calls` with
         finish_reason "tool_calls" (streamed as tool_call deltas); `tool` messages fed back.
         response_format {"type": "json_object"} or {"type": "json_schema", "json_schema":
         {name, schema, strict}}: grammar-constrained decoding (grammar.py).
    POST /v1/completions        prompt (string, strings, token ids), max_tokens (16), echo, logprobs
    GET  /v1/models, /v1/models/{id}

Errors are `{"error": {"message", "type", "param", "code"}}` naming the field.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any
from urllib.parse import unquote

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ..infer.chat import THINK_OPEN, ToolCallSplitter, parse_tool_calls, render_chat
from .jobs import ClientGone, Job, JobStream, sampling_params, token_logprob
from .modelfile import with_default_messages
from .protocol import (MAX_N, MAX_TOP_LOGPROBS, SSE_DONE, APIError, Body, Bool, Int, Message, Num, Seed, Stop, Str,
                       bad, check_messages, check_tool_choice, check_tools, check_unsupported, constraint, dump,
                       error_body, json_response, openai_response_schema, output_grammar, parse_json_body,
                       request_id, sse_event, validate)

log = logging.getLogger("nanoseek.serve")
router = APIRouter()

MAX_PROMPTS = 64  # prompts (times n) per /v1/completions request
FINGERPRINT = "fp_nanoseek"
SCHEMA_FIELD = "response_format.json_schema.schema"
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


# ------------------------------------------------------------------ request models
class StreamOptions(Body):
    include_usage: Bool | None = None


class ChatTemplateKwargs(Body):
    thinking: Bool | None = None
    enable_thinking: Bool | None = None


class SamplingRequest(Body):
    model: Any = None
    stream: Bool | None = None
    temperature: Num | None = Field(None, ge=0)
    top_p: Num | None = Field(None, gt=0, le=1)
    top_k: Int | None = Field(None, ge=-1)
    n: Int | None = Field(None, ge=1, le=MAX_N)
    seed: Seed | None = None
    stop: Stop = None
    ignore_eos: Bool | None = None
    max_tokens: Int | None = Field(None, ge=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    presence_penalty: Num | None = Field(None, ge=-2, le=2)
    frequency_penalty: Num | None = Field(None, ge=-2, le=2)
    best_of: Int | None = Field(None, ge=1)
    logit_bias: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    response_format: Any = None
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[Message] | None = None
    logprobs: Bool | None = None
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    reasoning_effort: Str | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    thinking: Any = None


class CompletionRequest(SamplingRequest):
    prompt: Any = None
    max_tokens: Int | None = Field(None, ge=0)  # 0: score the prompt (with echo) without generating
    logprobs: Int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: Bool | None = None
    suffix: Any = None


# ------------------------------------------------------------------ response models
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict


class ChatMessage(BaseModel):
    role: str
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[dict] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: dict | None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: dict | None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict | None
    finish_reason: str | None


class TextCompletion(BaseModel):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ------------------------------------------------------------------ helpers
def _app(request: Request):
    return request.app.state.nanoseek


async def _body(request: Request, model: type[BaseModel]):
    return validate(model, parse_json_body(await request.body()))


def _sampling(body: SamplingRequest, default_max: int | None):
    """(engine keywords, n, seed, max_tokens, include_usage) of a chat or completion request."""
    max_tokens = body.max_completion_tokens
    if max_tokens is None:
        max_tokens = default_max if body.max_tokens is None else body.max_tokens
    for k in ("presence_penalty", "frequency_penalty"):
        if getattr(body, k):
            raise bad(k, "is not supported by nanoseek (send 0 or leave it out)")
    n = 1 if body.n is None else body.n
    if body.best_of is not None and body.best_of != n:
        raise bad("best_of", "is not supported by nanoseek (leave it out, or set it equal to n)")
    check_unsupported(body, {"logit_bias": "logit_bias", "functions": "function calling (send tools)"})
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    kw = dict(temperature=float(1.0 if body.temperature is None else body.temperature),
              top_p=float(1.0 if body.top_p is None else body.top_p), top_k=max(0, body.top_k or 0),
              stop=body.stop or [], ignore_eos=bool(body.ignore_eos))
    seed = None if body.seed is None else body.seed % (2 ** 63)
    return kw, n, seed, max_tokens, include_usage


def _modelfile_sampling(body: SamplingRequest, kw: dict, seed, lm):
    """A Modelfile's PARAMETERs (temperature, top_p, top_k, stop, seed) where the request sets none."""
    params = lm.manifest.get("defaults", {}).get("parameters", {})
    for k in ("temperature", "top_p", "top_k"):
        if getattr(body, k) is None and k in params:
            kw[k] = type(kw[k])(params[k])
    if body.stop is None and params.get("stop"):
        kw["stop"] = list(params["stop"])
    if seed is None and body.seed is None and "seed" in params and params["seed"] >= 0:
        seed = params["seed"] % (2 ** 63)
    return kw, seed


def _modelfile_max_tokens(body: SamplingRequest, max_tokens, lm):
    """A Modelfile's PARAMETER num_predict (-1: to the context's end) where the request sets no
    max_tokens / max_completion_tokens; else `max_tokens` as the request made it."""
    num_predict = lm.manifest.get("defaults", {}).get("parameters", {}).get("num_predict")
    if num_predict is None or body.max_tokens is not None or getattr(body, "max_completion_tokens", None) is not None:
        return max_tokens
    return None if num_predict < 0 else num_predict


def _think(body: ChatCompletionRequest, lm, name: str):
    think = None
    effort = body.reasoning_effort
    if effort is not None:
        if effort not in EFFORTS:
            raise bad("reasoning_effort", f"expected none, low, medium or high; got {effort!r}")
        think = effort != "none"
    ctk = body.chat_template_kwargs
    for k in ("thinking", "enable_thinking"):
        v = getattr(ctk, k) if ctk is not None else None
        if v is not None:
            think = v
    th = body.thinking
    if th is not None:  # DeepSeek API: {"type": "enabled" | "disabled"}
        if not isinstance(th, dict) or th.get("type") not in ("enabled", "disabled"):
            raise bad("thinking", "expected {\"type\": \"enabled\"} or {\"type\": \"disabled\"}")
        think = th["type"] == "enabled"
    if think and not lm.can_think:
        raise bad("reasoning_effort" if effort else "thinking", f"model '{name}' does not support thinking")
    return think


def _job(lm, prompts, kw, n, seed, max_tokens, n_logprobs, load_s, t0, opened=False, split=False,
         grammar=None) -> Job:
    """n choices per prompt; choice j of a seeded request samples with seed + j; with a grammar,
    each choice gets its own constraint."""
    all_prompts, params = [], []
    for ids in prompts:
        for j in range(n):
            all_prompts.append(ids)
            params.append(sampling_params(len(ids), max_tokens, lm.context_length, "messages", logprobs=n_logprobs,
                                          seed=None if seed is None else (seed + j) % (2 ** 63),
                                          constraint=constraint(lm, grammar), **kw))
    return Job(lm, all_prompts, params, opened=opened, split=split, load_s=load_s, t0=t0)


def _chat_logprobs(lm, entries, top_lp) -> dict:
    return {"content": [token_logprob(lm.tokenizer, t, lp, top, top_lp, True) | ({} if top_lp else {"top_logprobs": []})
                        for t, lp, top, _ in entries]}


def _prompt_entries(tok, prompt: str | list[int], ids: list[int], scores: list) -> list:
    """A scored prompt as log-prob entries (token, log-prob, top, offset in the echoed text); the
    first token has no log-prob. Offsets count from the echoed prompt, which lacks a BOS that the
    server put in front of a string prompt."""
    skip = len(tok.decode(ids[:1])) if isinstance(prompt, str) and len(ids) > 1 and ids[0] == tok.bos_id else 0
    return [(t, lp, top, max(0, len(tok.decode(ids[:k])) - skip)) for k, (t, (lp, top)) in enumerate(zip(ids, scores))]


def _legacy_logprobs(lm, entries, n_lp, base_offset=0) -> dict:
    """The legacy completions' log-probs: parallel lists of tokens, log-probs, top maps, offsets."""
    tok = lm.tokenizer
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t, lp, top, off in entries:
        out["tokens"].append(tok.decode([t]))
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append({tok.decode([a]): b for a, b in (top or [])[:n_lp]} if n_lp and lp is not None
                                   else None)
        out["text_offset"].append(base_offset + off)
    return out


def _eos_entry(tok, st) -> list:
    """The EOS that ended a choice as one more log-prob entry, as OpenAI-compatible servers list it
    (the engine reports it as a finishing event without a token). Scorers such as
    lm-evaluation-harness ask for one generated token and drop the last entry: without the EOS
    entry they would drop a prompt token instead. Its log-prob is read from the finishing event's
    top alternatives (which hold the chosen token under greedy decoding); None when it is not among
    them."""
    ev = st.last
    if ev is None or ev.finish_reason != "stop" or ev.token_id is not None or tok.eos_id is None:
        return []
    lp = next((b for a, b in ev.top_logprobs or [] if a == tok.eos_id), None)
    return [(tok.eos_id, lp, ev.top_logprobs, st.n_chars)]


async def _reply(request: Request, job: Job, release, stream: bool, chunks, whole):
    """Stream `chunks()` as SSE, or run the job and answer `whole()`; the model is released after."""
    app = _app(request)
    if stream:
        return JobStream(chunks(), "text/event-stream", release)
    try:
        await job.run(request.is_disconnected, app.counters)
        return json_response(dump(whole()))
    except ClientGone:
        log.info("[%s] client disconnected", request_id.get())
        return json_response({})
    finally:
        await run_in_threadpool(release)


async def _sse_errors(events):
    """SSE events, with an error after the stream started sent as one more event."""
    try:
        async for data in events:
            yield data
    except ClientGone:
        log.info("[%s] client disconnected", request_id.get())
    except APIError as e:
        yield sse_event(error_body(e, openai=True))
    except Exception as e:  # noqa: BLE001 - a fault mid-stream: logged, and told to the client
        log.exception("[%s] internal error while streaming", request_id.get())
        yield sse_event(error_body(APIError(500, f"internal server error: {type(e).__name__}: {e}"), openai=True))


# ------------------------------------------------------------------ models
@router.get("/v1/models")
async def models(request: Request):
    data = [{"id": m["name"], "object": "model", "created": int(m["modified"]), "owned_by": "nanoseek"}
            for m in _app(request).store.list()]
    return json_response({"object": "list", "data": data})


@router.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str):
    app = _app(request)
    name = app.models.resolve(unquote(model_id))
    m = app.store.manifest(name)
    return json_response({"id": name, "object": "model", "created": int(m.get("created") or 0),
                          "owned_by": "nanoseek"})


# ------------------------------------------------------------------ chat completions
@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    app = _app(request)
    t0 = time.perf_counter()
    body = await _body(request, ChatCompletionRequest)
    name = body.model
    cname = app.models.resolve(name)
    stream = bool(body.stream)
    msgs = check_messages(body.messages, openai=True)
    tools = check_tools(body.tools)
    choice = check_tool_choice(body.tool_choice, tools)
    schema = openai_response_schema(body.response_format)
    calls_wanted = choice not in (None, "none")
    forced = choice == "required" or (choice or "").startswith("named:")
    kw, n, seed, max_tokens, include_usage = _sampling(body, None)
    want_lp, top_lp = bool(body.logprobs), body.top_logprobs or 0
    if top_lp and not want_lp:
        raise bad("top_logprobs", "needs logprobs: true")
    lm, load_s = await run_in_threadpool(app.models.acquire, cname)
    release = lambda: app.models.release(lm)  # noqa: E731
    try:
        think = _think(body, lm, name)
        kw, seed = _modelfile_sampling(body, kw, seed, lm)
        max_tokens = _modelfile_max_tokens(body, max_tokens, lm)
        msgs = with_default_messages(msgs, lm.manifest.get("defaults", {}))
        if forced or schema is not None:  # constrained output starts at the answer
            if think:
                raise bad("tool_choice" if forced else "response_format", "constrained output cannot follow thinking; "
                          "turn thinking off")
            think = False
        grammar = output_grammar(lm, schema, SCHEMA_FIELD, tools, choice)
        try:
            text = render_chat(lm.tokenizer, msgs, add_generation_prompt=True, think=think,
                               tools=tools if calls_wanted else None)
        except ValueError as e:  # the template (or message checks) rejected the conversation
            raise bad("messages", str(e)) from None
        ids = lm.tokenizer.encode(text)
        split = lm.can_think and think is not False
        opened = split and text.rstrip().endswith(THINK_OPEN)
        job = _job(lm, [ids], kw, n, seed, max_tokens, top_lp if top_lp else (1 if want_lp else 0), load_s, t0,
                   opened, split, grammar)
        job.submit()
    except BaseException:
        await run_in_threadpool(release)
        raise
    cid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())

    def chunk(choices, usage=None) -> bytes:
        c = ChatCompletionChunk(id=cid, object="chat.completion.chunk", created=created, model=name,
                                system_fingerprint=FINGERPRINT, choices=choices)
        if include_usage:
            c.usage = usage
        return sse_event(dump(c))

    def call_entries(calls) -> list[dict]:
        return [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                 "function": {"name": fname, "arguments": args}} for fname, args in calls]

    splitters = [ToolCallSplitter() for _ in job.prompts] if calls_wanted else None

    async def chunks():
        for i in range(len(job.prompts)):
            yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""), logprobs=None,
                                     finish_reason=None)])
        async for i, ev, th, ct in job.steps(request.is_disconnected, app.counters):
            lps = job.states[i].take_logprobs() if want_lp else []
            calls = []
            if splitters is not None:  # tool calls are held back, then sent as tool_call deltas
                ct = splitters[i].feed(ct)
                if ev.finish_reason is not None:
                    rest, calls = splitters[i].finish()
                    ct += rest
            if th or ct or lps:
                delta = Delta()
                if th:
                    delta.reasoning_content = th
                if ct or not th:
                    delta.content = ct
                lp = _chat_logprobs(lm, lps, top_lp) if lps else None
                yield chunk([ChunkChoice(index=i, delta=delta, logprobs=lp,
                                         finish_reason=None)])
            for k, call in enumerate(call_entries(calls)):  # the call's head, then its arguments
                head = {"index": k, "id": call["id"], "type": "function",
                        "function": {"name": call["function"]["name"], "arguments": ""}}
                yield chunk([ChunkChoice(index=i, delta=Delta(tool_calls=[head]), logprobs=None, finish_reason=None)])
                args = {"index": k, "function": {"arguments": call["function"]["arguments"]}}
                yield chunk([ChunkChoice(index=i, delta=Delta(tool_calls=[args]), logprobs=None, finish_reason=None)])
            if ev.finish_reason is not None:
                finish = "tool_calls" if calls else ev.finish_reason
                yield chunk([ChunkChoice(index=i, delta=Delta(), logprobs=None, finish_reason=finish)])
        if include_usage:
            yield chunk([], Usage(**job.usage(n)))
        yield SSE_DONE

    def whole() -> ChatCompletion:
        choices = []
        for i, st in enumerate(job.states):
            content, calls = "".join(st.text), []
            if calls_wanted:
                content, calls = parse_tool_calls(content)
            msg = ChatMessage(role="assistant", content=content if content or not calls else None)
            if job.split and st.splitter.seen:
                msg.reasoning_content = "".join(st.thinking)
            if calls:
                msg.tool_calls = call_entries(calls)
            choices.append(ChatChoice(index=i, message=msg,
                                      logprobs=_chat_logprobs(lm, st.logprobs, top_lp) if want_lp else None,
                                      finish_reason="tool_calls" if calls else st.last.finish_reason))
        return ChatCompletion(id=cid, object="chat.completion", created=created, model=name,
                              system_fingerprint=FINGERPRINT, choices=choices, usage=Usage(**job.usage(n)))

    return await _reply(request, job, release, stream, lambda: _sse_errors(chunks()), whole)


# ------------------------------------------------------------------ legacy completions
def _prompts(prompt) -> list:
    """A completions prompt as a list of prompts, each a string or a list of token ids."""
    if prompt is None:
        raise bad("prompt", "is required")
    ints = lambda p: all(isinstance(t, int) and not isinstance(t, bool) for t in p)  # noqa: E731
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and ints(prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and ints(p) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise bad("prompt", "expected a string, an array of strings, an array of token ids or an array of "
                  "token-id arrays (non-empty)")
    if len(prompts) > MAX_PROMPTS:
        raise bad("prompt", f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}")
    return prompts


def _prompt_ids(tok, vocab: int, p) -> list[int]:
    if isinstance(p, str):
        ids = tok.encode(p)
        if tok.bos_id is not None and not p.startswith(tok.bos_token or "\0"):
            ids = [tok.bos_id] + ids
        if not ids:
            raise bad("prompt", "must not be empty")
        return ids
    bad_ids = [t for t in p if not 0 <= t < vocab]
    if bad_ids:
        raise bad("prompt", f"token id {bad_ids[0]} is outside the vocabulary of {vocab}")
    return p


@router.post("/v1/completions")
async def completions(request: Request):
    app = _app(request)
    t0 = time.perf_counter()
    body = await _body(request, CompletionRequest)
    name = body.model
    cname = app.models.resolve(name)
    stream = bool(body.stream)
    prompts = _prompts(body.prompt)
    kw, n, seed, max_tokens, include_usage = _sampling(body, 16)
    if len(prompts) * n > MAX_PROMPTS:
        raise bad("n", f"prompts x n must be at most {MAX_PROMPTS}")
    n_lp, echo = body.logprobs, bool(body.echo)
    if max_tokens == 0 and not echo:
        raise bad("max_tokens", "must be >= 1 (0 only with echo: true, to score the prompt)")
    if echo and (n_lp is not None or max_tokens == 0):  # echoed prompt tokens get their log-probs
        kw["prompt_logprobs"] = n_lp or 0
    score = echo and n_lp is not None
    check_unsupported(body, {"suffix": "suffix (fill-in-the-middle)", "tools": "tool calling on /v1/completions "
                             "(use /v1/chat/completions)"})
    schema = openai_response_schema(body.response_format)
    lm, load_s = await run_in_threadpool(app.models.acquire, cname)
    release = lambda: app.models.release(lm)  # noqa: E731
    try:
        kw, seed = _modelfile_sampling(body, kw, seed, lm)
        max_tokens = _modelfile_max_tokens(body, max_tokens, lm)
        id_prompts = [_prompt_ids(lm.tokenizer, lm.model.config.vocab_size, p) for p in prompts]
        job = _job(lm, id_prompts, kw, n, seed, max_tokens, n_lp if n_lp else (1 if n_lp == 0 else 0), load_s, t0,
                   grammar=output_grammar(lm, schema, SCHEMA_FIELD))
        job.submit()
    except BaseException:
        await run_in_threadpool(release)
        raise
    cid, created = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())
    echo_text = [((p if isinstance(p, str) else lm.tokenizer.decode(p)) if echo else "") for p in prompts]

    def chunk(choices, usage=None) -> bytes:
        c = TextCompletion(id=cid, object="text_completion", created=created, model=name, choices=choices)
        if include_usage:
            c.usage = usage
        return sse_event(dump(c))

    def prompt_logprobs(i: int) -> dict | None:
        if not score:
            return None
        return _legacy_logprobs(lm, _prompt_entries(lm.tokenizer, prompts[i // n], id_prompts[i // n],
                                                    job.states[i].prompt_logprobs), n_lp)

    def echo_chunk(i: int) -> bytes:
        return chunk([CompletionChoice(index=i, text=echo_text[i // n], logprobs=prompt_logprobs(i),
                                       finish_reason=None)])

    async def chunks():
        echoed = [False] * len(job.prompts)
        if echo and not score:
            for i in range(len(job.prompts)):
                yield echo_chunk(i)
        async for i, ev, th, ct in job.steps(request.is_disconnected, app.counters):
            if score and not echoed[i]:  # the prompt's log-probs came with the choice's first event
                echoed[i] = True
                yield echo_chunk(i)
            lps = job.states[i].take_logprobs() if n_lp is not None else []
            if n_lp is not None and ev.finish_reason is not None:
                lps += _eos_entry(lm.tokenizer, job.states[i])
            if ct or lps or ev.finish_reason is not None:
                lp = _legacy_logprobs(lm, lps, n_lp, len(echo_text[i // n])) if lps else None
                yield chunk([CompletionChoice(index=i, text=ct, logprobs=lp, finish_reason=ev.finish_reason)])
        if include_usage:
            yield chunk([], Usage(**job.usage(n)))
        yield SSE_DONE

    def whole() -> TextCompletion:
        choices = []
        for i, st in enumerate(job.states):
            e = echo_text[i // n]
            lp = None
            if n_lp is not None:
                lp = _legacy_logprobs(lm, st.logprobs + _eos_entry(lm.tokenizer, st), n_lp, len(e))
                if score:
                    lp = {k: v + lp[k] for k, v in prompt_logprobs(i).items()}
            choices.append(CompletionChoice(index=i, text=e + "".join(st.text), logprobs=lp,
                                            finish_reason=st.last.finish_reason))
        return TextCompletion(id=cid, object="text_completion", created=created, model=name, choices=choices,
                              usage=Usage(**job.usage(n)))

    return await _reply(request, job, release, stream, lambda: _sse_errors(chunks()), whole)
