"""The Ollama- and OpenAI-compatible HTTP server (FastAPI on uvicorn) behind `nanoseek serve`, over the
local model store. Every model in the store is served by name (`name[:tag]`, tag `latest` by
default); the protocols live in ollama.py (`/api/*`) and openai.py (`/v1/*`); also GET / and
HEAD / ("nanoseek is running") and GET /health.

Before a route sees a request, the gate (`Gate`, ASGI middleware) checks, in order and without
reading the body:
- Host: a loopback server answers only requests addressed to a loopback name, so a web page whose
  DNS name was rebound to 127.0.0.1 cannot drive it (403).
- Origin: a browser page must come from an allowed origin (pages on this machine, app webviews,
  and those given with --allow-origin / NANOSEEK_ORIGINS), else 403; allowed ones get CORS headers.
- the API key (with --api-key): `Authorization: Bearer KEY` on every endpoint, else 401.
- the body: a declared length over 4 MiB is a 413, unread; a chunked body is read here up to the
  same cap (413 as soon as it passes it) and handed on whole.

Errors are in the API's own format and name the field (protocol.py); a fault inside the server is
a 500 with its traceback logged. Every log line of a request carries its request id. A client that
disconnects cancels its engine requests; shutting down lets running requests finish for a few
seconds, then cancels them. GET /metrics reports requests, tokens, time to first token and the
queue in Prometheus's text format (metrics.py).
"""

from __future__ import annotations

import asyncio
import fnmatch
import hmac
import ipaddress
import logging
import socket
import threading
import time
import traceback
import uuid

import uvicorn
from fastapi import FastAPI, Request
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import PlainTextResponse, Response

from ..infer.store import Store
from . import create, embed, ollama, openai
from .jobs import RequestCounters
from .metrics import Metrics
from .models import ModelManager
from .protocol import MAX_BODY, APIError, error_body, json_response, request_id

log = logging.getLogger("nanoseek.serve")

# Browser origins served without --allow-origin: pages on this machine and desktop-app webviews
# (the same defaults as Ollama's OLLAMA_ORIGINS).
DEFAULT_ORIGINS = tuple(f"{scheme}://{host}{port}" for scheme in ("http", "https")
                        for host in ("localhost", "127.0.0.1", "[::1]", "0.0.0.0") for port in ("", ":*")) + (
    "app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*")
METHODS = "GET, HEAD, POST, DELETE, OPTIONS"
GRACEFUL_SHUTDOWN_S = 5


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_allowed(host_header: str | None, bind_host: str) -> bool:
    """A loopback server answers only requests addressed to a loopback name (localhost, *.localhost,
    127.x, ::1) or to its bind address: the DNS-rebinding defence. Other binds answer any Host."""
    if not host_header or not is_loopback(bind_host):
        return True
    name = host_header.strip().lower()
    name = name[1:name.index("]")] if name.startswith("[") and "]" in name else name.rsplit(":", 1)[0]
    return name in ("localhost", bind_host.lower()) or name.endswith(".localhost") or is_loopback(name)


def origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    """No Origin header (curl, SDKs, servers) is always fine; a browser's Origin must match one of
    `allowed` (fnmatch patterns: `*` for any, `http://localhost:*`, `https://app.example.com`)."""
    return origin is None or any(fnmatch.fnmatchcase(origin.lower(), a.lower()) for a in allowed)


class App:
    """The server's state: the store, the loaded models, who may call, and request counts."""

    def __init__(self, store=None, api_key: str | None = None, context_length: int = 4096, max_batch: int = 16,
                 device: str | None = None, dtype=None, bind_host: str = "127.0.0.1",
                 allow_origins: tuple[str, ...] = (), prefix_cache_tokens: int = 0, speculative: bool = False):
        self.store = store or Store()
        self.api_key = api_key or None
        self.bind_host = bind_host
        self.origins = DEFAULT_ORIGINS + tuple(allow_origins)
        self.models = ModelManager(self.store, context_length, max_batch, device, dtype, prefix_cache_tokens,
                                   speculative)
        self.metrics = Metrics()
        self.counters = RequestCounters(self.metrics)
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, daemon=True, name="nanoseek-reaper")
        self._reaper.start()

    @property
    def active_requests(self) -> int:
        return self.counters.active

    @property
    def cancelled_requests(self) -> int:
        return self.counters.cancelled

    def authorized(self, authorization: str | None) -> bool:
        if not self.api_key:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def _reap_loop(self):
        while not self._stop.wait(1.0):
            try:
                self.models.reap()
            except Exception:  # noqa: BLE001
                log.exception("unloading expired models failed")

    def close(self):
        self._stop.set()
        self.models.close()


def error_response(err: APIError, openai_format: bool, close: bool = False) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else {}
    if close:  # the body was not read: the connection cannot carry another request
        headers["Connection"] = "close"
    return json_response(error_body(err, openai_format), err.status, ollama=not openai_format, headers=headers)


def is_chunked(headers: Headers) -> bool:
    return "chunked" in (headers.get("transfer-encoding") or "").lower()


def too_large() -> APIError:
    return APIError(413, f"request body is larger than the limit of {MAX_BODY} bytes")


async def read_chunked(receive) -> tuple[bytes | None, bool]:
    """A chunked body read whole: (body, client gone); body None once it passes MAX_BODY."""
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(parts), True
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None, False
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts), False


def replay(body: bytes, receive):
    """An ASGI receive that hands the app `body` whole, then waits on the real one (disconnects)."""
    sent = False

    async def receive_body():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return receive_body


class Gate:
    """ASGI middleware in front of the routes: request id and access log, Host / Origin / API key /
    body-size refusals before anything is read, CORS headers, preflights, and the 500 of a fault."""

    def __init__(self, app, state: App, endpoints: frozenset[str] = frozenset()):
        self.app, self.state, self.endpoints = app, state, endpoints

    def refusal(self, method: str, headers: Headers) -> APIError | None:
        host = headers.get("host")
        if not host_allowed(host, self.state.bind_host):
            return APIError(403, f"Host {host!r} is not this server's: a loopback server answers only requests for "
                                 f"localhost, 127.0.0.1 or [::1]")
        origin = headers.get("origin")
        if not origin_allowed(origin, self.state.origins):
            return APIError(403, f"origin {origin!r} is not allowed; start the server with --allow-origin "
                                 f"'{origin}' (or set NANOSEEK_ORIGINS) to let pages from it call this server")
        if method == "OPTIONS":
            return None
        if not self.state.authorized(headers.get("authorization")):
            return APIError(401, "unauthorized: send the header 'Authorization: Bearer <api key>'")
        if is_chunked(headers):
            return None  # read (up to MAX_BODY) by `read_chunked`
        try:
            n = int(headers.get("content-length") or 0)
        except ValueError:
            n = -1
        if n < 0:
            return APIError(400, "invalid Content-Length header")
        if n > MAX_BODY:
            return APIError(413, f"request body of {n} bytes is larger than the limit of {MAX_BODY} bytes")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex[:12]
        token = request_id.set(rid)
        path = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            path = path.rstrip("/") or "/"
            scope = dict(scope, path=path, raw_path=path.encode())
        method, headers = scope["method"], Headers(scope=scope)
        openai_format = path.startswith("/v1")
        origin = headers.get("origin")
        cors = origin if origin and origin_allowed(origin, self.state.origins) else None
        status, t0 = 0, time.perf_counter()

        async def send_with_cors(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if cors:  # the browser may read the reply
                    extra = [(b"access-control-allow-origin", cors.encode("latin-1")), (b"vary", b"Origin")]
                    message = dict(message, headers=list(message.get("headers", [])) + extra)
            await send(message)

        try:
            err = self.refusal(method, headers)
            if err is not None:
                await error_response(err, openai_format, close=True)(scope, receive, send_with_cors)
            elif method == "OPTIONS":  # a CORS preflight, or a plain OPTIONS
                allow = {"Allow": METHODS}
                if origin:
                    allow.update({"Access-Control-Allow-Methods": METHODS,
                                  "Access-Control-Allow-Headers": "Authorization, Content-Type",
                                  "Access-Control-Max-Age": "600"})
                await Response(status_code=204, headers=allow)(scope, receive, send_with_cors)
            elif is_chunked(headers):
                body, gone = await read_chunked(receive)
                if body is None:
                    await error_response(too_large(), openai_format, close=True)(scope, receive, send_with_cors)
                elif not gone:
                    await self.app(scope, replay(body, receive), send_with_cors)
            else:
                await self.app(scope, receive, send_with_cors)
        except asyncio.CancelledError:  # shutting down: the grace period ran out (its choices are cancelled)
            log.info("[%s] %s %s: cancelled at shutdown", rid, method, path)
            if status:  # end the reply the stream had begun
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except Exception as e:  # noqa: BLE001 - a fault in here: 500 with the traceback in the log
            log.error("[%s] %s %s: internal error\n%s", rid, method, path, traceback.format_exc())
            if not status:
                fault = APIError(500, f"internal server error: {type(e).__name__}: {e}")
                await error_response(fault, openai_format)(scope, receive, send_with_cors)
        finally:
            client = scope.get("client") or ("-", 0)
            log.info("[%s] %s %s %s %d %.3f s", rid, client[0], method, path, status, time.perf_counter() - t0)
            self.state.metrics.request(path if path in self.endpoints else "other", method, status)
            request_id.reset(token)


def create_api(state: App) -> FastAPI:
    """The FastAPI application: both protocols' routes behind the gate."""
    api = FastAPI(title="nanoseek", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    api.state.nanoseek = state
    routers = (ollama.router, openai.router, embed.router, create.router)
    for router in routers:
        api.include_router(router)

    @api.get("/")
    @api.head("/")
    async def root():
        return PlainTextResponse("nanoseek is running")

    @api.get("/health")
    async def health():
        return json_response({"status": "ok"}, ollama=True)

    @api.get("/metrics")
    async def metrics():
        speculative = {lm.name: lm.engine.speculative_stats for lm in state.models.loaded() if lm.engine.speculative}
        return state.metrics.response(state.counters.active, state.counters.cancelled, speculative)

    @api.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        if err.status >= 500:
            log.error("[%s] %s %s: %s", request_id.get(), request.method, request.url.path, err.message)
        return error_response(err, request.url.path.startswith("/v1"))

    @api.exception_handler(HTTPException)
    async def no_route(request: Request, exc: HTTPException):
        method, path = request.method, request.url.path
        err = (APIError(405, f"method {method} not allowed on {path}") if exc.status_code == 405 else
               APIError(404, f"no such endpoint: {method} {path}") if exc.status_code == 404 else
               APIError(exc.status_code, str(exc.detail)))
        return error_response(err, path.startswith("/v1"))

    paths = [r.path for router in (api, *routers) for r in router.routes if hasattr(r, "path")]
    endpoints = frozenset(p for p in paths if "{" not in p)  # the metrics' endpoint labels
    api.add_middleware(Gate, state=state, endpoints=endpoints)
    return api


class Server:
    """uvicorn serving `create_api(app)` on a socket bound at construction (port 0 picks a free
    one: `server_address[1]`); `serve_forever()` runs it in the calling thread, `shutdown()` stops
    it from another (running requests get GRACEFUL_SHUTDOWN_S seconds), `shutdown_all()` also
    closes the socket and unloads the models."""

    def __init__(self, host: str, port: int, app: App):
        family = socket.AF_INET
        try:
            if ipaddress.ip_address(host).version == 6:
                family = socket.AF_INET6
        except ValueError:
            pass
        # IPPROTO_TCP named, so asyncio turns Nagle's algorithm off on every accepted connection
        # (and the listener's TCP_NODELAY is inherited where the OS does that): a reply's head and
        # body go out as two writes, and with Nagle on the second waits for the client's delayed ACK
        self.socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket.bind((host, port))
        self.socket.listen(64)
        self.server_address = self.socket.getsockname()
        self.app = app
        self.api = create_api(app)
        config = uvicorn.Config(self.api, http="h11", ws="none", loop="asyncio", lifespan="off", log_config=None,
                                access_log=False, server_header=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
        self.uvicorn = uvicorn.Server(config)
        self._serving = threading.Lock()

    def serve_forever(self) -> None:
        with self._serving:
            self.uvicorn.run(sockets=[self.socket])

    def shutdown(self) -> None:
        """Stop serving and wait until `serve_forever` has returned."""
        self.uvicorn.should_exit = True
        with self._serving:
            pass

    def server_close(self) -> None:
        self.socket.close()

    def shutdown_all(self) -> None:
        self.shutdown()
        self.server_close()
        self.app.close()


def make_server(host: str = "127.0.0.1", port: int = 11434, api_key: str | None = None, store=None,
                context_length: int = 4096, max_batch: int = 16, device: str | None = None, dtype=None,
                allow_origins: tuple[str, ...] = (), prefix_cache_tokens: int = 0, speculative: bool = False) -> Server:
    """A ready server (call serve_forever(); port 0 picks a free port: server.server_address[1]).
    `allow_origins`: browser origins allowed beyond DEFAULT_ORIGINS (fnmatch patterns, `*` for any).
    `prefix_cache_tokens`: per model, the finished requests' cache tokens kept for prefix reuse (0: none).
    `speculative`: models with MTP layers decode with MTP drafts (the same greedy output)."""
    return Server(host, port, App(store, api_key, context_length, max_batch, device, dtype, host,
                                  tuple(allow_origins), prefix_cache_tokens, speculative))
