"""A generation request's lifecycle against the engine's public API (`Engine.submit`,
`Handle.events`, `Handle.cancel`): a `Job` submits one engine request per choice, hands the event
loop their events as they come (one reader thread per handle), splits each choice's text into
thinking and answer (`chat.ThinkSplitter`), and cancels every unfinished choice when the client
goes away, the request fails, or the server shuts down.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from ..infer.chat import ThinkSplitter
from ..infer.engine import Event, SamplingParams
from .metrics import Metrics
from .models import LoadedModel
from .protocol import STREAM_HEADERS, APIError

BUSY_REQUESTS = 8  # from this many concurrent requests on, each stream gathers tokens before a write
LINGER_S = 0.004
_END = object()


class ClientGone(Exception):
    """The client closed its connection before the reply was complete."""


class RequestCounters:
    """Requests in flight and requests cancelled by their client, for the whole server, and the
    metrics every job reports into."""

    def __init__(self, metrics: Metrics | None = None):
        self.active = 0
        self.cancelled = 0
        self.metrics = metrics or Metrics()
        self._lock = threading.Lock()

    def add(self, active: int = 0, cancelled: int = 0) -> None:
        with self._lock:
            self.active += active
            self.cancelled += cancelled


def sampling_params(prompt_len: int, max_tokens: int | None, ctx: int, prompt_field: str, **kw) -> SamplingParams:
    """The engine's parameters for one choice; `max_tokens` None runs to the context's end, and is
    capped there otherwise. A prompt that leaves no room is a 400 on `prompt_field`."""
    if prompt_len >= ctx:
        raise APIError(400, f"prompt of {prompt_len} tokens exceeds the context limit of {ctx} tokens",
                       param=prompt_field, code="context_length_exceeded")
    max_tokens = ctx - prompt_len if max_tokens is None else min(max_tokens, ctx - prompt_len)
    try:
        return SamplingParams(max_tokens=max_tokens, **kw).validate()
    except ValueError as e:
        raise APIError(400, str(e), param=str(e).split(":", 1)[0]) from None


def token_logprob(tokenizer, token_id: int, logprob: float, top, n_top: int, with_bytes: bool = True) -> dict:
    """One token's log-prob entry as both APIs write it: token, logprob, bytes, top_logprobs."""
    s = tokenizer.decode([token_id])
    entry = {"token": s, "logprob": logprob}
    if with_bytes:
        entry["bytes"] = list(s.encode("utf-8"))
    if n_top:
        tops = []
        for t, lp in (top or [])[:n_top]:
            ts = tokenizer.decode([t])
            d = {"token": ts, "logprob": lp}
            if with_bytes:
                d["bytes"] = list(ts.encode("utf-8"))
            tops.append(d)
        entry["top_logprobs"] = tops
    return entry


@dataclass
class ChoiceState:
    """One choice's output so far: answer and thinking deltas, token ids, log-prob entries."""
    splitter: ThinkSplitter
    text: list = field(default_factory=list)
    thinking: list = field(default_factory=list)
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # (token_id, logprob, top list, text offset)
    pending_lp: list = field(default_factory=list)  # the entries not sent yet (streaming)
    n_chars: int = 0
    last: Event | None = None  # the finishing event
    prompt_logprobs: list | None = None  # a scored prompt's (log-prob, top) per token

    def add(self, ev: Event) -> tuple[str, str]:
        """Feed an event; returns (thinking delta, content delta)."""
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = ev.prompt_logprobs
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


def _read_events(handle, i: int, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
    """A reader thread: one handle's events onto the event loop's queue, then the end mark."""
    def put(item):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is gone
            pass
    try:
        for ev in handle.events():
            put((i, ev, None))
    except BaseException as e:  # noqa: BLE001 - handed to the request's coroutine
        put((i, None, e))
    put((i, None, _END))


class Job:
    """One generation request after validation: prompts (one per choice) and their parameters."""

    def __init__(self, lm: LoadedModel, prompts: list[list[int]], params: list[SamplingParams],
                 opened: bool = False, split: bool = False, load_s: float = 0.0, t0: float | None = None):
        self.lm, self.prompts, self.params = lm, prompts, params
        self.opened = opened  # the prompt opened a <think> block
        self.split = split  # split thinking from the answer
        self.load_s = load_s
        self.t0 = time.perf_counter() if t0 is None else t0
        self.states = [ChoiceState(ThinkSplitter(opened, split)) for _ in prompts]
        self.handles: list = []
        self.finished = [False] * len(prompts)

    def submit(self) -> None:
        """Queue every choice in the engine (all or none: a refused one cancels the others)."""
        try:
            for p, sp in zip(self.prompts, self.params):
                try:
                    self.handles.append(self.lm.engine.submit(p, sp))
                except ValueError as e:  # the engine's own checks (context limit, empty prompt)
                    raise APIError(400, str(e), param="prompt", code="context_length_exceeded") from None
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        """Cancel the unfinished choices (their engine rows are freed at the next step)."""
        for i, h in enumerate(self.handles):
            if not self.finished[i]:
                h.cancel()

    async def steps(self, client_gone, counters: RequestCounters):
        """Yields (choice, last event, thinking delta, answer delta) as events arrive; events that
        queued up while the previous write was in flight come together, so a busy server sends
        fewer, larger chunks. `client_gone()` (awaitable) is asked while waiting and every 0.25 s;
        a vanished client raises ClientGone. Whatever ends it, unfinished choices are cancelled."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        for i, h in enumerate(self.handles):
            threading.Thread(target=_read_events, args=(h, i, loop, queue), daemon=True,
                             name=f"nanoseek-events-{i}").start()
        counters.add(active=1)
        metrics, waiting = counters.metrics, True
        metrics.queue(+1)
        try:
            live, last_check = len(self.handles), time.monotonic()
            while live:
                try:
                    items = [await asyncio.wait_for(queue.get(), 0.2)]
                except asyncio.TimeoutError:
                    if await client_gone():
                        raise ClientGone() from None
                    last_check = time.monotonic()
                    continue
                if counters.active >= BUSY_REQUESTS:
                    await asyncio.sleep(LINGER_S)  # busy server: a few tokens per write instead of one
                while len(items) < 256 and not queue.empty():
                    items.append(queue.get_nowait())
                if time.monotonic() - last_check > 0.25:
                    if await client_gone():
                        raise ClientGone()
                    last_check = time.monotonic()
                groups: dict[int, list] = {}
                for i, ev, err in items:
                    if err is _END:
                        live -= 1
                        continue
                    if err is not None:
                        raise err
                    if ev.finish_reason is not None:
                        self.finished[i] = True
                    if waiting and ev.token_id is not None:
                        waiting = False
                        metrics.queue(-1)
                        metrics.first_token(self.lm.name, time.perf_counter() - self.t0)
                    groups.setdefault(i, []).append(ev)
                for i, events in groups.items():
                    ths, cts = [], []
                    for ev in events:
                        if ev.finish_reason == "cancelled":
                            continue
                        th, ct = self.states[i].add(ev)
                        ths.append(th)
                        cts.append(ct)
                    if ths:
                        yield i, events[-1], "".join(ths), "".join(cts)
        except (ClientGone, asyncio.CancelledError, GeneratorExit):
            counters.add(cancelled=1)
            raise
        finally:
            self.cancel()
            counters.add(active=-1)
            if waiting:
                metrics.queue(-1)
            done = [st.last for st in self.states if st.last is not None]
            metrics.tokens(self.lm.name, sum(len(p) for p in self.prompts),
                           sum(ev.completion_tokens or 0 for ev in done),
                           [ev.cached_tokens for ev in done])

    async def run(self, client_gone, counters: RequestCounters) -> list[ChoiceState]:
        """To the end, without streaming: the choices' states."""
        async for _ in self.steps(client_gone, counters):
            pass
        return self.states

    def usage(self, n_per_prompt: int) -> dict:
        prompt = sum(len(p) for p in self.prompts[::n_per_prompt])
        completion = sum(st.last.completion_tokens for st in self.states if st.last is not None)
        # prompt tokens copied from the prefix cache instead of prefilled (one count per prompt)
        cached = sum(st.last.cached_tokens for st in self.states[::n_per_prompt] if st.last is not None)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}


class JobStream(StreamingResponse):
    """A streamed reply whose `on_close` runs however the stream ends (done, failed, client gone,
    or never started), so the job's model is always released."""

    def __init__(self, chunks, media_type: str, on_close):
        super().__init__(chunks, media_type=media_type, headers=STREAM_HEADERS)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await run_in_threadpool(self.on_close)
