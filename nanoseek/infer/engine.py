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

The parts: request.py (SamplingParams, Event, Completion, Handle and the scheduler's Request),
batching.py (prefill groups, cache rows filled, copied and freed), batch_sampling.py (each row's
token choice, prompt scoring), speculative_batch.py (drafts and their verification), graphs.py
(CUDA-graph decode steps). This module is the scheduler that drives them.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback

import torch

from ..speculative import SpeculativeStats
from .batch_sampling import choose_tokens, score_prompt
from .batching import free_row, load_prefix, prefill_groups, row_prefix, split_repeats
from .graphs import GraphDecoder
from .prefix_cache import PrefixCache
from .request import Completion, Event, Handle, Request, SamplingParams
from .speculative_batch import first_drafts, verify_and_redraft
from .textstream import TextStream

# the request types are imported from here by the server, the trainers and the command line
__all__ = ["Completion", "Engine", "Event", "GraphDecoder", "Handle", "SamplingParams", "supports_speculative"]


def supports_speculative(model) -> bool:
    """Whether `model` has an MTP module to draft with (DeepSeek-V3 checkpoints with
    num_nextn_predict_layers >= 1; dense models and MTP-less checkpoints have none)."""
    return len(getattr(model, "mtp", None) or ()) >= 1


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
        head_dtype, head_device = model.head_dtype_device()  # a quantized head is not dequantized
        self.device = torch.device(device) if device is not None else head_device
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self._cache = None  # allocated on first use: [max_batch, max_context] latent rows
        self._pending: queue.Queue[Request] = queue.Queue()
        self._active: list[Request] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        # graphs need sync-free steps: MoE experts only have that path (grouped GEMM) in bf16
        self.cuda_graphs = ((self.device.type == "cuda" and head_dtype == torch.bfloat16)
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
    def _enqueue(self, prompt_ids: list[int], params: SamplingParams | None, stream: bool = True) -> Request:
        params = (params or SamplingParams()).validate()
        if not prompt_ids:
            raise ValueError("prompt: must contain at least one token")
        if len(prompt_ids) >= self.max_context:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens exceeds the context limit of {self.max_context} tokens")
        if self._closed:
            raise RuntimeError("engine is closed")
        # stop strings need the incremental text, so such requests stream whatever the caller asked
        text = TextStream(self.tokenizer, params.stop) if stream or params.stop else None
        req = Request(list(map(int, prompt_ids)), params, t_submit=time.perf_counter(), text=text)
        self._pending.put(req)
        return req

    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Handle:
        req = self._enqueue(prompt_ids, params)
        self._ensure_thread()
        self.wake()
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

    def wake(self) -> None:
        """Wake the background loop (a request was submitted or cancelled, or the engine closed)."""
        with self._cv:
            self._cv.notify_all()

    def close(self) -> None:
        self._closed = True
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ------------------------------------------------------------------ scheduler
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

    # ------------------------------------------------------------------ admission and prefill
    def _admit(self):
        """Move pending requests into free cache rows; prompts of equal length (and equal reused
        prefix) prefill together, each distinct prompt once."""
        new: list[Request] = []
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
        by_len, prefix = prefill_groups(new, self.prefix_cache, self.speculative)
        for (length, reused), group in by_len.items():
            self._prefill(group, length, reused, prefix)

    def _prefill(self, group: list[Request], length: int, reused: int, prefix: dict[int, tuple]):
        """Prefill one group (prompts of `length` tokens, the first `reused` from the prefix cache)
        into the next free rows, then choose (and, speculative, draft) each one's first token."""
        t0 = time.perf_counter()
        first = len(self._active)
        # identical prompts (n samples of one prompt: RL groups, pass@k) prefill once: the
        # distinct ones take the group's first rows, each repeat copies its source's cache row
        firsts, repeats, src = split_repeats(group)
        group = firsts + repeats
        d = len(firsts)
        if reused:  # copy the cached prefix into each row, prefill the rest after it
            for k, r in enumerate(firsts):
                load_prefix(self._cache, first + k, prefix[id(r)])
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
                r.prompt_logprobs = score_prompt(r.prompt, all_logits[k if k < d else src[k - d]],
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
        chosen = None
        if self.speculative:
            mtp_cache = self._cache[self._mtp_key].rows(first, first + len(group))
            chosen = first_drafts(self.model, group, logits, hidden, reused, mtp_cache, self.device)
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

    def _finish_unsampled(self, req: Request):
        """A request with max_tokens=0 ends at its prefill: one final event, its row freed."""
        req.finish_reason = "length"
        if req.text is not None:
            req.events.put(Event(None, "", finish_reason="length", prompt_tokens=len(req.prompt),
                                 prefill_s=req.prefill_s, prompt_logprobs=req.prompt_logprobs,
                                 cached_tokens=req.cached))
        self._retire(req)

    # ------------------------------------------------------------------ decode
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

    def _speculative_step(self):
        """One decode step of every active request with MTP drafts: feed [next, draft] per row,
        keep 1 or 2 tokens per request and draft again (`verify_and_redraft`), then accept the
        tokens one by one (a request may finish after the first)."""
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
        mtp_cache = self._cache[self._mtp_key].rows(0, A)
        new, accepted, lps, tops, n_new = verify_and_redraft(self.model, reqs, tokens, start, kv_len, logits, hidden,
                                                             mtp_cache, self.device)
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

    def _emit(self, reqs: list[Request], logits: torch.Tensor):
        """Sample the next token of each request from logits [A, V] (one host sync for the batch)."""
        for r, (token, lp, top) in zip(reqs, choose_tokens(reqs, logits)):
            self._accept(r, token, lp, top)

    # ------------------------------------------------------------------ accept and retire
    def _accept(self, req: Request, token: int, logprob: float, top):
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

    def _retire(self, req: Request):
        """Free req's cache row by moving the last active sequence into it (keeping the row's
        tokens in the prefix cache first: the tokens fed through the model; the last sampled one
        never was)."""
        i = self._active.index(req)
        if self.prefix_cache is not None:
            tokens = (req.prompt + req.generated)[:req.pos]
            self.prefix_cache.insert(tokens, row_prefix(self._cache, i, len(tokens)))
        free_row(self._active, self._cache, i)
