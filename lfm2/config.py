"""Model configuration: one dataclass for dense LFM2 and LFM2-MoE, read from `config.json`.

Released LFM2 configs carry several generations of field names (`block_ff_dim` beside
`intermediate_size`, `full_attn_idxs` instead of `layer_types`, `rope_theta` at the top level or
inside `rope_parameters`, `tie_embedding` for `tie_word_embeddings`). `ModelConfig.from_dict`
resolves them the way Hugging Face transformers does, so the shapes we build are the shapes in
the checkpoint. Unknown keys are ignored: configs also hold training-time fields we do not need.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lfm2.errors import ConfigError

MODEL_TYPES = ("lfm2", "lfm2_moe")


@dataclass
class ModelConfig:
    """The architecture of an LFM2 model. Field names follow Hugging Face's `Lfm2Config`."""

    model_type: str = "lfm2"
    vocab_size: int = 65536
    hidden_size: int = 1024
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    intermediate_size: int = 4608  # the effective feed-forward width, after block_auto_adjust_ff_dim
    layer_types: list[str] = field(default_factory=list)
    conv_L_cache: int = 3
    conv_bias: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 128_000
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 7
    pad_token_id: int | None = 0
    # Mixture of experts (model_type "lfm2_moe" only).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    num_dense_layers: int = 0
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    use_expert_bias: bool = True

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}: lfm2 runs {' and '.join(MODEL_TYPES)} models"
            )
        if not self.head_dim:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if not self.layer_types:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        bad = sorted({t for t in self.layer_types if t not in ("conv", "full_attention")})
        if bad:
            raise ConfigError(f"layer_types holds {bad}; expected only 'conv' and 'full_attention'")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.is_moe and not (0 < self.num_experts_per_tok <= self.num_experts):
            raise ConfigError(
                f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..num_experts "
                f"({self.num_experts})"
            )

    @property
    def is_moe(self) -> bool:
        return self.model_type == "lfm2_moe"

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    @property
    def eos_token_ids(self) -> list[int]:
        ids = self.eos_token_id
        return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> ModelConfig:
        """Build a config from a `config.json` dict, resolving every alias released configs use."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, found {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type is None:
            raise ConfigError(f"{source}: no 'model_type' field; expected one of {MODEL_TYPES}")
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"{source}: unsupported model_type {model_type!r}; lfm2 runs {', '.join(MODEL_TYPES)}"
            )
        cfg = dict(raw)
        cfg["hidden_size"] = cfg.get("hidden_size", cfg.get("block_dim"))
        cfg["num_attention_heads"] = cfg.get("num_attention_heads", cfg.get("num_heads"))
        cfg["norm_eps"] = cfg.get("norm_eps", cfg.get("block_norm_eps", 1e-5))
        cfg["tie_word_embeddings"] = cfg.get("tie_embedding", cfg.get("tie_word_embeddings", True))
        rope = cfg.get("rope_parameters") or {}
        cfg["rope_theta"] = rope.get("rope_theta", cfg.get("rope_theta", 1_000_000.0))
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"{source}: rope_type {rope['rope_type']!r} is not supported (only 'default')")
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if not isinstance(cfg.get(name), int) or cfg[name] <= 0:
                raise ConfigError(f"{source}: field {name!r} must be a positive integer, found {cfg.get(name)!r}")
        cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
        n = cfg["num_hidden_layers"]
        if not cfg.get("layer_types"):
            idxs = cfg.get("full_attn_idxs")
            idxs = range(n) if idxs is None else idxs
            cfg["layer_types"] = ["full_attention" if i in idxs else "conv" for i in range(n)]
        if model_type == "lfm2":
            cfg["intermediate_size"] = dense_ff_dim(cfg)
        else:
            for name in ("intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok"):
                if not isinstance(cfg.get(name), int):
                    raise ConfigError(f"{source}: MoE field {name!r} is missing or not an integer")
        known = {f for f in cls.__dataclass_fields__}
        try:
            return cls(**{k: v for k, v in cfg.items() if k in known and v is not None})
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found; a checkpoint directory must contain one")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """A `config.json` that both lfm2 and Hugging Face transformers read back to this config."""
        d = asdict(self)
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": d.pop("rope_theta")}
        d["block_auto_adjust_ff_dim"] = False  # intermediate_size is already the effective width
        d["architectures"] = ["Lfm2MoeForCausalLM" if self.is_moe else "Lfm2ForCausalLM"]
        if not self.is_moe:
            for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "num_dense_layers",
                      "norm_topk_prob", "routed_scaling_factor", "use_expert_bias"):
                d.pop(k)
        return d


def dense_ff_dim(cfg: dict[str, Any]) -> int:
    """The effective dense feed-forward width, following transformers' `Lfm2MLP`.

    `block_ff_dim` wins over `intermediate_size` (the released 1.2B config carries both, and only
    `block_ff_dim` adjusts to the real width). With `block_auto_adjust_ff_dim` the width becomes
    2/3 of it, then times `block_ffn_dim_multiplier` rounded up to `block_multiple_of`.
    """
    ff = cfg.get("block_ff_dim", cfg.get("intermediate_size"))
    if not isinstance(ff, int) or ff <= 0:
        raise ConfigError("config: neither 'block_ff_dim' nor 'intermediate_size' is a positive integer")
    if cfg.get("block_auto_adjust_ff_dim", True):
        ff = int(2 * ff / 3)
        mult = cfg.get("block_ffn_dim_multiplier", 1.0)
        if mult is not None:
            ff = int(mult * ff)
            m = cfg.get("block_multiple_of", 256)
            ff = m * ((ff + m - 1) // m)
    return ff


def _types(n: int, attn: list[int]) -> list[str]:
    return ["full_attention" if i in attn else "conv" for i in range(n)]


_SMALL_ATTN = [2, 5, 8, 10, 12, 14]

# Released sizes. Dense widths are the effective ones (what the checkpoint's tensors hold).
PRESETS: dict[str, dict[str, Any]] = {
    "LFM2-350M": dict(hidden_size=1024, num_attention_heads=16, intermediate_size=4608,
                      layer_types=_types(16, _SMALL_ATTN)),
    "LFM2-700M": dict(hidden_size=1536, num_attention_heads=24, intermediate_size=6912,
                      layer_types=_types(16, _SMALL_ATTN)),
    "LFM2-1.2B": dict(hidden_size=2048, num_attention_heads=32, intermediate_size=8192,
                      layer_types=_types(16, _SMALL_ATTN)),
    "LFM2-2.6B": dict(hidden_size=2048, num_attention_heads=32, intermediate_size=10752,
                      num_hidden_layers=30, layer_types=_types(30, [2, 6, 10, 14, 18, 22, 26, 29])),
    "LFM2-8B-A1B": dict(model_type="lfm2_moe", hidden_size=2048, num_attention_heads=32,
                        intermediate_size=7168, num_hidden_layers=24,
                        layer_types=_types(24, [2, 6, 10, 14, 18, 21]), num_experts=32,
                        num_experts_per_tok=4, moe_intermediate_size=1792, num_dense_layers=2),
    "LFM2-24B-A2B": dict(model_type="lfm2_moe", hidden_size=2048, num_attention_heads=32,
                         intermediate_size=7168, num_hidden_layers=40,
                         layer_types=_types(40, [2, 6, 10, 14, 18, 22, 26, 30, 34, 38]), num_experts=64,
                         num_experts_per_tok=4, moe_intermediate_size=1536, num_dense_layers=2),
}

# Hugging Face hub ids of the released checkpoints, by preset name.
HUB_IDS = {name: f"LiquidAI/{name}" for name in PRESETS}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The config of a released size, e.g. `preset("LFM2-350M")`; overrides change any field."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
