"""Serving an FP8 checkpoint with its weights kept in FP8 (nanoseek.infer.fp8_weights) against the same
checkpoint dequantized at load: model memory (parameters + buffers), decode tokens/s through the
engine at two batch sizes, whether the greedy tokens agree, and the logits' SQNR against the
dequantized model's. Random-init preset model written with `save_pretrained(fp8=True)`.

    python -m benchmarks.bench_fp8_weights [--preset nano] [--dtype fp32|bf16] [--new 32]

Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.quant.fp8 import sqnr_db
from nanoseek.infer.fp8_weights import load_fp8_weights

from .common import environment, pangram_tokenizer, print_json, sync


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default=None, help="default: small on GPU, nano on CPU")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="compute dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--new", type=int, default=32, help="new tokens per sequence")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt-len", type=int, default=32)
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    preset = a.preset or ("small" if cuda else "nano")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype or ("bf16" if cuda else "fp32")]
    cfg = ModelConfig.from_preset(preset, num_nextn_predict_layers=0)
    tmp = tempfile.mkdtemp(prefix="bench_fp8_weights_")
    DeepSeekV3.from_config(cfg, seed=0).save_pretrained(tmp, fp8=True)
    tok = pangram_tokenizer(min(cfg.vocab_size, 512))
    tok.save(tmp)
    g = torch.Generator().manual_seed(0)
    bs = list(map(int, a.batches.split(",")))
    prompts_of = {b: torch.randint(2, cfg.vocab_size, (b, a.prompt_len), generator=g).tolist() for b in bs}
    rows, outs, logits = [], {}, {}
    for name in ("dequantized at load", "FP8 weights kept", "FP8 weights, W8A8 GEMMs"):
        if name.startswith("FP8"):
            model, rep = load_fp8_weights(tmp, dtype=dtype, device=device, w8a8="W8A8" in name)
        else:
            model = DeepSeekV3.from_pretrained(tmp, dtype=dtype, device=device)
        model.eval()
        row = {"impl": name, "model_gib": model_bytes(model) / 2**30}
        with torch.no_grad():  # full-sequence logits of the largest batch's prompts, for the SQNR
            logits[name] = model(torch.tensor(prompts_of[max(bs)], device=device)).float().cpu()
        for b in bs:
            prompts = prompts_of[b]
            engine = Engine(model, tok, max_context=a.prompt_len + a.new + 8, max_batch=b, device=device,
                            cuda_graphs=False)
            params = SamplingParams(max_tokens=a.new, temperature=0, ignore_eos=True)
            engine.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))  # warm-up
            sync(device)
            t0 = time.perf_counter()
            comps = engine.generate(prompts, params)
            sync(device)
            dt = time.perf_counter() - t0
            engine.close()
            row[f"tok_s_b{b}"] = sum(c.completion_tokens for c in comps) / dt
            outs.setdefault(b, []).append([c.token_ids for c in comps])
        rows.append(row)
        del model
    same = {b: o[0] == o[1] for b, o in outs.items()}  # dequantized vs FP8-kept (W8A8 is not exact)
    agree_w8a8 = {b: sum(x == y for r0, r2 in zip(o[0], o[2]) for x, y in zip(r0, r2)) / sum(map(len, o[0]))
                  for b, o in outs.items()}
    ref_name = "dequantized at load"
    sqnr = {name: round(sqnr_db(logits[ref_name], lg), 2) for name, lg in logits.items() if name != ref_name}
    hw = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{preset} on {hw}, compute {str(dtype)[6:]}, {a.new} new tokens, prompt {a.prompt_len}")
    print(f"{'impl':<22} {'model GiB':>10} " + " ".join(f"{'tok/s b' + str(b):>12}" for b in bs))
    for r in rows:
        print(f"{r['impl']:<22} {r['model_gib']:>10.3f} " + " ".join(f"{r[f'tok_s_b{b}']:>12,.0f}" for b in bs))
    ratio = rows[1]["model_gib"] / rows[0]["model_gib"]
    print(f"memory FP8 / dequantized: {ratio:.2f}x; greedy tokens identical (FP8 kept): {same}; "
          f"W8A8 greedy tokens equal to the dequantized model's: {agree_w8a8}; logits SQNR vs the "
          f"dequantized model (dB): {sqnr}")
    print_json({"preset": preset, "device": hw, **environment(device), "dtype": str(dtype)[6:], "rows": rows,
                "memory_ratio": ratio, "greedy_identical": same, "w8a8_token_agreement": agree_w8a8,
                "logits_sqnr_db": sqnr, "fp8_modules": rep["fp8_modules"]})


if __name__ == "__main__":
    main()
