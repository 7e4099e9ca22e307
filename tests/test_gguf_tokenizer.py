"""The R1-distill tokenizers in GGUF (nanoseek/gguf_tokenizer.py): Qwen2.5 / Qwen3 ('qwen2',
'deepseek-r1-qwen') and Llama 3 ('llama-bpe') byte-level BPEs. Small vocabularies are trained here
with each family's Hugging Face pre-tokenizer and special tokens, written into a tiny dense GGUF by
our writer, and read back; the token ids of tricky strings are compared between the Hugging Face
tokenizer, our reader and, where llama-cpp-python is installed, llama.cpp's own tokenizer on the
same file."""

import io
import json
import os
import subprocess
import sys
from typing import NamedTuple

import gguf
import pytest
import tokenizers
import torch
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

import nanoseek.gguf_dense as gd
from hf_util import make_hf_dense
from nanoseek.cli import main
from nanoseek.dense import DenseModel
from nanoseek.dense_config import DenseConfig
from nanoseek.gguf_file import GGUFModelFile
from nanoseek.gguf_tokenizer import GGUFError, pre_tokenizer_name, read_tokenizer
from nanoseek.infer.store import Store
from nanoseek.tokenizer import Tokenizer

# the split regexes as the released tokenizer.json files spell them (case-insensitive contractions)
QWEN2_HF_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_HF_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA_CHAT = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] }}<|eot_id|>{% endfor %}")
R1_CHAT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
           "{% else %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}")

class Style(NamedTuple):
    """One family's Hugging Face tokenizer.json, and the tokenizer.ggml.pre llama.cpp's converter gives it."""
    regex: str  # the split before the byte mapping
    nfc: bool  # an NFC normalizer (Qwen2's tokenizer.json)
    ignore_merges: bool  # Meta's Llama 3 tokenizer.json
    specials: list[str]
    added: list[str]  # non-special added tokens
    bos: str | None
    eos: str
    pad: str | None
    chat_template: str
    gguf_pre: str


STYLES = {
    "qwen2": Style(QWEN2_HF_REGEX, True, False, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                   ["<think>", "</think>"], None, "<|im_end|>", "<|endoftext|>", QWEN_CHAT, "qwen2"),
    "deepseek-r1-qwen": Style(QWEN2_HF_REGEX, True, False,
                              ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                               "<|endoftext|>", "<|im_start|>"], ["<think>", "</think>"],
                              "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>", R1_CHAT,
                              "deepseek-r1-qwen"),
    "llama-bpe": Style(LLAMA3_HF_REGEX, False, True,
                       ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"], [], "<|begin_of_text|>", "<|eot_id|>", None, LLAMA_CHAT, "llama-bpe"),
}

SENTENCES = [
    "The quick brown fox jumps over the lazy dog. It's a dog's life, isn't it? We'll see, they'd say.",
    "In 2024 there were 1234567 visitors; 3.14159 is pi and 2,000,000 is two million.",
    "def add(x, y):\n    return x + y\n\n# comments and    spaces\tand tabs\n",
    "中文字符测试，这是一个句子。日本語のカタカナとひらがな。한국어 텍스트입니다.",
    "Émoji 🙂🚀 and café naïve résumé Ünïcödé — “quotes” and ‘single’ quotes…",
    "URLs like https://example.com/path?q=1&r=2 and emails a.b@c.org, snake_case camelCase kebab-case.",
    "HELLO WORLD! I'M SHOUTING, YOU'RE NOT. They've gone; I'd stay; she'll come.",
    "Ωmega αβγ δέλτα Привет мир ŁÓDŹ straße ß 100% $50 #tag @user ^_^ <b>bold</b>",
]

TRICKY = [
    "1234567", "a 1234567890 b", "3.14159 and 2,000,000", "it's", "He'll've they'd we're I'm you've",
    "IT'S SHE'LL WE'D", "don't 's 'll 'T 'Re", "中文字符测试", "日本語のカタカナとひらがな", "한국어 텍스트",
    "emoji 🙂🚀 mixed", "👨‍👩‍👧 family", " leading space", "trailing space ", "multiple    spaces   inside",
    "   ", "\n", "line1\nline2\n\nline4", "\r\n windows \r\n", "\ttab\tseparated\t\t", " \n \t mixed whitespace \n ",
    "text<think>reasoning</think>answer", "café naïve résumé", "e\u0301 decomposed", "Ünïcödé ÀÉÎ",
    "$100 & 50% off!!! ???", "snake_case and camelCase and kebab-case", "https://example.com/path?q=1&r=2",
    "def f(x):\n    return x**2\n", "ŁÓDŹ straße", "\u00a0no-break\u00a0space", "\u3000ideographic space",
    "''''", "a1b2c3 12ab 1.2.3", "a zyxwvut b", "x < |im_start| > not special", "Привет, мир!", "¿Qué? ¡Sí!",
]
UNMERGED_TEXT = " zyxwvut"  # kept out of the training texts
UNMERGED = "Ġzyxwvut"  # UNMERGED_TEXT byte-level
# strings with each family's special tokens inside the text
SPECIAL_TEXTS = {
    "qwen2": ["<|im_start|>user\nhello<|im_end|>\n", "<|im_start|><|im_start|>", "a<|endoftext|>b",
              " <|im_end|> spaced <|im_start|> "],
    "deepseek-r1-qwen": ["<｜begin▁of▁sentence｜><｜User｜>1+1?<｜Assistant｜><think>\n2</think>",
                         "x<｜end▁of▁sentence｜>y", "<|im_start|>mixed<｜User｜>"],
    "llama-bpe": ["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
                  "a<|end_of_text|>b", " <|eot_id|> <|eot_id|>"],
}
# Where llama.cpp itself tokenizes differently from the Hugging Face tokenizer.json, and why.
# Qwen2's tokenizer.json NFC-normalizes the text first; llama.cpp (and the GGUF) has no normalizer, so
# a decomposed "e" + U+0301 stays two code points there and becomes "é" in Hugging Face's.
HF_DIFFERS = {("qwen2", "e\u0301 decomposed"), ("deepseek-r1-qwen", "e\u0301 decomposed")}


def make_hf_tokenizer(style: str, directory: str) -> str:
    """Train a small byte-level BPE of `style` and save it as a Hugging Face tokenizer folder."""
    st = STYLES[style]

    def shell(model):
        tk = tokenizers.Tokenizer(model)
        if st.nfc:
            tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(st.regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tk.decoder = decoders.ByteLevel()
        return tk

    trained = shell(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=0, show_progress=False)
    # the tricky strings are trained on too, so that their pieces are whole tokens the splits must find
    trained.train_from_iterator(SENTENCES + [t for t in TRICKY if UNMERGED_TEXT not in t], trainer)
    bpe = json.loads(trained.to_str())["model"]
    vocab, merges = bpe["vocab"], [tuple(m) for m in bpe["merges"]]
    assert UNMERGED not in vocab and sorted(vocab.values()) == list(range(len(vocab)))
    if st.ignore_merges:  # a whole word in the vocabulary that no merge makes: found only by ignore_merges
        vocab[UNMERGED] = len(vocab)
    tk = shell(models.BPE(vocab=vocab, merges=merges, ignore_merges=st.ignore_merges))
    tk.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in st.specials])
    tk.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in st.added])
    bos = st.bos
    if bos is not None:
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, tk.token_to_id(bos))])
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    os.makedirs(directory, exist_ok=True)
    tk.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": st.eos,
                   "pad_token": st.pad, "chat_template": st.chat_template}, f)
    return directory


def tiny_dense(tok: Tokenizer, style: str) -> DenseModel:
    model_type = "llama" if style == "llama-bpe" else "qwen2"
    cfg = DenseConfig(model_type=model_type, vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      max_position_embeddings=128, rope_theta=10000.0, tie_word_embeddings=True,
                      torch_dtype="float32")
    return DenseModel.from_config(cfg, dtype=torch.float32, seed=0)


@pytest.fixture(scope="module", params=list(STYLES))
def written(request, tmp_path_factory):
    """style -> (the Hugging Face tokenizer folder, its Tokenizer, the GGUF our writer made)."""
    style = request.param
    root = tmp_path_factory.mktemp(style)
    hf_dir = make_hf_tokenizer(style, str(root / "hf"))
    tok = Tokenizer.from_dir(hf_dir)
    path = str(root / "m.gguf")
    add_pre = gguf.GGUFWriter.add_tokenizer_pre
    if STYLES[style].gguf_pre != pre_tokenizer_name(tok):  # the converter's name for the R1 distill's vocabulary
        gguf.GGUFWriter.add_tokenizer_pre = lambda self, pre: add_pre(self, STYLES[style].gguf_pre)
    try:
        (path,) = gd.write_dense_gguf(tiny_dense(tok, style), tok, path, "f32")
    finally:
        gguf.GGUFWriter.add_tokenizer_pre = add_pre
    return style, hf_dir, tok, path


def texts_of(style):
    return TRICKY + SPECIAL_TEXTS[style]


def test_the_writer_names_the_pre_tokenizer_as_llama_cpp_does(written):
    style, _, tok, path = written
    f = GGUFModelFile(path)
    assert f.get("tokenizer.ggml.pre") == STYLES[style].gguf_pre
    assert pre_tokenizer_name(tok) == ("llama-bpe" if style == "llama-bpe" else "qwen2")
    types = f.get("tokenizer.ggml.token_type")
    tokens = f.get("tokenizer.ggml.tokens")
    for t in STYLES[style].specials:
        assert types[tokens.index(t)] == gguf.TokenType.CONTROL, t
    for t in STYLES[style].added:
        assert types[tokens.index(t)] == gguf.TokenType.USER_DEFINED, t
    assert f.get("tokenizer.ggml.add_bos_token") == (STYLES[style].bos is not None)


def test_read_tokenizer_gives_the_special_ids_and_template(written):
    style, _, tok, path = written
    back = read_tokenizer(GGUFModelFile(path))
    assert (back.bos_id, back.eos_id, back.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert (back.bos_token, back.eos_token, back.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)
    assert back.chat_template == tok.chat_template == STYLES[style].chat_template
    assert back.vocab_size == tok.vocab_size
    with_special = back.tk.encode("a", add_special_tokens=True).ids
    assert (with_special[:1] == [back.bos_id]) == (STYLES[style].bos is not None)
    # written again, the tokenizer read from the file gives the same metadata
    again = gd.write_dense_gguf(tiny_dense(back, style), back, os.path.join(os.path.dirname(path), "again.gguf"), "f32")
    f, g = GGUFModelFile(path), GGUFModelFile(again[0])
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert f.get(key) == g.get(key), key
    assert g.get("tokenizer.ggml.pre") == ("llama-bpe" if style == "llama-bpe" else "qwen2")


def test_our_reader_tokenizes_like_the_hugging_face_tokenizer(written):
    style, hf_dir, _, path = written
    hf = tokenizers.Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    ours = read_tokenizer(GGUFModelFile(path))
    texts = texts_of(style)
    assert len(texts) >= 30
    for text in texts:
        want, got = hf.encode(text, add_special_tokens=False).ids, ours.encode(text)
        if (style, text) in HF_DIFFERS:
            assert got != want, text  # the documented difference still holds
        else:
            assert got == want, text
        assert ours.decode(got) == text  # byte-level: the text back, unnormalized


def test_llama_cpp_tokenizes_like_our_reader(written):
    llama_cpp = pytest.importorskip("llama_cpp")
    style, hf_dir, _, path = written
    hf = tokenizers.Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    ours = read_tokenizer(GGUFModelFile(path))
    llm = llama_cpp.Llama(model_path=path, n_threads=2, n_ctx=64, verbose=False, vocab_only=True)
    try:
        for text in texts_of(style):
            theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
            assert theirs == ours.encode(text), text
            assert (theirs == hf.encode(text, add_special_tokens=False).ids) == ((style, text) not in HF_DIFFERS), text
        with_bos = llm.tokenize(b"hi", add_bos=True, special=True)
        assert (with_bos[:1] == [ours.bos_id]) == (STYLES[style].bos is not None)
    finally:
        llm.close()


def test_an_unknown_pre_tokenizer_names_the_file_key_and_known_names(tmp_path):
    tok = Tokenizer.from_dir(make_hf_tokenizer("qwen2", str(tmp_path / "hf")))
    add_pre = gguf.GGUFWriter.add_tokenizer_pre
    gguf.GGUFWriter.add_tokenizer_pre = lambda self, pre: add_pre(self, "falcon")
    try:
        (path,) = gd.write_dense_gguf(tiny_dense(tok, "qwen2"), tok, str(tmp_path / "m.gguf"), "f32")
    finally:
        gguf.GGUFWriter.add_tokenizer_pre = add_pre
    with pytest.raises(GGUFError, match=r"m\.gguf: key 'tokenizer.ggml.pre' is 'falcon'") as e:
        read_tokenizer(GGUFModelFile(path))
    for name in ("gpt-2", "deepseek-v3", "qwen2", "deepseek-r1-qwen", "llama-bpe"):
        assert repr(name) in str(e.value), name


def test_a_split_regex_without_a_llama_cpp_name_is_refused_on_writing(tmp_path):
    hf_dir = make_hf_tokenizer("qwen2", str(tmp_path / "hf"))
    spec = json.load(open(os.path.join(hf_dir, "tokenizer.json"), encoding="utf-8"))
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{N}{1,2}|\p{L}+|\s+|."
    tok = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)), bos_token=None, eos_token="<|im_end|>")
    with pytest.raises(GGUFError, match="has no llama.cpp name"):
        gd.write_dense_gguf(tiny_dense(tok, "qwen2"), tok, str(tmp_path / "x.gguf"), "f32")


@pytest.mark.parametrize("style,model_type", [("qwen2", "qwen3"), ("llama-bpe", "llama")])
def test_export_and_import_need_no_tokenizer_folder(style, model_type, tmp_path, monkeypatch, capsys):
    """A Hugging Face checkpoint with a Qwen2- / Llama-3-style tokenizer.json: `export` names its
    pre-tokenizer, and `create --from FILE.gguf` rebuilds the tokenizer from the file alone."""
    monkeypatch.setenv("NANOSEEK_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    ckpt = make_hf_tokenizer(style, str(tmp_path / "ckpt"))
    hf_tok = Tokenizer.from_dir(ckpt)
    make_hf_dense(model_type, ckpt, vocab_size=hf_tok.vocab_size)
    assert main(["create", "m", "--from", ckpt]) == 0
    out = str(tmp_path / "m.gguf")
    assert main(["export", "m", out, "--type", "f32"]) == 0
    assert GGUFModelFile(out).get("tokenizer.ggml.pre") == style
    assert main(["create", "g", "--from", out]) == 0
    capsys.readouterr()
    stored = Tokenizer.from_dir(Store().path_of("g"))
    hf = tokenizers.Tokenizer.from_file(os.path.join(ckpt, "tokenizer.json"))
    for text in texts_of(style):
        if (style, text) not in HF_DIFFERS:
            assert stored.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
    assert (stored.bos_id, stored.eos_id, stored.chat_template) == (hf_tok.bos_id, hf_tok.eos_id, hf_tok.chat_template)


@pytest.mark.parametrize("style,model_type", [("qwen2", "qwen2"), ("deepseek-r1-qwen", "qwen2"), ("llama-bpe", "llama")])
def test_llama_cpp_converter_files_read_like_the_hugging_face_tokenizer(style, model_type, tmp_path):
    """llama.cpp's converter on a checkpoint with each family's tokenizer.json (told the family's
    pre-tokenizer name, which it would find by hashing the released tokenizers): its tokens, types
    and merges are ours, and our reader of its file tokenizes as the Hugging Face tokenizer does."""
    pytest.importorskip("llama_cpp")
    from test_gguf_dense import CONVERT, converter  # the sdist's converter, skipped without it
    root = converter(tmp_path)
    ckpt = make_hf_tokenizer(style, str(tmp_path / "ckpt"))
    hf_tok = Tokenizer.from_dir(ckpt)
    make_hf_dense(model_type, ckpt, vocab_size=hf_tok.vocab_size)
    out = tmp_path / "conv.gguf"
    p = subprocess.run([sys.executable, "-c", CONVERT.replace("'gpt-2'", repr(STYLES[style].gguf_pre)), ckpt,
                        "--outfile", str(out), "--outtype", "f32"], cwd=root, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    theirs = GGUFModelFile(str(out))
    assert theirs.get("tokenizer.ggml.pre") == STYLES[style].gguf_pre
    (ours_file,) = gd.write_dense_gguf(tiny_dense(hf_tok, style), hf_tok, str(tmp_path / "ours.gguf"), "f32")
    ours = GGUFModelFile(ours_file)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.eos_token_id"):
        assert theirs.get(key) == ours.get(key), key
    back = read_tokenizer(theirs)
    hf = tokenizers.Tokenizer.from_file(os.path.join(ckpt, "tokenizer.json"))
    for text in texts_of(style):
        if (style, text) not in HF_DIFFERS:
            assert back.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
