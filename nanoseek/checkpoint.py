"""Hugging Face checkpoints: load and save the official DeepSeek-V3 safetensors layout.

- Sharded safetensors with `model.safetensors.index.json` (or one `model.safetensors`).
- FP8 e4m3 weights with `<name>.weight_scale_inv`, one fp32 multiplier per 128x128 block
  (ceil-div indexing, partial edge blocks), dequantized straight into the requested dtype
  (DeepSeek-V3 report section 3.3); quantized and dequantized by `quant/blocks.py`, the one block
  quantizer, with the checkpoint format's amax floor `CHECKPOINT_EPS`.
- MTP layers at `model.layers.<num_hidden_layers + i>` with their copies of the embedding and head.
- Routed experts: per-expert keys on disk, stacked [E, out, in] tensors in memory.
- Writes are atomic (temp file + rename; index and config last). Nothing is ever unpickled.
Every error names the file and the key.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings

import torch
from safetensors import SafetensorError, safe_open

from .config import ModelConfig
from .io import atomic_save_safetensors, atomic_write_text
from .quant.blocks import BLOCK, CHECKPOINT_EPS, WEIGHT, dequantize, quantize

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and key."""


# ------------------------------------------------------------------------------ FP8 blocks
def fp8_dequantize(w8: torch.Tensor, scale_inv: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """W[i, j] = float(W8[i, j]) * scale_inv[i // 128, j // 128], computed in fp32, one rounding."""
    return dequantize(w8, scale_inv, WEIGHT, dtype)


def fp8_quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-128x128-block e4m3 quantization: scale_inv = max(amax, CHECKPOINT_EPS) / 448, W8 = W /
    scale_inv. Partial edge blocks are computed on the zero-padded block, then cropped."""
    q = quantize(w, WEIGHT, eps=CHECKPOINT_EPS)
    return q.data, q.scale


_NOT_FP8 = re.compile(r"(embed_tokens|lm_head|shared_head\.head|eh_proj|norm|layernorm|mlp\.gate\.weight)")


def fp8_eligible(hf_key: str, tensor: torch.Tensor) -> bool:
    """Which weights the official release stores in FP8: every Linear except the head, router,
    eh_proj (and embeddings and norms, which are not Linears)."""
    return hf_key.endswith(".weight") and tensor.dim() == 2 and not _NOT_FP8.search(hf_key)


# ------------------------------------------------------------------------------ name mapping
EXPERT_PROJ = ("gate_proj", "up_proj", "down_proj")  # the stacked [E, out, in] parameters of Experts


def hf_keys_for(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, int | None]]:
    """Map one of our state-dict names to its Hugging Face key(s): (hf_key, expert index or None)."""
    if name.startswith("mtp."):
        name = "model.layers." + name[len("mtp."):]
    m = re.fullmatch(r"(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)", name)
    if m:
        return [(f"{m.group(1)}.{e}.{m.group(2)}.weight", e) for e in range(tensor.shape[0])]
    return [(name, None)]


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our state dict in the Hugging Face layout (per-expert keys, MTP as model.layers.N+i,
    with the MTP layers' copies of the embedding and head as in the official release)."""
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        for key, e in hf_keys_for(name, t, cfg):
            out[key] = t[e] if e is not None else t
    for idx in model.mtp.keys():
        out[f"model.layers.{idx}.embed_tokens.weight"] = model.model.embed_tokens.weight.detach()
        out[f"model.layers.{idx}.shared_head.head.weight"] = model.lm_head.weight.detach()
    return out


# ------------------------------------------------------------------------------ reading
class _ShardSet:
    """The safetensors files of a checkpoint directory and which file holds which key."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX_FILE)
        single = os.path.join(path, SINGLE_FILE)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    self.weight_map: dict[str, str] = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        elif os.path.exists(single):
            self.weight_map = {k: SINGLE_FILE for k in self._open(SINGLE_FILE).keys()}
        else:
            pickles = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            hint = (f" (found {', '.join(sorted(pickles))}: pickle files are never loaded; convert them "
                    "to safetensors)") if pickles else ""
            raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        self._handles: dict[str, object] = {}
        for fname in sorted(set(self.weight_map.values())):
            if not os.path.exists(os.path.join(path, fname)):
                key = next(k for k, v in self.weight_map.items() if v == fname)
                raise CheckpointError(f"{os.path.join(path, fname)}: shard listed in {INDEX_FILE} is missing "
                                      f"(it holds e.g. '{key}')")

    def _open(self, fname: str):
        full = os.path.join(self.path, fname)
        try:
            return safe_open(full, framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{full}: corrupt or truncated safetensors file ({e})") from None

    def handle(self, fname: str):
        if fname not in self._handles:
            self._handles[fname] = self._open(fname)
            present = set(self._handles[fname].keys())
            for key, f in self.weight_map.items():
                if f == fname and key not in present:
                    raise CheckpointError(f"{os.path.join(self.path, fname)}: key '{key}' is listed in "
                                          f"{INDEX_FILE} but not stored in this file")
        return self._handles[fname]

    def get(self, key: str) -> torch.Tensor:
        fname = self.weight_map[key]
        try:
            return self.handle(fname).get_tensor(key)
        except SafetensorError as e:
            raise CheckpointError(f"{os.path.join(self.path, fname)}: cannot read key '{key}' ({e})") from None

    def where(self, key: str) -> str:
        return os.path.join(self.path, self.weight_map[key])


def _resolve_dtype(dtype, cfg: ModelConfig) -> torch.dtype:
    if dtype is None:
        dtype = cfg.torch_dtype
    if isinstance(dtype, str):
        name = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}.get(dtype, dtype)
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize == 1:
            raise CheckpointError(f"unsupported dtype {name!r} (use float32, bfloat16 or float16)")
    return dtype


@torch.no_grad()
def load_pretrained(path: str, dtype=None, device=None, strict: bool = True, *, model_cls):
    """Load a Hugging Face DeepSeek-V2/V3 checkpoint directory into a `model_cls` (DeepSeekV3, which
    calls this from `from_pretrained`: the model sits above its checkpoint format, not below)."""

    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint directory")
    cfg = ModelConfig.from_pretrained(path)
    shards = _ShardSet(path)
    keys = set(shards.weight_map)
    N = cfg.num_hidden_layers
    if cfg.num_nextn_predict_layers:
        present = [i for i in range(cfg.num_nextn_predict_layers) if f"model.layers.{N + i}.eh_proj.weight" in keys]
        if len(present) < cfg.num_nextn_predict_layers:
            if present:
                raise CheckpointError(f"{path}: config asks for {cfg.num_nextn_predict_layers} MTP layers "
                                      f"but only layers {[N + i for i in present]} are stored")
            warnings.warn(f"{path}: config has num_nextn_predict_layers={cfg.num_nextn_predict_layers} "
                          "but the checkpoint holds no MTP weights; loading without MTP", stacklevel=2)
            cfg = cfg.replace(num_nextn_predict_layers=0)
    dtype = _resolve_dtype(dtype, cfg)
    device = torch.device(device or "cpu")
    model = model_cls.empty(cfg, device=device, dtype=dtype)

    # expected hf key -> (our tensor, expert index)
    targets: dict[str, tuple[torch.Tensor, int | None]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        for key, e in hf_keys_for(name, t, cfg):
            targets[key] = (t, e)
    ignorable = set()
    for idx in model.mtp.keys():  # copies of the shared embedding and head
        ignorable |= {f"model.layers.{idx}.embed_tokens.weight", f"model.layers.{idx}.shared_head.head.weight"}

    missing = [k for k in targets if k not in keys]
    if missing:
        raise CheckpointError(f"{path}: missing key '{missing[0]}'" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    unexpected = [k for k in keys if k not in targets and k not in ignorable and not k.endswith(".weight_scale_inv")
                  and not k.endswith("rotary_emb.inv_freq")]
    if cfg.num_nextn_predict_layers == 0:  # MTP layers (index >= N) deliberately not loaded
        def layer_of(k):
            m = re.match(r"model\.layers\.(\d+)\.", k)
            return int(m.group(1)) if m else -1
        unexpected = [k for k in unexpected if layer_of(k) < N]
    if unexpected and strict:
        k = sorted(unexpected)[0]
        raise CheckpointError(f"{shards.where(k)}: unexpected key '{k}' (not part of this model's config)")

    by_file: dict[str, list[str]] = {}
    for key in targets:
        by_file.setdefault(shards.weight_map[key], []).append(key)
    for fname in sorted(by_file):
        for key in sorted(by_file[fname]):
            dst, e = targets[key]
            src = shards.get(key)
            where = shards.where(key)
            if src.dtype == torch.float8_e4m3fn:
                skey = key + "_scale_inv"
                if skey not in keys:
                    raise CheckpointError(f"{where}: FP8 weight '{key}' has no '{skey}'")
                scale = shards.get(skey)
                want = (math.ceil(src.shape[0] / BLOCK), math.ceil(src.shape[1] / BLOCK))
                if tuple(scale.shape) != want:
                    raise CheckpointError(f"{shards.where(skey)}: key '{skey}' has shape {tuple(scale.shape)}, "
                                          f"expected {want} for weight of shape {tuple(src.shape)}")
                src = fp8_dequantize(src, scale, torch.float32)
            want_shape = tuple(dst.shape[1:]) if e is not None else tuple(dst.shape)
            if tuple(src.shape) != want_shape:
                raise CheckpointError(f"{where}: key '{key}' has shape {tuple(src.shape)}, expected {want_shape}")
            if not src.dtype.is_floating_point:
                raise CheckpointError(f"{where}: key '{key}' has non-float dtype {src.dtype}")
            (dst[e] if e is not None else dst).copy_(src)
    return model


# ------------------------------------------------------------------------------ writing
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@torch.no_grad()
def save_pretrained(model, path: str, max_shard_size: int = 5 * 2**30, fp8: bool = False,
                    extra_config: dict | None = None) -> None:
    """Write config.json and safetensors in the Hugging Face layout, keeping the model's dtype
    (or FP8 e4m3 with 128x128 `weight_scale_inv` blocks when `fp8`). Files are written to a
    staging folder, then moved in; the index and config.json come last."""
    cfg = model.config
    state = {k: v.detach().to("cpu") for k, v in to_hf_state_dict(model).items()}
    model_dtype = model.lm_head.weight.dtype
    if fp8:
        quantized = {}
        for k, v in state.items():
            if fp8_eligible(k, v):
                quantized[k], quantized[k + "_scale_inv"] = fp8_quantize_blocks(v)
            else:
                quantized[k] = v
        state = quantized
    # Shard by size, keeping each weight next to its scale.
    groups = []
    for k in sorted(state, key=natural_key):
        if not k.endswith("_scale_inv"):
            groups.append({k: state[k], **({k + "_scale_inv": state[k + "_scale_inv"]}
                                           if k + "_scale_inv" in state else {})})
    extra = {"torch_dtype": _dtype_name(model_dtype)}
    if fp8:
        extra["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                        "weight_block_size": [BLOCK, BLOCK]}
    extra.update(extra_config or {})
    save_sharded(groups, path, max_shard_size, lambda: cfg.save(path, extra=extra))


def save_sharded(groups: list[dict[str, torch.Tensor]], path: str, max_shard_size: int, write_config) -> None:
    """Write tensor groups (each kept in one file) as `model.safetensors`, or as shards of at most
    `max_shard_size` bytes plus the index, into `path`: files go to a staging folder and move in,
    the index and then `write_config()` come last, and files of an earlier save that this one no
    longer uses are removed."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for group in groups:
        nbytes = sum(t.numel() * t.element_size() for t in group.values())
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1].update(group)
        size += nbytes
    total = sum(t.numel() * t.element_size() for g in groups for t in g.values())
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    os.makedirs(path, exist_ok=True)
    staging = tempfile.mkdtemp(dir=path, prefix=".staging-")
    try:
        for name, shard in zip(names, shards):
            atomic_save_safetensors(shard, os.path.join(staging, name))
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(path, name))
        index = os.path.join(path, INDEX_FILE)
        if n > 1:
            weight_map = {k: names[i] for i, shard in enumerate(shards) for k in shard}
            atomic_write_text(index, json.dumps({"metadata": {"total_size": total},
                                                 "weight_map": weight_map}, indent=2) + "\n")
        elif os.path.exists(index):
            os.unlink(index)
        for f in os.listdir(path):  # shards of an earlier save that the new one no longer uses
            if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f) and f not in names:
                os.unlink(os.path.join(path, f))
        if n > 1 and os.path.exists(os.path.join(path, SINGLE_FILE)):
            os.unlink(os.path.join(path, SINGLE_FILE))
        write_config()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def natural_key(key: str):
    """Sort key with digit runs compared as numbers (layers 2 before 10)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]
