"""Inference with an FP8 checkpoint's weights kept in FP8: outputs equal to the model loaded the
usual way (dequantized once at load), half of bf16's weight memory, the engine and CLI on it."""

import subprocess
import sys

import pytest
import torch

from conftest import randomized_model
from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.checkpoint import CheckpointError
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.infer.fp8_weights import FP8WeightExperts, FP8WeightLinear, fp8_module_names, load_fp8_weights
from nanoseek.tokenizer import train_bpe


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    # widths that cross 128-blocks (160, 152, 136, 288) and an MTP module
    cfg = ModelConfig.from_preset("nano", vocab_size=300, hidden_size=160, intermediate_size=288,
                                  moe_intermediate_size=136, num_hidden_layers=3, num_attention_heads=4,
                                  q_lora_rank=None, kv_lora_rank=152, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                  v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                  num_nextn_predict_layers=1)
    d = tmp_path_factory.mktemp("fp8w")
    randomized_model(cfg).save_pretrained(str(d), fp8=True)
    train_bpe(["the quick brown fox jumps over the lazy dog. " * 20], 300).save(str(d))
    return str(d)


def test_outputs_equal_the_dequantized_model(fp8_dir):
    ref = DeepSeekV3.from_pretrained(fp8_dir, dtype=torch.float32)
    got, rep = load_fp8_weights(fp8_dir, dtype=torch.float32)
    names = fp8_module_names(got)
    # every attention projection and dense/shared FFN Linear, and the routed experts, of all layers and MTP
    assert any(isinstance(got.get_submodule(n), FP8WeightExperts) for n in names)
    assert sum(isinstance(got.get_submodule(n), FP8WeightLinear) for n in names) == rep["fp8_modules"] - sum(
        isinstance(got.get_submodule(n), FP8WeightExperts) for n in names)
    assert not any(p.dtype == torch.float8_e4m3fn for p in got.parameters())  # buffers, not parameters
    assert got.lm_head.weight.dtype == torch.float32 and isinstance(got.model.embed_tokens, torch.nn.Embedding)
    # 1 byte a weight plus the block scales, against 4 (fp32): under half of bf16's 2 bytes + a little
    assert rep["fp8_weight_bytes"] < 0.26 * rep["dense_weight_bytes"] + 4096
    x = torch.randint(0, 300, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ref(x), got(x))


def test_engine_greedy_equal(fp8_dir):
    from nanoseek.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(fp8_dir)
    prompts = [tok.encode(t) for t in ("the quick", "lazy dog")]
    outs = []
    for model in (DeepSeekV3.from_pretrained(fp8_dir, dtype=torch.float32),
                  load_fp8_weights(fp8_dir, dtype=torch.float32)[0]):
        engine = Engine(model, tok, max_context=64, max_batch=2)
        outs.append([c.token_ids for c in engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0))])
        engine.close()
    assert outs[0] == outs[1] and all(outs[0])


def test_cli_generate_and_errors(fp8_dir, tmp_path):
    cmd = [sys.executable, "-m", "nanoseek", "generate", fp8_dir, "the quick", "--raw", "--max-tokens", "5",
           "--temperature", "0"]
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    fp8 = subprocess.run(cmd + ["--fp8-weights"], capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0 and fp8.returncode == 0, plain.stderr[-2000:] + fp8.stderr[-2000:]
    assert fp8.stdout.split("\n")[0] == plain.stdout.split("\n")[0]
    # a checkpoint without FP8 weights: a clear error naming it
    bf = tmp_path / "plain"
    DeepSeekV3.from_pretrained(fp8_dir, dtype=torch.float32).save_pretrained(str(bf))
    with pytest.raises(CheckpointError, match="no FP8 weights"):
        load_fp8_weights(str(bf))
    bad = subprocess.run([sys.executable, "-m", "nanoseek", "generate", str(bf), "x", "--raw", "--fp8-weights"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "no FP8 weights" in bad.stderr


def test_w8a8_gemms_within_fp8_error(fp8_dir):
    """`w8a8`: inputs quantized in 1x128 tiles, FP8 x FP8 block GEMMs (DeepSeek's inference path).
    One Linear against its dequantized-weight GEMM: the activation quantization error only, at least
    the 25 dB the FP8 GEMMs must reach (32 dB measured); the whole 3-layer model's logits accumulate
    it layer after layer (25.6 dB measured)."""
    from nanoseek.quant.fp8 import sqnr_db
    ref = DeepSeekV3.from_pretrained(fp8_dir, dtype=torch.float32)
    got, _ = load_fp8_weights(fp8_dir, dtype=torch.float32, w8a8=True)
    lin = next(m for m in got.modules() if isinstance(m, FP8WeightLinear))
    assert lin.w8a8
    h = torch.randn(64, lin.in_features, generator=torch.Generator().manual_seed(1))
    lin.w8a8 = False
    exact = lin(h)
    lin.w8a8 = True
    assert sqnr_db(exact.double(), lin(h).double()) >= 25
    x = torch.randint(0, 300, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert sqnr_db(ref(x).double(), got(x).double()) >= 20
