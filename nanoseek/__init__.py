"""nanoseek: the DeepSeek-V3/R1 system as one readable, tested PyTorch package."""

from .config import ConfigError, ModelConfig, PRESETS
from .model import DeepSeekV3
from . import mha  # noqa: F401  (ModelConfig(attention="mha"): the MHA baseline's layers)
from .load import load_model

__version__ = "0.1.0"
__all__ = ["DeepSeekV3", "load_model", "ModelConfig", "ConfigError", "PRESETS", "__version__"]
