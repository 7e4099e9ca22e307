"""Pretraining data: text -> token shards on disk (memory-mapped) -> deterministic batches.

`prepare(data, out_dir, tokenizer)` tokenizes every document once into
    out_dir/train.bin, out_dir/val.bin   flat token ids, numpy uint16 (vocab < 65536) or uint32,
                                         EOS after each document
    out_dir/meta.json                    dtype, n_tokens / n_bytes / n_docs per split, vocab_size,
                                         sources (path, size, mtime), fingerprint
Inputs: plain text files (one document each; any file that is not .json/.jsonl), .jsonl (one JSON
object a line, the document in `text_field`), .json (a list of such objects), and folders (walked
recursively in sorted order, taking their .txt/.text/.jsonl files).
Split: by document (a seeded random `val_fraction` of them) when there are enough documents for at
least one to go to validation, else the tail `val_fraction` of each text (cut at a line end).

Crash safety: the shards are written under temp names and renamed into place, meta.json last, with
any old meta.json removed first; a finished preparation is exactly "meta.json present, fingerprint
equal, shard sizes equal". `prepare` again with the same sources (path, size, mtime), tokenizer and
options reuses the shards. A lock file serializes concurrent calls (e.g. every rank of a job).

`Batches(shard, seq_len, global_batch, seed)` cuts a shard into non-overlapping windows of
seq_len + 1 tokens; global sample i is window perm_e[i % n_windows] with e = i // n_windows and
perm_e a seeded permutation per epoch. Step s holds samples [s * global_batch, (s+1) * global_batch);
rank r of `world` takes the r-th contiguous slice, so any world size sees the same global batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import sys
import tempfile
from typing import Iterator, Sequence

import numpy as np
import torch

from .io import atomic_write_text
from .tokenizer import Tokenizer

FORMAT = "nanoseek-tokens-v1"
META_FILE = "meta.json"
SPLITS = ("train", "val")
TEXT_EXTS = (".txt", ".text")  # what a folder walk takes besides .jsonl
LOCK_FILE = ".prepare.lock"
TMP_PREFIX = ".tmp-"
PIECE_CHARS = 1 << 16  # long documents are encoded in pieces of about this many characters, in parallel
BATCH_CHARS = 1 << 23  # characters per encode_batch call (bounds memory)
PROGRESS_MIN_BYTES = 1 << 24


class DataError(ValueError):
    """Input data or shards that cannot be used; the message names the file (and line)."""


# ------------------------------------------------------------------------------ sources
def _kind(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    return {".jsonl": "jsonl", ".json": "json"}.get(ext, "text")


def resolve_sources(data) -> list[str]:
    """The input files, in order: each path as given, folders expanded (recursive, sorted, hidden
    entries skipped, only .txt/.text/.jsonl). Duplicates are dropped."""
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not items:
        raise DataError("prepare: no input paths given")
    out: list[str] = []
    for item in items:
        path = os.path.abspath(os.fspath(item))
        if os.path.isdir(path):
            found = []
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(root, f) for f in sorted(files)
                          if not f.startswith(".") and f.lower().endswith(TEXT_EXTS + (".jsonl",))]
            if not found:
                raise DataError(f"{path}: folder holds no {'/'.join(TEXT_EXTS)} or .jsonl files")
            out += found
        elif os.path.isfile(path):
            out.append(path)
        elif os.path.exists(path):
            raise DataError(f"{path}: not a regular file or folder")
        else:
            raise DataError(f"{path}: no such file or directory")
    seen: set[str] = set()
    unique = []
    for p in out:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _decode(raw: bytes, path: str, where: str = "") -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}{where}: not UTF-8 text (bad byte at offset {e.start})") from None


def _doc_text(obj, field: str, path: str, where: str) -> str:
    if isinstance(obj, str) and field == "text":
        return obj
    if not isinstance(obj, dict):
        raise DataError(f"{path}{where}: expected a JSON object with field '{field}', got {type(obj).__name__}")
    if field not in obj:
        fields = ", ".join(list(obj)[:10])
        raise DataError(f"{path}{where}: no field '{field}' (fields: {fields}); pass text_field=...")
    text = obj[field]
    if not isinstance(text, str):
        raise DataError(f"{path}{where}: field '{field}' is {type(text).__name__}, expected a string")
    return text


def _count_docs(path: str) -> int:
    """Documents in one source, cheaply (jsonl: non-blank lines; text: 1)."""
    kind = _kind(path)
    if kind == "text":
        return 1
    if kind == "jsonl":
        return sum(1 for _, line in _jsonl_lines(path) if line.strip())
    return len(_load_json_list(path, _read_bytes(path)))


def _jsonl_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a .jsonl file, streamed."""
    try:
        with open(path, "rb") as f:
            yield from enumerate(f, 1)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _load_json_list(path: str, raw: bytes) -> list:
    try:
        items = json.loads(_decode(raw, path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: a .json input must hold a list of objects, got {type(items).__name__}")
    return items


def _iter_docs(path: str, text_field: str) -> Iterator[str]:
    """The documents of one source, in order (as many as `_count_docs` says)."""
    kind = _kind(path)
    if kind == "text":
        yield _decode(_read_bytes(path), path)
    elif kind == "jsonl":
        for lineno, line in _jsonl_lines(path):
            if not line.strip():
                continue
            where = f":{lineno}"
            try:
                obj = json.loads(_decode(line, path, where).lstrip("\ufeff") if lineno == 1 else _decode(line, path, where))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield _doc_text(obj, text_field, path, where)
    else:
        for k, obj in enumerate(_load_json_list(path, _read_bytes(path))):
            yield _doc_text(obj, text_field, path, f": item {k}")


# ------------------------------------------------------------------------------ splitting text
JUNCTION_CHARS = 256  # context checked on each side of a cut
CUT_TRIES = 64


def joins_cleanly(text: str, cut: int, tokenizer: Tokenizer) -> bool:
    """Whether encoding text[:cut] and text[cut:] separately gives the same ids as encoding the
    whole, judged on JUNCTION_CHARS of context each side (pre-tokenizers look only a character or
    so across a boundary; BPE never merges across pre-tokens)."""
    a, b = text[max(0, cut - JUNCTION_CHARS):cut], text[cut:cut + JUNCTION_CHARS]
    return tokenizer.encode(a) + tokenizer.encode(b) == tokenizer.encode(a + b)


def _clean_cuts(text: str, positions, tokenizer: Tokenizer | None):
    for c in positions:
        if 0 < c < len(text) and (tokenizer is None or joins_cleanly(text, c, tokenizer)):
            yield c


def _after(text: str, sep: str, pos: int, end: int):
    """Positions just after each `sep` in text[pos:end], left to right (at most CUT_TRIES)."""
    for _ in range(CUT_TRIES):
        i = text.find(sep, pos, end)
        if i < 0:
            return
        yield i + 1
        pos = i + 1


def split_for_encoding(text: str, tokenizer: Tokenizer | None = None, piece_chars: int = PIECE_CHARS) -> list[str]:
    """Cut a long text into pieces of about `piece_chars` characters (or more) so that they can be
    encoded in parallel. Cuts go just after a line end (else a space) where `joins_cleanly` holds,
    so the concatenated ids of the pieces equal the ids of the whole text. Without a tokenizer, only
    the cuts that every regex pre-tokenizer respects are used: a single newline between two
    non-space characters."""
    pieces, start, n = [], 0, len(text)
    while n - start > piece_chars:
        pos = start + piece_chars
        if tokenizer is None:
            cands = (m.start() for m in _SAFE_CUT.finditer(text, pos))
        else:
            cands = itertools.chain(_after(text, "\n", pos, n), _after(text, " ", pos, n))
        cut = next(_clean_cuts(text, cands, tokenizer), None)
        if cut is None:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


def tail_cut(text: str, fraction: float, tokenizer: Tokenizer | None = None) -> int:
    """Character index where the last `fraction` of `text` begins, moved to the nearest line end
    (else space) within reach, where `joins_cleanly` holds when a tokenizer is given;
    0 < cut < len(text) for texts of 2+ characters and fraction > 0."""
    n = len(text)
    if n < 2 or fraction <= 0:
        return n
    target = min(n - 1, max(1, int(round(n * (1 - fraction)))))
    slack = max(1000, (n - target) // 10)  # how far the cut may move
    lo, hi = max(0, target - slack), min(n, target + slack)
    for sep in ("\n", " "):
        near = [i + 1 for i in _all(text, sep, lo, hi)]
        near.sort(key=lambda c: abs(c - target))
        cut = next(_clean_cuts(text, near[:CUT_TRIES], tokenizer), None)
        if cut is not None:
            return cut
    return target


def _all(text: str, sep: str, lo: int, hi: int) -> list[int]:
    out, i = [], text.find(sep, lo, hi)
    while i >= 0:
        out.append(i)
        i = text.find(sep, i + 1, hi)
    return out


# ------------------------------------------------------------------------------ prepare
def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


def _source_stats(paths: Sequence[str]) -> list[dict]:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as e:
            raise DataError(f"{p}: cannot stat ({e.strerror or e})") from None
        if not os.access(p, os.R_OK):
            raise DataError(f"{p}: not readable (permission denied)")
        out.append({"path": p, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _fingerprint(options: dict) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode("utf-8")).hexdigest()


@contextlib.contextmanager
def _locked(out_dir: str):
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    with open(os.path.join(out_dir, LOCK_FILE), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_meta(out_dir: str) -> dict:
    path = os.path.join(out_dir, META_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (run nanoseek.data.prepare first)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path}: not a nanoseek token-shard meta file (format != {FORMAT!r})")
    return meta


def _finished(out_dir: str, fingerprint: str) -> dict | None:
    """The meta of a complete preparation with this fingerprint, else None."""
    try:
        meta = read_meta(out_dir)
    except DataError:
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in SPLITS:
            p = os.path.join(out_dir, f"{split}.bin")
            if not os.path.isfile(p) or os.path.getsize(p) != meta["n_tokens"][split] * itemsize:
                return None
    except (KeyError, TypeError):
        return None
    return meta


def prepare(data, out_dir: str, tokenizer: Tokenizer, val_fraction: float = 0.05, text_field: str = "text",
            seed: int = 0) -> dict:
    """Tokenize `data` (a path or list of paths) into out_dir/{train,val}.bin + meta.json and return
    meta.json's content plus (not stored) "train" / "val": the absolute shard paths, "out_dir", and
    "reused": True when an identical earlier preparation was found and kept.
    `tokenizer` is a `Tokenizer` or a directory for `Tokenizer.from_dir`."""
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = Tokenizer.from_dir(os.fspath(tokenizer))
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"prepare: val_fraction={val_fraction} must be in [0, 1)")
    if tokenizer.eos_id is None:
        raise ValueError(f"prepare: tokenizer {tokenizer.source} has no EOS token to end documents with")
    sources = _source_stats(resolve_sources(data))
    dtype = token_dtype(tokenizer.vocab_size)
    options = {
        "format": FORMAT, "tokenizer": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id, "dtype": dtype.name, "val_fraction": float(val_fraction),
        "text_field": text_field, "seed": int(seed), "sources": sources,
    }
    fingerprint = _fingerprint(options)
    os.makedirs(out_dir, exist_ok=True)
    with _locked(out_dir):
        meta = _finished(out_dir, fingerprint)
        if meta is not None:
            return _with_paths(meta, out_dir, reused=True)
        meta_path = os.path.join(out_dir, META_FILE)
        if os.path.exists(meta_path):  # from now on the folder is "not finished"
            os.unlink(meta_path)
        for f in os.listdir(out_dir):  # leftovers of a killed run (we hold the lock: nobody else writes)
            if f.startswith(TMP_PREFIX):
                os.unlink(os.path.join(out_dir, f))
        meta = _write_shards(out_dir, tokenizer, sources, dtype, float(val_fraction), text_field, int(seed))
        meta.update({"format": FORMAT, "fingerprint": fingerprint, "tokenizer_sha256": options["tokenizer"]})
        atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
        os.chmod(meta_path, _file_mode())
    return _with_paths(meta, out_dir, reused=False)


def _with_paths(meta: dict, out_dir: str, reused: bool) -> dict:
    """meta.json's content plus what is true of this call: the shard paths and whether reused."""
    out_dir = os.path.abspath(out_dir)
    return {**meta, "train": os.path.join(out_dir, "train.bin"), "val": os.path.join(out_dir, "val.bin"),
            "out_dir": out_dir, "reused": reused}


def _write_shards(out_dir, tokenizer, sources, dtype, val_fraction, text_field, seed) -> dict:
    paths = [s["path"] for s in sources]
    counts = [_count_docs(p) for p in paths]
    n_docs = sum(counts)
    n_val = min(int(round(n_docs * val_fraction)), n_docs - 1)
    by_document = n_docs >= 2 and n_val >= 1
    val_docs = set(np.random.default_rng(seed).permutation(n_docs)[:n_val].tolist()) if by_document else set()

    stats = {s: {"n_tokens": 0, "n_bytes": 0, "n_docs": 0} for s in SPLITS}
    tmp = {s: tempfile.mkstemp(dir=out_dir, prefix=TMP_PREFIX, suffix=f"{s}.bin") for s in SPLITS}
    files = {s: os.fdopen(fd, "wb") for s, (fd, _) in tmp.items()}
    eos = tokenizer.eos_id
    pending: list[tuple[str, str, bool]] = []  # (split, piece, EOS after it)
    pending_chars = pending_bytes = 0
    total_bytes = sum(s["size"] for s in sources)
    progress = _progress(total_bytes)

    def flush():
        nonlocal pending, pending_chars, pending_bytes
        if not pending:
            return
        encoded = tokenizer.encode_batch([p for _, p, _ in pending])
        for split in SPLITS:
            rows = []
            for (s, piece, add_eos), ids in zip(pending, encoded):
                if s == split:
                    rows.append(np.asarray(ids, dtype=np.int64))
                    if add_eos:
                        rows.append(np.array([eos], dtype=np.int64))
            if rows:
                arr = np.concatenate(rows)
                if arr.size and (arr.min() < 0 or arr.max() >= tokenizer.vocab_size):
                    raise DataError(f"{tokenizer.source}: produced token id {int(arr.max())} >= vocab_size "
                                    f"{tokenizer.vocab_size}")
                arr.astype(dtype).tofile(files[split])
                stats[split]["n_tokens"] += int(arr.size)
        progress.update(pending_bytes)
        pending, pending_chars, pending_bytes = [], 0, 0

    def add(split: str, text: str, add_eos: bool):
        nonlocal pending_chars, pending_bytes
        n_bytes = len(text.encode("utf-8"))
        stats[split]["n_bytes"] += n_bytes
        pending_bytes += n_bytes
        pieces = split_for_encoding(text, tokenizer) if text else []
        for k, piece in enumerate(pieces):
            pending.append((split, piece, add_eos and k == len(pieces) - 1))
            pending_chars += len(piece)
            if pending_chars >= BATCH_CHARS:
                flush()
        if add_eos and not pieces:
            pending.append((split, "", True))

    try:
        index = 0
        for path, count in zip(paths, counts):
            seen = 0
            for text in _iter_docs(path, text_field):
                seen += 1
                if not text:  # empty documents add nothing (not even an EOS)
                    index += 1
                    continue
                if by_document or val_fraction == 0:
                    split = "val" if index in val_docs else "train"
                    stats[split]["n_docs"] += 1
                    add(split, text, True)
                else:  # the tail of each text is validation; EOS only at the true end
                    cut = tail_cut(text, val_fraction, tokenizer)
                    add("train", text[:cut], False)
                    add("val", text[cut:], True)
                    stats["train"]["n_docs"] += 1
                    stats["val"]["n_docs"] += 1
                index += 1
            if seen != count:
                raise DataError(f"{path}: changed while being read ({count} documents, then {seen})")
        flush()
        for split in SPLITS:
            files[split].flush()
            os.fsync(files[split].fileno())
            files[split].close()
        for split in SPLITS:
            os.chmod(tmp[split][1], _file_mode())  # mkstemp makes 0600; shards are ordinary files
            os.replace(tmp[split][1], os.path.join(out_dir, f"{split}.bin"))
    except BaseException:
        for split in SPLITS:
            files[split].close()
            if os.path.exists(tmp[split][1]):
                os.unlink(tmp[split][1])
        raise
    finally:
        progress.close()
    return {
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": eos,
        "n_tokens": {s: stats[s]["n_tokens"] for s in SPLITS},
        "n_bytes": {s: stats[s]["n_bytes"] for s in SPLITS},
        "n_docs": {s: stats[s]["n_docs"] for s in SPLITS},
        "split": "document" if by_document else ("none" if val_fraction == 0 else "tail"),
        "val_fraction": val_fraction,
        "seed": seed,
        "text_field": text_field,
        "sources": sources,
    }


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _progress(total_bytes: int):
    from tqdm import tqdm
    disable = total_bytes < PROGRESS_MIN_BYTES or not sys.stderr.isatty()
    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=disable)


# ------------------------------------------------------------------------------ shards
class TokenShard:
    """A read-only np.memmap over one split's .bin file. Length in tokens; `n_bytes` is the UTF-8
    size of the text behind it (from meta.json; None without one)."""

    def __init__(self, path: str, dtype=None):
        self.path = os.path.abspath(os.fspath(path))
        self.split = os.path.splitext(os.path.basename(self.path))[0]
        meta_path = os.path.join(os.path.dirname(self.path), META_FILE)
        self.meta: dict | None = read_meta(os.path.dirname(self.path)) if os.path.exists(meta_path) else None
        if dtype is None:
            if self.meta is None:
                raise DataError(f"{self.path}: no {META_FILE} beside it to give the dtype; pass dtype=")
            dtype = self.meta["dtype"]
        self.dtype = np.dtype(dtype)
        if not os.path.isfile(self.path):
            raise DataError(f"{self.path}: no such token shard")
        size = os.path.getsize(self.path)
        if size % self.dtype.itemsize:
            raise DataError(f"{self.path}: {size} bytes is not a whole number of {self.dtype.name} tokens")
        n = size // self.dtype.itemsize
        self.n_bytes: int | None = None
        if self.meta is not None and self.split in self.meta.get("n_tokens", {}):
            want = self.meta["n_tokens"][self.split]
            if n != want:
                raise DataError(f"{self.path}: holds {n} tokens but {meta_path} says {want} "
                                "(truncated, or from another preparation)")
            self.n_bytes = self.meta["n_bytes"][self.split]
        self._open(n)

    def _open(self, n: int) -> None:
        # numpy cannot map an empty file
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r") if n else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, idx):
        return self.tokens[idx]

    def __repr__(self) -> str:
        return f"TokenShard({self.path!r}, tokens={len(self)}, n_bytes={self.n_bytes}, dtype={self.dtype.name})"

    def __getstate__(self):  # pickling (DataLoader workers) must not copy the whole map
        d = dict(self.__dict__)
        d["_n"] = len(self.tokens)
        del d["tokens"]
        return d

    def __setstate__(self, d):
        n = d.pop("_n")
        self.__dict__.update(d)
        self._open(n)


def _as_tokens(shard):
    if isinstance(shard, (str, os.PathLike)):
        return TokenShard(shard)
    if isinstance(shard, torch.Tensor):
        return shard.cpu().numpy()
    return shard


class Batches:
    """Deterministic (x, y) batches from a token shard, indexed by step; see the module docstring."""

    def __init__(self, shard, seq_len: int, global_batch: int, seed: int = 0):
        self.shard = _as_tokens(shard)
        self.seq_len, self.global_batch, self.seed = int(seq_len), int(global_batch), int(seed)
        if self.seq_len < 1 or self.global_batch < 1:
            raise ValueError(f"Batches: seq_len={seq_len} and global_batch={global_batch} must be >= 1")
        self.window = self.seq_len + 1
        self.n_windows = len(self.shard) // self.window
        if self.n_windows == 0:
            name = getattr(self.shard, "path", "shard")
            raise DataError(f"{name}: {len(self.shard)} tokens is less than one window of seq_len + 1 = "
                            f"{self.window}")
        self._perms: dict[int, np.ndarray] = {}

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def steps_per_epoch(self) -> float:
        return self.n_windows / self.global_batch

    def perm(self, epoch: int) -> np.ndarray:
        """The window order of one epoch (a permutation of range(n_windows), seeded by (seed, epoch))."""
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        return self._perms[epoch]

    def windows(self, samples: np.ndarray) -> np.ndarray:
        """Window index of each global sample index."""
        samples = np.asarray(samples, dtype=np.int64)
        epochs, pos = np.divmod(samples, self.n_windows)
        out = np.empty_like(samples)
        for e in np.unique(epochs):
            m = epochs == e
            out[m] = self.perm(int(e))[pos[m]]
        return out

    def _rows(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        buf = np.empty((len(windows), self.window), dtype=np.int64)
        for k, w in enumerate(windows):  # contiguous reads from the map
            s = int(w) * self.window
            buf[k] = self.shard[s:s + self.window]
        t = torch.from_numpy(buf)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def get(self, step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), int64 [global_batch // world, seq_len], y = x shifted by one token: rank `rank`'s
        contiguous slice of global batch `step`."""
        if world < 1 or self.global_batch % world:
            raise ValueError(f"Batches.get: global_batch={self.global_batch} is not divisible by world={world}")
        if not 0 <= rank < world:
            raise ValueError(f"Batches.get: rank={rank} is not in [0, world={world})")
        if step < 0:
            raise ValueError(f"Batches.get: step={step} must be >= 0")
        per = self.global_batch // world
        start = int(step) * self.global_batch + rank * per
        return self._rows(self.windows(np.arange(start, start + per)))

    def eval_batches(self, batch: int, max_batches: int | None = None, rank: int = 0,
                     world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Sequential, unshuffled non-overlapping windows of this shard (for validation), `batch` per
        yield on each rank (the last may be smaller); at most `max_batches` per rank. With world > 1
        each yield is one of `world` consecutive slices, and every rank yields the same count."""
        return _eval_iter(self, int(batch), max_batches, rank, world)


def _eval_iter(b: Batches, batch: int, max_batches, rank: int, world: int):
    if batch < 1 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"eval_batches: need batch >= 1 and 0 <= rank < world (got {batch}, {rank}, {world})")
    group = batch * world
    n_groups = math.ceil(b.n_windows / group)
    if max_batches is not None:
        n_groups = min(n_groups, int(max_batches))
    for k in range(n_groups):
        lo, hi = k * group, min(b.n_windows, (k + 1) * group)
        if hi - lo < world:  # too few windows left to give every rank one
            break
        part = np.array_split(np.arange(lo, hi), world)[rank]
        yield b._rows(part)


def eval_batches(shard, seq_len: int, batch: int, max_batches: int | None = None, rank: int = 0,
                 world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`Batches(shard, seq_len, batch).eval_batches(batch, max_batches, rank, world)`."""
    return Batches(shard, seq_len, batch).eval_batches(batch, max_batches, rank, world)


def bits_per_byte(mean_loss_nats: float, n_tokens: int, n_bytes: int) -> float:
    """Bits per UTF-8 byte from a mean per-token loss in nats: loss * n_tokens / (n_bytes * ln 2).
    Pass the shard's totals (`len(shard)`, `shard.n_bytes`): their ratio is the tokens per byte."""
    if n_bytes is None or n_bytes <= 0:
        raise ValueError(f"bits_per_byte: n_bytes={n_bytes} must be > 0")
    return float(mean_loss_nats) * n_tokens / (n_bytes * math.log(2))
