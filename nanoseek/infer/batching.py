"""The engine's row bookkeeping (engine.py): which pending requests prefill together, and how their
rows of the shared MLA latent cache (DeepSeek-V2 report section 2.1: per token and layer, the
normalized KV latent and the shared rope key) are filled, copied and freed.

- Requests with prompts of equal length and equal reused prefix prefill as one batch; within a
  batch, identical prompts (n samples of one prompt: RL groups, pass@k) are prefilled once and the
  repeats copy their source's row.
- A prompt's reused prefix (prefix_cache.py) is written into its row before the rest is prefilled.
- Rows stay packed: a finished request's row is freed by moving the last active row into it.

`cache` is the engine's dict of per-layer caches (`tensors`, `rows`, `copy_rows`, `move_row`);
requests are the engine's (request.py)."""

from __future__ import annotations

import torch


def prefill_groups(new: list, prefix_cache, speculative: bool) -> tuple[dict[tuple[int, int], list], dict[int, tuple]]:
    """Group new requests by (prompt length, reused prefix length), matching each prompt against
    the prefix cache (None: no reuse) on the way; sets each request's `cached`. Returns the groups
    and, by id(request), the reused positions' tensors [n_layers, cached, ...]."""
    prefix: dict[int, tuple] = {}  # id(request) -> its reused positions' tensors
    by_len: dict[tuple[int, int], list] = {}
    for req in new:
        if prefix_cache is not None and req.params.prompt_logprobs is None:
            # at most all but the last prompt token: its logits choose the first new token
            req.cached, data = prefix_cache.match(req.prompt, len(req.prompt) - 1)
            if req.cached and speculative:
                # the MTP entry of the last matched position was made with the token after it,
                # which this prompt need not share: that position is prefilled again
                req.cached -= 1
                data = tuple(d[:, :req.cached] for d in data)
            if req.cached:
                prefix[id(req)] = data
        by_len.setdefault((len(req.prompt), req.cached), []).append(req)
    return by_len, prefix


def split_repeats(group: list) -> tuple[list, list, list[int]]:
    """The distinct prompts of a prefill group (first occurrence each, in order), the repeats, and
    for each repeat the index of its source among the distinct ones."""
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
    return firsts, repeats, src


def load_prefix(cache: dict, row: int, data: tuple) -> None:
    """Write cached positions into a cache row: data per tensor kind [n_layers, P, ...]."""
    P = data[0].shape[1]
    for layer, c in enumerate(cache.values()):
        for t, d in zip(c.tensors, data):
            t[row, :P] = d[layer]


def row_prefix(cache: dict, row: int, n: int) -> tuple:
    """A row's first n positions, per tensor kind [n_layers, n, ...] (what the prefix cache keeps)."""
    layers = list(cache.values())
    kinds = len(layers[0].tensors)
    return tuple(torch.stack([c.tensors[j][row, :n] for c in layers]) for j in range(kinds))  # [n_layers, n, ...]


def free_row(active: list, cache: dict, i: int) -> None:
    """Free row i of the packed active rows: the last active request moves into it."""
    last = len(active) - 1
    if i != last:
        moved = active[last]
        for c in cache.values():
            c.move_row(last, i, moved.pos)
        moved.row = i
        active[i] = moved
    active.pop()
