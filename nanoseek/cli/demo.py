"""`nanoseek demo`: a short CPU tour of the `nano` model (MLA's naive and absorbed attention agree,
DeepSeek-V3 report section 2.1.1; a few optimizer steps; a Hugging Face checkpoint round trip;
greedy generation); its flags are DemoOptions' fields."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..config import ModelConfig
from ..model import DeepSeekV3
from .args import add_options
from .info import emit_json


@dataclass
class DemoOptions:
    steps: int = field(default=30, metadata={"help": "optimizer steps on the one batch"})
    seed: int = field(default=0, metadata={"help": "seed of the weights and the batch"})
    json: bool = field(default=False, metadata={
        "flags": ("--json",), "help": "print the results as one JSON object, the last line"})


def cmd_demo(args) -> int:
    """A short CPU tour of the `nano` model: build, check naive == absorbed attention, take a few
    optimizer steps on one batch, save and reload a Hugging Face checkpoint, generate greedily."""
    torch.manual_seed(args.seed)
    t0 = time.time()
    cfg = ModelConfig.from_preset("nano")
    model = DeepSeekV3.from_config(cfg, seed=args.seed)
    print(f"nano: {model.num_params() / 1e6:.2f}M parameters (+{model.num_params(True) / 1e6 - model.num_params() / 1e6:.2f}M MTP)")
    ids = torch.randint(0, cfg.vocab_size, (4, 64))
    with torch.no_grad():
        naive, absorbed = model(ids, attn_impl="naive"), model(ids, attn_impl="absorb")
    diff = (naive - absorbed).abs().max().item()
    print(f"MLA naive vs absorbed attention: max |diff| = {diff:.2e}")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in tqdm(range(args.steps), desc="overfit one batch", disable=args.json):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps")
    model.eval()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        again = DeepSeekV3.from_pretrained(d)
        with torch.no_grad():
            roundtrip = (again(ids) - model(ids)).abs().max().item()
        print(f"saved and reloaded a Hugging Face checkpoint ({sorted(os.listdir(d))}): max |diff| = {roundtrip:.2e}")
    out = model.generate(ids[:1, :8], max_new_tokens=16)
    cont = out[0, 8:].tolist()
    print(f"greedy continuation of the first 8 tokens: {cont}  (training batch: {ids[0, 8:24].tolist()})")
    result = {"params": model.num_params(), "naive_absorb_max_diff": diff, "loss_first": losses[0],
              "loss_last": losses[-1], "roundtrip_max_diff": roundtrip, "seconds": round(time.time() - t0, 2)}
    if args.json:
        emit_json(result)
    return 0


def add_demo_command(sub) -> None:
    s = sub.add_parser("demo", help="a short CPU tour of the nano model")
    add_options(s, DemoOptions)
    s.set_defaults(func=cmd_demo)
