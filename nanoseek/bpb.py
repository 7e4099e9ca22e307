"""Bits per byte of a language model on held-out text: the summed next-token negative
log-likelihood (nats) divided by ln 2 and by the text's UTF-8 bytes. Unlike perplexity it does not
depend on the tokenizer, so models with different vocabularies compare on one scale (the
DeepSeek-V3 report, section 4.4, reports Pile-test BPB for this reason).

The text is tokenized once and cut into windows of `context - 1` tokens; each window is scored
after a BOS token (when the tokenizer has one), so every token of the text is predicted exactly
once, from the start of its window. A jsonl file contributes its rows' "text" fields, one
document each.
"""

from __future__ import annotations

import json
import math
from typing import Callable

import torch
import torch.nn.functional as F


def read_documents(path: str, text_field: str = "text") -> list[str]:
    """A text file as one document, or a jsonl file's `text_field` of each row (file:line on error)."""
    if not path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            return [f.read()]
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise ValueError(f"{path}:{n}: missing string field {text_field!r}")
            docs.append(row[text_field])
    return docs


def windows(ids: list[int], length: int, bos_id: int | None) -> list[list[int]]:
    """The scored windows of a token sequence: `length` text tokens after BOS each (every token
    predicted), or without BOS `length + 1` tokens overlapping by one (the first is context)."""
    if bos_id is not None:
        return [[bos_id] + ids[s:s + length] for s in range(0, len(ids), length)]
    return [ids[s:s + length + 1] for s in range(0, max(len(ids) - 1, 0), length)]


@torch.no_grad()
def bits_per_byte(model, tokenizer, documents: list[str], context: int, batch: int = 8, device=None,
                  on_window: Callable[[int], None] | None = None) -> dict:
    """Bits per byte, nats per token, and the counts of bytes, tokens and windows of `documents`."""
    if context < 2:
        raise ValueError(f"bits per byte: the context must be at least 2 tokens, got {context}")
    device = device or model.lm_head.weight.device
    bos = getattr(tokenizer, "bos_id", None)
    work = []
    n_bytes = 0
    for doc in documents:
        n_bytes += len(doc.encode("utf-8"))
        work += windows(tokenizer.encode(doc), context - 1, bos)  # each window: at most `context` ids
    if n_bytes == 0 or not work:
        raise ValueError("bits per byte: the text is empty")
    work.sort(key=len)  # equal lengths batch together (no padding)
    nats, tokens = 0.0, 0
    model.eval()
    i = 0
    while i < len(work):
        length = len(work[i])
        group = [w for w in work[i:i + batch] if len(w) == length]
        ids = torch.tensor(group, device=device)  # [b, length]
        logits = model(ids[:, :-1]).float()  # [b, length - 1, V]
        nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")  # [b * (length - 1)]
        nats += nll.sum().item()
        tokens += nll.numel()
        i += len(group)
        if on_window is not None:
            on_window(len(group))
    return {"bits_per_byte": nats / (math.log(2) * n_bytes), "nats_per_token": nats / tokens,
            "bytes": n_bytes, "tokens": tokens, "windows": len(work)}
