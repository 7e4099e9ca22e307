"""Quantized Linear / Embedding / routed experts (nanoseek/quant/qlinear.py) and the llama.cpp
mixes (nanoseek/quant/mixes.py): the exact path equals dequantize-then-matmul bit for bit, the
int4 fast path stays within its pinned bound, quantized models stay within their measured error
of the float model, state_dict round-trips, and the bytes held shrink."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from fixtures.make_fixtures import MEMORIZER, QUESTION, REPLY
from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.dense import DenseModel
from nanoseek.dense_config import DenseConfig
from nanoseek.infer.chat import render_chat
from nanoseek.model import Experts
from nanoseek.quant.ggml import dequantize, quantize
from nanoseek.quant.mixes import role_of, tensor_qtype, use_more_bits
from nanoseek.quant.qlinear import (QuantEmbedding, QuantExperts, QuantLinear, int4pack_available, model_bytes,
                                    quant_plan, quantize_model)
from nanoseek.tokenizer import Tokenizer

QTYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q5_0", "q4_k", "q6_k"]
MIXES = ["q8_0", "q6_k", "q4_k_m", "q4_0"]


def rel_rms(a, b):
    return ((a.float() - b.float()).pow(2).mean() / b.float().pow(2).mean()).sqrt().item()


def linear(k=512, n=64, bias=False, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    nn.init.normal_(lin.weight, 0.0, 0.02)
    return lin


# ------------------------------------------------------------------- QuantLinear
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_is_dequantize_then_matmul(qtype, dtype):
    lin = linear(bias=True)
    q = QuantLinear.from_linear(lin, qtype)
    x = torch.randn(3, 5, 512).to(dtype)
    w = dequantize(quantize(lin.weight, qtype), qtype, dtype)
    with torch.no_grad():
        assert torch.equal(q(x), F.linear(x, w, lin.bias.to(dtype)))
    assert torch.equal(q.weight, dequantize(q.qweight, qtype))


@pytest.mark.skipif(not int4pack_available(), reason="no int4 CPU GEMM with bf16 scales in this PyTorch")
@pytest.mark.parametrize("qtype", ["q4_0", "q4_k"])
def test_int4_fast_path_within_its_bound(qtype):
    """The int4 GEMM multiplies the same 4-bit codes, but with bf16 group scales and zeros (q4_k's
    zero re-rounded as 8 d sc - dmin m) and bf16 activations: against the exact path it is off by
    bf16 rounding (measured: relative RMS 0.0024-0.0033, largest error 0.3-0.7% of the largest
    output), bounds 0.01 and 0.02; against the float weights it adds next to nothing to the
    quantization error itself (measured: x1.001), bound x1.01."""
    lin = linear(k=1024, n=256, bias=True)
    exact, fast = QuantLinear.from_linear(lin, qtype), QuantLinear.from_linear(lin, qtype, fast=True)
    assert fast.fast and "int4pack" in repr(fast)
    with torch.no_grad():
        for m in (1, 64):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(m, 1024).to(dtype)
                a, b = exact(x), fast(x)
                assert b.dtype == dtype
                assert rel_rms(b, a) < 0.01
                assert (a.float() - b.float()).abs().max() <= 0.02 * a.float().abs().max()
            x = torch.randn(m, 1024)
            ref = lin(x)
            assert rel_rms(fast(x), ref) <= 1.01 * rel_rms(exact(x), ref)
    assert "int4_packed" not in fast.state_dict()  # the packed copy is rebuilt, not stored


def test_int4_fast_path_declines_where_it_does_not_apply():
    assert not QuantLinear.from_linear(linear(), "q8_0", fast=True).fast
    assert not QuantLinear.from_linear(linear(n=40), "q4_0", fast=True).fast  # rows not a multiple of 16


def test_quant_linear_checks_its_bytes():
    with pytest.raises(ValueError, match="q4_k"):
        QuantLinear(torch.zeros(4, 100, dtype=torch.uint8), "q4_k", 256)


def test_quant_embedding_reads_only_its_rows():
    emb = nn.Embedding(100, 256)
    q = QuantEmbedding.from_embedding(emb, "q4_k")
    ids = torch.tensor([[3, 7, 99], [0, 3, 5]])
    assert torch.equal(q(ids), dequantize(q.qweight, "q4_k")[ids])


# ------------------------------------------------------------------- QuantExperts
@pytest.mark.parametrize("qtypes", [dict(gate_proj="q4_k", up_proj="q4_k", down_proj="q6_k"),
                                    dict(gate_proj="q8_0", up_proj="q8_0", down_proj="q5_0")])
def test_quant_experts_equal_float_experts_of_the_dequantized_weights(qtypes):
    torch.manual_seed(0)
    experts = Experts(6, 256, 512)
    for p in (experts.gate_proj, experts.up_proj, experts.down_proj):
        nn.init.normal_(p, 0.0, 0.02)
    q = QuantExperts.from_experts(experts, qtypes)
    ref = Experts(6, 256, 512)
    with torch.no_grad():
        for p in QuantExperts.PROJS:
            getattr(ref, p).copy_(dequantize(getattr(q, p + "_q"), qtypes[p]))
        x = torch.randn(10, 256)
        indices = torch.stack([torch.randperm(6)[:2] for _ in range(10)])  # expert 5 may get no tokens
        weights = torch.rand(10, 2)
        assert torch.equal(q(x, indices, weights), ref(x, indices, weights))
        assert rel_rms(q(x, indices, weights), experts(x, indices, weights)) < 0.2  # measured 0.107 (q4_k), 0.04 (q5_0)


# ------------------------------------------------------------------- the mixes
def test_use_more_bits_is_llama_cpps():
    # n = 27 (DeepSeek-V2-Lite's blocks): the first 3, the last 4, and every third from layer 5
    assert [i for i in range(27) if use_more_bits(i, 27)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26]


def test_q4_k_m_rule():
    kw = dict(layer=0, n_layers=27, n_attn_v=27)
    assert tensor_qtype("q4_k_m", "output", 2048, **kw) == "q6_k"
    assert tensor_qtype("q4_k_m", "output", 2016, **kw) == "q8_0"  # 2016 % 256 != 0
    assert tensor_qtype("q4_k_m", "output", 2000, **kw) == "f16"  # 2000 % 32 != 0
    assert tensor_qtype("q8_0", "output", 2048, **kw) == "q8_0"
    assert tensor_qtype("q4_0", "output", 2048, **kw) == "q6_k"
    assert tensor_qtype("q4_k_m", "attn_kv_b", 512, attn_v_index=0, n_layers=27, n_attn_v=27) == "q6_k"
    assert tensor_qtype("q4_k_m", "attn_kv_b", 512, attn_v_index=3, n_layers=27, n_attn_v=27) == "q4_k"
    assert tensor_qtype("q4_k_m", "ffn_down_exps", 1408, layer=5, n_layers=27) == "q8_0"  # q6_k, 1408 % 256 != 0
    assert tensor_qtype("q4_k_m", "ffn_down_exps", 1408, layer=4, n_layers=27) == "q5_0"  # q4_k fallback
    assert tensor_qtype("q4_k_m", "ffn_down", 10944, layer=0, n_layers=27) == "q8_0"
    assert tensor_qtype("q4_k_m", "ffn_up_exps", 2048, layer=4, n_layers=27) == "q4_k"
    assert tensor_qtype("q4_k_m", "attn_output", 2048, layer=4, n_layers=27, n_experts=64) == "q4_k"
    assert tensor_qtype("q4_k_m", "attn_output", 2048, layer=4, n_layers=27, n_experts=8) == "q6_k"
    assert tensor_qtype("q4_k_m", "attn_kv_b", 512, attn_v_index=3, n_attn_v=27, n_experts=8) == "q8_0"
    assert tensor_qtype("q6_k", "attn_q_a", 48) == "f16"
    with pytest.raises(ValueError, match="q3_k_m"):
        tensor_qtype("q3_k_m", "attn_q", 256)


def test_roles():
    assert role_of("model.layers.3.self_attn.kv_b_proj") == ("attn_kv_b", 3)
    assert role_of("model.layers.3.mlp.experts.down_proj") == ("ffn_down_exps", 3)
    assert role_of("model.layers.3.mlp.shared_experts.up_proj") == ("ffn_up_shexp", 3)
    assert role_of("model.layers.0.mlp.down_proj") == ("ffn_down", 0)
    assert role_of("mtp.4.eh_proj") == ("nextn.eh_proj", 4)
    assert role_of("lm_head") == ("output", None)


# ------------------------------------------------------------------- whole models
@pytest.fixture(scope="module")
def memorizer():
    tok = Tokenizer.from_dir(MEMORIZER)
    prompt = tok.encode(render_chat(tok, [{"role": "user", "content": QUESTION}]))
    want = tok.encode(REPLY) + [tok.eos_id]
    ids = torch.tensor([prompt + want[:-1]])
    with torch.no_grad():
        ref = DeepSeekV3.from_pretrained(MEMORIZER)(ids)[0, len(prompt) - 1:]
    return ids, len(prompt), want, ref


# measured logits relative RMS error on the memorizer's reply (rows of 32 or 64 weights: q8_0,
# q5_0 and q4_0 only): q8_0 0.0020, q6_k 0.0020, q4_k_m 0.0102, q4_0 0.0252; bounds at 2x
MEMORIZER_BOUND = {"q8_0": 0.004, "q6_k": 0.004, "q4_k_m": 0.02, "q4_0": 0.05}


@pytest.mark.parametrize("mix", MIXES)
def test_quantized_memorizer_within_its_error(mix, memorizer):
    ids, n_prompt, want, ref = memorizer
    model = DeepSeekV3.from_pretrained(MEMORIZER)
    quantize_model(model, mix)
    with torch.no_grad():
        out = model(ids)[0, n_prompt - 1:]
    assert rel_rms(out, ref) < MEMORIZER_BOUND[mix]
    assert out.argmax(-1).tolist() == want  # the fixture's margins are wide: greedy is unchanged


def test_quantized_memorizer_decodes_its_reply(memorizer):
    """Decoding reads kv_b_proj's weight (absorbed MLA) and the cache dtype through the head."""
    ids, n_prompt, want, _ = memorizer
    model = DeepSeekV3.from_pretrained(MEMORIZER)
    quantize_model(model, "q8_0", embedding=True)
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    out = model.generate(ids[:, :n_prompt], max_new_tokens=len(want), eos_token_id=want[-1])
    assert out[0, n_prompt:].tolist() == want


def nano():
    return DeepSeekV3.from_config(ModelConfig.from_preset("nano"), seed=0)


def test_nano_q4_k_m_plan_and_error():
    model = nano()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
    plan = quantize_model(model, "q4_k_m")
    # 8 routed experts: llama.cpp's Mixtral rule gives attn_kv_b q8_0 and attn_output q5_k (-> q6_k,
    # which rows of 128 turn into q8_0); ffn_down of layers 2 and 4 (of 5) get q6_k (-> q8_0 for rows of 128)
    assert plan["lm_head"] == "q6_k"
    assert plan["model.layers.1.self_attn.q_a_proj"] == "q4_k"
    assert plan["model.layers.1.self_attn.q_b_proj"] == "q5_0"  # rows of 128: q4_k falls back
    assert plan["model.layers.1.self_attn.kv_b_proj"] == "q8_0"
    assert plan["model.layers.1.mlp.experts.gate_proj"] == "q4_k"
    assert plan["model.layers.1.mlp.experts.down_proj"] == "q5_0"
    assert plan["model.layers.2.mlp.experts.down_proj"] == "q8_0"
    assert plan["model.layers.0.mlp.down_proj"] == "q4_k"  # dense FFN, rows of 512
    assert plan["mtp.4.mlp.shared_experts.down_proj"] == "q8_0"
    assert isinstance(model.model.layers["1"].mlp.experts, QuantExperts)
    assert isinstance(model.model.layers["1"].mlp.gate.weight, nn.Parameter)  # the router stays float
    with torch.no_grad():
        out = model(ids)
    assert rel_rms(out, ref) < 0.35  # measured 0.166 on this random-init model (small logits)


def test_quantized_nano_holds_fewer_bytes():
    model = nano()
    float_bytes = model_bytes(model)
    assert set(float_bytes) == {"float32", "total"}
    quantize_model(model, "q4_k_m", embedding=True)
    after = model_bytes(model)
    held = sum(t.untyped_storage().nbytes() for t in {id(t): t for t in model.state_dict().values()}.values())
    assert after["total"] == held
    assert after["total"] < float_bytes["total"] / 5  # q4_k_m: ~4.5-8.5 bits a weight instead of 32
    assert after["q4_k"] > 0 and after["q6_k"] > 0 and after["float32"] < 100_000  # norms, router, bias


def test_state_dict_round_trip(tmp_path):
    model = nano()
    plan = quantize_model(model, "q4_k_m", embedding=True)
    save_file(model.state_dict(), str(tmp_path / "q.safetensors"))
    back = DeepSeekV3.empty(model.config)
    quantize_model(back, plan=plan)  # the same modules (their bytes overwritten next)
    back.load_state_dict(load_file(str(tmp_path / "q.safetensors")), strict=True)
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("embedding", [False, True])
def test_dense_model(tied, embedding):
    cfg = DenseConfig(model_type="qwen2", vocab_size=256, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                      tie_word_embeddings=tied, torch_dtype="float32")
    model = DenseModel.from_config(cfg, seed=0)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
    plan = quant_plan(model, "q4_k_m", embedding)
    quantize_model(model, plan=plan)
    # two blocks: use_more_bits picks the last one (i >= 7n/8)
    assert plan["model.layers.1.self_attn.v_proj"] == "q6_k" and plan["model.layers.1.mlp.down_proj"] == "q6_k"
    assert plan["model.layers.0.self_attn.v_proj"] == "q4_k" and plan["model.layers.0.mlp.down_proj"] == "q4_k"
    assert plan["model.layers.1.self_attn.q_proj"] == "q4_k"
    if tied and embedding:
        assert plan["model.embed_tokens"] == "q6_k" and model.lm_head.qweight is model.model.embed_tokens.qweight
    elif tied:
        assert "lm_head" not in plan and model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert plan["lm_head"] == "q6_k"
    with torch.no_grad():
        assert rel_rms(model(ids), ref) < 0.3  # measured 0.11-0.15 on this random-init model (small logits)


def test_unknown_mix():
    with pytest.raises(ValueError, match="q2_k"):
        quantize_model(nano(), "q2_k")


@pytest.mark.skipif(not int4pack_available(), reason="no int4 CPU GEMM with bf16 scales in this PyTorch")
def test_fast_quantized_model_within_its_bound():
    """quantize_model(fast=True): the q4_k Linears and expert projections on the int4 GEMM. On the
    nano model the logits move from the exact path's by bf16 rounding (measured: relative RMS
    0.004, every greedy token the same), bounds 0.02 and 80% of the greedy tokens."""
    ids = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(0))
    exact, fast = nano(), nano()
    quantize_model(exact, "q4_k_m")
    quantize_model(fast, "q4_k_m", fast=True)
    experts = fast.model.layers["1"].mlp.experts
    assert experts.fast_projs == {"gate_proj", "up_proj"}  # down_proj: rows of 128 -> q5_0
    assert fast.model.layers["1"].self_attn.q_a_proj.fast
    with torch.no_grad():
        a, b = exact(ids), fast(ids)
    assert rel_rms(b, a) < 0.02
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8
