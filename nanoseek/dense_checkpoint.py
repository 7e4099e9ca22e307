"""Hugging Face checkpoints of the dense Llama / Qwen2 / Qwen3 models: load and save.

- One `model.safetensors`, or shards listed in `model.safetensors.index.json`. Nothing is ever
  unpickled: a folder with only `.bin` / `.pt` files is refused.
- The state dict's names are the checkpoint's, one to one; a tied head (`tie_word_embeddings`) is
  stored once, as `model.embed_tokens.weight`, as transformers writes it.
- Every key is checked (missing, unexpected, shape, dtype) before any weight is copied, so a bad
  checkpoint never leaves a half-loaded model; errors name the file and the key.
- Writes are atomic (nanoseek.io); the index and config.json come last.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointError, natural_key, save_sharded
from .dense_config import DenseConfig

TIED_HEAD = "lm_head.weight"


def _open(path: str):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def read_weight_map(path: str) -> dict[str, str]:
    """key -> safetensors file name, from the index or the single file."""
    index, single = os.path.join(path, INDEX_FILE), os.path.join(path, SINGLE_FILE)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        for fname in sorted(set(weight_map.values())):
            if not os.path.exists(os.path.join(path, fname)):
                key = next(k for k, v in weight_map.items() if v == fname)
                raise CheckpointError(f"{os.path.join(path, fname)}: shard listed in {INDEX_FILE} is missing "
                                      f"(it holds e.g. '{key}')")
        return weight_map
    if os.path.exists(single):
        with _open(single) as f:
            return {k: SINGLE_FILE for k in f.keys()}
    pickles = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
    hint = f" (found {', '.join(pickles)}: pickle files are never loaded; convert them to safetensors)" if pickles else ""
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def resolve_dtype(dtype, cfg: DenseConfig) -> torch.dtype:
    if dtype is None:
        dtype = cfg.torch_dtype
    if isinstance(dtype, str):
        name = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}.get(dtype, dtype)
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize == 1:
            raise CheckpointError(f"unsupported dtype {name!r} (use float32, bfloat16 or float16)")
    return dtype


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's tensors under their checkpoint names (the tied head left out)."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop(TIED_HEAD, None)
    return state


def check_pretrained(path: str, cfg: DenseConfig, model_cls, strict: bool = True):
    """Check every tensor a `model_cls(cfg)` needs (present, no unexpected extras when `strict`,
    shape, float dtype) in the checkpoint directory `path`, reading only headers. Returns
    (weight_map, open file handles, expected shapes). Raises CheckpointError naming file and key."""
    weight_map = read_weight_map(path)
    with torch.device("meta"):
        expected = {k: tuple(t.shape) for k, t in hf_state_dict(model_cls(cfg)).items()}

    missing = sorted(k for k in expected if k not in weight_map)
    if missing:
        raise CheckpointError(f"{path}: missing key '{missing[0]}'"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    ignorable = {TIED_HEAD} if cfg.tie_word_embeddings else set()
    unexpected = sorted(k for k in weight_map if k not in expected and k not in ignorable
                        and not k.endswith("rotary_emb.inv_freq"))
    if unexpected and strict:
        k = unexpected[0]
        raise CheckpointError(f"{os.path.join(path, weight_map[k])}: unexpected key '{k}' "
                              "(not part of this model's config)")
    handles = {fname: _open(os.path.join(path, fname)) for fname in sorted({weight_map[k] for k in expected})}
    for key, want in expected.items():
        where = os.path.join(path, weight_map[key])
        f = handles[weight_map[key]]
        if key not in f.keys():
            raise CheckpointError(f"{where}: key '{key}' is listed in {INDEX_FILE} but not stored in this file")
        sl = f.get_slice(key)
        shape, kind = tuple(sl.get_shape()), sl.get_dtype()
        if shape != want:
            raise CheckpointError(f"{where}: key '{key}' has shape {shape}, expected {want}")
        if kind not in ("F32", "F16", "BF16", "F64"):
            raise CheckpointError(f"{where}: key '{key}' has dtype {kind}, expected a float type "
                                  "(quantized dense weights are not supported)")
    return weight_map, handles, expected


@torch.no_grad()
def load_pretrained(path: str, dtype=None, device=None, strict: bool = True, *, model_cls):
    """Load a Hugging Face Llama / Qwen2 / Qwen3 checkpoint directory into a `model_cls`
    (DenseModel, which calls this from `from_pretrained`)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint directory")
    cfg = DenseConfig.from_pretrained(path)
    # everything is checked before anything is copied
    weight_map, handles, expected = check_pretrained(path, cfg, model_cls, strict)
    dtype = resolve_dtype(dtype, cfg)

    model = model_cls.empty(cfg, device=torch.device(device or "cpu"), dtype=dtype)
    params = model.state_dict()
    for key in sorted(expected):
        try:
            params[key].copy_(handles[weight_map[key]].get_tensor(key))
        except SafetensorError as e:
            raise CheckpointError(f"{os.path.join(path, weight_map[key])}: cannot read key '{key}' ({e})") from None
    return model


@torch.no_grad()
def save_pretrained(model, path: str, max_shard_size: int = 5 * 2**30, extra_config: dict | None = None) -> None:
    """Write config.json and safetensors (sharded above `max_shard_size` bytes) that transformers'
    Llama / Qwen2 / Qwen3 classes load. Files go to a staging folder, then move in; the index
    and config.json come last."""
    state = {k: v.detach().to("cpu") for k, v in hf_state_dict(model).items()}
    groups = [{k: state[k]} for k in sorted(state, key=natural_key)]
    dtype = str(model.lm_head.weight.dtype).replace("torch.", "")
    save_sharded(groups, path, max_shard_size,
                 lambda: model.config.save(path, extra={"torch_dtype": dtype, **(extra_config or {})}))
