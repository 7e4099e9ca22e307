"""Logit parity with transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM (fp32, <= 1e-4)."""

import json
import os

import pytest
import torch
import transformers  # noqa: F401 - the [test] extra installs it: missing is a broken install, not a skip
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import randomized_model
from hf_util import V3_WIDE_KW, make_hf_v2, make_hf_v3
from nanoseek import DeepSeekV3, ModelConfig

TOL = 1e-4


def _ids(vocab=256, shape=(2, 12), seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(ids).logits


@pytest.mark.parametrize("kw", [{}, V3_WIDE_KW], ids=["tiny", "wide-blocks"])
def test_v3_load_hf_checkpoint(tmp_path, kw):
    hf = make_hf_v3(tmp_path, **kw)
    ours = DeepSeekV3.from_pretrained(str(tmp_path), dtype=torch.float32)
    ids = _ids()
    ref = _hf_logits(hf, ids)
    with torch.no_grad():
        for impl in ("naive", "absorb"):
            assert (ours(ids, attn_impl=impl) - ref).abs().max().item() <= TOL, impl
    # routing really is biased: the bias is non-zero and the parity above would fail without it
    moe = next(iter(ours.moe_layers().values()))
    assert moe.gate.e_score_correction_bias.abs().sum() > 0
    with torch.no_grad():
        for m in ours.moe_layers().values():
            m.gate.e_score_correction_bias.zero_()
        assert (ours(ids) - ref).abs().max().item() > TOL  # some token's experts changed


def test_v3_save_ours_load_in_hf(tmp_path):
    from transformers import DeepseekV3ForCausalLM
    make_hf_v3(tmp_path / "hf", **V3_WIDE_KW)
    ours = DeepSeekV3.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    ours.save_pretrained(str(tmp_path / "ours"))
    theirs = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype=torch.float32).eval()
    ids = _ids()
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= TOL


def test_fresh_model_loads_in_hf_and_keeps_dtype(tmp_path, tiny_cfg):
    from transformers import DeepseekV3ForCausalLM
    cfg = tiny_cfg.replace(num_nextn_predict_layers=0)
    ours = randomized_model(cfg, seed=3)
    ours.save_pretrained(str(tmp_path / "fp32"))
    theirs = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "fp32"), dtype=torch.float32).eval()
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= TOL
    ours.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes <= {"BF16", "F32"}, dtypes
    assert json.load(open(tmp_path / "bf16" / "config.json"))["torch_dtype"] == "bfloat16"
    assert DeepSeekV3.from_pretrained(str(tmp_path / "bf16")).lm_head.weight.dtype == torch.bfloat16


def _dequantized_copy(src, dst):
    """An independent float64 dequantization of an FP8 checkpoint into a plain fp32 one."""
    os.makedirs(dst, exist_ok=True)
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg.pop("quantization_config")
    cfg["torch_dtype"] = "float32"
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    out = {}
    with safe_open(os.path.join(src, "model.safetensors"), "pt") as f:
        for k in f.keys():
            if k.endswith("_scale_inv"):
                continue
            t = f.get_tensor(k)
            if t.dtype == torch.float8_e4m3fn:
                s = f.get_tensor(k + "_scale_inv").double()
                w = t.double()
                for i in range(s.shape[0]):
                    for j in range(s.shape[1]):
                        w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] *= s[i, j]
                t = w
            out[k] = t.float().contiguous()
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})


def test_fp8_checkpoint_matches_hf_on_dequantized_copy(tmp_path):
    from transformers import DeepseekV3ForCausalLM
    make_hf_v3(tmp_path / "hf", **V3_WIDE_KW)
    ours = DeepSeekV3.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    ours.save_pretrained(str(tmp_path / "fp8"), fp8=True)
    with safe_open(str(tmp_path / "fp8" / "model.safetensors"), "pt") as f:
        kv_a = f.get_tensor("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")
        kv_a_scale = f.get_tensor("model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv")
        assert kv_a.dtype == torch.float8_e4m3fn
        assert f.get_tensor("lm_head.weight").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32
    # 160 in, 136 + 16 = 152 out: partial blocks in both dims
    assert kv_a.shape == (152, 160) and kv_a_scale.shape == (2, 2)
    fp8_model = DeepSeekV3.from_pretrained(str(tmp_path / "fp8"), dtype=torch.float32)
    _dequantized_copy(str(tmp_path / "fp8"), str(tmp_path / "deq"))
    theirs = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "deq"), dtype=torch.float32).eval()
    ids = _ids()
    with torch.no_grad():
        mine = fp8_model(ids)
        assert (mine - theirs(ids).logits).abs().max().item() <= TOL
        # and FP8 is a real quantization: close to, but not equal to, the fp32 model
        assert 0 < (mine - ours(ids)).abs().max().item() < 0.5


def test_v2_parity(tmp_path):
    hf = make_hf_v2(tmp_path)
    ours = DeepSeekV3.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert ours.config.model_type == "deepseek_v2" and ours.config.scoring_func == "softmax"
    assert ours.config.topk_method == "group_limited_greedy" and ours.config.q_lora_rank is None
    ids = _ids()
    ref = _hf_logits(hf, ids)
    with torch.no_grad():
        for impl in ("naive", "absorb"):
            assert (ours(ids, attn_impl=impl) - ref).abs().max().item() <= TOL, impl


def test_v2_greedy_save_load_in_hf(tmp_path):
    from transformers import DeepseekV2ForCausalLM
    make_hf_v2(tmp_path / "hf", topk_method="greedy", n_group=1, topk_group=1)
    ours = DeepSeekV3.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    ours.save_pretrained(str(tmp_path / "ours"))
    theirs = DeepseekV2ForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype=torch.float32).eval()
    ids = _ids()
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= TOL


def test_old_and_new_rope_config_forms_agree(tmp_path):
    make_hf_v3(tmp_path)
    new = json.load(open(tmp_path / "config.json"))
    assert "rope_parameters" in new
    a = ModelConfig.from_hf_dict(new)
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    rp = new["rope_parameters"]
    old["rope_theta"] = rp["rope_theta"]
    old["rope_scaling"] = {"type": "yarn", **{k: v for k, v in rp.items() if k not in ("rope_type", "rope_theta")}}
    b = ModelConfig.from_hf_dict(old)
    assert a == b
    assert a.rope_scaling["factor"] == 40.0 and a.softmax_scale == pytest.approx(24 ** -0.5 * (0.1 * 3.6888794541 + 1) ** 2)
