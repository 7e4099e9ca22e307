"""The dense R1-distill shapes (DeepSeek-R1 report, arXiv 2501.12948, section 2.4) on one machine:
nanoseek side by side with llama.cpp on the CPU, or with transformers `generate` on a GPU, on the
same random weights (nanoseek/gguf_random_dense.py: a Qwen2.5-1.5B-, Qwen3-8B- or Llama-3.1-8B-
shaped GGUF written straight into GGML blocks).

- CPU (default): per shape and type, one GGUF file, each engine in its own process (its peak RSS
  its own): nanoseek (`read_dense_gguf(quantized=True)`, QuantLinear over the memory map, the
  continuous-batching Engine, greedy; `--paths exact,int4pack` adds the int4 CPU GEMM for q4_k)
  and llama.cpp (llama-cpp-python, the `llama` extra: benchmarks/bench_gguf_cpu.py's batch runner,
  flash attention, memory-mapped weights). Decode tokens/s at batch 1 is (new tokens - 1) over
  the time from the first token to the last (of a 16-token prompt); prompt processing tokens/s
  a `--prompt`-token prompt over its time to the first token; RSS after load and at peak from /proc/self/status. The types are
  q4_k_m and bf16; an 8B bf16 file is 16 GB, so it is written and run only with `--big-bf16`
  (default off).
- `--device cuda`: nanoseek in bf16 and with q4_k_m / q8_0 weights (the random files of those
  types read quantized, their blocks moved to the GPU: QuantLinear, dequantized per GEMM) against transformers `generate` with its static cache (compiled, and not) and its dynamic
  cache, batch 1, greedy, on the bf16 file's random weights converted to a Hugging Face folder
  (`DenseModel.save_pretrained`). `--tiny` shrinks every shape to two layers of width 256 (a
  check of the script; `--device cpu --vs transformers` runs that side on the CPU). Meant for the small shape on one GPU (a few minutes); no
  llama.cpp there.

    python -m benchmarks.bench_dense_decode [--shapes qwen2.5-1.5b,qwen3-8b] [--mix q4_k_m,bf16]
        [--threads 2] [--tokens 32] [--prompt 128] [--engines nanoseek,llama.cpp] [--paths exact]
        [--big-bf16] [--device cpu|cuda] [--dir /tmp] [--keep]

Prints a table and a final JSON line (benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from nanoseek.gguf_dense import read_dense_gguf
from nanoseek.gguf_random_dense import DENSE_SHAPES, dense_shape, write_random_dense_gguf
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.quant.qlinear import QuantLinear

from .bench_gguf_cpu import LlamaBatchRunner, rss_gib
from .common import REPO_ROOT, environment, fmt, log, print_json, table

SHORT = 16  # prompt length of the decode runs
BIG = 5e9  # parameters above which a bf16 file needs --big-bf16


def prompt_ids(vocab: int, length: int, seed: int = 0) -> list[int]:
    """`length` random token ids in 300..1000 (the trained tokenizer's ids, past the byte symbols)."""
    return np.random.default_rng(seed).integers(300, min(vocab, 1000), length).tolist()


# ------------------------------------------------------------------ CPU workers (one process each)
def run_nanoseek(path: str, tokens: int, prompt: int, threads: int, fast: bool) -> dict:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, tok = read_dense_gguf(path, quantized=True)
    if fast:
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.enable_fast()
    load_s = time.perf_counter() - t0
    rss_load, _ = rss_gib()
    vocab = model.config.vocab_size
    engine = Engine(model, tok, max_context=prompt + tokens + 8, max_batch=1)

    def run(ids, n) -> tuple[float, float]:
        """(seconds to the first token, seconds from the first token to the last) of n greedy tokens."""
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        t = time.perf_counter()
        stamps = [time.perf_counter() for ev in engine.submit(ids, params) if ev.token_id is not None]
        assert len(stamps) == n
        return stamps[0] - t, stamps[-1] - stamps[0]

    run(prompt_ids(vocab, SHORT, 9), 2)  # warm-up
    pp, _ = run(prompt_ids(vocab, prompt), 1)
    first, decode = run(prompt_ids(vocab, SHORT, 1), tokens)
    engine.close()
    return {"load_s": load_s, "rss_after_load_gib": rss_load, "first_token_s": first, "pp_tok_s": prompt / pp,
            "decode_tok_s": (tokens - 1) / decode, "peak_rss_gib": rss_gib()[1]}


def llama_run(r: LlamaBatchRunner, ids: list[int], n: int) -> tuple[float, float]:
    """(seconds to the first token, seconds from the first token to the last) of n greedy tokens
    of one sequence through llama.cpp's batch API."""
    r.clear()
    t = time.perf_counter()
    (nxt,) = r.decode([(tok, i, 0, i == len(ids) - 1) for i, tok in enumerate(ids)])
    first = time.perf_counter() - t
    t = time.perf_counter()
    for pos in range(len(ids), len(ids) + n - 1):
        (nxt,) = r.decode([(nxt, pos, 0, True)])
    return first, time.perf_counter() - t


def run_llama(path: str, tokens: int, prompt: int, threads: int) -> dict:
    t0 = time.perf_counter()
    r = LlamaBatchRunner(path, threads, prompt + tokens + 8, 1)
    load_s = time.perf_counter() - t0
    rss_load, _ = rss_gib()
    vocab = r.n_vocab
    llama_run(r, prompt_ids(vocab, SHORT, 9), 2)  # warm-up
    pp, _ = llama_run(r, prompt_ids(vocab, prompt), 1)
    first, decode = llama_run(r, prompt_ids(vocab, SHORT, 1), tokens)
    return {"load_s": load_s, "rss_after_load_gib": rss_load, "first_token_s": first, "pp_tok_s": prompt / pp,
            "decode_tok_s": (tokens - 1) / decode, "peak_rss_gib": rss_gib()[1]}


def measure(engine: str, path: str, a) -> dict:
    """One engine on one file in a fresh process: its result dict, or {"error": ...}."""
    cmd = [sys.executable, "-m", "benchmarks.bench_dense_decode", "--worker", engine, "--file", path,
           "--tokens", str(a.tokens), "--prompt", str(a.prompt), "--threads", str(a.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    p = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or ["exit status %d" % p.returncode])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def shape_config(shape: str, tiny: bool):
    """The shape's DenseConfig, or with `tiny` its family at two layers of width 256."""
    if not tiny:
        return dense_shape(shape)
    return dense_shape(shape, vocab_size=1280, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, bos_token_id=1100, eos_token_id=1101)


def cpu_rows(a, engines: list[str]) -> tuple[list, list]:
    rows, results = [], []
    for shape in a.shapes.split(","):
        cfg = shape_config(shape, a.tiny)
        for mix in a.mix.split(","):
            if mix in ("bf16", "f16", "f32") and cfg.param_counts()["total_params"] > BIG and not a.big_bf16:
                log(f"{shape} {mix}: skipped (a {mix} file of this size needs --big-bf16)")
                continue
            path = os.path.join(a.dir, f"nanoseek-random-{shape}{'-tiny' if a.tiny else ''}-{mix}.gguf")
            made = not os.path.exists(path)
            t = time.perf_counter()
            if made:
                write_random_dense_gguf(path, cfg, mix)
            size = os.path.getsize(path) / 2 ** 30
            log(f"{path}: {size:.2f} GiB" + (f", written in {time.perf_counter() - t:.0f} s" if made else ""))
            try:
                for engine in engines:
                    if engine == "nanoseek-int4pack" and mix in ("bf16", "f16", "f32"):
                        continue  # no q4 weights: the exact path again
                    r = {"shape": shape, "mix": mix, "engine": engine, "file_gib": size, **measure(engine, path, a)}
                    log(json.dumps(r))
                    results.append(r)
                    rows.append([shape, mix, engine, fmt(size, ".2f")] + (
                        [r["error"][:60]] + ["-"] * 5 if "error" in r else
                        [fmt(r["decode_tok_s"], ".2f"), fmt(r["pp_tok_s"], ".1f"), fmt(r["first_token_s"], ".2f"),
                         fmt(r["rss_after_load_gib"], ".2f"), fmt(r["peak_rss_gib"], ".2f"), fmt(r["load_s"], ".1f")]))
            finally:
                if made and not a.keep:
                    os.unlink(path)
    return rows, results


# ------------------------------------------------------------------ GPU: nanoseek vs transformers
def timed_generate(fn, tokens: int) -> tuple[float, float]:
    """(first-token seconds, decode tokens/s) of `fn(n)`, which generates n tokens, after a warm-up."""
    fn(2)  # warm-up (and, for a compiled model, the compilation)
    t = time.perf_counter()
    fn(1)
    t1 = time.perf_counter() - t
    t = time.perf_counter()
    fn(tokens)
    tn = time.perf_counter() - t
    return t1, (tokens - 1) / (tn - t1)


def gpu_rows(a) -> tuple[list, list]:
    import transformers

    rows, results = [], []
    device = torch.device(a.device)
    for shape in a.shapes.split(","):
        cfg = shape_config(shape, a.tiny)
        path = os.path.join(a.dir, f"nanoseek-random-{shape}{'-tiny' if a.tiny else ''}-bf16.gguf")
        hf_dir = os.path.join(a.dir, f"nanoseek-random-{shape}{'-tiny' if a.tiny else ''}-hf")
        written = [] if os.path.exists(path) else [path]
        if written:
            write_random_dense_gguf(path, cfg, "bf16")
        model, tok = read_dense_gguf(path, dtype=torch.bfloat16)  # the random weights, dequantized
        model.save_pretrained(hf_dir)
        ids = prompt_ids(cfg.vocab_size, SHORT, 1)
        x = torch.tensor([ids], device=device)

        def nanoseek_fn(m):
            engine = Engine(m, tok, max_context=SHORT + a.tokens + 8, max_batch=1, device=device)
            params = lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)  # noqa: E731
            return lambda n: engine.generate([ids], params(n))

        runs = [("nanoseek bf16", lambda: nanoseek_fn(model.to(device)))]
        for mix in ("q4_k_m", "q8_0"):  # random files of these types, their blocks moved to the device
            qpath = os.path.join(a.dir, f"nanoseek-random-{shape}{'-tiny' if a.tiny else ''}-{mix}.gguf")
            if not os.path.exists(qpath):
                write_random_dense_gguf(qpath, cfg, mix)
                written.append(qpath)
            runs.append((f"nanoseek {mix}", lambda q=qpath: nanoseek_fn(read_dense_gguf(q, quantized=True)[0].to(device))))
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).to(device).eval()

        def hf_fn(cache: str | None, compiled: bool):
            def go(n):
                kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
                if cache:
                    kw.update(cache_implementation=cache)
                if compiled:
                    kw.update(compile_config=transformers.CompileConfig(fullgraph=False))
                with torch.no_grad():
                    return hf.generate(x, **kw)
            if compiled:
                hf.generation_config.compile_config = transformers.CompileConfig()
            return go

        runs += [("transformers static compiled", lambda: hf_fn("static", True)),
                 ("transformers static", lambda: hf_fn("static", False)),
                 ("transformers dynamic", lambda: hf_fn(None, False))]
        for engine, make in runs:
            try:
                t1, tps = timed_generate(make(), a.tokens)
                r = {"shape": shape, "engine": engine, "first_token_s": t1, "decode_tok_s": tps}
            except Exception as e:  # one engine's failure is a row, not the end of the run
                r = {"shape": shape, "engine": engine, "error": f"{type(e).__name__}: {e}"}
            log(json.dumps(r))
            results.append(r)
            rows.append([shape, engine] + ([r["error"][:60], "-"] if "error" in r else
                                           [fmt(r["decode_tok_s"], ".1f"), fmt(r["first_token_s"], ".3f")]))
        del hf, model
        if not a.keep:
            for f in written:
                os.unlink(f)
            shutil.rmtree(hf_dir, ignore_errors=True)
    return rows, results


# ------------------------------------------------------------------ driver
def worker(a) -> None:
    if a.worker == "llama.cpp":
        out = run_llama(a.file, a.tokens, a.prompt, a.threads)
    else:
        out = run_nanoseek(a.file, a.tokens, a.prompt, a.threads, fast=a.worker == "nanoseek-int4pack")
    print(json.dumps(out), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="qwen2.5-1.5b,qwen3-8b", help=f"comma-separated, of {', '.join(DENSE_SHAPES)}")
    p.add_argument("--mix", default="q4_k_m,bf16", help="comma-separated GGUF types (CPU)")
    p.add_argument("--big-bf16", action="store_true", help="also the 8B-shaped bf16 files (16 GB each)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--tokens", type=int, default=32, help="new tokens per decode run")
    p.add_argument("--prompt", type=int, default=128, help="prompt-processing length (at most 512)")
    p.add_argument("--engines", default="nanoseek,llama.cpp")
    p.add_argument("--paths", default="exact", help="nanoseek's quantized matmul paths: exact, int4pack")
    p.add_argument("--device", default="cpu", help="cpu: against llama.cpp; cuda: against transformers")
    p.add_argument("--vs", choices=["llama.cpp", "transformers"], help="default: llama.cpp on cpu, else transformers")
    p.add_argument("--tiny", action="store_true", help="two-layer, 256-wide models of each shape's family")
    p.add_argument("--dir", default="/tmp", help="where the random GGUF files are written")
    p.add_argument("--keep", action="store_true", help="keep the files (default: delete the ones written here)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    if (a.vs or ("llama.cpp" if a.device == "cpu" else "transformers")) == "llama.cpp":
        engines = []
        for e in a.engines.split(","):
            engines += [e] if e != "nanoseek" else [f"nanoseek-{q}" if q != "exact" else "nanoseek"
                                                    for q in a.paths.split(",")]
        rows, results = cpu_rows(a, engines)
        load = os.getloadavg()
        table(f"CPU, {a.threads} threads (load average {load[0]:.1f} at the end): decode at batch 1, prompt "
              f"processing ({a.prompt} tokens), {a.tokens} new tokens",
              ["shape", "mix", "engine", "file GiB", "decode tok/s", "pp tok/s", "first token s",
               "RSS load GiB", "peak RSS GiB", "load s"], rows)
    else:
        rows, results = gpu_rows(a)
        load = os.getloadavg()
        table(f"{a.device}: decode at batch 1, greedy, {a.tokens} new tokens after a {SHORT}-token prompt",
              ["shape", "engine", "decode tok/s", "first token s"], rows)
    print_json({"bench": "dense_decode", "env": environment(a.device), "device": a.device, "threads": a.threads,
                "tokens": a.tokens, "prompt": a.prompt, "load_average": load, "results": results})


if __name__ == "__main__":
    main()
