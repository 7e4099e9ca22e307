"""Tokenizer training/loading and token shards: round trips, DeepSeek-style files, prepare (reuse,
crash safety, errors), deterministic and world-size-independent batches."""

import json
import os
import time

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA
from nanoseek import data
from nanoseek.data import Batches, DataError, TokenShard, bits_per_byte, prepare
from nanoseek.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, Tokenizer, TokenizerError, train_bpe

SAMPLE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\r\n\tTabs,  double  spaces   and trailing spaces   \n"
    "Unicode: naïve café, Ελληνικά, русский, 日本語のテキスト, 中文, emoji 🤗👍🏽, math ∑∫√.\n"
    "Numbers 1234567 3.14159 and code: def f(x): return x**2  # done\n"
) * 20
TRICKY = ["", " ", "\n\n\n", "  leading", "trailing  ", "a\u0000b", "\u200b zero width", "🤗" * 5,
          "<think>reasoning</think><answer>42</answer>", "<｜User｜>hi<｜Assistant｜>", "ÿ\x7f\x80",
          "never seen: ᚠᛇᚻ ꧁꧂ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]
SHAKESPEARE = os.path.join(SHARED_DATA, "tinyshakespeare", "input.txt")


@pytest.fixture(scope="module")
def tok():
    return train_bpe([SAMPLE], 400)


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return str(path)


# ------------------------------------------------------------------------------ tokenizer
def test_train_bpe_round_trip_and_specials(tok):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(9))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.vocab_size == 400
    for s in [SAMPLE] + TRICKY:
        ids = tok.encode(s)
        assert tok.decode(ids) == s, s
        assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.encode("hi", add_bos=True, add_eos=True) == [0] + tok.encode("hi") + [1]
    assert tok.encode("<think>") == [tok.token_to_id("<think>")]
    assert tok.decode(tok.encode("<think>x</think>"), skip_special_tokens=True) == "x"
    assert tok.encode_batch(["a b", SAMPLE, ""], add_eos=True) == [tok.encode(t, add_eos=True) for t in ["a b", SAMPLE, ""]]
    assert tok.decode(torch.tensor(tok.encode("tensor ids"))) == "tensor ids"
    assert len(tok.encode(SAMPLE)) < len(SAMPLE.encode()) / 2  # it learned merges
    with pytest.raises(ValueError, match="too small"):
        train_bpe([SAMPLE], 200)


def test_train_bpe_is_deterministic(tok):
    again = train_bpe([SAMPLE], 400)
    assert again.tk.to_str() == tok.tk.to_str()
    assert again.fingerprint() == tok.fingerprint()


def test_save_from_dir_round_trip(tok, tmp_path):
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    try:
        tok.save(str(tmp_path))
    finally:
        tok.chat_template = None
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == (BOS, EOS, PAD)
    assert cfg["model_max_length"] > 0 and "chat_template" in cfg
    t2 = Tokenizer.from_dir(str(tmp_path))
    assert (t2.vocab_size, t2.bos_id, t2.eos_id, t2.pad_id) == (tok.vocab_size, 0, 1, 2)
    assert t2.chat_template == "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert t2.encode(SAMPLE) == tok.encode(SAMPLE) and t2.fingerprint() == tok.fingerprint()
    os.unlink(tmp_path / "tokenizer_config.json")  # no config: DeepSeek names, pad = eos
    t3 = Tokenizer.from_dir(str(tmp_path))
    assert (t3.bos_id, t3.eos_id, t3.pad_id, t3.chat_template) == (0, 1, 1, None)
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(str(tmp_path / "nowhere"))


def _deepseek_style_dir(path, with_config=True):
    """A tokenizer.json built like DeepSeek-V3's: BOS/EOS at ids 0/1 inside the BPE vocab, the
    digit / CJK / punctuation Split pre-tokenizers then ByteLevel without regex, BOS post-processor,
    extra special tokens after the BPE vocab, AddedToken dicts and a null pad_token in the config."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
        pre_tokenizers.Split(Regex("[一-龥\u3040-ゟ゠-ヿ]+"), behavior="isolated"),
        pre_tokenizers.Split(Regex(
            r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+|"
            r" ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([SAMPLE], trainers.BpeTrainer(
        vocab_size=350, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    tk.add_special_tokens(["<｜User｜>", "<｜Assistant｜>", "<think>"])  # ids 350.. (the library renumbers
    os.makedirs(path, exist_ok=True)                                    # added tokens to follow the vocab)
    tk.save(os.path.join(path, "tokenizer.json"))
    if with_config:
        def added(c):
            return {"__type": "AddedToken", "content": c, "lstrip": False, "normalized": True, "rstrip": False,
                    "single_word": False}
        cfg = {"add_bos_token": True, "add_eos_token": False, "bos_token": added(BOS), "eos_token": added(EOS),
               "pad_token": None, "legacy": True, "model_max_length": 131072, "tokenizer_class": "LlamaTokenizerFast",
               "unk_token": None, "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"}
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, ensure_ascii=False)
    return str(path)


@pytest.mark.parametrize("with_config", [True, False])
def test_deepseek_style_tokenizer_json_loads(tmp_path, with_config):
    t = Tokenizer.from_dir(_deepseek_style_dir(tmp_path / "ds", with_config))
    assert (t.bos_id, t.eos_id, t.pad_id) == (0, 1, 1)
    assert t.vocab_size == 353 and t.token_to_id("<think>") == 352
    assert (t.chat_template is not None) == with_config
    for s in [SAMPLE] + TRICKY:
        assert t.decode(t.encode(s)) == s
    assert t.encode("hello")[0] != 0 and t.encode("hello", add_bos=True)[0] == 0  # post-processor ignored
    # pieces cut by split_for_encoding encode exactly like the whole text under this pre-tokenizer too
    _check_pieces(t)


def _check_pieces(t):
    text = (SAMPLE + "para\n\n" + "x " * 300 + "\n\n\n  indented\n") * 3
    for tokenizer in (None, t):
        pieces = data.split_for_encoding(text, tokenizer, 400)
        assert len(pieces) > 5 and "".join(pieces) == text
        assert sum(t.encode_batch(pieces), []) == t.encode(text)


def test_split_for_encoding_is_exact_for_gpt2_regex(tok):
    _check_pieces(tok)


def test_from_dir_sentencepiece_style_names(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel()
    tk.add_special_tokens(["<s>", "</s>"])
    tk.save(str(tmp_path / "tokenizer.json"))
    t = Tokenizer.from_dir(str(tmp_path))
    assert (t.bos_token, t.eos_token, t.bos_id, t.eos_id) == ("<s>", "</s>", 0, 1)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(TokenizerError, match="tokenizer_config.json.*<nope>"):
        Tokenizer.from_dir(str(tmp_path))


# ------------------------------------------------------------------------------ prepare
def test_tail_cut_prefers_a_near_line_end():
    text = "".join(f"line {i}\n" for i in range(1000))
    cut = data.tail_cut(text, 0.05)
    assert text[cut - 1] == "\n" and abs(cut - 0.95 * len(text)) < 10
    one_line = "\n" + "word " * 20_000  # no line end near the target: a space, not the far newline
    cut = data.tail_cut(one_line, 0.05)
    assert one_line[cut - 1] == " " and abs(cut - 0.95 * len(one_line)) < 10
    assert data.tail_cut("ab", 0.05) == 1 and data.tail_cut("abc", 0.0) == 3


def test_prepare_text_file_counts_split_and_reuse(tok, tmp_path):
    text = SAMPLE * 5
    src = _write(tmp_path / "in.txt", text)
    out = str(tmp_path / "out")
    meta = prepare(src, out, tok, val_fraction=0.1)
    assert not meta["reused"] and meta["split"] == "tail" and meta["dtype"] == "uint16"
    assert sorted(f for f in os.listdir(out) if not f.startswith(".")) == ["meta.json", "train.bin", "val.bin"]
    assert meta["train"] == os.path.join(os.path.abspath(out), "train.bin") and meta["val"].endswith("val.bin")
    assert "reused" not in json.loads(open(os.path.join(out, "meta.json")).read())
    train, val = TokenShard(meta["train"]), TokenShard(meta["val"])
    assert (len(train), len(val)) == (meta["n_tokens"]["train"], meta["n_tokens"]["val"])
    assert train.n_bytes + val.n_bytes == len(text.encode())
    assert 0.05 < val.n_bytes / len(text.encode()) < 0.15
    # one document: the tail is validation, EOS only at the true end, tokens equal a whole-text encode
    assert int(val[-1]) == tok.eos_id and tok.eos_id not in train[:].tolist()
    assert tok.decode(train[:]) + tok.decode(val[:-1]) == text
    assert train[:].tolist() + val[:-1].tolist() == tok.encode(text)
    # second call: same sources and tokenizer -> reused, files untouched
    mtime = os.stat(os.path.join(out, "train.bin")).st_mtime_ns
    again = prepare(src, out, tok, val_fraction=0.1)
    assert again["reused"] and again["fingerprint"] == meta["fingerprint"]
    assert os.stat(os.path.join(out, "train.bin")).st_mtime_ns == mtime
    # another option or a changed source -> prepared again
    assert not prepare(src, out, tok, val_fraction=0.2)["reused"]
    time.sleep(0.01)
    _write(tmp_path / "in.txt", text + "more\n")
    m3 = prepare(src, out, tok, val_fraction=0.2)
    assert not m3["reused"] and m3["n_bytes"]["train"] + m3["n_bytes"]["val"] == len(text.encode()) + 5


def test_prepare_folder_and_jsonl_by_document(tok, tmp_path):
    docs = [f"document {i}: " + SAMPLE[: 50 + 7 * i] for i in range(40)]
    folder = tmp_path / "corpus"
    for i, d in enumerate(docs[:20]):
        _write(folder / "sub" / f"{i:02d}.txt", d)
    _write(folder / "skip.md", "not taken from a folder")
    _write(folder / ".hidden.txt", "hidden")
    with open(folder / "rest.jsonl", "w", encoding="utf-8") as f:
        for d in docs[20:]:
            f.write(json.dumps({"id": 1, "text": d}, ensure_ascii=False) + "\n\n")
    out = str(tmp_path / "out")
    meta = prepare(str(folder), out, tok, val_fraction=0.1, seed=3)
    assert meta["split"] == "document" and meta["n_docs"] == {"train": 36, "val": 4}
    assert [os.path.basename(s["path"]) for s in meta["sources"]] == ["rest.jsonl"] + [f"{i:02d}.txt" for i in range(20)]
    train, val = (TokenShard(os.path.join(out, f"{s}.bin")) for s in ("train", "val"))
    ordered = docs[20:] + docs[:20]  # sorted walk: rest.jsonl before sub/
    assert len(train) + len(val) == sum(len(tok.encode(d)) + 1 for d in ordered)
    assert train.n_bytes + val.n_bytes == sum(len(d.encode()) for d in ordered)
    # every document ends with EOS; decoded splits are documents in source order
    val_text = tok.decode(val[:])
    val_docs = [d for d in ordered if d + EOS in val_text]
    assert len(val_docs) == 4 and val_text == "".join(d + EOS for d in val_docs)
    train_text = tok.decode(train[:])
    assert train_text == "".join(d + EOS for d in ordered if d not in val_docs)
    # seed decides which documents; the same seed gives the same split
    other = prepare(str(folder), str(tmp_path / "out2"), tok, val_fraction=0.1, seed=4)
    assert tok.decode(TokenShard(os.path.join(tmp_path, "out2", "val.bin"))[:]) != val_text
    assert other["n_docs"]["val"] == 4
    # a list of paths, with a .json list
    j = tmp_path / "items.json"
    j.write_text(json.dumps([{"body": d} for d in docs[:10]]), encoding="utf-8")
    m = prepare([str(j), str(folder / "sub" / "00.txt")], str(tmp_path / "out3"), tok, text_field="body")
    assert m["n_docs"]["train"] + m["n_docs"]["val"] == 11


def test_prepare_errors_name_the_file(tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"question": "where is text?"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no field 'text' \(fields: question\)"):
        prepare(str(bad), str(tmp_path / "o1"), tok)
    bad.write_text('{"text": "ok"}\n\n{"text": "a", oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid JSON"):
        prepare(str(bad), str(tmp_path / "o2"), tok)
    bad.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'text' is int"):
        prepare(str(bad), str(tmp_path / "o3"), tok)
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(DataError, match=r"missing\.txt: no such file"):
        prepare([_write(tmp_path / "ok.txt", "fine"), missing], str(tmp_path / "o4"), tok)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8"):
        prepare(str(latin1), str(tmp_path / "o5"), tok)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="empty_dir: folder holds no"):
        prepare(str(tmp_path / "empty_dir"), str(tmp_path / "o6"), tok)
    # a failed preparation leaves neither shards nor temp files
    for o in ("o1", "o2", "o3", "o5"):
        assert [f for f in os.listdir(tmp_path / o) if f != data.LOCK_FILE] == []


def test_interrupted_prepare_is_not_taken_for_finished(tok, tmp_path, monkeypatch):
    src = _write(tmp_path / "in.txt", SAMPLE * 3)
    out = tmp_path / "out"
    # a killed run: stray temp files and shards, but no meta.json
    out.mkdir()
    (out / ".tmp-abc123train.bin").write_bytes(b"\x01\x02" * 10)
    (out / "train.bin").write_bytes(b"\x00\x00" * 7)
    (out / "val.bin").write_bytes(b"")
    meta = prepare(src, str(out), tok)
    assert not meta["reused"] and not (out / ".tmp-abc123train.bin").exists()
    assert len(TokenShard(str(out / "train.bin"))) == meta["n_tokens"]["train"] > 7
    # a finished meta.json with a truncated shard is not finished either
    with open(out / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="train.bin: holds 5 tokens"):
        TokenShard(str(out / "train.bin"))
    assert not prepare(src, str(out), tok)["reused"]
    assert prepare(src, str(out), tok)["reused"]

    # killed mid-way (here: an exception during tokenization) after a different earlier preparation
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tok, "encode_batch", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, str(out), tok, val_fraction=0.3)
    monkeypatch.undo()
    assert not (out / "meta.json").exists()  # the old, now superseded, meta is gone first
    assert not [f for f in os.listdir(out) if f.startswith(data.TMP_PREFIX)]
    assert not prepare(src, str(out), tok)["reused"]


# ------------------------------------------------------------------------------ batches
@pytest.fixture
def shard(tmp_path):
    out = tmp_path / "shard"
    out.mkdir()
    tokens = np.arange(10_000, dtype=np.uint16)  # a ramp: token value = position
    tokens.tofile(out / "train.bin")
    return TokenShard(str(out / "train.bin"), dtype=np.uint16)


def test_batches_deterministic_shifted_and_world_independent(shard):
    b = Batches(shard, seq_len=15, global_batch=8, seed=1)
    assert b.n_windows == 10_000 // 16
    x, y = b.get(3)
    assert x.shape == y.shape == (8, 15) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)  # tokens are a ramp
    assert torch.all(x[:, 0] % 16 == 0)  # windows start on multiples of seq_len + 1
    again = Batches(shard, seq_len=15, global_batch=8, seed=1)
    assert all(torch.equal(a, c) for a, c in zip(b.get(3), again.get(3)))
    assert not torch.equal(Batches(shard, 15, 8, seed=2).get(3)[0], x)
    for world in (2, 4, 8):
        parts = [b.get(3, rank=r, world=world) for r in range(world)]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(ValueError, match="not divisible by world=3"):
        b.get(0, 0, 3)
    # one epoch visits every window once; the next epoch is another order of the same windows
    n = b.n_windows
    starts = torch.cat([b.get(s)[0][:, 0] for s in range(2 * n // 8 + 1)])
    assert sorted(starts[:n].tolist()) == list(range(0, n * 16, 16))
    assert sorted(starts[n:2 * n].tolist()) == list(range(0, n * 16, 16))
    assert not torch.equal(starts[:n], starts[n:2 * n])
    with pytest.raises(DataError, match="less than one window"):
        Batches(shard, seq_len=20_000, global_batch=1)


def test_eval_batches_sequential(shard):
    b = Batches(shard, seq_len=99, global_batch=4)
    got = list(b.eval_batches(16))
    assert [len(x) for x, _ in got] == [16] * 6 + [4]
    assert torch.equal(torch.cat([x for x, _ in got])[:, 0], torch.arange(0, 100 * 100, 100))
    assert len(list(b.eval_batches(16, max_batches=2))) == 2
    per_rank = [list(b.eval_batches(8, rank=r, world=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 7
    merged = torch.cat([torch.cat([per_rank[0][k][0], per_rank[1][k][0]]) for k in range(7)])
    assert torch.equal(merged, torch.cat([x for x, _ in got]))
    x, y = next(data.eval_batches(shard, 99, 16))
    assert torch.equal(x, got[0][0]) and torch.equal(x[:, 1:], y[:, :-1])


def test_bits_per_byte():
    assert bits_per_byte(np.log(2), 100, 100) == pytest.approx(1.0)
    assert bits_per_byte(2.0, 250, 1000) == pytest.approx(2.0 * 0.25 / np.log(2))
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 1, 0)


def test_token_shard_pickles_without_copying(shard):
    import pickle
    s2 = pickle.loads(pickle.dumps(shard))
    assert isinstance(s2.tokens, np.memmap) and np.array_equal(s2[:50], shard[:50])
    assert len(pickle.dumps(shard)) < 2000


# ------------------------------------------------------------------------------ real data
@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="shared data not present")
def test_tinyshakespeare_prepares_quickly(tmp_path):
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()
    t0 = time.perf_counter()
    tok = train_bpe([text], 2048)
    t1 = time.perf_counter()
    meta = prepare(SHAKESPEARE, str(tmp_path / "shk"), tok)
    t2 = time.perf_counter()
    assert t1 - t0 < 10 and t2 - t1 < 10, (t1 - t0, t2 - t1)
    assert meta["n_bytes"]["train"] + meta["n_bytes"]["val"] == os.path.getsize(SHAKESPEARE)
    assert meta["n_tokens"]["train"] + meta["n_tokens"]["val"] == len(tok.encode(text)) + 1  # + final EOS
    val = TokenShard(str(tmp_path / "shk" / "val.bin"))
    assert 0.04 < val.n_bytes / os.path.getsize(SHAKESPEARE) < 0.06
    assert prepare(SHAKESPEARE, str(tmp_path / "shk"), tok)["reused"]
    x, y = Batches(str(tmp_path / "shk" / "train.bin"), 256, 8).get(0)
    assert x.shape == (8, 256) and int(x.max()) < tok.vocab_size
