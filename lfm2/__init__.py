"""lfm2: run, serve and fine-tune Liquid AI's LFM2 models in plain PyTorch."""

from lfm2.bundled import default_model_path
from lfm2.config import ModelConfig, preset
from lfm2.errors import CheckpointError, ConfigError, GenerationError, LFM2Error, TokenizerError
from lfm2.llm import LLM, load

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "CheckpointError",
    "ConfigError",
    "GenerationError",
    "LFM2Error",
    "ModelConfig",
    "TokenizerError",
    "default_model_path",
    "load",
    "preset",
]
