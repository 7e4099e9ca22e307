"""Prefix reuse across chat turns on `nanoseek serve`: one client holds a multi-turn conversation over
real HTTP (the `openai` client, streaming, greedy), each turn sending the whole history, against a
server with the prefix cache (`--prefix-cache-tokens`) and one without (0). Per turn: the prompt's
tokens, how many the server took from the cache (usage.prompt_tokens_details.cached_tokens), how
many it prefilled, and the time to first token (request sent to the first chunk carrying text).
The latent cache that is reused is the MLA one (DeepSeek-V2 report section 2.1). Prints a table and
a final JSON line.

    python -m benchmarks.bench_prefix                       # a random nano-preset model, CPU
    python -m benchmarks.bench_prefix --model DIR --turns 10 --device cuda
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import openai

from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.infer.store import Store

from .common import environment, print_json, served, table

TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "memorizer")


def nano_checkpoint(folder: str, seed: int = 0) -> str:
    """A randomly initialized nano-preset DeepSeek-V3 with the test fixture's tokenizer."""
    vocab = 512  # the fixture tokenizer's
    model = DeepSeekV3.from_config(ModelConfig.from_preset("nano", vocab_size=vocab, max_position_embeddings=4096),
                                   seed=seed)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER, name), folder)
    return folder


def conversation(url: str, turns: int, max_tokens: int, topic: str = "the quick brown fox and the lazy dog") -> list[dict]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    msgs, rows = [], []
    for turn in range(turns):
        msgs.append({"role": "user", "content": f"Turn {turn + 1}: tell me more about {topic}."})
        t0 = time.perf_counter()
        ttft, parts, usage = None, [], None
        for chunk in client.chat.completions.create(model="bench", messages=msgs, temperature=0, max_tokens=max_tokens,
                                                    stream=True, stream_options={"include_usage": True},
                                                    extra_body={"ignore_eos": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft or time.perf_counter() - t0
                parts.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        cached = usage.prompt_tokens_details.cached_tokens
        rows.append({"turn": turn + 1, "prompt_tokens": usage.prompt_tokens, "cached_tokens": cached,
                     "prefill_tokens": usage.prompt_tokens - cached, "ttft_s": ttft})
        msgs.append({"role": "assistant", "content": "".join(parts)})
    return rows


def serve(home: str, args, prefix_tokens: int, turns: int) -> list[dict]:
    flags = ["--context-length", str(args.context_length), "--prefix-cache-tokens", str(prefix_tokens)]
    flags += ["--device", args.device] if args.device else []
    with served(home, flags, args.threads) as url:
        conversation(url, 1, 4, topic="a stitch in time")  # load the model, warm up (another prompt)
        return conversation(url, turns, args.max_tokens)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint directory (default: a random nano-preset model)")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--context-length", type=int, default=2048)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=1, help="the server's torch intra-op threads (OMP_NUM_THREADS)")
    args = ap.parse_args(argv)
    home = tempfile.mkdtemp(prefix="nanoseek-bench-prefix-")
    model = args.model or nano_checkpoint(os.path.join(home, "nano"))
    Store(home).create("bench", os.path.abspath(model))
    reuse = serve(home, args, 65536, args.turns)
    plain = serve(home, args, 0, args.turns)
    table(f"prefix reuse, {args.turns}-turn chat: {'nano (random)' if args.model is None else model}, "
          f"max_tokens {args.max_tokens}",
          ["turn", "prompt", "cached", "prefilled", "TTFT ms (reuse)", "prefilled (none)", "TTFT ms (none)"],
          [[a["turn"], a["prompt_tokens"], a["cached_tokens"], a["prefill_tokens"], f"{a['ttft_s'] * 1e3:.1f}",
            b["prefill_tokens"], f"{b['ttft_s'] * 1e3:.1f}"] for a, b in zip(reuse, plain)])
    out = {"bench": "prefix", "model": model if args.model else "nano-random", "turns": args.turns,
           "max_tokens": args.max_tokens, "reuse": reuse, "no_reuse": plain, **environment(args.device)}
    print_json(out)
    return out


if __name__ == "__main__":
    main()
