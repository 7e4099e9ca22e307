"""The local model store: Ollama-style names for Hugging Face checkpoint directories.

Layout under `NANOSEEK_HOME` (default `~/.nanoseek`):

    models/<name>/<tag>/            a complete Hugging Face checkpoint directory
        config.json, *.safetensors [+ model.safetensors.index.json], tokenizer.json,
        tokenizer_config.json, ... (every top-level file of the source except pickles)
        nanoseek-manifest.json      name, created time, source, size, parameter counts, digest

- Names are Ollama's `name[:tag]` (tag defaults to `latest`): letters, digits and `-_.`, starting
  with a letter or digit, no `..`, no path separators, at most 64 characters per part. So a name
  can never reach outside the store (and every resolved path is checked to be inside it anyway).
- A checkpoint is DeepSeek-V2/V3 or a dense Llama / Qwen2 / Qwen3 model (the R1-distill family),
  as `load.load_config` tells them apart; `show` gives the MLA and MoE shape of the one, the GQA
  shape of the other.
- `create` validates the source before copying anything (config.json parses, tokenizer.json loads,
  every tensor the config needs is present with the right shape, tokenizer ids fit the embedding),
  then copies into a temporary folder inside the store, hashing while copying, writes the manifest,
  and renames the folder into place: a failed or interrupted create leaves nothing behind.
- The digest is sha256 over the sorted (file name, file sha256) pairs; the ID is its first 12 hex digits.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import tempfile
import time

from .chat import can_think
from ..checkpoint import CheckpointError, _ShardSet, hf_keys_for
from ..dense import DenseModel
from ..dense_checkpoint import check_pretrained
from ..gguf_file import GGUFError, GGUFModelFile, file_type_name, tensor_types
from ..load import holds_gguf, is_dense, load_config
from ..model import DeepSeekV3
from ..tokenizer import Tokenizer, TokenizerError

MANIFEST = "nanoseek-manifest.json"
DEFAULT_TAG = "latest"
MAX_PART = 64
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_SKIP_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # never copied (never unpickled either)
_COPY_CHUNK = 8 << 20


class StoreError(ValueError):
    """A store operation that cannot be done; the message names the model or file."""


class ModelNotFound(StoreError):
    pass


class InvalidName(StoreError):
    pass


def nanoseek_home() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get("NANOSEEK_HOME") or "~/.nanoseek"))


def parse_name(name) -> tuple[str, str]:
    """'tiny' -> ('tiny', 'latest'); 'tiny:q8' -> ('tiny', 'q8'). Raises InvalidName."""
    if not isinstance(name, str):
        raise InvalidName(f"invalid model name {name!r}: expected a string")
    if not name:
        raise InvalidName("invalid model name '': empty")
    if name.count(":") > 1:
        raise InvalidName(f"invalid model name {name!r}: at most one ':' (name:tag)")
    base, _, tag = name.partition(":")
    if _ == ":" and not tag:
        raise InvalidName(f"invalid model name {name!r}: empty tag after ':'")
    tag = tag or DEFAULT_TAG
    for what, part in (("name", base), ("tag", tag)):
        if "/" in part or "\\" in part or "\0" in part:
            raise InvalidName(f"invalid model name {name!r}: path separators are not allowed")
        if ".." in part:
            raise InvalidName(f"invalid model name {name!r}: '..' is not allowed")
        if len(part) > MAX_PART:
            raise InvalidName(f"invalid model name {name!r}: the {what} is longer than {MAX_PART} characters")
        if not _PART.fullmatch(part):
            raise InvalidName(f"invalid model name {name!r}: the {what} must start with a letter or digit and "
                              "contain only letters, digits and '-', '_', '.'")
    return base, tag


def canonical_name(name: str) -> str:
    base, tag = parse_name(name)
    return f"{base}:{tag}"


def human_size(n: int) -> str:
    """Decimal units like `ollama list`: 4.7 GB, 26 MB, 512 B."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:.1f} {unit}" if v < 10 else f"{v:.0f} {unit}"
    return f"{n} B"


def human_count(n: int) -> str:
    """Parameter counts like Ollama's parameter_size: 671.0B, 6.3M, 950K."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def human_age(ts: float, now: float | None = None) -> str:
    d = max(0.0, (now or time.time()) - ts)
    for unit, s in (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400), ("day", 86400),
                    ("hour", 3600), ("minute", 60)):
        if d >= s:
            k = int(d // s)
            return f"{k} {unit}{'s' if k > 1 else ''} ago"
    return "Less than a minute ago" if d >= 1 else "Just now"


def iso_time(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _sha256_copy(src: str, dst: str) -> str:
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while True:
            chunk = fi.read(_COPY_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            fo.write(chunk)
        fo.flush()
        os.fsync(fo.fileno())
    shutil.copystat(src, dst, follow_symlinks=True)
    return h.hexdigest()


def quantization_of(cfg_dict: dict) -> str:
    q = cfg_dict.get("quantization_config") or {}
    if isinstance(q, dict) and q.get("quant_method") == "fp8":
        return "FP8"
    dt = str(cfg_dict.get("torch_dtype") or cfg_dict.get("dtype") or "bfloat16").replace("torch.", "")
    return {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(dt, dt.upper())


def validate_checkpoint(src: str) -> dict:
    """Check that `src` is a loadable checkpoint with a tokenizer, reading only headers. Returns
    {"config": ModelConfig or DenseConfig, "config_dict": dict, "tokenizer": Tokenizer}. Raises StoreError."""
    import torch

    if not os.path.isdir(src):
        raise StoreError(f"{src}: not a directory (expected a Hugging Face checkpoint folder)")
    cfg_file = os.path.join(src, "config.json")
    if not os.path.isfile(cfg_file):
        raise StoreError(f"{cfg_file}: no such file (a checkpoint folder needs config.json)")
    try:
        cfg = load_config(src)
        with open(cfg_file, encoding="utf-8") as f:
            cfg_dict = json.load(f)
    except (ValueError, OSError) as e:
        raise StoreError(f"{cfg_file}: {e}") from None
    tok_file = os.path.join(src, "tokenizer.json")
    if not os.path.isfile(tok_file):
        raise StoreError(f"{tok_file}: no such file (nanoseek create needs the tokenizer beside the weights)")
    try:
        tok = Tokenizer.from_dir(src)
    except (TokenizerError, OSError) as e:
        raise StoreError(str(e)) from None
    if tok.vocab_size > cfg.vocab_size:
        raise StoreError(f"{tok_file}: the tokenizer has {tok.vocab_size} tokens but {cfg_file} has "
                         f"vocab_size {cfg.vocab_size}; token ids would fall outside the embedding")
    if is_dense(cfg) and not holds_gguf(src):
        try:
            check_pretrained(src, cfg, DenseModel)
        except CheckpointError as e:
            raise StoreError(str(e)) from None
        return {"config": cfg, "config_dict": cfg_dict, "tokenizer": tok}
    if holds_gguf(src):  # weights kept as the GGUF file(s): their headers and tensor table are read
        try:
            quantization = file_type_name(GGUFModelFile(src))
        except GGUFError as e:
            raise StoreError(str(e)) from None
        return {"config": cfg, "config_dict": cfg_dict, "tokenizer": tok, "quantization": quantization}
    try:
        shards = _ShardSet(src)
        keys = set(shards.weight_map)
        with torch.device("meta"):
            meta = DeepSeekV3(cfg)
        for name, t in meta.state_dict().items():
            if name.startswith("mtp.") and f"model.layers.{name.split('.')[1]}.eh_proj.weight" not in keys:
                continue  # no MTP weights stored: the loader runs without MTP
            for key, e in hf_keys_for(name, t, cfg):
                if key not in keys:
                    raise StoreError(f"{src}: missing tensor '{key}'")
                want = tuple(t.shape[1:]) if e is not None else tuple(t.shape)
                got = tuple(shards.handle(shards.weight_map[key]).get_slice(key).get_shape())
                if got != want:
                    raise StoreError(f"{shards.where(key)}: tensor '{key}' has shape {got}, expected {want}")
    except CheckpointError as e:
        raise StoreError(str(e)) from None
    return {"config": cfg, "config_dict": cfg_dict, "tokenizer": tok}


class Store:
    """Models under `<root>/models/<name>/<tag>/`; `root` defaults to NANOSEEK_HOME."""

    def __init__(self, root: str | None = None):
        self.root = os.path.abspath(os.path.expanduser(root)) if root else nanoseek_home()
        self.models_dir = os.path.join(self.root, "models")

    # ------------------------------------------------------------------ paths
    def _dir_for(self, name: str) -> str:
        base, tag = parse_name(name)
        path = os.path.join(self.models_dir, base, tag)
        real_root = os.path.realpath(self.models_dir)
        if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:  # belt and braces
            raise InvalidName(f"invalid model name {name!r}: resolves outside the store")
        return path

    def exists(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self._dir_for(name), MANIFEST))

    def path_of(self, name: str) -> str:
        """The checkpoint directory of a stored model. Raises ModelNotFound / InvalidName."""
        path = self._dir_for(name)
        if not os.path.isfile(os.path.join(path, MANIFEST)):
            raise ModelNotFound(f"model '{name}' not found")
        return path

    def manifest(self, name: str) -> dict:
        path = self.path_of(name)
        try:
            with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{os.path.join(path, MANIFEST)}: unreadable manifest ({e})") from None

    # ------------------------------------------------------------------ create / rm
    def create(self, name: str, src: str, force: bool = False, progress=None, defaults: dict | None = None,
               source: str | None = None) -> dict:
        """Import the checkpoint directory `src` as `name`. Atomic: the model appears complete or
        not at all. With `force`, an existing model of that name is replaced. `defaults` (a
        Modelfile's system prompt, template, parameters, messages) go into the manifest, for the
        server to apply to requests that do not set them. `source`: what the manifest names as the
        origin, when `src` is a staging copy (a converted GGUF file)."""
        cname = canonical_name(name)
        final = self._dir_for(cname)
        if os.path.exists(os.path.join(final, MANIFEST)) and not force:
            raise StoreError(f"model '{cname}' already exists (use --force to replace it, or `nanoseek rm` it)")
        src = os.path.abspath(src)
        info = validate_checkpoint(src)
        cfg, cfg_dict = info["config"], info["config_dict"]
        files = sorted(f for f in os.listdir(src)
                       if not f.startswith(".") and f != MANIFEST and os.path.isfile(os.path.join(src, f))
                       and not f.endswith(_SKIP_SUFFIXES))
        os.makedirs(self.models_dir, exist_ok=True)
        parent = os.path.dirname(final)
        made_parent = not os.path.isdir(parent)
        tmp = tempfile.mkdtemp(dir=self.models_dir, prefix=".tmp-create-")
        try:
            digests = {}
            size = 0
            for i, f in enumerate(files):
                if progress:
                    progress(i, len(files), f)
                digests[f] = _sha256_copy(os.path.join(src, f), os.path.join(tmp, f))
                size += os.path.getsize(os.path.join(tmp, f))
            digest = hashlib.sha256("".join(f"{f}\0{d}\n" for f, d in sorted(digests.items())).encode()).hexdigest()
            pc = cfg.param_counts()
            now = time.time()
            manifest = {
                "name": cname, "created_at": iso_time(now), "created": now, "source": source or src,
                "size": size, "digest": digest, "files": digests,
                "architecture": cfg.model_type, "parameters": pc["total_params"],
                "active_parameters": pc["active_params"], "mtp_parameters": pc["mtp_params"],
                "context_length": cfg.max_position_embeddings,
                "quantization": info.get("quantization") or quantization_of(cfg_dict),
                "has_chat_template": bool(info["tokenizer"].chat_template),
            }
            if defaults:
                manifest["defaults"] = defaults
            with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as fo:
                fo.write(json.dumps(manifest, indent=2) + "\n")
                fo.flush()
                os.fsync(fo.fileno())
            os.chmod(tmp, 0o755)
            os.makedirs(parent, exist_ok=True)
            old = None
            if os.path.exists(final):  # force: move the old copy aside, then swap in the new one
                old = tempfile.mkdtemp(dir=self.models_dir, prefix=".tmp-old-")
                os.rename(final, os.path.join(old, "m"))
            os.rename(tmp, final)
            tmp = None
            if old:
                shutil.rmtree(old, ignore_errors=True)
            return manifest
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                if made_parent:
                    try:
                        os.rmdir(parent)
                    except OSError:
                        pass
            raise

    def copy(self, src: str, dst: str, force: bool = False) -> dict:
        """A second name for a stored model (its files and its defaults), as `ollama cp` makes."""
        csrc, cdst = canonical_name(src), canonical_name(dst)
        if csrc == cdst:
            raise StoreError(f"cannot copy '{csrc}' onto itself")
        return self.create(cdst, self.path_of(csrc), force=force, defaults=self.manifest(csrc).get("defaults"))

    def rm(self, name: str) -> str:
        """Delete a stored model (rename out of sight first, so a half-deleted model is never listed)."""
        cname = canonical_name(name)
        path = self.path_of(cname)
        trash = tempfile.mkdtemp(dir=self.models_dir, prefix=".tmp-rm-")
        os.rename(path, os.path.join(trash, "m"))
        shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(path))  # the name folder, when it held no other tag
        except OSError:
            pass
        return cname

    # ------------------------------------------------------------------ list / show
    def list(self) -> list[dict]:
        """Manifests of every stored model, newest first (like `ollama list`)."""
        out = []
        if not os.path.isdir(self.models_dir):
            return out
        for base in sorted(os.listdir(self.models_dir)):
            if base.startswith("."):
                continue
            d = os.path.join(self.models_dir, base)
            if not os.path.isdir(d):
                continue
            for tag in sorted(os.listdir(d)):
                try:
                    m = self.manifest(f"{base}:{tag}")
                except StoreError:
                    continue  # not a model folder (or an unreadable one): not listed
                m["name"] = f"{base}:{tag}"
                m["modified"] = os.path.getmtime(os.path.join(d, tag, MANIFEST))
                out.append(m)
        out.sort(key=lambda m: -m["modified"])
        return out

    def show(self, name: str) -> dict:
        """Architecture, parameters, context length, quantization, template, and the manifest."""
        path = self.path_of(name)
        m = self.manifest(name)
        cfg = load_config(path)
        tok = Tokenizer.from_dir(path)
        template = tok.chat_template
        if is_dense(cfg):  # grouped-query attention, one FFN per layer
            shape = {"dense": True, "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
                     "kv_cache_values": cfg.kv_cache_values_per_token(),
                     "tied_embeddings": cfg.tie_word_embeddings, "rope_scaling": cfg.rope_scaling,
                     # the DeepSeek fields, for readers of either kind: no latent cache, experts or MTP
                     "kv_lora_rank": None, "qk_rope_head_dim": cfg.head_dim, "experts": 0, "experts_used": 0,
                     "shared_experts": 0, "mtp_depth": 0}
        else:
            shape = {"dense": False, "kv_lora_rank": cfg.kv_lora_rank, "qk_rope_head_dim": cfg.qk_rope_head_dim,
                     "experts": cfg.n_routed_experts, "experts_used": cfg.num_experts_per_tok,
                     "shared_experts": cfg.n_shared_experts, "mtp_depth": cfg.num_nextn_predict_layers}
        return {
            "name": canonical_name(name), "path": path, "architecture": cfg.model_type,
            "parameters": m.get("parameters"), "active_parameters": m.get("active_parameters"),
            "mtp_parameters": m.get("mtp_parameters"),
            "parameter_size": human_count(m.get("parameters") or 0),
            "context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
            "layers": cfg.num_hidden_layers, "attention_heads": cfg.num_attention_heads, **shape,
            "vocab_size": cfg.vocab_size, "tokenizer_vocab_size": tok.vocab_size,
            "quantization": m.get("quantization"),
            "gguf_tensors": tensor_types(GGUFModelFile(path)) if holds_gguf(path) else None,
            "template": template if template else "built-in DeepSeek template",
            "template_source": "tokenizer_config.json" if template else "built-in",
            "thinking": can_think(tok),
            "bos_token": tok.bos_token, "eos_token": tok.eos_token,
            "size": m.get("size"), "digest": m.get("digest"), "created_at": m.get("created_at"),
            "source": m.get("source"),
        }


def resolve_model_dir(name: str) -> str:
    """A checkpoint directory, or a model name in the local store (NANOSEEK_HOME)."""
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "config.json")):
        return name
    try:
        return Store().path_of(name)
    except StoreError as e:
        raise SystemExit(f"nanoseek: model '{name}' not found: not a checkpoint directory, and {e}") from None
