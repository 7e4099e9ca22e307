"""Embeddings: Ollama's `/api/embed` (and the legacy `/api/embeddings`) and OpenAI's `/v1/embeddings`.

An input's embedding is the mean over its tokens of the model's final-normed hidden states (the
output of the last RMSNorm, before the LM head), L2-normalized; `dimensions` keeps the first d
components and normalizes again. Mean pooling, because a causal decoder's last token sees the
whole text but its state is shaped for predicting the next token; the mean weighs every token.

    POST /api/embed        model, input (string or strings), truncate (true), dimensions, keep_alive
                           -> embeddings [[...]], prompt_eval_count, durations
    POST /api/embeddings   model, prompt -> embedding [...]
    POST /v1/embeddings    model, input (string, strings, token ids, lists of token ids),
                           encoding_format (float | base64), dimensions -> data [{embedding}], usage
"""

from __future__ import annotations

import base64
import time
from typing import Any

import torch
from fastapi import APIRouter, Request
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from .protocol import MISSING, APIError, Body, Bool, Int, Str, bad, json_response, parse_duration, parse_json_body
from .protocol import short, validate

router = APIRouter()

MAX_INPUTS = 256


class EmbedRequest(Body):
    model: Any = None
    input: Any = None
    prompt: Str | None = None  # /api/embeddings
    truncate: Bool | None = None
    dimensions: Int | None = Field(None, ge=1)
    keep_alive: Any = None
    options: Any = None
    encoding_format: Str | None = None


@torch.inference_mode()
def pooled_embeddings(model, prompts: list[list[int]], dimensions: int | None = None) -> torch.Tensor:
    """One L2-normalized mean-pooled embedding per prompt: [N, hidden] (or [N, dimensions]) float32.
    Each prompt runs alone (no padding), so an embedding does not depend on its batch."""
    device = next(model.parameters()).device
    out = []
    for ids in prompts:
        _, hidden = model(torch.tensor([ids], device=device), return_hidden=True)  # [1, T, h]
        out.append(hidden[0].float().mean(dim=0))  # [h]
    emb = torch.stack(out)  # [N, h]
    if dimensions is not None:
        emb = emb[:, :dimensions]
    return torch.nn.functional.normalize(emb, dim=-1)


def _texts(value, param: str, openai: bool) -> list:
    """The inputs as a list of strings (or token-id lists, OpenAI)."""
    if isinstance(value, str):
        return [value]
    if openai and isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool)
                                                             for t in value):
        return [value]
    if isinstance(value, list) and value:
        ok = all(isinstance(v, str) or (openai and isinstance(v, list) and v and all(
            isinstance(t, int) and not isinstance(t, bool) for t in v)) for v in value)
        if ok:
            if len(value) > MAX_INPUTS:
                raise bad(param, f"at most {MAX_INPUTS} inputs per request, got {len(value)}")
            return list(value)
    what = "a string, an array of strings, or token ids" if openai else "a string or an array of strings"
    raise bad(param, f"expected {what}, got {short(value)}")


def _encode(lm, inputs: list, truncate: bool, param: str) -> list[list[int]]:
    vocab, ctx = lm.model.config.vocab_size, lm.context_length
    prompts = []
    for i, x in enumerate(inputs):
        ids = lm.tokenizer.encode(x) if isinstance(x, str) else list(x)
        name = f"{param}[{i}]" if len(inputs) > 1 else param
        if not ids:
            raise bad(name, "is empty: nothing to embed")
        if any(not 0 <= t < vocab for t in ids):
            raise bad(name, "token id outside the vocabulary")
        if len(ids) > ctx:
            if not truncate:
                raise APIError(400, f"{name}: input of {len(ids)} tokens exceeds the context length of {ctx}",
                               param=name, code="context_length_exceeded")
            ids = ids[:ctx]
        prompts.append(ids)
    return prompts


async def _embed(request: Request, openai: bool, legacy: bool = False):
    app = request.app.state.nanoseek
    t0 = time.perf_counter()
    body = validate(EmbedRequest, parse_json_body(await request.body()))
    name = body.model
    cname = app.models.resolve(name)
    if legacy:
        if body.prompt is None:
            raise bad("prompt", "is required")
        inputs = [body.prompt]
    else:
        if body.input is None:
            raise bad("input", "is required")
        inputs = _texts(body.input, "input", openai)
    fmt = body.encoding_format or "float"
    if fmt not in ("float", "base64"):
        raise bad("encoding_format", f"expected float or base64, got {fmt!r}")
    keep = MISSING if body.keep_alive is None else parse_duration(body.keep_alive)
    lm, load_s = await run_in_threadpool(app.models.acquire, cname)
    try:
        hidden = lm.model.config.hidden_size
        if body.dimensions is not None and body.dimensions > hidden:
            raise bad("dimensions", f"at most the model's hidden size {hidden}, got {body.dimensions}")
        prompts = _encode(lm, inputs, body.truncate is not False, "prompt" if legacy else "input")
        emb = await run_in_threadpool(pooled_embeddings, lm.model, prompts, body.dimensions)
    finally:
        await run_in_threadpool(app.models.release, lm, keep)
    n_tokens = sum(len(p) for p in prompts)
    if openai:
        def encoded(v: torch.Tensor):
            if fmt == "base64":  # little-endian float32, as OpenAI sends it
                return base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii")
            return v.tolist()
        data = [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(emb)]
        return json_response({"object": "list", "data": data, "model": name,
                              "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})
    if legacy:
        return json_response({"embedding": emb[0].tolist()}, ollama=True)
    return json_response({"model": name, "embeddings": emb.tolist(),
                          "total_duration": int((time.perf_counter() - t0) * 1e9),
                          "load_duration": int(load_s * 1e9), "prompt_eval_count": n_tokens}, ollama=True)


@router.post("/api/embed")
async def embed(request: Request):
    return await _embed(request, openai=False)


@router.post("/api/embeddings")
async def embeddings_legacy(request: Request):
    return await _embed(request, openai=False, legacy=True)


@router.post("/v1/embeddings")
async def embeddings(request: Request):
    return await _embed(request, openai=True)
