"""Prefix cache: the MLA latent cache of finished requests, kept by token ids so that a later prompt
sharing a prefix with one of them (a chat's earlier turns, a shared system prompt) copies those
positions instead of prefilling them again.

What is kept per token is exactly what the engine's decode cache holds (DeepSeek-V2 report section
2.1: the normalized KV latent and the post-RoPE shared key, kv_lora_rank + qk_rope_head_dim values
per layer; a dense model's cache tensors likewise), so a copied prefix is indistinguishable from a
prefilled one up to floating-point rounding.

Layout (the block trie of vLLM's automatic prefix caching, SGLang's radix cache in blocks):
- Token ids are cut into blocks of `block_size`; a node holds one block (the last block of a
  sequence may be shorter) and its cache tensors, and its children are keyed by their block's
  tokens, so a prompt walks the trie block by block from the root.
- The walk ends with a partial match: among the children of the last full match, the one sharing
  the longest run of leading tokens with the rest of the prompt gives those positions too, so reuse
  is exact to the token, not rounded down to a block.
- Least recently used nodes are evicted while the kept tokens exceed `max_tokens`. A lookup or an
  insert touches its path from the leaf up to the root, so every node is more recent than all of its
  descendants and the least recent node is always a leaf: eviction never orphans a subtree.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class _Node:
    tokens: tuple[int, ...]
    # per cache tensor kind (latent, rope key): [n_layers, len(tokens), ...]
    data: tuple[torch.Tensor, ...]
    parent: "_Node | None"
    children: dict[tuple[int, ...], "_Node"] = field(default_factory=dict)


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """Cache tensors of token sequences, reusable by any prompt that starts with the same tokens.

    `insert(tokens, rows)` keeps `rows` (per layer, per tensor kind: [len(tokens), ...]) for
    `tokens`; `match(prompt, limit)` returns how many leading prompt tokens are cached (at most
    `limit`) and their tensors; `hits` / `hit_tokens` count the lookups that reused something."""

    def __init__(self, max_tokens: int, block_size: int = 16):
        if max_tokens < 0 or block_size < 1:
            raise ValueError(f"prefix cache: max_tokens must be >= 0 and block_size >= 1, got {max_tokens}, {block_size}")
        self.max_tokens, self.block_size = int(max_tokens), int(block_size)
        self.root = _Node((), (), None)
        self._lru: OrderedDict[int, _Node] = OrderedDict()  # id(node) -> node, least recent first
        self.tokens = 0  # tokens held, summed over nodes
        self.lookups = self.hits = self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._lru)

    def _touch(self, path: list[_Node]) -> None:
        """Mark a root-to-leaf path used: leaf first, so each node ends more recent than its children."""
        for node in reversed(path):
            self._lru.move_to_end(id(node))

    def match(self, prompt: list[int], limit: int) -> tuple[int, tuple[torch.Tensor, ...] | None]:
        """(n, tensors): the first n <= limit prompt tokens are cached; tensors per kind
        [n_layers, n, ...] (None when n == 0)."""
        self.lookups += 1
        bs, node, path, n = self.block_size, self.root, [], 0
        limit = min(limit, len(prompt))
        while n + bs <= limit:
            child = node.children.get(tuple(prompt[n:n + bs]))
            if child is None:
                break
            node, n = child, n + bs
            path.append(node)
        rest = prompt[n:min(n + bs, limit)]
        best, best_len = None, 0
        for child in node.children.values():  # a partial block: the longest run of leading tokens
            k = _common_prefix(child.tokens, rest)
            if k > best_len:
                best, best_len = child, k
        if best is not None:
            path.append(best)
        n_total = n + best_len
        if n_total == 0:
            return 0, None
        self._touch(path)
        self.hits += 1
        self.hit_tokens += n_total
        kinds = len(path[0].data)
        data = tuple(torch.cat([nd.data[j] for nd in path], dim=1)[:, :n_total] for j in range(kinds))
        return n_total, data

    def insert(self, tokens: list[int], rows: tuple[torch.Tensor, ...]) -> None:
        """Keep `tokens` and their cache tensors rows (per kind [n_layers, len(tokens), ...]);
        blocks already held are only touched. Evicts down to the budget afterwards."""
        if self.max_tokens == 0 or not tokens:
            return
        bs, node, path = self.block_size, self.root, []
        for a in range(0, len(tokens), bs):
            block = tuple(tokens[a:a + bs])
            child = node.children.get(block)
            if child is None:
                if len(block) < bs and any(k[:len(block)] == block for k in node.children):
                    break  # a trailing partial block another child already covers
                child = _Node(block, tuple(t[:, a:a + len(block)].clone() for t in rows), node)
                node.children[block] = child
                self._lru[id(child)] = child
                self.tokens += len(block)
                for key in [k for k in node.children if len(k) < len(block) and block[:len(k)] == k]:
                    shorter = node.children[key]  # a sequence's end this block now covers (a leaf)
                    self._lru.pop(id(shorter))
                    self._drop(shorter)
            node = child
            path.append(node)
        self._touch(path)
        self._evict()

    def _evict(self) -> None:
        while self.tokens > self.max_tokens and self._lru:
            _, node = self._lru.popitem(last=False)
            self._drop(node)

    def _drop(self, node: _Node) -> None:
        """Remove a node (a leaf, by the recency order; any children go with it)."""
        for child in list(node.children.values()):
            self._lru.pop(id(child), None)
            self._drop(child)
        del node.parent.children[node.tokens]
        self.tokens -= len(node.tokens)

    def clear(self) -> None:
        self.root = _Node((), (), None)
        self._lru.clear()
        self.tokens = 0
