"""`nanoseek serve`: an Ollama- and OpenAI-compatible HTTP server over the local model store.

Standard library only (`http.server.ThreadingHTTPServer`, one thread per connection). Every model
in the store is served by name (`name[:tag]`, tag `latest` by default); a model is loaded on its
first request and keeps one `Engine` (continuous batching: concurrent requests decode together).

Ollama (`/api/*`, NDJSON streaming, `stream` defaults to true):
    POST /api/generate   prompt, system, raw, context, think, options, stream, keep_alive, logprobs
    POST /api/chat       messages, think (thinking split into message.thinking), options, stream
    GET  /api/tags       GET /api/ps     POST /api/show    GET /api/version
    DELETE /api/delete   POST /api/pull (local only: success when present)
    options: temperature (0.8), top_p (0.9), top_k (40), seed (-1 = random), num_predict
    (-1 = until the context ends; the default), stop, num_ctx; other Ollama options are ignored
    with a logged warning. Counts and durations: prompt_eval_count, eval_count, total_duration,
    load_duration, prompt_eval_duration, eval_duration (nanoseconds).
OpenAI (`/v1/*`, SSE streaming ending with `data: [DONE]`):
    POST /v1/chat/completions   messages, max_tokens / max_completion_tokens, temperature (1.0),
         top_p, n (1..8), stop, seed, logprobs / top_logprobs (0..20), stream, stream_options.
         include_usage; extras top_k, ignore_eos, reasoning_effort ("none" = no thinking),
         chat_template_kwargs {thinking | enable_thinking}. Thinking goes to `reasoning_content`.
    POST /v1/completions        prompt (string, strings, token ids), max_tokens (16), echo, logprobs
    GET  /v1/models, /v1/models/{id}
Also GET / and HEAD / ("nanoseek is running"), GET /health.

Thinking: for models that can think (`</think>` in the vocabulary or template), output is split
into thinking and answer by an incremental parser that starts inside <think> when the prompt
opened it, buffers partial tags across chunks and drops the whitespace around the tags (the same
split as `chat.split_thinking` on the whole text). Stop strings apply to the whole output,
thinking included.

Errors: 400 (malformed JSON, wrong types, out-of-range values, prompt over the context limit),
401 (with --api-key, a missing or wrong `Authorization: Bearer KEY`, on every endpoint),
404 (unknown model or path), each in the API's own format (`{"error": "..."}` for Ollama,
`{"error": {"message", "type", "param", "code"}}` for OpenAI) and naming the field or model.
After a stream has started, an error is one more line/event carrying the same error object.
A fault inside the server is a 500 and its traceback is logged. A client that disconnects
cancels its requests; the engine frees their slots.
"""

from __future__ import annotations

import datetime as _dt
import hmac
import http.server
import ipaddress
import json
import logging
import math
import os
import queue
import re
import select
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field

log = logging.getLogger("nanoseek.server")

MAX_BODY = 4 << 20  # a request body larger than this is refused unread (413)
# Browser origins served without --allow-origin: pages on this machine and desktop-app webviews
# (the same defaults as Ollama's OLLAMA_ORIGINS). A page from anywhere else gets a 403, so a site
# that rebinds its DNS name to 127.0.0.1 cannot drive a loopback server from a browser.
DEFAULT_ORIGINS = tuple(f"{scheme}://{host}{port}" for scheme in ("http", "https")
                        for host in ("localhost", "127.0.0.1", "[::1]", "0.0.0.0") for port in ("", ":*")) + (
    "app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*")
MAX_N = 8
MAX_TOP_LOGPROBS = 20
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
OLLAMA_DEFAULTS = dict(temperature=0.8, top_p=0.9, top_k=40)
OLLAMA_KNOWN_IGNORED = {  # Ollama options accepted and ignored (no effect in nanoseek)
    "num_keep", "min_p", "typical_p", "repeat_last_n", "repeat_penalty", "presence_penalty",
    "frequency_penalty", "penalize_newline", "numa", "num_batch", "num_gpu", "main_gpu", "use_mmap",
    "num_thread", "low_vram", "f16_kv", "vocab_only", "use_mlock", "mirostat", "mirostat_tau",
    "mirostat_eta", "tfs_z", "draft_num_predict",
}


# ============================================================================ errors and validation
class APIError(Exception):
    """A client error (or a deliberate 5xx) with the field it concerns."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class ClientGone(Exception):
    pass


def bad(param: str, msg: str, code: str | None = None) -> APIError:
    return APIError(400, f"{param}: {msg}", param=param, code=code)


_MISSING = object()


def get_field(obj: dict, key: str, kind: str, default=None, *, name: str | None = None,
              lo=None, hi=None, lo_open=False):
    """obj[key] checked against `kind` (int, num, bool, str, list, dict); None or absent -> default.
    `lo`/`hi` bound numbers (`lo_open`: lo excluded). Errors name the field (`name` or key)."""
    v = obj.get(key, _MISSING)
    if v is _MISSING or v is None:
        return default
    name = name or key
    if kind == "int":
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad(name, f"expected an integer, got {json.dumps(v)[:40]}")
    elif kind == "num":
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise bad(name, f"expected a number, got {json.dumps(v)[:40]}")
    elif kind == "bool":
        if not isinstance(v, bool):
            raise bad(name, f"expected true or false, got {json.dumps(v)[:40]}")
    elif kind == "str":
        if not isinstance(v, str):
            raise bad(name, f"expected a string, got {json.dumps(v)[:40]}")
    elif kind == "list":
        if not isinstance(v, list):
            raise bad(name, f"expected an array, got {json.dumps(v)[:40]}")
    elif kind == "dict":
        if not isinstance(v, dict):
            raise bad(name, f"expected an object, got {json.dumps(v)[:40]}")
    if kind in ("int", "num"):
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise bad(name, f"must be {'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
                      + f", got {v}")
        if hi is not None and v > hi:
            raise bad(name, f"must be <= {hi}" + (f" and {'>' if lo_open else '>='} {lo}" if lo is not None else "")
                      + f", got {v}")
    return v


def get_stop(obj: dict, key: str = "stop", name: str | None = None) -> list[str]:
    v = obj.get(key)
    name = name or key
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v else []
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad(name, "expected a string or an array of strings")
    if len(v) > 16:
        raise bad(name, f"at most 16 stop strings, got {len(v)}")
    return [s for s in v if s]


def get_seed(obj: dict, key: str = "seed", name: str | None = None, random_value: int | None = None) -> int | None:
    s = get_field(obj, key, "int", name=name)
    if s is None or (random_value is not None and s == random_value):
        return None
    if not -(2 ** 63) <= s < 2 ** 64:
        raise bad(name or key, f"must fit in 64 bits, got {s}")
    return s % (2 ** 63)


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
    raise bad(name, f"expected a duration such as \"5m\" or a number of seconds, got {json.dumps(v)[:40]}")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat().replace("+00:00", "Z")


# ============================================================================ thinking split
def _partial_suffix(buf: str, tag: str) -> int:
    """Length of the longest suffix of buf that is a proper prefix of tag."""
    for k in range(min(len(tag) - 1, len(buf)), 0, -1):
        if buf.endswith(tag[:k]):
            return k
    return 0


class ThinkSplitter:
    """Incremental '<think>reasoning</think>answer' splitter. Starts inside the think block when the
    prompt opened it; otherwise a block only counts when the output starts with <think> (after
    whitespace). Holds back partial tags and whitespace next to the tags, so the concatenated
    deltas equal `chat.split_thinking(text, opened)`."""

    def __init__(self, opened: bool = False, enabled: bool = True):
        self.state = "thinking" if opened else ("detect" if enabled else "content")
        self.strip = opened
        self.seen = opened
        self.buf = ""

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        th, ct = [], []
        while True:
            if self.state == "detect":
                s = self.buf.lstrip()
                if s.startswith(THINK_OPEN):
                    self.buf, self.state, self.strip, self.seen = s[len(THINK_OPEN):], "thinking", True, True
                    continue
                if THINK_OPEN.startswith(s):  # undecided: empty, whitespace or a partial tag
                    break
                self.state = "content"
                continue
            if self.strip:
                self.buf = self.buf.lstrip()
                if not self.buf:
                    break
                self.strip = False
            if self.state == "thinking":
                k = self.buf.find(THINK_CLOSE)
                if k >= 0:
                    th.append(self.buf[:k].rstrip())
                    self.buf, self.state, self.strip = self.buf[k + len(THINK_CLOSE):], "content", True
                    continue
                hold = _partial_suffix(self.buf, THINK_CLOSE)
                emit = self.buf[:len(self.buf) - hold]
                kept = emit.rstrip()
                th.append(kept)
                self.buf = self.buf[len(kept):]
                break
            ct.append(self.buf)
            self.buf = ""
            break
        return "".join(th), "".join(ct)

    def flush(self) -> tuple[str, str]:
        buf, self.buf = self.buf, ""
        if self.state == "thinking":
            return buf.strip(), ""
        if self.state == "content" and self.strip:
            return "", buf.lstrip()
        return "", buf


# ============================================================================ models
@dataclass
class LoadedModel:
    name: str
    path: str
    manifest: dict
    model: object
    tokenizer: object
    engine: object
    context_length: int
    can_think: bool
    device: str
    size: int
    loaded_at: float
    load_s: float
    expires_at: float | None = None
    active: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelManager:
    """Loads store models on first use and keeps one Engine per model."""

    def __init__(self, store, context_length: int = 4096, max_batch: int = 16, device: str | None = None,
                 dtype=None):
        self.store = store
        self.context_length = int(context_length)
        self.max_batch = int(max_batch)
        self.device = device
        self.dtype = dtype
        self._loaded: dict[str, LoadedModel] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def resolve(self, name, param: str = "model") -> str:
        from .store import InvalidName, canonical_name
        if name is None or name == "":
            raise bad(param, "is required (a model name from the store, e.g. the NAME column of `nanoseek list`)")
        if not isinstance(name, str):
            raise bad(param, f"expected a string, got {json.dumps(name)[:40]}")
        try:
            cname = canonical_name(name)
        except InvalidName as e:
            raise APIError(400, str(e), param=param) from None
        if not self.store.exists(cname):
            raise APIError(404, f"model '{name}' not found", param=param, code="model_not_found")
        return cname

    def acquire(self, name: str) -> tuple[LoadedModel, float]:
        """The loaded model (loading it if needed) with its active count raised; (model, load seconds)."""
        with self._lock:
            lm = self._loaded.get(name)
            if lm is not None:
                lm.active += 1
                return lm, 0.0
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            with self._lock:
                lm = self._loaded.get(name)
                if lm is not None:
                    lm.active += 1
                    return lm, 0.0
            t0 = time.perf_counter()
            lm = self._load(name)
            with self._lock:
                self._loaded[name] = lm
                lm.active += 1
            return lm, time.perf_counter() - t0

    def release(self, lm: LoadedModel, keep_alive: float | None | object = _MISSING) -> None:
        with self._lock:
            lm.active -= 1
            if keep_alive is not _MISSING:
                lm.expires_at = None if keep_alive is None else time.time() + keep_alive
        if keep_alive == 0:
            self.reap()

    def _load(self, name: str) -> LoadedModel:
        import torch

        from .chat import THINK_CLOSE as CLOSE
        from .engine import Engine
        from .model import DeepSeekV3
        from .tokenizer import Tokenizer
        path = self.store.path_of(name)
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        t0 = time.perf_counter()
        model = DeepSeekV3.from_pretrained(path, dtype=self.dtype, device=device).eval()
        tok = Tokenizer.from_dir(path)
        ctx = min(self.context_length, model.config.max_position_embeddings)
        engine = Engine(model, tok, max_context=ctx, max_batch=self.max_batch)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        can_think = tok.token_to_id(CLOSE) is not None or CLOSE in (tok.chat_template or "")
        lm = LoadedModel(name, path, self.store.manifest(name), model, tok, engine, ctx, can_think, str(device),
                         size, time.time(), time.perf_counter() - t0)
        log.info("loaded %s from %s in %.2f s (%s, context %d)", name, path, lm.load_s, device, ctx)
        return lm

    def loaded(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._loaded.values())

    def unload(self, name: str) -> bool:
        with self._lock:
            lm = self._loaded.pop(name, None)
        if lm is None:
            return False
        lm.engine.close()
        log.info("unloaded %s", name)
        return True

    def reap(self) -> None:
        now = time.time()
        with self._lock:
            expired = [n for n, lm in self._loaded.items()
                       if lm.active == 0 and lm.expires_at is not None and lm.expires_at <= now]
        for n in expired:
            self.unload(n)

    def close(self) -> None:
        for n in list(self._loaded):
            self.unload(n)


# ============================================================================ running requests
class _Pump:
    """Iterates each engine handle in its own thread and yields (choice index, event) as they come;
    checks for a vanished client while waiting."""

    _END = object()

    def __init__(self, handles: list, gone, linger=lambda: 0.0):
        self.handles, self.gone, self.linger = handles, gone, linger
        self.finished = [False] * len(handles)
        self.q = queue.Queue()
        for i, h in enumerate(handles):
            threading.Thread(target=self._run, args=(i, h), daemon=True, name=f"nanoseek-pump-{i}").start()

    def _run(self, i, h):
        try:
            for ev in h.events():
                self.q.put((i, ev, None))
        except BaseException as e:  # noqa: BLE001 - handed to the request thread
            self.q.put((i, None, e))
        self.q.put((i, None, self._END))

    def __iter__(self):
        """Yields (choice index, [events]): events that queued up while the previous write was in
        flight are handed over together, so a busy server sends fewer, larger chunks."""
        live, last_check = len(self.handles), time.monotonic()
        while live:
            try:
                items = [self.q.get(timeout=0.2)]
            except queue.Empty:
                if self.gone():
                    raise ClientGone() from None
                last_check = time.monotonic()
                continue
            wait = self.linger()
            if wait and items[0] is not None:
                time.sleep(wait)  # busy server: gather a few tokens per write instead of one
            while len(items) < 256:
                try:
                    items.append(self.q.get_nowait())
                except queue.Empty:
                    break
            if time.monotonic() - last_check > 0.25:
                if self.gone():
                    raise ClientGone()
                last_check = time.monotonic()
            groups: dict[int, list] = {}
            for i, ev, err in items:
                if err is self._END:
                    live -= 1
                    continue
                if err is not None:
                    raise err
                if ev.finish_reason is not None:
                    self.finished[i] = True
                groups.setdefault(i, []).append(ev)
            yield from groups.items()

    def cancel(self):
        """Cancel the unfinished handles; their event streams end at once (the pump threads exit)."""
        for i, h in enumerate(self.handles):
            if not self.finished[i]:
                h.cancel()


@dataclass
class Job:
    """One generation request after validation: prompts (one per choice) and their parameters."""
    lm: LoadedModel
    prompts: list[list[int]]
    params: list
    opened: bool = False  # the prompt opened a <think> block
    split: bool = False  # split thinking from the answer
    load_s: float = 0.0
    t0: float = field(default_factory=time.perf_counter)
    states: list = field(default_factory=list)


@dataclass
class ChoiceState:
    splitter: ThinkSplitter
    text: list = field(default_factory=list)
    thinking: list = field(default_factory=list)
    raw_text: list = field(default_factory=list)
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # (token_id, logprob, top list)
    pending_lp: list = field(default_factory=list)
    n_chars: int = 0
    last: object = None

    def add(self, ev) -> tuple[str, str]:
        """Feed an event; returns (thinking delta, content delta)."""
        self.raw_text.append(ev.text)
        if ev.token_id is not None:
            self.token_ids.append(ev.token_id)
            if ev.logprob is not None:
                entry = (ev.token_id, ev.logprob, ev.top_logprobs, self.n_chars)
                self.logprobs.append(entry)
                self.pending_lp.append(entry)
        self.n_chars += len(ev.text)
        th, ct = self.splitter.feed(ev.text)
        if ev.finish_reason is not None:
            self.last = ev
            fth, fct = self.splitter.flush()
            th, ct = th + fth, ct + fct
        self.thinking.append(th)
        self.text.append(ct)
        return th, ct

    def take_logprobs(self) -> list:
        out, self.pending_lp = self.pending_lp, []
        return out


# ============================================================================ HTTP
def host_allowed(host_header: str | None, bind_host: str) -> bool:
    """A loopback server answers only requests addressed to a loopback name (localhost, *.localhost,
    127.x, ::1) or to its bind address: the DNS-rebinding defence. Other binds answer any Host."""
    if not host_header or not _is_loopback(bind_host):
        return True
    name = host_header.strip().lower()
    name = name[1:name.index("]")] if name.startswith("[") and "]" in name else name.rsplit(":", 1)[0]
    return name in ("localhost", bind_host.lower()) or name.endswith(".localhost") or _is_loopback(name)


def origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    """No Origin header (curl, SDKs, servers) is always fine; a browser's Origin must match one of
    `allowed` (fnmatch patterns: `*` for any, `http://localhost:*`, `https://app.example.com`)."""
    import fnmatch
    return origin is None or any(fnmatch.fnmatchcase(origin.lower(), a.lower()) for a in allowed)


class App:
    def __init__(self, store=None, api_key: str | None = None, context_length: int = 4096, max_batch: int = 16,
                 device: str | None = None, dtype=None, bind_host: str = "127.0.0.1",
                 allow_origins: tuple[str, ...] = ()):
        from .store import Store
        self.store = store or Store()
        self.api_key = api_key or None
        self.bind_host = bind_host
        self.origins = DEFAULT_ORIGINS + tuple(allow_origins)
        self.models = ModelManager(self.store, context_length, max_batch, device, dtype)
        self.active_requests = 0
        self.cancelled_requests = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, daemon=True, name="nanoseek-reaper")
        self._reaper.start()

    def _reap_loop(self):
        while not self._stop.wait(1.0):
            try:
                self.models.reap()
            except Exception:  # noqa: BLE001
                log.exception("unloading expired models failed")

    def close(self):
        self._stop.set()
        self.models.close()


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, addr, app: App):
        host = addr[0]
        try:
            if ipaddress.ip_address(host).version == 6:
                self.address_family = socket.AF_INET6
        except ValueError:
            pass
        super().__init__(addr, Handler)
        self.app = app

    def shutdown_all(self):
        self.shutdown()
        self.server_close()
        self.app.close()


def make_server(host: str = "127.0.0.1", port: int = 11434, api_key: str | None = None, store=None,
                context_length: int = 4096, max_batch: int = 16, device: str | None = None, dtype=None,
                allow_origins: tuple[str, ...] = ()) -> Server:
    """A ready server (call serve_forever(); port 0 picks a free port: server.server_address[1]).
    `allow_origins`: browser origins allowed beyond DEFAULT_ORIGINS (fnmatch patterns, `*` for any)."""
    return Server((host, port), App(store, api_key, context_length, max_batch, device, dtype, host,
                                    tuple(allow_origins)))


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nanoseek"

    # ------------------------------------------------------------------ plumbing
    def log_message(self, fmt, *args):  # access log through logging
        log.info("%s %s", self.address_string(), fmt % args)

    @property
    def app(self) -> App:
        return self.server.app

    def _openai(self) -> bool:
        return self.path.startswith("/v1")

    def _error_body(self, err: APIError) -> dict:
        if self._openai():
            kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "invalid_request_error"}.get(err.status, "api_error" if err.status < 500 else "server_error")
            return {"error": {"message": err.message, "type": kind, "param": err.param,
                              "code": err.code or err.status}}
        return {"error": err.message}

    def _send_json(self, status: int, obj, extra_headers: dict | None = None):
        data = (json.dumps(obj, ensure_ascii=False) + ("\n" if not self._openai() else "")).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra_headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self._sent = True
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_text(self, status: int, text: str):
        data = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self._sent = True
        if self.command != "HEAD":
            self.wfile.write(data)

    def _start_stream(self, content_type: str):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        self.close_connection = True
        self._sent = True
        self._streaming = True

    def _write(self, data: bytes):
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, OSError) as e:
            raise ClientGone() from e

    def _ndjson(self, obj):
        self._write((json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"))

    def _end_sse(self, usage_chunk) -> None:
        """Close an OpenAI stream: the optional usage chunk, then [DONE]."""
        if usage_chunk is not None:
            self._sse(usage_chunk)
        self._write(b"data: [DONE]\n\n")

    def _sse(self, obj):
        self._write(b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n")

    def _client_gone(self) -> bool:
        try:
            r, _, _ = select.select([self.connection], [], [], 0)
            if r:
                return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True
        return False

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            raise APIError(400, "chunked request bodies are not supported; send Content-Length")
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise APIError(400, "invalid Content-Length header") from None
        if n < 0:
            self.close_connection = True
            raise APIError(400, "invalid Content-Length header")
        if n > MAX_BODY:
            self.close_connection = True
            raise APIError(413, f"request body of {n} bytes is larger than the limit of {MAX_BODY} bytes")
        return self.rfile.read(n) if n else b""

    def _json_body(self, raw: bytes) -> dict:
        if not raw.strip():
            raise APIError(400, "request body is empty; expected a JSON object")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"malformed JSON in the request body: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}")
        return body

    def _authorized(self) -> bool:
        key = self.app.api_key
        if not key:
            return True
        got = self.headers.get("Authorization") or ""
        scheme, _, token = got.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())

    # ------------------------------------------------------------------ dispatch
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_OPTIONS(self):  # a CORS preflight, or a plain OPTIONS
        self._sent = self._streaming = False
        try:
            self._check_caller()
        except APIError as e:
            self.close_connection = True
            return self._fail(e)
        self.send_response(204)
        self.send_header("Allow", "GET, HEAD, POST, DELETE, OPTIONS")
        if self.headers.get("Origin"):
            self.send_header("Access-Control-Allow-Methods", "GET, HEAD, POST, DELETE, OPTIONS")
            self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
            self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def end_headers(self):
        origin = self.headers.get("Origin") if getattr(self, "headers", None) else None
        if origin and origin_allowed(origin, self.app.origins):  # CORS: the browser may read the reply
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        super().end_headers()

    def _check_caller(self):
        """Before anything is read: the Host (DNS rebinding) and a browser's Origin."""
        host = self.headers.get("Host")
        if not host_allowed(host, self.app.bind_host):
            raise APIError(403, f"Host {host!r} is not this server's: a loopback server answers only requests for "
                                f"localhost, 127.0.0.1 or [::1]")
        origin = self.headers.get("Origin")
        if not origin_allowed(origin, self.app.origins):
            raise APIError(403, f"origin {origin!r} is not allowed; start the server with --allow-origin "
                                f"'{origin}' (or set NANOSEEK_ORIGINS) to let pages from it call this server")

    ROUTES = {
        ("GET", "/"): "root", ("HEAD", "/"): "root", ("GET", "/health"): "health",
        ("GET", "/api/version"): "version", ("GET", "/api/tags"): "tags", ("GET", "/api/ps"): "ps",
        ("POST", "/api/show"): "show", ("POST", "/api/generate"): "generate", ("POST", "/api/chat"): "chat",
        ("DELETE", "/api/delete"): "delete", ("POST", "/api/pull"): "pull",
        ("GET", "/v1/models"): "v1_models", ("POST", "/v1/chat/completions"): "v1_chat",
        ("POST", "/v1/completions"): "v1_completions",
    }

    def _dispatch(self, method: str):
        self._sent = False
        self._streaming = False
        path = self.path.split("?", 1)[0]
        if len(path) > 1:
            path = path.rstrip("/")
        try:
            self._check_caller()
            if not self._authorized():  # before the body is read: a stranger's upload is never taken in
                self.close_connection = True
                raise APIError(401, "unauthorized: send the header 'Authorization: Bearer <api key>'")
            raw = self._read_body() if method in ("POST", "DELETE") else b""
            route = self.ROUTES.get((method, path))
            arg = None
            if route is None and method == "GET" and path.startswith("/v1/models/"):
                route, arg = "v1_model", path[len("/v1/models/"):]
            if route is None:
                known = {p for (_, p) in self.ROUTES}
                if path in known:
                    raise APIError(405, f"method {method} not allowed on {path}")
                raise APIError(404, f"no such endpoint: {method} {path}")
            handler = getattr(self, "h_" + route)
            if method in ("POST", "DELETE"):
                handler(self._json_body(raw))
            elif arg is not None:
                handler(arg)
            else:
                handler()
        except APIError as e:
            if e.status >= 500:
                log.error("%s %s: %s", method, path, e.message)
            self._fail(e)
        except ClientGone:
            log.info("%s %s: client disconnected", method, path)
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a fault in here: 500 with the traceback in the log
            log.error("%s %s: internal error\n%s", method, path, traceback.format_exc())
            self._fail(APIError(500, f"internal server error: {type(e).__name__}: {e}"))

    def _fail(self, err: APIError):
        try:
            if not self._sent:
                headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
                self._send_json(err.status, self._error_body(err), headers)
            elif self._streaming:
                body = self._error_body(err)
                if self._openai():
                    self._sse(body)
                else:
                    self._ndjson(body)
            self.close_connection = self.close_connection or self._streaming
        except (ClientGone, OSError):
            self.close_connection = True

    # ------------------------------------------------------------------ small endpoints
    def h_root(self):
        self._send_text(200, "nanoseek is running")

    def h_health(self):
        self._send_json(200, {"status": "ok"})

    def h_version(self):
        from . import __version__
        self._send_json(200, {"version": __version__})

    def _details(self, m: dict) -> dict:
        from .store import human_count
        family = "deepseek2" if m.get("architecture") in ("deepseek_v2", "deepseek_v3") else m.get("architecture")
        return {"parent_model": "", "format": "safetensors", "family": family, "families": [family],
                "parameter_size": human_count(m.get("parameters") or 0),
                "quantization_level": m.get("quantization") or ""}

    def h_tags(self):
        from .store import iso_time
        out = []
        for m in self.app.store.list():
            out.append({"name": m["name"], "model": m["name"], "modified_at": iso_time(m["modified"]),
                        "size": m["size"], "digest": m["digest"], "details": self._details(m)})
        self._send_json(200, {"models": out})

    def h_ps(self):
        out = []
        for lm in self.app.models.loaded():
            item = {"name": lm.name, "model": lm.name, "size": lm.size, "digest": lm.manifest.get("digest", ""),
                    "details": self._details(lm.manifest),
                    "size_vram": lm.size if lm.device.startswith("cuda") else 0,
                    "context_length": lm.context_length}
            if lm.expires_at is not None:
                item["expires_at"] = _dt.datetime.fromtimestamp(lm.expires_at, _dt.timezone.utc).isoformat()
            out.append(item)
        self._send_json(200, {"models": out})

    def h_show(self, body):
        name = self.app.models.resolve(body.get("model", body.get("name")))
        get_field(body, "verbose", "bool")
        s = self.app.store.show(name)
        m = self.app.store.manifest(name)
        arch = "deepseek2"
        info = {
            "general.architecture": arch, "general.parameter_count": s["parameters"],
            "general.basename": name.split(":")[0],
            f"{arch}.context_length": s["context_length"], f"{arch}.embedding_length": s["embedding_length"],
            f"{arch}.block_count": s["layers"], f"{arch}.attention.head_count": s["attention_heads"],
            f"{arch}.attention.kv_lora_rank": s["kv_lora_rank"],
            f"{arch}.rope.dimension_count": s["qk_rope_head_dim"],
            f"{arch}.expert_count": s["experts"], f"{arch}.expert_used_count": s["experts_used"],
            f"{arch}.expert_shared_count": s["shared_experts"], f"{arch}.nextn_predict_layers": s["mtp_depth"],
            f"{arch}.vocab_size": s["vocab_size"],
            "nanoseek.architecture": s["architecture"], "nanoseek.active_parameter_count": s["active_parameters"],
        }
        caps = ["completion"] + (["thinking"] if s["thinking"] else [])
        params = f"stop {json.dumps(s['eos_token'])}" if s.get("eos_token") else ""
        from .store import iso_time
        self._send_json(200, {
            "license": "", "modelfile": f"# Modelfile generated by nanoseek\nFROM {s['path']}\n",
            "parameters": params, "template": s["template"], "system": "",
            "details": self._details(m), "model_info": info, "capabilities": caps,
            "modified_at": iso_time(m.get("created") or time.time()),
        })

    def h_delete(self, body):
        name = self.app.models.resolve(body.get("model", body.get("name")))
        self.app.models.unload(name)
        self.app.store.rm(name)
        self._send_json(200, {})

    def h_pull(self, body):
        name = self.app.models.resolve(body.get("model", body.get("name")))
        del name
        if get_field(body, "stream", "bool", True):
            self._start_stream("application/x-ndjson")
            self._ndjson({"status": "success"})
        else:
            self._send_json(200, {"status": "success"})

    def h_v1_models(self):
        data = [{"id": m["name"], "object": "model", "created": int(m["modified"]), "owned_by": "nanoseek"}
                for m in self.app.store.list()]
        self._send_json(200, {"object": "list", "data": data})

    def h_v1_model(self, model_id):
        from urllib.parse import unquote
        name = self.app.models.resolve(unquote(model_id))
        m = self.app.store.manifest(name)
        self._send_json(200, {"id": name, "object": "model", "created": int(m.get("created") or 0),
                              "owned_by": "nanoseek"})

    # ------------------------------------------------------------------ shared generation helpers
    def _check_unsupported(self, body: dict, fields: dict):
        """fields: name -> allowed 'empty' check. A non-empty value of an unsupported feature is a 400."""
        for key, what in fields.items():
            v = body.get(key)
            if v in (None, "", [], {}, False, 0) or (key == "response_format" and isinstance(v, dict)
                                                      and v.get("type") in (None, "text")):
                continue
            raise bad(key, f"{what} is not supported by nanoseek")

    def _params(self, lm: LoadedModel, prompt_len: int, max_tokens: int | None, ctx: int, **kw):
        from .engine import SamplingParams
        if prompt_len >= ctx:
            raise APIError(400, f"prompt of {prompt_len} tokens exceeds the context limit of {ctx} tokens",
                           param="messages" if self._openai() else "prompt", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = ctx - prompt_len
        else:
            max_tokens = min(max_tokens, ctx - prompt_len)
        try:
            return SamplingParams(max_tokens=max_tokens, **kw).validate()
        except ValueError as e:
            field_name = str(e).split(":", 1)[0]
            raise APIError(400, str(e), param=field_name) from None

    def _submit(self, job: Job) -> list:
        handles = []
        try:
            for p, sp in zip(job.prompts, job.params):
                try:
                    handles.append(job.lm.engine.submit(p, sp))
                except ValueError as e:  # the engine's own checks (context limit, empty prompt)
                    if "context" in str(e) or "prompt" in str(e):
                        raise APIError(400, str(e), param="prompt", code="context_length_exceeded") from None
                    raise
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        return handles

    def _run(self, job: Job, on_event) -> list[ChoiceState]:
        """Submit, then call on_event(choice, event, thinking delta, content delta) for each event.
        Returns the ChoiceStates (also in job.states while running). Cancels everything when the
        client goes away or anything fails."""
        job.states = [ChoiceState(ThinkSplitter(job.opened, job.split)) for _ in job.prompts]
        handles = self._submit(job)
        pump = _Pump(handles, self._client_gone, self._linger)
        with self.app._lock:
            self.app.active_requests += 1
        try:
            for i, events in pump:
                ths, cts = [], []
                for ev in events:
                    if ev.finish_reason == "cancelled":
                        continue
                    th, ct = job.states[i].add(ev)
                    ths.append(th)
                    cts.append(ct)
                if ths:
                    on_event(i, ev, "".join(ths), "".join(cts))
        except ClientGone:
            with self.app._lock:
                self.app.cancelled_requests += 1
            raise
        finally:
            pump.cancel()
            with self.app._lock:
                self.app.active_requests -= 1
        return job.states

    def _linger(self) -> float:
        """Under load (many concurrent requests) each stream waits a few ms to send several tokens
        in one chunk: fewer thread wake-ups and writes, so the engine keeps the CPU."""
        return 0.004 if self.app.active_requests >= 8 else 0.0

    def _token_str(self, lm: LoadedModel, tid: int) -> str:
        return lm.tokenizer.decode([tid])

    def _lp_entry(self, lm, tid, lp, top, n_top, with_bytes=True):
        s = self._token_str(lm, tid)
        e = {"token": s, "logprob": lp}
        if with_bytes:
            e["bytes"] = list(s.encode("utf-8"))
        if n_top:
            tops = []
            for t, l in (top or [])[:n_top]:
                ts = self._token_str(lm, t)
                d = {"token": ts, "logprob": l}
                if with_bytes:
                    d["bytes"] = list(ts.encode("utf-8"))
                tops.append(d)
            e["top_logprobs"] = tops
        return e

    # ------------------------------------------------------------------ Ollama generate / chat
    def _ollama_options(self, body: dict, lm: LoadedModel) -> tuple[dict, int | None, int]:
        opts = get_field(body, "options", "dict", {}) or {}
        known = {"temperature", "top_p", "top_k", "seed", "num_predict", "stop", "num_ctx"}
        for k in opts:
            if k not in known:
                if k in OLLAMA_KNOWN_IGNORED:
                    log.warning("option %s=%r is ignored by nanoseek", k, opts[k])
                else:
                    log.warning("invalid option provided: %s", k)
        temperature = get_field(opts, "temperature", "num", OLLAMA_DEFAULTS["temperature"],
                                name="options.temperature", lo=0)
        top_p = get_field(opts, "top_p", "num", OLLAMA_DEFAULTS["top_p"], name="options.top_p", lo=0, hi=1,
                          lo_open=True)
        top_k = get_field(opts, "top_k", "int", OLLAMA_DEFAULTS["top_k"], name="options.top_k", lo=0)
        seed = get_seed(opts, "seed", "options.seed", random_value=-1)
        num_predict = get_field(opts, "num_predict", "int", -1, name="options.num_predict")
        if num_predict != -1 and num_predict < 1:
            raise bad("options.num_predict", f"must be -1 (until the context ends) or >= 1, got {num_predict}")
        stop = get_stop(opts, "stop", "options.stop")
        num_ctx = get_field(opts, "num_ctx", "int", None, name="options.num_ctx", lo=1)
        ctx = lm.context_length if num_ctx is None else min(num_ctx, lm.context_length)
        kw = dict(temperature=float(temperature), top_p=float(top_p), top_k=top_k, seed=seed, stop=stop)
        return kw, (None if num_predict == -1 else num_predict), ctx

    def _ollama_logprobs(self, body: dict) -> tuple[bool, int]:
        want = get_field(body, "logprobs", "bool", False)
        top = get_field(body, "top_logprobs", "int", 0, lo=0, hi=MAX_TOP_LOGPROBS)
        if top and not want:
            raise bad("top_logprobs", "needs logprobs: true")
        return want, top

    def _ollama_think(self, body: dict, lm: LoadedModel, name: str):
        think = body.get("think")
        if think is None:
            return None
        if isinstance(think, str):
            if think not in ("low", "medium", "high", "max"):
                raise bad("think", f"expected true, false or one of low, medium, high, max; got {think!r}")
            think = True
        elif not isinstance(think, bool):
            raise bad("think", f"expected true, false or a level, got {json.dumps(think)[:40]}")
        if think and not lm.can_think:
            raise APIError(400, f"\"{name}\" does not support thinking", param="think")
        return think

    def _ollama_load_only(self, body, name, lm, load_s, t0, keep):
        reason = "unload" if keep == 0 else "load"
        return {"model": name, "created_at": now_iso(), "done": True, "done_reason": reason,
                "total_duration": int((time.perf_counter() - t0) * 1e9), "load_duration": int(load_s * 1e9)}

    def _ollama_common(self, body: dict):
        name_in = body.get("model")
        name = self.app.models.resolve(name_in)
        stream = get_field(body, "stream", "bool", True)
        keep = body.get("keep_alive")
        keep = _MISSING if keep is None else parse_duration(keep)
        return name_in, name, stream, keep

    def h_generate(self, body):
        self._ollama_request(body, chat=False)

    def h_chat(self, body):
        self._ollama_request(body, chat=True)

    def _ollama_request(self, body: dict, chat: bool):
        from .chat import render_chat
        t0 = time.perf_counter()
        name_in, name, stream, keep = self._ollama_common(body)
        # type checks that need no model
        if chat:
            messages = get_field(body, "messages", "list", [])
            self._check_unsupported(body, {"tools": "tool calling", "format": "structured output (format)"})
            msgs = self._ollama_messages(messages)
        else:
            prompt = get_field(body, "prompt", "str", "")
            system = get_field(body, "system", "str", "")
            raw = get_field(body, "raw", "bool", False)
            context = get_field(body, "context", "list", None)
            if context is not None and not all(isinstance(t, int) and not isinstance(t, bool) for t in context):
                raise bad("context", "expected an array of token ids")
            self._check_unsupported(body, {"suffix": "suffix (fill-in-the-middle)", "images": "images",
                                           "template": "a per-request template",
                                           "format": "structured output (format)"})
        want_lp, top_lp = self._ollama_logprobs(body)
        lm, load_s = self.app.models.acquire(name)
        try:
            kw, max_tokens, ctx = self._ollama_options(body, lm)
            think = self._ollama_think(body, lm, name_in)
            tok = lm.tokenizer
            if (chat and not msgs) or (not chat and not prompt and not context):
                out = self._ollama_load_only(body, name_in, lm, load_s, t0, keep)
                if chat:
                    out["message"] = {"role": "assistant", "content": ""}
                else:
                    out["response"] = ""
                self._send_json(200, out)
                return
            if chat:
                text = self._render(render_chat, tok, msgs, think)
                opened = text.rstrip().endswith(THINK_OPEN)
                ids = tok.encode(text)
            elif raw:
                opened = False
                ids = list(context or []) + tok.encode(prompt)
            else:
                msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
                text = self._render(render_chat, tok, msgs, think)
                opened = text.rstrip().endswith(THINK_OPEN)
                ids = list(context or []) + tok.encode(text)
            bad_ids = [t for t in ids if not 0 <= t < lm.model.config.vocab_size]
            if bad_ids:
                raise bad("context", f"token id {bad_ids[0]} is outside the vocabulary")
            split = lm.can_think and think is not False and not (not chat and raw)
            sp = self._params(lm, len(ids), max_tokens, ctx, logprobs=top_lp if top_lp else (1 if want_lp else 0), **kw)
            job = Job(lm, [ids], [sp], opened=opened and split, split=split, load_s=load_s, t0=t0)
            self._ollama_run(job, name_in, chat, stream, want_lp, top_lp, raw=(not chat and raw), prompt_ids=ids)
        finally:
            self.app.models.release(lm, keep)

    def _render(self, render_chat, tok, msgs, think):
        try:
            return render_chat(tok, msgs, add_generation_prompt=True, think=think)
        except ValueError as e:  # the template (or message checks) rejected the conversation
            raise bad("messages", str(e)) from None

    def _ollama_messages(self, messages: list) -> list[dict]:
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise bad(f"messages[{i}]", "expected an object with 'role' and 'content'")
            role = m.get("role")
            if role not in ("system", "user", "assistant", "tool"):
                raise bad(f"messages[{i}].role", f"expected system, user, assistant or tool; got {json.dumps(role)[:40]}")
            content = m.get("content", "")
            if content is None:
                content = ""
            if not isinstance(content, str):
                raise bad(f"messages[{i}].content", f"expected a string, got {json.dumps(content)[:40]}")
            if m.get("images"):
                raise bad(f"messages[{i}].images", "images are not supported by nanoseek")
            if m.get("tool_calls"):
                raise bad(f"messages[{i}].tool_calls", "tool calling is not supported by nanoseek")
            th = m.get("thinking")
            if th is not None and not isinstance(th, str):
                raise bad(f"messages[{i}].thinking", "expected a string")
            out.append({"role": role, "content": content})  # earlier turns' thinking is dropped
        return out

    def _ollama_run(self, job: Job, name: str, chat: bool, stream: bool, want_lp: bool, top_lp: int,
                    raw: bool, prompt_ids: list[int]):
        lm = job.lm

        def line(th: str, ct: str) -> dict:
            d = {"model": name, "created_at": now_iso()}
            if chat:
                msg = {"role": "assistant", "content": ct}
                if th:
                    msg["thinking"] = th
                d["message"] = msg
            else:
                d["response"] = ct
                if th:
                    d["thinking"] = th
            d["done"] = False
            return d

        if stream:
            self._start_stream("application/x-ndjson")

        def on_event(i, ev, th, ct):
            if not stream:
                return
            lps = job.states[i].take_logprobs() if want_lp else []
            if ev.finish_reason is None and (th or ct or lps):
                d = line(th, ct)
                if lps:
                    d["logprobs"] = [self._lp_entry(lm, t, lp, top, top_lp, True) for t, lp, top, _ in lps]
                self._ndjson(d)
            elif ev.finish_reason is not None and (th or ct):
                self._ndjson(line(th, ct))

        states = self._run(job, on_event)
        st = states[0]
        last = st.last
        final = {"model": name, "created_at": now_iso()}
        if chat:
            msg = {"role": "assistant", "content": "" if stream else "".join(st.text)}
            if not stream and job.split and st.splitter.seen:
                msg["thinking"] = "".join(st.thinking)
            final["message"] = msg
        else:
            final["response"] = "" if stream else "".join(st.text)
            if not stream and job.split and st.splitter.seen:
                final["thinking"] = "".join(st.thinking)
        final["done"] = True
        final["done_reason"] = last.finish_reason
        if not chat and not raw:
            final["context"] = prompt_ids + st.token_ids
        total = time.perf_counter() - job.t0
        final.update({"total_duration": int(total * 1e9), "load_duration": int(job.load_s * 1e9),
                      "prompt_eval_count": last.prompt_tokens, "prompt_eval_duration": int(last.prefill_s * 1e9),
                      "eval_count": last.completion_tokens, "eval_duration": int(last.decode_s * 1e9)})
        if want_lp:
            lps = st.take_logprobs() if stream else st.logprobs
            if lps or not stream:
                final["logprobs"] = [self._lp_entry(lm, t, lp, top, top_lp, True) for t, lp, top, _ in lps]
        if stream:
            self._ndjson(final)
        else:
            self._send_json(200, final)

    # ------------------------------------------------------------------ OpenAI
    def _openai_sampling(self, body: dict, default_max: int | None):
        temperature = get_field(body, "temperature", "num", 1.0, lo=0)
        top_p = get_field(body, "top_p", "num", 1.0, lo=0, hi=1, lo_open=True)
        top_k = get_field(body, "top_k", "int", 0, lo=-1)
        n = get_field(body, "n", "int", 1, lo=1, hi=MAX_N)
        seed = get_seed(body, "seed")
        stop = get_stop(body)
        ignore_eos = get_field(body, "ignore_eos", "bool", False)
        max_tokens = get_field(body, "max_completion_tokens", "int", None, lo=1)
        if max_tokens is None:
            max_tokens = get_field(body, "max_tokens", "int", default_max, lo=1)
        else:
            get_field(body, "max_tokens", "int", None, lo=1)
        for k in ("presence_penalty", "frequency_penalty"):
            v = get_field(body, k, "num", 0.0, lo=-2, hi=2)
            if v:
                raise bad(k, "is not supported by nanoseek (send 0 or leave it out)")
        best_of = get_field(body, "best_of", "int", None, lo=1)
        if best_of is not None and best_of != n:
            raise bad("best_of", "is not supported by nanoseek (leave it out, or set it equal to n)")
        self._check_unsupported(body, {"logit_bias": "logit_bias", "tools": "tool calling",
                                       "functions": "function calling",
                                       "response_format": "structured output (response_format)"})
        so = get_field(body, "stream_options", "dict", {}) or {}
        include_usage = get_field(so, "include_usage", "bool", False, name="stream_options.include_usage")
        kw = dict(temperature=float(temperature), top_p=float(top_p), top_k=max(0, top_k), stop=stop,
                  ignore_eos=ignore_eos)
        return kw, n, seed, max_tokens, include_usage

    def _openai_messages(self, messages) -> list[dict]:
        if messages is None:
            raise bad("messages", "is required")
        if not isinstance(messages, list):
            raise bad("messages", f"expected an array, got {json.dumps(messages)[:40]}")
        if not messages:
            raise bad("messages", "must contain at least one message")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise bad(f"messages[{i}]", "expected an object with 'role' and 'content'")
            role = m.get("role")
            if role == "developer":
                role = "system"
            if role not in ("system", "user", "assistant", "tool"):
                raise bad(f"messages[{i}].role", "expected system, developer, user, assistant or tool; got "
                          f"{json.dumps(role)[:40]}")
            content = m.get("content")
            if content is None:
                content = ""
            if isinstance(content, list):
                parts = []
                for j, p in enumerate(content):
                    if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                        raise bad(f"messages[{i}].content[{j}]", "only text parts ({\"type\": \"text\", \"text\": ...}) "
                                  "are supported")
                    parts.append(p["text"])
                content = "".join(parts)
            if not isinstance(content, str):
                raise bad(f"messages[{i}].content", f"expected a string or an array of text parts, got "
                          f"{json.dumps(content)[:40]}")
            if m.get("tool_calls"):
                raise bad(f"messages[{i}].tool_calls", "tool calling is not supported by nanoseek")
            out.append({"role": role, "content": content})  # reasoning_content of earlier turns is dropped
        return out

    def _openai_think(self, body: dict, lm: LoadedModel, name: str):
        think = None
        effort = get_field(body, "reasoning_effort", "str", None)
        if effort is not None:
            if effort not in ("none", "minimal", "low", "medium", "high", "xhigh", "max"):
                raise bad("reasoning_effort", f"expected none, low, medium or high; got {effort!r}")
            think = effort != "none"
        ctk = get_field(body, "chat_template_kwargs", "dict", {}) or {}
        for k in ("thinking", "enable_thinking"):
            v = get_field(ctk, k, "bool", None, name=f"chat_template_kwargs.{k}")
            if v is not None:
                think = v
        th = body.get("thinking")
        if th is not None:  # DeepSeek API: {"type": "enabled" | "disabled"}
            if not isinstance(th, dict) or th.get("type") not in ("enabled", "disabled"):
                raise bad("thinking", "expected {\"type\": \"enabled\"} or {\"type\": \"disabled\"}")
            think = th["type"] == "enabled"
        if think and not lm.can_think:
            raise bad("reasoning_effort" if effort else "thinking", f"model '{name}' does not support thinking")
        return think

    def _openai_job(self, lm, prompts, kw, n, seed, max_tokens, n_logprobs, load_s, t0, opened=False, split=False):
        ctx = lm.context_length
        all_prompts, params = [], []
        for ids in prompts:
            for j in range(n):
                all_prompts.append(ids)
                params.append(self._params(lm, len(ids), max_tokens, ctx, logprobs=n_logprobs,
                                           seed=None if seed is None else (seed + j) % (2 ** 63), **kw))
        return Job(lm, all_prompts, params, opened=opened, split=split, load_s=load_s, t0=t0)

    def _usage(self, job: Job, n_per_prompt: int) -> dict:
        prompt = sum(len(p) for p in job.prompts[::n_per_prompt])
        completion = sum(st.last.completion_tokens for st in job.states if st.last is not None)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": 0}}

    def h_v1_chat(self, body):
        from .chat import render_chat
        t0 = time.perf_counter()
        name_in = body.get("model")
        name = self.app.models.resolve(name_in)
        stream = get_field(body, "stream", "bool", False)
        msgs = self._openai_messages(body.get("messages"))
        kw, n, seed, max_tokens, include_usage = self._openai_sampling(body, None)
        want_lp = get_field(body, "logprobs", "bool", False)
        top_lp = get_field(body, "top_logprobs", "int", 0, lo=0, hi=MAX_TOP_LOGPROBS)
        if top_lp and not want_lp:
            raise bad("top_logprobs", "needs logprobs: true")
        lm, load_s = self.app.models.acquire(name)
        try:
            think = self._openai_think(body, lm, name_in)
            text = self._render(render_chat, lm.tokenizer, msgs, think)
            ids = lm.tokenizer.encode(text)
            split = lm.can_think and think is not False
            opened = split and text.rstrip().endswith(THINK_OPEN)
            job = self._openai_job(lm, [ids], kw, n, seed, max_tokens, top_lp if top_lp else (1 if want_lp else 0),
                                   load_s, t0, opened, split)
            self._openai_chat_run(job, name_in, n, stream, include_usage, want_lp, top_lp)
        finally:
            self.app.models.release(lm)

    def _chat_lp(self, lm, entries, top_lp):
        return {"content": [self._lp_entry(lm, t, lp, top, top_lp, True) | ({} if top_lp else {"top_logprobs": []})
                            for t, lp, top, _ in entries]}

    def _openai_chat_run(self, job: Job, name: str, n: int, stream: bool, include_usage: bool, want_lp: bool,
                         top_lp: int):
        lm = job.lm
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        fp = "fp_nanoseek"

        def chunk(choices, usage=_MISSING):
            d = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                 "system_fingerprint": fp, "choices": choices}
            if include_usage:
                d["usage"] = None if usage is _MISSING else usage
            return d

        if stream:
            self._start_stream("text/event-stream")
            for i in range(len(job.prompts)):
                self._sse(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]))

        def on_event(i, ev, th, ct):
            if not stream:
                return
            st = job.states[i]
            lps = st.take_logprobs() if want_lp else []
            if th or ct or lps:
                delta = {}
                if th:
                    delta["reasoning_content"] = th
                if ct or not th:
                    delta["content"] = ct
                self._sse(chunk([{"index": i, "delta": delta,
                                  "logprobs": self._chat_lp(lm, lps, top_lp) if lps else None,
                                  "finish_reason": None}]))
            if ev.finish_reason is not None:
                self._sse(chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": ev.finish_reason}]))

        self._run(job, on_event)
        usage = self._usage(job, n)
        if stream:
            self._end_sse(chunk([], usage) if include_usage else None)
            return
        choices = []
        for i, st in enumerate(job.states):
            msg = {"role": "assistant", "content": "".join(st.text)}
            if job.split and st.splitter.seen:
                msg["reasoning_content"] = "".join(st.thinking)
            choices.append({"index": i, "message": msg,
                            "logprobs": self._chat_lp(lm, st.logprobs, top_lp) if want_lp else None,
                            "finish_reason": st.last.finish_reason})
        self._send_json(200, {"id": cid, "object": "chat.completion", "created": created, "model": name,
                              "system_fingerprint": fp, "choices": choices, "usage": usage})

    def h_v1_completions(self, body):
        t0 = time.perf_counter()
        name_in = body.get("model")
        name = self.app.models.resolve(name_in)
        stream = get_field(body, "stream", "bool", False)
        prompt = body.get("prompt")
        if prompt is None:
            raise bad("prompt", "is required")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompts = [list(prompt)]
        elif (isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and all(
                isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt)):
            prompts = [list(p) for p in prompt]
        else:
            raise bad("prompt", "expected a string, an array of strings, an array of token ids or an array of "
                      "token-id arrays (non-empty)")
        if len(prompts) > 64:
            raise bad("prompt", f"at most 64 prompts per request, got {len(prompts)}")
        kw, n, seed, max_tokens, include_usage = self._openai_sampling(body, 16)
        if len(prompts) * n > 64:
            raise bad("n", "prompts x n must be at most 64")
        n_lp = get_field(body, "logprobs", "int", None, lo=0, hi=MAX_TOP_LOGPROBS)
        echo = get_field(body, "echo", "bool", False)
        self._check_unsupported(body, {"suffix": "suffix (fill-in-the-middle)"})
        lm, load_s = self.app.models.acquire(name)
        try:
            tok = lm.tokenizer
            vocab = lm.model.config.vocab_size
            id_prompts = []
            for pi, p in enumerate(prompts):
                if isinstance(p, str):
                    ids = tok.encode(p)
                    if tok.bos_id is not None and not p.startswith(tok.bos_token or "\0"):
                        ids = [tok.bos_id] + ids
                    if not ids:
                        raise bad("prompt", "must not be empty")
                else:
                    badt = [t for t in p if not 0 <= t < vocab]
                    if badt:
                        raise bad("prompt", f"token id {badt[0]} is outside the vocabulary of {vocab}")
                    ids = p
                id_prompts.append(ids)
            job = self._openai_job(lm, id_prompts, kw, n, seed, max_tokens,
                                   n_lp if n_lp else (1 if n_lp == 0 else 0), load_s, t0)
            self._openai_completion_run(job, name_in, prompts, n, stream, include_usage, n_lp, echo)
        finally:
            self.app.models.release(lm)

    def _legacy_lp(self, lm, entries, n_lp, base_offset=0):
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp, top, off in entries:
            out["tokens"].append(self._token_str(lm, t))
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({self._token_str(lm, a): b for a, b in (top or [])[:n_lp]} if n_lp else None)
            out["text_offset"].append(base_offset + off)
        return out

    def _openai_completion_run(self, job: Job, name: str, prompts: list, n: int, stream: bool,
                               include_usage: bool, n_lp: int | None, echo: bool):
        lm = job.lm
        cid = "cmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        echo_text = []
        for p in prompts:
            echo_text.append((p if isinstance(p, str) else lm.tokenizer.decode(p)) if echo else "")

        def chunk(choices, usage=_MISSING):
            d = {"id": cid, "object": "text_completion", "created": created, "model": name, "choices": choices}
            if include_usage:
                d["usage"] = None if usage is _MISSING else usage
            return d

        if stream:
            self._start_stream("text/event-stream")
            if echo:
                for i in range(len(job.prompts)):
                    self._sse(chunk([{"index": i, "text": echo_text[i // n], "logprobs": None, "finish_reason": None}]))

        def on_event(i, ev, th, ct):
            if not stream:
                return
            st = job.states[i]
            lps = st.take_logprobs() if n_lp is not None else []
            if ct or lps or ev.finish_reason is not None:
                self._sse(chunk([{"index": i, "text": ct,
                                  "logprobs": self._legacy_lp(lm, lps, n_lp, len(echo_text[i // n])) if lps else None,
                                  "finish_reason": ev.finish_reason}]))

        self._run(job, on_event)
        usage = self._usage(job, n)
        if stream:
            self._end_sse(chunk([], usage) if include_usage else None)
            return
        choices = []
        for i, st in enumerate(job.states):
            e = echo_text[i // n]
            choices.append({"index": i, "text": e + "".join(st.text),
                            "logprobs": self._legacy_lp(lm, st.logprobs, n_lp, len(e)) if n_lp is not None else None,
                            "finish_reason": st.last.finish_reason})
        self._send_json(200, {"id": cid, "object": "text_completion", "created": created, "model": name,
                              "choices": choices, "usage": usage})


# ============================================================================ CLI
def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args) -> int:
    logging.basicConfig(level=logging.INFO if not args.quiet else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dtype = None if args.dtype == "auto" else args.dtype
    origins = tuple(args.allow_origin or ()) + tuple(
        o.strip() for o in os.environ.get("NANOSEEK_ORIGINS", "").split(",") if o.strip())
    server = make_server(args.host, args.port, args.api_key, None, args.context_length, args.max_batch,
                         args.device, dtype, origins)
    host, port = server.server_address[:2]
    models = [m["name"] for m in server.app.store.list()]
    print(f"nanoseek serving {len(models)} model(s) from {server.app.store.models_dir} on http://{host}:{port} "
          f"(Ollama /api, OpenAI /v1){'; API key required' if args.api_key else ''}", flush=True)
    for m in models:
        print(f"  {m}", flush=True)
    if not _is_loopback(args.host) and not args.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this address can use the models",
                    args.host)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.app.close()
    return 0


def add_serve_command(sub) -> None:
    s = sub.add_parser("serve", help="Ollama- and OpenAI-compatible HTTP server for the models in the store")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=11434)
    s.add_argument("--api-key", default=os.environ.get("NANOSEEK_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint (default: $NANOSEEK_API_KEY)")
    s.add_argument("--context-length", type=int, default=4096, help="context limit per model in tokens")
    s.add_argument("--max-batch", type=int, default=16, help="sequences decoded together per model")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="load dtype (default: the checkpoint's own)")
    s.add_argument("--allow-origin", action="append", metavar="ORIGIN",
                   help="let browser pages from ORIGIN call the server (repeatable; fnmatch patterns such as "
                        "'https://*.example.com', or '*' for any; also $NANOSEEK_ORIGINS, comma-separated). "
                        "Pages on localhost and app webviews are always allowed")
    s.add_argument("--quiet", action="store_true", help="log warnings and errors only")
    s.set_defaults(func=cmd_serve)
