"""`nanoseek generate` and `nanoseek chat`: Ollama-style command-line use of a model from the
local store (or any checkpoint directory): DeepSeek-V2/V3 or a dense Llama / Qwen R1-distill model
(`load_model`), streaming tokens as they come. The R1-distill chat templates end the generation
prompt with `<think>\n`, so a reply starts inside the think block whenever the prompt opened it.

A store entry's Modelfile defaults apply as the server applies them (serve/modelfile.py): its
TEMPLATE replaces the chat template, its SYSTEM prompt and MESSAGE turns go before a conversation
without a system message of its own, and its PARAMETERs (temperature, top_p, top_k, seed, stop,
num_predict, num_ctx) fill in whatever the command line leaves unset. `chat` keeps earlier turns'
latent cache for prefix reuse, so each turn prefills only what is new. The flags are ChatOptions' fields
(and GenerateOptions' for `generate`)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

from ..checkpoint import CheckpointError
from ..infer.chat import prompt_opens_thinking, render_chat, split_thinking
from ..infer.engine import Engine, SamplingParams
from ..infer.fp8_weights import load_fp8_weights
from ..infer.store import Store, StoreError, resolve_model_dir
from ..load import is_dense, load_config, load_model
from ..quant.cpu_decode import prepare_cpu_decode
from ..quant.qlinear import QuantExperts, QuantLinear
from ..serve.modelfile import with_default_messages
from ..tokenizer import Tokenizer
from .args import add_options


# the command line's values where neither it nor the entry's Modelfile sets one
FALLBACK = {"max_tokens": 256, "temperature": 0.8, "top_p": 1.0, "top_k": 0, "context": 4096}
CHAT_PREFIX_CACHE_TOKENS = 65536  # a chat re-sends its history each turn: keep it for reuse


@dataclass
class ChatOptions:
    """The model and its sampling, for `chat` and `generate`; a setting left unset (None) is the
    store entry's Modelfile PARAMETER, else FALLBACK's (`resolve_settings`)."""
    model: str = field(metadata={"positional": True, "help": "a model name in the store or a checkpoint directory"})
    max_tokens: int | None = field(default=None, metadata={
        "aliases": ("--num-predict",), "help": f"default: the Modelfile's num_predict, else {FALLBACK['max_tokens']}"})
    temperature: float | None = field(default=None, metadata={"help": f"default {FALLBACK['temperature']}"})
    top_p: float | None = field(default=None, metadata={"help": f"default {FALLBACK['top_p']}"})
    top_k: int | None = field(default=None, metadata={"help": f"default {FALLBACK['top_k']}"})
    seed: int | None = None
    stop: list[str] | None = field(default=None, metadata={"append": True, "help": "stop string (repeatable)"})
    context: int | None = field(default=None, metadata={
        "help": f"context length in tokens (default: the Modelfile's num_ctx, else {FALLBACK['context']})"})
    fp8_weights: bool = field(default=False, metadata={
        "flags": ("--fp8-weights",),
        "help": "keep an FP8 checkpoint's weights in FP8 (half of bf16's memory; same outputs)"})
    think: bool | None = field(default=None, metadata={"flags": ("--think",), "help": "open the reply inside <think>"})
    cpu_fast: bool = field(default=False, metadata={
        "flags": ("--cpu-fast",),
        "help": "a quantized (GGUF) model on the CPU: q4 weights through PyTorch's int4 GEMM (bf16 scales, "
                "not exact) and the others held dequantized where they fit in half the free memory"})


@dataclass
class GenerateOptions:
    """`generate`'s own, after ChatOptions: the prompt and how the reply is shown."""
    prompt: str = field(metadata={"positional": True})
    raw: bool = field(default=False, metadata={
        "flags": ("--raw",), "help": "send the prompt as is, without the chat template"})
    verbose: bool = field(default=False, metadata={"flags": ("--verbose",)})
    json: bool = field(default=False, metadata={"flags": ("--json",)})


def store_defaults(name: str) -> dict:
    """The store entry's Modelfile defaults (system, messages, template, parameters); {} for a
    checkpoint directory."""
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "config.json")):
        return {}
    try:
        return Store().manifest(name).get("defaults", {}) or {}
    except StoreError:
        return {}


def resolve_settings(args, defaults: dict) -> None:
    """Fill the sampling arguments the command line left unset (None) from the Modelfile's
    PARAMETERs, then from FALLBACK (num_predict -1: to the context's end)."""
    params = defaults.get("parameters", {})
    from_modelfile = {"temperature": params.get("temperature"), "top_p": params.get("top_p"),
                      "top_k": params.get("top_k"), "context": params.get("num_ctx"),
                      "max_tokens": params.get("num_predict")}
    for key, value in from_modelfile.items():
        if getattr(args, key) is None:
            setattr(args, key, FALLBACK[key] if value is None else value)
    if args.max_tokens is not None and args.max_tokens < 0:
        args.max_tokens = args.context - 1
    if args.seed is None and params.get("seed") is not None and params["seed"] >= 0:
        args.seed = params["seed"]
    if not args.stop and params.get("stop"):
        args.stop = list(params["stop"])


QUANTIZED = (QuantLinear, QuantExperts)


def load_engine(name: str, max_context: int = 4096, device: str | None = None, dtype=None, fp8_weights: bool = False,
                prefix_cache_tokens: int = 0, template: str | None = None, cpu_fast: bool = False):
    """An engine on the model `name`; with `fp8_weights`, an FP8 checkpoint's weights stay in FP8;
    `template` replaces the checkpoint's chat template (a Modelfile's TEMPLATE); `cpu_fast`: a
    quantized model on the CPU gets quant/cpu_decode's fast forms (memory for speed)."""
    import torch

    path = resolve_model_dir(name)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if fp8_weights:
        if is_dense(load_config(path)):
            raise SystemExit("nanoseek: --fp8-weights: FP8 weights are for DeepSeek-V3 checkpoints; "
                             f"{path} holds a dense model")
        try:
            model, _ = load_fp8_weights(path, dtype=dtype, device=device)
        except CheckpointError as e:
            raise SystemExit(f"nanoseek: --fp8-weights: {e}") from None
    else:
        model = load_model(path, dtype=dtype, device=device)
        if cpu_fast:
            if str(device) != "cpu" or not any(isinstance(m, QUANTIZED) for m in model.modules()):
                raise SystemExit(f"nanoseek: --cpu-fast is for a quantized (GGUF) model on the CPU; {path} "
                                 f"loaded {'unquantized' if str(device) == 'cpu' else 'on ' + str(device)}")
            prepare_cpu_decode(model)
    tokenizer = Tokenizer.from_dir(path)
    if template:
        tokenizer.chat_template = template
    return Engine(model, tokenizer, max_context=max_context, prefix_cache_tokens=prefix_cache_tokens), tokenizer


def params_from_args(args) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=list(args.stop or [])).validate()


def cmd_generate(args) -> int:
    resolve_settings(args, {})
    engine, tok = load_engine(args.model, args.context, fp8_weights=args.fp8_weights, cpu_fast=args.cpu_fast)
    try:
        prompt = args.prompt if args.raw else render_chat(tok, [{"role": "user", "content": args.prompt}],
                                                          think=args.think)
        ids = tok.encode(prompt)
        t0 = time.perf_counter()
        parts, last = [], None
        for ev in engine.submit(ids, params_from_args(args)):
            parts.append(ev.text)
            if not args.json:
                print(ev.text, end="", flush=True)
            last = ev
        text = "".join(parts)
        if not args.json:
            print()
        thinking, answer = split_thinking(text, opened=not args.raw and prompt_opens_thinking(prompt))
        result = {"model": args.model, "response": answer, "thinking": thinking, "done_reason": last.finish_reason,
                  "prompt_eval_count": last.prompt_tokens, "eval_count": last.completion_tokens,
                  "prefill_s": last.prefill_s, "decode_s": last.decode_s,
                  "tokens_per_s": last.completion_tokens / max(last.decode_s, 1e-9),
                  "total_s": time.perf_counter() - t0}
        if args.json:
            print(json.dumps(result), flush=True)
        elif args.verbose:
            print(f"\nprompt {last.prompt_tokens} tokens, {last.completion_tokens} generated at "
                  f"{result['tokens_per_s']:.1f} tok/s", file=sys.stderr)
    finally:
        engine.close()
    return 0


HELP = """Commands:
  /set parameter NAME VALUE   temperature, top_p, top_k, seed, num_predict
  /set system TEXT            set the system message
  /set think | /set nothink   open replies inside <think> (R1-style) or not
  /clear                      forget the conversation
  /bye                        exit"""


def cmd_chat(args) -> int:
    defaults = store_defaults(args.model)
    resolve_settings(args, defaults)
    engine, tok = load_engine(args.model, args.context, fp8_weights=args.fp8_weights, cpu_fast=args.cpu_fast,
                              prefix_cache_tokens=CHAT_PREFIX_CACHE_TOKENS, template=defaults.get("template"))
    params = params_from_args(args)
    history: list[dict] = []
    system, think = None, args.think
    interactive = sys.stdin.isatty()
    try:
        while True:
            if interactive:
                print(">>> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.startswith("/"):
                words = line.split(maxsplit=3)
                if words[0] in ("/bye", "/exit"):
                    break
                if words[0] == "/clear":
                    history = []
                    print("Cleared session context.")
                elif words[0] == "/set" and len(words) >= 2:
                    if words[1] == "think":
                        think = True
                    elif words[1] == "nothink":
                        think = False
                    elif words[1] == "system":
                        system = line.split(maxsplit=2)[2] if len(words) > 2 else None
                    elif words[1] == "parameter" and len(words) == 4:
                        name, value = words[2], words[3]
                        key = {"num_predict": "max_tokens"}.get(name, name)
                        if key not in ("temperature", "top_p", "top_k", "seed", "max_tokens"):
                            print(f"Unknown parameter '{name}'")
                            continue
                        try:
                            setattr(params, key, (float if key in ("temperature", "top_p") else int)(value))
                            params.validate()
                        except ValueError as e:
                            print(f"Invalid value: {e}")
                            continue
                    else:
                        print(HELP)
                        continue
                    print(f"Set '{' '.join(words[1:])}'.")
                else:
                    print(HELP)
                continue
            history.append({"role": "user", "content": line})
            messages = with_default_messages(([{"role": "system", "content": system}] if system else []) + history,
                                             defaults)
            ids = tok.encode(render_chat(tok, messages, think=think))
            parts = []
            try:
                for ev in engine.submit(ids, params):
                    parts.append(ev.text)
                    print(ev.text, end="", flush=True)
            except ValueError as e:  # e.g. the conversation outgrew the context
                print(f"Error: {e}")
                history.pop()
                continue
            print("\n")
            history.append({"role": "assistant", "content": "".join(parts)})
    finally:
        engine.close()
    return 0


def add_generate_command(sub) -> None:
    s = sub.add_parser("generate", help="generate a reply to one prompt (streaming)")
    add_options(s, ChatOptions)
    add_options(s, GenerateOptions)
    s.set_defaults(func=cmd_generate)


def add_chat_command(sub) -> None:
    s = sub.add_parser("chat", help="interactive multi-turn chat (/bye to exit, /set to change options)")
    add_options(s, ChatOptions)
    s.set_defaults(func=cmd_chat)
