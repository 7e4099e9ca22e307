"""nanoseek and llama.cpp side by side on the CPU, on the same `deepseek2` GGUF file: batch-1
decode tokens/s, prompt processing tokens/s (a 512-token prompt), aggregate decode tokens/s of 4
concurrent requests, resident memory after load and at peak. The file is a random model of the
preset's real dimensions written straight into GGML blocks (nanoseek/gguf_random.py), so a
DeepSeek-V2-Lite-shaped q4_k_m file (15.7B parameters) never exists in float.

- nanoseek: the file imported quantized (`read_gguf(quantized=True)`: QuantLinear / QuantExperts
  over the memory map) and run by the continuous-batching Engine, greedy; the 4 requests share its
  decode batch. `--paths exact,int4pack,held,decode`: the exact dequantization path; the int4 CPU
  GEMM for the q4_0 / q4_k weights only (quant/int4pack.py); every matrix held dequantized (the
  exact path's numbers, what load_model gives a GGUF on the CPU); and quant/cpu_decode's
  prepare_cpu_decode (the int4 GEMM, the other types held, the file's pages handed back). Packing
  and holding count in the load time.
- llama.cpp (llama-cpp-python, the `llama` extra): its best CPU settings (threads = cores for
  decode and batch, n_batch = n_ubatch = 512, flash attention, memory-mapped weights), through its
  batch API: one context with 4 sequences (n_seq_max), so the 4 requests decode in one llama_decode
  per step, as llama-server's parallel slots do.

Each engine runs in its own process (so its peak RSS is its own). Decode tokens/s is measured as
(new tokens - 1) over the time after the first token; prompt processing as 512 over the time to
the first token of a 512-token prompt.

    python -m benchmarks.bench_gguf_cpu [--model nano|small|v2-lite] [--mix q4_k_m,q8_0]
        [--threads 2] [--tokens 32] [--engines nanoseek,llama.cpp] [--paths exact,decode] [--dir /tmp] [--keep]

Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from nanoseek import ModelConfig
from nanoseek.gguf_random import write_random_gguf

from .common import REPO_ROOT, environment, fmt, log, print_json, table

PRESETS = {"nano": "nano", "small": "small", "v2-lite": "deepseek-v2-lite"}
PROMPT = 512  # prompt-processing length
SHORT = 16  # prompt length of the decode runs
CONCURRENT = 4


def rss_gib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in GiB (/proc/self/status VmRSS, VmHWM)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value
    return tuple(int(fields[k].split()[0]) / 2 ** 20 for k in ("VmRSS", "VmHWM"))


def prompts(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """n random prompts of `length` token ids (ids 300.. past the byte tokens, below vocab)."""
    g = np.random.default_rng(seed)
    return [g.integers(300, vocab, length).tolist() for _ in range(n)]


# ------------------------------------------------------------------ nanoseek
def run_nanoseek(path: str, tokens: int, threads: int, qpath: str) -> dict:
    from nanoseek.gguf_file import read_gguf
    from nanoseek.infer.engine import Engine, SamplingParams
    from nanoseek.quant.cpu_decode import prepare_cpu_decode
    from nanoseek.quant.qlinear import QuantExperts, QuantLinear

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, tok = read_gguf(path, quantized=True)
    if qpath == "int4pack":
        for m in model.modules():
            if isinstance(m, (QuantLinear, QuantExperts)):
                m.enable_fast()
    elif qpath in ("held", "decode"):
        prepare_cpu_decode(model, int4=qpath == "decode")
    load_s = time.perf_counter() - t0
    rss_load, _ = rss_gib()
    vocab = model.config.vocab_size
    engine = Engine(model, tok, max_context=PROMPT + tokens + 8, max_batch=CONCURRENT)

    def run(batch, n):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        t = time.perf_counter()
        out = engine.generate(batch, params)
        assert all(c.completion_tokens == n for c in out)
        return time.perf_counter() - t

    run(prompts(vocab, 1, SHORT, 9), 2)  # warm-up
    long = prompts(vocab, 1, PROMPT)
    first = run(long, 1)
    one = prompts(vocab, 1, SHORT, 1)
    t1, tn = run(one, 1), run(one, tokens)
    many = prompts(vocab, CONCURRENT, SHORT, 2)
    m1, mn = run(many, 1), run(many, tokens)
    return {"load_s": load_s, "rss_after_load_gib": rss_load, "pp_tok_s": PROMPT / first,
            "decode_tok_s": (tokens - 1) / (tn - t1), "concurrent_tok_s": CONCURRENT * (tokens - 1) / (mn - m1),
            "peak_rss_gib": rss_gib()[1]}


# ------------------------------------------------------------------ llama.cpp
class LlamaBatchRunner:
    """llama.cpp's batch API over one context of `n_seq` sequences: prefill and greedy decode."""

    def __init__(self, path: str, threads: int, n_ctx: int, n_seq: int):
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=32,
                                   n_batch=32, use_mmap=True, verbose=False)  # the weights; its own context unused
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx * n_seq, PROMPT, PROMPT
        params.n_seq_max, params.n_threads, params.n_threads_batch = n_seq, threads, threads
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.llm.model, params)
        if not self.ctx:
            raise RuntimeError(f"{path}: llama.cpp could not create a context")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.llm.model))
        self.batch = llama_cpp.llama_batch_init(PROMPT, 0, n_seq)

    def clear(self):
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """entries (token, position, sequence, wants logits) -> the greedy next token of each that wants logits."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, int(logits)
            b.seq_id[i][0] = seq
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        out = []
        for i, e in enumerate(entries):
            if e[3]:
                ptr = self.lib.llama_get_logits_ith(self.ctx, i)
                out.append(int(np.argmax(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                                                shape=(self.n_vocab,)))))
        return out

    def generate(self, batch: list[list[int]], n: int) -> float:
        """Prefill every prompt, then n - 1 greedy decode steps of all sequences together; seconds."""
        self.clear()
        t = time.perf_counter()
        nxt = []
        for s, p in enumerate(batch):
            nxt += self.decode([(tok, i, s, i == len(p) - 1) for i, tok in enumerate(p)])
        pos = [len(p) for p in batch]
        for _ in range(n - 1):
            nxt = self.decode([(nxt[s], pos[s], s, True) for s in range(len(batch))])
            pos = [q + 1 for q in pos]
        return time.perf_counter() - t


def run_llama(path: str, tokens: int, threads: int) -> dict:
    t0 = time.perf_counter()
    r = LlamaBatchRunner(path, threads, PROMPT + tokens + 8, CONCURRENT)
    load_s = time.perf_counter() - t0
    rss_load, _ = rss_gib()
    vocab = r.n_vocab
    r.generate(prompts(vocab, 1, SHORT, 9), 2)  # warm-up
    first = r.generate(prompts(vocab, 1, PROMPT), 1)
    one = prompts(vocab, 1, SHORT, 1)
    t1, tn = r.generate(one, 1), r.generate(one, tokens)
    many = prompts(vocab, CONCURRENT, SHORT, 2)
    m1, mn = r.generate(many, 1), r.generate(many, tokens)
    return {"load_s": load_s, "rss_after_load_gib": rss_load, "pp_tok_s": PROMPT / first,
            "decode_tok_s": (tokens - 1) / (tn - t1), "concurrent_tok_s": CONCURRENT * (tokens - 1) / (mn - m1),
            "peak_rss_gib": rss_gib()[1]}


# ------------------------------------------------------------------ driver
def worker(a) -> None:
    if a.worker == "llama.cpp":
        out = run_llama(a.file, a.tokens, a.threads)
    else:
        out = run_nanoseek(a.file, a.tokens, a.threads, a.worker.removeprefix("nanoseek").lstrip("-") or "exact")
    print(json.dumps(out), flush=True)


def measure(engine: str, path: str, a) -> dict:
    """One engine on one file in a fresh process: its result dict, or {"error": ...}."""
    cmd = [sys.executable, "-m", "benchmarks.bench_gguf_cpu", "--worker", engine, "--file", path,
           "--tokens", str(a.tokens), "--threads", str(a.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    p = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or ["exit status %d" % p.returncode])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="small", choices=list(PRESETS))
    p.add_argument("--mix", default="q4_k_m", help="comma-separated GGUF types, e.g. q4_k_m,q8_0")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--tokens", type=int, default=32, help="new tokens per decode run")
    p.add_argument("--engines", default="nanoseek,llama.cpp")
    p.add_argument("--paths", default="exact,decode", help="nanoseek's quantized matmul paths: exact, int4pack, held, decode")
    p.add_argument("--dir", default="/tmp", help="where the random GGUF files are written")
    p.add_argument("--keep", action="store_true", help="keep the files (default: delete the ones written here)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    cfg = ModelConfig.from_preset(PRESETS[a.model])
    engines = []
    for e in a.engines.split(","):
        engines += [e] if e != "nanoseek" else [f"nanoseek-{q}" if q != "exact" else "nanoseek" for q in a.paths.split(",")]
    rows, results = [], []
    for mix in a.mix.split(","):
        path = os.path.join(a.dir, f"nanoseek-random-{a.model}-{mix}.gguf")
        made = not os.path.exists(path)
        t = time.perf_counter()
        if made:
            write_random_gguf(path, cfg, mix)
        size = os.path.getsize(path) / 2 ** 30
        log(f"{path}: {size:.2f} GiB" + (f", written in {time.perf_counter() - t:.0f} s" if made else ""))
        try:
            for engine in engines:
                r = {"model": a.model, "mix": mix, "engine": engine, "file_gib": size, **measure(engine, path, a)}
                log(json.dumps(r))
                results.append(r)
                rows.append([a.model, mix, engine, fmt(size, ".2f")] + (
                    [r["error"][:60]] if "error" in r else
                    [fmt(r["decode_tok_s"], ".2f"), fmt(r["pp_tok_s"], ".1f"), fmt(r["concurrent_tok_s"], ".2f"),
                     fmt(r["rss_after_load_gib"], ".2f"), fmt(r["peak_rss_gib"], ".2f"), fmt(r["load_s"], ".1f")]))
        finally:
            if made and not a.keep:
                os.unlink(path)
    table(f"CPU, {a.threads} threads: decode at batch 1, prompt processing ({PROMPT} tokens), "
          f"{CONCURRENT} concurrent requests (aggregate decode), {a.tokens} new tokens",
          ["model", "mix", "engine", "file GiB", "decode tok/s", "pp tok/s", f"{CONCURRENT}x tok/s",
           "RSS load GiB", "peak RSS GiB", "load s"], rows)
    print_json({"bench": "gguf_cpu", "env": environment("cpu"), "threads": a.threads, "tokens": a.tokens,
                "results": results})


if __name__ == "__main__":
    main()
