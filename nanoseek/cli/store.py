"""The local model store at the command line, after Ollama's CLI: `nanoseek list`, `show`, `rm`,
`create NAME --from DIR` (a Hugging Face checkpoint folder), `create NAME -f Modelfile` (a copy
with a Modelfile's defaults), `create NAME --from FILE.gguf` and `export NAME OUT.gguf` (llama.cpp
`deepseek2` files). The work is in nanoseek/infer/store.py, infer/gguf_store.py and
serve/create.py; this module declares each command's flags once, in an options dataclass (the
parser is generated from its fields, args.py), and prints."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from dataclasses import dataclass, field

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..gguf_file import WRITABLE_TYPES, GGUFError
from ..gguf_quantize import QUANTIZE_MIXES
from ..infer.gguf_store import DTYPES, create_from_gguf, create_quantized, export, is_gguf_source
from ..infer.store import Store, StoreError, human_age, human_count, human_size, iso_time
from ..serve.create import create_from_modelfile
from ..serve.modelfile import ModelfileError
from ..tokenizer import TokenizerError
from .args import add_options

JSON_HELP = "print the result as one JSON object, the last line"


@dataclass
class ListOptions:
    json: bool = field(default=False, metadata={"flags": ("--json",), "help": JSON_HELP})


@dataclass
class ShowOptions:
    name: str = field(metadata={"positional": True, "help": "a stored model name[:tag]"})
    template: bool = field(default=False, metadata={"flags": ("--template",), "help": "print only the chat template"})
    json: bool = field(default=False, metadata={"flags": ("--json",), "help": JSON_HELP})


@dataclass
class RmOptions:
    names: list[str] = field(metadata={"positional": True, "metavar": "NAME", "help": "stored model names[:tag]"})


@dataclass
class CreateOptions:
    name: str = field(metadata={"positional": True, "help": "name[:tag] (tag defaults to 'latest')"})
    source: str | None = field(default=None, metadata={
        "flags": ("--from",), "metavar": "DIR",
        "help": "checkpoint directory, or a GGUF file (or a folder of its parts)"})
    force: bool = field(default=False, metadata={
        "flags": ("--force",), "help": "replace an existing model of that name"})
    json: bool = field(default=False, metadata={"flags": ("--json",), "help": JSON_HELP})
    modelfile: str | None = field(default=None, metadata={
        "flags": ("-f", "--file"), "metavar": "MODELFILE",
        "help": "an Ollama Modelfile (FROM, SYSTEM, TEMPLATE, PARAMETER, MESSAGE)"})
    dtype: str | None = field(default=None, metadata={
        "choices": tuple(DTYPES),
        "help": "GGUF sources: convert the weights to this float dtype (default: keep the GGUF file, quantized)"})
    tokenizer: str | None = field(default=None, metadata={
        "metavar": "DIR",
        "help": "GGUF sources: take the tokenizer from this Hugging Face folder (tokenizer.json) instead of the "
                "file's metadata (needed where nanoseek cannot rebuild the file's pre-tokenizer)"})
    quantize: str | None = field(default=None, metadata={
        "choices": QUANTIZE_MIXES,
        "help": "checkpoint folders (FP8 included): store the weights quantized as this llama.cpp mix, "
                "streamed tensor by tensor"})


@dataclass
class ExportOptions:
    name: str = field(metadata={"positional": True, "help": "a stored model name[:tag] or a checkpoint folder"})
    out: str = field(metadata={"positional": True, "help": "the .gguf file to write"})
    type: str = field(default="f16", metadata={
        "choices": WRITABLE_TYPES,
        "help": "tensor encoding: f32/f16/bf16 for every matrix, or a llama.cpp mix (q8_0, q4_0, q6_k, q4_k_m) "
                "typed per tensor as llama.cpp's quantizer does; norms, router and bias stay f32"})
    split_max_size: int = field(default=0, metadata={
        "metavar": "BYTES", "help": "write parts <out>-00001-of-0000N.gguf of at most this many bytes"})


def print_json(obj) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    print(json.dumps(obj), flush=True)


def error_guard(*errors: type[Exception]):
    """A decorator for a command: these errors (StoreError always) become one clear line on stderr
    and exit status 1."""
    caught = (StoreError, *errors)

    def wrap(fn):
        @functools.wraps(fn)
        def run(args) -> int:
            try:
                return fn(args)
            except caught as e:
                raise SystemExit(f"nanoseek: {e}") from None
        return run
    return wrap


store_guard = error_guard()
file_guard = error_guard(GGUFError, CheckpointError, ConfigError, TokenizerError)


def report_created(m: dict, t0: float, as_json: bool, source: str | None = None) -> None:
    """What `nanoseek create` prints for a new entry: one JSON line, or one line for a person."""
    if as_json:
        print_json({k: m[k] for k in ("name", "size", "digest", "parameters", "architecture", "quantization")}
                   | {"seconds": round(time.time() - t0, 3)})
    else:
        print(f"created '{m['name']}'" + (f" from {source}" if source else "") + f" ({human_size(m['size'])}, "
              f"{human_count(m['parameters'])} parameters, id {m['digest'][:12]}, {time.time() - t0:.1f} s)")


# ---------------------------------------------------------------------- list, show, rm
@store_guard
def cmd_list(args) -> int:
    models = Store().list()
    if args.json:
        print_json({"models": [{"name": m["name"], "id": m["digest"][:12], "size": m["size"],
                                "modified_at": iso_time(m["modified"]), "parameters": m.get("parameters")}
                               for m in models]})
        return 0
    rows = [("NAME", "ID", "SIZE", "MODIFIED")] + [
        (m["name"], m["digest"][:12], human_size(m["size"]), human_age(m["modified"])) for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("    ".join(c.ljust(w) for c, w in zip(r, widths)) + "    " + r[3])
    return 0


@store_guard
def cmd_show(args) -> int:
    s = Store().show(args.name)
    if args.json:
        print_json(s)
        return 0
    if args.template:
        print(s["template"])
        return 0
    print("  Model")
    rows = [("architecture", s["architecture"]), ("parameters", s["parameter_size"]),
            ("active parameters", human_count(s["active_parameters"] or 0)),
            ("context length", s["context_length"]), ("embedding length", s["embedding_length"]),
            ("layers", s["layers"])]
    if s["dense"]:
        rows += [("attention", f"GQA, {s['attention_heads']} query heads, {s['kv_heads']} K/V heads, "
                               f"head_dim {s['head_dim']}"),
                 ("KV cache", f"{s['kv_cache_values']} values / token / layer"),
                 ("tied embeddings", "yes" if s["tied_embeddings"] else "no")]
        if s["rope_scaling"]:
            rows.append(("RoPE scaling", s["rope_scaling"]["rope_type"]))
    else:
        rows += [("experts", f"{s['experts']} routed (top-{s['experts_used']}), {s['shared_experts']} shared"),
                 ("MLA cache", f"{s['kv_lora_rank'] + s['qk_rope_head_dim']} values / token / layer"),
                 ("MTP depth", s["mtp_depth"])]
    rows.append(("quantization", s["quantization"]))
    if s.get("gguf_tensors"):  # weights kept as GGUF: tensors and bytes per GGML type
        kinds = sorted(s["gguf_tensors"].items(), key=lambda kv: -kv[1]["bytes"])
        rows.append(("GGUF tensors", ", ".join(f"{k} {v['tensors']}" for k, v in kinds)))
        rows.append(("GGUF bytes", f"{human_size(sum(v['bytes'] for _, v in kinds))} ("
                     + ", ".join(f"{k} {human_size(v['bytes'])}" for k, v in kinds) + ")"))
    for k, v in rows:
        print(f"    {k:<20}{v}")
    print("\n  Template")
    print(f"    {s['template_source']}" + ("" if s["template_source"] == "built-in" else
                                          f" ({len(s['template'])} characters; --template prints it)"))
    print(f"    thinking: {'yes' if s['thinking'] else 'no'}")
    print("\n  Store")
    for k in ("path", "size", "digest", "created_at", "source"):
        v = human_size(s[k]) if k == "size" else s[k]
        print(f"    {k:<20}{v}")
    return 0


@store_guard
def cmd_rm(args) -> int:
    store = Store()
    status = 0
    for name in args.names:
        try:
            print(f"deleted '{store.rm(name)}'")
        except StoreError as e:
            print(f"nanoseek: {e}", file=sys.stderr)
            status = 1
    return status


# ---------------------------------------------------------------------- create, export
def create_checkpoint(args) -> int:
    """`create NAME --from DIR`: a Hugging Face checkpoint folder, copied into the store."""
    if not args.source:
        raise StoreError("give the checkpoint with --from DIR (or a Modelfile with -f)")
    t0 = time.time()
    m = Store().create(args.name, args.source, force=args.force,
                       progress=None if args.json else (lambda i, n, f: print(f"copying {f} ({i + 1}/{n})",
                                                                             file=sys.stderr)))
    report_created(m, t0, args.json)
    return 0


def create_from_checkpoint_or_modelfile(args) -> int:
    """`create NAME -f Modelfile` (or `--from DIR`, the store's own import)."""
    try:
        if not args.modelfile:
            return create_checkpoint(args)
        m, src = create_from_modelfile(Store(), args.name, args.modelfile, args.source, args.force)
    except OSError as e:
        raise SystemExit(f"nanoseek: {args.modelfile}: {e.strerror}") from None
    except ModelfileError as e:
        raise SystemExit(f"nanoseek: {args.modelfile}: {e}") from None
    except StoreError as e:
        raise SystemExit(f"nanoseek: {e}") from None
    print(f"created '{m['name']}' from {src} ({human_size(m['size'])}, {human_count(m['parameters'])} parameters, "
          f"id {m['digest'][:12]}; defaults: {', '.join(sorted(m.get('defaults', {}))) or 'none'})", file=sys.stdout)
    return 0


@file_guard
def cmd_create(args) -> int:
    """`create NAME --from FILE.gguf` (or a folder of parts); a checkpoint folder or `-f Modelfile`
    otherwise."""
    t0 = time.time()
    if args.quantize and not args.modelfile:
        if is_gguf_source(args.source):
            raise GGUFError(f"{args.source}: --quantize converts a checkpoint folder; a GGUF keeps its own types")
        report_created(create_quantized(args.name, args.source, args.quantize, args.force), t0, args.json,
                       source=args.source)
        return 0
    if not is_gguf_source(args.source) or args.modelfile:
        return create_from_checkpoint_or_modelfile(args)
    m = create_from_gguf(args.name, args.source, force=args.force, dtype=DTYPES.get(args.dtype),
                         tokenizer_dir=args.tokenizer)
    report_created(m, t0, args.json, source=args.source)
    return 0


@file_guard
def cmd_export(args) -> int:
    t0 = time.time()
    files = export(args.name, args.out, args.type, args.split_max_size)
    print(f"wrote {', '.join(files)} ({human_size(sum(os.path.getsize(f) for f in files))}, {args.type}, "
          f"{time.time() - t0:.1f} s)")
    return 0


def add_store_commands(sub) -> None:
    """list (ls), show, rm, create."""
    s = sub.add_parser("list", aliases=["ls"], help="list the models in the local store (NANOSEEK_HOME)")
    add_options(s, ListOptions)
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("show", help="architecture, parameters, context length, quantization, template of a model")
    add_options(s, ShowOptions)
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("rm", help="remove models from the local store")
    add_options(s, RmOptions)
    s.set_defaults(func=cmd_rm)

    s = sub.add_parser("create", help="import a Hugging Face checkpoint directory (tokenizer included) as NAME")
    add_options(s, CreateOptions)
    s.set_defaults(func=cmd_create)


def add_export_command(sub) -> None:
    s = sub.add_parser("export", help="write a stored model (or checkpoint folder) as a llama.cpp GGUF file")
    add_options(s, ExportOptions)
    s.set_defaults(func=cmd_export)
