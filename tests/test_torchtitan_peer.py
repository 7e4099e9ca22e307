"""The torchtitan peer of the training benchmark computes our model's function: built at the same
config and loaded with our weights, its fp32 logits equal ours (skipped where torchtitan is absent).
Its routed experts always run their GEMMs in bf16; for the fp32 check they run the same SwiGLU per
expert in fp32 (the benchmark keeps its own bf16 kernel)."""

import pytest
import torch

torchtitan = pytest.importorskip("torchtitan")

from benchmarks import torchtitan_peer  # noqa: E402
from nanoseek import ModelConfig  # noqa: E402
from nanoseek.model import DeepSeekV3  # noqa: E402


def _experts_fp32(self, x_RD, num_tokens_per_expert_E):
    out, start = [], 0
    for e, n in enumerate(num_tokens_per_expert_E.tolist()):
        x = x_RD[start:start + n]
        h = torch.nn.functional.silu(x @ self.w1_EFD[e].T) * (x @ self.w3_EFD[e].T)  # [n, F]
        out.append(h @ self.w2_EDF[e].T)  # [n, D]
        start += n
    return torch.cat(out)


def test_torchtitan_model_with_our_weights_gives_our_logits(monkeypatch):
    from torchtitan.models.common.moe import GroupedExperts
    monkeypatch.setattr(GroupedExperts, "forward", _experts_fp32)
    cfg = ModelConfig.from_preset("nano", num_nextn_predict_layers=0)
    ours = DeepSeekV3.from_config(cfg, device="cpu", seed=0).eval()
    with torch.no_grad():
        for name, b in ours.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.01, generator=torch.Generator().manual_seed(1))
    peer, forward = torchtitan_peer.build(cfg, "sdpa", device="cpu")
    torchtitan_peer.load_from_nanoseek(peer, ours)
    assert sum(p.numel() for p in peer.parameters()) == sum(p.numel() for p in ours.parameters())
    x = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = forward(x)
        mine = ours(x)
        mine = mine.logits if hasattr(mine, "logits") else mine
    assert theirs.shape == mine.shape
    assert (theirs - mine).abs().max().item() <= 1e-4
