"""`nanoseek create NAME --from DIR --quantize q8_0|q4_k_m` (nanoseek/gguf_quantize.py): a Hugging
Face checkpoint, bf16 or FP8 (128x128 block scales), quantized while streaming into a GGUF store
entry that loads as QuantLinear / QuantExperts, with the bytes of the GGUF export of the same
float model, the logits of the float model within the quantization error, and memory bounded by
one tensor."""

import json
import os
import subprocess
import sys

import pytest
import torch

from nanoseek.cli import main
from nanoseek.gguf_file import GGUFError, read_gguf, write_gguf
from nanoseek.infer.store import Store
from nanoseek.load import load_model
from nanoseek.model import DeepSeekV3
from nanoseek.quant.qlinear import QuantExperts, QuantLinear
from nanoseek.tokenizer import Tokenizer
from test_gguf import FIXTURE, ids_of, tiny

# max |logits - float logits| / max |float logits| of the trained fixture (its entry runs in bf16),
# by mix: q8_0 as the GGUF export's bound (test_gguf.BOUNDS), measured 7.5e-3 (bf16) and 8.7e-3
# (FP8 source); q4_k_m (q5_0 / q8_0 at these 64-wide rows) measured 6.7e-2 (bf16) and 1.2e-1 (FP8
# source: q5_0's rounding of the e4m3 grid; the GGUF export of the dequantized model errs the same,
# its bytes being these)
LOGIT_BOUNDS = {"q8_0": 2e-2, "q4_k_m": 0.15}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSEEK_HOME", str(tmp_path / "home"))
    return tmp_path


def checkpoint(model, tok, path, fp8):
    """`model` saved as a Hugging Face folder: bf16, or FP8 e4m3 with 128x128 weight_scale_inv."""
    if fp8:
        model.save_pretrained(path, fp8=True)
    else:
        model.to(torch.bfloat16).save_pretrained(path)
    tok.save(path)
    return str(path)


def quantized_entry(name, source, mix):
    assert main(["create", name, "--from", source, "--quantize", mix]) == 0
    model = load_model(Store().path_of(name))
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    assert any(isinstance(m, QuantExperts) for m in model.modules())
    return model


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("mix", ["q8_0", "q4_k_m"])
def test_quantized_import_is_the_gguf_export_of_the_float_model(mix, fp8, home):
    """Streaming the checkpoint gives the bytes `write_gguf` gives from the loaded float model (rows
    of 256 here, so q4_k and q6_k are in the q4_k_m file), hence the same logits."""
    tok = Tokenizer.from_dir(FIXTURE)
    model = tiny(hidden_size=256, q_lora_rank=None, kv_lora_rank=64, intermediate_size=256,
                 moe_intermediate_size=256, num_hidden_layers=2)
    source = checkpoint(model, tok, home / "ckpt", fp8)
    ref = DeepSeekV3.from_pretrained(source, dtype=torch.float32)  # FP8 dequantized per block
    got = quantized_entry("q", source, mix)
    (path,) = write_gguf(ref, tok, str(home / "export.gguf"), mix)
    want, _ = read_gguf(path, quantized=True)
    for (name, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items()):
        assert torch.equal(a, b), name
    ids = ids_of(tok)
    with torch.no_grad():
        assert torch.equal(got(ids), want(ids))


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("mix", ["q8_0", "q4_k_m"])
def test_quantized_import_keeps_the_float_logits_within_the_quantization_error(mix, fp8, home):
    tok = Tokenizer.from_dir(FIXTURE)
    source = FIXTURE if not fp8 else checkpoint(DeepSeekV3.from_pretrained(FIXTURE, dtype=torch.float32), tok,
                                                home / "fp8", True)
    ref = DeepSeekV3.from_pretrained(source, dtype=torch.float32)
    got = quantized_entry("m", source, mix)
    ids = ids_of(tok)
    with torch.no_grad():
        want = ref(ids)
        rel = ((got(ids).float() - want).abs().max() / want.abs().max()).item()
    print(f"{mix} {'fp8' if fp8 else 'float'} import: max relative logit error {rel:.2e}")
    assert rel < LOGIT_BOUNDS[mix]
    manifest = Store().manifest("m")
    assert manifest["quantization"] == mix.upper()


def test_quantize_refuses_a_gguf_source_and_adds_nothing(home, tmp_path):
    tok = Tokenizer.from_dir(FIXTURE)
    (path,) = write_gguf(DeepSeekV3.from_pretrained(FIXTURE, dtype=torch.float32), tok, str(tmp_path / "m.gguf"),
                         "f16")
    with pytest.raises(SystemExit, match="--quantize converts a checkpoint folder"):
        main(["create", "x", "--from", path, "--quantize", "q8_0"])
    assert Store().list() == []


PEAK = r"""
import json, sys
from nanoseek.gguf_quantize import quantize_checkpoint
def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
quantize_checkpoint(sys.argv[4], sys.argv[2], sys.argv[3])  # first use of the libraries, on a tiny checkpoint
before = rss("VmRSS")
quantize_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3])
print(json.dumps({"before": before, "peak": rss("VmHWM")}))
"""


@pytest.mark.slow
def test_quantized_import_memory_is_about_one_tensor(tmp_path):
    """A checkpoint of ~300 MiB (bf16) quantized in a fresh process (after a first, tiny one that
    loads the libraries): the resident peak grows by a few times its largest tensor (the
    embedding, 62 MiB: the tensor, its bytes, the quantizer's temporaries), not by the checkpoint."""
    from nanoseek import ModelConfig
    cfg = ModelConfig.from_preset("nano", vocab_size=32000, hidden_size=1024, intermediate_size=2048,
                                  moe_intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                                  q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                                  v_head_dim=64, n_routed_experts=16, num_experts_per_tok=2, n_group=4,
                                  topk_group=2, num_nextn_predict_layers=0, torch_dtype="bfloat16")
    source = checkpoint(DeepSeekV3.from_config(cfg, dtype=torch.bfloat16, seed=0), Tokenizer.from_dir(FIXTURE),
                        tmp_path / "big", False)
    size = sum(os.path.getsize(os.path.join(source, f)) for f in os.listdir(source) if f.endswith(".safetensors"))
    largest = 2 * cfg.vocab_size * cfg.hidden_size
    p = subprocess.run([sys.executable, "-c", PEAK, source, str(tmp_path / "out.gguf"), "q8_0", FIXTURE],
                       capture_output=True, text=True, check=True)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    grown = r["peak"] - r["before"]
    print(f"checkpoint {size / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB, peak grew {grown / 2**20:.0f} MiB")
    assert grown < 4 * largest and grown < size / 2
    back, _ = read_gguf(str(tmp_path / "out.gguf"), quantized=True)
    assert back.config.hidden_size == cfg.hidden_size
