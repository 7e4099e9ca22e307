"""GGUF and the store: `export` writes a stored model (or a checkpoint folder) as a llama.cpp
`deepseek2` file (a dense one as `llama` / `qwen2` / `qwen3`), and `create_from_gguf` imports one (or
a folder of split parts) into the store (nanoseek/gguf_file.py and nanoseek/gguf_dense.py do the
formats; `nanoseek export` and `nanoseek create NAME --from FILE.gguf` are their commands,
nanoseek/cli/store.py).

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

import torch

from ..dense import DenseModel
from ..gguf_dense import dense_tokenizer, read_any_config, read_any_gguf, write_dense_gguf
from ..gguf_file import GGUFModelFile, read_config, writable_type, write_gguf
from ..gguf_quantize import quantize_checkpoint
from ..load import is_dense, load_config
from ..model import DeepSeekV3
from ..tokenizer import Tokenizer
from .store import InvalidName, ModelNotFound, Store, StoreError, canonical_name

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
    write = write_dense_gguf if is_dense(cfg) else write_gguf
    model = (DenseModel if is_dense(cfg) else DeepSeekV3).from_pretrained(path, dtype=torch.float32)
    return write(model, Tokenizer.from_dir(path), out, qtype, name=os.path.basename(os.path.normpath(name)),
                 split_max_size=split_max_size)


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link of `src` at `dst` where the file system allows one, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def create_from_gguf(name: str, source: str, force: bool = False, dtype: torch.dtype | None = None,
                     tokenizer_dir: str | None = None) -> dict:
    """Import a GGUF file (or folder of split parts) as store model `name`, atomically; the tokenizer
    from the file's metadata, or from `tokenizer_dir` where given."""
    store = Store()
    os.makedirs(store.models_dir, exist_ok=True)
    staging = tempfile.mkdtemp(dir=store.models_dir, prefix=".tmp-gguf-")
    try:
        if dtype is None:  # the file itself, with its config and tokenizer beside it
            f = GGUFModelFile(source)
            read_any_config(f).save(staging)
            dense_tokenizer(f, tokenizer_dir).save(staging)
            for part in f.parts:
                _link_or_copy(part, os.path.join(staging, os.path.basename(part)))
            del f
        else:
            model, tok = read_any_gguf(source, dtype=dtype, tokenizer_dir=tokenizer_dir)
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

