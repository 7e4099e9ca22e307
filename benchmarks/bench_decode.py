"""Decode speed through the engine (the decode protocol: prompt 128 tokens, 256 new tokens, EOS
ignored, warm-up then median): the nanoseek engine (eager, and with CUDA-graph decode steps)
against transformers' `generate` on the same checkpoint, at batch 1 and 32; time to first token,
tokens/s and MBU (nanoseek/perf.py). With `--speculative`, each engine variant also runs with MTP
drafts (DeepSeek-V3 report section 2.2; `Engine(speculative=True)`) in the same run: its acceptance
rate, tokens per request per main-model step, and speed-up over the same variant without drafts.
Random weights draft almost nothing right; `--model` takes a checkpoint trained with MTP instead.
Prints a table and a final JSON line.

    python -m benchmarks.bench_decode --preset small            # GPU
    python -m benchmarks.bench_decode --preset nano --device cpu --batches 1 4
    python -m benchmarks.bench_decode --model RUN_DIR --speculative --no-hf
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time

import torch

from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.speculative import SpeculativeStats
from nanoseek.perf import decode_bytes_per_token, measure_copy_bandwidth

from .common import environment, mbu, pangram_tokenizer, print_json, sync


def run_engine(engine, prompts, new_tokens):
    """Returns (time to first token of the batch, decode tokens/s over the batch)."""
    first, counts, ends = [None] * len(prompts), [0] * len(prompts), [0.0] * len(prompts)

    def consume(i, h):
        for ev in h:
            if first[i] is None:
                first[i] = time.perf_counter()
            counts[i] += 1
        ends[i] = time.perf_counter()

    t0 = time.perf_counter()
    handles = [engine.submit(p, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)) for p in prompts]
    threads = [threading.Thread(target=consume, args=(i, h)) for i, h in enumerate(handles)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t_first = max(first)
    return t_first - t0, (sum(counts) - len(prompts)) / (max(ends) - t_first)


def run_hf(model, prompts, new_tokens, device, cache="dynamic"):
    """transformers `generate`: its default dynamic cache, or `static` (a preallocated cache, which
    `generate` compiles the forward for: its documented fast path for decoding)."""
    ids = torch.tensor(prompts, device=device)
    kw = dict(do_sample=False, pad_token_id=0, **({"cache_implementation": "static"} if cache == "static" else {}))
    sync(device)
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    sync(device)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    sync(device)
    total = time.perf_counter() - t0
    return ttft, len(prompts) * (new_tokens - 1) / max(total - ttft, 1e-9)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf-repeats", type=int, default=3, help="as many as ours by default")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--only", nargs="*", help="run only these variants (by label)")
    p.add_argument("--speculative", action="store_true", help="also each variant with MTP drafts")
    p.add_argument("--model", help="a checkpoint (e.g. one trained with MTP) instead of random `--preset` weights")
    a = p.parse_args()
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if a.model:
        model = DeepSeekV3.from_pretrained(a.model, dtype=dtype, device=device).eval()
        cfg, a.preset = model.config, a.model
    else:
        cfg = ModelConfig.from_preset(a.preset)
        model = DeepSeekV3.from_config(cfg, device=device, dtype=dtype, seed=0).eval()
    tok = pangram_tokenizer(300)
    g = torch.Generator().manual_seed(0)
    bw = measure_copy_bandwidth(device) if device.type == "cuda" else None
    results = {"preset": a.preset, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               **environment(device), "copy_bw": bw, "rows": []}
    variants = [("nanoseek eager", False, False, False)]
    if device.type == "cuda":
        variants += [("nanoseek cuda graphs", True, False, False), ("nanoseek compile+graphs", True, True, False)]
    if a.speculative:  # each right after its plain variant, on the same prompts
        variants = [v for plain in variants for v in (plain, (plain[0] + " +MTP", *plain[1:3], True))]
    variants = [v for v in variants if not a.only or v[0] in a.only]
    ctx = a.prompt + a.new + 8
    prompts_of = {b: torch.randint(0, cfg.vocab_size, (b, a.prompt), generator=g).tolist() for b in a.batches}
    for label, graphs, compiled, speculative in variants:
        engine = Engine(model, tok, max_context=ctx, max_batch=max(a.batches), cuda_graphs=graphs, compile=compiled,
                        speculative=speculative)
        for b in a.batches:
            prompts = prompts_of[b]
            run_engine(engine, prompts, 8)  # warm-up (and graph capture)
            engine.speculative_stats = SpeculativeStats()  # the measured runs' drafts only
            runs = [run_engine(engine, prompts, a.new) for _ in range(a.repeats)]
            ttft = statistics.median(r[0] for r in runs)
            tps = statistics.median(r[1] for r in runs)
            row = {"impl": label, "batch": b, "ttft_s": ttft, "tokens_per_s": tps}
            if speculative:
                st = engine.speculative_stats
                plain = next((r for r in results["rows"] if r["impl"] == label.removesuffix(" +MTP")
                              and r["batch"] == b), None)
                row.update(acceptance=st.acceptance_rate, tokens_per_step=st.tokens_per_step,
                           speedup_vs_plain=tps / plain["tokens_per_s"] if plain else None)
            if bw:
                row["mbu"] = mbu(tps / b, decode_bytes_per_token(cfg, a.prompt + a.new // 2), bw)
            results["rows"].append(row)
            print(row, flush=True)
        engine.close()
    if not a.no_hf:
        from transformers import DeepseekV3ForCausalLM
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            hf = DeepseekV3ForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
        del model
        for cache, b in [(c, b) for c in ("dynamic", "static") for b in a.batches]:
            label = "transformers generate" + (" (static cache, compiled)" if cache == "static" else "")
            if a.only and label not in a.only:
                continue
            prompts = torch.randint(0, cfg.vocab_size, (b, a.prompt), generator=g).tolist()
            try:
                run_hf(hf, prompts, 4, device, cache)  # warm-up (and, static, the compile)
                runs = [run_hf(hf, prompts, a.new, device, cache) for _ in range(a.hf_repeats)]
            except Exception as e:  # noqa: BLE001 - report the peer's failure as a row, keep going
                results["rows"].append({"impl": label, "batch": b, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                print(results["rows"][-1], flush=True)
                continue
            row = {"impl": label, "batch": b, "ttft_s": statistics.median(r[0] for r in runs),
                   "tokens_per_s": statistics.median(r[1] for r in runs)}
            if bw:
                row["mbu"] = mbu(row["tokens_per_s"] / b, decode_bytes_per_token(cfg, a.prompt + a.new // 2), bw)
            results["rows"].append(row)
            print(row, flush=True)
    print(f"\nDecode, `{a.preset}` ({dtype}), prompt {a.prompt}, {a.new} new tokens, greedy, EOS ignored, {results['device']}")
    print(f"{'implementation':<30}{'batch':>6}{'TTFT ms':>10}{'tokens/s':>12}{'MBU':>8}")
    for r in results["rows"]:
        if "error" in r:
            print(f"{r['impl']:<30}{r['batch']:>6}  failed: {r['error'][:80]}")
            continue
        m = f"{100 * r['mbu']:.1f}%" if "mbu" in r else "-"
        spec = ""
        if "acceptance" in r:
            x = f"{r['speedup_vs_plain']:.2f}x" if r["speedup_vs_plain"] else "-"
            spec = f"   acceptance {100 * r['acceptance']:.1f}%, {r['tokens_per_step']:.2f} tokens/step, {x} vs plain"
        print(f"{r['impl']:<30}{r['batch']:>6}{1000 * r['ttft_s']:>10.1f}{r['tokens_per_s']:>12,.1f}{m:>8}{spec}")
    def best(prefix, labels=None):
        out = {}
        for r in results["rows"]:
            if r["impl"].startswith(prefix) and "error" not in r and (labels is None or r["impl"] in labels):
                out[r["batch"]] = max(out.get(r["batch"], 0), r["tokens_per_s"])
        return out

    # like with like first (eager with eager), then each side at its best
    eager_ours, eager_hf = best("nanoseek", {"nanoseek eager"}), best("transformers", {"transformers generate"})
    best_ours, best_hf = best("nanoseek"), best("transformers")
    results["eager_speedup_vs_transformers"] = {b: eager_ours[b] / eager_hf[b] for b in eager_ours if eager_hf.get(b)}
    results["best_speedup_vs_transformers_best"] = {b: best_ours[b] / best_hf[b] for b in best_ours if best_hf.get(b)}
    print("eager vs eager (nanoseek / transformers dynamic cache):", results["eager_speedup_vs_transformers"])
    print("best vs best (each side's fastest row):", results["best_speedup_vs_transformers_best"])
    print_json(results)


if __name__ == "__main__":
    main()
