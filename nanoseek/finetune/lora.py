"""LoRA: low-rank adapters on a frozen model (Hu et al. 2021, "LoRA", arXiv 2106.09685, section 4.1),
applied from outside to an unchanged DeepSeek-V3 model, and merged back into plain weights.

Each target weight W [out, in] becomes W + (alpha / r) * B @ A with A [r, in] (random) and
B [out, r] (zero at the start, so the model is unchanged until training moves it). The routed
experts keep their weights stacked as [E, out, in]; their adapters are per-expert stacks
A [E, r, in], B [E, out, r]. The adapter is a weight parametrization (`torch.nn.utils.parametrize`),
so every code path that reads the weight (the naive and the absorbed MLA paths, grouped or looped
experts) sees the adapted one, and no model code changes.

Targets: the attention projections (q_a_proj, q_b_proj / q_proj, kv_a_proj_with_mqa, kv_b_proj,
o_proj; k_proj / v_proj for the MHA comparison model) and the expert projections (routed experts,
shared experts and the dense FFN: gate_proj, up_proj, down_proj), in the main layers and the MTP
modules. In the dense Llama / Qwen models (dense.py, the R1-distill students) the targets are
q_proj, k_proj, v_proj, o_proj and gate_proj, up_proj, down_proj of every layer. Everything else
is frozen: the router (and its bias), the norms (Qwen3's q/k norms too), biases, embedding, head
and MTP's eh_proj.

`merge_lora(model)` writes W + (alpha / r) B A into the weights and removes the adapters: the result
is a plain model whose checkpoint (`save_pretrained`) is the ordinary Hugging Face layout.
`base_weights(model)` shows the unadapted weights for a while (checkpoints that resume exactly).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..dense import MLP as DenseMLP
from ..dense import Attention as DenseAttention
from ..model import MLA, MLP, Experts

DENSE_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ATTENTION = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "k_proj", "v_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
TARGET_GROUPS = ("attn", "mlp")


class LoRADelta(nn.Module):
    """The parametrization W -> W + scale * B @ A, for a weight [out, in] or a stack [E, out, in]."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        *lead, out_f, in_f = weight.shape
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank
        a = torch.empty(*lead, rank, in_f, dtype=torch.float32)
        bound = 1.0 / math.sqrt(in_f)  # nn.Linear's default range for a layer of fan-in `in`
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(weight.device))  # [(E,) r, in]
        self.lora_B = nn.Parameter(torch.zeros(*lead, out_f, rank, device=weight.device))  # [(E,) out, r]

    def delta(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_A)  # [(E,) out, in]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)


def _targets(model: nn.Module, groups) -> list[tuple[str, nn.Module, str]]:
    """(qualified weight name, owning module, attribute) of every weight LoRA adapts."""
    groups = set(groups)
    unknown = groups - set(TARGET_GROUPS)
    if unknown:
        raise ValueError(f"LoRA targets: unknown group(s) {sorted(unknown)} (expected {', '.join(TARGET_GROUPS)})")
    found = []
    for path, mod in model.named_modules():
        if isinstance(mod, MLA) and "attn" in groups:  # MHA is an MLA subclass
            found += [(f"{path}.{n}.weight", getattr(mod, n), "weight") for n in ATTENTION
                      if isinstance(getattr(mod, n, None), nn.Linear)]
        elif isinstance(mod, DenseAttention) and "attn" in groups:
            found += [(f"{path}.{n}.weight", getattr(mod, n), "weight") for n in DENSE_ATTENTION]
        elif isinstance(mod, (MLP, DenseMLP)) and "mlp" in groups:
            found += [(f"{path}.{n}.weight", getattr(mod, n), "weight") for n in FFN]
        elif isinstance(mod, Experts) and "mlp" in groups:
            found += [(f"{path}.{n}", mod, n) for n in FFN]
    return found


def adapters(model: nn.Module) -> dict[str, tuple[nn.Module, str, LoRADelta]]:
    """Qualified weight name -> (module, attribute, its LoRADelta), for the adapted weights."""
    out = {}
    for path, mod in model.named_modules():
        if parametrize.is_parametrized(mod):
            for attr, plist in mod.parametrizations.items():
                for p in plist:
                    if isinstance(p, LoRADelta):
                        out[f"{path}.{attr}" if path else attr] = (mod, attr, p)
    return out


def has_lora(model: nn.Module) -> bool:
    return bool(adapters(model))


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, targets=TARGET_GROUPS,
               seed: int = 0) -> list[str]:
    """Freeze every parameter of `model`, then adapt the target weights with rank-`rank` LoRA
    (scale alpha / rank; alpha defaults to 2 x rank). Returns the adapted weights' names."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"--lora: rank must be an integer >= 1, got {rank!r}")
    if has_lora(model):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    alpha = 2.0 * rank if alpha is None else float(alpha)
    found = _targets(model, targets)
    if not found:
        raise ValueError(f"apply_lora: no target weights for groups {list(targets)}")
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for _, mod, attr in found:
        weight = getattr(mod, attr)
        if min(weight.shape[-2:]) < rank:
            raise ValueError(f"--lora {rank}: larger than a target weight's dimensions {tuple(weight.shape)}")
        parametrize.register_parametrization(mod, attr, LoRADelta(weight, rank, alpha, gen))
    return [name for name, _, _ in found]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, _, d in adapters(model).values() for p in (d.lora_A, d.lora_B)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{'<weight name>.lora_A': A, '<weight name>.lora_B': B} (detached copies on the CPU)."""
    out = {}
    for name, (_, _, d) in adapters(model).items():
        out[f"{name}.lora_A"] = d.lora_A.detach().cpu().clone()
        out[f"{name}.lora_B"] = d.lora_B.detach().cpu().clone()
    return out


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state") -> None:
    found = adapters(model)
    want = {f"{n}.lora_{x}" for n in found for x in "AB"}
    if set(state) != want:
        missing, extra = sorted(want - set(state))[:3], sorted(set(state) - want)[:3]
        raise ValueError(f"{source}: LoRA adapters do not match the model (missing {missing}, unexpected {extra})")
    for name, (_, _, d) in found.items():
        for x, p in (("A", d.lora_A), ("B", d.lora_B)):
            t = state[f"{name}.lora_{x}"]
            if t.shape != p.shape:
                raise ValueError(f"{source}: {name}.lora_{x} has shape {tuple(t.shape)}, the model {tuple(p.shape)}")
            p.copy_(t)


@contextmanager
def base_weights(model: nn.Module):
    """Inside, the model holds its plain base weights (adapters detached, kept aside); on exit
    the same adapters are attached again. For saving the unadapted checkpoint."""
    found = list(adapters(model).values())
    for mod, attr, _ in found:
        parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)
    try:
        yield model
    finally:
        for mod, attr, delta in found:
            parametrize.register_parametrization(mod, attr, delta)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """W <- W + (alpha / r) B A for every adapted weight; adapters removed, all parameters
    trainable again. The model is changed in place and returned."""
    for mod, attr, _ in adapters(model).values():
        parametrize.remove_parametrizations(mod, attr, leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
