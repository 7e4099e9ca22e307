"""GGUF tokenizer metadata <-> our `Tokenizer` (a Hugging Face `tokenizers` byte-level BPE), as
llama.cpp's gguf-py writes the keys (convert_hf_to_gguf.py `_set_vocab_gpt2`) and src/llama-vocab.cpp
reads them.

What llama.cpp's tokenizer.ggml.* keys hold, and what each becomes in a `tokenizers.Tokenizer`:
- `tokenizer.ggml.model` "gpt2": byte-level BPE (models.BPE with the ByteLevel decoder).
- `tokenizer.ggml.tokens` [n]: every token's text by id, byte-level encoded as in tokenizer.json's
  vocab (added tokens as their plain text); `token_type` [n] per id: NORMAL (the BPE vocab),
  CONTROL (special added tokens), USER_DEFINED (non-special added tokens), UNUSED (padding ids).
  llama.cpp splits the text on CONTROL and USER_DEFINED tokens before the pre-tokenizer, as
  `tokenizers` does on its added tokens.
- `tokenizer.ggml.merges` ["a b", ...]: the BPE merges by rank.
- `tokenizer.ggml.pre`: the name of the pre-tokenizer, the split regexes before the byte mapping
  (`PRE_TOKENIZERS`, each regex as llama-vocab.cpp spells it): GPT-2's ('gpt-2'), DeepSeek-V3's
  ('deepseek-v3'), Qwen2's for Qwen2.5 / Qwen3 and the R1 distills on them ('qwen2',
  'deepseek-r1-qwen'), Llama 3's ('llama-bpe', with llama.cpp's aliases), for which llama.cpp takes a
  pre-token found whole in the vocabulary without merging (`ignore_merges`, as Meta's
  tokenizer.json says) and adds BOS unless the file says otherwise. llama.cpp applies no normalizer:
  Qwen2's tokenizer.json NFC-normalizes first, the GGUF (and so the reader here) does not.
- `tokenizer.ggml.bos_token_id` / `eos_token_id` / `padding_token_id`, `add_bos_token`: the
  special ids and whether BOS is prepended (a post-processor here; `Tokenizer.encode` adds BOS only
  when asked).
- `tokenizer.chat_template`: the Jinja chat template (our built-in DeepSeek format as
  `BUILTIN_CHAT_TEMPLATE` where the tokenizer has none).

On writing, a tokenizer.json pre-tokenizer is named by its regexes, the released files' spelling
(`(?i:'s|...)`) or llama.cpp's (`(?:'[sS]|...)`). The DeepSeek-V3 report (arXiv 2412.19437)
section 4.1 describes its byte-level BPE and pre-tokenizer; the R1 distills (arXiv 2501.12948,
section 2.4) keep their base models' tokenizers. Every error names the file and the key (`GGUFError`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import gguf
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from .tokenizer import ASSISTANT, USER, Tokenizer, TokenizerError

GPT2_PRE = "gpt-2"  # llama.cpp's name for the GPT-2 regex pre-tokenizer that train_bpe uses
DEEPSEEK3_PRE = "deepseek-v3"
QWEN2_PRE = "qwen2"
LLAMA3_PRE = "llama-bpe"
# DeepSeek-V3's pre-tokenizer splits, as llama.cpp's llama-vocab.cpp spells them for "deepseek-v3"
DEEPSEEK3_SPLITS = (r"\p{N}{1,3}", "[一-龥\u3040-ゟ゠-ヿ]+",
                    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
                    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+")
# Qwen2's and Llama 3's single split, as llama-vocab.cpp spells them (LLAMA_VOCAB_PRE_TYPE_QWEN2,
# _LLAMA3): English contractions, letters with one leading non-letter, digits one (Qwen2) or up
# to three (Llama 3) at a time, punctuation runs, newlines, other whitespace
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_HF_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"  # the released tokenizer.json files' spelling
_QWEN2_REST = r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_REST = r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLITS = (_CONTRACTIONS + _QWEN2_REST,)
LLAMA3_SPLITS = (_CONTRACTIONS + _LLAMA3_REST,)
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


@dataclass(frozen=True)
class PreTokenizer:
    """What llama.cpp does for one tokenizer.ggml.pre name: the split regexes in order (empty for
    GPT-2's, which is ByteLevel's own regex), whether a pre-token found whole in the vocabulary is
    taken without merging, and whether BOS is added where the file has no add_bos_token key."""
    splits: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


_QWEN2 = PreTokenizer(QWEN2_SPLITS)
_LLAMA3 = PreTokenizer(LLAMA3_SPLITS, ignore_merges=True, add_bos=True)
PRE_TOKENIZERS = {  # tokenizer.ggml.pre -> llama.cpp's behaviour (src/llama-vocab.cpp)
    GPT2_PRE: PreTokenizer(()),
    DEEPSEEK3_PRE: PreTokenizer(DEEPSEEK3_SPLITS),
    QWEN2_PRE: _QWEN2,
    "deepseek-r1-qwen": _QWEN2,  # the converter's name for the R1-Distill-Qwen vocabulary
    LLAMA3_PRE: _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
}
# a tokenizer.json's split regexes (either spelling) -> the name written for them
_NAMES = {DEEPSEEK3_SPLITS: DEEPSEEK3_PRE, QWEN2_SPLITS: QWEN2_PRE, LLAMA3_SPLITS: LLAMA3_PRE,
          (_HF_CONTRACTIONS + _QWEN2_REST,): QWEN2_PRE, (_HF_CONTRACTIONS + _LLAMA3_REST,): LLAMA3_PRE}


# ---------------------------------------------------------------------------- writing
def pre_tokenizer_name(tok: Tokenizer) -> str:
    """The llama.cpp tokenizer.ggml.pre name of the tokenizer's pre-tokenizer, else a GGUFError."""
    spec = json.loads(tok.tk.to_str()).get("pre_tokenizer") or {}
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True) and not spec.get("add_prefix_space"):
        return GPT2_PRE
    if spec.get("type") == "Sequence":
        parts = spec.get("pretokenizers") or []
        splits = parts[:-1]
        regexes = tuple((p.get("pattern") or {}).get("Regex") for p in splits)
        isolated = all(p.get("type") == "Split" and p.get("behavior") == "Isolated" and not p.get("invert")
                       for p in splits)
        last = parts[-1] if parts else {}
        if (isolated and regexes in _NAMES and last.get("type") == "ByteLevel" and not last.get("use_regex")
                and not last.get("add_prefix_space")):
            return _NAMES[regexes]
    raise GGUFError(f"{tok.source}: pre_tokenizer {json.dumps(spec)[:200]} has no llama.cpp name "
                    f"(supported: ByteLevel with the GPT-2 regex as {GPT2_PRE!r}; then, the splits of "
                    f"DeepSeek-V3 as {DEEPSEEK3_PRE!r}, Qwen2 as {QWEN2_PRE!r}, Llama 3 as {LLAMA3_PRE!r})")


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
def _pre_tokenizer(pre: PreTokenizer) -> pre_tokenizers.PreTokenizer:
    """The `tokenizers` pre-tokenizer of a llama.cpp one: its splits (each match its own piece),
    then the byte mapping."""
    if not pre.splits:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated") for r in pre.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def read_tokenizer(f) -> Tokenizer:
    """The byte-level BPE tokenizer of the file's tokenizer.ggml.* keys, with its chat template.
    `f` is a GGUF metadata reader (nanoseek.gguf_file.GGUFModelFile: `f.get(key, default,
    required)` and `f.path`)."""
    kind = f.get("tokenizer.ggml.model", required=True)
    if kind != "gpt2":
        raise GGUFError(f"{f.path}: key 'tokenizer.ggml.model' is {kind!r}; nanoseek reads byte-level BPE ('gpt2')")
    pre_name = f.get("tokenizer.ggml.pre", "default")
    pre = PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise GGUFError(f"{f.path}: key 'tokenizer.ggml.pre' is {pre_name!r}; nanoseek reads "
                        f"{', '.join(map(repr, PRE_TOKENIZERS))}")
    tokens = f.get("tokenizer.ggml.tokens", required=True)
    types = f.get("tokenizer.ggml.token_type") or [int(gguf.TokenType.NORMAL)] * len(tokens)
    merges = f.get("tokenizer.ggml.merges", required=True)
    if len(types) != len(tokens):
        raise GGUFError(f"{f.path}: key 'tokenizer.ggml.token_type' has {len(types)} entries for {len(tokens)} tokens")
    vocab = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k != gguf.TokenType.UNUSED}
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise GGUFError(f"{f.path}: key 'tokenizer.ggml.merges' has an entry {m!r} without a space")
        pairs.append((a, b))
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre.ignore_merges))
    tk.pre_tokenizer = _pre_tokenizer(pre)
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
    if bos is not None and f.get("tokenizer.ggml.add_bos_token", pre.add_bos):
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, vocab[bos])])
    template = f.get("tokenizer.chat_template")
    try:
        return Tokenizer(tk, bos_token=bos, eos_token=eos, pad_token=token("tokenizer.ggml.padding_token_id"),
                         chat_template=None if template == BUILTIN_CHAT_TEMPLATE else template, source=f.path)
    except TokenizerError as e:
        raise GGUFError(str(e)) from None
