"""Tokenizer: a thin wrapper over a Hugging Face `tokenizers.Tokenizer`, plus byte-level BPE training.

- `Tokenizer.from_dir(d)` loads any Hugging Face `tokenizer.json` (DeepSeek-V3's 128K byte-level BPE
  included), with `tokenizer_config.json` when present for the BOS/EOS/PAD names and chat template.
- `Tokenizer.save(d)` writes `tokenizer.json` + `tokenizer_config.json` (readable by transformers'
  `PreTrainedTokenizerFast`), each atomically (temp file + rename; the config last).
- `train_bpe(texts, vocab_size)` trains a byte-level BPE (ByteLevel pre-tokenizer and decoder, so
  `decode(encode(s)) == s` for every string) with DeepSeek's special tokens at ids 0..8, BOS = 0 and
  EOS = 1 as in DeepSeek-V3's config. Training is deterministic for the same input.

`encode` never adds special tokens unless asked (`add_bos`, `add_eos`), whatever the loaded file's
post-processor says. Special-token strings that occur literally in the text (e.g. "<think>") are
encoded as those special tokens, as Hugging Face tokenizers do.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from .io import atomic_write_text

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜pad▁of▁sentence｜>"
USER = "<｜User｜>"  # the chat role markers (infer/chat.py, gguf_tokenizer.py's template)
ASSISTANT = "<｜Assistant｜>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT, "<think>", "</think>", "<answer>", "</answer>"]
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
DEFAULT_MODEL_MAX_LENGTH = 131072  # DeepSeek-V3's tokenizer_config.json


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used as asked; the message names the file and field."""


def _token_content(value) -> str | None:
    """A special token in tokenizer_config.json: a string, an AddedToken dict, or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class Tokenizer:
    """A `tokenizers.Tokenizer` with its BOS/EOS/PAD ids and optional chat template."""

    def __init__(self, tk: tokenizers.Tokenizer, bos_token: str | None = BOS, eos_token: str | None = EOS,
                 pad_token: str | None = None, chat_template: str | None = None,
                 model_max_length: int = DEFAULT_MODEL_MAX_LENGTH, source: str = "<memory>"):
        tk.no_truncation()  # a loaded tokenizer.json may carry truncation/padding; we never want them
        tk.no_padding()
        self.tk = tk
        self.source = source
        vocab = tk.get_vocab(with_added_tokens=True)
        # added tokens may sit above the model vocabulary with gaps: size = largest id + 1
        self.vocab_size: int = max(tk.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = pad_token or eos_token
        self.bos_id: int | None = self._id_of(bos_token, "bos_token")
        self.eos_id: int | None = self._id_of(eos_token, "eos_token")
        self.pad_id: int | None = self._id_of(self.pad_token, "pad_token")
        self.chat_template: str | None = chat_template
        self.model_max_length = int(model_max_length)

    def _id_of(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        i = self.tk.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{self.source}: {field} {token!r} is not in the vocabulary")
        return i

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}={self.bos_id}, "
                f"eos={self.eos_token!r}={self.eos_id}, pad={self.pad_id}, source={self.source!r})")

    def __len__(self) -> int:
        return self.vocab_size

    # -------------------------------------------------------------------------- encode / decode
    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            if self.bos_id is None:
                raise TokenizerError(f"{self.source}: add_bos=True but this tokenizer has no BOS token")
            ids.insert(0, self.bos_id)
        if add_eos:
            if self.eos_id is None:
                raise TokenizerError(f"{self.source}: add_eos=True but this tokenizer has no EOS token")
            ids.append(self.eos_id)
        return ids

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = list(self.tk.encode(text, add_special_tokens=False).ids)
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        """Encode many texts at once, in parallel threads (the library's batch encoding, no offsets)."""
        texts = list(texts)
        fast = getattr(self.tk, "encode_batch_fast", self.tk.encode_batch)
        return [self._wrap(list(e.ids), add_bos, add_eos) for e in fast(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):  # torch tensor / numpy array
            ids = ids.tolist()
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tk.id_to_token(int(i))

    def fingerprint(self) -> str:
        """sha256 of everything that decides the token ids (tokenizer.json + BOS/EOS/PAD)."""
        import hashlib
        h = hashlib.sha256(self.tk.to_str().encode("utf-8"))
        h.update(json.dumps([self.bos_token, self.eos_token, self.pad_token]).encode("utf-8"))
        return h.hexdigest()

    # -------------------------------------------------------------------------- files
    def save(self, directory: str) -> None:
        """Write tokenizer.json and tokenizer_config.json (atomically, the config last)."""
        os.makedirs(directory, exist_ok=True)
        # tell transformers what this file's post-processor does (trained ones prepend BOS, like DeepSeek)
        with_special = self.tk.encode("a", add_special_tokens=True).ids
        adds_bos = self.bos_id is not None and with_special[:1] == [self.bos_id]
        atomic_write_text(os.path.join(directory, TOKENIZER_FILE), self.tk.to_str(pretty=True))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "model_max_length": self.model_max_length,
            "add_bos_token": adds_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        atomic_write_text(os.path.join(directory, CONFIG_FILE),
                           json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def from_dir(cls, directory: str) -> "Tokenizer":
        """Load `tokenizer.json` (+ `tokenizer_config.json` when present) from a directory, e.g. a
        Hugging Face model folder. Without a config, BOS/EOS are DeepSeek's names, else <s> / </s>."""
        path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise TokenizerError(f"{path}: no such file (a tokenizer directory needs {TOKENIZER_FILE})")
        try:
            tk = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise TokenizerError(f"{path}: not a valid tokenizers file ({e})") from None
        cfg: dict = {}
        cfg_path = os.path.join(directory, CONFIG_FILE)
        if os.path.isfile(cfg_path):
            try:
                with open(cfg_path, encoding="utf-8") as f:
                    cfg = json.load(f)
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{cfg_path}: not valid JSON ({e})") from None
            if not isinstance(cfg, dict):
                raise TokenizerError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")

        def pick(field: str, fallbacks: list[str]) -> str | None:
            name = _token_content(cfg.get(field))
            if name is not None:
                if tk.token_to_id(name) is None:
                    raise TokenizerError(f"{cfg_path}: {field} {name!r} is not in {path}")
                return name
            return next((t for t in fallbacks if tk.token_to_id(t) is not None), None)

        bos = pick("bos_token", [BOS, "<s>", "<|begin_of_text|>", "<|endoftext|>"])
        eos = pick("eos_token", [EOS, "</s>", "<|end_of_text|>", "<|endoftext|>"])
        if eos is None:
            raise TokenizerError(f"{path}: cannot tell the EOS token (none of {EOS!r}, '</s>', "
                                 f"'<|endoftext|>' is in the vocabulary); add {CONFIG_FILE} with eos_token")
        pad = pick("pad_token", [])
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        max_len = cfg.get("model_max_length", DEFAULT_MODEL_MAX_LENGTH)
        if not isinstance(max_len, (int, float)) or max_len <= 0 or max_len > 2**62:
            max_len = DEFAULT_MODEL_MAX_LENGTH
        return cls(tk, bos_token=bos, eos_token=eos, pad_token=pad, chat_template=template,
                   model_max_length=int(max_len), source=path)


def byte_level_bpe(split_digits: bool = False) -> tokenizers.Tokenizer:
    """An empty byte-level BPE tokenizer (GPT-2 regex pre-tokenizer, byte-level decoder); with
    `split_digits` every digit is its own pre-token, so numbers are spelled digit by digit."""
    tk = tokenizers.Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                        if split_digits else byte_level)
    tk.decoder = decoders.ByteLevel()
    return tk


def train_bpe(texts: Iterable[str], vocab_size: int, split_digits: bool = False) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (special tokens included, at ids 0..8:
    BOS, EOS, PAD, <｜User｜>, <｜Assistant｜>, <think>, </think>, <answer>, </answer>).
    The 256 byte symbols are always in the vocabulary, so every string round-trips. `split_digits`
    keeps numbers digit by digit (no multi-digit tokens), which small arithmetic models need."""
    min_size = len(SPECIAL_TOKENS) + 256
    if not isinstance(vocab_size, int) or vocab_size < min_size:
        raise ValueError(f"train_bpe: vocab_size={vocab_size!r} is too small; a byte-level BPE needs at least "
                         f"{min_size} ({len(SPECIAL_TOKENS)} special tokens + 256 bytes)")
    tk = byte_level_bpe(split_digits)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=0, show_progress=False)

    def lines():  # line pieces: the trainer parallelizes word counting over its input items
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"train_bpe: expected str items, got {type(t).__name__}")
            yield from t.splitlines(keepends=True) if len(t) > 65536 else (t,)

    tk.train_from_iterator(lines(), trainer)
    # HF-style loaders (AutoTokenizer) then prepend BOS like DeepSeek's; our `encode` ignores this.
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)])
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tk.token_to_id(t) == i, (t, tk.token_to_id(t))
    return Tokenizer(tk, bos_token=BOS, eos_token=EOS, pad_token=PAD)
