"""The served models: each model of the local store is loaded on its first request and keeps one
`Engine` (continuous batching: concurrent requests decode together); Ollama's `keep_alive` sets
how long an idle model stays loaded (0 unloads it at once, negative keeps it forever). With
`speculative`, a model with MTP layers decodes with MTP drafts (engine.py; the same greedy output);
a model without them decodes plainly.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from ..infer.chat import can_think
from ..infer.engine import Engine, supports_speculative
from ..load import load_model
from ..infer.store import InvalidName, canonical_name
from ..tokenizer import Tokenizer
from .protocol import MISSING, APIError, bad, request_id, short

log = logging.getLogger("nanoseek.serve")

MAX_KEEP_ALIVE_S = 100 * 365 * 86400  # a longer keep_alive is forever (and a time a clock can hold)


@dataclass
class LoadedModel:
    name: str
    path: str
    manifest: dict
    model: object
    tokenizer: object
    engine: Engine
    context_length: int
    can_think: bool
    device: str
    size: int  # bytes of parameters
    loaded_at: float
    load_s: float
    expires_at: float | None = None  # wall-clock time to unload at when idle; None: stay loaded
    active: int = 0  # requests using it now


class ModelManager:
    """Loads store models on first use and keeps one Engine per model."""

    def __init__(self, store, context_length: int = 4096, max_batch: int = 16, device: str | None = None,
                 dtype=None, prefix_cache_tokens: int = 0, speculative: bool = False):
        self.store = store
        self.speculative = bool(speculative)
        self.prefix_cache_tokens = int(prefix_cache_tokens)
        self.context_length = int(context_length)
        self.max_batch = int(max_batch)
        self.device = device
        self.dtype = dtype
        self._loaded: dict[str, LoadedModel] = {}
        self._load_locks: dict[str, threading.Lock] = {}  # one load at a time per model
        self._lock = threading.Lock()

    def resolve(self, name, param: str = "model") -> str:
        """A request's model name as the store's canonical `name:tag`; 400 for a malformed name,
        404 for one the store lacks."""
        if name is None or name == "":
            raise bad(param, "is required (a model name from the store, e.g. the NAME column of `nanoseek list`)")
        if not isinstance(name, str):
            raise bad(param, f"expected a string, got {short(name)}")
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
            lock = self._load_locks.setdefault(name, threading.Lock())
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

    def release(self, lm: LoadedModel, keep_alive: float | None | object = MISSING) -> None:
        """A request is done with `lm`; `keep_alive` (seconds, None: forever) when it sent one."""
        with self._lock:
            lm.active -= 1
            if keep_alive is not MISSING:
                forever = keep_alive is None or not keep_alive <= MAX_KEEP_ALIVE_S  # NaN, inf, centuries
                lm.expires_at = None if forever else time.time() + keep_alive
        if keep_alive == 0:
            self.reap()

    def _load(self, name: str) -> LoadedModel:
        path = self.store.path_of(name)
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        t0 = time.perf_counter()
        model = load_model(path, dtype=self.dtype, device=device).eval()  # DeepSeek-V2/V3 or dense
        tok = Tokenizer.from_dir(path)
        manifest = self.store.manifest(name)
        template = manifest.get("defaults", {}).get("template")
        if template:  # a Modelfile's TEMPLATE replaces the checkpoint's chat template
            tok.chat_template = template
        ctx = min(self.context_length, model.config.max_position_embeddings)
        speculative = self.speculative and supports_speculative(model)
        if self.speculative and not speculative:
            log.info("[%s] %s has no MTP layers: it decodes without speculative drafts", request_id.get(), name)
        engine = Engine(model, tok, max_context=ctx, max_batch=self.max_batch,
                        prefix_cache_tokens=self.prefix_cache_tokens, speculative=speculative)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        lm = LoadedModel(name, path, manifest, model, tok, engine, ctx, can_think(tok), str(device),
                         size, time.time(), time.perf_counter() - t0)
        log.info("[%s] loaded %s from %s in %.2f s (%s, context %d)", request_id.get(), name, path, lm.load_s,
                 device, ctx)
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
        log.info("[%s] unloaded %s", request_id.get(), name)
        return True

    def reap(self) -> None:
        """Unload the idle models whose keep_alive has run out."""
        now = time.time()
        with self._lock:
            expired = [n for n, lm in self._loaded.items()
                       if lm.active == 0 and lm.expires_at is not None and lm.expires_at <= now]
        for n in expired:
            self.unload(n)

    def close(self) -> None:
        for n in list(self._loaded):
            self.unload(n)
