"""A Hugging Face DeepSeek-V2/V3 safetensors checkpoint -> a quantized `deepseek2` GGUF, streamed
tensor by tensor: `quantize_checkpoint(src, out, mix)`. What `nanoseek create NAME --from DIR
--quantize q8_0|q4_k_m` stores (infer/gguf_store.py), so the entry loads exactly as an imported
GGUF of that mix does (QuantLinear / QuantExperts over the file's blocks).

- Reading: each tensor is read from its shard with plain file reads at the offsets of the
  safetensors header (no memory map, so resident memory holds the tensor being converted, not the
  shard's pages); routed experts, stored one per key, gathered into the one GGUF stack they make.
- FP8 releases (DeepSeek-V3 report, arXiv 2412.19437, section 3.3: e4m3 weights with a
  `weight_scale_inv` per 128x128 block, as DeepSeek-V3/R1 ship): each weight is dequantized per
  block into float32 (checkpoint.fp8_dequantize, the loader's own), then quantized.
- Types: llama.cpp's quantizer rule for the mix (gguf_file.tensor_type, quant/mixes.py), the GGML
  blocks of quant/ggml.py (llama.cpp's reference quantizers), encoded a chunk of rows at a time.
- MLA's kv_b_proj is written as llama.cpp wants it, the split `attn_k_b` [H, r, nope] (per head
  transposed) and `attn_v_b` [H, v, r], quantized as the mix says. Loading keeps it float (read_gguf
  dequantizes it once): the absorbed decode path (model.MLA._absorbed) reads kv_b_proj's whole
  weight as [H, nope + v, r] every step, and attn_k_b's blocks run along nope, not along
  kv_b_proj's rows (r), so its bytes cannot serve as a QuantLinear of kv_b_proj; re-quantizing
  along r would round a second time and part from what llama.cpp computes on the same file. It is
  about 0.4% of DeepSeek-V2-Lite's weights (27 layers x 16 heads x 256 x 512).
- The MTP module (section 2.2) is not written (llama.cpp's deepseek2 drops it).

The checkpoint must be one llama.cpp's deepseek2 can express (gguf_file.check_exportable) with a
byte-level BPE tokenizer that GGUF names (gpt-2 or deepseek-v3 pre-tokenizer). Every error names
the file and the tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np
import torch

from .checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointError, fp8_dequantize, hf_keys_for
from .config import ModelConfig
from .gguf_file import GGML_NAMES, GGUFError, PlannedTensor, gguf_name, shape_plan, split_kv_b, \
    write_planned
from .model import DeepSeekV3
from .quant import ggml
from .quant.mixes import MIXES
from .quant.blocks import BLOCK
from .tokenizer import Tokenizer

QUANTIZE_MIXES = ("q8_0", "q4_k_m")  # `create --quantize`
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn}
_CHUNK_WEIGHTS = 1 << 20  # weights converted to float32 and encoded per step (bounds the quantizer's temporaries)


class SafetensorsShards:
    """The tensors of a checkpoint folder's safetensors files, read one at a time with file reads."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX_FILE)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        elif os.path.exists(os.path.join(path, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")
        self.entries: dict[str, tuple[str, dict, int]] = {}  # key -> (file, header entry, data start)
        for name in files:
            full = os.path.join(path, name)
            try:
                with open(full, "rb") as f:
                    (n,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(n))
            except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{full}: corrupt or truncated safetensors file ({e})") from None
            size = os.path.getsize(full)
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                if entry["data_offsets"][1] + 8 + n > size:
                    raise CheckpointError(f"{full}: tensor '{key}' runs past the end of the file (truncated)")
                self.entries[key] = (full, entry, 8 + n)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> torch.Tensor:
        if key not in self.entries:
            raise CheckpointError(f"{self.path}: missing tensor '{key}'")
        full, entry, start = self.entries[key]
        if entry["dtype"] not in _DTYPES:
            raise CheckpointError(f"{full}: tensor '{key}' has dtype {entry['dtype']} (readable: {', '.join(_DTYPES)})")
        lo, hi = entry["data_offsets"]
        buf = bytearray(hi - lo)
        with open(full, "rb") as f:
            f.seek(start + lo)
            f.readinto(buf)
        return torch.frombuffer(buf, dtype=torch.uint8).view(_DTYPES[entry["dtype"]]).view(entry["shape"]) \
            if buf else torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])

    def weight(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Tensor `key` checked against `shape`, FP8 dequantized per 128x128 block into float32."""
        t = self.get(key)
        full = self.entries[key][0]
        if t.dtype == torch.float8_e4m3fn:
            scale = self.get(key + "_scale_inv") if key + "_scale_inv" in self else None
            if scale is None:
                raise CheckpointError(f"{full}: FP8 weight '{key}' has no '{key}_scale_inv'")
            want = (math.ceil(t.shape[0] / BLOCK), math.ceil(t.shape[1] / BLOCK))
            if tuple(scale.shape) != want:
                raise CheckpointError(f"{full}: key '{key}_scale_inv' has shape {tuple(scale.shape)}, expected {want}")
            t = fp8_dequantize(t, scale, torch.float32)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{full}: tensor '{key}' has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t


def encode(w: torch.Tensor, qtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """w [..., k] (any float dtype) -> its GGML bytes [..., row_bytes] (uint8), a chunk of rows at a time."""
    rows = w.reshape(-1, w.shape[-1])
    if out is None:
        out = np.empty((*w.shape[:-1], ggml.row_bytes(w.shape[-1], qtype)), dtype=np.uint8)
    flat = out.reshape(rows.shape[0], -1)
    step = max(1, _CHUNK_WEIGHTS // w.shape[-1])
    for i in range(0, rows.shape[0], step):
        flat[i:i + step] = ggml.quantize(rows[i:i + step].float(), qtype).numpy()
    return out


def _sources(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF tensor name -> (our state-dict name, its shape), from a meta model (kv_b_proj for both halves)."""
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith("kv_b_proj.weight"):
            i = name.split(".")[2]
            out[f"blk.{i}.attn_k_b.weight"] = out[f"blk.{i}.attn_v_b.weight"] = (name, tuple(t.shape))
        elif gguf_name(name):
            out[gguf_name(name)] = (name, tuple(t.shape))
    return out


def quantize_checkpoint(src: str, out: str, mix: str, name: str | None = None) -> list[str]:
    """Write the checkpoint folder `src` as a `deepseek2` GGUF `out` under `mix` (QUANTIZE_MIXES or
    any other llama.cpp mix gguf_file writes), one tensor in memory at a time; returns the file(s)."""
    if mix not in MIXES:
        raise GGUFError(f"{out}: unsupported --quantize {mix!r} (choices: {', '.join(QUANTIZE_MIXES)})")
    cfg = ModelConfig.from_pretrained(src).replace(num_nextn_predict_layers=0)
    tok = Tokenizer.from_dir(src)
    shards = SafetensorsShards(src)
    sources = _sources(cfg)
    plan = shape_plan(cfg, mix)

    def encoded(p: PlannedTensor) -> np.ndarray:
        ours, shape = sources[p.name]
        qtype = GGML_NAMES[p.qtype]
        keys = hf_keys_for(ours, torch.empty(shape, device="meta"), cfg)
        if keys[0][1] is not None:  # routed experts: one key each, stacked [E, out, in] in their stored dtype
            w = torch.stack([shards.weight(key, shape[1:]) for key, _ in keys])
            return encode(w, qtype)
        w = shards.weight(keys[0][0], shape)
        if p.name.endswith(("attn_k_b.weight", "attn_v_b.weight")):
            k_b, v_b = split_kv_b(w, cfg)
            w = k_b if p.name.endswith("attn_k_b.weight") else v_b
        return encode(w, qtype)

    return write_planned(out, cfg, tok, mix, plan, encoded, name or os.path.basename(os.path.normpath(src)))
