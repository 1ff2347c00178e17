"""The SigLIP2 NaFlex vision encoder (the vision tower of LFM2-VL), in plain PyTorch.

As in transformers' `models/siglip2/modeling_siglip2.py` (`Siglip2VisionModel`):
- an image arrives already cut into patches: `pixel_values` (N, P, C*p*p), P padded to the batch's
  longest image, `pixel_attention_mask` (N, P) marking real patches, and `spatial_shapes` (N, 2) the
  (rows, columns) of each image's patch grid, so images keep their native aspect ratio ("NaFlex");
- patch embedding is a linear layer over the flattened patch (not a conv);
- learned position embeddings for a square grid (`num_patches` = g*g) are resized to each image's
  (rows, columns) with an antialiased bilinear filter, then added;
- pre-norm transformer blocks: LayerNorm, bidirectional multi-head attention (padding patches
  masked as keys), LayerNorm, MLP (fc1, gelu-tanh, fc2), with biases everywhere;
- a final `post_layernorm`. The attention-pooling head of SigLIP2 is not used by LFM2-VL.

Module names equal the checkpoint's (`embeddings.patch_embedding`, `encoder.layers.N.self_attn.q_proj`,
`post_layernorm`, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lfm2.errors import ConfigError

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
}


def activation(name: str, source: str) -> Any:
    if name not in ACTIVATIONS:
        raise ConfigError(f"{source}: activation {name!r} is not supported; expected one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@dataclass
class VisionConfig:
    """`vision_config` of an LFM2-VL checkpoint (transformers' `Siglip2VisionConfig` field names)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    patch_size: int = 16
    num_patches: int = 256  # positions of the learned square grid (16 x 16)
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision_config: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        side = math.isqrt(self.num_patches)
        if side * side != self.num_patches:
            raise ConfigError(f"vision_config: num_patches {self.num_patches} is not a square (the position grid)")
        activation(self.hidden_act, "vision_config")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VisionConfig:
        known = cls.__dataclass_fields__
        cfg = {k: v for k, v in raw.items() if k in known and v is not None}
        if isinstance(cfg.get("patch_size"), (list, tuple)):
            p = cfg["patch_size"]
            if len(set(p)) != 1:
                raise ConfigError(f"vision_config: non-square patch_size {p} is not supported")
            cfg["patch_size"] = p[0]
        try:
            return cls(**cfg)
        except TypeError as e:
            raise ConfigError(f"vision_config: {e}") from None


def resize_weights(size: int, grid: int) -> torch.Tensor:
    """(size, grid) weights that resample `grid` positions to `size` with an antialiased linear filter.

    The triangle filter widens by the scale when shrinking (antialiasing), and each row is
    normalised; this equals `F.interpolate(mode="bilinear", antialias=True, align_corners=False)`
    along one axis, which is what transformers' `Siglip2VisionEmbeddings.resize_positional_embeddings` does.
    """
    scale = grid / size
    support = max(scale, 1.0)
    center = (torch.arange(size, dtype=torch.float32) + 0.5) * scale - 0.5
    source = torch.arange(grid, dtype=torch.float32)
    w = (1 - (source[None] - center[:, None]).abs() / support).clamp(min=0)
    return w / w.sum(-1, keepdim=True)


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Linear(config.num_channels * config.patch_size**2, config.hidden_size)
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)
        self.grid = math.isqrt(config.num_patches)

    def positions(self, spatial_shapes: torch.Tensor, length: int) -> torch.Tensor:
        """Position embeddings (N, length, C): each image's grid resized to its (rows, columns), zeros after.

        The padding rows only reach padding patches, which attention masks and the projector drops."""
        table = self.position_embedding.weight
        g, C = self.grid, table.shape[-1]
        grid = table.float().reshape(g, g, C)
        out = torch.zeros(len(spatial_shapes), length, C, dtype=torch.float32, device=table.device)
        for i, (h, w) in enumerate(spatial_shapes.tolist()):
            wh = resize_weights(h, g).to(table.device)
            ww = resize_weights(w, g).to(table.device)
            # (h, g) x (g, g, C) x (w, g) -> (h, w, C), row-major like the patches
            out[i, : h * w] = torch.einsum("hj,jkc,wk->hwc", wh, grid, ww).reshape(h * w, C)
        return out.to(table.dtype)

    def forward(self, pixel_values: torch.Tensor, spatial_shapes: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        return x + self.positions(spatial_shapes, pixel_values.shape[1])


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        N, P, d = x.shape
        # (N, P, d) -> (N, heads, P, hd)
        q, k, v = (p(x).view(N, P, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(N, P, d))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.act = activation(config.hidden_act, "vision_config")
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))


class Siglip2VisionModel(nn.Module):
    """Patches (N, P, C*p*p) of N images -> hidden states (N, P, hidden); rows past an image's patches are padding."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor, spatial_shapes: torch.Tensor
    ) -> torch.Tensor:
        x = self.embeddings(pixel_values, spatial_shapes)
        real = pixel_attention_mask.to(device=x.device, dtype=torch.bool)
        # (N, P) real patches -> (N, 1, 1, P): every query sees the real keys of its own image only.
        mask = None if bool(real.all()) else real[:, None, None, :]
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return self.post_layernorm(x)
