"""The Ollama API (`/api/*`; NDJSON streaming, `stream` defaults to true), after Ollama's
`docs/api.md` and `server/routes.go`:

    POST /api/generate   prompt, system, raw, context, think, options, stream, keep_alive, logprobs
    POST /api/chat       messages, think (thinking split into message.thinking), options, stream
    GET  /api/tags       GET /api/ps     POST /api/show    GET /api/version
    DELETE /api/delete   POST /api/pull (no registry: success when the model is in the store,
                         else a 404 saying that nothing can be pulled offline)
    /api/embed, /api/embeddings: embed.py; /api/create, /api/copy: create.py

A store entry made from a Modelfile brings defaults (modelfile.py): its SYSTEM prompt and MESSAGE
turns go before a conversation that has no system message, its PARAMETERs under the request's
options, its TEMPLATE replaces the chat template.

options: temperature (0.8), top_p (0.9), top_k (40), seed (-1 = random), num_predict (-1 = until
the context ends; the default), stop, num_ctx; other Ollama options are ignored with a logged
warning. Counts and durations: prompt_eval_count, eval_count, total_duration, load_duration,
prompt_eval_duration, eval_duration (nanoseconds). Errors are `{"error": "..."}` naming the field.

Tools: /api/chat `tools` (OpenAI's function shape), answered as message.tool_calls [{function
{name, arguments (an object)}}], and `tool` messages fed back; `tool_choice` (as OpenAI's: auto,
none, required, a named function) is a nanoseek extension that forces a grammar-constrained call.
format "json" or a JSON schema (generate and chat): grammar-constrained decoding (grammar.py).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, field_validator
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..infer.chat import THINK_OPEN, ToolCallSplitter, parse_tool_calls, render_chat
from ..infer.store import human_count, iso_time
from .jobs import ClientGone, Job, JobStream, sampling_params, token_logprob
from .modelfile import parameter_lines, render_modelfile, with_default_messages
from .protocol import (MAX_TOP_LOGPROBS, MISSING, APIError, Body, Bool, Int, Message, Num, Seed, Stop, Str, bad,
                       check_messages, check_tool_choice, check_tools, check_unsupported, constraint, dump,
                       error_body, json_response, ndjson_line, now_iso, ollama_format_schema, output_grammar,
                       parse_duration, parse_json_body, request_id, seed_value, short, validate)

log = logging.getLogger("nanoseek.serve")
router = APIRouter()

DEFAULTS = dict(temperature=0.8, top_p=0.9, top_k=40)
OPTIONS_USED = {"temperature", "top_p", "top_k", "seed", "num_predict", "stop", "num_ctx"}
OPTIONS_IGNORED = {  # Ollama options accepted and ignored (no effect in nanoseek)
    "num_keep", "min_p", "typical_p", "repeat_last_n", "repeat_penalty", "presence_penalty",
    "frequency_penalty", "penalize_newline", "numa", "num_batch", "num_gpu", "main_gpu", "use_mmap",
    "num_thread", "low_vram", "f16_kv", "vocab_only", "use_mlock", "mirostat", "mirostat_tau",
    "mirostat_eta", "tfs_z", "draft_num_predict",
}
THINK_LEVELS = ("low", "medium", "high", "max")


# ------------------------------------------------------------------ request models
class Options(Body):
    temperature: Num | None = Field(None, ge=0)
    top_p: Num | None = Field(None, gt=0, le=1)
    top_k: Int | None = Field(None, ge=0)
    seed: Seed | None = None
    num_predict: Int | None = None
    stop: Stop = None
    num_ctx: Int | None = Field(None, ge=1)

    @field_validator("num_predict")
    @classmethod
    def _num_predict(cls, v):
        if v is not None and v != -1 and v < 1:
            raise ValueError(f"must be -1 (until the context ends) or >= 1, got {v}")
        return v


class GenerationRequest(Body):
    model: Any = None
    stream: Bool | None = None
    keep_alive: Any = None
    options: Options | None = None
    think: Any = None
    logprobs: Bool | None = None
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    format: Any = None


class ChatRequest(GenerationRequest):
    messages: list[Message] | None = None
    tools: Any = None
    tool_choice: Any = None


class GenerateRequest(GenerationRequest):
    prompt: Str | None = None
    system: Str | None = None
    raw: Bool | None = None
    context: list[Int] | None = None
    suffix: Any = None
    images: Any = None
    template: Any = None


class ModelRequest(Body):
    model: Any = None
    name: Any = None
    verbose: Bool | None = None
    stream: Bool | None = None


# ------------------------------------------------------------------ response models
class MessageOut(BaseModel):
    role: str = "assistant"
    content: str
    thinking: str | None = None
    tool_calls: list[dict] | None = None


class Reply(BaseModel):
    """A /api/generate or /api/chat reply line (streamed) or the whole reply."""
    model: str
    created_at: str
    message: MessageOut | None = None
    response: str | None = None
    thinking: str | None = None
    done: bool
    done_reason: str | None = None
    context: list[int] | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None
    logprobs: list[dict] | None = None


# ------------------------------------------------------------------ helpers
def _app(request: Request):
    return request.app.state.nanoseek


async def _body(request: Request, model: type[BaseModel]):
    return validate(model, parse_json_body(await request.body()))


def _model_name(body: ModelRequest):
    return body.model if body.model is not None else body.name


def details(m: dict) -> dict:
    family = "deepseek2" if m.get("architecture") in ("deepseek_v2", "deepseek_v3") else m.get("architecture")
    return {"parent_model": "", "format": "safetensors", "family": family, "families": [family],
            "parameter_size": human_count(m.get("parameters") or 0),
            "quantization_level": m.get("quantization") or ""}


def _with_defaults(opts: Options | None, lm) -> Options | None:
    """The request's options over the model's Modelfile PARAMETERs (a field the request sets wins)."""
    params = lm.manifest.get("defaults", {}).get("parameters")
    if not params:
        return opts
    sent = opts.model_dump(exclude_unset=True) if opts is not None else {}
    merged = {k: v for k, v in params.items() if k in OPTIONS_USED}
    merged.update({k: v for k, v in sent.items() if v is not None})
    return Options.model_validate(merged)


def _options(opts: Options | None, lm) -> tuple[dict, int | None, int]:
    opts = _with_defaults(opts, lm) or Options()
    for k, v in (opts.model_extra or {}).items():
        if k in OPTIONS_IGNORED:
            log.warning("[%s] option %s=%r is ignored by nanoseek", request_id.get(), k, v)
        else:
            log.warning("[%s] invalid option provided: %s", request_id.get(), k)
    num_predict = -1 if opts.num_predict is None else opts.num_predict
    ctx = lm.context_length if opts.num_ctx is None else min(opts.num_ctx, lm.context_length)
    kw = dict(temperature=float(DEFAULTS["temperature"] if opts.temperature is None else opts.temperature),
              top_p=float(DEFAULTS["top_p"] if opts.top_p is None else opts.top_p),
              top_k=DEFAULTS["top_k"] if opts.top_k is None else opts.top_k,
              seed=seed_value(opts.seed, random_value=-1), stop=opts.stop or [])
    return kw, (None if num_predict == -1 else num_predict), ctx


def _think(body: GenerationRequest, lm, name: str):
    think = body.think
    if think is None:
        return None
    if isinstance(think, str):
        if think not in THINK_LEVELS:
            raise bad("think", f"expected true, false or one of low, medium, high, max; got {think!r}")
        think = True
    elif not isinstance(think, bool):
        raise bad("think", f"expected true, false or a level, got {short(think)}")
    if think and not lm.can_think:
        raise APIError(400, f"\"{name}\" does not support thinking", param="think")
    return think


def _render(tok, msgs, think, tools=None) -> str:
    try:
        return render_chat(tok, msgs, add_generation_prompt=True, think=think, tools=tools)
    except ValueError as e:  # the template (or message checks) rejected the conversation
        raise bad("messages", str(e)) from None


def _lp_entries(lm, entries, top_lp) -> list[dict]:
    return [token_logprob(lm.tokenizer, t, lp, top, top_lp, True) for t, lp, top, _ in entries]


# ------------------------------------------------------------------ small endpoints
@router.get("/api/version")
async def version():
    return json_response({"version": __version__}, ollama=True)


def list_tags(app) -> dict:
    """The models of the store, as /api/tags lists them."""
    return {"models": [{"name": m["name"], "model": m["name"], "modified_at": iso_time(m["modified"]),
                        "size": m["size"], "digest": m["digest"], "details": details(m)}
                       for m in app.store.list()]}


@router.get("/api/tags")
async def tags(request: Request):
    return json_response(list_tags(_app(request)), ollama=True)


@router.get("/api/ps")
async def ps(request: Request):
    out = []
    for lm in _app(request).models.loaded():
        item = {"name": lm.name, "model": lm.name, "size": lm.size, "digest": lm.manifest.get("digest", ""),
                "details": details(lm.manifest), "size_vram": lm.size if lm.device.startswith("cuda") else 0,
                "context_length": lm.context_length}
        if lm.expires_at is not None:
            item["expires_at"] = dt.datetime.fromtimestamp(lm.expires_at, dt.timezone.utc).isoformat()
        out.append(item)
    return json_response({"models": out}, ollama=True)


@router.post("/api/show")
async def show(request: Request):
    app = _app(request)
    body = await _body(request, ModelRequest)
    name = app.models.resolve(_model_name(body))
    s = app.store.show(name)
    m = app.store.manifest(name)
    # GGUF's architecture names, as llama.cpp's and Ollama's model_info report them
    arch = {"deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2"}.get(s["architecture"], s["architecture"])
    info = {
        "general.architecture": arch, "general.parameter_count": s["parameters"],
        "general.basename": name.split(":")[0],
        f"{arch}.context_length": s["context_length"], f"{arch}.embedding_length": s["embedding_length"],
        f"{arch}.block_count": s["layers"], f"{arch}.attention.head_count": s["attention_heads"],
        f"{arch}.vocab_size": s["vocab_size"],
        "nanoseek.architecture": s["architecture"], "nanoseek.active_parameter_count": s["active_parameters"],
    }
    if s["dense"]:  # grouped-query attention
        info.update({f"{arch}.attention.head_count_kv": s["kv_heads"], f"{arch}.attention.key_length": s["head_dim"],
                     f"{arch}.attention.value_length": s["head_dim"], f"{arch}.rope.dimension_count": s["head_dim"]})
    else:  # MLA and DeepSeekMoE
        info.update({f"{arch}.attention.kv_lora_rank": s["kv_lora_rank"],
                     f"{arch}.rope.dimension_count": s["qk_rope_head_dim"],
                     f"{arch}.expert_count": s["experts"], f"{arch}.expert_used_count": s["experts_used"],
                     f"{arch}.expert_shared_count": s["shared_experts"], f"{arch}.nextn_predict_layers": s["mtp_depth"]})
    caps = ["completion"] + (["thinking"] if s["thinking"] else [])
    defaults = m.get("defaults", {})
    params = "\n".join(parameter_lines(defaults)) or (f"stop {json.dumps(s['eos_token'])}" if s.get("eos_token") else "")
    return json_response({
        "license": defaults.get("license", ""), "modelfile": render_modelfile(s["path"], defaults),
        "parameters": params.replace("PARAMETER ", ""), "template": defaults.get("template") or s["template"],
        "system": defaults.get("system", ""), "messages": defaults.get("messages", []),
        "details": details(m), "model_info": info, "capabilities": caps,
        "modified_at": iso_time(m.get("created") or time.time()),
    }, ollama=True)


@router.delete("/api/delete")
async def delete(request: Request):
    app = _app(request)
    body = await _body(request, ModelRequest)
    name = app.models.resolve(_model_name(body))
    await run_in_threadpool(app.models.unload, name)
    app.store.rm(name)
    return json_response({}, ollama=True)


@router.post("/api/pull")
async def pull(request: Request):
    app = _app(request)
    body = await _body(request, ModelRequest)
    name = _model_name(body)
    try:
        app.models.resolve(name)
    except APIError as e:
        if e.status != 404:
            raise
        raise APIError(404, f"cannot pull '{name}': nanoseek serves offline and reaches no model registry; "
                            f"import a checkpoint folder with `nanoseek create NAME --from DIR` (or -f Modelfile)",
                       param="model", code="model_not_found") from None

    async def lines():
        yield ndjson_line({"status": "success"})

    if body.stream is not False:
        return JobStream(lines(), "application/x-ndjson", lambda: None)
    return json_response({"status": "success"}, ollama=True)


# ------------------------------------------------------------------ generate / chat
@router.post("/api/generate")
async def generate(request: Request):
    return await _generation(request, chat=False)


@router.post("/api/chat")
async def chat(request: Request):
    return await _generation(request, chat=True)


async def _generation(request: Request, chat: bool):
    app = _app(request)
    t0 = time.perf_counter()
    body = await _body(request, ChatRequest if chat else GenerateRequest)
    name = body.model
    cname = app.models.resolve(name)
    stream = body.stream is not False
    keep = MISSING if body.keep_alive is None else parse_duration(body.keep_alive)
    tools, choice = [], None
    if chat:
        msgs = check_messages(body.messages, openai=False)
        tools = check_tools(body.tools)
        choice = check_tool_choice(body.tool_choice, tools)
    else:
        check_unsupported(body, {"suffix": "suffix (fill-in-the-middle)", "images": "images",
                                 "template": "a per-request template"})
    schema = ollama_format_schema(body.format)
    calls_wanted = choice not in (None, "none")
    forced = choice == "required" or (choice or "").startswith("named:")
    want_lp, top_lp = bool(body.logprobs), body.top_logprobs or 0
    if top_lp and not want_lp:
        raise bad("top_logprobs", "needs logprobs: true")
    lm, load_s = await run_in_threadpool(app.models.acquire, cname)
    release = lambda: app.models.release(lm, keep)  # noqa: E731
    try:
        kw, max_tokens, ctx = _options(body.options, lm)
        think = _think(body, lm, name)
        if forced or schema is not None:  # constrained output starts at the answer
            if think:
                raise bad("tool_choice" if forced else "format", "constrained output cannot follow thinking; "
                          "set think to false")
            think = False
        tok = lm.tokenizer
        if (chat and not msgs) or (not chat and not body.prompt and not body.context):  # load (or unload) only
            reply = Reply(model=name, created_at=now_iso(), done=True, done_reason="unload" if keep == 0 else "load",
                          total_duration=int((time.perf_counter() - t0) * 1e9), load_duration=int(load_s * 1e9))
            if chat:
                reply.message = MessageOut(role="assistant", content="")
            else:
                reply.response = ""
            await run_in_threadpool(release)
            return json_response(dump(reply), ollama=True)
        raw = not chat and bool(body.raw)
        defaults = lm.manifest.get("defaults", {})
        grammar = output_grammar(lm, schema, "format", tools, choice)
        if chat:
            text = _render(tok, with_default_messages(msgs, defaults), think, tools if calls_wanted else None)
            opened, ids = text.rstrip().endswith(THINK_OPEN), tok.encode(text)
        elif raw:
            opened, ids = False, list(body.context or []) + tok.encode(body.prompt or "")
        else:
            msgs = ([{"role": "system", "content": body.system}] if body.system else []) + [
                {"role": "user", "content": body.prompt or ""}]
            text = _render(tok, with_default_messages(msgs, defaults), think)
            opened, ids = text.rstrip().endswith(THINK_OPEN), list(body.context or []) + tok.encode(text)
        bad_ids = [t for t in ids if not 0 <= t < lm.model.config.vocab_size]
        if bad_ids:
            raise bad("context", f"token id {bad_ids[0]} is outside the vocabulary")
        split = lm.can_think and think is not False and not raw
        sp = sampling_params(len(ids), max_tokens, ctx, "prompt", logprobs=top_lp if top_lp else (1 if want_lp else 0),
                             constraint=constraint(lm, grammar), **kw)
        job = Job(lm, [ids], [sp], opened=opened and split, split=split, load_s=load_s, t0=t0)
        job.submit()
    except BaseException:
        await run_in_threadpool(release)
        raise
    reply = _Replies(job, name, chat, want_lp, top_lp, raw, ids, calls_wanted)
    if stream:
        return JobStream(reply.stream(request, app), "application/x-ndjson", release)
    try:
        await job.run(request.is_disconnected, app.counters)
        return json_response(dump(reply.final(streamed=False)), ollama=True)
    except ClientGone:
        log.info("[%s] client disconnected", request_id.get())
        return json_response({}, ollama=True)
    finally:
        await run_in_threadpool(release)


class _Replies:
    """The reply lines of one generate/chat job: deltas while streaming, then the final line."""

    def __init__(self, job: Job, name: str, chat: bool, want_lp: bool, top_lp: int, raw: bool, prompt_ids: list[int],
                 calls_wanted: bool = False):
        self.job, self.name, self.chat = job, name, chat
        self.want_lp, self.top_lp, self.raw, self.prompt_ids = want_lp, top_lp, raw, prompt_ids
        self.splitter = ToolCallSplitter() if calls_wanted else None

    @staticmethod
    def tool_calls(calls) -> list[dict]:
        return [{"function": {"index": k, "name": fname, "arguments": json.loads(args)}}
                for k, (fname, args) in enumerate(calls)]

    def line(self, th: str, ct: str) -> Reply:
        reply = Reply(model=self.name, created_at=now_iso(), done=False)
        if self.chat:
            reply.message = MessageOut(role="assistant", content=ct, **({"thinking": th} if th else {}))
        else:
            reply.response = ct
            if th:
                reply.thinking = th
        return reply

    async def stream(self, request: Request, app):
        job = self.job
        try:
            async for i, ev, th, ct in job.steps(request.is_disconnected, app.counters):
                lps = job.states[i].take_logprobs() if self.want_lp else []
                calls = []
                if self.splitter is not None:  # tool calls are held back, then sent whole in one line
                    ct = self.splitter.feed(ct)
                    if ev.finish_reason is not None:
                        rest, calls = self.splitter.finish()
                        ct += rest
                if ev.finish_reason is None and (th or ct or lps):
                    reply = self.line(th, ct)
                    if lps:
                        reply.logprobs = _lp_entries(job.lm, lps, self.top_lp)
                    yield ndjson_line(dump(reply))
                elif ev.finish_reason is not None and (th or ct or calls):
                    reply = self.line(th, ct)
                    if calls:
                        reply.message.tool_calls = self.tool_calls(calls)
                    yield ndjson_line(dump(reply))
            yield ndjson_line(dump(self.final(streamed=True)))
        except ClientGone:
            log.info("[%s] client disconnected", request_id.get())
        except APIError as e:  # after the stream started: one more line carrying the error
            yield ndjson_line(error_body(e, openai=False))
        except Exception as e:  # noqa: BLE001 - a fault mid-stream: logged, and told to the client
            log.exception("[%s] internal error while streaming", request_id.get())
            fault = APIError(500, f"internal server error: {type(e).__name__}: {e}")
            yield ndjson_line(error_body(fault, openai=False))

    def final(self, streamed: bool) -> Reply:
        job = self.job
        st = job.states[0]
        last = st.last
        reply = Reply(model=self.name, created_at=now_iso(), done=True)
        if self.chat:
            reply.message = MessageOut(role="assistant", content="" if streamed else "".join(st.text))
            if not streamed and self.splitter is not None:
                content, calls = parse_tool_calls(reply.message.content)
                if calls:
                    reply.message.content, reply.message.tool_calls = content, self.tool_calls(calls)
            if not streamed and job.split and st.splitter.seen:
                reply.message.thinking = "".join(st.thinking)
        else:
            reply.response = "" if streamed else "".join(st.text)
            if not streamed and job.split and st.splitter.seen:
                reply.thinking = "".join(st.thinking)
        reply.done_reason = last.finish_reason
        if not self.chat and not self.raw:
            reply.context = self.prompt_ids + st.token_ids
        total = time.perf_counter() - job.t0
        reply.total_duration, reply.load_duration = int(total * 1e9), int(job.load_s * 1e9)
        # the prompt tokens actually evaluated: those copied from the prefix cache were not
        reply.prompt_eval_count = last.prompt_tokens - last.cached_tokens
        reply.prompt_eval_duration = int(last.prefill_s * 1e9)
        reply.eval_count, reply.eval_duration = last.completion_tokens, int(last.decode_s * 1e9)
        if self.want_lp:
            lps = st.take_logprobs() if streamed else st.logprobs
            if lps or not streamed:
                reply.logprobs = _lp_entries(job.lm, lps, self.top_lp)
        return reply
