"""Text of a generated token stream: incremental detokenization and stop strings, one `TextStream`
per request, so the inference engine itself schedules token ids and log-probs only (the boundary
of vLLM v1's detokenizer / `check_stop_strings` and nanochat's engine).

- Incremental detokenization: each new token is decoded with a few tokens of context before it,
  so the cost per token stays constant, and an incomplete UTF-8 character is held back until the
  token that completes it arrives (or the stream ends).
- Stop strings apply to the text: the stream is cut before the earliest stop string, and text that
  may be the start of one is held back until it is decided.
"""

from __future__ import annotations

DETOKENIZE_CONTEXT = 4  # tokens decoded again before the newest ones (merges across token boundaries)


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (0 if none): the part
    of a stream that may still turn into `tag` once more text comes."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class TextStream:
    """Token ids in, text deltas out. `push(token_id, final)` feeds one generated token (None: no
    new token, e.g. the EOS that ends the stream) and returns (delta, stopped): the text that is
    now certain, and whether a stop string ended the stream. The concatenated deltas are the
    generated text cut before the earliest stop string."""

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.token_ids: list[int] = []
        self.decoded = ""  # text of token_ids[:read_offset] (complete characters only)
        self.emitted = ""  # the deltas handed out so far
        self.prefix_offset = 0
        self.read_offset = 0

    def _detokenize(self, final: bool) -> str:
        ids = self.token_ids
        prefix = self.tokenizer.decode(ids[self.prefix_offset:self.read_offset])
        new = self.tokenizer.decode(ids[self.prefix_offset:])
        if len(new) > len(prefix) and (final or not new.endswith("\ufffd")):
            self.decoded += new[len(prefix):]
            self.prefix_offset, self.read_offset = max(self.read_offset - DETOKENIZE_CONTEXT, 0), len(ids)
        return self.decoded

    def push(self, token_id: int | None, final: bool = False) -> tuple[str, bool]:
        """Feed one token; `final`: the stream ends here whatever the text says (EOS, length)."""
        if token_id is not None:
            self.token_ids.append(token_id)
        text = self._detokenize(final)
        end = len(text)
        stopped = False
        for s in self.stop:  # cut at the earliest stop string
            k = text.find(s, max(0, len(self.emitted) - len(s)))
            if k >= 0:
                end, stopped = min(end, k), True
        if not stopped and not final:  # hold back text that may be the start of a stop string
            for s in self.stop:
                room = end - len(self.emitted)  # text not handed out yet
                if room > 0:
                    end -= partial_suffix(text[:end], s[:room + 1])
        delta = text[len(self.emitted):end] if end > len(self.emitted) else ""
        self.emitted += delta
        return delta, stopped
