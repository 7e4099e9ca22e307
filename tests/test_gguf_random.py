"""Random GGUF files of any config (nanoseek/gguf_random.py): valid blocks with the init spread,
read by nanoseek, and, where llama-cpp-python is installed, run by llama.cpp with the same logits."""

import numpy as np
import pytest
import torch

from nanoseek import ModelConfig
from nanoseek.gguf_file import GGUFModelFile, decode_tensor, read_gguf
from nanoseek.gguf_random import random_blocks, write_random_gguf
from nanoseek.quant import ggml
from test_gguf import llama_logits


def config(**kw):
    """A tiny V2-Lite-like model with rows of 256 (so q4_k / q6_k cover the matrices)."""
    return ModelConfig.from_preset("nano", **{**dict(
        vocab_size=352, hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=2, q_lora_rank=None, kv_lora_rank=256, qk_nope_head_dim=32, qk_rope_head_dim=32,
        v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        num_nextn_predict_layers=0, max_position_embeddings=1024), **kw})


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q5_0", "q4_k", "q6_k"])
def test_random_blocks_have_the_asked_spread(qtype):
    raw = random_blocks(4096, qtype, 0.02, torch.Generator().manual_seed(0))
    w = ggml.dequantize(raw, qtype)
    assert w.isfinite().all()
    assert abs(w.mean().item()) < 0.02 * 0.02 and w.std().item() == pytest.approx(0.02, rel=0.02)


@pytest.mark.parametrize("mix", ["q4_k_m", "q8_0", "f16"])
def test_random_file_reads_back_finite_and_seeded(mix, tmp_path):
    cfg = config()
    (path,) = write_random_gguf(str(tmp_path / "a.gguf"), cfg, mix, seed=1)
    (again,) = write_random_gguf(str(tmp_path / "b.gguf"), cfg, mix, seed=1)
    assert open(path, "rb").read() == open(again, "rb").read()
    f = GGUFModelFile(path)
    for name, (_, t) in f.tensors.items():
        values = decode_tensor(np.asarray(t.data), t.tensor_type)
        assert np.isfinite(values).all(), name
    model, tok = read_gguf(path, quantized=True)
    assert model.config.hidden_size == cfg.hidden_size and model.config.n_routed_experts == cfg.n_routed_experts
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("the thin end", add_bos=True)]))
    assert logits.isfinite().all() and logits.float().std() > 0


@pytest.mark.parametrize("mix,tol", [("q4_k_m", 0.05), ("q8_0", 3e-2)])
def test_llama_cpp_runs_a_random_file_with_our_logits(mix, tol, tmp_path):
    """llama.cpp's deepseek2 and nanoseek (the exact dequantization, float32) on one random file:
    logits within the bounds of the exported-model tests (test_gguf.py), which come from
    llama.cpp rounding the activations to q8_0 / q8_K."""
    llama_cpp = pytest.importorskip("llama_cpp")
    (path,) = write_random_gguf(str(tmp_path / "r.gguf"), config(), mix)
    ours, tok = read_gguf(path, dtype=torch.float32)
    prompt = tok.encode("the thin end of the winter", add_bos=True)
    seq, theirs = llama_logits(llama_cpp, path, prompt, 8)
    with torch.no_grad():
        logits = ours(torch.tensor([seq]))[0]  # [T, V]
    rel = ((theirs - logits).abs().max() / logits.abs().max()).item()
    print(f"llama.cpp vs nanoseek on a random {mix} file: max relative logit error {rel:.2e}")
    assert rel < tol
