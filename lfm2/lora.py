"""LoRA adapters on LFM2's linear layers, saved and loaded in PEFT's format.

A LoRA layer adds a low-rank update to a frozen linear layer: `y = W x + (alpha / r) B A x`,
with A (r, in) random and B (out, r) zero at the start, so training starts from the base model.
Only A and B train, which is what makes fine-tuning a 1B model fit on a laptop.

Files follow PEFT, so transformers + PEFT load our adapters and we load theirs:
`adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules, ...) and
`adapter_model.safetensors` with keys `base_model.model.<module path>.lora_A.weight` and
`.lora_B.weight`. Our module paths are Hugging Face's, so the names resolve on transformers'
`Lfm2ForCausalLM` unchanged.

Targets are module-name suffixes, as in PEFT: `out_proj` adapts both the attention and the
convolution output projections. A target that matches no linear layer is an error: other tools
ship LLaMA-style targets such as `o_proj` that silently match nothing in LFM2.

An LFM2-VL model (`lfm2.models.lfm2_vl`) is adapted whole, so that its tensors carry the names PEFT
gives them on transformers' `Lfm2VlForConditionalGeneration` (`model.language_model.layers.N...`),
but only in its language model: the parts its `frozen_prefixes` name (vision tower, projector) get
no adapter, although SigLIP2's attention has `q_proj`...`out_proj` layers too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from lfm2.errors import CheckpointError, ConfigError
from lfm2.files import atomic_write
from lfm2.models.lfm2 import drop_decode_step, is_plain_linear
from lfm2.weights import save_tensors

# LFM2's real projections: attention q/k/v/out, convolution in/out, SwiGLU w1/w2/w3.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Sequence[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ConfigError("LoRA needs at least one target module")


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update; `enabled=False` gives the base layer."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        w = base.weight
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default initialisation
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:  # for code that reads `.weight` (dtype, device)
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A, computed in float32 and cast back."""
        w = self.base.weight
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return (w.float() + delta).to(w.dtype)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wrap every linear layer whose name ends with a target; freeze everything else.

    Returns the wrapped module names. The tied embedding / output head is never wrapped, nor a layer
    under the model's `frozen_prefixes` (a vision model's vision side). Raises ConfigError naming any
    target that matches nothing, with the names that would match.
    """
    frozen = tuple(getattr(model, "frozen_prefixes", ()))
    linear = {n: m for n, m in model.named_modules()
              if is_plain_linear(m) and n != "lm_head" and not n.startswith(frozen)}
    unknown = [t for t in cfg.targets if not any(_matches(n, t) for n in linear)]
    if unknown:
        known = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ConfigError(f"LoRA target(s) {unknown} match no linear layer of this model; "
                          f"LFM2's projections are {known} (defaults: {list(DEFAULT_TARGETS)})")
    drop_decode_step(model)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = [n for n in linear if any(_matches(n, t) for t in cfg.targets)]
    for name in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), cfg.rank, cfg.alpha, cfg.dropout))
    model.lora_config = cfg
    return wrapped


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The base model, without a copy: every LoRA layer bypassed inside the block."""
    layers = [m for _, m in lora_layers(model)]
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m, e in zip(layers, before, strict=True):
            m.enabled = e


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names."""
    out = {}
    for name, m in lora_layers(model):
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
    return out


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model: str | None = None) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` (PEFT's format), atomically."""
    cfg: LoraConfig | None = getattr(model, "lora_config", None)
    if cfg is None:
        raise ConfigError("this model has no LoRA adapter to save")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.float() if v.dtype != torch.float32 else v for k, v in adapter_state(model).items()}
    save_tensors(state, out / ADAPTER_WEIGHTS)
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": sorted(cfg.targets), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "use_rslora": False,
        "use_dora": False, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {},
    }
    frozen = tuple(getattr(model, "frozen_prefixes", ()))
    if frozen:  # PEFT would otherwise wrap the vision side's q/k/v/out_proj too, and miss their tensors
        peft_config["exclude_modules"] = "(?:" + "|".join(re.escape(f) for f in frozen) + ").*"
    atomic_write(out / ADAPTER_CONFIG, json.dumps(peft_config, indent=2) + "\n")
    return out


def read_adapter_config(adapter_dir: str | os.PathLike) -> LoraConfig:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{adapter_dir}: no {ADAPTER_CONFIG}; is this a LoRA adapter directory?")
    raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if raw.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {raw.get('peft_type')!r} is not supported (only LORA)")
    for key in ("use_dora", "use_rslora"):
        if raw.get(key):
            raise CheckpointError(f"{path}: {key}=true is not supported")
    if raw.get("rank_pattern") or raw.get("alpha_pattern"):
        raise CheckpointError(f"{path}: per-layer rank_pattern/alpha_pattern is not supported")
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        raise CheckpointError(f"{path}: target_modules as a regular expression is not supported; list the names")
    return LoraConfig(rank=int(raw["r"]), alpha=float(raw.get("lora_alpha", raw["r"])),
                      dropout=float(raw.get("lora_dropout", 0.0)), targets=list(targets or DEFAULT_TARGETS))


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> LoraConfig:
    """Attach the adapter in `adapter_dir` to `model`, checking every tensor's name and shape."""
    cfg = read_adapter_config(adapter_dir)
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{adapter_dir}: {ADAPTER_WEIGHTS} not found")
    apply_lora(model, cfg)
    state = load_file(weights)
    expected = adapter_state(model)
    # PEFT writes `lora_A.weight`; in-memory PEFT state dicts may carry the adapter name.
    state = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
             for k, v in state.items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    frozen = [k for k in extra if k[len(PEFT_PREFIX):].startswith(tuple(getattr(model, "frozen_prefixes", ())))]
    if frozen:
        raise CheckpointError(f"{weights}: tensor {frozen[0]} adapts the vision side ({len(frozen)} such tensors); "
                              "lfm2 applies adapters to a vision model's language model only")
    if extra:
        raise CheckpointError(f"{weights}: tensor {extra[0]} has no matching layer in this model "
                              f"({len(extra)} unexpected); was the adapter trained on another architecture?")
    if missing:
        raise CheckpointError(f"{weights}: no tensor for {missing[0]} ({len(missing)} missing)")
    modules = dict(lora_layers(model))
    with torch.no_grad():
        for key, value in state.items():
            name, part = key[len(PEFT_PREFIX):].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
            target = getattr(modules[name], part).weight
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"{weights}: {key} has shape {tuple(value.shape)}, this model needs {tuple(target.shape)}; "
                    "the adapter was trained for a different base model")
            target.copy_(value.to(target.dtype))
    return cfg


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain `nn.Linear` layers back."""
    drop_decode_step(model)
    for name, m in list(lora_layers(model)):
        # A new tensor rather than an in-place update: loaded weights may be read-only memory maps.
        m.base.weight = nn.Parameter(m.merged_weight().detach(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, m.base)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model
