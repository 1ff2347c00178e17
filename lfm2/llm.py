"""`lfm2.load()`: a checkpoint directory or hub id in, a ready model (and tokenizer) out."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lfm2.config import ModelConfig
from lfm2.errors import CheckpointError
from lfm2.models import build_model, cast_model
from lfm2.models.lfm2 import Lfm2ForCausalLM
from lfm2.weights import load_into, resolve_checkpoint

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """float32 by default on CPU (most CPUs have no fast bf16 matmul), bfloat16 on accelerators."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


@dataclass
class LLM:
    """A loaded model: `.model` (the torch module), `.config`, `.tokenizer` (None if the checkpoint has none)."""

    model: Lfm2ForCausalLM
    config: ModelConfig
    tokenizer: object | None
    path: Path

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.embed_tokens.weight.dtype


def load(
    path_or_hub_id: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> LLM:
    """Load an LFM2 / LFM2-MoE checkpoint in Hugging Face layout.

    The weights are checked against `config.json` before anything is built (a missing or
    misshapen tensor raises `CheckpointError` naming it); float32 weights loaded as float32 stay
    memory-mapped instead of being copied.
    """
    ckpt = resolve_checkpoint(path_or_hub_id)
    device = torch.device(device)
    dtype = parse_dtype(dtype, device)
    config = ModelConfig.from_json(ckpt / "config.json")
    model = build_model(config, device="meta")
    cast_model(model, dtype)
    load_into(model, ckpt, dtype, device)
    model.eval()
    return LLM(model=model, config=config, tokenizer=_load_tokenizer(ckpt), path=ckpt)


def _load_tokenizer(ckpt: Path) -> object | None:
    if not (ckpt / "tokenizer.json").is_file():
        return None
    from lfm2.tokenizer import Tokenizer

    return Tokenizer.from_dir(ckpt)


__all__ = ["LLM", "load", "CheckpointError"]
