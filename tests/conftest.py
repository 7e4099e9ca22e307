import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture
def tiny_cfg():
    from nanoseek import ModelConfig
    # tiny V3-style model: q low-rank, YaRN, group routing with bias, MTP depth 2
    return ModelConfig.from_preset(
        "nano", vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=24,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
        num_experts_per_tok=3, n_group=4, topk_group=2, num_nextn_predict_layers=2,
        rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=4096,
                          beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
        max_position_embeddings=163840)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A small English text: Tiny Shakespeare's first 60 KB when present, else generated prose."""
    path = tmp_path_factory.mktemp("data") / "text.txt"
    shakespeare = os.path.join(SHARED_DATA, "tinyshakespeare", "input.txt")
    if os.path.exists(shakespeare):
        path.write_text(open(shakespeare, encoding="utf-8").read()[:60_000])
    else:
        words = "the king and the queen went to see a play about a horse that could sing".split()
        g = torch.Generator().manual_seed(0)
        path.write_text(" ".join(words[i] for i in torch.randint(0, len(words), (12000,), generator=g).tolist()))
    return str(path)


def randomized_model(cfg, seed=0):
    """A random model whose router bias and spread make group routing matter."""
    from nanoseek import DeepSeekV3
    from hf_util import randomize_router
    model = DeepSeekV3.from_config(cfg, seed=seed)
    randomize_router(model, seed)
    return model.eval()
