"""Random dense GGUF files (nanoseek/gguf_random_dense.py): the R1 distills' shapes, tiny files of
each family read back by nanoseek, and, where llama-cpp-python is installed, run by llama.cpp
with nanoseek's greedy tokens and logits. Both sides get token ids, never text."""

import numpy as np
import pytest
import torch

from nanoseek.gguf_dense import read_dense_config, read_dense_gguf
from nanoseek.gguf_file import GGUFModelFile, decode_tensor
from nanoseek.gguf_random_dense import DENSE_SHAPES, dense_shape, dense_shape_plan, write_random_dense_gguf
from nanoseek.gguf_tokenizer import pre_tokenizer_name
from nanoseek.quant.qlinear import QuantLinear
from test_gguf_dense import LLAMA_CPP_TOL, llama_logits, rel_err

FAMILIES = {"qwen2.5-1.5b": "qwen2", "qwen3-8b": "qwen2", "llama3.1-8b": "llama-bpe"}  # shape -> tokenizer.ggml.pre
# the released parameter counts (embedding and head included), in billions
PARAMS_B = {"qwen2.5-1.5b": 1.78, "qwen3-8b": 8.19, "llama3.1-8b": 8.03}
# llama.cpp vs nanoseek, max relative logit error: the dense exports' bounds (test_gguf_dense.py)
# for f32 and q8_0; q4_k_m the random deepseek2 files' (test_gguf_random.py), where llama.cpp
# rounds the activations to q8_K; bf16 as q8_0, llama.cpp rounding the activations to bf16
TOL = {**LLAMA_CPP_TOL, "q4_k_m": 0.05, "bf16": LLAMA_CPP_TOL["q8_0"]}


def tiny(shape: str):
    """A two-layer model of the shape's family (its RoPE scaling, biases, q/k norms), rows of 256."""
    return dense_shape(shape, vocab_size=1280, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, bos_token_id=1100,
                       eos_token_id=1101)


@pytest.mark.parametrize("shape", list(DENSE_SHAPES))
def test_the_shapes_are_the_releases(shape):
    cfg = dense_shape(shape)
    assert cfg.param_counts()["total_params"] / 1e9 == pytest.approx(PARAMS_B[shape], abs=0.01)
    types = {p.qtype.name for p in dense_shape_plan(cfg, "q4_k_m")}
    assert types == {"F32", "Q4_K", "Q6_K"}


@pytest.mark.parametrize("mix", ["q4_k_m", "q8_0", "bf16"])
@pytest.mark.parametrize("shape", list(DENSE_SHAPES))
def test_a_tiny_random_file_reads_back(shape, mix, tmp_path):
    cfg = tiny(shape)
    (path,) = write_random_dense_gguf(str(tmp_path / "a.gguf"), cfg, mix, seed=1)
    (again,) = write_random_dense_gguf(str(tmp_path / "b.gguf"), cfg, mix, seed=1)
    assert open(path, "rb").read() == open(again, "rb").read()
    f = GGUFModelFile(path)
    for name, (_, t) in f.tensors.items():
        assert np.isfinite(decode_tensor(np.asarray(t.data), t.tensor_type)).all(), name
    got = read_dense_config(f)
    for key in ("model_type", "vocab_size", "hidden_size", "num_key_value_heads", "head_dim", "rope_scaling",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(got, key) == getattr(cfg, key), key
    model, tok = read_dense_gguf(path, quantized=True)
    assert pre_tokenizer_name(tok) == FAMILIES[shape] and tok.bos_id == 1100 and tok.eos_id == 1101
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("the quick brown fox", add_bos=True)]))
    assert logits.isfinite().all() and logits.float().std() > 0


def steps_before_a_tie(ours: torch.Tensor, theirs: torch.Tensor, start: int) -> int:
    """How many greedy steps from position `start` on choose a token that leads the runner-up by
    more than twice the two engines' largest logit difference at that step: along them the two
    must pick the same token."""
    n = 0
    for t in range(start, ours.shape[0]):
        top2 = ours[t - 1].topk(2).values
        if top2[0] - top2[1] <= 2 * (ours[t - 1] - theirs[t - 1]).abs().max():
            break
        n += 1
    return n


@pytest.mark.parametrize("mix", list(TOL))
@pytest.mark.parametrize("shape", list(DENSE_SHAPES))
def test_llama_cpp_runs_a_random_dense_file_with_our_tokens(shape, mix, tmp_path):
    """llama.cpp's llama / qwen2 / qwen3 and nanoseek (the exact dequantization, float32) on one
    random file: logits within the dense exports' bounds over llama.cpp's 16 greedy tokens, and
    the same 16 greedy tokens on f32. On the other types llama.cpp rounds the activations, so
    the two greedy paths agree up to the first step whose top two logits lie within twice the
    logit difference (a tie at that precision), and may part there."""
    llama_cpp = pytest.importorskip("llama_cpp")
    (path,) = write_random_dense_gguf(str(tmp_path / "r.gguf"), tiny(shape), mix)
    ours, tok = read_dense_gguf(path, dtype=torch.float32)
    prompt = tok.encode("the quick brown fox jumps over", add_bos=True)
    seq, theirs = llama_logits(llama_cpp, path, prompt, 16)
    with torch.no_grad():
        logits = ours(torch.tensor([seq]))[0]  # [T, V]
        greedy = ours.generate(torch.tensor([prompt]), 16)[0].tolist()
    rel = rel_err(theirs, logits)
    agree = steps_before_a_tie(logits, theirs, len(prompt))
    print(f"llama.cpp vs nanoseek on a random {shape} {mix} file: max relative logit error {rel:.2e}, "
          f"{agree} of 16 greedy steps clear of a tie")
    assert rel < TOL[mix]
    if mix == "f32":
        assert seq == greedy
    else:
        assert seq[:len(prompt) + agree] == greedy[:len(prompt) + agree]


def test_a_quantized_head_is_not_dequantized_to_make_the_cache(tmp_path, monkeypatch):
    """The GQA cache takes the head's dtype and device from the QuantLinear itself: reading its
    `weight` would dequantize the whole [V, h] head once per layer (minutes on an 8B model)."""
    (path,) = write_random_dense_gguf(str(tmp_path / "q.gguf"), tiny("qwen3-8b"), "q4_k_m")
    model, _ = read_dense_gguf(path, quantized=True)
    assert isinstance(model.lm_head, QuantLinear)
    monkeypatch.setattr(QuantLinear, "weight", property(lambda self: pytest.fail("the head was dequantized")))
    cache = model.make_cache(1, 8)
    assert len(cache) == 2 and all(c.k.dtype == torch.bfloat16 for c in cache.values())
