"""GGUF at the command line: `nanoseek export NAME OUT.gguf --type ...` writes a stored model (or a
checkpoint folder) as a llama.cpp `deepseek2` file, and `nanoseek create NAME --from FILE.gguf`
(or a folder of split parts) imports one into the store (nanoseek/gguf_file.py does the format).

The import stages, in a folder inside the store, the GGUF file(s) themselves (hard-linked where
the file system allows, else copied) with a config.json and tokenizer read from the file's
metadata; loading such an entry keeps the weights quantized (nanoseek.load.load_model). With
`--dtype`, the weights are converted to that float dtype and stored as safetensors instead.
`Store.create` validates the staged folder and renames it into place: a bad file adds nothing.

`nanoseek create NAME --from DIR --quantize q8_0|q4_k_m` quantizes a Hugging Face checkpoint
(FP8 releases included) while streaming its tensors into such a staged GGUF
(nanoseek/gguf_quantize.py), so the entry loads exactly as an imported GGUF of that mix does.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import torch

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..gguf_file import WRITABLE_TYPES, GGUFError, GGUFModelFile, read_config, read_gguf, read_tokenizer, \
    writable_type, write_gguf
from ..gguf_quantize import QUANTIZE_MIXES, quantize_checkpoint
from ..load import is_dense, load_config
from ..model import DeepSeekV3
from ..tokenizer import Tokenizer, TokenizerError
from .store import InvalidName, ModelNotFound, Store, StoreError, canonical_name, error_guard, human_size, report_created

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_gguf_source(source: str | None) -> bool:
    """A .gguf file, or a folder of .gguf parts that is not a Hugging Face checkpoint."""
    if not source:
        return False
    if source.endswith(".gguf"):
        return True
    return (os.path.isdir(source) and not os.path.exists(os.path.join(source, "config.json"))
            and any(f.endswith(".gguf") for f in os.listdir(source)))


def resolve_model(name: str) -> str:
    """A store name's checkpoint folder, else `name` itself when it is a folder."""
    try:
        return Store().path_of(canonical_name(name))
    except (InvalidName, ModelNotFound):
        if os.path.isdir(name):
            return name
        raise StoreError(f"model '{name}' not found (neither a stored model nor a checkpoint folder)") from None


def export(name: str, out: str, qtype: str, split_max_size: int = 0) -> list[str]:
    """Write the stored model (or checkpoint folder) `name` as GGUF `out`; returns the files written."""
    writable_type(qtype, out)
    path = resolve_model(name)
    cfg = load_config(path)
    if is_dense(cfg):
        raise GGUFError(f"{path}: a dense {cfg.model_type} model; export writes DeepSeek models (deepseek2)")
    model = DeepSeekV3.from_pretrained(path, dtype=torch.float32)
    return write_gguf(model, Tokenizer.from_dir(path), out, qtype, name=os.path.basename(os.path.normpath(name)),
                      split_max_size=split_max_size)


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link of `src` at `dst` where the file system allows one, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def create_from_gguf(name: str, source: str, force: bool = False, dtype: torch.dtype | None = None) -> dict:
    """Import a GGUF file (or folder of split parts) as store model `name`, atomically."""
    store = Store()
    os.makedirs(store.models_dir, exist_ok=True)
    staging = tempfile.mkdtemp(dir=store.models_dir, prefix=".tmp-gguf-")
    try:
        if dtype is None:  # the file itself, with its config and tokenizer beside it
            f = GGUFModelFile(source)
            read_config(f).save(staging)
            read_tokenizer(f).save(staging)
            for part in f.parts:
                _link_or_copy(part, os.path.join(staging, os.path.basename(part)))
            del f
        else:
            model, tok = read_gguf(source, dtype=dtype)
            model.save_pretrained(staging)
            tok.save(staging)
            del model
        return store.create(name, staging, force=force, source=os.path.abspath(source))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def create_quantized(name: str, source: str, mix: str, force: bool = False) -> dict:
    """Import the checkpoint folder `source` as store model `name`, its weights quantized under
    `mix` into a GGUF file streamed tensor by tensor (the HF tokenizer kept beside it), atomically."""
    store = Store()
    os.makedirs(store.models_dir, exist_ok=True)
    staging = tempfile.mkdtemp(dir=store.models_dir, prefix=".tmp-quantize-")
    try:
        (path, *_) = quantize_checkpoint(source, os.path.join(staging, f"model-{mix}.gguf"), mix,
                                         name=os.path.basename(os.path.normpath(source)))
        read_config(GGUFModelFile(path)).save(staging)
        Tokenizer.from_dir(source).save(staging)
        return store.create(name, staging, force=force, source=os.path.abspath(source))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cmd_export(args) -> int:
    t0 = time.time()
    files = export(args.name, args.out, args.type, args.split_max_size)
    print(f"wrote {', '.join(files)} ({human_size(sum(os.path.getsize(f) for f in files))}, {args.type}, "
          f"{time.time() - t0:.1f} s)")
    return 0


def cmd_create(args) -> int:
    """`create NAME --from FILE.gguf` (or a folder of parts); other sources go to the command this
    one wraps (`args.checkpoint_create`: a checkpoint folder, or `-f Modelfile`)."""
    t0 = time.time()
    if args.quantize and not args.modelfile:
        if is_gguf_source(args.source):
            raise GGUFError(f"{args.source}: --quantize converts a checkpoint folder; a GGUF keeps its own types")
        report_created(create_quantized(args.name, args.source, args.quantize, args.force), t0, args.json,
                       source=args.source)
        return 0
    if not is_gguf_source(args.source) or args.modelfile:
        return args.checkpoint_create(args)
    m = create_from_gguf(args.name, args.source, force=args.force, dtype=DTYPES.get(args.dtype))
    report_created(m, t0, args.json, source=args.source)
    return 0


_guard = error_guard(GGUFError, CheckpointError, ConfigError, TokenizerError)


def add_gguf_commands(sub) -> None:
    """`export`, and GGUF sources for the store's `create` (after its -f Modelfile option)."""
    s = sub.add_parser("export", help="write a stored model (or checkpoint folder) as a llama.cpp GGUF file")
    s.add_argument("name", help="a stored model name[:tag] or a checkpoint folder")
    s.add_argument("out", help="the .gguf file to write")
    s.add_argument("--type", default="f16", choices=list(WRITABLE_TYPES),
                   help="tensor encoding: f32/f16/bf16 for every matrix, or a llama.cpp mix (q8_0, q4_0, "
                        "q6_k, q4_k_m) typed per tensor as llama.cpp's quantizer does; norms, router and bias stay f32")
    s.add_argument("--split-max-size", type=int, default=0, metavar="BYTES",
                   help="write parts <out>-00001-of-0000N.gguf of at most this many bytes")
    s.set_defaults(func=_guard(cmd_export))

    create = sub.choices["create"]
    create.add_argument("--dtype", choices=list(DTYPES),
                        help="GGUF sources: convert the weights to this float dtype (default: keep the GGUF file, quantized)")
    create.add_argument("--quantize", choices=list(QUANTIZE_MIXES),
                        help="checkpoint folders (FP8 included): store the weights quantized as this llama.cpp mix")
    create.set_defaults(checkpoint_create=create.get_default("func"), func=_guard(cmd_create))
