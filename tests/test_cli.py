"""The `nanoseek` command: `info` (JSON contract) and the CPU demo."""

import json
import subprocess
import sys

import pytest

from conftest import randomized_model


def run(*args, timeout=120):
    p = subprocess.run([sys.executable, "-m", "nanoseek", *args], capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_info_deepseek_v3_json():
    out = json.loads(run("info", "deepseek-v3", "--json").strip().splitlines()[-1])
    assert 670e9 < out["total_params"] < 672e9
    assert 36e9 < out["active_params"] < 38e9
    assert out["mla_kv_bytes_per_token"] == 70272
    assert out["mha_kv_bytes_per_token"] == 61 * 128 * (192 + 128) * 2
    assert 0 < out["activation_ratio"] < 0.06 and out["mtp_params"] > 11e9


@pytest.mark.parametrize("preset", ["nano", "small", "deepseek-v2-lite", "deepseek-v2"])
def test_info_presets(preset):
    out = json.loads(run("info", preset, "--json").strip().splitlines()[-1])
    assert 0 < out["activation_ratio"] <= 1


def test_info_checkpoint_dir(tmp_path, tiny_cfg):
    randomized_model(tiny_cfg).save_pretrained(str(tmp_path))
    out = json.loads(run("info", str(tmp_path), "--json").strip().splitlines()[-1])
    assert out["total_params"] == tiny_cfg.param_counts()["total_params"]


def test_demo_json():
    out = json.loads(run("demo", "--steps", "8", "--json").strip().splitlines()[-1])
    assert out["naive_absorb_max_diff"] < 1e-4 and out["roundtrip_max_diff"] == 0
    assert out["loss_last"] < out["loss_first"]
