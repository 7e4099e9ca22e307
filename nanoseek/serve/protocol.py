"""What the Ollama and OpenAI APIs share: the client error that names its field (each API renders
it in its own format), request bodies checked by pydantic models (a validation error becomes that
error, naming the field as `options.top_p` or `messages[0].role`), the one chat-message validator,
stop strings, seeds, durations, and the request id every log line of a request carries.

The field types are strict, as the APIs' JSON schemas are: a number is not a string, a boolean is
not a number; an integer may be written as an integral float (`1.0`).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import math
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError
from starlette.responses import Response

from ..infer.grammar import Constraint, GrammarError, check_grammar, grammar_tokenizer, json_object_grammar, json_schema_grammar, tool_call_grammar

MAX_BODY = 4 << 20  # a request body larger than this is refused unread (413)
MAX_N = 8
MAX_TOP_LOGPROBS = 20
MAX_STOP = 16
MISSING = object()  # "not sent", where None means something (keep_alive: forever)

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class APIError(Exception):
    """A client error (or a deliberate 5xx) with the field it concerns."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def bad(param: str, msg: str, code: str | None = None) -> APIError:
    return APIError(400, f"{param}: {msg}", param=param, code=code)


def short(v) -> str:
    """A value as JSON, cut to 40 characters (for error messages)."""
    try:
        return json.dumps(v)[:40]
    except (TypeError, ValueError):
        return repr(v)[:40]


def parse_json_body(raw: bytes) -> dict:
    if not raw.strip():
        raise APIError(400, "request body is empty; expected a JSON object")
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"malformed JSON in the request body: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


# ------------------------------------------------------------------ field types
def _integral(v):
    return int(v) if isinstance(v, float) and math.isfinite(v) and v.is_integer() else v


def _stop_list(v) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v else []
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ValueError("expected a string or an array of strings")
    if len(v) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings, got {len(v)}")
    return [s for s in v if s]


def _seed64(v: int) -> int:
    if not -(2 ** 63) <= v < 2 ** 64:
        raise ValueError(f"must fit in 64 bits, got {v}")
    return v


Int = Annotated[int, BeforeValidator(_integral), Strict()]
Num = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Stop = Annotated[Any, AfterValidator(_stop_list)]
Seed = Annotated[int, BeforeValidator(_integral), Strict(), AfterValidator(_seed64)]


class Body(BaseModel):
    """A request body: unknown fields are kept (and ignored), as both APIs do."""
    model_config = ConfigDict(extra="allow")


def field_name(loc: tuple) -> str:
    """pydantic's error location as the API names a field: ('messages', 0, 'role') -> messages[0].role."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validate(model: type[BaseModel], body: dict):
    """`body` as `model`, or a 400 naming the first field that is wrong."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        name = field_name(err["loc"]) or "body"
        msg = err["msg"].removeprefix("Value error, ")
        got = "" if err["type"] == "value_error" else f", got {short(err.get('input'))}"
        raise bad(name, msg[0].lower() + msg[1:] + got) from None


def seed_value(seed: int | None, random_value: int | None = None) -> int | None:
    """A request's seed as the engine takes it (None: unseeded, also for the API's 'random' value)."""
    if seed is None or (random_value is not None and seed == random_value):
        return None
    return seed % (2 ** 63)


def parse_duration(v, name: str = "keep_alive") -> float | None:
    """Ollama keep_alive: seconds (number) or '5m', '1h30m', '10s', '-1'. Negative -> None (forever)."""
    if isinstance(v, bool):
        raise bad(name, "expected a duration such as \"5m\" or a number of seconds")
    if isinstance(v, (int, float)):
        return None if v < 0 else float(v)
    if isinstance(v, str):
        s = v.strip()
        try:
            x = float(s)
            return None if x < 0 else x
        except ValueError:
            pass
        m = re.fullmatch(r"(-)?((?:\d+(?:\.\d+)?(?:h|m|s|ms))+)", s)
        if m:
            total = sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}[u]
                        for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", m.group(2)))
            return None if m.group(1) else total
    raise bad(name, f"expected a duration such as \"5m\" or a number of seconds, got {short(v)}")


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def check_unsupported(body: BaseModel, fields: dict[str, str]) -> None:
    """fields: name -> what it asks for. A non-empty value of a feature nanoseek lacks is a 400."""
    for key, what in fields.items():
        v = getattr(body, key, None)
        if v is None and body.model_extra:
            v = body.model_extra.get(key)
        if v in (None, "", [], {}, False, 0) or (key == "response_format" and isinstance(v, dict)
                                                  and v.get("type") in (None, "text")):
            continue
        raise bad(key, f"{what} is not supported by nanoseek")


# ------------------------------------------------------------------ chat messages
class Message(Body):
    """One chat message as either API sends it; `check_messages` holds the rules."""
    role: Any = None
    content: Any = None
    images: Any = None
    tool_calls: Any = None
    thinking: Any = None


def check_messages(messages: list[Message] | None, openai: bool) -> list[dict]:
    """The one message validator: [{role, content}] with text content. OpenAI also takes the
    `developer` role (as system) and content as an array of text parts; Ollama takes a `thinking`
    string. Earlier turns' thinking / reasoning_content is dropped (as R1's template does)."""
    if openai:
        if messages is None:
            raise bad("messages", "is required")
        if not messages:
            raise bad("messages", "must contain at least one message")
    roles = ("system", "developer", "user", "assistant", "tool") if openai else ("system", "user", "assistant", "tool")
    out = []
    for i, m in enumerate(messages or []):
        role = m.role
        if role not in roles:
            raise bad(f"messages[{i}].role", f"expected {', '.join(roles[:-1])} or {roles[-1]}; got {short(role)}")
        content = "" if m.content is None else m.content
        if openai and isinstance(content, list):
            parts = []
            for j, p in enumerate(content):
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise bad(f"messages[{i}].content[{j}]", "only text parts ({\"type\": \"text\", \"text\": ...}) "
                              "are supported")
                parts.append(p["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            what = "a string or an array of text parts" if openai else "a string"
            raise bad(f"messages[{i}].content", f"expected {what}, got {short(content)}")
        if m.images and not openai:
            raise bad(f"messages[{i}].images", "images are not supported by nanoseek")
        if not openai and m.thinking is not None and not isinstance(m.thinking, str):
            raise bad(f"messages[{i}].thinking", "expected a string")
        msg = {"role": "system" if role == "developer" else role, "content": content}
        if m.tool_calls:
            msg["tool_calls"] = _message_tool_calls(m.tool_calls, f"messages[{i}].tool_calls")
        out.append(msg)
    return out


def _message_tool_calls(calls, name: str) -> list[dict]:
    """An assistant message's earlier tool calls as [{type, function {name, arguments (JSON text)}}];
    OpenAI sends arguments as a JSON string, Ollama as an object."""
    if not isinstance(calls, list):
        raise bad(name, "expected an array of tool calls")
    out = []
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise bad(f"{name}[{j}].function.name", "expected the called function's name")
        args = f.get("arguments", {})
        if isinstance(args, str):
            try:
                json.loads(args)
            except json.JSONDecodeError:
                raise bad(f"{name}[{j}].function.arguments", "expected a JSON object (as a string)") from None
        elif isinstance(args, dict):
            args = json.dumps(args, ensure_ascii=False)
        else:
            raise bad(f"{name}[{j}].function.arguments", "expected a JSON object")
        out.append({"id": c.get("id"), "type": "function", "function": {"name": f["name"], "arguments": args}})
    return out


# ------------------------------------------------------------------ tools and structured output
def check_tools(tools) -> list[dict]:
    """`tools` (both APIs): [{"type": "function", "function": {name, description?, parameters?}}]."""
    if tools is None or tools == []:
        return []
    if not isinstance(tools, list):
        raise bad("tools", "expected an array of tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise bad(f"tools[{i}].type", "only function tools ({\"type\": \"function\"}) are supported")
        f = t.get("function")
        if not isinstance(f, dict):
            raise bad(f"tools[{i}].function", "expected an object with name and parameters")
        name = f.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise bad(f"tools[{i}].function.name", f"expected 1-64 letters, digits, _ . or -; got {short(name)}")
        params = f.get("parameters", {"type": "object"})
        if not isinstance(params, dict):
            raise bad(f"tools[{i}].function.parameters", "expected a JSON schema object")
        out.append({"type": "function", "function": {**f, "parameters": params or {"type": "object"}}})
    return out


def check_tool_choice(choice, tools: list[dict]) -> str | None:
    """`tool_choice`: 'none', 'auto', 'required' or {"type": "function", "function": {"name"}} ->
    'none', 'auto', 'required' or the named function (None without tools)."""
    if choice is None:
        return "auto" if tools else None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad("tool_choice", f"expected none, auto, required or a named function; got {short(choice)}")
        if choice == "required" and not tools:
            raise bad("tool_choice", "required needs tools")
        return choice if tools else None
    f = choice.get("function") if isinstance(choice, dict) else None
    name = f.get("name") if isinstance(f, dict) else None
    if not isinstance(name, str):
        raise bad("tool_choice", "expected none, auto, required or {\"type\": \"function\", \"function\": {\"name\"}}")
    if name not in [t["function"]["name"] for t in tools]:
        raise bad("tool_choice", f"function {name!r} is not among the tools")
    return "named:" + name


def openai_response_schema(fmt):
    """OpenAI `response_format` -> None (text), 'json' (any object) or a JSON schema."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise bad("response_format", "expected {\"type\": \"text\" | \"json_object\" | \"json_schema\"}")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return "json"
    js = fmt.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("name"), str):
        raise bad("response_format.json_schema", "expected an object with name and schema")
    schema = js.get("schema", {})
    if not isinstance(schema, (dict, bool)):
        raise bad("response_format.json_schema.schema", "expected a JSON schema object")
    if js.get("strict") is not None and not isinstance(js["strict"], bool):
        raise bad("response_format.json_schema.strict", "expected a boolean")
    return schema


def ollama_format_schema(fmt):
    """Ollama `format`: "json" (any object) or a JSON schema -> None, 'json' or the schema."""
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return "json"
    if isinstance(fmt, (dict, bool)):
        return fmt
    raise bad("format", f"expected \"json\" or a JSON schema object, got {short(fmt)}")


def output_grammar(lm, schema, param: str, tools: list[dict] | None = None, tool_choice: str | None = None):
    """The grammar (checked against the model's vocabulary) a request's output must follow, or None:
    a forced tool call (tool_choice required or named) or a response schema. A schema the grammar
    engine refuses is a 400 naming `param` (or the tool's parameters)."""
    tok = grammar_tokenizer(lm.tokenizer, lm.model.config.vocab_size)
    if tool_choice == "required" or (tool_choice or "").startswith("named:"):
        funcs = [(t["function"]["name"], t["function"]["parameters"]) for t in tools]
        for i, (_, params) in enumerate(funcs):
            try:
                check_grammar(json_schema_grammar(params), tok)
            except GrammarError as e:
                raise bad(f"tools[{i}].function.parameters", str(e)) from None
        if tool_choice.startswith("named:"):
            funcs = [f for f in funcs if f[0] == tool_choice[6:]]
        template = getattr(lm.tokenizer, "chat_template", None) or ""
        grammar = tool_call_grammar(lm.tokenizer, funcs, hermes="<tool_call>" in template)
    elif schema is None:
        return None
    else:
        grammar = json_object_grammar() if schema == "json" else None
        try:
            grammar = grammar or json_schema_grammar(schema)
            check_grammar(grammar, tok)
        except GrammarError as e:
            raise bad(param, str(e)) from None
    return grammar


def constraint(lm, grammar: str | None):
    """A fresh per-choice constraint for the engine's sampler (None: unconstrained)."""
    if grammar is None:
        return None
    return Constraint(grammar, grammar_tokenizer(lm.tokenizer, lm.model.config.vocab_size))


# ------------------------------------------------------------------ responses
def json_response(obj, status: int = 200, ollama: bool = False, headers: dict | None = None) -> Response:
    """A JSON reply (Ollama's end with a newline, as Ollama's own do)."""
    body = json.dumps(obj, ensure_ascii=False) + ("\n" if ollama else "")
    return Response(body.encode("utf-8"), status, headers=headers, media_type="application/json; charset=utf-8")


def dump(model: BaseModel) -> dict:
    """A response model as JSON: the fields that were set (None included), no others."""
    return model.model_dump(exclude_unset=True)


def ndjson_line(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


def sse_event(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "invalid_request_error"}


def error_body(err: APIError, openai: bool) -> dict:
    """An error in the API's own format: OpenAI's object naming the field, Ollama's string."""
    if openai:
        kind = ERROR_TYPES.get(err.status, "api_error" if err.status < 500 else "server_error")
        return {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code or err.status}}
    return {"error": err.message}
