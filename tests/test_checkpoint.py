"""Checkpoint save/load in the Hugging Face layout: sharding, MTP round trip, atomicity, and
clear errors (naming file and key) for bad input. Nothing is ever unpickled."""

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import randomized_model
from nanoseek import ConfigError, DeepSeekV3, ModelConfig
from nanoseek.checkpoint import CheckpointError, fp8_dequantize, fp8_quantize_blocks


@pytest.fixture
def saved(tmp_path, tiny_cfg):
    model = randomized_model(tiny_cfg)
    path = tmp_path / "ckpt"
    model.save_pretrained(str(path), max_shard_size=60_000)  # force several shards
    return model, str(path)


def test_sharded_round_trip_with_mtp(saved):
    model, path = saved
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all(os.path.exists(os.path.join(path, f)) for f in files)
    n = model.config.num_hidden_layers
    assert f"model.layers.{n}.eh_proj.weight" in index["weight_map"]  # MTP at layers N + i
    assert f"model.layers.{n + 1}.shared_head.head.weight" in index["weight_map"]
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in index["weight_map"]
    again = DeepSeekV3.from_pretrained(path)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        l1, h1 = model(ids, return_hidden=True)
        l2, h2 = again(ids, return_hidden=True)
        assert torch.equal(l1, l2)
        for a, b in zip(model.mtp_forward(h1, ids), again.mtp_forward(h2, ids)):
            assert torch.equal(a, b)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_resave_smaller_removes_stale_shards(saved):
    model, path = saved
    model.save_pretrained(path)  # one file now
    assert sorted(f for f in os.listdir(path) if not f.startswith(".")) == ["config.json", "model.safetensors"]
    DeepSeekV3.from_pretrained(path)


def test_checkpoint_without_mtp_loads_with_warning(tmp_path, tiny_cfg):
    model = randomized_model(tiny_cfg.replace(num_nextn_predict_layers=0))
    model.save_pretrained(str(tmp_path))
    cfg = json.load(open(tmp_path / "config.json"))
    cfg["num_nextn_predict_layers"] = 1
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.warns(UserWarning, match="no MTP weights"):
        m = DeepSeekV3.from_pretrained(str(tmp_path))
    assert len(m.mtp) == 0


def test_fp8_quantizer_against_float64_reference():
    torch.manual_seed(0)
    w = torch.randn(300, 200) * 0.05
    w8, s = fp8_quantize_blocks(w)
    assert w8.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    ref = torch.empty(300, 200, dtype=torch.float64)
    for i in range(3):
        for j in range(2):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].double()
            sc = blk.abs().max() / 448.0
            assert s[i, j].item() == pytest.approx(sc.item(), rel=1e-6)
            q = (blk / s[i, j].double()).float().to(torch.float8_e4m3fn)
            ref[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = q.double() * s[i, j].double()
    deq = fp8_dequantize(w8, s, torch.float64)
    assert (deq - ref).abs().max().item() < 1e-7
    sqnr = 10 * torch.log10(w.pow(2).sum() / (w - deq.float()).pow(2).sum())
    assert sqnr > 25


# ---------------------------------------------------------------------------- bad input
def _single(tmp_path, tiny_cfg):
    model = randomized_model(tiny_cfg.replace(num_nextn_predict_layers=0))
    model.save_pretrained(str(tmp_path))
    return str(tmp_path), os.path.join(str(tmp_path), "model.safetensors")


def test_missing_shard(saved):
    _, path = saved
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    victim = sorted(set(index["weight_map"].values()))[1]
    os.unlink(os.path.join(path, victim))
    with pytest.raises(CheckpointError, match=victim) as e:
        DeepSeekV3.from_pretrained(path)
    assert "model." in str(e.value) or "lm_head" in str(e.value)  # names a key it holds


def test_wrong_shape(tmp_path, tiny_cfg):
    path, file = _single(tmp_path, tiny_cfg)
    sd = load_file(file)
    sd["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, file)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*model\.layers\.0\.self_attn\.o_proj\.weight.*shape"):
        DeepSeekV3.from_pretrained(path)


def test_unknown_key(tmp_path, tiny_cfg):
    path, file = _single(tmp_path, tiny_cfg)
    sd = load_file(file)
    sd["model.layers.0.self_attn.mystery.weight"] = torch.zeros(2)
    save_file(sd, file)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*unexpected key 'model\.layers\.0\.self_attn\.mystery\.weight'"):
        DeepSeekV3.from_pretrained(path)


def test_missing_key(tmp_path, tiny_cfg):
    path, file = _single(tmp_path, tiny_cfg)
    sd = load_file(file)
    del sd["model.layers.2.mlp.experts.3.up_proj.weight"]
    save_file(sd, file)
    with pytest.raises(CheckpointError, match=r"missing key 'model\.layers\.2\.mlp\.experts\.3\.up_proj\.weight'"):
        DeepSeekV3.from_pretrained(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_file(tmp_path, tiny_cfg, damage):
    path, file = _single(tmp_path, tiny_cfg)
    data = open(file, "rb").read()
    with open(file, "wb") as f:
        f.write(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64 + data[64:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*corrupt or truncated"):
        DeepSeekV3.from_pretrained(path)


def test_pickle_files_are_refused(tmp_path, tiny_cfg):
    ModelConfig.from_preset("nano").save(str(tmp_path))
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*never loaded"):
        DeepSeekV3.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("field,value", [("hidden_act", "gelu"), ("scoring_func", "tanh"),
                                         ("topk_method", "magic"), ("moe_layer_freq", 2),
                                         ("rope_scaling", {"type": "linear", "factor": 2.0})])
def test_unsupported_config_value(tmp_path, tiny_cfg, field, value):
    path, _ = _single(tmp_path, tiny_cfg)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg[field] = value
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ConfigError, match=rf"config\.json.*{field.split('_')[0]}"):
        DeepSeekV3.from_pretrained(path)


def test_unused_config_keys_warn():
    d = ModelConfig.from_preset("nano").to_hf_dict()
    d.update(auto_map={"AutoModel": "x"}, aux_loss_alpha=0.001)
    with pytest.warns(UserWarning, match="auto_map, aux_loss_alpha"):
        ModelConfig.from_hf_dict(d)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModelConfig.from_hf_dict(ModelConfig.from_preset("nano").to_hf_dict())


def test_bad_preset_and_group_config():
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.from_preset("gpt-5")
    with pytest.raises(ConfigError, match="n_group"):
        ModelConfig.from_preset("nano", n_routed_experts=8, n_group=8, topk_group=2)
