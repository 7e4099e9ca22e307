"""`nanoseek serve`: the Ollama- and OpenAI-compatible HTTP server (nanoseek/serve/) over the models
in the local store, its options declared once in ServeOptions."""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Literal

from ..serve.app import is_loopback, log, make_server
from .args import add_options

API_KEY_VARIABLE = "NANOSEEK_API_KEY"
ORIGINS_VARIABLE = "NANOSEEK_ORIGINS"


@dataclass
class ServeOptions:
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (a loopback address: this machine only)"})
    port: int = 11434
    api_key: str | None = field(default=None, metadata={
        "help": f"require 'Authorization: Bearer KEY' on every endpoint (default: ${API_KEY_VARIABLE})"})
    context_length: int = field(default=4096, metadata={"help": "context limit per model in tokens"})
    max_batch: int = field(default=16, metadata={"help": "sequences decoded together per model"})
    prefix_cache_tokens: int = field(default=65536, metadata={
        "help": "per model, tokens of finished requests' latent cache kept so that a prompt sharing their prefix "
                "(a chat's earlier turns) prefills only the rest; 0 disables"})
    speculative: bool = field(default=False, metadata={
        "help": "models with MTP layers draft the token after next with their MTP module and verify it in the same "
                "step (the same greedy output, fewer main-model steps when drafts are accepted)"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda when available)"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "help": "load dtype (auto: the checkpoint's own)"})
    allow_origin: list[str] | None = field(default=None, metadata={
        "append": True, "metavar": "ORIGIN",
        "help": "let browser pages from ORIGIN call the server (repeatable; fnmatch patterns such as "
                f"'https://*.example.com', or '*' for any; also ${ORIGINS_VARIABLE}, comma-separated). "
                "Pages on localhost and app webviews are always allowed"})
    quiet: bool = field(default=False, metadata={"help": "log warnings and errors only"})


def _exit_on_sigterm(signum, frame):
    raise SystemExit(0)


def cmd_serve(args) -> int:
    logging.basicConfig(level=logging.INFO if not args.quiet else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_VARIABLE)
    dtype = None if args.dtype == "auto" else args.dtype
    origins = tuple(args.allow_origin or ()) + tuple(
        o.strip() for o in os.environ.get(ORIGINS_VARIABLE, "").split(",") if o.strip())
    server = make_server(args.host, args.port, api_key, None, args.context_length, args.max_batch,
                         args.device, dtype, origins, args.prefix_cache_tokens, args.speculative)
    host, port = server.server_address[:2]
    models = [m["name"] for m in server.app.store.list()]
    print(f"nanoseek serving {len(models)} model(s) from {server.app.store.models_dir} on http://{host}:{port} "
          f"(Ollama /api, OpenAI /v1){'; API key required' if api_key else ''}", flush=True)
    for m in models:
        print(f"  {m}", flush=True)
    if not is_loopback(args.host) and not api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this address can use the models",
                    args.host)
    # Ctrl-C and SIGTERM: uvicorn stops accepting, lets running requests finish (GRACEFUL_SHUTDOWN_S),
    # then hands the signal back: KeyboardInterrupt, or SystemExit from this handler
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.app.close()
    return 0


def add_serve_command(sub) -> None:
    s = sub.add_parser("serve", help="Ollama- and OpenAI-compatible HTTP server for the models in the store")
    add_options(s, ServeOptions)
    s.set_defaults(func=cmd_serve)
