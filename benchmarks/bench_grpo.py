"""GRPO rollout throughput: the batched KV-cache engine against transformers' `generate` on the
same checkpoint, the same task prompts (P prompts x G samples, temperature sampling, stop at EOS),
in one run. Also times one full GRPO step (rollouts + policy update) with nanoseek.

    python -m benchmarks.bench_grpo --model runs/quickstart/pretrain --task countdown:n_numbers=3

Prints a table and a final JSON line. Without --model, a random quickstart-shaped model is used
(throughput only; its completions run to the token limit)."""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from nanoseek.config import ModelConfig
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.model import DeepSeekV3
from nanoseek.recipes.quickstart import QUICKSTART_MODEL
from nanoseek.tasks import get_task
from nanoseek.tasks.evaluate import encode_prompts
from nanoseek.tokenizer import Tokenizer, train_bpe

from .common import environment, print_json, sync


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", help="checkpoint directory with tokenizer (default: random quickstart-sized model)")
    p.add_argument("--task", default="countdown:n_numbers=3")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--new", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="weights of both (default: bf16 on GPU, fp32 on CPU)")
    a = p.parse_args()
    device = torch.device(a.device)
    task = get_task(a.task)
    problems = task.problems("train", a.prompts, seed=7)
    tmp = tempfile.mkdtemp()
    if a.model:
        model_dir = a.model
    else:
        tok = train_bpe([q.prompt + q.solution for q in task.problems("train", 2000)], 300, split_digits=True)
        cfg = ModelConfig.from_preset("nano", **QUICKSTART_MODEL, vocab_size=tok.vocab_size, num_nextn_predict_layers=0)
        DeepSeekV3.from_config(cfg, seed=0).save_pretrained(tmp)
        tok.save(tmp)
        model_dir = tmp
    tok = Tokenizer.from_dir(model_dir)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    model = DeepSeekV3.from_pretrained(model_dir, device=device, dtype=dtype).eval()
    prompts = encode_prompts(tok, problems)
    rep = [q for q in prompts for _ in range(a.group)]
    rows, results = [], {"device": str(device), "prompts": a.prompts, "group": a.group, "max_new": a.new,
                         "params": model.num_params(), **environment(device)}

    def timed(fn):
        """(tokens, seconds) of the fastest of `a.repeats` runs of fn() (which returns its tokens)."""
        best = None
        for _ in range(a.repeats):
            sync(device)
            t0 = time.perf_counter()
            n = fn()
            sync(device)
            dt = time.perf_counter() - t0
            best = (n, dt) if best is None or n / dt > best[0] / best[1] else best
        return best

    engine = Engine(model, tok, max_context=max(map(len, prompts)) + a.new + 8, max_batch=len(rep), device=device)
    params = SamplingParams(max_tokens=a.new, temperature=a.temperature)
    engine.generate(rep[:8], params)  # warm up
    n, dt = timed(lambda: sum(c.completion_tokens for c in engine.generate(rep, params)))
    rows.append({"impl": "nanoseek engine", "tokens": n, "seconds": dt, "tokens_per_s": n / dt})
    engine.close()

    if not a.no_hf:
        from transformers import DeepseekV3ForCausalLM
        hf = DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), tok.pad_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, q in enumerate(prompts):  # left padding, as generate expects for decoder-only models
            ids[i, width - len(q):] = torch.tensor(q)
            mask[i, width - len(q):] = 1
        ids, mask = ids.to(device), mask.to(device)

        def hf_run():
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=mask, do_sample=True, temperature=a.temperature, top_k=0,
                                  max_new_tokens=a.new, num_return_sequences=a.group, eos_token_id=tok.eos_id,
                                  pad_token_id=tok.pad_id or 0)
            gen = out[:, width:]
            # tokens up to the first EOS (the same count the engine reports, EOS excluded)
            ended = (gen == tok.eos_id).int().cumsum(1) > 0
            return int((~ended).sum())

        hf_run()
        n, dt = timed(hf_run)
        rows.append({"impl": "transformers generate", "tokens": n, "seconds": dt, "tokens_per_s": n / dt})
    results["rows"] = rows
    if len(rows) == 2:
        results["engine_vs_transformers"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    print(f"{'impl':<24} {'tokens':>8} {'seconds':>8} {'tokens/s':>10}")
    for r in rows:
        print(f"{r['impl']:<24} {r['tokens']:>8} {r['seconds']:>8.2f} {r['tokens_per_s']:>10.0f}")
    if "engine_vs_transformers" in results:
        print(f"engine / transformers: {results['engine_vs_transformers']:.2f}x")
    print_json(results)


if __name__ == "__main__":
    main()
