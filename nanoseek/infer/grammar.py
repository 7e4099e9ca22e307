"""Grammar-constrained decoding: a request's output held to a JSON schema (structured output, forced
tool calls) by masking, at every step, the tokens that cannot continue a valid output.

The grammar engine is llguidance (MIT, a Rust Earley parser with a lexer over the whole token trie,
github.com/guidance-ai/llguidance). Chosen over xgrammar and outlines-core because:
- it ships one abi3 CPU wheel (every CPython >= 3.9 on x86-64 Linux) with no dependencies, where
  xgrammar pulls in torch, transformers and triton and outlines-core has a wheel per Python version;
- it reads our byte-level BPE directly from the `tokenizers` JSON (`Tokenizer.tk.to_str()`), with no
  `transformers` tokenizer object;
- it is a context-free grammar engine, so "any JSON object" (nested to any depth) and a tool call
  wrapped in special tokens are exact grammars; outlines-core compiles a schema to a regular
  expression and builds an index over the whole vocabulary for each schema before the first token;
- masks are computed lazily per step, from a tokenizer trie built once per tokenizer.
The torch side is plain PyTorch (the library's own torch helper is `torch.compile`d at import).

`Constraint` is the per-request logits processor the engine's sampler calls: `mask(logits_row)`
before sampling (tokens the grammar forbids get -inf; EOS only once the grammar is complete) and
`accept(token)` after. JSON is compact (no free whitespace), so a random-weight model cannot wander
in whitespace forever.
"""

from __future__ import annotations

import json
import threading

import llguidance
import torch

from .chat import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP

JSON_OPTIONS = {"whitespace_flexible": False}  # "," and ":" separators, no whitespace between tokens


class GrammarError(ValueError):
    """A schema or grammar the grammar engine refuses (the server answers 400 naming the field)."""


_tokenizers: dict[tuple, llguidance.LLTokenizer] = {}
_lock = threading.Lock()


def grammar_tokenizer(tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """The grammar engine's view of `tokenizer` (a nanoseek Tokenizer over a `tokenizers` model)
    with the model's vocabulary size (rows past the tokenizer's are never allowed); built once per
    tokenizer and size (about a second for a 128K vocabulary)."""
    key = (id(tokenizer.tk), vocab_size, tokenizer.eos_id)
    with _lock:
        if key not in _tokenizers:
            _tokenizers[key] = llguidance.LLTokenizer(tokenizer.tk.to_str(), n_vocab=vocab_size,
                                                      eos_token=tokenizer.eos_id)
        return _tokenizers[key]


def json_schema_grammar(schema: dict | bool) -> str:
    """A grammar accepting exactly the compact JSON texts that validate against `schema`."""
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"invalid JSON schema: {e}") from None


def json_object_grammar() -> str:
    """Any JSON object (OpenAI's json_object mode, Ollama's format "json")."""
    return json_schema_grammar({"type": "object"})


def lark_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def lark_grammar(lark: str) -> str:
    try:
        return llguidance.LLMatcher.grammar_from_lark(lark)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"invalid grammar: {e}") from None


def _piece(tokenizer, marker: str) -> str:
    """A marker in a Lark rule: the special token itself when the vocabulary has it as one token,
    else its text."""
    i = tokenizer.token_to_id(marker)
    return f"<[{i}]>" if i is not None else lark_literal(marker)


def _json_rule(schema: dict) -> str:
    schema = dict(schema or {"type": "object"})
    schema["x-guidance"] = {**schema.get("x-guidance", {}), **JSON_OPTIONS}
    return "%json " + json.dumps(schema, ensure_ascii=False)


def tool_call_grammar(tokenizer, functions: list[tuple[str, dict]], hermes: bool = False) -> str:
    """A grammar for one tool call to one of `functions` [(name, parameter schema)], its arguments
    valid against that function's schema: DeepSeek-V3's tool-call tokens (chat.py), or with
    `hermes` <tool_call>{"name": ..., "arguments": ...}</tool_call>."""
    rules, alts = [], []
    for k, (name, schema) in enumerate(functions):
        rules.append(f"args{k}: {_json_rule(schema)}")
        if hermes:
            alts.append(lark_literal('{"name":' + json.dumps(name, ensure_ascii=False) + ',"arguments":')
                        + f" args{k} " + lark_literal("}"))
        else:
            alts.append(lark_literal(name + "\n```json\n") + f" args{k} " + lark_literal("\n```"))
    if hermes:
        start = f'start: {lark_literal("<tool_call>")} ({" | ".join(alts)}) {lark_literal("</tool_call>")}'
    else:
        start = (f"start: {_piece(tokenizer, TOOL_CALLS_BEGIN)} {_piece(tokenizer, TOOL_CALL_BEGIN)} "
                 f'{lark_literal("function")} {_piece(tokenizer, TOOL_SEP)} ({" | ".join(alts)}) '
                 f"{_piece(tokenizer, TOOL_CALL_END)} {_piece(tokenizer, TOOL_CALLS_END)}")
    return lark_grammar("\n".join([start] + rules))


def check_grammar(grammar: str, tok: llguidance.LLTokenizer) -> None:
    """Raise GrammarError when the grammar engine cannot compile `grammar` (e.g. a bad schema)."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tok)
    if is_error:
        raise GrammarError(messages[0] if messages else "invalid grammar")


def unpack_bitmask(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """words [W] int32, bit j of word i set when token 32*i+j is allowed -> allowed [vocab_size] bool."""
    bits = torch.arange(32, dtype=torch.int32)
    allowed = (words[:, None] >> bits) & 1  # [W, 32]
    return allowed.reshape(-1)[:vocab_size].bool()


class Constraint:
    """One request's grammar state: the sampler masks its logits row, then advances it with the
    accepted token. A fresh Constraint per request (n choices: one each)."""

    def __init__(self, grammar: str, tok: llguidance.LLTokenizer):
        self.tok = tok
        self.matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        self.vocab_size = tok.vocab_size
        self.eos_id = tok.eos_token

    def allowed(self) -> torch.Tensor:
        """The tokens the grammar allows next [vocab_size] bool (EOS only when complete)."""
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)  # [W]
        allowed = unpack_bitmask(words, self.vocab_size)
        if not allowed.any():  # an error state allows nothing: end the request rather than fail it
            allowed[self.eos_id] = True
        return allowed

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] -> the same with -inf at every token the grammar forbids [V]."""
        allowed = self.allowed().to(logits.device)  # [V']
        V = logits.shape[-1]
        keep = torch.zeros(V, dtype=torch.bool, device=logits.device)
        n = min(V, allowed.shape[0])
        keep[:n] = allowed[:n]
        return logits.masked_fill(~keep, float("-inf"))

    def accept(self, token: int) -> None:
        """Advance past the sampled token (always one the mask allowed)."""
        self.matcher.consume_token(int(token))

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped() or self.matcher.is_accepting()
