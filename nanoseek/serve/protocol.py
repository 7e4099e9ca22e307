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
        if m.tool_calls:
            raise bad(f"messages[{i}].tool_calls", "tool calling is not supported by nanoseek")
        if not openai and m.thinking is not None and not isinstance(m.thinking, str):
            raise bad(f"messages[{i}].thinking", "expected a string")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


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
