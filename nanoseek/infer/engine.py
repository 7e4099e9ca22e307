"""Inference engine: MLA latent-cache generation with continuous batching (DeepSeek-V2 report
section 2.1: only the compressed latent and the shared rope key are cached).

- Prefill runs each new prompt through the naive attention path into its own cache row.
- Decode runs all active sequences together, one token each, through the absorbed path over a
  latent cache of exactly (kv_lora_rank + qk_rope_head_dim) values per token per layer; each
  sequence sits at its own position.
- A background thread owns the model: `submit` queues a request and returns a `Handle` whose
  `events()` yield token events (streaming) and whose `cancel()` ends it; new requests join the
  running batch between decode steps (continuous batching); a finished or cancelled sequence
  frees its row at once.
- Sampling per request: temperature, top-p, top-k, seed; max tokens, EOS, logprobs; and scoring:
  the log-prob of every prompt token under the model (`prompt_logprobs`), from the prefill's own
  logits, with `max_tokens=0` for scoring alone.
- Constrained decoding: a request's `constraint` (grammar.py) masks its own logits row before its
  token is chosen and is advanced with the accepted token, so constrained and unconstrained
  requests share a batch.
- Prefix reuse (prefix_cache.py, off unless `prefix_cache_tokens` > 0): a finished request's cache
  row (prompt and generated tokens) is kept by token ids; a new prompt sharing a prefix with kept
  ones copies those positions into its row and prefills only the rest, at least its last token
  (whose logits choose the first new token). Scored requests (`prompt_logprobs`) need the logits of
  every prompt token, so they bypass reuse and prefill in full. Decode, and so the CUDA graphs, is
  unchanged: a copied prefix is just a filled cache row.
- The scheduler works on token ids and log-probs only. Text (incremental detokenization, stop
  strings) is each request's `TextStream` (textstream.py); the scheduler calls it once per accepted
  token, so a stop string ends its request in the same step, exactly where EOS would.
- MTP speculative decoding (`speculative=True`, models with MTP layers; DeepSeek-V3 report section
  2.2, "MTP in inference"): each step feeds every request its next token and the MTP module's draft
  of the token after it, two tokens per row in one main-model forward (the absorbed path, as a
  one-token decode step), and keeps the draft when the main model agrees: greedily, when it is the
  main model's own argmax (so the output is plain greedy decoding's), sampled, by the rejection
  rule of speculative sampling (speculative.py, speculative_batch.py), so every token is distributed exactly as plain
  sampling's and its reported log-probs are the main model's. The MTP layer keeps its own latent
  cache row beside the main model's (moved, copied and kept in the prefix cache with it). Each
  request's `SpeculativeStats` (drafts, accepted, steps) and the engine's total are kept; requests
  with a `constraint` take one token per step and are not drafted. Off, nothing of this runs.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch

from .prefix_cache import PrefixCache
from .sampling import sample_next
from .speculative import SpeculativeStats, draft_logits, mtp_hidden
from .speculative_batch import draw_drafts, verify
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

    def __init__(self, engine: "Engine", request: "_Request"):
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
        self._engine._wake()
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


@dataclass(eq=False)  # compared by identity (`list.index` in _retire), not field by field
class _Request:
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


def supports_speculative(model) -> bool:
    """Whether `model` has an MTP module to draft with (DeepSeek-V3 checkpoints with
    num_nextn_predict_layers >= 1; dense models and MTP-less checkpoints have none)."""
    return len(getattr(model, "mtp", None) or ()) >= 1


class GraphDecoder:
    """Decode steps replayed from CUDA graphs, one graph per batch-size bucket (1, 2, 4, ...).

    A step attends over the whole cache row (keys past each sequence's position are masked), so
    every shape is static; rows beyond the active ones are free cache rows and take padding.
    `width` 2 is the speculative verify step: two tokens per row through the absorbed path,
    returning the logits and final-normed hidden states of both."""

    def __init__(self, model, cache: dict, max_batch: int, compile: bool = False, width: int = 1):
        self.model, self.cache, self.max_batch, self.width = model, cache, max_batch, width
        # with `compile`, inductor fuses the step's elementwise work before the graph is captured
        self.step = torch.compile(model, dynamic=False) if compile else model
        self.graphs: dict[int, tuple] = {}

    def _bucket(self, n: int) -> int:
        b = 1
        while b < n:
            b *= 2
        return min(b, self.max_batch)

    def _capture(self, b: int):
        device = next(self.model.parameters()).device
        tokens = torch.zeros(b, self.width, dtype=torch.long, device=device)
        start = torch.zeros(b, dtype=torch.long, device=device)
        rows = {k: c.rows(0, b) for k, c in self.cache.items()}
        kw = {} if self.width == 1 else dict(return_hidden=True, attn_impl="absorb")
        # warming up writes positions [0, width) of rows [0, b), which may hold active sequences
        saved = [t[:b, :self.width].clone() for c in self.cache.values() for t in c.tensors]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm up (and compile) outside the graph
                self.step(tokens, start_pos=start, cache=rows, **kw)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            if self.width == 1:
                out = self.step(tokens, start_pos=start, cache=rows)[:, -1]  # [b, V]
            else:
                out = self.step(tokens, start_pos=start, cache=rows, **kw)  # [b, w, V], [b, w, h]
        for t, keep in zip((t for c in self.cache.values() for t in c.tensors), saved):
            t[:b, :self.width].copy_(keep)
        self.graphs[b] = (graph, tokens, start, out)

    def __call__(self, tokens: torch.Tensor, start: torch.Tensor):
        """tokens [A, 1], start [A] -> logits [A, V] (a view, valid until the next call); with
        `width` 2, tokens [A, 2] -> (logits [A, 2, V], hidden [A, 2, h])."""
        A = tokens.shape[0]
        b = self._bucket(A)
        if b not in self.graphs:
            self._capture(b)
        graph, st, ss, out = self.graphs[b]
        st.zero_()
        ss.zero_()
        st[:A] = tokens
        ss[:A] = start
        graph.replay()
        if self.width == 1:
            return out[:A]
        return out[0][:A], out[1][:A]


class Engine:
    """Continuous-batching generation over one model: requests (token ids and `SamplingParams`)
    share a latent cache of `max_batch` rows of `max_context` tokens and decode together, one token
    each per step. `submit` streams through a background thread; `generate` runs a batch to
    completion (in the calling thread when nothing was submitted); `close` stops the thread.
    `speculative`: decode with MTP drafts (models with MTP layers only; the module docstring)."""

    def __init__(self, model, tokenizer, max_context: int = 4096, max_batch: int = 16, device=None,
                 cuda_graphs: bool | None = None, compile: bool = False, prefix_cache_tokens: int = 0,
                 prefix_block: int = 16, speculative: bool = False):
        if speculative and not supports_speculative(model):
            raise ValueError("speculative decoding needs a model with MTP layers (num_nextn_predict_layers >= 1); "
                             f"this {type(model).__name__} has none")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_context = int(max_context)
        self.max_batch = int(max_batch)
        self.device = torch.device(device) if device is not None else model.lm_head.weight.device
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self._cache = None  # allocated on first use: [max_batch, max_context] latent rows
        self._pending: queue.Queue[_Request] = queue.Queue()
        self._active: list[_Request] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        # graphs need sync-free steps: MoE experts only have that path (grouped GEMM) in bf16
        self.cuda_graphs = ((self.device.type == "cuda" and model.lm_head.weight.dtype == torch.bfloat16)
                            if cuda_graphs is None else cuda_graphs)
        self._graphs: GraphDecoder | None = None
        self.compile = compile
        # finished requests' cache rows by token ids, at most this many tokens (0: no reuse)
        self.prefix_cache = PrefixCache(prefix_cache_tokens, prefix_block) if prefix_cache_tokens > 0 else None
        self.speculative = bool(speculative)
        # the MTP layer's own cache sits in the cache dict under its layer name, past the main layers
        self._mtp_key = next(iter(model.mtp)) if self.speculative else None
        self.speculative_stats = SpeculativeStats()  # all requests' drafts so far

    # ------------------------------------------------------------------ public API
    def _enqueue(self, prompt_ids: list[int], params: SamplingParams | None, stream: bool = True) -> _Request:
        params = (params or SamplingParams()).validate()
        if not prompt_ids:
            raise ValueError("prompt: must contain at least one token")
        if len(prompt_ids) >= self.max_context:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens exceeds the context limit of {self.max_context} tokens")
        if self._closed:
            raise RuntimeError("engine is closed")
        # stop strings need the incremental text, so such requests stream whatever the caller asked
        text = TextStream(self.tokenizer, params.stop) if stream or params.stop else None
        req = _Request(list(map(int, prompt_ids)), params, t_submit=time.perf_counter(), text=text)
        self._pending.put(req)
        return req

    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Handle:
        req = self._enqueue(prompt_ids, params)
        self._ensure_thread()
        self._wake()
        return Handle(self, req)

    def generate(self, prompts: list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """All prompts to completion (`params`: one for all, or one per prompt). Without a running
        background loop (nothing was `submit`ted, e.g. RL rollouts and evaluation), the scheduler
        runs in the calling thread: a second thread doing tensor work would make both share (and
        fight over) the CPU's math threads."""
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"params: {len(per_prompt)} given for {len(prompts)} prompts")
        if self._thread is None or not self._thread.is_alive():
            # no per-token events: a request without stop strings keeps its tokens, decoded once at the end
            reqs = [self._enqueue(p, sp, stream=False) for p, sp in zip(prompts, per_prompt)]
            with torch.inference_mode():
                while self._active or not self._pending.empty():
                    self._tick()
            return [Completion(r.generated, self.tokenizer.decode(r.generated) if r.text is None else r.text.emitted,
                               r.finish_reason, len(r.prompt), len(r.generated), r.logprobs, r.stop_logprob,
                               r.prompt_logprobs, r.cached, r.spec)
                    for r in reqs]
        handles = [self.submit(p, sp) for p, sp in zip(prompts, per_prompt)]
        return [h.completion() for h in handles]

    def close(self) -> None:
        self._closed = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ------------------------------------------------------------------ scheduler
    def _wake(self):
        with self._cv:
            self._cv.notify_all()

    def _ensure_thread(self):
        with self._cv:  # first submits from several threads at once start one loop, not several
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="nanoseek-engine", daemon=True)
                self._thread.start()

    def _loop(self):
        while not self._closed:
            try:
                with torch.inference_mode():
                    if self._tick():
                        continue
            except Exception as e:  # noqa: BLE001 - report to every waiting request, keep serving
                traceback.print_exc()
                for r in self._active:
                    r.events.put(RuntimeError(f"engine failure: {type(e).__name__}: {e}"))
                self._active = []
                continue
            with self._cv:
                if self._pending.empty() and not self._closed:
                    self._cv.wait(timeout=0.5)

    def _tick(self) -> bool:
        """One scheduler round: drop cancelled requests, admit pending ones, decode a step.
        Returns whether a step was decoded."""
        self._drop_cancelled()
        self._admit()
        if self._active:
            if self.speculative:
                self._speculative_step()
            else:
                self._decode_step()
            return True
        return False

    def _cache_rows(self, start: int, end: int) -> dict:
        if self._cache is None:
            self._cache = self.model.make_cache(self.max_batch, self.max_context)
            if self.speculative:
                self._cache[self._mtp_key] = self.model.make_layer_cache(self.max_batch, self.max_context)
        return {k: c.rows(start, end) for k, c in self._cache.items()}

    def _admit(self):
        """Move pending requests into free cache rows; prompts of equal length (and equal reused
        prefix) prefill together, each distinct prompt once."""
        new: list[_Request] = []
        while len(self._active) + len(new) < self.max_batch:
            try:
                req = self._pending.get_nowait()
            except queue.Empty:
                break
            if req.cancelled:
                req.events.put(Event(None, "", finish_reason="cancelled", prompt_tokens=len(req.prompt)))
                continue
            if req.params.seed is not None:
                req.generator = torch.Generator(device=self.device).manual_seed(req.params.seed)
            new.append(req)
        prefix: dict[int, tuple] = {}  # id(request) -> its reused positions' tensors
        by_len: dict[tuple[int, int], list[_Request]] = {}
        for req in new:
            if self.prefix_cache is not None and req.params.prompt_logprobs is None:
                # at most all but the last prompt token: its logits choose the first new token
                req.cached, data = self.prefix_cache.match(req.prompt, len(req.prompt) - 1)
                if req.cached and self.speculative:
                    # the MTP entry of the last matched position was made with the token after it,
                    # which this prompt need not share: that position is prefilled again
                    req.cached -= 1
                    data = tuple(d[:, :req.cached] for d in data)
                if req.cached:
                    prefix[id(req)] = data
            by_len.setdefault((len(req.prompt), req.cached), []).append(req)
        for (length, reused), group in by_len.items():
            t0 = time.perf_counter()
            first = len(self._active)
            # identical prompts (n samples of one prompt: RL groups, pass@k) prefill once: the
            # distinct ones take the group's first rows, each repeat copies its source's cache row
            source: dict[tuple, int] = {}  # prompt -> its row among the distinct ones
            firsts, repeats, src = [], [], []
            for r in group:
                key = tuple(r.prompt)
                if key in source:
                    repeats.append(r)
                    src.append(source[key])
                else:
                    source[key] = len(firsts)
                    firsts.append(r)
            group = firsts + repeats
            d = len(firsts)
            if reused:  # copy the cached prefix into each row, prefill the rest after it
                for k, r in enumerate(firsts):
                    self._load_prefix(first + k, prefix[id(r)])
                ids = torch.tensor([r.prompt[reused:] for r in firsts], device=self.device)  # [d, length - reused]
                all_logits = self.model(ids, start_pos=reused, cache=self._cache_rows(first, first + d),
                                        return_hidden=self.speculative)
            else:
                ids = torch.tensor([r.prompt for r in firsts], device=self.device)  # [d, length]
                all_logits = self.model(ids, cache=self._cache_rows(first, first + d),
                                        return_hidden=self.speculative)  # [d, length, V]
            hidden = None
            if self.speculative:
                all_logits, hidden = all_logits  # hidden [d, length - reused, h]
            logits = all_logits[:, -1]  # [d, V]
            for k, r in enumerate(group):  # scored prompts: each token's log-prob from the same prefill
                if r.params.prompt_logprobs is not None:
                    r.prompt_logprobs = self._score(r.prompt, all_logits[k if k < d else src[k - d]],
                                                    r.params.prompt_logprobs)
            if repeats:
                src = torch.tensor(src, device=self.device)
                for c in self._cache.values():
                    c.copy_rows(first + src, first + d, length)
                logits = torch.cat([logits, logits[src]])  # [len(group), V]
                if hidden is not None:
                    hidden = torch.cat([hidden, hidden[src]])  # [len(group), length - reused, h]
            now = time.perf_counter()
            for k, req in enumerate(group):
                req.row, req.pos = first + k, length
                req.prefill_s, req.t_decode0 = now - t0, now
                self._active.append(req)
            # speculative: the first tokens are chosen and drafted from while the group's rows are
            # still first.. in order; accepted (which may retire rows) below
            chosen = self._first_drafts(group, logits, hidden, reused, first) if self.speculative else None
            scored_only = [k for k, r in enumerate(group) if r.params.max_tokens == 0]
            if scored_only:  # scoring alone: finished at prefill, nothing sampled for them
                keep = [k for k in range(len(group)) if k not in scored_only]
                for k in scored_only:
                    self._finish_unsampled(group[k])
                group, logits = [group[k] for k in keep], logits[keep]
            if group and chosen is not None:
                for r, (token, lp, top) in zip(group, chosen):
                    self._accept(r, token, lp, top)
            elif group:
                self._emit(group, logits)

    @staticmethod
    def _score(prompt: list[int], logits: torch.Tensor, top: int) -> list:
        """Per prompt token (log-prob given the tokens before it, top alternatives); logits [L, V]
        predict the token after each position, so the first token has none."""
        logp = torch.log_softmax(logits[:-1].float(), dim=-1)  # [L-1, V]
        target = torch.tensor(prompt[1:], device=logp.device)
        chosen = logp.gather(1, target[:, None])[:, 0].tolist()
        tops = [None] * len(chosen)
        if top:
            v, idx = logp.topk(top, dim=-1)
            tops = [list(zip(i, x)) for i, x in zip(idx.tolist(), v.tolist())]
        return [(None, None)] + list(zip(chosen, tops))

    def _finish_unsampled(self, req: _Request):
        """A request with max_tokens=0 ends at its prefill: one final event, its row freed."""
        req.finish_reason = "length"
        if req.text is not None:
            req.events.put(Event(None, "", finish_reason="length", prompt_tokens=len(req.prompt),
                                 prefill_s=req.prefill_s, prompt_logprobs=req.prompt_logprobs,
                                 cached_tokens=req.cached))
        self._retire(req)

    def _decode_step(self):
        A = len(self._active)
        tokens = torch.tensor([[r.generated[-1]] for r in self._active], device=self.device)
        start = torch.tensor([r.pos for r in self._active], device=self.device)
        if self.cuda_graphs:
            if self._graphs is None:
                self._cache_rows(0, 1)
                self._graphs = GraphDecoder(self.model, self._cache, self.max_batch, compile=self.compile)
            logits = self._graphs(tokens, start)
        else:
            kv_len = max(r.pos for r in self._active) + 1
            logits = self.model(tokens, start_pos=start, kv_len=kv_len, cache=self._cache_rows(0, A))[:, -1]
        for r in self._active:
            r.pos += 1
        self._emit(list(self._active), logits)

    # ------------------------------------------------------------------ speculative decoding
    def _first_drafts(self, group: list[_Request], logits: torch.Tensor, hidden: torch.Tensor, reused: int,
                      first: int) -> list[tuple]:
        """At admission (rows first.. in group order): choose the first token of each generating
        request from logits [G, V], run the MTP layer over the prefilled positions with hidden
        [G, L - reused, h], and draw each request's first draft. Returns the chosen (token, log-prob,
        top) of the generating requests (max_tokens > 0), in order, for `_accept`."""
        gen = [k for k, r in enumerate(group) if r.params.max_tokens > 0]
        chosen = self._choose([group[k] for k in gen], logits[gen]) if gen else []
        if not gen:
            return chosen
        token_of = {k: c[0] for k, c in zip(gen, chosen)}
        # MTP inputs at position i: (h_i, emb(t_{i+1})); the last one's next token is the chosen one
        next_ids = torch.tensor([r.prompt[reused + 1:] + [token_of.get(k, 0)] for k, r in enumerate(group)],
                                device=self.device)  # [G, L - reused]
        mcache = self._cache[self._mtp_key].rows(first, first + len(group))
        states = mtp_hidden(self.model, hidden, next_ids, reused, mcache)  # [G, L - reused, h]
        drafting = [group[k] for k in gen]
        draw_drafts(drafting, draft_logits(self.model, states[gen, -1]).float())
        for r in drafting:
            r.spec = SpeculativeStats()
        return chosen

    def _speculative_step(self):
        """One decode step of every active request with MTP drafts: feed [next, draft] per row,
        keep 1 or 2 tokens per request (`verify`), draft again from the MTP layer over the kept
        tokens' positions, then accept the tokens one by one (a request may finish after the
        first)."""
        reqs = list(self._active)
        A = len(reqs)
        tokens = torch.tensor([[r.generated[-1], r.draft] for r in reqs], device=self.device)  # [A, 2]
        start = torch.tensor([r.pos for r in reqs], device=self.device)  # [A]
        kv_len = max(r.pos for r in reqs) + 2
        if self.cuda_graphs:
            if self._graphs is None:
                self._cache_rows(0, 1)
                self._graphs = GraphDecoder(self.model, self._cache, self.max_batch, compile=self.compile, width=2)
            logits, hidden = self._graphs(tokens, start)
        else:
            logits, hidden = self.model(tokens, start_pos=start, kv_len=kv_len, cache=self._cache_rows(0, A),
                                        return_hidden=True, attn_impl="absorb")  # [A, 2, V], [A, 2, h]
        new, accepted, lps, tops = verify(reqs, tokens[:, 1], logits.float())
        n_new = 1 + accepted.long()  # [A]
        # next drafts, while the rows are still in this step's order: MTP inputs (h_pos, emb(new_0))
        # and, for an accepted draft, (h_pos+1, emb(new_1)); a rejected row's second entry sits past
        # its end and is overwritten next step
        mcache = self._cache[self._mtp_key].rows(0, A)
        states = mtp_hidden(self.model, hidden, new, start, mcache, kv_len=kv_len, impl="absorb")  # [A, 2, h]
        last = states[torch.arange(A, device=self.device), n_new - 1]  # [A, h]
        draw_drafts(reqs, draft_logits(self.model, last).float())
        n_new = n_new.tolist()
        olds = [r.pos for r in reqs]
        for r, n in zip(reqs, n_new):  # every row's filled length, before any retire moves rows
            r.pos += n
        for i, (r, toks, n, acc) in enumerate(zip(reqs, new.tolist(), n_new, accepted.tolist())):
            if r.params.constraint is None:
                step = SpeculativeStats(drafted=1, accepted=int(acc), main_steps=1)
                r.spec.add(step)
                self.speculative_stats.add(step)
            old = olds[i]
            for j in range(n):
                r.pos = old + 1 + j  # the tokens before this one are in the cache, as after a plain step
                self._accept(r, toks[j], lps[i][j], tops[i][j])
                if r.finish_reason is not None:
                    break

    def _emit(self, reqs: list[_Request], logits: torch.Tensor):
        """Sample the next token of each request from logits [A, V] (one host sync for the batch)."""
        for r, (token, lp, top) in zip(reqs, self._choose(reqs, logits)):
            self._accept(r, token, lp, top)

    def _choose(self, reqs: list[_Request], logits: torch.Tensor) -> list[tuple]:
        """Each request's next token from logits [A, V]: (token, its log-prob, top alternatives)."""
        logits = logits.float()
        # constrained requests choose from their masked row; the others' rows are untouched, so a
        # constrained neighbour changes no unconstrained request's token
        choose = logits
        constrained = [i for i, r in enumerate(reqs) if r.params.constraint is not None]
        if constrained:
            choose = logits.clone()
            for i in constrained:
                choose[i] = reqs[i].params.constraint.mask(logits[i])
        sampled_lp: dict[tuple, torch.Tensor] = {}  # group rows -> log-probs under the sampling distribution
        if all(r.params.temperature <= 0 for r in reqs):
            tokens = choose.argmax(dim=-1)
            greedy_sampled = [i for i, r in enumerate(reqs) if r.params.logprob_mode == "sampled"]
            if greedy_sampled:  # the chosen token had probability 1 under the sampling distribution
                sampled_lp[tuple(greedy_sampled)] = torch.zeros(len(greedy_sampled), device=logits.device)
        else:  # one sampling call per group of equal settings; seeded requests alone (reproducible)
            groups: dict[tuple, list[int]] = {}
            for i, r in enumerate(reqs):
                key = ((r.params.temperature, r.params.top_p, r.params.top_k, r.params.logprob_mode)
                       if r.generator is None else ("seeded", i))
                groups.setdefault(key, []).append(i)
            tokens = torch.empty(len(reqs), dtype=torch.long, device=logits.device)
            for idx in groups.values():
                p = reqs[idx[0]].params
                rows = torch.tensor(idx, device=logits.device)
                out = sample_next(choose[rows], p.temperature, p.top_p, p.top_k, reqs[idx[0]].generator,
                                  with_logprobs=p.logprob_mode == "sampled")
                if p.logprob_mode == "sampled":
                    tokens[rows], sampled_lp[tuple(idx)] = out
                else:
                    tokens[rows] = out
        logp = torch.log_softmax(logits, dim=-1)
        chosen = logp.gather(1, tokens[:, None])[:, 0]
        for idx, lp in sampled_lp.items():  # (a greedy group's sample_next log-probs are 0 too)
            chosen[list(idx)] = lp
        out = []
        for i, (r, token, lp) in enumerate(zip(reqs, tokens.tolist(), chosen.tolist())):
            top = None
            if r.params.logprobs:
                v, idx = logp[i].topk(r.params.logprobs)
                top = list(zip(idx.tolist(), v.tolist()))
            out.append((token, lp, top))
        return out

    def _accept(self, req: _Request, token: int, logprob: float, top):
        """Record one sampled token, send its event, retire the request when done (EOS, length, or
        a stop string its TextStream found)."""
        p = req.params
        if p.constraint is not None:
            p.constraint.accept(token)
        is_eos = token == self.eos_id and not p.ignore_eos
        if not is_eos:
            req.generated.append(token)
            req.logprobs.append(logprob)
        else:
            req.stop_logprob = logprob
        out_of_room = len(req.generated) >= p.max_tokens or req.pos + 1 >= self.max_context
        if req.text is None:  # batch generate: no events; the text is decoded once, at the end
            req.finish_reason = "stop" if is_eos else "length" if out_of_room else None
            if req.finish_reason is not None:
                self._retire(req)
            return
        delta, stopped = req.text.push(None if is_eos else token, final=is_eos or out_of_room)
        finish = "stop" if is_eos or stopped else "length" if out_of_room else None
        req.finish_reason = finish
        first = req.prompt_logprobs if len(req.generated) + is_eos == 1 else None
        req.events.put(Event(None if is_eos else token, delta, None if is_eos else logprob, top, finish,
                             len(req.prompt), len(req.generated), req.prefill_s, time.perf_counter() - req.t_decode0,
                             first, req.cached))
        if finish is not None:
            self._retire(req)

    def _drop_cancelled(self):
        for r in [r for r in self._active if r.cancelled]:
            self._retire(r)
            r.events.put(Event(None, "", finish_reason="cancelled", prompt_tokens=len(r.prompt),
                               completion_tokens=len(r.generated), cached_tokens=r.cached))

    def _retire(self, req: _Request):
        """Free req's cache row by moving the last active sequence into it (keeping the row's
        tokens in the prefix cache first)."""
        i = self._active.index(req)
        if self.prefix_cache is not None:
            self._keep_prefix(i, (req.prompt + req.generated)[:req.pos])
        last = len(self._active) - 1
        if i != last:
            moved = self._active[last]
            for c in self._cache.values():
                c.move_row(last, i, moved.pos)
            moved.row = i
            self._active[i] = moved
        self._active.pop()

    # ------------------------------------------------------------------ prefix reuse
    def _load_prefix(self, row: int, data: tuple) -> None:
        """Write cached positions into a cache row: data per tensor kind [n_layers, P, ...]."""
        P = data[0].shape[1]
        for layer, c in enumerate(self._cache.values()):
            for t, d in zip(c.tensors, data):
                t[row, :P] = d[layer]

    def _keep_prefix(self, row: int, tokens: list[int]) -> None:
        """Keep a row's first len(tokens) positions (the tokens fed through the model; the last
        sampled one never was) in the prefix cache."""
        n = len(tokens)
        layers = list(self._cache.values())
        kinds = len(layers[0].tensors)
        rows = tuple(torch.stack([c.tensors[j][row, :n] for c in layers]) for j in range(kinds))  # [n_layers, n, ...]
        self.prefix_cache.insert(tokens, rows)
