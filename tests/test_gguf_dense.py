"""GGUF for the dense R1-distill families (nanoseek/gguf_dense.py): llama.cpp's `llama`, `qwen2` and
`qwen3` files in and out. Round trips, the quantized import, bad input and the store in the default
suite; where llama-cpp-python is installed, llama.cpp's own model on our exports, and where its
sdist is named (NANOSEEK_LLAMA_CPP_SDIST), nanoseek on the files of llama.cpp's converter, against
transformers. Both sides get token ids (the fixture's byte-level BPE), never text."""

import io
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

import nanoseek.gguf_dense as gd
from hf_util import DENSE_CASES, make_hf_dense
from nanoseek.cli import main
from nanoseek.dense import DenseModel
from nanoseek.gguf_file import GGUFError, GGUFModelFile, Q, write_gguf
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.infer.store import Store
from nanoseek.load import load_model
from nanoseek.model import DeepSeekV3
from nanoseek.quant.qlinear import QuantEmbedding, QuantLinear
from nanoseek.tokenizer import Tokenizer

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "memorizer")
SDIST_ENV = "NANOSEEK_LLAMA_CPP_SDIST"
VOCAB = 352  # the fixture tokenizer's 324 tokens, padded
CASES = list(DENSE_CASES)  # llama3 RoPE, llama with linear RoPE and biases, qwen2 tied, qwen3, qwen3 with YaRN
CONFIG_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                 "rope_theta", "rope_scaling", "attention_bias", "mlp_bias", "tie_word_embeddings")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(FIXTURE)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """case -> (folder of a tiny random transformers checkpoint with the fixture's tokenizer, the
    transformers model)."""
    out = {}
    for case, (model_type, kw) in DENSE_CASES.items():
        path = tmp_path_factory.mktemp(case)
        hf = make_hf_dense(model_type, str(path), **{**kw, "vocab_size": VOCAB})
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(FIXTURE, name), path)
        out[case] = (str(path), hf)
    return out


def ids_of(tok, text="hello world, the quick brown fox jumps over the lazy dog"):
    return torch.tensor([tok.encode(text, add_bos=True)])


def rel_err(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


# ------------------------------------------------------------------ round trips (default suite)
@pytest.mark.parametrize("case", CASES)
def test_f32_round_trip_is_exact(case, checkpoints, tok, tmp_path):
    path, _ = checkpoints[case]
    model = load_model(path, dtype=torch.float32)
    (file,) = gd.write_dense_gguf(model, tok, str(tmp_path / "m.gguf"), "f32")
    assert GGUFModelFile(file).get("general.architecture") == model.config.model_type
    back, tok2 = gd.read_dense_gguf(file)
    assert isinstance(back, DenseModel) and back.lm_head.weight.dtype == torch.float32
    for field in CONFIG_FIELDS:
        assert getattr(back.config, field) == getattr(model.config, field), field
    ids = ids_of(tok)
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    assert tok2.encode("the quick brown fox <think>") == tok.encode("the quick brown fox <think>")
    assert (tok2.bos_id, tok2.eos_id) == (tok.bos_id, tok.eos_id)


def test_llama_row_permutation_is_undone():
    """llama.cpp's `llama` q/k rows (interleaved RoPE pairs): permute_rows is convert_hf_to_gguf's
    LlamaModel.permute and unpermute_rows its inverse, for weights and biases."""
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).view(32, 3)
    p = gd.permute_rows(w, 4)
    assert torch.equal(p[:4, 0], w[[0, 4, 1, 5], 0])  # head 0: pairs (i, i + d/2) side by side
    assert torch.equal(gd.unpermute_rows(p, 4), w)
    b = torch.arange(16.0)
    assert torch.equal(gd.unpermute_rows(gd.permute_rows(b, 2), 2), b)


# the bound on |read - written| / max |written| per tensor (gguf_file's BOUNDS), and on the logits
BOUNDS = {"f16": (2 ** -11, 2e-3), "bf16": (2 ** -8, 2e-2), "q8_0": (1 / 254 * 1.15, 3e-2)}


@pytest.mark.parametrize("qtype", list(BOUNDS))
def test_encoded_round_trip_is_close(qtype, checkpoints, tok, tmp_path):
    weight_bound, logit_bound = BOUNDS[qtype]
    path, _ = checkpoints["llama3"]
    model = load_model(path, dtype=torch.float32)
    (file,) = gd.write_dense_gguf(model, tok, str(tmp_path / f"m-{qtype}.gguf"), qtype)
    back, _ = gd.read_dense_gguf(file, dtype=torch.float32)
    written = model.state_dict()
    for name, got in back.state_dict().items():
        want = written[name]
        assert (got - want).abs().max() <= weight_bound * want.abs().max() + 1e-12, name
    ids = ids_of(tok)
    with torch.no_grad():
        assert rel_err(back(ids), model(ids)) < logit_bound
    default, _ = gd.read_dense_gguf(file)
    assert default.lm_head.weight.dtype == (torch.float16 if qtype == "f16" else torch.bfloat16)


@pytest.mark.parametrize("case", ["llama-linear-bias", "qwen2-tied", "qwen3"])
@pytest.mark.parametrize("qtype", ["q8_0", "q4_k_m", "f16"])
def test_quantized_import_computes_the_dequantized_model(qtype, case, checkpoints, tok, tmp_path):
    """read_dense_gguf(quantized=True) holds the file's bytes (QuantLinear / QuantEmbedding, the tied
    head over the embedding's bytes) and computes exactly what the dequantized float32 import does."""
    path, _ = checkpoints[case]
    (file,) = gd.write_dense_gguf(load_model(path, dtype=torch.float32), tok, str(tmp_path / "m.gguf"), qtype)
    exact, _ = gd.read_dense_gguf(file, dtype=torch.float32)
    held, _ = gd.read_dense_gguf(file, dtype=torch.float32, quantized=True)
    assert isinstance(held.lm_head, QuantLinear) and isinstance(held.model.embed_tokens, QuantEmbedding)
    assert not any(p.dim() >= 2 for p in held.parameters())
    ids = ids_of(tok)
    with torch.no_grad():
        assert torch.equal(held(ids), exact(ids))
    prompt = ids[0].tolist()
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    got = Engine(held, tok, max_context=64, max_batch=2).generate([prompt], params)[0].token_ids
    assert got == exact.generate(ids, 12)[0, len(prompt):].tolist()


def test_a_tied_embedding_ggml_lacks_stays_float_and_tied(checkpoints, tok, tmp_path, monkeypatch):
    """Where the embedding's type is one nanoseek.quant.ggml lacks (read through gguf-py instead), the
    quantized import keeps it float, and the tied head is that same float matrix."""
    path, _ = checkpoints["qwen2-tied"]
    (file,) = gd.write_dense_gguf(load_model(path, dtype=torch.float32), tok, str(tmp_path / "m.gguf"), "q8_0")
    exact, _ = gd.read_dense_gguf(file, dtype=torch.float32)
    qtype = GGUFModelFile.qtype
    monkeypatch.setattr(GGUFModelFile, "qtype", lambda self, name: None if name == "token_embd.weight" else qtype(self, name))
    held, _ = gd.read_dense_gguf(file, dtype=torch.float32, quantized=True)
    assert held.lm_head.weight is held.model.embed_tokens.weight
    ids = ids_of(tok)
    with torch.no_grad():
        assert torch.equal(held(ids), exact(ids))


@pytest.mark.parametrize("tied", [False, True])
def test_q4_k_m_types(tied, tmp_path):
    """Under q4_k_m: output q6_k, attn_v and ffn_down q6_k in llama.cpp's use_more_bits layers, q4_k
    elsewhere (256-wide rows, so no fallback); norms and biases f32; a tied embedding takes q6_k.
    Where llama-cpp-python is installed, llama.cpp's own quantizer types our f32 file the same way
    (under q4_k_m and q8_0)."""
    make_hf_dense("qwen2", str(tmp_path / "hf"), hidden_size=256, intermediate_size=256, num_hidden_layers=8,
                  vocab_size=VOCAB, tie_word_embeddings=tied)
    model = load_model(str(tmp_path / "hf"), dtype=torch.float32)
    cfg = model.config
    shapes = {gd.dense_gguf_name(n): tuple(t.shape) for n, t in model.state_dict().items()
              if not (tied and n == "lm_head.weight")}
    types = {n: gd.dense_tensor_type("q4_k_m", n, shape, cfg) for n, shape in shapes.items()}
    assert types["token_embd.weight"] == (Q.Q6_K if tied else Q.Q4_K)
    assert ("output.weight" not in types) if tied else types["output.weight"] == Q.Q6_K
    more_bits = {0, 3, 6, 7}  # i < n/8, i >= 7n/8, (i - n/8) % 3 == 2 for n = 8
    for i in range(8):
        for role in ("attn_v", "ffn_down"):
            assert types[f"blk.{i}.{role}.weight"] == (Q.Q6_K if i in more_bits else Q.Q4_K), (role, i)
        assert types[f"blk.{i}.attn_q.weight"] == types[f"blk.{i}.ffn_up.weight"] == Q.Q4_K
        assert types[f"blk.{i}.attn_q.bias"] == types[f"blk.{i}.attn_norm.weight"] == Q.F32
    llama_cpp = pytest.importorskip("llama_cpp")
    (src,) = gd.write_dense_gguf(model, Tokenizer.from_dir(FIXTURE), str(tmp_path / "f32.gguf"), "f32")
    for ftype, mix in ((15, "q4_k_m"), (7, "q8_0")):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftype, 2
        out = str(tmp_path / f"{mix}.gguf")
        assert llama_cpp.llama_model_quantize(src.encode(), out.encode(), params) == 0
        theirs = {n: t.tensor_type for n, (_, t) in GGUFModelFile(out).tensors.items()}
        assert theirs == {n: gd.dense_tensor_type(mix, n, shape, cfg) for n, shape in shapes.items()}, mix


@pytest.mark.slow
def test_q4_k_m_types_of_a_70b_shaped_model(tmp_path):
    """llama.cpp takes an 80-block Llama with GQA for a 70B and gives its attn_v q5_k under q4_k_m;
    nanoseek lacks q5_k and writes q6_k there; every other tensor's type is llama.cpp's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    make_hf_dense("llama", str(tmp_path / "hf"), hidden_size=256, intermediate_size=256, num_hidden_layers=80,
                  vocab_size=VOCAB)
    model = load_model(str(tmp_path / "hf"), dtype=torch.float32)
    (src,) = gd.write_dense_gguf(model, Tokenizer.from_dir(FIXTURE), str(tmp_path / "f32.gguf"), "f32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = 15, 2
    out = str(tmp_path / "q4_k_m.gguf")
    assert llama_cpp.llama_model_quantize(src.encode(), out.encode(), params) == 0
    f = GGUFModelFile(src)
    for n, (_, t) in GGUFModelFile(out).tensors.items():
        ours = gd.dense_tensor_type("q4_k_m", n, f.shape(n), model.config)
        assert ours == (Q.Q6_K if t.tensor_type == Q.Q5_K else t.tensor_type), n
    assert gd.dense_tensor_type("q4_k_m", "blk.10.attn_v.weight", (128, 256), model.config) == Q.Q6_K


# ------------------------------------------------------------------ bad input
def test_what_llama_cpp_computes_differently_is_refused(checkpoints, tok, tmp_path):
    path, _ = checkpoints["qwen3-yarn"]
    model = load_model(path, dtype=torch.float32)
    rs = {**model.config.rope_scaling, "attention_factor": 1.3}
    odd = DenseModel.empty(model.config.replace(rope_scaling=rs), dtype=torch.float32)
    with pytest.raises(GGUFError, match="config field 'rope_scaling.attention_factor'"):
        gd.write_dense_gguf(odd, tok, str(tmp_path / "x.gguf"), "f32")
    with pytest.raises(GGUFError, match="unsupported --type"):
        gd.write_dense_gguf(model, tok, str(tmp_path / "x.gguf"), "q5_1")
    assert not os.listdir(tmp_path)


def test_bad_files_name_the_key(checkpoints, tok, tmp_path, monkeypatch):
    path, _ = checkpoints["qwen2-tied"]
    model = load_model(path, dtype=torch.float32)
    # a deepseek2 file is not a dense one
    ds = DeepSeekV3.from_pretrained(FIXTURE, dtype=torch.float32)
    (file,) = write_gguf(ds, tok, str(tmp_path / "ds.gguf"), "f32")
    with pytest.raises(GGUFError, match="key 'general.architecture' is 'deepseek2'"):
        gd.read_dense_gguf(file)
    assert isinstance(gd.read_any_gguf(file)[0], DeepSeekV3)
    # an unknown RoPE scaling type
    monkeypatch.setattr(gd, "_metadata", lambda w, cfg, name, ftype, plain=gd._metadata: (
        plain(w, cfg, name, ftype), w.add_string("qwen2.rope.scaling.type", "longrope")))
    (file,) = gd.write_dense_gguf(model, tok, str(tmp_path / "rope.gguf"), "f32")
    with pytest.raises(GGUFError, match="key 'qwen2.rope.scaling.type' is 'longrope'"):
        gd.read_dense_gguf(file)


def test_a_pre_tokenizer_nanoseek_lacks_needs_the_tokenizer_folder(checkpoints, tok, tmp_path, monkeypatch):
    path, _ = checkpoints["qwen2-tied"]
    model = load_model(path, dtype=torch.float32)
    monkeypatch.setattr(gd.gguf.GGUFWriter, "add_tokenizer_pre", lambda self, pre: self.add_string(
        "tokenizer.ggml.pre", "falcon"))
    (file,) = gd.write_dense_gguf(model, tok, str(tmp_path / "q.gguf"), "f32")
    monkeypatch.undo()
    with pytest.raises(GGUFError, match=r"'tokenizer.ggml.pre' is 'falcon'.*--tokenizer DIR"):
        gd.read_dense_gguf(file)
    back, tok2 = gd.read_dense_gguf(file, tokenizer_dir=path)
    assert tok2.encode("hello world") == tok.encode("hello world")
    monkeypatch.setenv("NANOSEEK_HOME", str(tmp_path / "home"))
    with pytest.raises(SystemExit, match="--tokenizer DIR"):
        main(["create", "qt", "--from", file])
    assert main(["create", "qt", "--from", file, "--tokenizer", path]) == 0
    entry = Store().path_of("qt")
    assert isinstance(load_model(entry).lm_head, QuantLinear)  # the tokenizer kept beside the file is used


# ------------------------------------------------------------------ store and CLI
def run_cli(argv, monkeypatch, capsys, stdin=""):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    return code, capsys.readouterr()


def test_create_export_chat_for_a_dense_gguf(checkpoints, tok, tmp_path, monkeypatch, capsys):
    """`create --from FILE.gguf` keeps a dense GGUF quantized; load_model, the engine and `chat` run it
    with the dequantized model's greedy tokens; `export` writes a stored dense model as GGUF."""
    monkeypatch.setenv("NANOSEEK_HOME", str(tmp_path / "home"))
    path, _ = checkpoints["qwen3"]
    assert run_cli(["create", "q3", "--from", path], monkeypatch, capsys)[0] == 0
    out = str(tmp_path / "q3.gguf")
    code, cap = run_cli(["export", "q3", out, "--type", "q8_0"], monkeypatch, capsys)
    assert code == 0 and "wrote" in cap.out and GGUFModelFile(out).get("general.architecture") == "qwen3"
    code, cap = run_cli(["create", "q3g", "--from", out], monkeypatch, capsys)
    assert code == 0 and "created 'q3g:latest'" in cap.out
    manifest = Store().manifest("q3g")
    assert manifest["architecture"] == "qwen3" and manifest["quantization"] == "Q8_0"
    entry = Store().path_of("q3g")
    assert not any(f.endswith(".safetensors") for f in os.listdir(entry))
    model = load_model(entry, dtype=torch.float32)
    assert isinstance(model, DenseModel) and isinstance(model.lm_head, QuantLinear)
    assert isinstance(load_model(out, dtype=torch.float32).lm_head, QuantLinear)  # the file itself
    exact, _ = gd.read_dense_gguf(out, dtype=torch.float32)
    prompt = tok.encode("hello world", add_bos=True)
    got = Engine(model, Tokenizer.from_dir(entry), max_context=64, max_batch=2).generate(
        [prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0].token_ids
    assert got == exact.generate(torch.tensor([prompt]), 12)[0, len(prompt):].tolist()
    chat = run_cli(["chat", "q3g", "--max-tokens", "8", "--temperature", "0"], monkeypatch, capsys,
                   stdin="What is the capital of France?\n")
    assert chat[0] == 0 and chat[1].out.strip()
    assert run_cli(["create", "q3f", "--from", out, "--dtype", "float32"], monkeypatch, capsys)[0] == 0
    assert any(f.endswith(".safetensors") for f in os.listdir(Store().path_of("q3f")))


# ------------------------------------------------------------------ against llama.cpp
def llama_logits(llama_cpp, path, prompt, n_new):
    """llama.cpp's greedy continuation of `prompt` and its logits [T, V] over prompt + continuation."""
    llm = llama_cpp.Llama(model_path=path, logits_all=True, n_threads=2, n_ctx=128, verbose=False,
                          type_k=0, type_v=0)  # f32 cache (GGML_TYPE_F32)
    llm.eval(prompt)
    seq = list(prompt)
    for _ in range(n_new):
        seq.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([seq[-1]])
    llm.reset()
    llm.eval(seq)
    logits = torch.tensor(np.array(llm.scores[: len(seq)]))
    llm.close()
    return seq, logits


# max relative logit error, llama.cpp vs nanoseek on the same file: measured below 1e-6 on f32 (float
# summation order) and 1.2e-2 to 2e-2 on q8_0 (llama.cpp rounds the activations to q8_0 as well)
LLAMA_CPP_TOL = {"f32": 1e-5, "q8_0": 3e-2}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("qtype", list(LLAMA_CPP_TOL))
def test_llama_cpp_runs_our_files(qtype, case, checkpoints, tok, tmp_path):
    """Our export in llama.cpp's own `llama` / `qwen2` / `qwen3` and in nanoseek (the model read back
    from the file): close logits over llama.cpp's greedy continuation, the same greedy on f32."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path, _ = checkpoints[case]
    (file,) = gd.write_dense_gguf(load_model(path, dtype=torch.float32), tok, str(tmp_path / "m.gguf"), qtype)
    ours, _ = gd.read_dense_gguf(file, dtype=torch.float32)
    prompt = tok.encode("hello world, the quick brown fox", add_bos=True)
    seq, theirs = llama_logits(llama_cpp, file, prompt, 16)
    with torch.no_grad():
        logits = ours(torch.tensor([seq]))[0]
    rel = rel_err(theirs, logits)
    print(f"llama.cpp vs nanoseek, {case} {qtype}: max relative logit error {rel:.2e}")
    assert rel < LLAMA_CPP_TOL[qtype]
    if qtype == "f32":
        assert seq == ours.generate(torch.tensor([prompt]), 16)[0].tolist()


def converter(tmp_path):
    """llama.cpp's convert_hf_to_gguf.py (with its gguf-py) extracted from the sdist named by the env var."""
    sdist = os.environ.get(SDIST_ENV)
    if not sdist or not os.path.isfile(sdist):
        pytest.skip(f"set {SDIST_ENV} to llama-cpp-python's sdist to run llama.cpp's converter")
    root = tmp_path / "llama.cpp"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if "/vendor/llama.cpp/" in m.name
                   and m.name.split("/vendor/llama.cpp/", 1)[1].split("/")[0] in ("convert_hf_to_gguf.py", "conversion", "gguf-py")]
        for m in members:
            m.name = m.name.split("/vendor/llama.cpp/", 1)[1]
        tar.extractall(root, members=members, filter="data")
    return root


# The converter names pre-tokenizers by hashing known tokenizers' output and does not know the
# fixture's (GPT-2's byte-level regex): the run tells it 'gpt-2'. It imports sentencepiece before
# looking for a tokenizer.model; without that package the run says what it would find: no such file.
CONVERT = ("import sys; sys.path.insert(0, '.'); import conversion.base as b; "
           "b.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2'; "
           "b.TextModel._set_vocab_sentencepiece = lambda self: (_ for _ in ()).throw(FileNotFoundError('tokenizer.model')); "
           "import convert_hf_to_gguf as c; sys.argv = ['convert_hf_to_gguf.py'] + sys.argv[1:]; c.main()")


def convert(root, checkpoint, out, outtype):
    p = subprocess.run([sys.executable, "-c", CONVERT, checkpoint, "--outfile", str(out), "--outtype", outtype],
                       cwd=root, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return str(out)


@pytest.mark.parametrize("case", CASES)
def test_llama_cpp_converter_files_load_with_transformers_logits(case, checkpoints, tok, tmp_path):
    """llama.cpp's converter on a transformers checkpoint (f32): nanoseek's import gives
    transformers' logits within 1e-4, and our own export of the same checkpoint has the converter's
    tensors (names, types, shapes, bytes) and metadata."""
    pytest.importorskip("llama_cpp")
    root = converter(tmp_path)
    path, hf = checkpoints[case]
    theirs_file = convert(root, path, tmp_path / "conv.gguf", "f32")
    model, tok2 = gd.read_dense_gguf(theirs_file, dtype=torch.float32)
    ids = ids_of(tok)
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    print(f"llama.cpp converter f32 of {case} read by nanoseek: max |logit - transformers'| {diff:.2e}")
    assert diff <= 1e-4
    assert tok2.encode("the quick brown fox") == tok.encode("the quick brown fox")

    (ours_file,) = gd.write_dense_gguf(load_model(path, dtype=torch.float32), tok, str(tmp_path / "ours.gguf"), "f32")
    theirs, mine = GGUFModelFile(theirs_file), GGUFModelFile(ours_file)
    assert {n: (t.tensor_type, t.shape.tolist()) for n, (_, t) in mine.tensors.items()} == \
           {n: (t.tensor_type, t.shape.tolist()) for n, (_, t) in theirs.tensors.items()}
    for n, (_, t) in theirs.tensors.items():
        if n == gd.ROPE_FREQS:  # the same divisors, computed in another order
            np.testing.assert_allclose(np.asarray(mine.tensors[n][1].data), np.asarray(t.data), rtol=1e-6)
        else:
            assert np.array_equal(np.asarray(mine.tensors[n][1].data), np.asarray(t.data)), n
    arch = model.config.model_type
    keys = {k for k in theirs.fields if k.startswith(f"{arch}.")}
    assert {k: mine.get(k) for k in keys} == {k: theirs.get(k) for k in keys}


@pytest.mark.parametrize("case", ["llama3", "qwen2-tied", "qwen3"])
def test_llama_cpp_converter_q8_0_is_ours(case, checkpoints, tok, tmp_path):
    """The converter's q8_0 file holds the bytes of our q8_0 export (gguf-py's quantizer == ours), and
    nanoseek's quantized import of it stays within q8_0's measured error of transformers."""
    pytest.importorskip("llama_cpp")
    root = converter(tmp_path)
    path, hf = checkpoints[case]
    theirs = GGUFModelFile(convert(root, path, tmp_path / "conv.gguf", "q8_0"))
    (ours_file,) = gd.write_dense_gguf(load_model(path, dtype=torch.float32), tok, str(tmp_path / "ours.gguf"), "q8_0")
    mine = GGUFModelFile(ours_file)
    for n, (_, t) in theirs.tensors.items():
        assert mine.tensors[n][1].tensor_type == t.tensor_type, n
        if t.tensor_type == Q.Q8_0:
            assert np.array_equal(np.asarray(mine.tensors[n][1].data), np.asarray(t.data)), n
    held, _ = gd.read_dense_gguf(theirs.path, dtype=torch.float32, quantized=True)
    ids = ids_of(tok)
    with torch.no_grad():
        rel = rel_err(held(ids), hf(ids).logits)
    print(f"llama.cpp converter q8_0 of {case}, nanoseek's quantized import vs transformers: {rel:.2e}")
    assert rel < 3e-2
