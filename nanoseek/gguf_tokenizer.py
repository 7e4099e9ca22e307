"""GGUF tokenizer metadata <-> our `Tokenizer` (a Hugging Face `tokenizers` byte-level BPE), as
llama.cpp's gguf-py writes the keys (convert_hf_to_gguf.py `_set_vocab_gpt2`) and src/llama-vocab.cpp
reads them.

What llama.cpp's tokenizer.ggml.* keys hold, and what each becomes in a `tokenizers.Tokenizer`:
- `tokenizer.ggml.model` "gpt2": byte-level BPE (models.BPE with the ByteLevel decoder).
- `tokenizer.ggml.tokens` [n]: every token's text by id, byte-level encoded as in tokenizer.json's
  vocab (added tokens as their plain text); `token_type` [n] per id: NORMAL (the BPE vocab),
  CONTROL (special added tokens), USER_DEFINED (non-special added tokens), UNUSED (padding ids).
- `tokenizer.ggml.merges` ["a b", ...]: the BPE merges by rank.
- `tokenizer.ggml.pre`: the name of the pre-tokenizer (the split regex before the byte mapping);
  the names nanoseek knows are the keys of the pre-tokenizer table here.
- `tokenizer.ggml.bos_token_id` / `eos_token_id` / `padding_token_id`, `add_bos_token`: the
  special ids and whether BOS is prepended (a post-processor here; `Tokenizer.encode` adds BOS only
  when asked).
- `tokenizer.chat_template`: the Jinja chat template (our built-in DeepSeek format as
  `BUILTIN_CHAT_TEMPLATE` where the tokenizer has none).

The DeepSeek-V3 report (arXiv 2412.19437) section 4.1 describes its byte-level BPE and pre-tokenizer.
Every error names the file and the key (`GGUFError`).
"""

from __future__ import annotations

import json

import gguf
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from .infer.chat import ASSISTANT, USER
from .tokenizer import Tokenizer, TokenizerError

GPT2_PRE = "gpt-2"  # llama.cpp's name for the GPT-2 regex pre-tokenizer that train_bpe uses
DEEPSEEK3_PRE = "deepseek-v3"
# DeepSeek-V3's pre-tokenizer splits, as llama.cpp's llama-vocab.cpp spells them for "deepseek-v3"
DEEPSEEK3_SPLITS = (r"\p{N}{1,3}", "[一-龥\u3040-ゟ゠-ヿ]+",
                    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
                    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+")
# The built-in DeepSeek chat format of nanoseek.infer.chat as Jinja, for readers of the file (tool
# calls left out); reading a file that carries exactly this text gives back the built-in template.
BUILTIN_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages if m['role'] == 'system' %}{% if not loop.first %}\n\n{% endif %}"
    "{{ m['content'] }}{% endfor %}{% for m in messages %}{% if m['role'] == 'user' %}" + USER +
    "{{ m['content'] }}{% elif m['role'] == 'assistant' %}" + ASSISTANT +
    "{{ m['content'].split('</think>')[-1].lstrip() }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}")


class GGUFError(ValueError):
    """A GGUF file that cannot be written or read as asked; the message names the file and key or tensor."""


# ---------------------------------------------------------------------------- writing
def pre_tokenizer_name(tok: Tokenizer) -> str:
    """The llama.cpp tokenizer.ggml.pre name of the tokenizer's pre-tokenizer, else a GGUFError."""
    spec = json.loads(tok.tk.to_str()).get("pre_tokenizer") or {}
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True) and not spec.get("add_prefix_space"):
        return GPT2_PRE
    if spec.get("type") == "Sequence":
        parts = spec.get("pretokenizers") or []
        splits = tuple((p.get("pattern") or {}).get("Regex") for p in parts[:-1])
        if splits == DEEPSEEK3_SPLITS and parts[-1].get("type") == "ByteLevel" and not parts[-1].get("use_regex"):
            return DEEPSEEK3_PRE
    raise GGUFError(f"{tok.source}: pre_tokenizer {json.dumps(spec)[:200]} has no llama.cpp name "
                    f"(supported: ByteLevel with the GPT-2 regex as {GPT2_PRE!r}, DeepSeek-V3's as {DEEPSEEK3_PRE!r})")


def tokenizer_metadata(w: gguf.GGUFWriter, tok: Tokenizer, vocab_size: int) -> None:
    """Add the tokenizer.ggml.* keys and the chat template of `tok`, padded to `vocab_size` ids."""
    spec = json.loads(tok.tk.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFError(f"{tok.source}: only byte-level BPE tokenizers are written as tokenizer.ggml.model 'gpt2'")
    if tok.vocab_size > vocab_size:
        raise GGUFError(f"{tok.source}: the tokenizer has {tok.vocab_size} tokens, the model's vocab_size is {vocab_size}")
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    tokens, types = [], []
    for i in range(vocab_size):
        text = tok.tk.id_to_token(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer_name(tok))
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges(merges)
    if tok.bos_id is not None:
        w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    if tok.pad_id is not None:
        w.add_pad_token_id(tok.pad_id)
    adds_bos = tok.bos_id is not None and tok.tk.encode("a", add_special_tokens=True).ids[:1] == [tok.bos_id]
    w.add_add_bos_token(adds_bos)
    w.add_add_eos_token(False)
    w.add_chat_template(tok.chat_template or BUILTIN_CHAT_TEMPLATE)


# ---------------------------------------------------------------------------- reading
def read_tokenizer(f) -> Tokenizer:
    """The byte-level BPE tokenizer of the file's tokenizer.ggml.* keys, with its chat template.
    `f` is a GGUF metadata reader (nanoseek.gguf_file.GGUFModelFile: `f.get(key, default,
    required)` and `f.path`)."""
    kind = f.get("tokenizer.ggml.model", required=True)
    if kind != "gpt2":
        raise GGUFError(f"{f.path}: key 'tokenizer.ggml.model' is {kind!r}; nanoseek reads byte-level BPE ('gpt2')")
    tokens = f.get("tokenizer.ggml.tokens", required=True)
    types = f.get("tokenizer.ggml.token_type") or [int(gguf.TokenType.NORMAL)] * len(tokens)
    merges = f.get("tokenizer.ggml.merges", required=True)
    pre = f.get("tokenizer.ggml.pre", "default")
    if len(types) != len(tokens):
        raise GGUFError(f"{f.path}: key 'tokenizer.ggml.token_type' has {len(types)} entries for {len(tokens)} tokens")
    vocab = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k != gguf.TokenType.UNUSED}
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise GGUFError(f"{f.path}: key 'tokenizer.ggml.merges' has an entry {m!r} without a space")
        pairs.append((a, b))
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    if pre == GPT2_PRE:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre == DEEPSEEK3_PRE:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated") for r in DEEPSEEK3_SPLITS]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise GGUFError(f"{f.path}: key 'tokenizer.ggml.pre' is {pre!r}; nanoseek reads {GPT2_PRE!r} and {DEEPSEEK3_PRE!r}")
    tk.decoder = decoders.ByteLevel()
    specials = [tokenizers.AddedToken(tokens[i], special=True, normalized=False)
                for i, k in enumerate(types) if k == gguf.TokenType.CONTROL]
    users = [tokenizers.AddedToken(tokens[i], special=False, normalized=False)
             for i, k in enumerate(types) if k == gguf.TokenType.USER_DEFINED]
    tk.add_special_tokens(specials)
    tk.add_tokens(users)

    def token(key):
        i = f.get(key)
        if i is None:
            return None
        if not 0 <= i < len(tokens) or types[i] == gguf.TokenType.UNUSED:
            raise GGUFError(f"{f.path}: key '{key}' is {i}, not a token id")
        return tokens[i]

    bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
    if eos is None:
        raise GGUFError(f"{f.path}: missing key 'tokenizer.ggml.eos_token_id'")
    if bos is not None and f.get("tokenizer.ggml.add_bos_token", False):
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, vocab[bos])])
    template = f.get("tokenizer.chat_template")
    try:
        return Tokenizer(tk, bos_token=bos, eos_token=eos, pad_token=token("tokenizer.ggml.padding_token_id"),
                         chat_template=None if template == BUILTIN_CHAT_TEMPLATE else template, source=f.path)
    except TokenizerError as e:
        raise GGUFError(str(e)) from None
