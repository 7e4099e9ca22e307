"""One loader for every supported checkpoint: `load_model(path)` reads the folder's config.json and
returns the model its `model_type` (or, without one, its `architectures`) names:

- `deepseek_v3`, `deepseek_v2`: DeepSeekV3 (DeepSeek-V3 report, arXiv 2412.19437, section 2);
- `llama`, `qwen2`, `qwen3`: DenseModel, the families DeepSeek-R1 was distilled into
  (DeepSeek-R1 report, arXiv 2501.12948, section 2.4).

Either way `model(input_ids)` gives logits [B, T, V]. A GGUF file (`deepseek2`, `llama`, `qwen2`,
`qwen3`), or a folder that holds one with its config.json and tokenizer beside it, as the store
keeps one, loads quantized on the CPU (nanoseek.gguf_dense.read_any_gguf): the weights stay the
file's blocks, so resident memory stays about the file's size (nanoseek.quant.cpu_decode's
`prepare_cpu_decode` trades memory for speed: held dequantized copies, the int4 GEMM). Anything
else is refused with an error that names the field and its value, before any weight is read. `load_config(path)` reads the matching
config (ModelConfig or DenseConfig) without the weights, for the store and `nanoseek show/info`.
"""

from __future__ import annotations

import os

from .checkpoint import CheckpointError
from .config import ConfigError, ModelConfig, read_config_json
from .dense import DenseModel
from .dense_config import DenseConfig
from .gguf_dense import read_any_gguf
from .gguf_file import GGUFError
from .model import DeepSeekV3

MODEL_CLASSES = {"deepseek_v3": DeepSeekV3, "deepseek_v2": DeepSeekV3,
                 "llama": DenseModel, "qwen2": DenseModel, "qwen3": DenseModel}
CAUSAL_LM_ARCHITECTURES = {"DeepseekV3ForCausalLM": "deepseek_v3", "DeepseekV2ForCausalLM": "deepseek_v2",
                           "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


def model_type_of(config: dict, source: str = "config.json") -> str:
    """The supported model_type a config.json dict describes, or a ConfigError naming the field."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if isinstance(architectures, str):
        architectures = [architectures]
    if model_type is None:
        known = [CAUSAL_LM_ARCHITECTURES[a] for a in architectures if a in CAUSAL_LM_ARCHITECTURES]
        if not known:
            raise ConfigError(f"{source}: field 'model_type' is missing and field 'architectures' has "
                              f"{architectures!r}, none of them supported (supported: "
                              f"{', '.join(CAUSAL_LM_ARCHITECTURES)})")
        model_type = known[0]
    if model_type not in MODEL_CLASSES:
        raise ConfigError(f"{source}: field 'model_type': unsupported value {model_type!r} "
                          f"(supported: {', '.join(MODEL_CLASSES)})")
    wrong = [a for a in architectures if CAUSAL_LM_ARCHITECTURES.get(a) != model_type]
    if wrong:
        expected = next(a for a, t in CAUSAL_LM_ARCHITECTURES.items() if t == model_type)
        raise ConfigError(f"{source}: field 'architectures': unsupported value {wrong[0]!r} for model_type "
                          f"{model_type!r} (expected {expected!r})")
    return model_type


def is_dense(config) -> bool:
    """Whether a config (ModelConfig, DenseConfig) or model describes a dense Llama / Qwen model."""
    return isinstance(getattr(config, "config", config), DenseConfig)


def load_config(path: str):
    """The config of a checkpoint folder (or config.json file), without reading any weight: a
    DenseConfig where its model_type (or architectures) names Llama / Qwen2 / Qwen3, else the
    DeepSeek ModelConfig as `ModelConfig.from_pretrained` reads it."""
    path = os.fspath(path)
    config, _ = read_config_json(path)
    named = config.get("model_type") or next(
        (CAUSAL_LM_ARCHITECTURES.get(a) for a in (config.get("architectures") or []) if a in CAUSAL_LM_ARCHITECTURES),
        None)
    if MODEL_CLASSES.get(named) is DenseModel:
        return DenseConfig.from_pretrained(path)
    return ModelConfig.from_pretrained(path)


def holds_gguf(path: str) -> bool:
    """Whether a checkpoint folder keeps its weights as GGUF (a .gguf file, no safetensors)."""
    files = os.listdir(path) if os.path.isdir(path) else []
    return any(f.endswith(".gguf") for f in files) and not any(f.endswith(".safetensors") for f in files)


def load_model(path: str, dtype=None, device=None):
    """A DeepSeek-V2/V3 or dense Llama / Qwen2 / Qwen3 checkpoint folder or GGUF file -> its model
    (DeepSeekV3 or DenseModel), weights in `dtype` (default: the checkpoint's) on `device`."""
    path = os.fspath(path)
    is_gguf_file = os.path.isfile(path) and path.endswith(".gguf")
    if not os.path.isdir(path) and not is_gguf_file:
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if is_gguf_file or holds_gguf(path):  # quantized on the CPU; dequantized into `dtype` on another device
        on_cpu = device is None or str(device) == "cpu"
        try:
            return read_any_gguf(path, dtype=dtype, device=None if on_cpu else device, quantized=on_cpu)[0]
        except GGUFError as e:
            if not is_gguf_file:
                raise
            raise CheckpointError(str(e)) from None  # a file given as the checkpoint: the loader's error
    config, file = read_config_json(path)
    return MODEL_CLASSES[model_type_of(config, file)].from_pretrained(path, dtype=dtype, device=device)
