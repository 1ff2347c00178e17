"""Inference caches, passed explicitly into the model.

LFM2 has two kinds of state:
- attention blocks keep K (after RoPE) and V per kv head for every position: a KV cache that
  grows with the sequence, here allocated once at `max_len` slots;
- convolution blocks keep only the last L-1 inputs `u = B*x` of their depthwise convolution: a
  few numbers per channel, constant in sequence length (the family's edge on devices).

A batch holds rows of different lengths with LEFT padding, so all rows write the same slot at
each step. Three small tensors make rows independent of each other:
- `valid` (B, max_len) marks which slots hold a real token; attention masks the rest;
- `positions` (B,) is each row's next RoPE position, counting its real tokens only, so a row's
  phases never depend on how long its neighbours are (as transformers' `generate` does);
- the conv state of a row is built from that row's real tokens only (pads are zeroed first).

`snapshot()` / `restore()` copy the small state (conv states, positions, slot count): enough to
roll back speculative tokens or reuse a prefix, since KV slots past `length` are simply ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lfm2.config import ModelConfig


@dataclass
class CacheSnapshot:
    length: int
    positions: torch.Tensor
    valid: torch.Tensor
    conv: dict[int, torch.Tensor]


class Cache:
    """KV cache for attention layers and conv state for convolution layers, for B rows."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0  # slots filled so far (the same for every row)
        kv_shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.conv: dict[int, torch.Tensor] = {}
        for i, kind in enumerate(config.layer_types):
            if kind == "full_attention":
                self.keys[i] = torch.zeros(kv_shape, dtype=dtype, device=device)
                self.values[i] = torch.zeros(kv_shape, dtype=dtype, device=device)
            else:
                shape = (batch_size, config.hidden_size, config.conv_L_cache - 1)
                self.conv[i] = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)

    def reserve(self, mask: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Claim the next T slots for a step whose real tokens are `mask` (B, T) bool.

        Returns the first slot and the RoPE positions (B, T) of the new tokens. Pads get the
        position of the next real token; their outputs are never used.
        """
        batch, steps = mask.shape
        if batch != self.batch_size:
            raise ValueError(f"cache holds {self.batch_size} rows, the input has {batch}")
        start = self.length
        if start + steps > self.max_len:
            raise ValueError(
                f"cache is full: {start} of {self.max_len} slots used, {steps} more requested; "
                "allocate a larger cache (max_len)"
            )
        self.valid[:, start : start + steps] = mask
        positions = self.positions[:, None] + torch.cumsum(mask, dim=1) - mask.long()
        self.positions += mask.sum(dim=1)
        self.length = start + steps
        return start, positions

    def update_kv(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write K, V (B, kv_heads, T, hd) at slots start.. and return all filled slots."""
        end = start + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def snapshot(self) -> CacheSnapshot:
        return CacheSnapshot(
            self.length,
            self.positions.clone(),
            self.valid.clone(),
            {i: s.clone() for i, s in self.conv.items()},
        )

    def restore(self, snap: CacheSnapshot) -> None:
        """Roll back to a snapshot: later KV slots are ignored, conv states are copied back."""
        self.length = snap.length
        self.positions.copy_(snap.positions)
        self.valid.copy_(snap.valid)
        for i, s in snap.conv.items():
            self.conv[i].copy_(s)
