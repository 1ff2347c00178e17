"""What every loader shares: the device and dtype a user asks for, checked; and `Loaded`, what a loader returns.

Loaders (`lfm2.gguf.load_gguf`, and the checkpoint-folder path of `lfm2.load`) return data: a
model, its config, its tokenizer and its sampling defaults. `lfm2.llm` builds the `LLM` from
them. Nothing here imports `lfm2.llm`, so a loader never sits in an import cycle with the layer
that uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lfm2.config import ModelConfig
from lfm2.errors import ConfigError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_device(device: str | torch.device) -> torch.device:
    """The device, checked to exist here: asking for CUDA on a CPU-only build fails now, with a line
    that says what to do, rather than deep inside the first tensor move."""
    try:
        out = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {device!r} ({e}); use cpu, cuda, cuda:N or mps") from None
    if out.type == "cuda":
        if not torch.cuda.is_available():
            build = "has no CUDA support" if torch.version.cuda is None else "sees no CUDA GPU"
            raise ConfigError(f"device {device!r}: this PyTorch ({torch.__version__}) {build}; use --device cpu")
        if out.index is not None and out.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif out.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r}: Apple's MPS backend is not available here; use --device cpu")
    elif out.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {device!r}: lfm2 runs on cpu, cuda or mps")
    return out


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """float32 by default on CPU (most CPUs have no fast bf16 matmul), bfloat16 on accelerators."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


@dataclass
class Loaded:
    """A loaded model and what travels with it.

    `generation_defaults` are generation_config.json's fields as a dict (a GGUF file's
    `general.sampling.*` keys), or None where they are read from `path`'s generation_config.json.
    `vision` and `image_processor` are an LFM2-VL model around `model` and its preprocessing (a
    GGUF text model loaded with an mmproj file), else None.
    """

    model: torch.nn.Module
    config: ModelConfig
    tokenizer: Any  # lfm2.tokenizer.Tokenizer, or None for a checkpoint without one
    path: Path
    generation_defaults: dict[str, Any] | None = None
    vision: Any = None  # lfm2.models.lfm2_vl.Lfm2VlForConditionalGeneration
    image_processor: Any = None  # lfm2.images.ImageProcessor


__all__ = ["Loaded", "parse_device", "parse_dtype"]
