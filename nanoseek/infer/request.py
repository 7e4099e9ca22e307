"""A generation request as the inference engine (engine.py) sees it: its settings
(`SamplingParams`), the events it streams (`Event`, one per accepted token), its finished result
(`Completion`), the caller's `Handle` on it, and the scheduler's own record of it (`Request`: its
cache row, position, tokens and generator). Requests carry token ids and log-probs; text is the
request's `TextStream` (textstream.py). Speculative requests (DeepSeek-V3 report section 2.2, "MTP
in inference") also keep their MTP draft and its counts here."""

from __future__ import annotations

import queue
from dataclasses import dataclass, field

import torch

from ..speculative import SpeculativeStats
from .textstream import TextStream


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int = 0  # how many top alternatives to report per token (0: only the chosen token's)
    # the chosen token's log-prob: "raw" under the model's softmax (what APIs report), "sampled" under
    # the distribution it was drawn from (temperature, top-k, top-p applied; 0 when greedy), which
    # is the behaviour policy an RL trainer's importance ratio needs; top alternatives stay raw
    logprob_mode: str = "raw"
    ignore_eos: bool = False
    # score the prompt: each prompt token's log-prob given the tokens before it, with this many top
    # alternatives (None: no scoring); with it, max_tokens may be 0 (score without generating)
    prompt_logprobs: int | None = None
    # a per-request logits processor (grammar.Constraint): `mask(logits [V]) -> [V]` before this
    # request's token is chosen, `accept(token)` after; None leaves the logits as the model gave them
    constraint: object | None = None

    def validate(self) -> "SamplingParams":
        def bad(name, msg):
            raise ValueError(f"{name}: {msg}")

        least = 0 if self.prompt_logprobs is not None else 1
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < least:
            bad("max_tokens", f"must be an integer >= {least}, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            bad("temperature", f"must be a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", f"must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", f"must be an integer, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            bad("stop", "must be a string or a list of strings")
        self.stop = [s for s in self.stop if s]
        if not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20:
            bad("logprobs", f"must be an integer in [0, 20], got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or not 0 <= self.prompt_logprobs <= 20):
            bad("prompt_logprobs", f"must be None or an integer in [0, 20], got {self.prompt_logprobs!r}")
        if self.logprob_mode not in ("raw", "sampled"):
            bad("logprob_mode", f"must be 'raw' or 'sampled', got {self.logprob_mode!r}")
        return self


@dataclass
class Event:
    """One step of a request: the token it accepted (None for the EOS that ends it, or a cancel),
    its log-prob and top alternatives, the text that token made certain (requests with a
    `TextStream` only), and, on the last event, why it finished."""
    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    # on a scored request's first event: per prompt token (log-prob, top alternatives); the first None
    prompt_logprobs: list[tuple[float | None, list[tuple[int, float]] | None]] | None = None
    cached_tokens: int = 0  # leading prompt tokens copied from the prefix cache, not prefilled


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[float] = field(default_factory=list)  # one per token of token_ids
    stop_logprob: float | None = None  # the log-prob of the EOS that ended it (finish_reason "stop" by EOS)
    prompt_logprobs: list | None = None  # SamplingParams.prompt_logprobs set: see Event.prompt_logprobs
    cached_tokens: int = 0  # see Event.cached_tokens
    speculative: SpeculativeStats | None = None  # drafts and accepted drafts (speculative engines only)


class Handle:
    """A submitted request: `events()` (or iterating) yields its events up to the finishing one;
    `cancel()` stops it (e.g. on client disconnect); `completion()` waits for the whole result."""

    def __init__(self, engine: "Engine", request: "Request"):
        self._engine, self._request = engine, request
        self._finished = False

    def events(self, timeout: float | None = None):
        """The request's events, ending after the one with a finish_reason. With `timeout`, a None
        is yielded whenever `timeout` seconds pass without an event (so the caller can look at its
        client in between). An engine failure is raised here."""
        while not self._finished:
            try:
                ev = self._request.events.get(timeout=timeout)
            except queue.Empty:
                yield None
                continue
            if isinstance(ev, BaseException):
                self._finished = True
                raise ev
            if ev.finish_reason is not None:
                self._finished = True
            yield ev

    def __iter__(self):
        return self.events()

    def cancel(self) -> None:
        """Stop generating: the engine frees the cache row, and the event stream ends at once with
        a "cancelled" event (a reader waiting in `events()` is released without waiting for it)."""
        req = self._request
        req.cancelled = True
        self._engine.wake()
        req.events.put(Event(None, "", finish_reason="cancelled", prompt_tokens=len(req.prompt),
                             cached_tokens=req.cached))

    def completion(self) -> Completion:
        """Wait for the request to finish; its tokens, text, log-probs and counts."""
        events = list(self.events())
        last = events[-1]
        return Completion([e.token_id for e in events if e.token_id is not None], "".join(e.text for e in events),
                          last.finish_reason, last.prompt_tokens, last.completion_tokens,
                          [e.logprob for e in events if e.logprob is not None], self._request.stop_logprob,
                          self._request.prompt_logprobs, last.cached_tokens, self._request.spec)


@dataclass(eq=False)  # compared by identity (`list.index` in Engine._retire), not field by field
class Request:
    prompt: list[int]
    params: SamplingParams
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_logprob: float | None = None
    prompt_logprobs: list | None = None  # filled at prefill when params.prompt_logprobs is set
    text: TextStream | None = None  # per-token text and stop strings; None: batch `generate`, decoded once
    pos: int = 0  # tokens in the cache
    cached: int = 0  # of them, leading prompt tokens copied from the prefix cache
    row: int = -1
    next_logits: torch.Tensor | None = None
    generator: torch.Generator | None = None
    t_submit: float = 0.0
    prefill_s: float = 0.0
    t_decode0: float = 0.0
    finish_reason: str | None = None
    # speculative engines: the MTP draft of the token after generated[-1], the distribution it was
    # drawn from ([V], sampled requests only), and the request's draft counts
    draft: int = 0
    draft_q: torch.Tensor | None = None
    spec: SpeculativeStats | None = None
