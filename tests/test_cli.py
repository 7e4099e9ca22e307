"""The `nanoseek` command: `info` (JSON contract), the CPU demo, every flag reaching its command."""

import argparse
import dataclasses
import inspect
import json
import re
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
    """`info PRESET --json` reports the preset's own counts (from its config, not a table)."""
    from nanoseek import ModelConfig
    out = json.loads(run("info", preset, "--json").strip().splitlines()[-1])
    counts = ModelConfig.from_preset(preset).param_counts()
    assert out["total_params"] == counts["total_params"] and out["active_params"] == counts["active_params"]
    assert out["activation_ratio"] == pytest.approx(counts["active_params"] / counts["total_params"], rel=1e-3)
    assert 0 < out["activation_ratio"] < 1


def test_info_checkpoint_dir(tmp_path, tiny_cfg):
    randomized_model(tiny_cfg).save_pretrained(str(tmp_path))
    out = json.loads(run("info", str(tmp_path), "--json").strip().splitlines()[-1])
    assert out["total_params"] == tiny_cfg.param_counts()["total_params"]


def test_demo_json():
    out = json.loads(run("demo", "--steps", "8", "--json").strip().splitlines()[-1])
    assert out["naive_absorb_max_diff"] < 1e-4 and out["roundtrip_max_diff"] == 0
    assert out["loss_last"] < out["loss_first"]


def _reachable_source(func, depth=2) -> str:
    """func's source and that of the same-module functions it calls (two levels)."""
    func = inspect.unwrap(func)
    mod, src = inspect.getmodule(func), inspect.getsource(func)
    out = src
    for name in set(re.findall(r"\b([A-Za-z_]\w*)\(", src)) if depth else ():
        f = getattr(mod, name, None)
        if inspect.isfunction(f) and f is not func:
            out += _reachable_source(f, depth - 1)
    return out


def test_every_flag_reaches_its_command():
    """Each option of each command is read: by the command's code (or the helpers it calls), or as
    a field of the settings dataclass the command fills from its flags. A flag that is accepted and
    then ignored (as `pipeline-sim --no-save` once was) fails here."""
    from nanoseek.cli import build_parser
    from nanoseek.rl import GRPOArgs
    from nanoseek.finetune.sft import SFTOptions
    from nanoseek.train import TrainArgs
    settings = {"train": [TrainArgs], "sft": [TrainArgs, SFTOptions], "distill": [TrainArgs, SFTOptions],
                "grpo": [GRPOArgs]}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    unread = []
    for name, parser in sub.choices.items():
        src = _reachable_source(parser.get_default("func"))
        fields = {f.name for c in settings.get(name, []) for f in dataclasses.fields(c)}
        for a in parser._actions:
            if a.dest in ("help", "func") or a.dest in fields:
                continue
            if not (re.search(rf"args\.{a.dest}\b", src) or f'"{a.dest}"' in src):
                unread.append(f"{name} {'/'.join(a.option_strings) or a.dest}")
    assert not unread, f"flags accepted but never read: {unread}"


def test_grpo_refuses_resume_with_overlap():
    from nanoseek.rl import GRPOArgs
    with pytest.raises(ValueError, match="--resume with --overlap"):
        GRPOArgs(model="m", task="countdown", out="o", overlap=True, resume=True).validate()
