"""lfm2: run, serve and fine-tune Liquid AI's LFM2 models in plain PyTorch.

The names below are imported on first use (PEP 562), so `import lfm2.errors` or the `lfm2 --help`
command do not pay for importing torch.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "lfm2.llm",
    "load": "lfm2.llm",
    "ModelConfig": "lfm2.config",
    "preset": "lfm2.config",
    "default_model_path": "lfm2.bundled",
    "CheckpointError": "lfm2.errors",
    "ConfigError": "lfm2.errors",
    "GenerationError": "lfm2.errors",
    "LFM2Error": "lfm2.errors",
    "TokenizerError": "lfm2.errors",
}

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

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports each name
    from lfm2.bundled import default_model_path
    from lfm2.config import ModelConfig, preset
    from lfm2.errors import CheckpointError, ConfigError, GenerationError, LFM2Error, TokenizerError
    from lfm2.llm import LLM, load


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lfm2' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
