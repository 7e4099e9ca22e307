"""`nanoseek serve` under load: N concurrent streaming clients (a mix of Ollama /api/chat, OpenAI
/v1/chat/completions and /v1/completions, greedy) against one served model; per N, p50/p99 time to
first token (request sent to the first chunk carrying text), aggregate generated tokens/s (all
clients' tokens over the wall time of the round), per-client decode tokens/s (after the first token),
and 5xx count. The server runs as its own process (`nanoseek serve`), so the clients' threads do
not share its interpreter. Prints a table and a final JSON line.

    python -m benchmarks.bench_serve --clients 1 8 32 64                    # the test fixture model, CPU
    python -m benchmarks.bench_serve --model DIR --clients 64 --max-tokens 128 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time

import httpx

from nanoseek.infer.chat import render_chat
from nanoseek.infer.store import Store
from nanoseek.tokenizer import Tokenizer

from .common import environment, print_json, served, table

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "memorizer")
QUESTION = "What is two plus two?"


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def one_client(url: str, kind: str, prompt: str, max_tokens: int, ignore_eos: bool) -> dict:
    """One streamed request: {ttft, tokens, decode_s, status}."""
    if kind == "ollama":
        path, body = "/api/chat", {"model": "bench", "messages": [{"role": "user", "content": QUESTION}],
                                   "options": {"temperature": 0, "num_predict": max_tokens}}
    elif kind == "chat":
        path, body = "/v1/chat/completions", {"model": "bench", "messages": [{"role": "user", "content": QUESTION}],
                                              "temperature": 0, "max_tokens": max_tokens, "stream": True,
                                              "ignore_eos": ignore_eos, "stream_options": {"include_usage": True}}
    else:
        path, body = "/v1/completions", {"model": "bench", "prompt": prompt, "temperature": 0,
                                         "max_tokens": max_tokens, "stream": True, "ignore_eos": ignore_eos,
                                         "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens, status = None, 0, 0
    with httpx.Client(timeout=600) as c, c.stream("POST", url + path, json=body) as r:
        status = r.status_code
        for line in r.iter_lines():
            line = line.removeprefix("data: ").strip()
            if not line or line == "[DONE]":
                continue
            obj = json.loads(line)
            if kind == "ollama":
                text = (obj.get("message") or {}).get("content", "") + ((obj.get("message") or {}).get("thinking") or "")
                if obj.get("done"):
                    tokens = obj.get("eval_count", 0)
            else:
                ch = obj.get("choices") or [{}]
                d = ch[0].get("delta") or {}
                text = ch[0].get("text") or d.get("content") or d.get("reasoning_content") or ""
                if obj.get("usage"):
                    tokens = obj["usage"]["completion_tokens"]
            if text and first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft": (first or end) - t0, "tokens": tokens, "decode_s": end - (first or end), "status": status}


def run_round(url: str, n: int, prompt: str, max_tokens: int, ignore_eos: bool) -> dict:
    kinds = ["ollama", "chat", "completions"]
    results: list = [None] * n

    def work(i):
        try:
            results[i] = one_client(url, kinds[i % 3], prompt, max_tokens, ignore_eos)
        except Exception as e:  # noqa: BLE001 - a failed client is counted, not fatal
            results[i] = {"ttft": float("nan"), "tokens": 0, "decode_s": 0.0, "status": 599, "error": repr(e)}

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts = [r["ttft"] for r in results if r["status"] == 200]
    per_client = [(r["tokens"] - 1) / r["decode_s"] for r in results if r["status"] == 200 and r["decode_s"] > 0]
    return {"clients": n, "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "tokens": sum(r["tokens"] for r in results), "wall_s": wall,
            "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "client_decode_tokens_per_s_p50": statistics.median(per_client) if per_client else 0.0,
            "errors_5xx": sum(r["status"] >= 500 for r in results),
            "not_200": sum(r["status"] != 200 for r in results)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=FIXTURE, help="checkpoint directory (default: the test fixture model)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--ignore-eos", action="store_true", help="OpenAI requests run to --max-tokens")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--context-length", type=int, default=256)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=1, help="the server's torch intra-op threads (OMP_NUM_THREADS)")
    args = ap.parse_args(argv)
    home = tempfile.mkdtemp(prefix="nanoseek-bench-serve-")
    Store(home).create("bench", os.path.abspath(args.model))
    flags = ["--context-length", str(args.context_length), "--max-batch", str(args.max_batch)]
    flags += ["--device", args.device] if args.device else []
    with served(home, flags, args.threads) as url:
        tok = Tokenizer.from_dir(args.model)
        prompt = render_chat(tok, [{"role": "user", "content": QUESTION}])
        run_round(url, 1, prompt, args.max_tokens, args.ignore_eos)  # load the model, warm up
        rounds = [run_round(url, n, prompt, args.max_tokens, args.ignore_eos) for n in args.clients]
    table(f"nanoseek serve: {os.path.basename(os.path.abspath(args.model))}, max_tokens {args.max_tokens}",
          ["clients", "TTFT p50 ms", "TTFT p99 ms", "tokens/s (all)", "client tok/s p50", "5xx"],
          [[r["clients"], f"{r['ttft_p50_s'] * 1e3:.1f}", f"{r['ttft_p99_s'] * 1e3:.1f}", f"{r['tokens_per_s']:.1f}",
            f"{r['client_decode_tokens_per_s_p50']:.1f}", r["errors_5xx"]] for r in rounds])
    out = {"bench": "serve", "model": os.path.abspath(args.model), "max_tokens": args.max_tokens,
           "ignore_eos": args.ignore_eos, "rounds": rounds, "env": environment(args.device or "cpu")}
    print_json(out)
    return out


if __name__ == "__main__":
    main()
